"""Host synchronisations per generated token, dynamic vs static decode path (issue 12), counted on CPU.

calm.engine.syncs.SyncCounter counts every operation that would make the host wait for a GPU: scalar reads
(item, bool), data-dependent shapes (nonzero, boolean-mask indexing) and copies to the host (tolist).
Each configuration generates --short and --long tokens per row (EOS ignored) on the embedded model;
the difference of the two counts, divided by the difference in tokens, is the per-token count
(the prefill's and the final read-out's syncs cancel). The static engine is counted eagerly: its
compiled step is the same code, and torch.compile(fullgraph=True) capturing it shows it has none.

Usage: python benchmarks/sync_count.py [--batch-sizes 1,8] [--policies full,fixed:15,classifier:0.5,softmax:0.9]
"""

from __future__ import annotations

import argparse
import sys
from collections import Counter

from calm import CalmModel
from calm.bench import bench_prompts, parse_policy_spec
from calm.engine.generation import GenerationConfig, generate_tokens
from calm.engine.syncs import SyncCounter
from calm.eval.reporting import machine_info, machine_markdown, write_json_markdown
from calm.prompts.documents import read_jsonl


def count(model: CalmModel, batch, spec: str, new_tokens: int, **engine) -> tuple[Counter, float]:
    config = GenerationConfig(max_new_tokens=new_tokens, eos_token_ids=(), pad_token_id=model.pad_token_id, **engine)
    with SyncCounter() as counter:
        result = generate_tokens(model.network, batch, parse_policy_spec(spec), config)
    return counter.by_op, result.avg_layers


def per_token(model: CalmModel, batch, spec: str, args, **engine) -> dict:
    short, _ = count(model, batch, spec, args.short, **engine)
    long, avg_layers = count(model, batch, spec, args.long, **engine)
    steps = args.long - args.short
    by_op = {op: (long[op] - short[op]) / steps for op in sorted(set(long) | set(short)) if long[op] != short[op]}
    return {
        "syncs_per_token": sum(by_op.values()),
        "by_op_per_token": by_op,
        "syncs_short_run": sum(short.values()),
        "syncs_long_run": sum(long.values()),
        "avg_layers": avg_layers,
    }


def markdown(report: dict) -> str:
    c = report["config"]
    lines = [
        f"# Host syncs per token: {c['model']}",
        "",
        (
            f"Counted with calm.syncs.SyncCounter over generations of {c['short']} and {c['long']} tokens per row "
            "(EOS ignored); per token = the difference / the extra tokens. A sync is an operation that makes the "
            "host wait for the device: .item()/bool() reads, nonzero and boolean-mask indexing, .tolist()."
        ),
        "",
        "| batch | policy | engine | syncs per token | by operation (per token) | avg layers "
        "| whole runs (short / long) |",
        "|---:|---|---|---:|---|---:|---:|",
    ]
    for r in report["rows"]:
        ops = ", ".join(f"{op} {n:g}" for op, n in r["by_op_per_token"].items()) or "–"
        lines.append(
            f"| {r['batch_size']} | {r['policy']} | {r['engine']} | **{r['syncs_per_token']:g}** | {ops} | "
            f"{r['avg_layers']:.2f} | {r['syncs_short_run']} / {r['syncs_long_run']} |"
        )
    lines += [
        "",
        (
            "static (sync every k): the static engine with sync_every=k, whose only sync between tokens is "
            'the "all rows finished?" read every k tokens. Whole runs include what both engines read once '
            "per generation: the prompt padding in the prefill and the final tokens."
        ),
        "",
    ]
    return "\n".join(lines + machine_markdown(report["machine"]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2")
    parser.add_argument("--data", default="../shared/data/xsum/test.jsonl")
    parser.add_argument("--batch-sizes", default="1,8")
    parser.add_argument("--policies", default="full,fixed:15,classifier:0.5,softmax:0.9")
    parser.add_argument("--short", type=int, default=4)
    parser.add_argument("--long", type=int, default=12)
    parser.add_argument("--max-doc-tokens", type=int, default=256)
    parser.add_argument("--out", default="benchmarks/results")
    parser.add_argument("--name", default="sync_count_smollm2")
    args = parser.parse_args()
    model = CalmModel.from_pretrained(args.model)
    batch_sizes = [int(b) for b in args.batch_sizes.split(",")]
    prompts = bench_prompts(
        [r.document for r in read_jsonl(args.data, limit=max(batch_sizes))], model.tokenizer, args.max_doc_tokens
    )
    engines = {
        "dynamic": {"engine": "dynamic"},
        "static (sync every 1)": {"engine": "static", "sync_every": 1},
        "static (sync every 8)": {"engine": "static", "sync_every": 8},
    }
    rows = []
    for b in batch_sizes:
        batch = model.encode_prompts([prompts[i % len(prompts)] for i in range(b)], args.long, truncate=True)
        for spec in args.policies.split(","):
            for name, engine in engines.items():
                rows.append(
                    {"batch_size": b, "policy": spec, "engine": name, **per_token(model, batch, spec, args, **engine)}
                )
                print(rows[-1], file=sys.stderr)
    config = {k: v for k, v in vars(args).items() if k not in ("out", "name")}
    report = {
        "benchmark": "sync_count",
        "config": config,
        "machine": machine_info(model.device, " ".join(sys.argv)),
        "rows": rows,
    }
    write_json_markdown(args.out, args.name, report, markdown(report))
    print(markdown(report))


if __name__ == "__main__":
    main()
