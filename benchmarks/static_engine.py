"""The static decode path on CPU (issue 12): dynamic vs static vs static+compile, on the embedded model.

Per batch size (1 and 8) and policy (full depth, fixed:15), each engine generates exactly
--new-tokens tokens per row (EOS ignored) on XSum test documents cut to --max-doc-tokens tokens.
Every configuration gets one untimed warm-up (for static+compile: the inductor compile, whose time
is reported), then --repeats timed runs taken round robin; medians are reported. Tokens of the
static engines are checked against the dynamic engine's.

Usage: python benchmarks/static_engine.py [--batch-sizes 1,8] [--policies full,fixed:15] [--repeats 3]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import torch

from calm import CalmModel
from calm.bench import bench_prompts, parse_policy_spec
from calm.engine.generation import GenerationConfig, generate_tokens
from calm.eval.reporting import machine_info, machine_markdown, write_json_markdown
from calm.prompts.documents import read_jsonl

ENGINES = {
    "dynamic": {"engine": "dynamic"},
    "static": {"engine": "static"},
    "static+compile": {"engine": "static", "compile": True},
}


def run_config(model: CalmModel, batch, spec: str, engine: str, new_tokens: int):
    config = GenerationConfig(
        max_new_tokens=new_tokens, eos_token_ids=(), pad_token_id=model.pad_token_id, **ENGINES[engine]
    )
    policy, network = parse_policy_spec(spec), model.network

    def run() -> dict:
        t0 = time.perf_counter()
        result = generate_tokens(network, batch, policy, config)
        return {
            "wall_s": time.perf_counter() - t0,
            "decode_s": result.timings.decode_s,
            "avg_layers": result.avg_layers,
            "token_ids": result.token_ids,
        }

    return run


def bench_batch(model: CalmModel, prompts: list[str], batch_size: int, args) -> list[dict]:
    batch = model.encode_prompts([prompts[i % len(prompts)] for i in range(batch_size)], args.new_tokens, truncate=True)
    torch._dynamo.reset()  # each batch size gets graphs specialised to its shapes, not dynamic ones
    configs = [(spec, engine) for spec in args.policies for engine in args.engines]
    runners = [run_config(model, batch, spec, engine, args.new_tokens) for spec, engine in configs]
    warm = []  # (first run, its seconds): static+compile compiles here
    for run in runners:
        t0 = time.perf_counter()
        first = run()
        warm.append((first, time.perf_counter() - t0))
    runs: list[list[dict]] = [[] for _ in runners]
    for _ in range(args.repeats):
        for i, run in enumerate(runners):
            runs[i].append(run())
    rows = []
    for (spec, engine), (first, warm_s), timed in zip(configs, warm, runs):
        reference = next(w[0] for (s, e), w in zip(configs, warm) if s == spec and e == "dynamic")
        rows.append(
            {
                "batch_size": batch_size,
                "policy": spec,
                "engine": engine,
                "prompt_tokens": int(batch.ids.shape[1]),
                "new_tokens": args.new_tokens,
                "warmup_s": warm_s,
                "wall_s": [r["wall_s"] for r in timed],
                "median_wall_s": statistics.median(r["wall_s"] for r in timed),
                "decode_ms_per_token": 1000 * statistics.median(r["decode_s"] for r in timed) / (args.new_tokens - 1),
                "best_decode_ms_per_token": 1000 * min(r["decode_s"] for r in timed) / (args.new_tokens - 1),
                "avg_layers": first["avg_layers"],
                "identical_to_dynamic": all(r["token_ids"] == reference["token_ids"] for r in [first, *timed]),
            }
        )
        print(rows[-1], file=sys.stderr)
    return _with_speedups(rows)


def _with_speedups(rows: list[dict]) -> list[dict]:
    """Per row: decode speedup against the dynamic engine under the same policy and at full depth."""

    def dynamic(spec: str) -> float:
        return next(r["decode_ms_per_token"] for r in rows if r["policy"] == spec and r["engine"] == "dynamic")

    for r in rows:
        r["decode_speedup_vs_dynamic"] = dynamic(r["policy"]) / r["decode_ms_per_token"]
        r["decode_speedup_vs_dynamic_full"] = (
            dynamic("full") / r["decode_ms_per_token"] if any(x["policy"] == "full" for x in rows) else None
        )
    return rows


def markdown(report: dict) -> str:
    c = report["config"]
    lines = [
        f"# Static decode path vs dynamic: {c['model']}, CPU",
        "",
        (
            f"{c['new_tokens']} new tokens per row (EOS ignored), documents from {c['data']} cut to "
            f"{c['max_doc_tokens']} tokens, median of {c['repeats']} runs after one warm-up per configuration, "
            "round robin. Another job (a training run) shared the CPU."
        ),
        "",
        (
            "| batch | policy | engine | decode ms/token | best | vs dynamic, same policy | vs dynamic full | "
            "whole run s | avg layers | warm-up s | tokens = dynamic |"
        ),
        "|---:|---|---|---:|---:|---:|---:|---:|---:|---:|:---:|",
    ]
    for r in report["rows"]:
        full = r["decode_speedup_vs_dynamic_full"]
        lines.append(
            f"| {r['batch_size']} | {r['policy']} | {r['engine']} | {r['decode_ms_per_token']:.1f} | "
            f"{r['best_decode_ms_per_token']:.1f} | "
            f"{r['decode_speedup_vs_dynamic']:.2f}× | {'–' if full is None else f'{full:.2f}×'} | "
            f"{r['median_wall_s']:.2f} | {r['avg_layers']:.2f} | {r['warmup_s']:.1f} | "
            f"{'yes' if r['identical_to_dynamic'] else 'NO'} |"
        )
    lines += [
        "",
        (
            "decode ms/token: median decode time (prefill excluded) / (new tokens − 1); best: the fastest "
            "run, less exposed to the other job. Speedups compare medians. static: the static "
            "step run eagerly; static+compile: through torch.compile(fullgraph=True), inductor backend. "
            "warm-up s: the first run, which for static+compile includes compiling the step."
        ),
        "",
    ]
    return "\n".join(lines + machine_markdown(report["machine"]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2")
    parser.add_argument("--data", default="../shared/data/xsum/test.jsonl")
    parser.add_argument("--batch-sizes", default="1,8")
    parser.add_argument("--policies", default="full,fixed:15")
    parser.add_argument("--engines", default=",".join(ENGINES))
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--max-doc-tokens", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", default="benchmarks/results")
    parser.add_argument("--name", default="static_engine_cpu")
    args = parser.parse_args()
    args.batch_sizes = [int(b) for b in args.batch_sizes.split(",")]
    args.policies, args.engines = args.policies.split(","), args.engines.split(",")
    model = CalmModel.from_pretrained(args.model)
    documents = [r.document for r in read_jsonl(args.data, limit=max(args.batch_sizes))]
    prompts = bench_prompts(documents, model.tokenizer, args.max_doc_tokens)
    rows = [row for b in args.batch_sizes for row in bench_batch(model, prompts, b, args)]
    config = {k: v for k, v in vars(args).items() if k not in ("out", "name")}
    report = {
        "benchmark": "static_engine",
        "config": config,
        "torch_threads": torch.get_num_threads(),
        "machine": machine_info(model.device, " ".join(sys.argv)),
        "rows": rows,
    }
    write_json_markdown(args.out, args.name, report, markdown(report))
    print(markdown(report))


if __name__ == "__main__":
    main()
