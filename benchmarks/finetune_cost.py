"""What CALM fine-tuning of the backbone costs on this machine: seconds per step and checkpoint size.

Runs `calm.training.train` in mode `finetune` for a few steps of one sequence each (an XSum train
document with its reference summary, the layer-weighted loss over all layers), into a temporary
directory, and reports the measured seconds per step, the sequences a 60-minute budget would
allow, and the size of the checkpoint it writes (the whole backbone). Writes JSON and Markdown
to benchmarks/results/.

    python benchmarks/finetune_cost.py --steps 4
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import click

from calm.eval.reporting import machine_info, machine_markdown, write_json_markdown
from calm.training import TrainConfig, train

RESULTS = Path(__file__).resolve().parent / "results"
BUDGET_SECONDS = 60 * 60


def directory_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def markdown(r: dict) -> str:
    return (
        "\n".join(
            [
                f"# CALM fine-tuning cost: {r['model']}",
                "",
                f"`--mode finetune`, {r['steps']} steps of {r['batch_size']} sequence (an XSum train document, "
                f"documents cut to {r['max_doc_tokens']} tokens, with its reference summary), device {r['device']}.",
                "",
                "| seconds per step | sequences in 60 minutes | checkpoint written |",
                "|---:|---:|---:|",
                f"| {r['seconds_per_step']:.1f} | {r['sequences_per_hour']:.0f} | "
                f"{r['checkpoint_bytes'] / 1e6:.0f} MB |",
                "",
                *machine_markdown(r["machine"]),
            ]
        )
        + "\n"
    )


@click.command(context_settings={"help_option_names": ["-h", "--help"], "show_default": True})
@click.option("--model", default="smollm2")
@click.option("--data", default="../shared/data/xsum/train.jsonl", help="Training JSONL (never calib or test).")
@click.option("--steps", type=int, default=4)
@click.option("--max-doc-tokens", type=int, default=256)
@click.option("--device", default="cpu")
@click.option("--out-dir", type=click.Path(file_okay=False), default=str(RESULTS))
def main(model, data, steps, max_doc_tokens, device, out_dir):
    with tempfile.TemporaryDirectory() as tmp:
        config = TrainConfig(
            data=(data,),
            out=f"{tmp}/out",
            work_dir=f"{tmp}/work",
            model=model,
            mode="finetune",
            steps=steps,
            batch_size=1,
            max_docs=2 * steps,
            max_chunks=0,
            max_doc_tokens=max_doc_tokens,
            checkpoint_every=10 * steps,
            device=device,
        )
        result = train(config, progress=False)
        size = directory_bytes(Path(config.out))
    per_step = result.timings["per_step"]
    report = {
        "model": model,
        "data": data,
        "steps": steps,
        "batch_size": 1,
        "max_doc_tokens": max_doc_tokens,
        "device": device,
        "seconds_per_step": per_step,
        "sequences_per_hour": BUDGET_SECONDS / per_step,
        "checkpoint_bytes": size,
        "timings": result.timings,
        "machine": machine_info(device, " ".join(["python", *sys.argv])),
    }
    write_json_markdown(out_dir, "finetune_cost_smollm2", report, markdown(report))
    click.echo(markdown(report))


if __name__ == "__main__":
    main()
