"""Lossless decoding where there is nothing to copy, and where there is (issue 29, item 1).

Side by side in one run, batch 1, one torch thread, speed in tokens per CPU second of this process
(time.process_time: other jobs on the shared CPU do not inflate it), prefill included:
  - open prompts with nothing to copy (questions, chat), in the chat template, up to --open-tokens new tokens
    (EOS ends them, as for a user);
  - copy-heavy summaries: XSum test documents cut to --max-doc-tokens, --xsum-tokens new tokens with EOS
    ignored, the same setup as benchmarks/bench_speculative.py's batch-1 rows.
Up to four engines per prompt, round robin after a warm-up, median of --repeats:
  - full: never-exit calm (the full model);
  - lossless: the default, the stored setting with drafting that stops per row where it does not pay
    (calm.speculative.goodput), or a candidate change of it: --twin / --no-twin (drafts from the model's 4-bit
    twin where the lookup finds nothing, calm.speculative.twin_drafts) and --max-draft;
  - stored setting: with a candidate, the stored setting as it is, beside it;
  - always drafting: the lossless engine's setting without the goodput rule (lossless before issue 29).
Every lossless run's tokens are checked against the full model's.

--store CHECKPOINT writes the candidate into the checkpoint's stored batch-1 setting where it beat the stored one
(the mean of the ratios to the full model over every prompt), with its XSum speed-up (total CPU time) and
acceptance.

With --served the three run inside calm serve's continuous batch instead (calm.engine.scheduler, SERVED_SLOTS
slots, one request at a time): the drafter the server builds (calm.speculative.cycle.lossless_drafter), the same
drafter without the goodput gate, and no drafter.

    python benchmarks/bench_goodput.py --repeats 3 --twin --max-draft 5 --store calm/assets/smollm2
    python benchmarks/bench_goodput.py --repeats 3 --served --name lossless_served
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch

from calm import CalmModel
from calm.checkpoints.checkpoint import read_config, store_extra
from calm.engine.generation import GenerationConfig, PromptBatch, generate_tokens
from calm.engine.scheduler import Request, Scheduler
from calm.eval.reporting import machine_info, machine_markdown, write_json_markdown
from calm.exits.policy import ExitPolicy
from calm.prompts.documents import read_jsonl, summary_prompt, truncate_document
from calm.speculative.cycle import LosslessDrafter, lossless_drafter
from calm.speculative.loop import generate_speculative
from calm.speculative.lossless import LOSSLESS, STORE_KEY, resolve_mode

OPEN_PROMPTS = (  # the four of issue 29, then more with nothing to copy
    "Explain in two sentences why the sky is blue.",
    "Write a story about a dragon who is afraid of fire.",
    "How do vaccines work?",
    "List five uses of a paperclip.",
    "What are the benefits of regular exercise?",
    "Give me three tips for learning a new language.",
    "Why do cats purr?",
    "Describe a sunset over the ocean.",
    "What is the difference between weather and climate?",
)
FULL, LOSSLESS_NAME, ALWAYS, OTHER = "full", "lossless (goodput)", "always drafting", "stored setting"
SERVED_SLOTS = 8  # calm serve's default --max-batch


def runners(model: CalmModel, with_always: bool = True, candidate: dict | None = None) -> tuple[dict, str, str, dict]:
    """name -> run(batch, new tokens, eos ids) -> (tokens of the row, SpeculativeStats | None); the description of
    the lossless engine, and of the stored setting where `candidate` (twin, max_draft) changes it; the lossless
    engine's setting (what --store writes)."""
    stored = resolve_mode(model, LOSSLESS, batch_size=1)
    if stored is None or stored.spec is None:
        raise SystemExit(
            f"the checkpoint runs no speculative setting at batch 1: {stored.description if stored else None}"
        )
    changes = {k: v for k, v in (candidate or {}).items() if v is not None}
    run = resolve_mode(model, LOSSLESS, batch_size=1, **changes) if changes else stored
    assert run is not None and run.spec is not None
    gated, always = run.spec, replace(run.spec, goodput=False)
    other = stored.spec if run.spec != stored.spec else None

    def engine(spec):
        def go(batch: PromptBatch, new_tokens: int, eos: tuple[int, ...]):
            config = GenerationConfig(max_new_tokens=new_tokens, eos_token_ids=eos, pad_token_id=model.pad_token_id)
            if spec is None:
                result = generate_tokens(model.network, batch, ExitPolicy.never(), config)
            else:
                result = generate_speculative(model.network, batch, run.policy, config, spec)
            t = result.timings
            return result.token_ids[0], result.speculative, t.decode_tokens / t.decode_s if t.decode_s else None

        return go

    engines = {FULL: engine(None), LOSSLESS_NAME: engine(gated), OTHER: engine(other), ALWAYS: engine(always)}
    engines = {k: v for k, v in engines.items() if (k != ALWAYS or with_always) and (k != OTHER or other)}
    spec = {k: getattr(run.spec, k) for k in ("draft_layer", "max_draft", "lookup", "adaptive", "candidates", "twin")}
    return engines, run.description, stored.description if other else "", spec


def served_runners(model: CalmModel, with_always: bool = True) -> tuple[dict, str, str]:
    """runners' three engines inside a continuous batch of SERVED_SLOTS slots, a fresh one per request."""
    served = lossless_drafter(model, SERVED_SLOTS)
    if served is None:
        raise SystemExit("the checkpoint's stored measurement gives the server no drafter")

    def engine(gated: bool | None):
        def go(batch: PromptBatch, new_tokens: int, eos: tuple[int, ...]):
            drafter = None
            if gated is not None:
                spec = replace(served.spec, goodput=gated)
                drafter = LosslessDrafter(model.network, spec, served.policy, SERVED_SLOTS, served.most_rows)
            scheduler = Scheduler(model.network, max_batch=SERVED_SLOTS, eos_token_ids=eos, drafter=drafter)
            (done,) = scheduler.run([Request(tuple(batch.ids[0][batch.mask[0]].tolist()), new_tokens)])
            return list(done.token_ids), None if drafter is None else drafter.stats(), None

        return go

    engines = {FULL: engine(None), LOSSLESS_NAME: engine(True), ALWAYS: engine(False)}
    return {k: v for k, v in engines.items() if k != ALWAYS or with_always}, f"served: {served.describe()}", ""


def measure(model: CalmModel, engines: dict, prompts: list[tuple[str, PromptBatch]], new_tokens: int, eos, repeats):
    rows = []
    for name, batch in prompts:
        for go in engines.values():  # warm-up
            go(batch, 4, eos)
        cpu: dict[str, list[float]] = {k: [] for k in engines}
        rates: dict[str, list[float | None]] = {k: [] for k in engines}
        out: dict = {}
        for _ in range(repeats):
            for key, go in engines.items():
                c0 = time.process_time()
                tokens, stats, rate = go(batch, new_tokens, eos)
                cpu[key].append(time.process_time() - c0)
                out[key] = (tokens, stats)
                rates[key].append(rate)
        full_tokens = out[FULL][0]
        row = {"prompt": name, "tokens": len(full_tokens), "prompt_tokens": int(batch.mask.sum())}
        for key in engines:
            tokens, stats = out[key]
            row[key] = {
                "cpu_s": statistics.median(cpu[key]),
                "cpu_runs": cpu[key],
                "identical": tokens == full_tokens,
                "vs_full": statistics.median(cpu[FULL]) / statistics.median(cpu[key]),
                "decode_tokens_per_s": statistics.median(r for r in rates[key] if r) if all(rates[key]) else None,
                **({} if stats is None else _stats(stats)),
            }
        rows.append(row)
        print(_line(row), file=sys.stderr, flush=True)
    return rows


def _stats(stats) -> dict:
    return {
        "acceptance": stats.acceptance_rate,
        "tokens_per_step": stats.tokens_per_step,
        "drafted": stats.drafted,
        "accepted": stats.accepted,
        "steps": stats.row_cycles,
        "drafting_off": stats.drafting_off,
    }


def _line(row: dict) -> str:
    return f"{row['prompt'][:40]:40s} " + " ".join(f"{k} {row[k]['vs_full']:.2f}x" for k in COMPARED if k in row)


COMPARED = (LOSSLESS_NAME, OTHER, ALWAYS)


def run(args) -> dict:
    torch.set_num_threads(1)
    model = CalmModel.from_pretrained(args.model)
    spec: dict = {}
    if args.served:
        engines, description, stored = served_runners(model, not args.no_always)
    else:
        candidate = {"twin": args.twin, "max_draft": args.max_draft}
        engines, description, stored, spec = runners(model, not args.no_always, candidate)
    eos = model.eos_token_ids
    open_prompts = [(p, model.encode_prompts(p, args.open_tokens)) for p in OPEN_PROMPTS[: args.open_prompts]]
    docs = read_jsonl(args.data, limit=args.docs)
    cut = [summary_prompt(truncate_document(model.tokenizer, d.document, args.max_doc_tokens)) for d in docs]
    xsum = [(f"xsum {d.id}", model.encode_prompts(p, args.xsum_tokens)) for d, p in zip(docs, cut)]
    t0 = time.perf_counter()
    load_before = os.getloadavg()
    report = {
        "benchmark": "goodput",
        "model": args.model,
        "lossless": description,
        "machine": machine_info(model.device, " ".join(["python", *sys.argv])),
        "open_tokens": args.open_tokens,
        "xsum_tokens": args.xsum_tokens,
        "max_doc_tokens": args.max_doc_tokens,
        "repeats": args.repeats,
        "served": args.served,
        "stored": stored,
        "spec": spec,
        "open": measure(model, engines, open_prompts, args.open_tokens, eos, args.repeats),
        "xsum": measure(model, engines, xsum, args.xsum_tokens, (), args.repeats),
    }
    report["wall_s"] = time.perf_counter() - t0
    report["load_average"] = [list(load_before), list(os.getloadavg())]
    for part in ("open", "xsum"):
        report[f"{part}_summary"] = _summary(report[part])
    return report


def _summary(rows: list[dict]) -> dict:
    """Per engine: the lowest ratio to the full model, the mean of the ratios, the ratio of total CPU time."""
    full = sum(r[FULL]["cpu_s"] for r in rows)
    out = {}
    for key in [k for k in COMPARED if k in rows[0]]:
        ratios = [r[key]["vs_full"] for r in rows]
        out[key] = {
            "min": min(ratios),
            "mean": statistics.mean(ratios),
            "total": full / sum(r[key]["cpu_s"] for r in rows),
            "identical": all(r[key]["identical"] for r in rows),
        }
    return out


def markdown(report: dict) -> str:
    lines = [
        "# Lossless decoding on prompts with nothing to copy, and on summaries: smollm2, CPU",
        "",
        *machine_markdown(report["machine"]),
        f"Batch 1, one torch thread, speed in CPU seconds of this process (time.process_time), prefill included, "
        f"median of {report['repeats']} round-robin runs after a warm-up. Load average before and after: "
        f"{_load(report['load_average'][0])} and {_load(report['load_average'][1])} (the 2-core CPU was shared with "
        f"other jobs). Benchmark wall time {report['wall_s'] / 60:.1f} min.",
        "",
        f"- **lossless (goodput)**: {_role(report)}{report['lossless']}. Twin drafts: the model's 4-bit twin "
        "(calm.engine.twin, Q4_1 blocks of the float32 weights on torch's int4 kernel) decodes them greedily; the "
        "goodput rule weighs them with their own acceptance and measured cost. Each row drafts only what maximises its "
        "goodput, expected tokens per step over the step's cost (calm.speculative.goodput): its own recent "
        "acceptance, and step costs measured per kind and width in the run itself (CPU time, against a plain "
        "step; until measured, a prior of 0.05 plain steps per extra verified position and E/L per layer-E "
        "draft). A row that does not draft keeps checking its lookups against the committed tokens and drafts "
        "again when they match. Layer-E drafts start off, are tried every 24 plain steps, and go on while their "
        "steps' committed tokens beat their measured cost.",
        *(
            [f"- **stored setting**: the checkpoint's stored setting before this run, {report['stored']}."]
            if OTHER in report["open"][0]
            else []
        ),
        *(
            [
                "- **always drafting**: the lossless engine's setting without the goodput rule "
                "(lossless before issue 29)."
            ]
            if ALWAYS in report["open"][0]
            else []
        ),
        "- **full**: never-exit calm, the full model.",
        *(
            [
                "",
                f"All three ran inside calm serve's continuous batch ({SERVED_SLOTS} slots, one request at a time, a "
                "fresh scheduler per request), the drafter the server builds with and without its goodput gate; "
                "identical means equal to the served full model's tokens.",
            ]
            if report.get("served")
            else []
        ),
        "",
        _headline("Open prompts (nothing to copy)", report["open_summary"], report["open_tokens"], "EOS ends them"),
        _headline(
            f"XSum test documents cut to {report['max_doc_tokens']} tokens (copy-heavy)",
            report["xsum_summary"],
            report["xsum_tokens"],
            "EOS ignored, as benchmarks/bench_speculative.py",
        ),
        "",
        "## Open prompts",
        "",
        *_table(report["open"]),
        "",
        "## XSum summaries",
        "",
        *_table(report["xsum"]),
        "",
        "vs full: the full model's CPU seconds over the engine's, per prompt. tokens/step: tokens committed per "
        "verification step (1 + kept drafts). off: steps whose drafting the goodput rule turned off.",
        "",
    ]
    return "\n".join(lines)


def _role(report: dict) -> str:
    """What the lossless engine is: a candidate beside the stored setting (stored where it wins), or the default."""
    return (
        "the setting under test (stored as the default where it wins: --store), "
        if report.get("stored")
        else ("the default, ")
    )


def _load(values) -> str:
    return ", ".join(f"{v:.2f}" for v in values)


def _headline(title: str, summary: dict, tokens: int, eos: str) -> str:
    g = summary[LOSSLESS_NAME]
    others = "".join(
        f"; {key} {summary[key]['min']:.2f}× at worst, {summary[key]['mean']:.2f}× on average"
        for key in COMPARED[1:]
        if key in summary
    )
    identical = all(s["identical"] for s in summary.values())
    return (
        f"- {title}, up to {tokens} new tokens ({eos}): lossless **{g['min']:.2f}× the full model at worst, "
        f"{g['mean']:.2f}× on average** ({g['total']:.2f}× in total CPU time){others}. Outputs identical to the "
        f"full model's: {'yes' if identical else 'NO'}."
    )


def _table(rows: list[dict]) -> list[str]:
    others = [key for key in COMPARED[1:] if key in rows[0]]
    head = "| prompt | tokens | full CPU s | lossless vs full | acceptance | tokens/step | off |"
    out = [
        head + "".join(f" {key} vs full | acceptance | tokens/step |" for key in others) + " identical |",
        "|---|---:|---:|---:|---:|---:|---:|" + "---:|---:|---:|" * len(others) + ":---:|",
    ]
    for r in rows:
        g = r[LOSSLESS_NAME]
        cells = (
            f"| {r['prompt'][:52]} | {r['tokens']} | {r[FULL]['cpu_s']:.2f} | **{g['vs_full']:.2f}×** | "
            f"{_f(g['acceptance'])} | {g['tokens_per_step']:.2f} | {g['drafting_off']} of {g['steps']} |"
        )
        for key in others:
            a = r[key]
            cells += f" {a['vs_full']:.2f}× | {_f(a['acceptance'])} | {a['tokens_per_step']:.2f} |"
        identical = all(r[key]["identical"] for key in (LOSSLESS_NAME, *others))
        out.append(cells + f" {'yes' if identical else 'NO'} |")
    return out


def _f(value: float | None) -> str:
    return "–" if value is None or value != value else f"{value:.2f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2")
    parser.add_argument("--data", default="../shared/data/xsum/test.jsonl")
    parser.add_argument("--docs", type=int, default=6)
    parser.add_argument("--open-prompts", type=int, default=8)
    parser.add_argument("--open-tokens", type=int, default=64)
    parser.add_argument("--xsum-tokens", type=int, default=48)
    parser.add_argument("--max-doc-tokens", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--no-always", action="store_true", help="Leave out the always-drafting engine (time).")
    parser.add_argument("--served", action="store_true", help="Run the engines inside calm serve's continuous batch.")
    parser.add_argument("--out", default="benchmarks/results")
    parser.add_argument("--name", default="lossless_open_prompts")
    parser.add_argument("--from-json", default=None, help="Rewrite the Markdown from a report's JSON, timing nothing.")
    parser.add_argument("--twin", action=argparse.BooleanOptionalAction, default=None, help="Candidate: twin drafts.")
    parser.add_argument("--max-draft", type=int, default=None, help="Candidate: most tokens drafted per step.")
    parser.add_argument(
        "--store", default=None, help="Checkpoint whose stored batch-1 setting takes the twin's result."
    )
    args = parser.parse_args()
    report = json.loads(Path(args.from_json).read_text()) if args.from_json else run(args)
    text = markdown(report)
    files = write_json_markdown(args.out, args.name, _json_safe(report), text)
    print(text)
    print(f"wrote {files[0]} and {files[1]}", file=sys.stderr)
    if args.store and not report["served"]:
        setting = store(report, args.store, f"benchmarks/results/{args.name}.md")
        said = "nothing stored: the stored setting was faster" if setting is None else f"stored: {setting}"
        print(said, file=sys.stderr)


def store(report: dict, checkpoint: str, report_file: str) -> dict | None:
    """The lossless engine's setting (the candidate's twin and draft length) as the checkpoint's stored batch-1
    setting, with its XSum speed-up (total CPU time) and acceptance, where it beat the stored one on the mean ratio
    to the full model over every prompt (None: it did not; nothing is written)."""
    rows = report["open"] + report["xsum"]
    if OTHER in rows[0]:
        ours, theirs = (statistics.mean(r[key]["vs_full"] for r in rows) for key in (LOSSLESS_NAME, OTHER))
        if ours <= theirs:
            return None
    xsum = report["xsum"]
    drafted = sum(r[LOSSLESS_NAME]["drafted"] for r in xsum)
    setting = dict((read_config(checkpoint).extra or {}).get(STORE_KEY) or {})
    full_rates = [r[FULL]["decode_tokens_per_s"] for r in xsum]
    setting.update(
        report["spec"],
        speedup_vs_full=report["xsum_summary"][LOSSLESS_NAME]["total"],
        acceptance_rate=sum(r[LOSSLESS_NAME]["accepted"] for r in xsum) / drafted if drafted else 0.0,
        report=report_file,
        full_decode_tokens_per_s=statistics.median(full_rates) if all(full_rates) else 0.0,  # decode wall time
        machine=report["machine"].get("cpu") or report["machine"].get("processor") or "",
    )
    store_extra(checkpoint, STORE_KEY, setting)
    return setting


def _json_safe(report: dict) -> dict:
    from calm.eval.reporting import json_safe

    return json_safe(report)


if __name__ == "__main__":
    main()
