"""calm eval (the threshold sweep, its report and resuming) and the calm.eval library pieces."""

from __future__ import annotations

import io
import json
from contextlib import contextmanager
from pathlib import Path

import pytest
from rich.console import Console
from rich.text import Text

from calm.engine.generation import Timings
from calm.errors import InputError
from calm.eval import shard, sweep
from calm.eval.render import (
    STANDARD_PALETTE,
    SummaryPrinter,
    layer_buckets,
    layer_colour,
    palette,
    plain_exits,
    render_exits,
    run_footer,
    token_pieces,
)
from calm.eval.report import COLUMNS, FILES
from calm.eval.rouge import rouge_f1, rouge_l_similarity
from calm.eval.summarize import DocumentSummary, summarize_documents
from calm.exits.policy import ExitPolicy
from calm.model import CalmModel
from calm.prompts.documents import Record
from helpers import DOCS, NUM_LAYERS, assert_clean_error, invoke, write_jsonl

pytestmark = pytest.mark.usefixtures("one_thread")

POINTS = ["full", "state@0.5", "state@0", "transformers"]


@pytest.fixture(scope="module")
def model(tiny_model) -> CalmModel:
    return CalmModel.from_pretrained(tiny_model)


@pytest.fixture
def data(tmp_path) -> Path:
    return write_jsonl(tmp_path / "test.jsonl", DOCS)


def run_eval_cli(tiny_model, data, out, *extra):
    return invoke(
        "eval",
        "--model",
        tiny_model,
        "--data",
        data,
        "--thresholds",
        "0.5,0",
        "--measure",
        "state",
        "--max-new-tokens",
        5,
        "--batch-size",
        2,
        "--out",
        out,
        *extra,
    )


def cache_lines(out: Path, point: str) -> list[str]:
    return (out / "cache" / f"{point}.jsonl").read_text().splitlines()


# ---- the sweep through the CLI -------------------------------------------------------------------


def test_eval_writes_report(tiny_model, data, tmp_path):
    out = tmp_path / "out"
    result = run_eval_cli(tiny_model, data, out)
    assert result.exit_code == 0, result.output
    for name in FILES:
        assert (out / name).is_file()
    for png in ("rouge_vs_layers.png", "rouge_vs_speedup.png"):
        assert (out / png).read_bytes().startswith(b"\x89PNG")

    report = json.loads((out / "eval.json").read_text())
    assert report["n"] == 4 and report["num_layers"] == NUM_LAYERS
    assert set(report["machine"]) >= {"platform", "cpu", "torch", "transformers", "command"}
    assert report["machine"]["command"].startswith("calm eval --model")
    points = {p["name"]: p for p in report["points"]}
    assert list(points) == POINTS[:3] + ["lossless", "transformers"]
    lossless = points["lossless"]  # no speculative measurement stored: lossless is the full model, not rerun
    assert lossless["kind"] == "lossless" and lossless["same_as_full"] == 1.0
    assert lossless["speedup_vs_full"] == pytest.approx(1.0) and not (out / "cache" / "lossless.jsonl").exists()
    keys = {
        "rouge1",
        "rouge2",
        "rougeL",
        "dissimilarity",
        "delta_rougeL",
        "avg_layers",
        "speedup_vs_full",
        "speedup_vs_transformers",
    }
    assert all(keys <= set(p) for p in points.values())
    full = points["full"]
    assert full["avg_layers"] == NUM_LAYERS and full["dissimilarity"] == 0 and full["delta_rougeL"] == 0
    assert full["speedup_vs_full"] == pytest.approx(1.0)
    assert points["transformers"]["speedup_vs_transformers"] == pytest.approx(1.0)
    assert points["transformers"]["same_as_full"] == 1.0  # greedy transformers generate == calm at full depth
    assert points["state@0"]["avg_layers"] < NUM_LAYERS  # λ = 0 exits at layer 1 after the first token
    assert all(p["speedup_vs_full"] > 0 and p["speedup_vs_transformers"] > 0 for p in points.values())

    # ROUGE against the references, recomputed from the cached outputs
    rows = [json.loads(line) for line in cache_lines(out, "state@0")]
    refs = {d["id"]: d["summary"] for d in DOCS}
    expected = sum(rouge_f1(r["summary"], refs[r["id"]])["rougeL"] for r in rows) / len(rows)
    assert points["state@0"]["rougeL"] == pytest.approx(expected)
    assert points["state@0"]["delta_rougeL"] == pytest.approx(expected - full["rougeL"])

    markdown = (out / "eval.md").read_text()
    assert "| " + " | ".join(COLUMNS) + " |" in markdown
    assert "| full model |" in markdown and "| state λ=0.5 |" in markdown and "| transformers generate |" in markdown
    assert "Command: `calm eval" in markdown
    assert "| full model |" in result.stdout


def test_eval_resumes_without_recomputing(tiny_model, data, tmp_path):
    out = tmp_path / "out"
    assert run_eval_cli(tiny_model, data, out, "--limit", 2).exit_code == 0
    first = {p: cache_lines(out, p) for p in POINTS}
    assert all(len(lines) == 2 for lines in first.values())

    # an interruption cut the last line of one point short: only that example is redone, at every point (so
    # that its timings pair up)
    partial = out / "cache" / "state@0.jsonl"
    partial.write_text(first["state@0"][0] + "\n" + first["state@0"][1][:25])

    result = run_eval_cli(tiny_model, data, out, "--limit", 3)
    assert result.exit_code == 0, result.output
    for point in POINTS:
        lines = cache_lines(out, point)
        if point == "state@0":
            assert lines[0] == first[point][0] and lines[1] == first[point][1][:25]
        else:
            assert lines[:2] == first[point]  # done examples kept, byte for byte
        assert sorted(json.loads(line)["id"] for line in lines[2:]) == ["b", "c"]
    assert json.loads((out / "eval.json").read_text())["n"] == 3

    before = {p: cache_lines(out, p) for p in POINTS}
    assert run_eval_cli(tiny_model, data, out, "--limit", 3).exit_code == 0  # all done: nothing recomputed
    assert {p: cache_lines(out, p) for p in POINTS} == before


def test_eval_refuses_a_cache_of_another_run(tiny_model, data, tmp_path):
    out = tmp_path / "out"
    assert run_eval_cli(tiny_model, data, out, "--limit", 1).exit_code == 0
    result = run_eval_cli(tiny_model, data, out, "--limit", 1, "--max-new-tokens", 3)
    assert_clean_error(result, "different run", "max_new_tokens", "--no-resume")
    result = run_eval_cli(tiny_model, data, out, "--limit", 1, "--max-new-tokens", 3, "--no-resume")
    assert result.exit_code == 0, result.output
    assert all(len(json.loads(line)["token_ids"]) <= 3 for line in cache_lines(out, "full"))


def test_eval_bad_input(tiny_model, data, tmp_path):
    out = tmp_path / "out"
    assert_clean_error(run_eval_cli(tiny_model, tmp_path / "missing.jsonl", out), "file not found")
    assert_clean_error(
        run_eval_cli(tiny_model, data, out, "--field-summary", "highlights"),
        "no reference summary in field 'highlights'",
        "--field-summary",
    )
    assert_clean_error(run_eval_cli(tiny_model, data, out, "--field-document", "article"), "no field 'article'")
    assert_clean_error(invoke("eval", "--model", tiny_model, "--data", data, "--thresholds", "0.9,x"), "--thresholds")
    assert_clean_error(
        invoke("eval", "--model", tiny_model, "--data", data, "--thresholds", "0.9,1.5"),
        "thresholds must lie in [0, 1]",
    )
    assert_clean_error(invoke("eval", "--model", tiny_model, "--data", data, "--measure", "classifier"), "classifier")
    duplicate = write_jsonl(tmp_path / "dup.jsonl", [DOCS[0], DOCS[0]])
    assert_clean_error(run_eval_cli(tiny_model, duplicate, out), "appears twice")
    assert not (out / "eval.json").exists()


# ---- sharding across processes (accelerate), simulated in one process ------------------------------


class FakeState:
    def __init__(self, rank: int, world: int):
        self.process_index, self.num_processes = rank, world

    @contextmanager
    def split_between_processes(self, items):
        yield items[self.process_index :: self.num_processes]

    def wait_for_everyone(self):
        pass


def test_eval_shards_and_rank0_merges(model, tmp_path, monkeypatch):
    records = [Record(d["id"], d["document"], d["summary"]) for d in DOCS]
    config = sweep.EvalConfig(
        model="tiny",
        data=str(tmp_path / "test.jsonl"),
        thresholds=(0.0,),
        measure="state",
        max_new_tokens=3,
        batch_size=2,
    )
    out = tmp_path / "out"
    for rank in (1, 0):  # rank 1 finishes first; rank 0 merges and reports
        monkeypatch.setattr(shard.Shard, "current", classmethod(lambda cls, r=rank: cls(r, 2, FakeState(r, 2))))
        report = sweep.run_eval(model, records, config, out)
        assert (report is None) == (rank == 1)
    assert sorted(p.name for p in (out / "cache").glob("*.jsonl")) == sorted(
        f"{p}.rank{r}.jsonl" for p in ("full", "state@0", "transformers") for r in (0, 1)
    )
    assert report.n == 4 and json.loads((out / "eval.json").read_text())["n"] == 4


# ---- rendering exits -----------------------------------------------------------------------------


def test_layer_buckets_and_colours():
    assert layer_buckets(30) == [(1, 5), (6, 10), (11, 15), (16, 20), (21, 25), (26, 30)]
    assert layer_buckets(4) == [(1, 1), (2, 2), (3, 3), (4, 4)]
    buckets = layer_buckets(13)
    assert buckets[0][0] == 1 and buckets[-1][1] == 13
    assert all(a[1] + 1 == b[0] for a, b in zip(buckets, buckets[1:]))
    assert layer_colour(1, 30) != layer_colour(30, 30)
    assert layer_colour(1, 30) == layer_colour(5, 30)


def test_render_exits(model):
    records = [Record("a", DOCS[0]["document"])]
    doc = next(summarize_documents(model, records, ExitPolicy(measure="state", threshold=0.0), max_new_tokens=6))[0]
    pieces = token_pieces(model.tokenizer, doc.token_ids, doc.exit_layers)
    assert "".join(p for p, _ in pieces) == doc.summary
    console = Console(file=io.StringIO(), force_terminal=True, color_system="truecolor", width=120)
    console.print(render_exits(doc, model.tokenizer))
    coloured = console.file.getvalue()
    assert "\x1b[" in coloured and "exit layer:" in coloured and "avg layers:" in coloured
    assert Text.from_ansi(coloured).plain.splitlines()[0] == doc.summary
    plain = plain_exits(doc, model.tokenizer, title="[a]")
    assert plain.splitlines()[0] == "[a]" and "avg layers: " in plain


def test_few_colours_get_a_ramp_that_reads_early_to_late(model):
    assert palette(None) == () and palette("standard") == palette("windows") == STANDARD_PALETTE
    assert len(palette("256")) == len(palette("truecolor")) == 6
    assert [layer_colour(k, 30, STANDARD_PALETTE) for k in (1, 10, 11, 20, 21, 30)] == [
        "green",
        "green",
        "yellow",
        "yellow",
        "red",
        "red",
    ]
    assert [layer_colour(k, 2, STANDARD_PALETTE) for k in (1, 2)] == ["green", "red"]
    records = [Record("a", DOCS[0]["document"])]
    doc = next(summarize_documents(model, records, ExitPolicy(measure="state", threshold=0.0), max_new_tokens=6))[0]
    console = Console(file=io.StringIO(), force_terminal=True, color_system="standard", width=200)
    SummaryPrinter(model.tokenizer, show_exits=True, console=console).print(doc)
    out = console.file.getvalue()
    assert "\x1b[30;41m" in out and "\x1b[30;43m" in out  # black on red (layer 4), on yellow (layer 2, the floor)
    assert "1–1" not in out and " 2–3  " in Text.from_ansi(out).plain and " 4  " in Text.from_ansi(out).plain
    no_colour = Console(file=io.StringIO(), force_terminal=True, color_system=None, width=200)
    SummaryPrinter(model.tokenizer, show_exits=True, console=no_colour).print(doc)
    assert "exits: " in no_colour.file.getvalue() and "[4]" in no_colour.file.getvalue()  # marks instead


def test_the_bar_shares_the_output_console_on_one_terminal(monkeypatch):
    from calm.eval import progress

    output = progress.output_console()
    monkeypatch.setattr(progress, "same_terminal", lambda a, b: True)
    assert progress.bar_console(output) is output
    monkeypatch.setattr(progress, "same_terminal", lambda a, b: False)
    assert progress.bar_console(output) is not output and progress.bar_console(output).stderr
    assert not progress.same_terminal(io.StringIO(), io.StringIO())


def test_printing_on_a_terminal_goes_through_the_console(model):
    """So that a progress bar live on the same console is redrawn below each summary, never over it."""
    records = [Record("a", DOCS[0]["document"])]
    doc = next(summarize_documents(model, records, ExitPolicy.never(), max_new_tokens=3))[0]
    console = Console(file=io.StringIO(), force_terminal=True, width=40)
    printed = []
    console.print = lambda *a, **k: printed.append(a)
    SummaryPrinter(model.tokenizer, titled=True, console=console).print(doc)
    assert len(printed) == 1 and printed[0][0].plain == f"[a] {doc.summary}"


def test_run_footer_reports_decode_rate_and_prefill_apart():
    """Two batches (2 documents, then 1): decode tokens/s counts the tokens after each summary's first
    over the batches' decode time; prefill is the batches' prefill time."""

    def doc(i, tokens, batch_size, timings):
        return DocumentSummary(
            id=str(i),
            summary="",
            token_ids=(5,) * tokens,
            exit_layers=(2,) * tokens,
            num_layers=NUM_LAYERS,
            batch_size=batch_size,
            batch_timings=timings,
        )

    first = Timings(prefill_s=0.5, decode_s=2.0, new_tokens=10, decode_tokens=8)
    second = Timings(prefill_s=0.25, decode_s=1.0, new_tokens=5, decode_tokens=4)
    docs = [doc(0, 6, 2, first), doc(1, 4, 2, first), doc(2, 5, 1, second)]
    footer = run_footer(docs, ExitPolicy(measure="state", threshold=0.9), "from --threshold", 4)
    assert footer == (
        "3 documents, avg layers 2.00 of 4, decode 4.0 tokens/s (3.00 s), prefill 0.75 s; "
        "policy: state λ=0.9, λ decays to 0.814 by token 4 (τ=4); from --threshold"
    )
    lossless = run_footer(docs, None, "speculative (lossless): drafts from layer 2", 4)
    assert lossless.endswith("prefill 0.75 s; speculative (lossless): drafts from layer 2")
    assert first.decode_tokens_per_s == pytest.approx(4.0) and first.tokens_per_s == pytest.approx(4.0)
    assert docs[0].to_dict()["timings"]["batch_decode_tokens_per_s"] == pytest.approx(4.0)


def test_rouge():
    assert rouge_f1("the cats sat", "the cat sat")["rouge1"] == pytest.approx(1.0)  # stemmed
    assert rouge_l_similarity("", "") == 1.0
    assert rouge_l_similarity("a dog ran", "the cat sat") == 0.0


def test_eval_points_carry_the_threshold_decay():
    fixed = sweep.EvalConfig(model="m", data="d.jsonl", thresholds=(0.9,), measure="classifier", decay_tau=0.0)
    decayed = sweep.EvalConfig(model="m", data="d.jsonl", thresholds=(0.9,), measure="classifier")
    point, default = fixed.points()[1], decayed.points()[1]
    assert point.policy.decay_tau == 0.0 and point.policy.threshold_at(31, 32) == 0.9
    assert default.policy.decay_tau == ExitPolicy.decay_tau
    assert point.name != default.name  # separate resume caches
    with pytest.raises(InputError):
        sweep.EvalConfig(model="m", data="d.jsonl", decay_tau=-1.0)


def test_speedups_compare_only_rows_timed_in_the_same_run():
    import math

    from calm.eval.report import timed_speedup

    base = [{"seconds": 2.0, "run": "a"}, {"seconds": 9.0, "run": "old"}, {"seconds": 4.0}]
    rows = [{"seconds": 1.0, "run": "a"}, {"seconds": 1.0, "run": "a"}, {"seconds": 1.0}]
    assert timed_speedup(base, rows) == 2.0  # only the first pair shares a run
    assert math.isnan(timed_speedup(base[1:], rows[1:]))  # other runs, or no run recorded


# ---- issue 20, item 4: a resumed eval reports what an uninterrupted one does ------------------------------


def cache_lines_run(out: Path, point: str, example: str) -> str:
    rows = [json.loads(line) for line in cache_lines(out, point)]
    return [r for r in rows if r["id"] == example][-1]["run"]


def _report_shape(out: Path) -> list[tuple]:
    """Every point's quality figures, and which timing figures exist (their values differ run to run)."""
    points = json.loads((out / "eval.json").read_text())["points"]
    timed = (
        "speedup_vs_full",
        "speedup_vs_transformers",
        "seconds",
        "prefill_seconds",
        "decode_seconds",
        "decode_speedup_vs_full",
    )
    return [
        tuple((k, v is not None and v == v) if k in timed else (k, v) for k, v in sorted(p.items())) for p in points
    ]


@pytest.mark.parametrize("batch_size,stop_after", [(4, 2), (4, 3), (4, 4), (2, 3), (2, 6)])
def test_an_eval_interrupted_anywhere_resumes_to_the_same_report(
    model, data, tmp_path, monkeypatch, batch_size, stop_after
):
    config = sweep.EvalConfig(
        model="tiny", data=str(data), thresholds=(0.5, 0.0), measure="state", max_new_tokens=4, batch_size=batch_size
    )
    records = [Record(d["id"], d["document"], d["summary"]) for d in DOCS]
    sweep.run_eval(model, records, config, tmp_path / "whole")

    real, calls = sweep._run_point, []

    def interrupted(*args, **kwargs):
        calls.append(1)
        if len(calls) == stop_after:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(sweep, "_run_point", interrupted)
    with pytest.raises(KeyboardInterrupt):
        sweep.run_eval(model, records, config, tmp_path / "resumed")
    monkeypatch.setattr(sweep, "_run_point", real)
    monkeypatch.setattr(sweep, "RUN_ID", "second-run")  # a new process
    sweep.run_eval(model, records, config, tmp_path / "resumed")
    assert _report_shape(tmp_path / "resumed") == _report_shape(tmp_path / "whole")
    runs = {d["id"]: {cache_lines_run(tmp_path / "resumed", p, d["id"]) for p in POINTS} for d in DOCS}
    assert all(len(r) == 1 for r in runs.values()), runs  # every example timed at every point in one run
    resumed = json.loads((tmp_path / "resumed" / "eval.json").read_text())["points"]
    assert all(p["speedup_vs_full"] == p["speedup_vs_full"] for p in resumed)  # no "–" in the table
    table = [line for line in (tmp_path / "resumed" / "eval.md").read_text().splitlines() if line.startswith("| ")]
    assert all("–" not in line.split("|")[-3:-1] for line in table[2:])  # both speedup columns everywhere


def test_eval_prints_a_line_per_finished_point_off_a_terminal(tiny_model, data, tmp_path):
    """Issue 20, item 14: no bar in a pipe, so a line per point and batch on stderr."""
    result = run_eval_cli(tiny_model, data, tmp_path / "out", "--limit", 2)
    assert result.exit_code == 0, result.output
    lines = [line for line in result.stderr.splitlines() if line.startswith("eval: ")]
    assert len(lines) == 4 and lines[0].startswith("eval: full model: 2 of 2 documents done (2/8, ")
    assert "eval: transformers generate: 2 of 2 documents done (8/8" in lines[-1]


def test_static_exits_count_the_first_token_at_full_depth(tiny_model, data, tmp_path):
    out = tmp_path / "out"
    result = run_eval_cli(tiny_model, data, out, "--static-layers", "1,2", "--no-lossless-point")
    assert result.exit_code == 0, result.output
    report = json.loads((out / "eval.json").read_text())
    points = {p["name"]: p for p in report["points"]}
    assert list(points) == ["full", "state@0.5", "state@0", "static@1", "static@2", "transformers"]
    for k in (1, 2):
        rows = [json.loads(line) for line in cache_lines(out, f"static@{k}")]
        assert all(r["exit_layers"][0] == NUM_LAYERS and set(r["exit_layers"][1:]) <= {k} for r in rows)
        tokens = sum(len(r["exit_layers"]) for r in rows)
        expected = sum(NUM_LAYERS + k * (len(r["exit_layers"]) - 1) for r in rows) / tokens
        assert points[f"static@{k}"]["kind"] == "static"
        assert points[f"static@{k}"]["avg_layers"] == pytest.approx(expected) and expected > k
    for p in points.values():  # time split into prefill and decode for calm's own engines
        split = p["prefill_seconds"] + p["decode_seconds"] if p["kind"] != "transformers" else None
        assert split is None or 0 < split <= p["seconds"] + 1e-6
    markdown = (out / "eval.md").read_text()
    assert "| static exit at layer 2 |" in markdown and "prefill s" in markdown and "decode speedup" in markdown


def test_plot_labels_never_overlap():
    from calm.eval.plots import _figure, place_labels

    fig, ax = _figure()
    items = [(29.9, 15.0, "λ=0.99"), (29.7, 15.02, "λ=0.98"), (29.5, 14.98, "λ=0.97"), (30.0, 15.0, "full")]
    items += [(12.2, 5.0, "layer 12"), (18.2, 9.0, "layer 18"), (30.0, 15.01, "lossless")]
    ax.plot([x for x, _, _ in items], [y for _, y, _ in items], "o")
    ax.margins(0.15)
    labels = place_labels(ax, items)
    boxes = [a.get_window_extent(fig.canvas.get_renderer()) for a in labels]
    assert len(boxes) == len(items)
    assert not any(boxes[i].overlaps(boxes[j]) for i in range(len(boxes)) for j in range(i))


def test_eval_config_static_layers_and_knob_checks():
    with pytest.raises(InputError, match="static exit layers"):
        sweep.EvalConfig(model="m", data="d.jsonl", static_layers=(0,))
    config = sweep.EvalConfig(model="m", data="d.jsonl", thresholds=(0.9,), measure="state", static_layers=(2, 2))
    static = [p for p in config.points() if p.kind == "static"]
    assert [p.name for p in static] == ["static@2"] and static[0].policy == ExitPolicy.fixed(2)


def test_risk_loss_against_several_references():
    from calm.eval.rouge import risk_loss, rouge_l_references, textual_loss

    refs = ["the cat sat on the mat", "a cat was on the mat"]
    full, early = "the cat sat on the mat", "the dog ran"
    # ROUGE-L F1 by hand: full is ref 1 (1.0) and shares cat-on-the-mat with ref 2 (4 of 6 tokens: 2/3);
    # early shares only "the" with each (P = 1/3, R = 1/6: F1 = 2/9)
    assert rouge_l_references(full, refs) == pytest.approx((1.0 + 2 / 3) / 2)
    assert rouge_l_references(early, refs) == pytest.approx(2 / 9)
    assert risk_loss(early, full, refs) == pytest.approx((1.0 + 2 / 3) / 2 - 2 / 9)
    assert risk_loss(full, early, refs) == 0.0  # better than the full model: clipped at 0
    assert risk_loss(" the cat sat on the mat ", full, refs) == 0.0  # the same text
    assert risk_loss(early, full, refs[:1]) == pytest.approx(1.0 - 2 / 9)  # one reference
    assert textual_loss(early, full) == pytest.approx(1 - rouge_l_similarity(early, full))
    with pytest.raises(ValueError, match="at least one reference"):
        rouge_l_references(full, [])


def test_eval_takes_the_knob_and_the_calibrations_schedule(model):
    from dataclasses import replace

    from calm.calibration.table import CalibrationRow, CalibrationTable

    rows = tuple(
        CalibrationRow(t, d, d, d, d, 3.0, speedup, 0.0, risk_mean_loss=r, risk_q90=r, risk_pvalue=0.0)
        for t, d, r, speedup in ((0.9, 0.01, 0.0, 1.1), (0.5, 0.3, 0.02, 1.3))
    )
    table = CalibrationTable(
        rows, 0, delta=0.1, epsilon=0.1, n=200, method="hb", measure="state", decay_tau=0.0, risk_certified_index=1
    )
    calibrated = CalmModel(model.model, model.tokenizer, calibration=table)
    base = sweep.EvalConfig(model="m", data="d.jsonl", thresholds=(0.7,), decay_tau=None, measure="state")
    assert base.for_model(calibrated).decay_tau == 0.0 and base.for_model(model).decay_tau == ExitPolicy.decay_tau
    knob = replace(base, tolerance=0.1, consistency="risk").for_model(calibrated)
    assert knob.thresholds == (0.5,) and knob.decay_tau == 0.0 and knob.measure == "state"
    assert replace(base, speed=1.0).for_model(calibrated).thresholds == (0.9,)
    with pytest.raises(InputError, match="--consistency picks"):
        replace(base, consistency="risk").for_model(calibrated)
