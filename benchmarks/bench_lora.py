"""Does early exit pay on the fine-tuned default model? Decode speed at batch 1, in one run:

- transformers `generate` on the original SmolLM2 (`smollm2-base`, no adapter, no heads);
- calm at full depth on the fine-tuned checkpoint;
- calm with the checkpoint's calibrated knob at each tolerance δ (certified on calib).

Every configuration decodes the same XSum test documents (cut to 256 tokens) for exactly N new
tokens (EOS suppressed, so every row does the same work); after one warm-up each, the timed runs
go round robin document by document. Decode time per token is the CPU time of a run of N tokens minus
that of a run of 1 token (its prefill and first token), the same way for calm and for transformers.

    python benchmarks/bench_lora.py --model build/smollm2-lora --docs 20 --tolerances 0.05,0.1,0.2
"""

from __future__ import annotations

import argparse
import functools
import statistics
import sys
import time
from pathlib import Path

from calm import CalmModel
from calm.bench import bench_prompts, transformers_generate
from calm.engine.generation import GenerationConfig, generate_tokens
from calm.eval.reporting import format_speedup, machine_info, machine_markdown, write_json_markdown
from calm.exits.policy import ExitPolicy
from calm.prompts.documents import read_jsonl


def calm_run(model: CalmModel, batch, policy: ExitPolicy, new_tokens: int) -> float:
    """Average layers of one greedy run of `new_tokens` tokens."""
    gen = GenerationConfig(max_new_tokens=new_tokens, eos_token_ids=(), pad_token_id=model.pad_token_id)
    return generate_tokens(model.network, batch, policy, gen).avg_layers


def hf_run(model: CalmModel, batch, new_tokens: int) -> float:
    transformers_generate(model, batch, new_tokens, fixed_length=True)
    return float(model.num_layers)


def decode_seconds(run_tokens, new_tokens: int) -> tuple[float, float]:
    """(CPU seconds per decoded token, average layers): a run of N tokens minus a run of 1 (prefill and
    first token), timed with this process's CPU clock, which time-slicing by other jobs does not inflate."""
    t0 = time.process_time()
    run_tokens(1)
    t1 = time.process_time()
    layers = run_tokens(new_tokens)
    t2 = time.process_time()
    return max(0.0, (t2 - t1) - (t1 - t0)) / (new_tokens - 1), layers


def configurations(base: CalmModel, tuned: CalmModel, tolerances: list[float]) -> dict:
    configs = {
        "transformers generate (original)": ("hf", base, None),
        "calm full depth (fine-tuned)": ("calm", tuned, ExitPolicy.never()),
    }
    for delta in tolerances:
        policy = tuned.policy(tolerance=delta)
        configs[f"calm knob δ={delta:g} ({policy.measure} λ={policy.threshold:g})"] = ("calm", tuned, policy)
    return configs


def run(args) -> dict:
    base = CalmModel.from_pretrained("smollm2-base")
    tuned = CalmModel.from_pretrained(args.model)
    records = read_jsonl(args.data, limit=args.docs)
    prompts = bench_prompts(tuned, [r.document for r in records], args.max_doc_tokens, args.new_tokens)
    configs = configurations(base, tuned, [float(d) for d in args.tolerances.split(",")])
    per_token = {name: [] for name in configs}
    layers = {name: [] for name in configs}
    for i, prompt in enumerate(prompts):
        batch = tuned.encode_prompts([prompt], args.new_tokens)
        for name, (kind, model, policy) in configs.items():
            run_tokens = (
                functools.partial(hf_run, model, batch)
                if kind == "hf"
                else functools.partial(calm_run, model, batch, policy)
            )
            call = functools.partial(decode_seconds, run_tokens, args.new_tokens)
            if i == 0:
                call()  # warm-up
            seconds, avg = call()
            per_token[name].append(seconds)
            layers[name].append(avg)
        print(f"document {i + 1}/{len(prompts)}", file=sys.stderr)
    rows = []
    hf = statistics.median(per_token["transformers generate (original)"])
    full = statistics.median(per_token["calm full depth (fine-tuned)"])
    for name in configs:
        ms = statistics.median(per_token[name])
        rows.append(
            {
                "config": name,
                "decode_ms_per_token": 1000 * ms,
                "avg_layers": statistics.fmean(layers[name]),
                "speedup_vs_full": full / ms,
                "speedup_vs_transformers_original": hf / ms,
            }
        )
    return {
        "model": args.model,
        "data": args.data,
        "documents": len(prompts),
        "new_tokens": args.new_tokens,
        "max_doc_tokens": args.max_doc_tokens,
        "rows": rows,
        "machine": machine_info(tuned.device, "python " + " ".join(sys.argv)),
    }


def markdown(report: dict) -> str:
    lines = [
        f"# Decode speed of the fine-tuned default: {report['model']}",
        "",
        f"Batch 1, {report['documents']} XSum test documents (cut to {report['max_doc_tokens']} tokens), "
        f"{report['new_tokens']} new tokens each (EOS suppressed). Median over documents of the decode time per "
        "token: the CPU time of a run of N tokens minus a run of 1 (prefill and first token), single-threaded, "
        "so that other jobs on the machine do not inflate it; after one warm-up per configuration, "
        "configurations alternate document by document in one process.",
        "",
        "| configuration | decode CPU ms/token | avg layers | speedup vs calm full (fine-tuned) | "
        "speedup vs transformers (original) |",
        "|---|---:|---:|---:|---:|",
    ]
    lines += [
        f"| {r['config']} | {r['decode_ms_per_token']:.2f} | {r['avg_layers']:.2f} | "
        f"{format_speedup(r['speedup_vs_full'])} | {format_speedup(r['speedup_vs_transformers_original'])} |"
        for r in report["rows"]
    ]
    return "\n".join(lines + [""] + machine_markdown(report["machine"]))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="calm/assets/smollm2")
    p.add_argument("--data", default="../shared/data/xsum/test.jsonl")
    p.add_argument("--docs", type=int, default=20)
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--max-doc-tokens", type=int, default=256)
    p.add_argument("--tolerances", default="0.05,0.1,0.2")
    p.add_argument("--out", default="benchmarks/results/bench_lora_smollm2")
    args = p.parse_args()
    report = run(args)
    out = Path(args.out)
    write_json_markdown(out.parent, out.name, report, markdown(report))
    print(markdown(report))


if __name__ == "__main__":
    main()
