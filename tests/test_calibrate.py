"""`calm calibrate` end to end on a tiny random model: the sweep, Learn-then-Test, the checkpoint, the knob."""

from dataclasses import replace

import pytest

from calm import CalmModel, ExitPolicy
from calm.calibration.knob import resolve_policy
from calm.calibration.table import CalibrationTable
from helpers import assert_clean_error, invoke, write_jsonl

pytestmark = pytest.mark.usefixtures("one_thread")

DOCS = [
    {"id": str(i), "document": f"the cat sat on mat number {i} and the dog ran far away", "summary": "a cat"}
    for i in range(10)
]


def calibrate(tiny_model, tmp_path, *extra):
    data = write_jsonl(tmp_path / "calib.jsonl", DOCS)
    return invoke(
        "calibrate",
        "--model",
        tiny_model,
        "--data",
        data,
        "--measure",
        "softmax",
        "--thresholds",
        "0.99,0.9,0.5,0.2,0.0",
        "--max-new-tokens",
        6,
        "--batch-size",
        4,
        "--out",
        tmp_path / "ckpt",
        *extra,
    )


def test_calibrate_certifies_and_the_knob_uses_the_table(tiny_model, tmp_path):
    result = calibrate(tiny_model, tmp_path, "--delta", "0.5", "--epsilon", "0.1")
    assert result.exit_code == 0, result.output
    assert "certified softmax threshold" in result.output
    model = CalmModel.from_pretrained(str(tmp_path / "ckpt"))
    table = model.calibration
    assert isinstance(table, CalibrationTable) and table.measure == "softmax"
    assert (table.max_new_tokens, table.min_exit_layer, table.data) == (6, None, str(tmp_path / "calib.jsonl"))
    assert table.thresholds == (0.99, 0.9, 0.5, 0.2, 0.0) and table.n == 10 and table.certified_index is not None
    rows = table.rows
    assert all(0.0 <= r.mean_loss <= 1.0 and 1.0 <= r.avg_layers <= 4.0 for r in rows)
    assert rows[0].avg_layers >= rows[-1].avg_layers  # lower thresholds exit earlier
    assert rows[-1].avg_layers < 2.5  # λ = 0: all but the prefill token exit at layer 2 (half the depth)
    speed = invoke(
        "summarize", "--model", tmp_path / "ckpt", "--text", DOCS[0]["document"], "--speed", "1", "--max-new-tokens", 4
    )
    assert speed.exit_code == 0, speed.output
    paying = table.paying_indexes()  # the certified rows measured faster than the full model and every more careful one
    if paying:
        assert f"softmax λ={table.rows[paying[-1]].threshold:g}" in speed.stderr
    else:
        assert "measured faster than the full model" in speed.stderr


def test_nothing_certified_is_said_plainly_and_the_knob_falls_back(tiny_model, tmp_path):
    result = calibrate(tiny_model, tmp_path, "--delta", "0.01", "--epsilon", "0.01")
    assert result.exit_code == 0, result.output
    assert "no softmax threshold is certified at δ=0.01" in result.output
    plain = invoke("summarize", "--model", tmp_path / "ckpt", "--text", DOCS[0]["document"], "--max-new-tokens", 4)
    assert plain.exit_code == 0 and "full model" in plain.stderr


def test_calibration_resumes_from_its_cache(tiny_model, tmp_path):
    assert calibrate(tiny_model, tmp_path, "--delta", "0.5").exit_code == 0
    cache = tmp_path / "ckpt" / "calibration-work" / "cache"
    before = {p.name: p.read_bytes() for p in cache.glob("*.jsonl")}
    assert calibrate(tiny_model, tmp_path, "--delta", "0.4", "--overwrite").exit_code == 0
    assert {p.name: p.read_bytes() for p in cache.glob("*.jsonl")} == before  # nothing recomputed


def test_bad_calibration_input(tiny_model, tmp_path):
    assert_clean_error(calibrate(tiny_model, tmp_path, "--thresholds", "0.5,0.9"), "most conservative")
    data = write_jsonl(tmp_path / "bad.jsonl", [{"text": "x"}])
    result = invoke("calibrate", "--model", tiny_model, "--data", data, "--out", tmp_path / "o")
    assert_clean_error(result, "no field 'document'")
    result = invoke("calibrate", "--model", tiny_model, "--data", data, "--out", tmp_path / "o", "--delta", "1.5")
    assert result.exit_code != 0
    assert not (tmp_path / "o").exists()


def test_speed_zero_is_the_full_model(tiny_model, tmp_path):
    assert calibrate(tiny_model, tmp_path, "--delta", "0.5", "--epsilon", "0.1").exit_code == 0
    result = invoke(
        "summarize",
        "--model",
        tmp_path / "ckpt",
        "--text",
        DOCS[0]["document"],
        "--speed",
        "0",
        "--max-new-tokens",
        4,
        "--show-exits",
    )
    assert result.exit_code == 0, result.output
    assert "full model" in result.stderr and "avg layers: 4.00" in result.output


def test_the_knob_keeps_the_threshold_schedule_it_was_calibrated_with(tiny_model, tmp_path):
    assert calibrate(tiny_model, tmp_path, "--delta", "0.5", "--epsilon", "0.1", "--decay-tau", "0").exit_code == 0
    model = CalmModel.from_pretrained(str(tmp_path / "ckpt"))
    assert model.calibration.decay_tau == 0
    timed = tuple(replace(r, speedup=1.1 + 0.1 * i) for i, r in enumerate(model.calibration.rows))  # all pay
    model.calibration = replace(model.calibration, rows=timed)
    resolved = resolve_policy(model, speed=1.0)
    assert resolved.policy.decay_tau == 0 and "τ=0" in resolved.description
    model.calibration = replace(
        model.calibration, decay_tau=None
    )  # a table from before τ was stored: the default decay
    assert resolve_policy(model, speed=1.0).policy.decay_tau == ExitPolicy.decay_tau


# ---- issue 20, item 5: the shipped calibration is not replaced by accident -----------------------------


def test_a_calibration_is_replaced_only_with_overwrite(tiny_model, tmp_path):
    assert calibrate(tiny_model, tmp_path, "--delta", "0.5").exit_code == 0
    before = (tmp_path / "ckpt" / "calm_config.json").read_bytes()
    assert_clean_error(calibrate(tiny_model, tmp_path, "--delta", "0.4"), "already holds a calibration", "--overwrite")
    assert (tmp_path / "ckpt" / "calm_config.json").read_bytes() == before
    assert calibrate(tiny_model, tmp_path, "--delta", "0.4", "--overwrite").exit_code == 0
    assert CalmModel.from_pretrained(str(tmp_path / "ckpt")).calibration.delta == 0.4


def test_the_shipped_checkpoint_refuses_a_new_calibration(tmp_path):
    from calm.checkpoints.checkpoint import default_checkpoint

    data = write_jsonl(tmp_path / "calib.jsonl", DOCS)
    result = invoke("calibrate", "--data", data, "--out", default_checkpoint("smollm2"), "--limit", 1)
    assert_clean_error(result, "already holds a calibration", "--overwrite")


def test_a_table_from_too_few_documents_is_uncertified_and_the_knob_ignores_it(tiny_model, tmp_path):
    result = calibrate(tiny_model, tmp_path, "--delta", "0.9", "--epsilon", "0.5", "--limit", "3")
    assert result.exit_code == 0, result.output
    assert "only 3 calibration documents" in result.output
    table = CalmModel.from_pretrained(str(tmp_path / "ckpt")).calibration
    assert table.n == 3 and table.certified_index is None and table.threshold_for_tolerance(0.9) is None
    plain = invoke("summarize", "--model", tmp_path / "ckpt", "--text", DOCS[0]["document"], "--max-new-tokens", 4)
    assert plain.exit_code == 0 and "full model" in plain.stderr
    loaded = CalibrationTable.from_dict({**table.to_dict(), "certified_index": 0})  # an older table
    assert loaded.certified_index is None
