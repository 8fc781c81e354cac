"""calm.training.config: TrainConfig refuses bad settings with an InputError and knows each mode's defaults."""

from __future__ import annotations

import pytest

from calm.errors import InputError
from calm.training import MODES, TrainConfig


@pytest.mark.parametrize(
    "kw,message",
    [
        ({"mode": "distill"}, "mode"),
        ({"steps": 0}, "steps"),
        ({"batch_size": True}, "batch_size"),
        ({"max_docs": -1}, "max_docs"),
        ({"lr": float("inf")}, "lr"),
        ({"warmup": 1.0}, "warmup"),
        ({"grad_clip": -1.0}, "grad_clip"),
        ({"classifier": False, "transform": False}, "nothing to train"),
        ({"lora_layers": "top"}, "lora_layers"),
        ({"lora_layers": "5-2"}, "lora_layers"),
        ({"anchor": float("nan")}, "anchor"),
        ({"device": "tpu"}, "device"),
    ],
)
def test_bad_settings_are_input_errors(kw, message):
    with pytest.raises(InputError, match=message):
        TrainConfig(data=("x.jsonl",), out="o", **kw)


def test_no_data_is_an_input_error():
    with pytest.raises(InputError, match="no training data"):
        TrainConfig(data=(), out="o")


def test_defaults_per_mode_and_paths():
    lrs = {mode: TrainConfig(data="x.jsonl", out="o", mode=mode).learning_rate for mode in MODES}
    assert lrs == {"heads": 3e-3, "finetune": 2e-5, "lora": 3e-4}
    assert TrainConfig(data="x.jsonl", out="o", mode="lora", lr=0.5).learning_rate == 0.5
    config = TrainConfig(data="x.jsonl", out="o", lora_layers="0-19")
    assert config.data == ("x.jsonl",) and config.work_path.as_posix() == "o/training"
    assert TrainConfig(**{**config.to_dict(), "data": config.data}) == config  # to_dict is the config
