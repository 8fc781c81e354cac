"""The CALM-LoRA runs on SmolLM2 side by side: what each setting bought in exit-readiness and what it cost.

For each run: its LoRA setting (from the training state), the last log window's exit agreement and
final-layer agreement with the original, the exit-ceiling replay on 100 test documents (the oracle and
the fewest layers the classifier and the softmax margin reach within 0.5% token errors), and
full-depth ROUGE-L against the references. The frozen-backbone default is the first row.

    python benchmarks/lora_runs.py --frozen benchmarks/results/exit_ceiling_smollm2.json \
        --base-eval build/eval-smollm2-base/eval.json \
        --run "r16 layers 0-19:build/train-smollm2-lora/state.safetensors:$R/exit_ceiling_smollm2_lora.json:$E" \
        --run "r32 all layers:build/train-smollm2-lora-r32/state.safetensors:$R/exit_ceiling_smollm2_lora_r32.json:$E32"

    (R=benchmarks/results, E=build/eval-smollm2-lora/eval.json, E32=build/eval-lora-r32/eval.json)
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from lora_report import full_point  # benchmarks/ is on sys.path when a script here runs
from safetensors import safe_open

from calm.eval.reporting import write_json_markdown

BUDGET = "0.005"


def ceiling(path: Path) -> dict:
    r = json.loads(path.read_text())
    best = {m: (b[BUDGET] or {}).get("avg_layers") for m, b in r["fewest_layers"].items()}
    return {"oracle": r["oracle_layers"], "min_exit_layer": r["min_exit_layer"], **best}


def rouge_l(eval_json: Path) -> float:
    return full_point(eval_json)["rougeL"]


def training(state: Path) -> dict:
    with safe_open(str(state), "pt") as f:
        meta = json.loads(f.metadata()["meta"])
    fp, last = meta["fingerprint"], meta["history"][-1]
    return {
        "lora_rank": fp["lora_rank"],
        "lora_layers": fp["lora_layers"] or "all",
        "anchor": fp["anchor"],
        "lr": fp["lr"],
        "steps": last["step"],
        "sequences": last["step"] * fp["batch_size"],
        "exit_agreement": last["agree"],
        "final_agreement": last["final_agree"],
    }


def run_row(spec: str) -> dict:
    name, state, ceiling_json, eval_json = spec.split(":")
    return {"run": name, **training(Path(state)), **ceiling(Path(ceiling_json)), "rougeL": rouge_l(Path(eval_json))}


def _cell(v: float | None, fmt: str) -> str:
    return "–" if v is None else format(v, fmt)


def markdown(r: dict) -> str:
    lines = [
        "# CALM-LoRA runs on SmolLM2-135M-Instruct",
        "",
        "Exit agreement: an exit layer's token equals the model's own final token, on the training batches of "
        "the last log window, averaged over the sampled exit layers 8..29. Replay: 100 XSum test documents, "
        "the model's own greedy summaries (benchmarks/exit_ceiling.py); layers within 0.5% token error is the "
        "fewest average layers a threshold of that measure reaches while at most 0.5% of tokens differ from "
        "the final layer's (D is about 10× the token error at sequence level). ROUGE-L: full depth against "
        "the references, 100 test documents.",
        "",
        "| run | LoRA rank | adapted layers | anchor | lr | steps × 2 seqs | exit agreement | final agreement "
        "with original | oracle layers | classifier @0.5% | softmax @0.5% | ROUGE-L full depth |",
        "|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    f = r["frozen"]
    lines.append(
        f"| frozen backbone (shipped) | – | – | – | – | – | – | 1.000 | {f['oracle']:.2f} | "
        f"{_cell(f.get('classifier'), '.2f')} | {_cell(f.get('softmax'), '.2f')} | {100 * r['base_rougeL']:.2f} |"
    )
    for x in r["runs"]:
        lines.append(
            f"| {x['run']} | {x['lora_rank']} | {x['lora_layers']} | {x['anchor']:g} | {x['lr']:g} | "
            f"{x['steps']} | {x['exit_agreement']:.3f} | {x['final_agreement']:.3f} | {x['oracle']:.2f} | "
            f"{_cell(x.get('classifier'), '.2f')} | {_cell(x.get('softmax'), '.2f')} | "
            f"{100 * x['rougeL']:.2f} |"
        )
    lines += [
        "",
        f"Frozen replay exits from layer {f['min_exit_layer']}, the LoRA runs' from layer "
        f"{r['runs'][0]['min_exit_layer'] if r['runs'] else '–'}.",
        "",
        f"Command: `{r['command']}`",
        "",
    ]
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--frozen", required=True, type=Path, help="exit_ceiling JSON of the frozen default")
    p.add_argument("--base-eval", required=True, type=Path, help="calm eval JSON of the original model")
    p.add_argument("--run", action="append", required=True, help="NAME:STATE:CEILING_JSON:EVAL_JSON")
    p.add_argument("--out", default="benchmarks/results/lora_runs_smollm2")
    args = p.parse_args()
    report = {
        "frozen": ceiling(args.frozen),
        "base_rougeL": rouge_l(args.base_eval),
        "runs": [run_row(s) for s in args.run],
        "command": "python " + " ".join(sys.argv),
    }
    out = Path(args.out)
    write_json_markdown(out.parent, out.name, report, markdown(report))
    print(markdown(report))


if __name__ == "__main__":
    main()
