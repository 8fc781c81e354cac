"""The CALM-LoRA run on SmolLM2 in one report: the training curve, the Learn-then-Test tables of the
fine-tuned checkpoint with a fixed (τ=0) and a decaying (τ=4) threshold, and full-depth quality of the
original and the fine-tuned model against the references on the same test documents.

    python benchmarks/lora_report.py --state build/train-smollm2-lora/state.safetensors \
        --calibrated build/smollm2-lora-tau0 --calibrated build/smollm2-lora-tau4 \
        --base-eval build/eval-smollm2-base/eval.json --tuned-eval build/eval-smollm2-lora/eval.json
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from safetensors import safe_open

from calm.calibration.table import CalibrationTable
from calm.checkpoints.checkpoint import read_config
from calm.eval.reporting import write_json_markdown

DELTAS = (0.05, 0.1, 0.2)


def history(state: Path) -> list[dict]:
    with safe_open(str(state), "pt") as f:
        return json.loads(f.metadata()["meta"])["history"]


def calibration(path: Path) -> dict:
    table: CalibrationTable = read_config(path).calibration
    certified = {str(d): table.threshold_for_tolerance(d) for d in DELTAS}
    return {
        "checkpoint": str(path),
        "decay_tau": table.decay_tau,
        "n": table.n,
        "epsilon": table.epsilon,
        "rows": table.to_dict()["rows"],
        "certified": certified,
    }


def full_point(eval_json: Path) -> dict:
    report = json.loads(eval_json.read_text())
    full = next(p for p in report["points"] if p["name"] == "full")
    return {"n": report["n"], **{k: full[k] for k in ("rouge1", "rouge2", "rougeL")}}


def markdown(r: dict) -> str:
    h = r["history"]
    lines = [
        "# CALM fine-tuning of SmolLM2-135M-Instruct with LoRA",
        "",
        f"Training: `{r['command']}` ({h[-1]['step']} steps). Metrics per log window, on the training batches "
        "before each update: exit agreement = an exit layer's token (through its head) equals the adapted "
        "model's final token, averaged over the sampled exit layers 8..29; final agreement = the adapted final "
        "layer's token equals the original model's.",
        "",
        "| step | exit KL | exit agreement | final agreement with original | anchor KL |",
        "|---:|---:|---:|---:|---:|",
    ]
    lines += [
        f"| {e['step']} | {e['exit_kl']:.3f} | {e['agree']:.3f} | {e['final_agree']:.3f} | {e['anchor_kl']:.4f} |"
        for e in h[::4] + ([h[-1]] if (len(h) - 1) % 4 else [])
    ]
    for cal in r["calibrations"]:
        lines += [
            "",
            f"## Learn-then-Test on {cal['n']} calib documents, τ={cal['decay_tau']:g} (ε={cal['epsilon']:g})",
            "",
            "| λ | mean D | avg layers |",
            "|---:|---:|---:|",
        ]
        lines += [f"| {row['threshold']:g} | {row['mean_loss']:.3f} | {row['avg_layers']:.2f} |" for row in cal["rows"]]
        lines += [
            "",
            "Certified: "
            + ", ".join(
                f"δ={d}: {'none (full model)' if t is None else f'λ={t:g}'}" for d, t in cal["certified"].items()
            ),
        ]
    b, t = r["base"], r["tuned"]
    lines += [
        "",
        f"## Full depth against the references ({b['n']} test documents, 32 new tokens)",
        "",
        "| model | ROUGE-1 | ROUGE-2 | ROUGE-L |",
        "|---|---:|---:|---:|",
        f"| original | {100 * b['rouge1']:.2f} | {100 * b['rouge2']:.2f} | {100 * b['rougeL']:.2f} |",
        f"| fine-tuned | {100 * t['rouge1']:.2f} | {100 * t['rouge2']:.2f} | {100 * t['rougeL']:.2f} |",
        "",
        f"Command: `{r['report_command']}`",
        "",
    ]
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--state", required=True, type=Path)
    p.add_argument("--calibrated", action="append", required=True, type=Path)
    p.add_argument("--base-eval", required=True, type=Path)
    p.add_argument("--tuned-eval", required=True, type=Path)
    p.add_argument("--out", default="benchmarks/results/lora_smollm2")
    args = p.parse_args()
    config = json.loads((args.calibrated[0] / "calm_config.json").read_text())
    report = {
        "command": config["extra"]["training"]["command"],
        "history": history(args.state),
        "calibrations": [calibration(c) for c in args.calibrated],
        "base": full_point(args.base_eval),
        "tuned": full_point(args.tuned_eval),
        "report_command": "python " + " ".join(sys.argv),
    }
    out = Path(args.out)
    write_json_markdown(out.parent, out.name, report, markdown(report))
    print(markdown(report))


if __name__ == "__main__":
    main()
