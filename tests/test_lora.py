"""CALM fine-tuning with LoRA (calm.lora, calm.training.lora) on a tiny random Llama."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from calm import lora
from calm.errors import CheckpointError, InputError
from calm.heads import ExitHeads
from calm.loading import load_backbone
from calm.model import CalmModel
from calm.policy import ExitPolicy
from calm.training import TrainConfig, train
from helpers import DOCS, NUM_LAYERS, build_tiny_model, write_jsonl

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory) -> str:
    """The tiny Llama with peaked distributions, so that KL and agreement mean something."""
    return str(build_tiny_model(tmp_path_factory.mktemp("tiny-peaked"), initializer_range=0.2))


def _config(tiny_model: str, tmp_path: Path, **kw) -> TrainConfig:
    tmp_path.mkdir(parents=True, exist_ok=True)
    data = write_jsonl(tmp_path / "train.jsonl", DOCS)
    base = dict(data=(str(data),), out=str(tmp_path / "out"), model=tiny_model, mode="lora", steps=12, batch_size=2,
                layers_per_step=2, lr=3e-3, rank=4, lora_rank=4, min_exit_layer=1, doc_positions=4,
                max_doc_tokens=48, summary_tokens=8, checkpoint_every=4, log_every=1, device="cpu", seed=1)
    base.update(kw)
    return TrainConfig(**base)


def _batch(calm: CalmModel) -> torch.Tensor:
    return calm.encode_prompts([DOCS[0]["document"] + " " + DOCS[0]["summary"]], 8).ids      # [1, T]


def _training_ids(calm: CalmModel, config: TrainConfig) -> torch.Tensor:
    """The first training sequence (summary prompt + reference summary) [1, T]."""
    from calm.training.data import lora_sequences, read_training_data
    return torch.tensor([lora_sequences(calm, read_training_data(config.data), config)[0].ids])


@torch.no_grad()
def _exit_kl(original, calm: CalmModel, ids: torch.Tensor) -> torch.Tensor:
    """Per exit layer 1..L-1: KL(original final || calm's exit head at that layer), mean over positions."""
    teacher = original(ids).logits[0].float().log_softmax(-1)                                   # [T, V]
    hs = calm.model(ids, output_hidden_states=True).hidden_states
    net = calm.network
    kls = []
    for k in range(1, calm.num_layers):
        h = hs[k][0]
        student = net.token_logits(h, torch.full((h.shape[0],), k)).float().log_softmax(-1)
        kls.append(F.kl_div(student, teacher, reduction="batchmean", log_target=True))
    return torch.stack(kls)


def test_lora_training_reduces_exit_kl(tiny_model, tmp_path):
    config = _config(tiny_model, tmp_path, steps=40, lr=1e-2, checkpoint_every=40, layers_per_step=3)
    train(config, progress=False)
    original = load_backbone(tiny_model).model
    after = CalmModel.from_pretrained(config.out)
    before = CalmModel(load_backbone(tiny_model).model, heads=ExitHeads(after.heads.config))   # the plain head
    ids = _training_ids(after, config)
    kl_before, kl_after = _exit_kl(original, before, ids), _exit_kl(original, after, ids)
    assert (kl_after < 0.7 * kl_before).all(), (kl_before, kl_after)
    lora_b = [v for k, v in load_file(str(Path(config.out) / lora.ADAPTER_WEIGHTS)).items() if "lora_B" in k]
    assert lora_b and all(v.abs().sum() > 0 for v in lora_b)                 # the backbone itself changed


def test_resume_is_bit_for_bit(tiny_model, tmp_path):
    whole = _config(tiny_model, tmp_path / "a", steps=8)
    train(whole, progress=False)

    class Stop(Exception):
        pass

    def crash(step, _):
        if step == 4:
            raise Stop
    split = _config(tiny_model, tmp_path / "b", steps=8)
    with pytest.raises(Stop):
        train(split, progress=False, callback=crash)
    train(TrainConfig(**{**split.to_dict(), "data": split.data, "resume": True}), progress=False)
    for name in (lora.ADAPTER_WEIGHTS, "exit_heads.safetensors"):
        a, b = load_file(str(Path(whole.out) / name)), load_file(str(Path(split.out) / name))
        assert a.keys() == b.keys()
        for k in a:
            assert torch.equal(a[k], b[k]), k


def test_merged_model_equals_peft_model(tiny_model, tmp_path):
    from peft import PeftModel
    config = _config(tiny_model, tmp_path, steps=4, lr=1e-2)
    train(config, progress=False)
    merged = CalmModel.from_pretrained(config.out)
    peft_model = PeftModel.from_pretrained(load_backbone(tiny_model).model, config.out).eval()
    ids = _batch(merged)
    with torch.no_grad():
        assert torch.allclose(merged.model(ids).logits, peft_model(input_ids=ids).logits, atol=1e-5)
        want = peft_model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=6,
                                   do_sample=False, pad_token_id=merged.pad_token_id)[0, ids.shape[1]:]
    got = merged.generate(ids, max_new_tokens=6, policy=ExitPolicy.never()).token_ids[0]
    assert list(got) == want.tolist()[:len(got)]
    config_json = json.loads((Path(config.out) / lora.ADAPTER_CONFIG).read_text())
    assert config_json["base_model_name_or_path"] == tiny_model


@pytest.fixture
def trained(tiny_model, tmp_path) -> Path:
    config = _config(tiny_model, tmp_path, steps=2, checkpoint_every=2)
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


def test_bad_lora_settings_are_input_errors(tiny_model, tmp_path):
    with pytest.raises(InputError, match="lora_layers"):
        _config(tiny_model, tmp_path, lora_layers="top")
    with pytest.raises(InputError, match="anchor"):
        _config(tiny_model, tmp_path, anchor=float("nan"))
    with pytest.raises(InputError, match="outside"):
        train(_config(tiny_model, tmp_path, lora_layers="2-9"), progress=False)


def test_build_tiny_model_is_a_fresh_base(tmp_path):
    """The adapter checks use module names: the tiny helper model has Llama's linear maps."""
    model = load_backbone(str(build_tiny_model(tmp_path / "m"))).model
    names = {n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    assert set(lora.LLAMA_LINEARS) <= names
