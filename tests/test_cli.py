"""The `calm` command line (summarize, errors, help) on a tiny random Llama with a word-level tokenizer.

The tiny model and the CLI helpers live in helpers.py and conftest.py."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from calm import CalmModel
from calm.calibration.table import CalibrationRow, CalibrationTable
from calm.checkpoints.checkpoint import CheckpointConfig, save_checkpoint
from calm.engine.static_decode import compiled_step
from calm.errors import InputError
from helpers import DOCS, NUM_LAYERS, assert_clean_error, invoke, write_jsonl

pytestmark = pytest.mark.usefixtures("one_thread")

# ---- help and version -------------------------------------------------------------------------


def test_version_and_help():
    assert "0.1.0" in invoke("--version").output
    top = invoke("--help")
    assert top.exit_code == 0 and all(c in top.output for c in ("summarize", "eval", "bench"))
    for command in ("summarize", "eval", "bench"):
        result = invoke(command, "--help")
        assert result.exit_code == 0
        assert "Examples:" in result.output and f"calm {command}" in result.output


# ---- summarize ----------------------------------------------------------------------------------


def test_summarize_text(tiny_model):
    result = invoke("summarize", "--model", tiny_model, "--text", DOCS[0]["document"], "--max-new-tokens", 6)
    assert result.exit_code == 0, result.output
    assert len(result.stdout.splitlines()) == 1
    assert "1 document, avg layers 4.00 of 4" in result.stderr
    assert "full model" in result.stderr


def test_summarize_plain_text_file_and_jsonl_file(tiny_model, tmp_path):
    text_file = tmp_path / "article.txt"
    text_file.write_text(DOCS[1]["document"] + "\n", encoding="utf-8")
    result = invoke("summarize", "--model", tiny_model, text_file, "--max-new-tokens", 5)
    assert result.exit_code == 0, result.output
    assert len(result.stdout.splitlines()) == 1

    data = write_jsonl(tmp_path / "docs.jsonl", DOCS)
    result = invoke("summarize", "--model", tiny_model, data, "--limit", 3, "--batch-size", 2, "--max-new-tokens", 5)
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    assert [line.split(" ")[0] for line in lines] == ["[a]", "[b]", "[c]"]
    assert "3 documents" in result.stderr


def test_summarize_stdin_text_and_jsonl(tiny_model):
    result = invoke("summarize", "--model", tiny_model, "-", "--max-new-tokens", 4, input=DOCS[2]["document"])
    assert result.exit_code == 0, result.output
    assert len(result.stdout.splitlines()) == 1

    stdin = "".join(json.dumps({"id": d["id"], "text": d["document"]}) + "\n" for d in DOCS[:2])
    result = invoke(
        "summarize",
        "--model",
        tiny_model,
        "-",
        "--field-document",
        "text",
        "--json",
        "--max-new-tokens",
        4,
        input=stdin,
    )
    assert result.exit_code == 0, result.output
    assert [json.loads(line)["id"] for line in result.stdout.splitlines()] == ["a", "b"]


def test_summarize_json(tiny_model, tmp_path):
    data = write_jsonl(tmp_path / "docs.jsonl", DOCS)
    result = invoke(
        "summarize",
        "--model",
        tiny_model,
        data,
        "--json",
        "--measure",
        "state",
        "--threshold",
        "0",
        "--max-new-tokens",
        6,
        "--batch-size",
        3,
    )
    assert result.exit_code == 0, result.output
    objects = [json.loads(line) for line in result.stdout.splitlines()]
    assert [o["id"] for o in objects] == ["a", "b", "c", "d"]
    for o in objects:
        assert set(o) >= {"id", "summary", "avg_layers", "exit_layers", "timings"}
        assert all(1 <= k <= NUM_LAYERS for k in o["exit_layers"])
        assert o["avg_layers"] == pytest.approx(sum(o["exit_layers"]) / len(o["exit_layers"]))
        assert o["exit_layers"][0] == NUM_LAYERS  # the first token comes from the prefill
        assert all(k == 2 for k in o["exit_layers"][1:])  # λ = 0: everything else exits at the floor, half the depth
        assert o["timings"]["batch_size"] in (3, 1) and o["timings"]["batch_decode_s"] >= 0
    assert "state λ=0" in result.stderr


@pytest.mark.parametrize("engine", ["static", "static+compile"])
def test_summarize_engine_gives_the_dynamic_summary(tiny_model, tmp_path, engine, monkeypatch):
    no_cpp_compile = lambda backend: compiled_step("eager")
    monkeypatch.setattr("calm.engine.generation.compiled_step", no_cpp_compile)
    data = write_jsonl(tmp_path / "docs.jsonl", DOCS)
    args = (
        "summarize",
        "--model",
        tiny_model,
        data,
        "--json",
        "--measure",
        "state",
        "--threshold",
        "0.9",
        "--max-new-tokens",
        6,
        "--batch-size",
        3,
    )
    dynamic, other = invoke(*args, "--engine", "dynamic"), invoke(*args, "--engine", engine)
    assert dynamic.exit_code == 0 and other.exit_code == 0, other.output
    strip = lambda out: [{k: v for k, v in json.loads(line).items() if k != "timings"} for line in out.splitlines()]
    assert strip(dynamic.stdout) == strip(other.stdout)


def test_summarize_show_exits_plain(tiny_model):
    result = invoke(
        "summarize",
        "--model",
        tiny_model,
        "--text",
        DOCS[3]["document"],
        "--show-exits",
        "--threshold",
        "0",
        "--max-new-tokens",
        6,
    )
    assert result.exit_code == 0, result.output
    summary, exits, depth = result.stdout.splitlines()
    assert "\x1b[" not in result.stdout  # no colour codes off a terminal
    assert exits.startswith("exits: ") and "[4]" in exits and "[2]" in exits
    assert exits.replace("[4]", "").replace("[2]", "")[len("exits: ") :] == summary
    assert depth.startswith("avg layers: ") and "of 4" in depth


# ---- calibrated models: --speed, --tolerance and the default -------------------------------------


@pytest.fixture(scope="module")
def calibrated_model(tiny_model, tmp_path_factory) -> str:
    rows = [
        CalibrationRow(
            threshold=t, mean_loss=loss, q50=loss, q90=loss, q95=loss, avg_layers=layers, speedup=4 / layers, pvalue=0.0
        )
        for t, loss, layers in ((0.9, 0.01, 4.0), (0.5, 0.05, 3.0), (0.0, 0.6, 1.0))
    ]
    table = CalibrationTable(tuple(rows), certified_index=1, delta=0.1, epsilon=0.1, n=200, method="hb")
    path = tmp_path_factory.mktemp("calibrated")
    save_checkpoint(path, CheckpointConfig(backbone=tiny_model, calibration=table), heads=None)
    return str(path)


@pytest.mark.parametrize(
    "knob, expected",
    [
        (
            ("--mode", "calm"),  # λ 0.9 was measured at 1.0×: speed 0.5 (a 1.17× target) runs 0.5 (1.33×)
            "softmax λ=0.5, λ decays to 0.453 by token 3 (τ=4); default (speed 0.5 on the calibration, textual "
            "consistency)",
        ),
        (("--speed", "1"), "softmax λ=0.5, λ decays to 0.453 by token 3 (τ=4); from --speed 1 and the calibration"),
        (
            ("--tolerance", "0.2"),
            "softmax λ=0.5, λ decays to 0.453 by token 3 (τ=4); from --tolerance 0.2 and the calibration",
        ),
        (("--threshold", "0.7"), "softmax λ=0.7, λ decays to 0.635 by token 3 (τ=4); from --threshold"),
        (("--threshold", "0.7", "--decay-tau", "0"), "softmax λ=0.7, λ fixed (τ=0); from --threshold"),
    ],
)
def test_summarize_with_calibration(calibrated_model, knob, expected):
    result = invoke("summarize", "--model", calibrated_model, "--text", "the cat sat", "--max-new-tokens", 3, *knob)
    assert result.exit_code == 0, result.output
    assert "policy: " + expected in result.stderr
    assert "--speed 0.5" not in result.stderr


def test_summarize_without_a_knob_is_lossless(calibrated_model):
    """No knob: the full model's output even where a calibration would exit (it stores no speculative
    measurement, so the full model runs, and the footer says why)."""
    base = ("summarize", "--model", calibrated_model, "--text", "the cat sat", "--max-new-tokens", 3, "--json")
    default, exact = invoke(*base), invoke(*base, "--speed", 0)
    assert default.exit_code == 0 and exact.exit_code == 0, default.output + exact.output
    assert "full model (lossless; no speculative measurement is stored" in default.stderr
    assert json.loads(default.stdout)["summary"] == json.loads(exact.stdout)["summary"]


def test_tolerance_too_tight_is_an_error(calibrated_model):
    result = invoke("summarize", "--model", calibrated_model, "--text", "the cat", "--tolerance", "0.001")
    assert_clean_error(result, "no threshold is certified at tolerance")


# ---- bad input ------------------------------------------------------------------------------------


@pytest.fixture
def docs_file(tmp_path) -> Path:
    return write_jsonl(tmp_path / "docs.jsonl", DOCS)


def test_missing_file(tiny_model, tmp_path):
    assert_clean_error(invoke("summarize", "--model", tiny_model, tmp_path / "nope.jsonl"), "file not found")
    assert_clean_error(invoke("summarize", "--model", tiny_model, tmp_path / "nope.txt"), "file not found")


def test_missing_model(tmp_path):
    assert_clean_error(invoke("summarize", "--model", tmp_path / "no-model", "--text", "the cat"), "unknown model")


def test_wrong_field_name(tiny_model, docs_file):
    result = invoke("summarize", "--model", tiny_model, docs_file, "--field-document", "article")
    assert_clean_error(result, "no field 'article'", "--field-document")


def test_empty_document(tiny_model, tmp_path):
    data = write_jsonl(tmp_path / "empty.jsonl", [{"id": "x", "document": "   "}])
    assert_clean_error(invoke("summarize", "--model", tiny_model, data), "empty")
    text_file = tmp_path / "empty.txt"
    text_file.write_text("\n", encoding="utf-8")
    assert_clean_error(invoke("summarize", "--model", tiny_model, text_file), "empty")
    assert_clean_error(invoke("summarize", "--model", tiny_model, "--text", ""), "empty")
    assert_clean_error(invoke("summarize", "--model", tiny_model, "-", input=""), "empty")


def test_bad_json_line(tiny_model, tmp_path):
    data = tmp_path / "bad.jsonl"
    data.write_text('{"document": "the cat"}\n{"document": \n', encoding="utf-8")
    assert_clean_error(invoke("summarize", "--model", tiny_model, data), "bad.jsonl:2", "not valid JSON")


@pytest.mark.parametrize("value", ["-0.5", "1.5", "abc"])
def test_bad_threshold(tiny_model, value):
    assert_clean_error(
        invoke("summarize", "--model", tiny_model, "--text", "the cat", "--threshold", value), "--threshold"
    )


@pytest.mark.parametrize(
    "args, fragment",
    [
        (("--threshold", "0.9", "--speed", "0.5"), "give only one of --threshold and --speed"),
        (("--speed", "0.5"), "no calibration for this model; run calm calibrate on it, or give a threshold"),
        (("--tolerance", "0.1"), "no calibration for this model"),
        (("--measure", "classifier", "--threshold", "0.5"), "classifier"),
        (("--threshold", "0.5", "--min-exit-layer", "9"), "--min-exit-layer 9"),
    ],
)
def test_bad_policy(tiny_model, args, fragment):
    assert_clean_error(invoke("summarize", "--model", tiny_model, "--text", "the cat", *args), fragment)


def test_file_and_text_together_or_neither(tiny_model, docs_file):
    assert_clean_error(invoke("summarize", "--model", tiny_model, docs_file, "--text", "the cat"), "not both")
    assert_clean_error(invoke("summarize", "--model", tiny_model), "nothing to summarise")


def test_min_exit_layer_below_the_floor_is_one_error_line(tiny_model):
    """Issue 20, item 1: no trained heads, so the floor is half the depth (layer 2 of 4)."""
    result = invoke(
        "summarize", "--model", tiny_model, "--text", "the cat", "--threshold", "0.5", "--min-exit-layer", 1
    )
    assert_clean_error(result, "--min-exit-layer 1 is below layer 2")


# ---- issue 20: wording (item 16), the bench scratch directory (item 15) ---------------------------------


def test_errors_name_the_flags_the_user_typed(calibrated_model):
    result = invoke("summarize", "--model", calibrated_model, "--text", "the cat", "--speed", "1", "--decay-tau", "0")
    assert_clean_error(result, "not --decay-tau=0; drop --decay-tau")
    assert "decay_tau" not in result.output
    assert_clean_error(
        invoke("summarize", "--text", "x", "--threshold", "0.5", "--speed", "1"), "--threshold and --speed"
    )


def test_one_row_is_one_row(tiny_model, tmp_path):
    out = tmp_path / "one.jsonl"
    result = invoke("generate", "--model", tiny_model, "the cat", "--max-new-tokens", 2, "--output", out)
    assert result.exit_code == 0, result.output
    assert f"wrote 1 row to {out}" in result.stderr


def test_mode_help_names_each_commands_own_options():
    from calm.cli.main import cli

    for command, controller in (("eval", "--thresholds and --measure"), ("bench", "--policy MEASURE:λ")):
        mode = next(p for p in cli.commands[command].params if p.name == "mode")
        assert controller in mode.help and "--threshold " not in mode.help


def test_bench_writes_to_a_scratch_directory_by_default():
    from calm.cli.main import cli

    out = next(p for p in cli.commands["bench"].params if p.name == "out")
    assert out.default == "build/bench"


# ---- risk consistency: the same policy from the API and the command line -------------------------


@pytest.fixture(scope="module")
def risk_model(tiny_model, tmp_path_factory) -> str:
    """Textual consistency certifies only λ=0.9 at δ=0.1; risk consistency also λ=0.5. Both measured faster than
    the full model (1.1× and 1.47×)."""
    rows = [
        CalibrationRow(t, d, d, d, d, layers, 4.4 / layers, 0.0, risk_mean_loss=r, risk_q90=r, risk_pvalue=0.0)
        for t, d, r, layers in ((0.9, 0.01, 0.0, 4.0), (0.5, 0.3, 0.02, 3.0), (0.0, 0.6, 0.3, 1.0))
    ]
    table = CalibrationTable(
        tuple(rows), certified_index=0, delta=0.1, epsilon=0.1, n=200, method="hb", risk_certified_index=1
    )
    path = tmp_path_factory.mktemp("risk-calibrated")
    save_checkpoint(path, CheckpointConfig(backbone=tiny_model, calibration=table), heads=None)
    return str(path)


@pytest.mark.parametrize(
    "knob, consistency, threshold",
    [
        (("--tolerance", "0.1"), "risk", 0.5),
        (("--tolerance", "0.1"), "textual", 0.9),
        (("--speed", "1"), "risk", 0.5),
        (("--speed", "1"), "textual", 0.9),
    ],
)
def test_the_api_and_the_cli_give_one_policy_per_tolerance_and_objective(risk_model, knob, consistency, threshold):
    model = CalmModel.from_pretrained(risk_model)
    kwargs = {"tolerance" if knob[0] == "--tolerance" else "speed": float(knob[1]), "consistency": consistency}
    policy = model.policy(**kwargs)
    assert policy.threshold == threshold
    text = "the cat sat on the mat"
    api = model.generate(text, max_new_tokens=3, **kwargs)
    assert api.exit_layers == model.generate(text, max_new_tokens=3, policy=policy).exit_layers
    cli = invoke(
        "summarize", "--model", risk_model, "--text", text, "--max-new-tokens", 3, *knob, "--consistency", consistency
    )
    assert cli.exit_code == 0, cli.output
    assert f"softmax λ={threshold:g}," in cli.stderr and f"{consistency} consistency" in cli.stderr


def test_consistency_alone_and_risk_from_an_old_table_are_clear_errors(risk_model, calibrated_model):
    from calm.errors import CalibrationError

    alone = invoke("summarize", "--model", risk_model, "--text", "the cat", "--consistency", "risk")
    assert_clean_error(alone, "--consistency picks", "--speed or --tolerance")
    with_threshold = invoke(
        "summarize", "--model", risk_model, "--text", "a", "--threshold", "0.5", "--consistency", "risk"
    )
    assert_clean_error(with_threshold, "--consistency picks")
    old = invoke("summarize", "--model", calibrated_model, "--text", "the cat", "--speed", "1", "--consistency", "risk")
    assert_clean_error(old, "no risk-consistency rows", "run calm calibrate again")
    model = CalmModel.from_pretrained(calibrated_model)
    with pytest.raises(CalibrationError, match="no risk-consistency rows"):
        model.policy(tolerance=0.1, consistency="risk")
    with pytest.raises(InputError, match="consistency= picks"):
        model.generate("the cat", max_new_tokens=2, consistency="risk")
    with pytest.raises(InputError, match="explicit threshold follows none"):
        model.policy(threshold=0.5, consistency="risk")
