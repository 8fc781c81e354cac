"""Does a richer exit classifier get closer to the oracle? (issue #10, remedy "richer features")

Replays exit decisions (calm.eval.ceiling) on the model's own greedy summaries and fits logistic
regressions over exit features (calm.eval.exit_features) on summaries of TRAIN documents, then
scores them on TEST documents beside the checkpoint's trained classifier and the softmax margin:
the fewest average layers each reaches within a token error budget, and the oracle.

    python benchmarks/exit_features.py benchmarks/checkpoints/smollm2-lora-s800 --train-docs 100 --test-docs 100 \
        --train-cache build/lora-train-summaries.jsonl --test-cache build/lora-summaries.jsonl
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import click

from calm.eval.ceiling import ExitReplay, fewest_layers, oracle_layers, sweep
from calm.eval.exit_features import ALL, CHEAP, HEAD, ExitFeatures, exit_features, fit_exit_model, score_exit_model
from calm.eval.reporting import machine_info, write_json_markdown
from calm.model import CalmModel
from calm.training import summary_features

RESULTS = Path(__file__).resolve().parent / "results"
BUDGETS = (0.0025, 0.005, 0.01, 0.02)
THRESHOLDS = tuple(sorted({round(1 - 10 ** (-e / 8), 6) for e in range(2, 33)} | {0.5, 0.6, 0.7, 0.8, 0.9}))
FEATURE_SETS = {"cheap (no vocabulary)": CHEAP, "head (full vocabulary)": HEAD, "all": ALL}


def replay_of(f: ExitFeatures, scores: dict) -> ExitReplay:
    return ExitReplay(f.agree, scores, f.num_layers, f.min_exit_layer)


def features_for(calm: CalmModel, data: str, docs: int, cache: str | None) -> ExitFeatures:
    found = summary_features(calm, data, docs, cache=cache)
    return exit_features(calm.adapter, calm.heads, found.features)


def run(
    checkpoint: str,
    train_data: str,
    test_data: str,
    train_docs: int,
    test_docs: int,
    train_cache: str | None,
    test_cache: str | None,
) -> dict:
    t0 = time.perf_counter()
    calm = CalmModel.from_pretrained(checkpoint)
    train = features_for(calm, train_data, train_docs, train_cache)
    test = features_for(calm, test_data, test_docs, test_cache)
    scores = {
        "classifier (trained head)": test.select(("classifier_logit",))[..., 0].sigmoid(),
        "softmax margin": test.select(("margin",))[..., 0],
    }
    models = {}
    for name, names in FEATURE_SETS.items():
        model = fit_exit_model(train, names)
        scores[f"logistic: {name}"] = score_exit_model(model, test)
        models[name] = dict(zip(model.names, model.weight.tolist()))
    replay = replay_of(test, scores)
    curves = {m: sweep(replay, m, THRESHOLDS) for m in scores}
    return {
        "checkpoint": checkpoint,
        "train_data": train_data,
        "test_data": test_data,
        "train_positions": train.agree.shape[0],
        "test_positions": test.agree.shape[0],
        "num_layers": test.num_layers,
        "min_exit_layer": test.min_exit_layer,
        "oracle_layers": oracle_layers(replay),
        "weights": models,
        "fewest_layers": {
            m: {str(b): (p.to_dict() if (p := fewest_layers(ps, b)) else None) for b in BUDGETS}
            for m, ps in curves.items()
        },
        "seconds": time.perf_counter() - t0,
        "machine": machine_info(calm.device, " ".join(["python", *sys.argv])),
    }


def markdown(r: dict) -> str:
    lines = [
        f"# Richer exit features: {r['checkpoint']}",
        "",
        f"Logistic regressions fitted on {r['train_positions']} positions of the model's own greedy summaries "
        f"of `{r['train_data']}`, scored on {r['test_positions']} positions of `{r['test_data']}` "
        f"(teacher-forced first-order replay, exits from layer {r['min_exit_layer']} of {r['num_layers']}; "
        "see exit_ceiling reports). Features: cheap = the trained classifier's logit, cosine of consecutive "
        "layers' states, the layer; head = the exit head's top-1 probability, top-1 − top-2 margin, entropy, "
        "and whether layers k−1 (and k−2) gave the same argmax (needs the full-vocabulary head at every check).",
        "",
        f"**Oracle: {r['oracle_layers']:.2f} layers.** Fewest average layers within a token error budget:",
        "",
        "| exit decision | " + " | ".join(f"error ≤ {100 * b:g}%" for b in BUDGETS) + " |",
        "|---|" + "---:|" * len(BUDGETS),
    ]
    for m, by_budget in r["fewest_layers"].items():
        cells = [f"{p['avg_layers']:.2f}" if p else "–" for p in by_budget.values()]
        lines.append(f"| {m} | " + " | ".join(cells) + " |")
    lines += ["", "Standardised weights:", ""]
    for name, weights in r["weights"].items():
        lines.append(f"- {name}: " + ", ".join(f"{k} {v:+.2f}" for k, v in weights.items()))
    lines += ["", f"Command: `{r['machine'].get('command', '')}` ({r['seconds'] / 60:.1f} min)", ""]
    return "\n".join(lines)


@click.command(context_settings={"help_option_names": ["-h", "--help"], "show_default": True})
@click.argument("checkpoint", type=click.Path(exists=True, file_okay=False))
@click.option("--train-data", default="../shared/data/xsum/train.jsonl")
@click.option("--test-data", default="../shared/data/xsum/test.jsonl")
@click.option("--train-docs", type=int, default=100)
@click.option("--test-docs", type=int, default=100)
@click.option("--train-cache", type=click.Path(dir_okay=False), default=None)
@click.option("--test-cache", type=click.Path(dir_okay=False), default=None)
@click.option("--name", default=None, help="Output file stem [default: exit_features_<checkpoint dir name>].")
@click.option("--out-dir", type=click.Path(file_okay=False), default=str(RESULTS))
def main(checkpoint, train_data, test_data, train_docs, test_docs, train_cache, test_cache, name, out_dir):
    report = run(checkpoint, train_data, test_data, train_docs, test_docs, train_cache, test_cache)
    stem = name or f"exit_features_{Path(checkpoint).resolve().name}"
    files = write_json_markdown(out_dir, stem, report, markdown(report))
    click.echo(markdown(report))
    click.echo(f"wrote {files[0]} and {files[1]}")


if __name__ == "__main__":
    main()
