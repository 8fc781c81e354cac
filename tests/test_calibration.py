"""Tests for calm.calibration.table (the calibration table stored in checkpoints, built from a calm.calibration.ltt
run)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from calm.calibration import ltt
from calm.calibration import table as calibration
from calm.calibration.table import CalibrationRow, CalibrationTable, build_calibration_table, ltt_calibrate


def test_the_learn_then_test_names_stay_importable_from_calm_calibration():
    for name in ltt.__all__:
        if not name.startswith("check_"):
            assert getattr(calibration, name) is getattr(ltt, name)


# --------------------------------------------------------------------------
# CalibrationTable
# --------------------------------------------------------------------------


def _table(certified_index: int | None = 3) -> CalibrationTable:
    layers = [24.0, 20.0, 16.0, 12.0, 8.0]
    rows = tuple(
        CalibrationRow(
            threshold=0.95 - 0.1 * i,
            mean_loss=0.02 * i,
            q50=0.0,
            q90=0.05 * i,
            q95=0.06 * i,
            avg_layers=layers[i],
            speedup=24.0 / layers[i],
            pvalue=min(1.0, 1e-6 * 10 ** (2 * i)),
        )
        for i in range(5)
    )
    return CalibrationTable(rows, certified_index, delta=0.1, epsilon=0.1, n=200, method="hb")


def test_table_round_trip_dict_and_json():
    table = _table()
    d = table.to_dict()
    restored = CalibrationTable.from_dict(json.loads(json.dumps(d)))
    assert restored == table
    assert restored.certified_index == 3
    assert CalibrationTable.from_dict(d) == table
    none_table = _table(None)
    assert CalibrationTable.from_dict(json.loads(json.dumps(none_table.to_dict()))) == none_table


def test_table_from_dict_errors():
    d = _table().to_dict()
    with pytest.raises(ValueError, match="version"):
        CalibrationTable.from_dict({**d, "version": 99})
    with pytest.raises(ValueError, match="rows"):
        CalibrationTable.from_dict({k: v for k, v in d.items() if k != "rows"})
    bad_row = {k: v for k, v in d["rows"][0].items() if k != "q95"}
    with pytest.raises(ValueError, match="q95"):
        CalibrationTable.from_dict({**d, "rows": [bad_row]})
    with pytest.raises(ValueError, match="certified_index"):
        CalibrationTable.from_dict({**d, "certified_index": 7})


def test_table_validation():
    rows = _table().rows
    with pytest.raises(ValueError, match="at least one row"):
        CalibrationTable((), None)
    with pytest.raises(ValueError, match="strictly monotone"):
        CalibrationTable((rows[0], rows[2], rows[1]), None)
    with pytest.raises(ValueError, match="finite"):
        CalibrationRow(0.9, float("nan"), 0, 0, 0, 10, 1, 0.5)


def test_speed_to_threshold_endpoints_and_interpolation():
    table = _table()  # speed-ups 1.0, 1.2, 1.5, 2.0 (certified), 3.0
    assert table.paying_indexes() == (1, 2, 3)  # row 0 is measured no faster than the full model
    assert table.speed_to_threshold(1.0) == table.rows[3].threshold
    # speed-ups 1 -> 2.0 between speed 0 and 1: target = 1 + speed, the most careful row that reaches it
    assert table.speed_to_threshold(0.0) == table.rows[1].threshold
    assert table.speed_to_threshold(0.2) == table.rows[1].threshold  # target 1.2 exactly
    assert table.speed_to_threshold(0.5) == table.rows[2].threshold  # target 1.5
    assert table.speed_to_threshold(0.7) == table.rows[3].threshold  # target 1.7 -> row with 2.0
    # never returns a threshold past the certified one, and more speed never picks a slower row
    speeds = np.linspace(0.0, 1.0, 101)
    chosen = [table.thresholds.index(table.speed_to_threshold(s)) for s in speeds]
    assert all(1 <= c <= 3 for c in chosen)
    assert chosen == sorted(chosen)


def _measured(speedups: list[float], certified_index: int | None = None) -> CalibrationTable:
    rows = tuple(
        CalibrationRow(0.99 - 0.01 * i, 0.01 * i, 0.0, 0.0, 0.0, 29.9 - 0.2 * i, speedup, 1e-4)
        for i, speedup in enumerate(speedups)
    )
    return CalibrationTable(rows, len(rows) - 1 if certified_index is None else certified_index, 0.1, 0.05, 120, "hb")


def test_the_knob_never_picks_a_certified_threshold_measured_slower_than_a_more_careful_one():
    # issue 29, item 2: the shipped table measured λ 0.99 -> 1.09×, 0.98 -> 0.99×, 0.97 -> 0.90×, and speed 1
    # picked 0.97, the slowest
    shipped = _measured([1.09, 0.99, 0.90])
    assert shipped.paying_indexes() == (0,)
    assert [shipped.speed_to_threshold(s) for s in (0.0, 0.5, 1.0)] == [0.99, 0.99, 0.99]
    assert shipped.fastest_paying(0.97) == 0.99 and shipped.fastest_paying(0.98) == 0.99
    zigzag = _measured([1.1, 1.4, 1.2, 1.6, 1.5])
    assert zigzag.paying_indexes() == (0, 1, 3)
    assert zigzag.speed_to_threshold(1.0) == zigzag.rows[3].threshold
    assert zigzag.fastest_paying(zigzag.rows[2].threshold) == zigzag.rows[1].threshold


def test_where_no_certified_threshold_is_faster_than_the_full_model_the_knob_says_none():
    slow = _measured([1.0, 0.99, 0.9, 1.3], certified_index=2)  # 1.3× is not certified
    assert slow.paying_indexes() == () and slow.speed_to_threshold(1.0) is None
    assert slow.fastest_paying(0.97) is None and slow.fastest_certified().threshold == 0.99
    assert _measured([1.02, 1.04]).speed_to_threshold(1.0) is None  # within noise (MIN_SPEEDUP) of the full model
    untimed = _measured([float("nan"), float("nan")])
    assert untimed.speed_to_threshold(0.5) is None and untimed.fastest_certified() is None


def test_speed_to_threshold_errors():
    table = _table()
    for bad in (-0.01, 1.01, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="speed"):
            table.speed_to_threshold(bad)
    with pytest.raises(ValueError, match="no threshold is certified"):
        _table(None).speed_to_threshold(0.5)


def test_build_calibration_table_from_ltt():
    rng = np.random.default_rng(0)
    thresholds = [0.9, 0.8, 0.7]
    losses = (rng.random((3, 400)) < np.array([[0.0], [0.03], [0.3]])).astype(float)
    out = ltt_calibrate(thresholds, losses, 0.1, 0.1)
    table = build_calibration_table(thresholds, losses, [24, 18, 10], [1.0, 1.3, 2.4], out.ltt)
    assert table.certified_index == out.index == 1
    assert table.certified_threshold == 0.8
    assert [r.pvalue for r in table.rows] == list(out.ltt.pvalues)
    assert table.rows[1].mean_loss == pytest.approx(losses[1].mean())
    assert table.rows[2].q50 == 0.0 and table.rows[2].q95 == 1.0
    assert (table.delta, table.epsilon, table.n, table.method) == (0.1, 0.1, 400, "hb")
    assert CalibrationTable.from_dict(json.loads(json.dumps(table.to_dict()))) == table
    with pytest.raises(ValueError, match="K=3"):
        build_calibration_table(thresholds, losses, [24, 18], [1.0, 1.3, 2.4], out.ltt)


def test_a_speedup_not_timed_is_stored_as_none_and_read_back_as_nan():
    import math

    row = CalibrationRow(
        threshold=0.9, mean_loss=0.1, q50=0.0, q90=0.2, q95=0.3, avg_layers=20.0, speedup=math.nan, pvalue=0.01
    )
    assert row.to_dict()["speedup"] is None
    assert math.isnan(CalibrationRow(**row.to_dict()).speedup)
    with pytest.raises(ValueError):
        CalibrationRow(**{**row.to_dict(), "avg_layers": math.nan})


# --------------------------------------------------------------------------
# risk consistency in the table
# --------------------------------------------------------------------------

# A table as calm wrote it before risk consistency (the shipped smollm2 table of that time, rows cut to 3).
OLD_TABLE = {
    "format": "calm.calibration_table",
    "version": 1,
    "certified_index": 1,
    "delta": 0.1,
    "epsilon": 0.05,
    "n": 120,
    "method": "hb",
    "rows": [
        {"threshold": 0.99, "mean_loss": 0.0041, "q50": 0.0, "q90": 0.0, "q95": 0.0, "avg_layers": 29.93,
         "speedup": 0.998, "pvalue": 2.7e-05},
        {"threshold": 0.97, "mean_loss": 0.0198, "q50": 0.0, "q90": 0.043, "q95": 0.113, "avg_layers": 29.53,
         "speedup": None, "pvalue": 0.002},
        {"threshold": 0.95, "mean_loss": 0.0917, "q50": 0.0, "q90": 0.335, "q95": 0.429, "avg_layers": 29.07,
         "speedup": 0.992, "pvalue": 0.95},
    ],
    "measure": "classifier",
    "decay_tau": 0.0,
    "max_new_tokens": 32,
}  # fmt: skip


def test_a_table_without_risk_rows_loads_and_refuses_risk_clearly():
    from calm.errors import CalibrationError

    table = CalibrationTable.from_dict(OLD_TABLE)
    assert not table.has_risk and table.certified_index == 1 and table.risk_certified_index is None
    assert table.threshold_for_tolerance(0.1) == 0.97 and table.speed_to_threshold(1.0) is None  # 0.998×: none pays
    assert table.to_dict() == {**OLD_TABLE, "rows": table.to_dict()["rows"]}  # written back without risk fields
    for ask in (
        lambda: table.threshold_for_tolerance(0.1, "risk"),
        lambda: table.speed_to_threshold(1.0, "risk"),
        lambda: table.certified_index_for("risk"),
    ):
        with pytest.raises(CalibrationError, match="no risk-consistency rows.*run calm calibrate again"):
            ask()
    with pytest.raises(CalibrationError, match="consistency must be one of textual, risk"):
        table.certified_index_for("bleu")


def test_both_objectives_from_one_sweep_and_their_round_trip():
    rng = np.random.default_rng(3)
    textual = np.clip(np.linspace(0.0, 0.5, 5)[:, None] + rng.normal(0, 0.01, (5, 400)), 0, 1)
    risk = np.clip(np.linspace(0.0, 0.08, 5)[:, None] * rng.random((5, 400)) * 2, 0, 1)
    thresholds = [0.99, 0.95, 0.9, 0.8, 0.7]
    ltt_result = ltt.fixed_sequence_test(textual, 0.1, 0.05)
    speedups = [1.0, 1.1, 1.2, 1.5, 2.0]
    table = build_calibration_table(thresholds, textual, [30, 28, 25, 20, 15], speedups, ltt_result, risk)
    assert table.has_risk and table.certified_index == ltt_result.certified_index
    assert table.risk_certified_index == ltt.fixed_sequence_test(risk, 0.1, 0.05).certified_index
    assert table.risk_certified_index > table.certified_index  # risk is the looser objective here
    assert table.rows[2].risk_mean_loss == pytest.approx(risk[2].mean())
    assert table.speed_to_threshold(1.0, "risk") == thresholds[table.risk_certified_index]
    assert table.threshold_for_tolerance(0.1, "risk") == thresholds[table.risk_certified_index]
    assert CalibrationTable.from_dict(json.loads(json.dumps(table.to_dict()))) == table
    with pytest.raises(ValueError, match="shape"):
        build_calibration_table(thresholds, textual, [30] * 5, [1.0] * 5, ltt_result, risk[:, :10])
    with pytest.raises(ValueError, match="every calibration row"):
        CalibrationTable((table.rows[0], CalibrationTable.from_dict(OLD_TABLE).rows[1]), None)
