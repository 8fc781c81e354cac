"""Engine benchmark (issue 2): on the embedded model, CPU, batch size 1, XSum test documents.

(a) calm at full depth (a policy that never exits) vs transformers `generate`: tokens must be
    identical; wall-clock ratio per document.
(b) a forced exit at layer 15 of 30 for every token vs calm at full depth: decode ms/token ratio.

Variants run side by side per document, after a warm-up, repeated; medians are reported.
Usage: python benchmarks/bench_engine.py [--docs 8] [--new-tokens 32] [--repeats 3] [--out benchmarks/results]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

import torch

from calm import CalmModel, ExitPolicy
from calm.bench import transformers_generate
from calm.eval.reporting import machine_info, machine_markdown, write_json_markdown
from calm.exits.confidence import softmax_check_layers
from calm.prompts.documents import read_jsonl
from calm.prompts.templates import PromptFormat, fit_prompts


def time_hf(model: CalmModel, batch, new_tokens: int) -> tuple[float, tuple[int, ...]]:
    t0 = time.perf_counter()
    tokens = transformers_generate(model, batch, new_tokens)[0]
    return time.perf_counter() - t0, tokens


def run(args) -> dict:
    model = CalmModel.from_pretrained(args.model)
    docs = read_jsonl(args.data, limit=args.docs + 1)
    prompts = fit_prompts(
        PromptFormat.for_model(model, args.new_tokens), [(f"document {d.id}", d.document) for d in docs]
    )
    batches = [model.encode_prompts(p.text, args.new_tokens) for p in prompts]
    warm, batches = batches[0], batches[1:]
    policies = {"full": ExitPolicy.never(), "exit15": ExitPolicy.fixed(args.exit_layer)}
    for policy in policies.values():  # warm-up, excluded
        model.generate(warm.ids, max_new_tokens=4, policy=policy)
    time_hf(model, warm, 4)
    rows = []
    for i, batch in enumerate(batches):
        rec = {
            "doc": i,
            "prompt_tokens": int(batch.ids.shape[1]),
            "hf_s": [],
            "full_s": [],
            "full_decode_ms": [],
            "exit_decode_ms": [],
            "exit_s": [],
        }
        for _ in range(args.repeats):
            hf_s, hf_tokens = time_hf(model, batch, args.new_tokens)
            full = model.generate(batch.ids, max_new_tokens=args.new_tokens, policy=policies["full"])
            early = model.generate(batch.ids, max_new_tokens=args.new_tokens, policy=policies["exit15"])
            rec["hf_s"].append(hf_s)
            rec["full_s"].append(full.timings.total_s)
            rec["exit_s"].append(early.timings.total_s)
            rec["full_decode_ms"].append(1000 * full.timings.decode_s / max(1, len(full.token_ids[0]) - 1))
            rec["exit_decode_ms"].append(1000 * early.timings.decode_s / max(1, len(early.token_ids[0]) - 1))
        rec["identical_tokens"] = full.token_ids[0] == hf_tokens
        rec["new_tokens"] = len(full.token_ids[0])
        rec["exit_avg_layers"] = early.avg_layers
        for key in ("hf_s", "full_s", "exit_s", "full_decode_ms", "exit_decode_ms"):
            rec[key] = statistics.median(rec[key])
        rec["full_vs_hf_speedup"] = rec["hf_s"] / rec["full_s"]
        rec["exit_vs_full_decode_speedup"] = rec["full_decode_ms"] / rec["exit_decode_ms"]
        rows.append(rec)
        print(json.dumps(rec), file=sys.stderr)
    return {
        "benchmark": "engine",
        "model": args.model,
        "machine": machine_info(model.device, " ".join(sys.argv)),
        "batch_size": 1,
        "new_tokens": args.new_tokens,
        "repeats": args.repeats,
        "exit_layer": args.exit_layer,
        "documents": rows,
        "summary": summarize(rows),
        "softmax_check_layers": softmax_check_layers(model.model, model.adapter.head_module, model.num_layers),
    }


def summarize(rows: list[dict]) -> dict:
    med = lambda key: statistics.median(r[key] for r in rows)
    return {
        "all_tokens_identical": all(r["identical_tokens"] for r in rows),
        "full_vs_hf_speedup_median": med("full_vs_hf_speedup"),
        "exit_vs_full_decode_speedup_median": med("exit_vs_full_decode_speedup"),
        "hf_s_median": med("hf_s"),
        "full_s_median": med("full_s"),
        "full_decode_ms_per_token_median": med("full_decode_ms"),
        "exit_decode_ms_per_token_median": med("exit_decode_ms"),
    }


def markdown(report: dict) -> str:
    s, m = report["summary"], report["machine"]
    lines = [
        f"# Engine benchmark: {report['model']}, batch size 1, {len(report['documents'])} XSum test documents",
        "",
        *machine_markdown(m),
        f"- (a) calm at full depth vs transformers `generate`: tokens identical on every document: "
        f"**{s['all_tokens_identical']}**; median speed ratio **{s['full_vs_hf_speedup_median']:.2f}x** "
        f"(whole generation incl. prefill, up to {report['new_tokens']} new tokens).",
        f"- (b) forced exit at layer {report['exit_layer']} of 30 vs calm at full depth: median decode speedup "
        f"**{s['exit_vs_full_decode_speedup_median']:.2f}x** per token "
        f"({s['full_decode_ms_per_token_median']:.1f} -> {s['exit_decode_ms_per_token_median']:.1f} "
        "ms/token on this machine).",
        f"- Per-check cost of the softmax measure: one check runs the whole LM head, "
        f"**{report['softmax_check_layers']:.1f} layers** of work (its weights over one layer's), so checking at "
        "every layer costs more than an exit saves; calm's footer warns when a run's checks cost more than "
        "they saved.",
        "",
        "| doc | prompt tokens | new tokens | identical | HF s | calm full s | full/HF | full ms/tok | "
        "exit ms/tok | exit speedup |",
        "|---:|---:|---:|:---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in report["documents"]:
        lines.append(
            f"| {r['doc']} | {r['prompt_tokens']} | {r['new_tokens']} | {'yes' if r['identical_tokens'] else 'NO'} | "
            f"{r['hf_s']:.2f} | {r['full_s']:.2f} | {r['full_vs_hf_speedup']:.2f}x | {r['full_decode_ms']:.1f} | "
            f"{r['exit_decode_ms']:.1f} | {r['exit_vs_full_decode_speedup']:.2f}x |"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2")
    parser.add_argument("--data", default="../shared/data/xsum/test.jsonl")
    parser.add_argument("--docs", type=int, default=8)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--exit-layer", type=int, default=15)
    parser.add_argument("--out", default="benchmarks/results")
    parser.add_argument("--name", default=None, help="report file stem (default engine_<device>)")
    args = parser.parse_args()
    report = run(args)
    stem = args.name or ("engine_cuda" if torch.cuda.is_available() else "engine_cpu")
    write_json_markdown(args.out, stem, report, markdown(report))
    print(markdown(report))


if __name__ == "__main__":
    main()
