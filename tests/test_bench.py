"""calm bench and calm.bench: policy specs, timing rows, the transformers baseline, the written report."""

from __future__ import annotations

import importlib
import json
from pathlib import Path

import pytest

from calm.bench import BenchConfig, BenchRow, _round_robin, _Run, parse_policy_spec, transformers_generate
from calm.errors import InputError
from calm.exits.policy import ExitPolicy
from calm.model import CalmModel
from helpers import DOCS, NUM_LAYERS, assert_clean_error, invoke, write_jsonl

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize(
    "spec, policy",
    [
        ("full", ExitPolicy.never()),
        ("fixed:15", ExitPolicy.fixed(15)),
        ("softmax:0.9", ExitPolicy(measure="softmax", threshold=0.9)),
        (" state:0.95 ", ExitPolicy(measure="state", threshold=0.95)),
        ("classifier:0.8", ExitPolicy(measure="classifier", threshold=0.8)),
    ],
)
def test_parse_policy_spec(spec, policy):
    assert parse_policy_spec(spec) == policy


@pytest.mark.parametrize("spec", ["", "fast", "fixed", "fixed:x", "softmax", "softmax:-1", "entropy:0.5", "full:3"])
def test_parse_policy_spec_rejects(spec):
    with pytest.raises(InputError, match="bad policy|threshold"):
        parse_policy_spec(spec)


def test_bench_row_arithmetic():
    row = BenchRow("full", batch_size=4, new_tokens=10, times_s=(2.0, 1.0, 4.0), avg_layers=30.0)
    assert row.median_s == 2.0
    assert row.tokens_per_s == pytest.approx(20.0)
    assert row.ms_per_token == pytest.approx(200.0)
    with pytest.raises(InputError):
        BenchConfig(model="m", batch_sizes=(0,))
    with pytest.raises(InputError, match="unknown engine"):
        BenchConfig(model="m", engine="warp")


def test_transformers_generate_fixed_length(tiny_model):
    model = CalmModel.from_pretrained(tiny_model)
    batch = model.encode_prompts(["the cat sat", "a dog ran in the park"], 7)
    rows = transformers_generate(model, batch, 7, fixed_length=True)
    assert [len(r) for r in rows] == [7, 7]
    assert all(model.eos_token_ids[0] not in r for r in rows)
    greedy = transformers_generate(model, batch, 7)
    assert greedy == list(model.generate(["the cat sat", "a dog ran in the park"], max_new_tokens=7).token_ids)


def test_bench_cli_writes_report(tiny_model, tmp_path):
    out = tmp_path / "results"
    result = invoke(
        "bench",
        "--model",
        tiny_model,
        "--batch-sizes",
        "1,2",
        "--new-tokens",
        4,
        "--repeats",
        2,
        "--policy",
        "fixed:2",
        "--policy",
        "state:0",
        "--out",
        out,
    )
    assert result.exit_code == 0, result.output
    report = json.loads((out / "bench.json").read_text())
    assert report["num_layers"] == NUM_LAYERS
    assert set(report["machine"]) >= {"platform", "cpu", "device", "torch", "transformers", "command"}
    assert report["machine"]["command"].startswith("calm bench --model")
    rows = report["results"]
    assert [(r["batch_size"], r["name"]) for r in rows] == [
        (b, n) for b in (1, 2) for n in ("full", "fixed:2", "state:0", "transformers")
    ]
    for r in rows:
        assert len(r["times_s"]) == 2 and r["median_s"] > 0
        assert r["tokens_per_s"] == pytest.approx(r["batch_size"] * 4 / r["median_s"])
        assert r["ms_per_token"] == pytest.approx(1000 * r["median_s"] / 4)
        assert r["speedup_vs_full"] > 0 and r["speedup_vs_transformers"] > 0
        if r["name"] == "transformers":
            assert r["decode_ms_per_token"] is None and r["decode_times_s"] == []
        else:
            assert len(r["decode_times_s"]) == 2 and 0 < r["decode_ms_per_token"] < r["ms_per_token"] * 4 / 3
    layers = {r["name"]: r["avg_layers"] for r in rows}
    assert layers["full"] == NUM_LAYERS and layers["transformers"] == NUM_LAYERS
    assert layers["fixed:2"] == pytest.approx((NUM_LAYERS + 3 * 2) / 4)  # first token from the prefill
    assert layers["state:0"] == pytest.approx((NUM_LAYERS + 3 * 2) / 4)  # no exit below half the depth (no heads)
    markdown = (out / "bench.md").read_text()
    assert "| batch | config | tokens/s | ms/token | decode ms/token | prefill share | avg layers |" in markdown
    assert "| 2 | fixed:2 |" in markdown and "Command: `calm bench" in markdown
    assert "| 1 | full |" in result.stdout


def test_bench_cli_data_and_no_transformers(tiny_model, tmp_path):
    data = write_jsonl(tmp_path / "docs.jsonl", DOCS)
    out = tmp_path / "results"
    result = invoke(
        "bench",
        "--model",
        tiny_model,
        "--data",
        data,
        "--batch-sizes",
        "3",
        "--new-tokens",
        3,
        "--repeats",
        1,
        "--no-transformers",
        "--out",
        out,
    )
    assert result.exit_code == 0, result.output
    report = json.loads((out / "bench.json").read_text())
    assert [r["name"] for r in report["results"]] == ["full"]
    assert report["results"][0]["speedup_vs_transformers"] is None
    assert report["config"]["data"] == str(data)


def test_bench_bad_input(tiny_model, tmp_path):
    out = tmp_path / "results"
    assert_clean_error(invoke("bench", "--model", tiny_model, "--policy", "fast", "--out", out), "bad policy 'fast'")
    assert_clean_error(
        invoke("bench", "--model", tiny_model, "--policy", "fixed:9", "--out", out), "exit layer 9 is out of range"
    )
    assert_clean_error(invoke("bench", "--model", tiny_model, "--policy", "classifier:0.8", "--out", out), "classifier")
    assert_clean_error(invoke("bench", "--model", tiny_model, "--batch-sizes", "1,x", "--out", out), "--batch-sizes")
    assert_clean_error(
        invoke("bench", "--model", tiny_model, "--data", tmp_path / "none.jsonl", "--out", out), "file not found"
    )
    assert not out.exists()


def test_timed_runs_go_round_robin_after_one_warm_up_each():
    calls = []

    def runner(name):
        return lambda: calls.append(name) or _Run(0.0)

    runs = _round_robin([runner("a"), runner("b")], repeats=2)
    assert calls == ["a", "b", "a", "b", "a", "b"]
    assert [len(r) for r in runs] == [2, 2]


def test_bench_cli_runs_the_static_engine(tiny_model, tmp_path):
    out = tmp_path / "results"
    result = invoke(
        "bench",
        "--model",
        tiny_model,
        "--batch-sizes",
        "2",
        "--new-tokens",
        4,
        "--repeats",
        1,
        "--policy",
        "fixed:2",
        "--no-transformers",
        "--engine",
        "static",
        "--out",
        out,
    )
    assert result.exit_code == 0, result.output
    report = json.loads((out / "bench.json").read_text())
    assert report["config"]["engine"] == "static"
    assert [r["avg_layers"] for r in report["results"]] == [4.0, pytest.approx((4 + 3 * 2) / 4)]
    assert "engine static" in (out / "bench.md").read_text()


def test_bench_runs_the_knobs_policy_on_the_calibrated_schedule(tiny_model):
    from calm.bench import knob_specs
    from calm.calibration.table import CalibrationRow, CalibrationTable

    model = CalmModel.from_pretrained(tiny_model)
    assert knob_specs(model, ("softmax:0.5",)) == (("softmax:0.5",), ExitPolicy.decay_tau)  # no calibration: τ=4
    rows = tuple(
        CalibrationRow(t, d, d, d, d, 3.0, speedup, 0.0, risk_mean_loss=r, risk_q90=r, risk_pvalue=0.0)
        for t, d, r, speedup in ((0.9, 0.01, 0.0, 1.1), (0.5, 0.3, 0.02, 1.3))
    )
    model.calibration = CalibrationTable(
        rows, 0, delta=0.1, epsilon=0.1, n=200, method="hb", measure="softmax", decay_tau=0.0, risk_certified_index=1
    )
    assert knob_specs(model, ("softmax:0.5",)) == (("softmax:0.5",), 0.0)  # the calibration's τ by default
    assert knob_specs(model, ("softmax:0.5",), decay_tau=4.0) == (("softmax:0.5",), 4.0)
    assert knob_specs(model, (), tolerance=0.1, consistency="risk") == (("softmax:0.5",), 0.0)
    assert knob_specs(model, (), tolerance=0.1) == (("softmax:0.9",), 0.0)
    assert knob_specs(model, (), speed=1.0, consistency="risk")[0] == ("softmax:0.5",)
    for bad in ({"consistency": "risk"}, {"tolerance": 0.1, "decay_tau": 4.0}):
        with pytest.raises(InputError):
            knob_specs(model, (), **bad)


BENCHMARKS = Path(__file__).parent.parent / "benchmarks"


@pytest.mark.parametrize("script", sorted(p.stem for p in BENCHMARKS.glob("*.py")))
def test_every_benchmark_script_imports(script, monkeypatch):
    """The committed reports' scripts keep up with the library (a moved function breaks them silently otherwise)."""
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    importlib.import_module(script)
