"""Quality against the references, side by side on the same XSum test documents: the original SmolLM2
at full depth, the CALM-LoRA fine-tuned model at full depth, and the fine-tuned model with the knob
at each certified tolerance δ. Reads the `calm eval` results (eval.json) of the two models and the
calibration check (calibration_test.json) that names the certified thresholds; D is measured
against the fine-tuned full model, as CALM does.

    python benchmarks/quality_lora.py --base-eval build/eval-smollm2-base/eval.json \
        --tuned-eval build/eval-smollm2-lora/eval.json --calibration benchmarks/results/calibration_test.json
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from calm.eval.reporting import format_speedup, write_json_markdown

METRICS = ("rouge1", "rouge2", "rougeL")


def _full(points: list[dict]) -> dict:
    return next(p for p in points if p["name"] == "full")


def rows(base: dict, tuned: dict, calibration: dict) -> list[dict]:
    def row(name: str, p: dict, delta: float | None = None) -> dict:
        return {
            "model": name,
            "delta": delta,
            **{m: p[m] for m in METRICS},
            "D": p["dissimilarity"],
            "avg_layers": p["avg_layers"],
            "speedup_vs_full": p.get("speedup_vs_full"),
        }

    out = [row("original, full depth", _full(base["points"])), row("fine-tuned, full depth", _full(tuned["points"]))]
    by_threshold = {p["threshold"]: p for p in tuned["points"] if p["threshold"] is not None}
    for r in calibration["rows"]:
        p = by_threshold.get(r["threshold"])
        if p is not None:
            out.append(row(f"fine-tuned, knob δ={r['delta']:g} (λ={r['threshold']:g})", p, r["delta"]))
    return out


def markdown(report: dict) -> str:
    lines = [
        "# Quality against the references: original vs CALM-LoRA fine-tuned SmolLM2",
        "",
        f"{report['n']} XSum test documents (cut to {report['max_doc_tokens']} tokens), greedy, max "
        f"{report['max_new_tokens']} new tokens. ROUGE F1 ×100 against the reference summaries; D = 1 − "
        "ROUGE-L(output, fine-tuned full-depth output); thresholds certified on the calib split.",
        "",
        "| model | ROUGE-1 | ROUGE-2 | ROUGE-L | D | avg layers | speedup vs full (same run) |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in report["rows"]:
        speed = format_speedup(r["speedup_vs_full"]) if r["speedup_vs_full"] is not None else "–"
        lines.append(
            f"| {r['model']} | {100 * r['rouge1']:.2f} | {100 * r['rouge2']:.2f} | {100 * r['rougeL']:.2f} | "
            f"{r['D']:.3f} | {r['avg_layers']:.2f} | {speed} |"
        )
    drop = 100 * (report["rows"][0]["rougeL"] - report["rows"][1]["rougeL"])
    lines += [
        "",
        f"Full-depth ROUGE-L change from fine-tuning: {-drop:+.2f} points (the issue allows at most −0.50).",
        "",
        f"Command: `{report['command']}`",
        "",
    ]
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--base-eval", required=True)
    p.add_argument("--tuned-eval", required=True)
    p.add_argument("--calibration", default="benchmarks/results/calibration_test.json")
    p.add_argument("--out", default="benchmarks/results/quality_lora_smollm2")
    args = p.parse_args()
    base, tuned = (json.loads(Path(f).read_text()) for f in (args.base_eval, args.tuned_eval))
    calibration = json.loads(Path(args.calibration).read_text())
    if base["n"] != tuned["n"]:
        sys.exit(f"the two evals ran on different documents ({base['n']} vs {tuned['n']})")
    report = {
        "n": tuned["n"],
        "max_new_tokens": tuned["config"]["max_new_tokens"],
        "max_doc_tokens": tuned["config"]["max_doc_tokens"],
        "rows": rows(base, tuned, calibration),
        "command": "python " + " ".join(sys.argv),
    }
    out = Path(args.out)
    write_json_markdown(out.parent, out.name, report, markdown(report))
    print(markdown(report))


if __name__ == "__main__":
    main()
