"""benchmarks/calibration_splits.py: CALM's validation protocol on losses with a known outcome (no model)."""

from __future__ import annotations

import importlib.util
import math
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("calibration_splits", ROOT / "benchmarks" / "calibration_splits.py")
splits = importlib.util.module_from_spec(spec)
spec.loader.exec_module(splits)

THRESHOLDS = [0.99, 0.95, 0.9]


def example(i: int, rng: np.random.Generator, timed: bool) -> dict:
    """Textual losses 0, ~0.1, ~0.4 and risk losses 0, ~0.01, ~0.015 at the three thresholds."""
    return {
        "id": str(i),
        "textual": [0.0, float(rng.random() < 0.1), float(rng.random() < 0.4)],
        "risk": [0.0, 0.02 * rng.random(), 0.03 * rng.random()],
        "tokens": [10, 10, 10],
        "layer_sum": [300, 280, 250],
        "full_tokens": 10,
        "decode_s": [1.0, 0.8, 0.5] if timed else [1.0, 0.8, None],  # λ=0.9 computed in another run
        "full_decode_s": 1.0,
    }


def test_violations_lambda_layers_and_speedup_per_objective(tmp_path):
    rng = np.random.default_rng(0)
    parts = {
        "calib": {"examples": [example(i, rng, timed=False) for i in range(300)]},
        "test": {"examples": [example(i, rng, timed=True) for i in range(200)]},
    }
    data = splits.pooled({"parts": parts})
    args = splits.parse_args(["--splits", "20", "--deltas", "0.05,0.2", "--out", str(tmp_path)])
    rows = {(r["consistency"], r["delta"]): r for r in splits.run_splits(data, THRESHOLDS, args, 30)}
    assert all(r["splits"] == 20 and r["within_epsilon"] for r in rows.values())
    assert (
        rows[("textual", 0.05)]["mean_lambda"] == pytest.approx(0.99) and rows[("textual", 0.05)]["mean_layers"] == 30.0
    )
    assert (
        rows[("textual", 0.2)]["mean_lambda"] == pytest.approx(0.95) and rows[("textual", 0.2)]["mean_layers"] == 28.0
    )
    assert rows[("risk", 0.05)]["mean_lambda"] == pytest.approx(0.9) and rows[("risk", 0.05)]["mean_layers"] == 25.0
    assert rows[("textual", 0.2)]["mean_decode_speedup"] == pytest.approx(1.25)
    assert rows[("risk", 0.05)]["mean_decode_speedup"] == pytest.approx(
        2.0
    )  # only the test part was timed with the full model
    per_threshold = splits.threshold_rows(data, THRESHOLDS, 30)
    assert per_threshold[0]["mean_risk"] == 0.0 and math.isclose(per_threshold[2]["decode_speedup"], 2.0)
