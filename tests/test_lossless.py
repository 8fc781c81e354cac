"""--lossless and --mode speculative: which run the switches choose (calm.speculative.lossless), the measurement
stored with a checkpoint, and the switches in calm summarize, calm eval and calm bench."""

from __future__ import annotations

import json
import shutil
from dataclasses import replace
from pathlib import Path

import pytest

from calm import CalmModel
from calm.bench import parse_run_spec, speculative_specs
from calm.checkpoints.checkpoint import read_config, store_extra
from calm.errors import InputError, PolicyError
from calm.exits.heads import ExitHeads, HeadsConfig
from calm.exits.policy import ExitPolicy
from calm.speculative.drafting import ALWAYS_DRAFT, SpeculativeConfig
from calm.speculative.lossless import LARGE_BATCH_KEY, STORE_KEY, MeasuredSetting, resolve_mode, stored_setting_text
from calm.speculative.options import SpeculativeOptions
from helpers import DOCS, assert_clean_error, invoke, write_jsonl

pytestmark = pytest.mark.usefixtures("one_thread")


def measured(speedup: float, e: int = 2, k: int = 3, lookup: bool = False) -> MeasuredSetting:
    return MeasuredSetting(
        lookup=lookup,
        draft_layer=e,
        max_draft=k,
        measure="softmax",
        threshold=0.4,
        speedup_vs_full=speedup,
        acceptance_rate=0.5,
        report="benchmarks/results/x.md",
    )


@pytest.fixture
def checkpoint(tiny_model, tmp_path):
    """The tiny model as a calm checkpoint (heads with a classifier), to store measurements in."""
    model = CalmModel.from_pretrained(tiny_model)
    model.heads = ExitHeads(HeadsConfig(num_layers=4, hidden_size=64, rank=4))
    model.save(tmp_path / "ckpt")
    return tmp_path / "ckpt"


def test_plain_calm_is_not_a_lossless_run(tiny_model):
    model = CalmModel.from_pretrained(tiny_model)
    assert resolve_mode(model) is None
    with pytest.raises(InputError, match="--draft-layer"):
        resolve_mode(model, draft_layer=2)


def test_lossless_without_a_stored_measurement_runs_the_full_model(tiny_model):
    run = resolve_mode(CalmModel.from_pretrained(tiny_model), lossless=True)
    assert run.spec is None and run.policy.never_exits and run.generate_kwargs() == {}
    assert "no speculative measurement" in run.description


def test_lossless_follows_the_stored_measurement(checkpoint):
    for speedup in (0.9, 1.03):  # slower, or within the noise
        store_extra(checkpoint, STORE_KEY, measured(speedup).to_dict())
        slower = resolve_mode(CalmModel.from_pretrained(str(checkpoint)), lossless=True)
        assert slower.spec is None and "no gain" in slower.description and f"{speedup:.2f}×" in slower.description

    store_extra(checkpoint, STORE_KEY, measured(1.2).to_dict())
    assert read_config(checkpoint).heads is not None  # the rest of the checkpoint is kept
    model = CalmModel.from_pretrained(str(checkpoint))
    assert MeasuredSetting.from_extra(model.extra) == measured(1.2)
    faster = resolve_mode(model, lossless=True)
    assert faster.spec == SpeculativeConfig(2, 3, goodput=True)
    assert faster.policy == ExitPolicy(measure="softmax", threshold=0.4, decay_tau=0.0)
    assert faster.generate_kwargs() == {"speculative": SpeculativeOptions("speculative", 2, 3, False, 1, True, False)}
    # explicit switches win over the stored setting
    run = resolve_mode(model, lossless=True, max_draft=1, measure="classifier", threshold=0.9)
    assert (
        run.spec == SpeculativeConfig(2, 1, goodput=True)
        and run.policy.measure == "classifier"
        and run.policy.threshold == 0.9
    )


def test_a_stored_lookup_setting_is_followed_and_explicit_layers_drop_it(checkpoint):
    store_extra(checkpoint, STORE_KEY, measured(1.2, e=0, k=2).to_dict())
    model = CalmModel.from_pretrained(str(checkpoint))
    context = resolve_mode(model, lossless=True)
    assert context.spec == SpeculativeConfig(0, 2, goodput=True) and "looked up in the context" in context.description
    store_extra(checkpoint, STORE_KEY, measured(1.2, lookup=True).to_dict())
    model = CalmModel.from_pretrained(str(checkpoint))
    hybrid = resolve_mode(model, lossless=True)
    assert hybrid.spec == SpeculativeConfig(2, 3, lookup=True, goodput=True)
    assert hybrid.generate_kwargs()["speculative"].lookup is True
    assert "looked up in the context where found, else drafts from layer 2" in hybrid.description
    assert resolve_mode(model, lossless=True, draft_layer=1).spec == SpeculativeConfig(1, 3, goodput=True)
    context_only = resolve_mode(model, mode="speculative", draft_layer=0)  # the stored controller is softmax
    assert context_only.policy == ALWAYS_DRAFT
    out = model.generate("a b a b a", max_new_tokens=4, policy=context_only.policy, **context_only.generate_kwargs())
    assert out.speculative.draft_layer == 0
    assert resolve_mode(model, lossless=True, draft_layer=1, lookup=True).spec == SpeculativeConfig(
        1, 3, True, goodput=True
    )
    with pytest.raises(InputError, match="--lookup"):
        resolve_mode(model, lookup=True)
    with pytest.raises(InputError, match="takes no draft controller"):
        resolve_mode(model, lossless=True, draft_layer=0, threshold=0.5)


def test_a_stored_twin_setting_is_followed_unless_told_and_described(checkpoint):
    store_extra(checkpoint, STORE_KEY, replace(measured(1.5, lookup=True), twin=True).to_dict())
    model = CalmModel.from_pretrained(str(checkpoint))
    run = resolve_mode(model, lossless=True)
    assert run.spec == SpeculativeConfig(2, 3, lookup=True, goodput=True, twin=True)
    assert "else drafts from the model's 4-bit twin, up to 3 per step" in run.description
    assert run.generate_kwargs()["speculative"].twin is True
    assert resolve_mode(model, lossless=True, twin=False).spec.twin is False
    assert resolve_mode(model, mode="speculative", draft_layer=1).spec.twin is False  # a named layer drafts itself
    assert resolve_mode(model, mode="speculative").spec.twin is True  # the stored setting
    text = stored_setting_text(model.extra)
    assert "4-bit twin" in text and "measured 1.50× the full model at batch 1 (benchmarks/results/x.md)" in text
    assert stored_setting_text(None) == "" and "no gain" in stored_setting_text({STORE_KEY: measured(0.9).to_dict()})
    out = model.generate("a b c d e", max_new_tokens=6)  # the default runs it: the full model's tokens
    assert out.token_ids == model.generate("a b c d e", max_new_tokens=6, mode="calm").token_ids


def test_lookup_without_a_stored_measurement_is_speculative_at_half_depth(tiny_model):
    run = resolve_mode(CalmModel.from_pretrained(tiny_model), lossless=True, lookup=True)
    assert run.spec == SpeculativeConfig(2, 4, lookup=True, goodput=True)


def test_large_batches_follow_the_batch_8_measurement(checkpoint):
    setting = measured(1.2).to_dict() | {LARGE_BATCH_KEY: measured(0.9, e=1, k=1).to_dict()}
    store_extra(checkpoint, STORE_KEY, setting)
    model = CalmModel.from_pretrained(str(checkpoint))
    assert MeasuredSetting.from_extra(model.extra) == measured(1.2)
    assert MeasuredSetting.from_extra(model.extra, 8) == measured(0.9, e=1, k=1)
    for rows in (1, 4):
        assert resolve_mode(model, lossless=True, batch_size=rows).spec == SpeculativeConfig(2, 3, goodput=True)
    large = resolve_mode(model, lossless=True, batch_size=5)
    assert large.spec is None and "no gain on this checkpoint at batch 8" in large.description
    store_extra(checkpoint, STORE_KEY, measured(1.2).to_dict())  # no batch-8 measurement: batch 1's
    model = CalmModel.from_pretrained(str(checkpoint))
    assert resolve_mode(model, lossless=True, batch_size=8).spec == SpeculativeConfig(2, 3, goodput=True)


def test_speculative_mode_defaults_and_errors(tiny_model):
    model = CalmModel.from_pretrained(tiny_model)
    run = resolve_mode(model, mode="speculative")
    assert run.spec == SpeculativeConfig(2, 4) and run.policy.measure == "fixed"  # no heads: always draft
    assert resolve_mode(model, mode="speculative", threshold=0.3).policy.measure == "fixed"
    with pytest.raises(PolicyError, match="draft layer 4"):
        resolve_mode(model, mode="speculative", draft_layer=4)


def test_an_unreadable_stored_measurement_is_a_clear_error(checkpoint):
    store_extra(checkpoint, STORE_KEY, {"draft_layer": 2})
    with pytest.raises(InputError, match="bench_speculative.py --store"):
        resolve_mode(CalmModel.from_pretrained(str(checkpoint)), lossless=True)


@pytest.mark.parametrize(
    "spec, expected",
    [
        ("spec:2:3", (ExitPolicy(measure="fixed", threshold=0.0), SpeculativeConfig(2, 3))),
        (
            "spec:3:1:softmax:0.4",
            (ExitPolicy(measure="softmax", threshold=0.4, decay_tau=0.0), SpeculativeConfig(3, 1)),
        ),
        ("state:0.9", (ExitPolicy(measure="state", threshold=0.9), None)),
        ("spec:0:2", (ExitPolicy(measure="fixed", threshold=0.0), SpeculativeConfig(0, 2))),
        (
            "spec:3:1:softmax:0.4:lookup",
            (ExitPolicy(measure="softmax", threshold=0.4, decay_tau=0.0), SpeculativeConfig(3, 1, lookup=True)),
        ),
        ("spec:3:1:lookup", (ExitPolicy(measure="fixed", threshold=0.0), SpeculativeConfig(3, 1, lookup=True))),
        ("spec:0:4:adaptive", (ExitPolicy(measure="fixed", threshold=0.0), SpeculativeConfig(0, 4, adaptive=True))),
        (
            "spec:3:1:lookup:adaptive",
            (ExitPolicy(measure="fixed", threshold=0.0), SpeculativeConfig(3, 1, lookup=True, adaptive=True)),
        ),
        ("spec:0:3:c2", (ExitPolicy(measure="fixed", threshold=0.0), SpeculativeConfig(0, 3, candidates=2))),
        (
            "spec:12:5:classifier:0.7:lookup:twin",
            (
                ExitPolicy(measure="classifier", threshold=0.7, decay_tau=0.0),
                SpeculativeConfig(12, 5, lookup=True, twin=True),
            ),
        ),
        (
            "spec:3:2:classifier:0.7:c3:lookup",
            (
                ExitPolicy(measure="classifier", threshold=0.7, decay_tau=0.0),
                SpeculativeConfig(3, 2, lookup=True, candidates=3),
            ),
        ),
    ],
)
def test_parse_run_spec(spec, expected):
    assert parse_run_spec(spec) == expected


@pytest.mark.parametrize(
    "spec",
    [
        "spec",
        "spec:2",
        "spec:x:2",
        "spec:2:2:fixed:3",
        "spec:2:2:entropy:1",
        "spec:2:lookup",
        "spec:lookup",
        "spec:0:2:softmax:0.5",
    ],
)
def test_parse_run_spec_rejects(spec):
    with pytest.raises(InputError, match="bad policy"):
        parse_run_spec(spec)


def test_speculative_specs_for_calm_bench(tiny_model):
    model = CalmModel.from_pretrained(tiny_model)
    assert speculative_specs(model, ("fixed:2",)) == ("fixed:2",)
    assert speculative_specs(model, (), "speculative") == ("spec:2:4",)
    assert speculative_specs(model, ("softmax:0.5",), lossless=True, draft_layer=3, max_draft=2) == (
        "spec:3:2:softmax:0.5",
    )
    assert speculative_specs(model, ("softmax:0.5",), "speculative", draft_layer=3, lookup=True) == (
        "spec:3:4:softmax:0.5:lookup",
    )
    assert speculative_specs(model, (), "speculative", draft_layer=0, max_draft=2) == ("spec:0:2",)


# ---- the command line ---------------------------------------------------------------------------


def test_summarize_lossless_and_speculative_give_the_full_models_summaries(tiny_model, tmp_path):
    data = write_jsonl(tmp_path / "docs.jsonl", DOCS)
    args = ("summarize", "--model", tiny_model, data, "--batch-size", 2, "--max-new-tokens", 8)
    full = invoke(*args)
    assert full.exit_code == 0, full.output
    speculative = invoke(*args, "--mode", "speculative", "--draft-layer", 2, "--max-draft", 3)
    assert speculative.exit_code == 0, speculative.output
    assert speculative.stdout == full.stdout
    assert "speculative (lossless): drafts from layer 2, up to 3 per step" in speculative.stderr
    assert "policy:" not in speculative.stderr.splitlines()[-1]  # the controller is in the description
    for switches in (("--draft-layer", 0, "--max-draft", 2), ("--lookup", "--draft-layer", 1)):
        with_lookup = invoke(*args, "--mode", "speculative", *switches)
        assert with_lookup.exit_code == 0 and with_lookup.stdout == full.stdout, with_lookup.output
        assert "looked up in the context" in with_lookup.stderr
    lossless = invoke(*args, "--lossless")
    assert lossless.exit_code == 0 and lossless.stdout == full.stdout
    assert "full model (lossless: no stored speculative measurement pays" in lossless.stderr


def test_summarize_lossless_bad_switches(tiny_model):
    base = ("summarize", "--model", tiny_model, "--text", DOCS[0]["document"])
    assert_clean_error(invoke(*base, "--lossless", "--speed", 0.5), "--speed")
    assert_clean_error(invoke(*base, "--mode", "speculative", "--draft-layer", 9), "draft layer 9")
    assert_clean_error(invoke(*base, "--mode", "calm", "--draft-layer", 2), "--mode speculative")
    assert_clean_error(invoke(*base, "--mode", "calm", "--lookup"), "--mode speculative")
    assert_clean_error(invoke(*base, "--threshold", 0.5, "--lookup"), "--mode speculative")  # a knob: calm


def test_eval_speculative_points_are_identical_to_the_full_model(tiny_model, tmp_path):
    data = write_jsonl(tmp_path / "docs.jsonl", DOCS[:2])
    out = tmp_path / "eval"
    result = invoke(
        "eval",
        "--model",
        tiny_model,
        "--data",
        data,
        "--thresholds",
        "0.3,0",
        "--max-new-tokens",
        6,
        "--mode",
        "speculative",
        "--draft-layer",
        3,
        "--max-draft",
        2,
        "--out",
        out,
    )
    assert result.exit_code == 0, result.output
    report = json.loads((out / "eval.json").read_text())
    points = {p["name"]: p for p in report["points"]}
    assert set(points) == {"full", "spec-E3-k2-softmax@0.3", "spec-E3-k2-softmax@0", "transformers"}
    for p in points.values():
        assert p["same_as_full"] == 1.0 and p["dissimilarity"] == 0.0


def test_eval_context_drafts_through_the_command_line(tiny_model, tmp_path):
    data = write_jsonl(tmp_path / "docs.jsonl", DOCS[:2])
    base = ("eval", "--model", tiny_model, "--data", data, "--max-new-tokens", 6, "--mode", "speculative")
    out = tmp_path / "eval"
    result = invoke(*base, "--draft-layer", 0, "--max-draft", 2, "--out", out)
    assert result.exit_code == 0, result.output
    points = {p["name"]: p for p in json.loads((out / "eval.json").read_text())["points"]}
    assert set(points) == {"full", "spec-E0-k2", "transformers"}
    assert points["spec-E0-k2"]["same_as_full"] == 1.0
    hybrid = invoke(*base, "--draft-layer", 2, "--lookup", "--thresholds", "0.3", "--out", tmp_path / "hybrid")
    assert hybrid.exit_code == 0, hybrid.output
    report = json.loads((tmp_path / "hybrid" / "eval.json").read_text())
    assert {p["name"] for p in report["points"]} == {"full", "spec-E2-k4-softmax@0.3-lookup", "transformers"}


def test_bench_speculative_rows(tiny_model, tmp_path):
    out = tmp_path / "bench"
    result = invoke(
        "bench",
        "--model",
        tiny_model,
        "--batch-sizes",
        "1,2",
        "--new-tokens",
        5,
        "--repeats",
        1,
        "--no-transformers",
        "--policy",
        "spec:2:3",
        "--policy",
        "spec:3:2:softmax:0.2",
        "--out",
        out,
    )
    assert result.exit_code == 0, result.output
    rows = json.loads((out / "bench.json").read_text())["results"]
    assert [r["name"] for r in rows] == ["full", "spec:2:3", "spec:3:2:softmax:0.2"] * 2
    for r in rows:
        assert (r["mean_accepted_length"] is None) == (r["name"] == "full")
        assert r["avg_layers"] == 4
    assert "acceptance | accepted per step |" in (out / "bench.md").read_text()
    result = invoke(
        "bench",
        "--model",
        tiny_model,
        "--batch-sizes",
        "1",
        "--new-tokens",
        3,
        "--repeats",
        1,
        "--no-transformers",
        "--mode",
        "speculative",
        "--out",
        out,
    )
    assert result.exit_code == 0, result.output
    assert [r["name"] for r in json.loads((out / "bench.json").read_text())["results"]] == ["full", "spec:2:4"]
    assert_clean_error(
        invoke("bench", "--model", tiny_model, "--policy", "spec:9:2", "--out", tmp_path / "x"), "draft layer 9"
    )
    shutil.rmtree(out)


def test_eval_context_drafts_are_one_point_without_a_controller():
    from calm.eval.sweep import EvalConfig

    config = EvalConfig(
        model="m", data="d", thresholds=(0.3, 0.5), measure="softmax", mode="speculative", draft_layer=0, max_draft=2
    )
    names = [p.name for p in config.points()]
    assert names == ["full", "spec-E0-k2", "transformers"]
    hybrid = EvalConfig(model="m", data="d", thresholds=(0.3,), measure="softmax", mode="speculative", draft_layer=2)
    assert [p.name for p in EvalConfig(**{**hybrid.__dict__, "max_draft": 3, "lookup": True}).points()][1] == (
        "spec-E2-k3-softmax@0.3-lookup"
    )


@pytest.mark.slow
def test_the_shipped_checkpoint_runs_its_measured_setting_for_small_runs_only():
    """calm/assets/smollm2 stores benchmarks/results/speculative_smollm2.md's best settings, with the 4-bit twin's
    drafts from lossless_open_prompts.md: speculative at 1-4 rows (measured faster at batch 1), the full model from 5
    rows (nothing was faster at batch 8)."""
    model = CalmModel.from_pretrained("smollm2")
    small = resolve_mode(model, lossless=True, batch_size=1)
    assert small.spec is not None and small.spec.lookup and small.spec.twin
    stored = MeasuredSetting.from_extra(model.extra)
    assert stored.beats_full_depth and stored.report == "benchmarks/results/lossless_open_prompts.md"
    large = resolve_mode(model, lossless=True, batch_size=8)
    assert large.spec is None and "at batch 8" in large.description


# ---- mode="lossless" through the API (issue 18) ------------------------------------------------------


def _stored(model: CalmModel, batch1: MeasuredSetting, batch8: MeasuredSetting | None = None) -> CalmModel:
    setting = batch1.to_dict() | ({LARGE_BATCH_KEY: batch8.to_dict()} if batch8 else {})
    model.extra = {STORE_KEY: setting}
    return model


@pytest.mark.parametrize("kind", ["llama", "gpt2", "t5", "mistral-window"])
@pytest.mark.parametrize("batch", [1, 4])
def test_lossless_mode_is_the_full_models_output_on_every_family(kind, batch):
    from test_adapters import build, prompts, row

    p = prompts() if batch == 4 else row(prompts(seed=2), 0)
    model = _stored(CalmModel.from_model(build(kind)), measured(1.2, e=2, k=2, lookup=True), measured(1.2, e=0, k=2))
    full = model.generate(p.ids, 12, ExitPolicy.never(), attention_mask=p.mask.long())
    out = model.generate(p.ids, 12, attention_mask=p.mask.long(), mode="lossless")
    assert out.token_ids == full.token_ids
    assert out.decoding.startswith("speculative (lossless)" if batch == 1 else "lossless: speculative")
    if batch == 4 and kind == "mistral-window":  # a sliding window runs full-model steps in a continuous batch
        assert (
            out.speculative is None
            and model.generate(p.ids, 12, attention_mask=p.mask.long()).token_ids == full.token_ids
        )
        return
    assert out.speculative is not None
    assert full.decoding.startswith("full model (exact)")
    default = model.generate(p.ids, 12, attention_mask=p.mask.long())  # no knob: lossless
    assert default.token_ids == full.token_ids
    run = out.decoding.split("; this run:")[0]  # this run's counts follow the measured step costs
    assert default.decoding.split("; this run:")[0] == run and "tokens per step" in out.decoding


def test_lossless_mode_follows_the_measurement_for_the_row_count(checkpoint):
    model = _stored(CalmModel.from_pretrained(str(checkpoint)), measured(1.2, e=2, k=3), measured(0.95, e=1, k=1))
    one = model.generate(["a b c a b"], 6, mode="lossless")
    assert one.speculative is not None and (one.speculative.draft_layer, one.speculative.max_draft) == (2, 3)
    assert "measured 1.20× full depth at batch 1" in one.decoding
    five = model.generate(["a b c a b"] * 5, 6, mode="lossless")  # a continuous batch: drafts while <= 4 rows live
    assert five.speculative is None and "while at most 4 rows are live" in five.decoding
    four = model.generate(["a b c a b"] * 4, 6, mode="lossless")
    assert four.speculative is not None and four.token_ids == five.token_ids[:4]
    never = model.generate(["a b c a b"] * 5, 6, ExitPolicy.never())
    assert five.token_ids == never.token_ids
    assert five.to_dict()["decoding"] == five.decoding


def test_speculative_mode_takes_the_stored_setting_unless_told(checkpoint):
    model = _stored(CalmModel.from_pretrained(str(checkpoint)), measured(0.9, e=1, k=2))
    stored = model.generate(["a b c a b"], 6, mode="speculative")  # always speculative, even where slower
    assert (stored.speculative.draft_layer, stored.speculative.max_draft) == (1, 2)
    told = model.generate(["a b c a b"], 6, mode="speculative", draft_layer=3, max_draft=1)
    assert (told.speculative.draft_layer, told.speculative.max_draft) == (3, 1)
    assert stored.token_ids == told.token_ids


def test_an_exit_knob_or_engine_opts_out_of_the_lossless_default(checkpoint):
    model = _stored(CalmModel.from_pretrained(str(checkpoint)), measured(1.2))
    assert model.generate(["a b"], 3, ExitPolicy.fixed(1)).decoding.startswith("early exit (approximate)")
    assert model.generate(["a b"], 3, engine="static").decoding == "full model (exact)"
    with pytest.raises(InputError, match="never exit early"):
        model.generate(["a b"], 3, mode="lossless", speed=0.5)
    with pytest.raises(InputError, match="unknown mode"):
        model.generate(["a b"], 3, mode="fast")


SMOKE = Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "xsum" / "smoke.jsonl"


@pytest.mark.slow
@pytest.mark.skipif(not SMOKE.is_file(), reason="../shared/data is not beside the repo")
def test_default_summarize_is_the_full_models_output_on_the_real_model():
    """No knob on the shipped model: the lossless run (speculative at one row), token for token what the
    full model (--speed 0) writes."""
    base = ("summarize", SMOKE, "--limit", 2, "--batch-size", 1, "--max-new-tokens", 32, "--json")
    default, exact = invoke(*base), invoke(*base, "--speed", 0)
    assert default.exit_code == 0 and exact.exit_code == 0, default.output + exact.output
    assert "speculative (lossless)" in default.stderr and "full model" in exact.stderr
    ours, full = ([json.loads(line) for line in r.stdout.splitlines()] for r in (default, exact))
    assert [(d["summary"], len(d["exit_layers"])) for d in ours] == [
        (d["summary"], len(d["exit_layers"])) for d in full
    ]
    model = CalmModel.from_pretrained("smollm2")
    docs = [json.loads(line)["document"] for line in SMOKE.read_text().splitlines()[:2]]
    prompts = ["Summarize the following article in one sentence.\n\n" + d[:1500] for d in docs]
    for prompt in prompts:
        lossless = model.generate([prompt], 32)
        assert lossless.speculative is not None, lossless.decoding
        assert lossless.token_ids == model.generate([prompt], 32, speed=0).token_ids


def test_engine_alone_is_the_exact_full_model_and_contradicting_switches_are_refused(checkpoint, tiny_model):
    base = ("summarize", "--model", tiny_model, "--text", DOCS[0]["document"], "--max-new-tokens", 4)
    engine = invoke(*base, "--engine", "static")
    assert engine.exit_code == 0, engine.output
    assert "full model (exact) on the static engine" in engine.stderr
    assert_clean_error(invoke(*base, "--lossless", "--mode", "calm"), "--lossless", "--mode calm")
    store_extra(checkpoint, STORE_KEY, measured(0.9).to_dict())  # slower: --lossless alone runs the full model
    ckpt = ("summarize", "--model", str(checkpoint), "--text", DOCS[0]["document"], "--max-new-tokens", 4)
    assert "no gain" in invoke(*ckpt, "--lossless").stderr
    assert "speculative (lossless)" in invoke(*ckpt, "--lossless", "--mode", "speculative").stderr


def test_a_stored_adaptive_setting_survives_being_named_again(checkpoint):
    store_extra(checkpoint, STORE_KEY, (measured(1.2, e=0, k=3).to_dict() | {"adaptive": True, "candidates": 2}))
    model = CalmModel.from_pretrained(str(checkpoint))
    assert resolve_mode(model, lossless=True).spec == SpeculativeConfig(0, 3, adaptive=True, candidates=2, goodput=True)
    assert "2 candidates verified as a tree" in resolve_mode(model, lossless=True).description
    again = resolve_mode(model, "speculative", draft_layer=0, max_draft=3)  # what generate_kwargs() passes on
    assert again.spec.adaptive and again.spec.candidates == 2
    other = resolve_mode(model, "speculative", draft_layer=0, max_draft=2).spec
    assert not other.adaptive and other.candidates == 1
    batch8 = {STORE_KEY: measured(1.2).to_dict()}  # no batch-8 measurement: 8 rows follow batch 1's, said so
    model.extra = batch8
    assert "at batch 1" in resolve_mode(model, lossless=True, batch_size=8).description
