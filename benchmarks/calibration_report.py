"""Issue-4 report: the certified thresholds of a calibrated checkpoint, checked on held-out test data.

For each tolerance δ, the threshold that Learn-then-Test certifies on the calibration set (read
from the checkpoint's table) is run on the test documents through the `calm eval` sweep (sharing
its resumable cache with the main eval report when --eval-dir is the same), and the test-set mean
inconsistency D = 1 − ROUGE-L(early, full), average layers and measured speedup are reported.

Usage: python benchmarks/calibration_report.py --model calm/assets/smollm2 \
           --data ../shared/data/xsum/test.jsonl --limit 100 --deltas 0.05,0.1,0.2 \
           --eval-dir build/eval-smollm2-test --out benchmarks/results
"""

from __future__ import annotations

import argparse
import math
import sys

from calm import CalmModel
from calm.calibration.knob import calibrated_decay_tau
from calm.eval.reporting import format_speedup, json_safe, machine_info, machine_markdown, write_json_markdown
from calm.eval.sweep import EvalConfig, run_eval
from calm.exits.policy import ExitPolicy
from calm.prompts.documents import read_jsonl


def run(args) -> dict:
    model = CalmModel.from_pretrained(args.model)
    table = model.calibration
    if table is None:
        sys.exit(f"{args.model} has no calibration table: run calm calibrate first")
    decay_tau = calibrated_decay_tau(table)
    deltas = [float(d) for d in args.deltas.split(",")]
    certified = {d: table.threshold_for_tolerance(d) for d in deltas}
    thresholds = sorted({t for t in certified.values() if t is not None}, reverse=True)
    records = read_jsonl(args.data, require_summary=True, limit=args.limit)
    points = {}
    if thresholds:
        config = EvalConfig(
            model=args.model,
            data=args.data,
            thresholds=tuple(thresholds),
            measure=table.measure,
            min_exit_layer=None if (table.min_exit_layer or 1) == 1 else table.min_exit_layer,  # None: the floor
            max_new_tokens=table.max_new_tokens,
            batch_size=args.batch_size,
            limit=args.limit,
            max_doc_tokens=table.max_doc_tokens,
            decay_tau=decay_tau,
            with_transformers=False,
        )
        report = run_eval(model, records, config, args.eval_dir, command=" ".join(sys.argv))
        points = {p.threshold: p for p in report.points if p.threshold is not None}
    rows = []
    for d in deltas:
        t = certified[d]
        p = points.get(t)
        rows.append(
            json_safe(
                {
                    "delta": d,
                    "epsilon": table.epsilon,
                    "threshold": t,
                    "test_mean_D": p.dissimilarity if p else 0.0,
                    "within_delta": (p.dissimilarity <= d) if p else True,
                    "avg_layers": p.avg_layers if p else float(model.num_layers),
                    "speedup_vs_full": p.speedup_vs_full if p else 1.0,
                    "rougeL": p.rougeL if p else None,
                    "same_as_full": p.same_as_full if p else 1.0,
                }
            )
        )
    return {
        "model": args.model,
        "calibration": {
            "data": table.data,
            "n": table.n,
            "epsilon": table.epsilon,
            "method": table.method,
            "measure": table.measure,
            "decay_tau": decay_tau,
            "max_new_tokens": table.max_new_tokens,
            "max_doc_tokens": table.max_doc_tokens,
        },
        "test": {"data": args.data, "n": len(records)},
        "rows": rows,
        "machine": machine_info(model.device, " ".join(sys.argv)),
    }


def markdown(report: dict) -> str:
    c, t = report["calibration"], report["test"]
    lines = [
        f"# Calibrated thresholds on held-out data: {report['model']}",
        "",
        f"Calibrated with Learn-then-Test ({c['method']}, ε = {c['epsilon']}) on {c['n']} documents of "
        f"`{c['data']}`, measure `{c['measure']}` (threshold decay "
        f"τ={c.get('decay_tau', ExitPolicy.decay_tau):g}), max {c['max_new_tokens']} new tokens, documents cut to "
        f"{c['max_doc_tokens'] or 'no'} tokens. Checked on {t['n']} documents of `{t['data']}` (never used "
        "to calibrate). D = 1 − ROUGE-L(early-exit output, full-model output), mean over documents.",
        "",
        "| δ | certified λ | test mean D | D ≤ δ | avg layers (of 30) | speedup vs full | identical to full |",
        "|---:|---:|---:|:---:|---:|---:|---:|",
    ]
    for r in report["rows"]:
        lam = "none (full model)" if r["threshold"] is None else f"{r['threshold']:g}"
        lines.append(
            f"| {r['delta']:g} | {lam} | {r['test_mean_D']:.3f} | {'yes' if r['within_delta'] else 'NO'} | "
            f"{r['avg_layers']:.2f} | {format_speedup(r['speedup_vs_full'] or math.nan)} | "
            f"{100 * r['same_as_full']:.0f}% |"
        )
    return "\n".join(lines + [""] + machine_markdown(report["machine"])) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="calm/assets/smollm2")
    parser.add_argument("--data", default="../shared/data/xsum/test.jsonl")
    parser.add_argument("--limit", type=int, default=100)
    parser.add_argument("--deltas", default="0.05,0.1,0.2")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--eval-dir", default="build/eval-smollm2-test")
    parser.add_argument("--out", default="benchmarks/results")
    args = parser.parse_args()
    report = run(args)
    write_json_markdown(args.out, "calibration_test", report, markdown(report))
    print(markdown(report))


if __name__ == "__main__":
    main()
