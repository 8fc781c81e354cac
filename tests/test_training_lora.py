"""calm.training.lora: mode lora (LoRA adapters and exit heads distilled from the original model) on a tiny
random Llama."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import load_file

from calm.checkpoints import lora
from calm.checkpoints.checkpoint import HEADS_FILE, read_config
from calm.checkpoints.loading import load_backbone
from calm.errors import InputError
from calm.exits.heads import ExitHeads
from calm.model import CalmModel
from calm.training import STATE_FILE, TrainConfig, read_training_data, train
from calm.training.data import lora_sequences
from calm.training.lora import lora_spec, sample_layers
from helpers import build_tiny_model
from training_helpers import lora_config

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory) -> str:
    """The tiny Llama with peaked distributions, so that KL and agreement mean something."""
    return str(build_tiny_model(tmp_path_factory.mktemp("tiny-peaked"), initializer_range=0.2))


@torch.no_grad()
def _exit_kl(original, calm: CalmModel, ids: torch.Tensor) -> torch.Tensor:
    """Per exit layer 1..L-1: KL(original final || calm's exit head at that layer), mean over positions."""
    teacher = original(ids).logits[0].float().log_softmax(-1)  # [T, V]
    hs = calm.model(ids, output_hidden_states=True).hidden_states
    kls = []
    for k in range(1, calm.num_layers):
        h = hs[k][0]
        student = calm.network.token_logits(h, torch.full((h.shape[0],), k)).float().log_softmax(-1)
        kls.append(F.kl_div(student, teacher, reduction="batchmean", log_target=True))
    return torch.stack(kls)


def test_lora_training_reduces_exit_kl(tiny_model, tmp_path):
    config = lora_config(tiny_model, tmp_path, steps=40, lr=1e-2, checkpoint_every=40, layers_per_step=3)
    train(config, progress=False)
    original = load_backbone(tiny_model).model
    after = CalmModel.from_pretrained(config.out)
    before = CalmModel(load_backbone(tiny_model).model, heads=ExitHeads(after.heads.config))  # the plain head
    ids = torch.tensor([lora_sequences(after, read_training_data(config.data), config)[0].ids])  # prompt + summary
    kl_before, kl_after = _exit_kl(original, before, ids), _exit_kl(original, after, ids)
    assert (kl_after < 0.7 * kl_before).all(), (kl_before, kl_after)
    lora_b = [v for k, v in load_file(str(Path(config.out) / lora.ADAPTER_WEIGHTS)).items() if "lora_B" in k]
    assert lora_b and all(v.abs().sum() > 0 for v in lora_b)  # the backbone itself changed
    assert read_config(config.out).extra["training"]["mode"] == "lora"


def test_resume_is_bit_for_bit(tiny_model, tmp_path):
    whole = lora_config(tiny_model, tmp_path / "a", steps=8)
    train(whole, progress=False)

    class Stop(Exception):
        pass

    def crash(step, _):
        if step == 4:
            raise Stop

    split = lora_config(tiny_model, tmp_path / "b", steps=8)
    with pytest.raises(Stop):
        train(split, progress=False, callback=crash)
    with safe_open(str(Path(split.work_path) / STATE_FILE), "pt") as f:
        names = set(f.keys())
        assert f.metadata()["step"] == "4"
    assert "extra.counts" in names and any(n.startswith("model.lora__") for n in names)
    assert any(n.startswith("model.heads__") for n in names)
    resumed = train(TrainConfig(**{**split.to_dict(), "data": split.data, "resume": True}), progress=False)
    assert resumed.resumed_from == 4 and resumed.steps_this_run == 4
    for name in (lora.ADAPTER_WEIGHTS, HEADS_FILE):
        a, b = load_file(str(Path(whole.out) / name)), load_file(str(Path(split.out) / name))
        assert a.keys() == b.keys()
        for k in a:
            assert torch.equal(a[k], b[k]), k


def test_layers_are_a_seeded_rotation(tiny_model, tmp_path):
    config = lora_config(tiny_model, tmp_path, layers_per_step=2, min_exit_layer=2, lora_layers="1-2")
    assert lora_spec(config).layers == (1, 2) and lora_spec(config).rank == 4 and lora_spec(config).alpha == 8.0
    picks = [sample_layers(config, 6, step) for step in range(20)]
    assert all(len(p) == 2 and p == sorted(p) and set(p) <= {2, 3, 4, 5} for p in picks)
    assert len({tuple(p) for p in picks}) > 1 and picks == [sample_layers(config, 6, s) for s in range(20)]


def test_bad_lora_settings_are_input_errors(tiny_model, tmp_path):
    with pytest.raises(InputError, match="outside"):
        train(lora_config(tiny_model, tmp_path, lora_layers="2-9"), progress=False)
