"""LoRA adapters of the backbone (calm.checkpoints.lora): saved by mode lora of calm.training, merged at load, on a
tiny random Llama. The training itself: test_training_lora.py."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from calm.checkpoints import lora
from calm.checkpoints.loading import load_backbone
from calm.errors import CheckpointError
from calm.exits.policy import ExitPolicy
from calm.model import CalmModel
from calm.training import train
from helpers import DOCS, NUM_LAYERS, build_tiny_model
from training_helpers import lora_config

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory) -> str:
    """The tiny Llama with peaked distributions, so that KL and agreement mean something."""
    return str(build_tiny_model(tmp_path_factory.mktemp("tiny-peaked"), initializer_range=0.2))


def _batch(calm: CalmModel) -> torch.Tensor:
    return calm.encode_prompts([DOCS[0]["document"] + " " + DOCS[0]["summary"]], 8).ids  # [1, T]


def test_merged_model_equals_peft_model(tiny_model, tmp_path):
    from peft import PeftModel

    config = lora_config(tiny_model, tmp_path, steps=4, lr=1e-2)
    train(config, progress=False)
    merged = CalmModel.from_pretrained(config.out)
    peft_model = PeftModel.from_pretrained(load_backbone(tiny_model).model, config.out).eval()
    ids = _batch(merged)
    with torch.no_grad():
        assert torch.allclose(merged.model(ids).logits, peft_model(input_ids=ids).logits, atol=1e-5)
        want = peft_model.generate(
            input_ids=ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=6,
            do_sample=False,
            pad_token_id=merged.pad_token_id,
        )[0, ids.shape[1] :]
    got = merged.generate(ids, max_new_tokens=6, policy=ExitPolicy.never()).token_ids[0]
    assert list(got) == want.tolist()[: len(got)]
    config_json = json.loads((Path(config.out) / lora.ADAPTER_CONFIG).read_text())
    assert config_json["base_model_name_or_path"] == tiny_model


@pytest.fixture
def trained(tiny_model, tmp_path) -> Path:
    config = lora_config(tiny_model, tmp_path, steps=2, checkpoint_every=2)
    train(config, progress=False)
    return Path(config.out)


def test_corrupt_adapter_weights_are_a_checkpoint_error(trained):
    (trained / lora.ADAPTER_WEIGHTS).write_bytes(b"not safetensors")
    with pytest.raises(CheckpointError, match="corrupt LoRA adapter weights"):
        CalmModel.from_pretrained(str(trained))


def test_missing_adapter_weights_are_a_checkpoint_error(trained):
    (trained / lora.ADAPTER_WEIGHTS).unlink()
    with pytest.raises(CheckpointError, match="is missing"):
        CalmModel.from_pretrained(str(trained))


def test_corrupt_adapter_config_is_a_checkpoint_error(trained):
    (trained / lora.ADAPTER_CONFIG).write_text("{")
    with pytest.raises(CheckpointError, match="corrupt LoRA adapter config"):
        CalmModel.from_pretrained(str(trained))


def test_adapter_of_another_shape_is_a_checkpoint_error(trained, tmp_path):
    tensors = load_file(str(trained / lora.ADAPTER_WEIGHTS))
    key = next(k for k in tensors if "lora_A" in k)
    tensors[key] = torch.zeros(tensors[key].shape[0], tensors[key].shape[1] + 3)
    save_file(tensors, str(trained / lora.ADAPTER_WEIGHTS))
    with pytest.raises(CheckpointError, match="does not fit this backbone"):
        CalmModel.from_pretrained(str(trained))


def test_adapter_for_another_base_is_a_checkpoint_error(trained, tmp_path):
    from transformers import GPT2Config, GPT2LMHeadModel

    other = tmp_path / "gpt2"
    GPT2LMHeadModel(GPT2Config(vocab_size=64, n_embd=32, n_layer=NUM_LAYERS, n_head=2)).save_pretrained(other)
    config = json.loads((trained / "calm_config.json").read_text())
    config["backbone"], config["heads"] = str(other), None
    (trained / "calm_config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="does not fit this backbone"):
        CalmModel.from_pretrained(str(trained))


def test_build_tiny_model_is_a_fresh_base(tmp_path):
    """The adapter checks use module names: the tiny helper model has Llama's linear maps."""
    model = load_backbone(str(build_tiny_model(tmp_path / "m"))).model
    names = {n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    assert set(lora.LLAMA_LINEARS) <= names
