"""calm.training.state: the training state file and resuming from it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from calm.checkpoints.checkpoint import HEADS_FILE, read_config
from calm.errors import InputError
from calm.training import STATE_FILE, TrainConfig, check_fingerprint, load_state, save_state, train
from calm.training.state import restore_state, state_meta
from training_helpers import training_config

pytestmark = pytest.mark.usefixtures("one_thread")


def _state(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    with safe_open(str(path), "pt") as f:
        return load_file(str(path)), f.metadata()


def test_state_file_format(tmp_path):
    """The names and metadata a saved run is resumed from (runs in progress depend on them)."""
    module = torch.nn.Linear(3, 2)
    optimizer = torch.optim.AdamW(module.parameters(), lr=0.1, foreach=False)
    module(torch.randn(4, 3)).sum().backward()
    optimizer.step()
    config = TrainConfig(data=("x.jsonl",), out=str(tmp_path), steps=9)
    path = tmp_path / STATE_FILE
    save_state(
        path,
        module,
        optimizer,
        5,
        state_meta(config, 1, [{"step": 5, "kl": 1.5}]),
        {"counts": torch.ones(2, 3, dtype=torch.float64)},
    )
    tensors, metadata = _state(path)
    assert STATE_FILE == "state.safetensors"
    assert set(tensors) == {
        "model.weight",
        "model.bias",
        "optim.0.step",
        "optim.0.exp_avg",
        "optim.0.exp_avg_sq",
        "optim.1.step",
        "optim.1.exp_avg",
        "optim.1.exp_avg_sq",
        "rng.torch",
        "extra.counts",
    }
    assert set(metadata) == {"format", "step", "meta", "param_groups"}
    assert metadata["format"] == "calm-training-state" and metadata["step"] == "5"
    meta = json.loads(metadata["meta"])
    assert list(meta) == ["fingerprint", "num_processes", "history", "config"]
    assert "out" not in meta["fingerprint"] and meta["fingerprint"]["steps"] == 9
    assert meta["config"]["out"] == str(tmp_path)
    assert json.loads(metadata["param_groups"])[0]["betas"] == [0.9, 0.999]

    fresh = torch.nn.Linear(3, 2)
    fresh_opt = torch.optim.AdamW(fresh.parameters(), lr=0.5, foreach=False)
    extras = restore_state(*load_state(path), fresh, fresh_opt)
    assert torch.equal(fresh.weight, module.weight) and fresh_opt.param_groups[0]["lr"] == 0.1
    assert fresh_opt.param_groups[0]["betas"] == (0.9, 0.999)
    assert torch.equal(fresh_opt.state[fresh.weight]["exp_avg"], optimizer.state[module.weight]["exp_avg"])
    assert torch.equal(extras["counts"], torch.ones(2, 3, dtype=torch.float64))


def test_fingerprint_ignores_only_the_resume_free_fields(tmp_path):
    config = TrainConfig(data=("x.jsonl",), out="a", rank=4)
    stored = state_meta(config, 1, [])["fingerprint"]
    check_fingerprint(stored, TrainConfig(data=("x.jsonl",), out="b", rank=4, resume=True, log_every=3, device="cpu"))
    with pytest.raises(InputError, match=r"rank \(saved 4, now 8\)"):
        check_fingerprint(stored, TrainConfig(data=("x.jsonl",), out="a", rank=8))


def test_corrupt_state_is_an_input_error(tmp_path):
    bad = tmp_path / STATE_FILE
    bad.write_bytes(b"not safetensors")
    with pytest.raises(InputError, match="corrupt"):
        load_state(bad)


def test_resume_gives_the_same_heads(training_setup, tmp_path):
    full = train(training_config(training_setup, tmp_path / "a", steps=7, checkpoint_every=2), progress=False)

    class Interrupt(Exception):
        pass

    def stop(step, losses):
        if step == 5:
            raise Interrupt

    cfg = training_config(training_setup, tmp_path / "b", steps=7, checkpoint_every=2)
    with pytest.raises(Interrupt):
        train(cfg, progress=False, callback=stop)
    assert read_config(tmp_path / "b").extra["training"]["steps"] == 4
    tensors, metadata = _state(tmp_path / "b" / "training" / STATE_FILE)
    assert metadata["step"] == "4" and {"extra.pos_count", "extra.all_count"} <= set(tensors)
    resumed = train(TrainConfig(**{**cfg.to_dict(), "data": cfg.data, "resume": True}), progress=False)
    assert resumed.resumed_from == 4 and resumed.steps_this_run == 3
    assert resumed.summaries_generated == 0  # from the cache in the work dir
    a, b = load_file(str(tmp_path / "a" / HEADS_FILE)), load_file(str(tmp_path / "b" / HEADS_FILE))
    for name in a:
        assert torch.equal(a[name], b[name]), name  # bitwise on CPU
    assert full.final_losses["kl"] == pytest.approx(resumed.final_losses["kl"], rel=1e-5)


def test_resume_refuses_other_settings(training_setup, tmp_path):
    cfg = training_config(training_setup, tmp_path / "c", steps=2)
    train(cfg, progress=False)
    with pytest.raises(InputError, match="rank"):
        train(TrainConfig(**{**cfg.to_dict(), "data": cfg.data, "resume": True, "rank": 8}), progress=False)
