"""calm.training.loop: `train` end to end in modes heads and finetune (lora: test_training_lora.py),
the learning-rate schedule, and the command line."""

from __future__ import annotations

import runpy
import sys
from pathlib import Path

import pytest
import torch

from calm.checkpoints.checkpoint import read_config
from calm.cli.train import train_command
from calm.exits.policy import ExitPolicy
from calm.model import CalmModel
from calm.training import SUMMARIES_FILE, TrainConfig, learning_rate, train
from training_helpers import training_config

pytestmark = pytest.mark.usefixtures("one_thread")


def test_losses_decrease(training_setup, tmp_path):
    result = train(
        training_config(
            training_setup, tmp_path / "out", steps=80, lr=3e-2, batch_size=32, log_every=20, checkpoint_every=80
        ),
        progress=False,
    )
    first, last = result.history[0], result.history[-1]  # means over steps 1-20 and 61-80
    assert last["kl"] < 0.85 * first["kl"]
    assert last["bce"] < 0.95 * first["bce"]
    assert last["agree"] > first["agree"]  # more layers now predict the final token
    assert result.steps_this_run == 80 and result.num_positions > 0
    assert result.summaries_generated == 6  # one greedy summary per document
    assert (tmp_path / "out" / "training" / SUMMARIES_FILE).is_file()


def test_frozen_backbone_gets_no_gradient(training_setup, tmp_path, monkeypatch):
    import calm.checkpoints.loading

    captured = {}
    real = calm.checkpoints.loading.load_backbone

    def spy(*args, **kwargs):
        captured["loaded"] = real(*args, **kwargs)
        captured["before"] = {k: v.clone() for k, v in captured["loaded"].model.state_dict().items()}
        return captured["loaded"]

    monkeypatch.setattr(calm.checkpoints.loading, "load_backbone", spy)
    result = train(training_config(training_setup, tmp_path / "out", steps=4), progress=False)
    model = captured["loaded"].model
    for name, param in model.named_parameters():
        assert param.grad is None, name
        assert not param.requires_grad, name
        assert torch.equal(param.detach(), captured["before"][name]), name
    heads = result.heads
    assert heads.up.abs().sum() > 0  # B_k started at zero and moved
    assert heads.cls_weight.abs().sum() > 0


def test_finetune_writes_a_self_contained_checkpoint(training_setup, tmp_path):
    out = tmp_path / "ft"
    result = train(
        training_config(training_setup, out, mode="finetune", steps=3, batch_size=2, lr=1e-3, checkpoint_every=3),
        progress=False,
    )
    assert result.heads is None and result.final_losses["loss"] > 0
    assert set(result.final_losses) == {"step", "lr", "loss", "first", "last"}
    cfg = read_config(out)
    assert cfg.backbone == "backbone" and cfg.heads is None and cfg.backbone_kind == "included"
    assert cfg.extra["training"]["mode"] == "finetune"
    tuned = CalmModel.from_pretrained(str(out))
    original = CalmModel.from_pretrained(training_setup["backbone"])
    changed = [not torch.equal(p, q) for p, q in zip(tuned.model.parameters(), original.model.parameters())]
    assert any(changed)


def test_save_load_round_trip(training_setup, tmp_path):
    out = tmp_path / "ckpt"
    config = training_config(training_setup, out, steps=4)
    result = train(config, command="calm train --test", progress=False)
    calm = CalmModel.from_pretrained(str(out))
    loaded = calm.heads.state_dict()
    for name, value in result.heads.state_dict().items():
        assert torch.equal(loaded[name], value), name
    cfg = read_config(out)
    assert cfg.backbone == str(Path(training_setup["backbone"]).resolve())
    training = cfg.extra["training"]
    assert training["command"] == "calm train --test"
    assert training["steps"] == 4 and training["config"]["rank"] == 4
    assert [d["path"] for d in training["data"]] == [training_setup["docs"], training_setup["text"]]
    assert {"kl", "bce"} <= set(training["final_losses"])
    res = calm.generate([[5, 6, 7]], max_new_tokens=4, policy=ExitPolicy(measure="classifier", threshold=0.5))
    assert len(res.token_ids[0]) >= 1
    # a resume of a finished run trains nothing and writes the same checkpoint again
    again = train(TrainConfig(**{**config.to_dict(), "data": config.data, "resume": True}), progress=False)
    assert again.resumed_from == 4 and again.steps_this_run == 0 and again.final_losses == result.final_losses
    assert read_config(out).extra["training"]["final_losses"] == training["final_losses"]


def test_schedule_warms_up_then_decays_to_a_tenth():
    cfg = TrainConfig(data=("x.jsonl",), out="o", steps=100, lr=1.0, warmup=0.1)
    lrs = [learning_rate(cfg, i) for i in range(100)]
    assert lrs[9] == pytest.approx(1.0) and lrs[0] == pytest.approx(0.1) and lrs[-1] >= 0.1 - 1e-9
    assert max(lrs) <= 1.0 + 1e-9 and lrs[10:] == sorted(lrs[10:], reverse=True)
    no_warmup = TrainConfig(data=("x.jsonl",), out="o", steps=10, lr=1.0, warmup=0.0)
    assert learning_rate(no_warmup, 0) == 1.0 and learning_rate(no_warmup, 10) == pytest.approx(0.1)


def test_cli_trains_and_records_the_command(training_setup, tmp_path):
    from click.testing import CliRunner

    out = tmp_path / "cli"
    args = [
        "--model",
        training_setup["backbone"],
        "--data",
        training_setup["docs"],
        "--data",
        training_setup["text"],
        "--out",
        str(out),
        "--steps",
        "3",
        "--batch-size",
        "8",
        "--rank",
        "4",
        "--seed",
        "1",
        "--summary-tokens",
        "5",
        "--max-doc-tokens",
        "40",
        "--chunk-tokens",
        "32",
        "--max-chunks",
        "4",
        "--device",
        "cpu",
        "--quiet",
    ]
    res = CliRunner().invoke(train_command, args)
    assert res.exit_code == 0, res.output
    assert "wrote" in res.output and "s/step" in res.output
    assert read_config(out).extra["training"]["command"].startswith("train --model ")
    assert read_config(out).extra["training"]["command"].endswith("--device cpu --quiet")
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"summary": "x"}\n')
    res = CliRunner().invoke(train_command, ["--data", str(bad), "--out", str(tmp_path / "x")])
    assert res.exit_code == 1 and "no field 'document'" in res.output


def test_python_m_calm_training_is_the_train_command(monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", ["calm.training", "--help"])
    with pytest.raises(SystemExit) as exit_:
        runpy.run_module("calm.training", run_name="__main__")
    assert exit_.value.code == 0
    help_text = capsys.readouterr().out
    assert help_text.startswith("Usage: python -m calm.training [OPTIONS]")
    assert "--mode [heads|finetune|lora]" in help_text
