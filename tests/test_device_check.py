"""benchmarks/device_check.sh: the GPU check skips cleanly, in one line, where there is no CUDA device;
the lossless row it times is the checkpoint's stored setting."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from calm import CalmModel
from calm.speculative.lossless import LARGE_BATCH_KEY, STORE_KEY
from test_lossless import measured

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA device is here: the check would run, not skip")
def test_device_check_skips_in_one_line_without_cuda():
    env = {**os.environ, "PY": sys.executable}
    done = subprocess.run(
        ["bash", str(ROOT / "benchmarks" / "device_check.sh")], capture_output=True, text=True, env=env, timeout=120
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().splitlines() == [
        "device check skipped: no CUDA device (torch.cuda.is_available() is False)"
    ]
    assert not done.stderr.strip()


def test_device_check_times_the_stored_lossless_setting(tiny_model):
    spec = importlib.util.spec_from_file_location("device_check", ROOT / "benchmarks" / "device_check.py")
    assert spec is not None and spec.loader is not None
    device_check = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(device_check)
    model = CalmModel.from_pretrained(tiny_model)
    assert device_check.lossless_spec(model, 1) is None  # nothing stored: the full model row covers it
    model.extra = {
        STORE_KEY: measured(1.3, e=2, k=2, lookup=True).to_dict() | {LARGE_BATCH_KEY: measured(0.9).to_dict()}
    }
    assert device_check.lossless_spec(model, 1) == "spec:2:2:softmax:0.4:lookup"
    assert device_check.lossless_spec(model, 32) is None  # measured slower at batch 8: the full model
