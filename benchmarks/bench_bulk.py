"""A bulk summarisation job (issue 26): today's static batches against ragged prefill and continuous batching.

Workloads: --docs XSum test documents at their natural lengths, and --docs-1024 documents cut to 1,024
tokens; the summary prompt of `calm summarize`, greedy, at most --new-tokens each, ending at EOS as a real
job does. Variants, each over the whole job, one after another in one process after a warm-up:
  - static8: the batches of 8 the engine ran before continuous batching (left-padded prompts, every row
    computed to the longest; the lossless rule of that time: speculative below 5 rows, else the full model);
  - batch1: each document alone, lossless (speculative, the stored batch-1 setting);
  - ragged8: each chunk of 8 prefilled row by row at its own length, no refill (ragged prefill alone);
  - continuous8 / continuous16: ragged prefill and continuous batching with 8 / 16 slots (lossless: drafting
    while few rows are live);
  - default: what `CalmModel.generate` (and `calm summarize`) runs on the whole job.
Reported per variant: CPU seconds of this process and wall seconds over the job, prefill and decode seconds,
prompt tokens computed against the real ones, and whether every output equals the per-document full model
(per-document never-exit runs of the first --check-docs documents, and batch 1 lossless for all).

Usage: python benchmarks/bench_bulk.py [--docs 100] [--docs-1024 64] [--new-tokens 48] [--out benchmarks/results]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

import calm
from calm import CalmModel
from calm.continuous import DEFAULT_MAX_BATCH
from calm.engine.bulk import generate_continuous
from calm.engine.generation import GenerationConfig, PromptBatch, generate_tokens
from calm.eval.reporting import machine_info, machine_markdown, write_json_markdown
from calm.eval.summarize import document_prompts
from calm.exits.policy import ExitPolicy
from calm.prompts.documents import read_jsonl
from calm.speculative.cycle import lossless_drafter
from calm.speculative.loop import generate_speculative
from calm.speculative.lossless import LOSSLESS, resolve_mode

DATA = Path(__file__).resolve().parent.parent.parent / "shared" / "data" / "xsum" / "test.jsonl"
Run = Callable[[CalmModel, list[list[int]], int], dict]  # -> {"tokens": [...], "prefill_s", "decode_s", "computed"}


def padded(rows: list[list[int]], pad: int) -> PromptBatch:
    width = max(map(len, rows))
    ids = torch.full((len(rows), width), pad, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.bool)
    for i, r in enumerate(rows):
        ids[i, width - len(r) :], mask[i, width - len(r) :] = torch.tensor(r), True
    return PromptBatch(ids, mask)


def config(model: CalmModel, new_tokens: int) -> GenerationConfig:
    return GenerationConfig(new_tokens, model.eos_token_ids, model.pad_token_id)


def static_batches(size: int) -> Run:
    """The engine before continuous batching: padded batches of `size`, lossless by the stored row-count rule."""

    def run(model: CalmModel, prompts: list[list[int]], new_tokens: int) -> dict:
        out = {"tokens": [], "prefill_s": 0.0, "decode_s": 0.0, "computed": 0}
        for start in range(0, len(prompts), size):
            chunk = prompts[start : start + size]
            batch = padded(chunk, model.pad_token_id)
            mode = resolve_mode(model, LOSSLESS, batch_size=len(chunk))
            if mode is None or mode.spec is None:
                result = generate_tokens(model.network, batch, ExitPolicy.never(), config(model, new_tokens))
            else:
                result = generate_speculative(model.network, batch, mode.policy, config(model, new_tokens), mode.spec)
            _add(out, result.token_ids, result.timings, batch.ids.numel())
        return out

    return run


def continuous(slots: int, chunked: bool = False) -> Run:
    """Ragged prefill and continuous batching of `slots` rows; chunked: chunks of `slots`, no refill."""

    def run(model: CalmModel, prompts: list[list[int]], new_tokens: int) -> dict:
        out = {"tokens": [], "prefill_s": 0.0, "decode_s": 0.0, "computed": 0}
        chunks = [prompts[s : s + slots] for s in range(0, len(prompts), slots)] if chunked else [prompts]
        for chunk in chunks:
            drafter = lossless_drafter(model, min(slots, len(chunk)))
            never = ExitPolicy.never()
            result = generate_continuous(
                model.network, chunk, never, config(model, new_tokens), min(slots, len(chunk)), drafter
            )
            _add(out, result.token_ids, result.timings, sum(map(len, chunk)))
        return out

    return run


def default(model: CalmModel, prompts: list[list[int]], new_tokens: int) -> dict:
    result = model.generate(prompts, max_new_tokens=new_tokens)
    out = {"tokens": [], "prefill_s": 0.0, "decode_s": 0.0, "computed": sum(map(len, prompts))}
    _add(out, result.token_ids, result.timings, 0)
    out["decoding"] = result.decoding
    return out


def batch1_full(model: CalmModel, prompts: list[list[int]], new_tokens: int) -> dict:
    out = {"tokens": [], "prefill_s": 0.0, "decode_s": 0.0, "computed": 0}
    for p in prompts:
        result = generate_tokens(model.network, padded([p], 0), ExitPolicy.never(), config(model, new_tokens))
        _add(out, result.token_ids, result.timings, len(p))
    return out


def _add(out: dict, tokens, timings, computed: int) -> None:
    out["tokens"] += [list(t) for t in tokens]
    out["prefill_s"] += timings.prefill_s
    out["decode_s"] += timings.decode_s
    out["computed"] += computed


VARIANTS: dict[str, Run] = {
    "static8": static_batches(8),
    "batch1": static_batches(1),
    "ragged8": continuous(8, chunked=True),
    "continuous8": continuous(8),
    "continuous16": continuous(16),
    "default": default,  # CalmModel.generate on the whole job: continuous{DEFAULT_MAX_BATCH} with its description
}


def timed(run: Run, model: CalmModel, prompts: list[list[int]], new_tokens: int) -> dict:
    cpu, wall = time.process_time(), time.perf_counter()
    out = run(model, prompts, new_tokens)
    out["cpu_s"], out["wall_s"] = time.process_time() - cpu, time.perf_counter() - wall
    return out


def workload(model: CalmModel, name: str, docs: int, max_doc_tokens: int | None, args, save) -> dict:
    records = read_jsonl(args.data, limit=docs)
    prompts = document_prompts(model, records, args.new_tokens, max_doc_tokens=max_doc_tokens)
    ids = [model.encode_prompts([p.text], args.new_tokens).ids[0].tolist() for p in prompts]
    results = {}
    for variant in args.variants:
        print(f"[{name}] {variant} ...", file=sys.stderr, flush=True)
        load = os.getloadavg()[0]
        results[variant] = timed(VARIANTS[variant], model, ids, args.new_tokens)
        r = results[variant]
        r["load_before_after"] = [load, os.getloadavg()[0]]
        print(f"  cpu {r['cpu_s']:.1f} s, wall {r['wall_s']:.1f} s", file=sys.stderr, flush=True)
        save(summary(name, ids, results, None, args))  # what is measured so far survives an interruption
    check = timed(batch1_full, model, ids[: args.check_docs], args.new_tokens)
    return summary(name, ids, results, check, args)


def summary(name: str, ids: list[list[int]], results: dict, check: dict | None, args) -> dict:
    check = check or {"tokens": []}
    reference = results.get("batch1", check)["tokens"]
    real = sum(map(len, ids))
    rows = []
    for variant, r in results.items():
        rows.append(
            {
                "variant": variant,
                "cpu_s": r["cpu_s"],
                "wall_s": r["wall_s"],
                "prefill_s": r["prefill_s"],
                "decode_s": r["decode_s"],
                "new_tokens": sum(map(len, r["tokens"])),
                "prompt_tokens_computed": r["computed"],
                "computed_over_real": r["computed"] / real,
                "identical_to_batch1": sum(a == b for a, b in zip(r["tokens"], reference)),
                "identical_to_full_model": sum(a == b for a, b in zip(r["tokens"], check["tokens"])),
                "decoding": r.get("decoding", ""),
                "load_before_after": r["load_before_after"],
            }
        )
    return {
        "workload": name,
        "documents": len(ids),
        "prompt_tokens": real,
        "prompt_lengths": [min(map(len, ids)), max(map(len, ids))],
        "checked_documents": len(check["tokens"]),
        "rows": rows,
    }


def markdown(report: dict) -> str:
    lines = ["# Bulk summarisation: static batches, ragged prefill, continuous batching", ""]
    lines += machine_markdown(report["machine"])
    lines += [report["note"], ""]
    lines += _targets(report)
    for w in report["workloads"]:
        lines += _workload_lines(w)
    return "\n".join(lines) + "\n"


def _targets(report: dict) -> list[str]:
    """Issue 26's targets for the default, per workload: >= 1.8x static8 and >= 1.3x batch1 in CPU time,
    outputs identical, prefill <= 1.05x the real prompt tokens."""
    default = f"continuous{report['default_max_batch']}"
    lines = [f"## Targets for the default ({default})", "", "| workload | vs static8 (≥ 1.8×) | vs batch1 (≥ 1.3×) "
             "| identical | prompt tokens computed (≤ 1.05×) |", "|---|---|---|---|---|"]  # fmt: skip
    for w in report["workloads"]:
        by = {r["variant"]: r for r in w["rows"]}
        if not {default, "static8", "batch1"} <= set(by):
            continue
        d = by[default]
        vs8, vs1 = by["static8"]["cpu_s"] / d["cpu_s"], by["batch1"]["cpu_s"] / d["cpu_s"]
        full = f"{d['identical_to_full_model']}/{w['checked_documents']}"
        same = f"{d['identical_to_batch1']}/{w['documents']} to batch 1, {full} to the full model"
        lines.append(
            f"| {w['workload']} | {vs8:.2f}× {'met' if vs8 >= 1.8 else 'missed'} | {vs1:.2f}× "
            f"{'met' if vs1 >= 1.3 else 'missed'} | {same} | {d['computed_over_real']:.2f}× |"
        )
    return lines + [""] + report.get("findings", []) + [""]


def _workload_lines(w: dict) -> list[str]:
    by = {r["variant"]: r for r in w["rows"]}
    lines = [
        f"## {w['workload']}: {w['documents']} documents, {w['prompt_tokens']} prompt tokens "
        f"({w['prompt_lengths'][0]}–{w['prompt_lengths'][1]} each)",
        "",
        "| variant | CPU s | wall s | prefill s | decode s | vs static8 (CPU) | vs batch1 (CPU) | prompt tokens "
        "computed / real | identical to batch 1 | identical to full model | load avg before → after |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in w["rows"]:
        vs8 = by["static8"]["cpu_s"] / r["cpu_s"] if "static8" in by else float("nan")
        vs1 = by["batch1"]["cpu_s"] / r["cpu_s"] if "batch1" in by else float("nan")
        lines.append(
            f"| {r['variant']} | {r['cpu_s']:.1f} | {r['wall_s']:.1f} | {r['prefill_s']:.1f} | {r['decode_s']:.1f} "
            f"| {vs8:.2f}× | {vs1:.2f}× | {r['computed_over_real']:.2f} | {r['identical_to_batch1']}/{w['documents']} "
            f"| {r['identical_to_full_model']}/{w['checked_documents']} "
            f"| {r['load_before_after'][0]:.1f} → {r['load_before_after'][1]:.1f} |"
        )
    default = by.get("default", {}).get("decoding")
    return lines + ([""] + [f"The default ran: {default}."] if default else []) + [""]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2")
    parser.add_argument("--data", default=str(DATA))
    parser.add_argument("--docs", type=int, default=100)
    parser.add_argument("--docs-1024", type=int, default=64)
    parser.add_argument("--new-tokens", type=int, default=48)
    parser.add_argument("--check-docs", type=int, default=16)
    parser.add_argument("--variants", default="continuous8,static8,batch1,continuous16,ragged8")
    parser.add_argument("--out", default="benchmarks/results")
    parser.add_argument("--name", default="bulk_smollm2")
    parser.add_argument("--from-json", default=None, help="rewrite the Markdown of this report's JSON; time nothing")
    args = parser.parse_args()
    if args.from_json:
        report = json.loads(Path(args.from_json).read_text())
        report["default_max_batch"] = DEFAULT_MAX_BATCH
        write_json_markdown(args.out, args.name, report, markdown(report))
        return
    args.variants = args.variants.split(",")
    calm.set_threads(1)
    model = CalmModel.from_pretrained(args.model)
    model.generate(["Warm up: say hello.", "And once more, in a batch."], max_new_tokens=4)  # warm-up
    workloads: list[dict] = []

    def save(current: dict | None = None) -> None:
        report = _report(workloads + ([current] if current else []))
        for path in write_json_markdown(args.out, args.name, report, markdown(report)):
            print(path, file=sys.stderr)

    if args.docs:
        workloads.append(workload(model, "natural lengths", args.docs, None, args, save))
        save()
    if args.docs_1024:
        workloads.append(workload(model, "cut to 1,024 tokens", args.docs_1024, 1024, args, save))
        save()


def _report(workloads: list[dict]) -> dict:
    return {
        "machine": machine_info(command=" ".join(["python", *sys.argv])),
        "default_max_batch": DEFAULT_MAX_BATCH,
        "note": (
            "CPU seconds of this process over the whole job; greedy, EOS ends a summary as in a real job. "
            f"The default (CalmModel.generate, calm summarize) is continuous{DEFAULT_MAX_BATCH}. Wall and "
            "prefill/decode seconds are wall-clock and include waiting for the CPU: other jobs shared this "
            "2-CPU machine (load average column)."
        ),
        "workloads": workloads,
    }


if __name__ == "__main__":
    main()
