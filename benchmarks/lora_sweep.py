"""A short sweep of CALM-LoRA settings on SmolLM2: which anchor, learning rate and adapted layers keep
the full model in place while the exit layers learn. Every run sees the same batches (same seed), so
the runs differ only in the setting swept. Reports the training metrics of the last log windows:
exit-layer agreement with the model's own final token, the final layer's agreement with the
original model's token (drift), and the KLs.

    python benchmarks/lora_sweep.py --steps 40            # XSum train + WikiText-2 valid only
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import torch

from calm.eval.reporting import write_json_markdown
from calm.training import TrainConfig, train

SETTINGS = {
    "lr3e-4 anchor1": {"lr": 3e-4, "anchor": 1.0},
    "lr3e-4 anchor4": {"lr": 3e-4, "anchor": 4.0},
    "lr3e-4 anchor4 layers0-19": {"lr": 3e-4, "anchor": 4.0, "lora_layers": "0-19"},
    "lr1e-3 anchor4": {"lr": 1e-3, "anchor": 4.0},
    "lr6e-4 anchor8 layers0-19": {"lr": 6e-4, "anchor": 8.0, "lora_layers": "0-19"},
}


def run(name: str, overrides: dict, args) -> dict:
    data = (f"{args.data}/xsum/train.jsonl", f"{args.data}/wikitext-2/valid.txt")
    work = Path(args.work) / name.replace(" ", "_")
    config = TrainConfig(
        data=data,
        out=str(work / "out"),
        work_dir=str(work / "state"),
        mode="lora",
        steps=args.steps,
        batch_size=2,
        layers_per_step=4,
        min_exit_layer=8,
        lora_rank=16,
        max_doc_tokens=256,
        max_chunks=200,
        log_every=args.window,
        checkpoint_every=args.steps,
        warmup=0.1,
        device="cpu",
        seed=0,
        **overrides,
    )
    t0 = time.perf_counter()
    result = train(config, progress=False)
    last = result.history[-args.last :]
    mean = {k: sum(h[k] for h in last) / len(last) for k in ("agree", "final_agree", "exit_kl", "anchor_kl")}
    return {
        "name": name,
        "settings": overrides,
        "seconds": time.perf_counter() - t0,
        "per_step": result.timings["per_step"],
        "last_windows": mean,
        "history": list(result.history),
    }


def markdown(report: dict) -> str:
    lines = [
        "# CALM-LoRA settings sweep (SmolLM2-135M-Instruct)",
        "",
        f"Command: `{report['command']}`  ",
        f"Machine: {report['machine']}; torch {report['torch']}.",
        "",
        f"{report['steps']} steps of 2 sequences (XSum train reference summaries + WikiText-2 valid chunks), "
        "LoRA rank 16, exit layers 8..29 (4 sampled per step), the shipped exit heads as the start. Every run "
        "sees the same batches. Metrics: mean of the last "
        f"{report['last']} log windows of {report['window']} steps, measured on the training batches before "
        "each update.",
        "",
        "| setting | exit agreement with own final token | final agreement with original | exit KL | anchor KL "
        "| s/step |",
        "|---|---|---|---|---|---|",
    ]
    for r in report["runs"]:
        m = r["last_windows"]
        lines.append(
            f"| {r['name']} | {m['agree']:.3f} | {m['final_agree']:.3f} | {m['exit_kl']:.3f} | "
            f"{m['anchor_kl']:.4f} | {r['per_step']:.2f} |"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--window", type=int, default=5)
    p.add_argument("--last", type=int, default=2)
    p.add_argument(
        "--only",
        default=None,
        help="Comma-separated setting names to run (default: all); the "
        "report keeps the earlier runs of the other settings.",
    )
    p.add_argument("--data", default="../shared/data")
    p.add_argument("--work", default="build/lora-sweep")
    p.add_argument("--out", default="benchmarks/results/lora_sweep_smollm2")
    args = p.parse_args()
    names = args.only.split(",") if args.only else list(SETTINGS)
    json_file = Path(args.out).with_suffix(".json")
    done = {r["name"]: r for r in json.loads(json_file.read_text())["runs"]} if json_file.is_file() else {}
    runs = [done[n] if n in done and n not in names else None for n in SETTINGS]
    runs = [
        r if r is not None else run(n, SETTINGS[n], args) for n, r in zip(SETTINGS, runs) if r is not None or n in names
    ]
    report = {
        "command": "python " + " ".join(sys.argv),
        "machine": f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads",
        "torch": torch.__version__,
        "steps": args.steps,
        "window": args.window,
        "last": args.last,
        "runs": runs,
    }
    write_json_markdown(Path(args.out).parent, Path(args.out).name, report, markdown(report))
    print(markdown(report))


if __name__ == "__main__":
    main()
