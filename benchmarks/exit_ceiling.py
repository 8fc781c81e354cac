"""How many layers early exit can save with a checkpoint's exit heads, and how much each measure gets.

Replays exit decisions offline (calm.eval.ceiling) on the model's own greedy summaries of the first
N test documents: the oracle (every position leaves at its first layer whose exit head agrees with
the final layer: a perfect exit decision, no token errors) and, per confidence measure and
threshold, the average layers against the token error rate. With --eval, the sequence-level results
of a `calm eval` run with the same measure are set beside the replay at the same thresholds, which
ties token errors to D = 1 - ROUGE-L(early, full). Writes JSON and Markdown to benchmarks/results/.

    python benchmarks/exit_ceiling.py calm/assets/smollm2 --docs 100 \
        --eval benchmarks/results/eval_smollm2_cpu_tau0/eval.json
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import click

from calm.errors import CalmError, InputError
from calm.eval.ceiling import MEASURES, fewest_layers, oracle_layers, replay_exits, sweep
from calm.eval.reporting import machine_info, write_json_markdown
from calm.model import CalmModel
from calm.training import summary_features

RESULTS = Path(__file__).resolve().parent / "results"
THRESHOLDS = (0.5, 0.8, 0.9, 0.95, 0.97, 0.98, 0.99, 0.995, 0.999)
ERROR_BUDGETS = (0.005, 0.01, 0.02)


def run(checkpoint: str, data: str, num_docs: int, cache: str | None, eval_json: str | None) -> dict:
    calm = CalmModel.from_pretrained(checkpoint)
    if calm.heads is None:
        raise InputError(f"{checkpoint} has no exit heads to replay")
    found = summary_features(calm, data, num_docs, cache=cache)
    replay = replay_exits(calm.adapter, calm.heads, found.features)
    curves = {m: sweep(replay, m, THRESHOLDS) for m in MEASURES}
    report = {
        "checkpoint": checkpoint,
        "data": data,
        "documents": found.documents,
        "positions": replay.positions,
        "num_layers": replay.num_layers,
        "min_exit_layer": replay.min_exit_layer,
        "oracle_layers": oracle_layers(replay),
        "curves": {m: [p.to_dict() for p in ps] for m, ps in curves.items()},
        "fewest_layers": {
            m: {str(b): (p.to_dict() if (p := fewest_layers(ps, b)) else None) for b in ERROR_BUDGETS}
            for m, ps in curves.items()
        },
        "machine": machine_info(calm.device, " ".join(["python", *sys.argv])),
    }
    if eval_json:
        report["eval"] = _eval_beside(Path(eval_json), curves)
    return report


def _eval_beside(path: Path, curves: dict) -> dict:
    data = json.loads(path.read_text())
    measure = data["config"]["measure"]
    replayed = {p.threshold: p for p in curves.get(measure, [])}
    rows = []
    for point in data["points"]:
        t = point.get("threshold")
        if t is None or t not in replayed:
            continue
        rows.append(
            {
                "threshold": t,
                "eval_avg_layers": point["avg_layers"],
                "eval_D": point["dissimilarity"],
                "replay_avg_layers": replayed[t].avg_layers,
                "replay_token_error": replayed[t].token_error,
            }
        )
    return {
        "path": str(path),
        "measure": measure,
        "decay_tau": data["config"].get("decay_tau"),
        "documents": data["n"],
        "rows": rows,
    }


def markdown(r: dict) -> str:
    L = r["num_layers"]
    lines = [
        f"# How far early exit can go: {r['checkpoint']}",
        "",
        f"{r['documents']} documents of `{r['data']}`, {r['positions']} positions of the model's own greedy "
        f"summaries (teacher-forced). Exits allowed from layer {r['min_exit_layer']} of {L}. A position's token "
        "is an error when its exit head's argmax differs from the final layer's. First-order replay: later "
        "positions see the full model's states and an error does not change what follows, so every number "
        "here is optimistic.",
        "",
        f"**Oracle** (each position leaves at its first layer whose head agrees with the final layer: a "
        f"perfect exit decision, zero token errors): **{r['oracle_layers']:.2f} layers** on average.",
        "",
        "| measure | λ | avg layers | token error | positions exiting early |",
        "|---|---:|---:|---:|---:|",
    ]
    for m, points in r["curves"].items():
        lines += [
            f"| {m} | {p['threshold']:g} | {p['avg_layers']:.2f} | {100 * p['token_error']:.2f}% | "
            f"{100 * p['exit_rate']:.1f}% |"
            for p in points
        ]
    lines += [
        "",
        "Fewest average layers within a token error budget:",
        "",
        "| measure | " + " | ".join(f"error ≤ {100 * b:g}%" for b in ERROR_BUDGETS) + " |",
        "|---|" + "---:|" * len(ERROR_BUDGETS),
    ]
    for m, by_budget in r["fewest_layers"].items():
        cells = [f"{p['avg_layers']:.2f} (λ={p['threshold']:g})" if p else "–" for p in by_budget.values()]
        lines.append(f"| {m} | " + " | ".join(cells) + " |")
    if "eval" in r:
        e = r["eval"]
        gap = max((abs(x["eval_avg_layers"] - x["replay_avg_layers"]) for x in e["rows"]), default=0.0)
        ratios = [x["eval_D"] / x["replay_token_error"] for x in e["rows"] if x["replay_token_error"] > 0]
        ratio = f"{min(ratios):.0f}–{max(ratios):.0f} times" if ratios else "a multiple of"
        lines += [
            "",
            f"Beside the sequence-level `calm eval` ({e['documents']} documents, measure {e['measure']}, "
            f"τ={e['decay_tau']:g}, `{e['path']}`): the replay's average layers are within {gap:.2f} of "
            f"the real decode's, and D is {ratio} the replayed token error, because one wrong token "
            "changes the rest of a greedy summary.",
            "",
            "| λ | eval avg layers | eval D | replay avg layers | replay token error |",
            "|---:|---:|---:|---:|---:|",
        ]
        lines += [
            f"| {x['threshold']:g} | {x['eval_avg_layers']:.2f} | {x['eval_D']:.3f} | "
            f"{x['replay_avg_layers']:.2f} | {100 * x['replay_token_error']:.2f}% |"
            for x in e["rows"]
        ]
    m = r["machine"]
    lines += ["", f"Command: `{m.get('command', '')}`", ""]
    return "\n".join(lines)


@click.command(context_settings={"help_option_names": ["-h", "--help"], "show_default": True})
@click.argument("checkpoint", type=click.Path(exists=True, file_okay=False))
@click.option("--data", default="../shared/data/xsum/test.jsonl", help="JSONL documents (never the training split).")
@click.option("--docs", "num_docs", type=int, default=100, help="Documents to summarise.")
@click.option(
    "--cache",
    type=click.Path(dir_okay=False),
    default=None,
    help="JSONL keeping the generated summaries between reports (they do not depend on the heads).",
)
@click.option(
    "--eval",
    "eval_json",
    type=click.Path(exists=True, dir_okay=False),
    default=None,
    help="eval.json of a `calm eval` run to set beside the replay.",
)
@click.option("--name", default=None, help="Output file stem [default: exit_ceiling_<checkpoint dir name>].")
@click.option("--out-dir", type=click.Path(file_okay=False), default=str(RESULTS))
def main(checkpoint, data, num_docs, cache, eval_json, name, out_dir):
    try:
        report = run(checkpoint, data, num_docs, cache, eval_json)
    except CalmError as exc:
        raise click.ClickException(str(exc)) from exc
    stem = name or f"exit_ceiling_{Path(checkpoint).resolve().name}"
    files = write_json_markdown(out_dir, stem, report, markdown(report))
    click.echo(markdown(report))
    click.echo(f"wrote {files[0]} and {files[1]}")


if __name__ == "__main__":
    main()
