"""Issue-19 report: CALM's validation protocol for both consistency objectives.

K random 80/20 splits of calib ∪ test: on each, Learn-then-Test certifies a threshold on the 80% part for
every tolerance δ and objective (textual: D = 1 − ROUGE-L(early, full); risk: max(0, R_full − R_early),
R = ROUGE-L against the references), and the 20% part checks it: a violation is a test mean loss above
δ, which must happen in at most ε of the splits. Also reported per δ and objective: the mean certified λ,
average layers and decode speedup over full depth on the test part (nothing certified: the full model,
30 layers, 1×), and, per threshold, the losses pooled over every document.

The per-example losses come from one sweep per part, computed once: the sweeps resume from the same
caches as `calm calibrate --work-dir` and `calm eval --out` (the same settings and points), and the losses
are kept in --losses (written atomically; a rerun with the same settings reads it and loads no model).
The splits only re-run Learn-then-Test.

Usage: python benchmarks/calibration_splits.py --model calm/assets/smollm2 \
           --calib ../shared/data/xsum/calib.jsonl --calib-limit 120 --calib-dir build/calibrate-smollm2 \
           --test ../shared/data/xsum/test.jsonl --test-limit 100 --test-dir build/eval-smollm2-test-risk \
           --losses build/calibration-splits-losses.json --out benchmarks/results
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import numpy as np

from calm.calibration.table import CONSISTENCIES, fixed_sequence_test
from calm.checkpoints.checkpoint import write_atomic
from calm.eval.report import FULL
from calm.eval.reporting import format_speedup, json_safe, machine_info, machine_markdown, write_json_markdown
from calm.prompts.documents import read_jsonl


def settings(args) -> dict:
    """What the losses depend on (the model's calibration settings and the two parts)."""
    config = json.loads((Path(args.model) / "calm_config.json").read_text())["calibration"]
    keys = ("measure", "decay_tau", "max_new_tokens", "max_doc_tokens", "min_exit_layer")
    return {
        "model": args.model,
        "thresholds": args.thresholds or [r["threshold"] for r in config["rows"]],
        **{k: config.get(k) for k in keys},
        "parts": {
            "calib": [args.calib, args.calib_limit, args.calib_dir],
            "test": [args.test, args.test_limit, args.test_dir],
        },
    }


def part_losses(model, records, meta: dict, work_dir: str) -> dict:
    """Per-example losses, layers and decode seconds at every threshold, from the (resumed) sweep."""
    from calm.eval.calibrate import consistency_losses
    from calm.eval.sweep import EvalConfig, run_sweep

    config = EvalConfig(
        model=meta["model"],
        data=meta["data"],
        thresholds=tuple(meta["thresholds"]),
        measure=meta["measure"],
        min_exit_layer=meta["min_exit_layer"] or 1,
        decay_tau=meta["decay_tau"],
        max_new_tokens=meta["max_new_tokens"],
        max_doc_tokens=meta["max_doc_tokens"],
        with_transformers=False,
    )
    rows = run_sweep(model, records, config, work_dir)
    early = [p.name for p in config.for_model(model).points() if p.name != FULL]
    losses = consistency_losses(records, rows, early)
    examples = []
    for i, r in enumerate(records):
        full, outs = rows[FULL][r.id], [rows[p][r.id] for p in early]
        timed = [o.get("run") == full.get("run") and "decode_seconds" in o for o in outs]  # in the same run
        examples.append(
            {
                "id": r.id,
                "textual": losses.textual[:, i].tolist(),
                "risk": losses.risk[:, i].tolist(),
                "tokens": [len(o["exit_layers"]) for o in outs],
                "layer_sum": [sum(o["exit_layers"]) for o in outs],
                "full_tokens": len(full["exit_layers"]),
                "decode_s": [o["decode_seconds"] if t else None for o, t in zip(outs, timed)],
                "full_decode_s": full.get("decode_seconds"),
            }
        )
    return {"examples": examples}


def load_losses(args, meta: dict) -> dict:
    path = Path(args.losses)
    if path.is_file():
        cached = json.loads(path.read_text())
        if cached.get("settings") == meta:
            return cached
        print(f"{path} holds losses of other settings: computing them again", file=sys.stderr)
    from calm import CalmModel

    model = CalmModel.from_pretrained(args.model)
    parts = {}
    for name, (data, limit, work_dir) in meta["parts"].items():
        records = read_jsonl(data, require_summary=True, limit=limit)
        parts[name] = part_losses(model, records, {**meta, "data": data}, work_dir)
    cached = {"settings": meta, "num_layers": model.num_layers, "parts": parts}
    write_atomic(path, json.dumps(cached).encode())
    return cached


def pooled(cached: dict) -> dict[str, np.ndarray]:
    """Every document of both parts: losses [K, n] per objective, layers, tokens and decode seconds."""
    examples = [e for part in cached["parts"].values() for e in part["examples"]]
    return {
        "textual": np.array([e["textual"] for e in examples]).T,
        "risk": np.array([e["risk"] for e in examples]).T,
        "layer_sum": np.array([e["layer_sum"] for e in examples], dtype=float).T,
        "tokens": np.array([e["tokens"] for e in examples], dtype=float).T,
        "full_tokens": np.array([e["full_tokens"] for e in examples], dtype=float),
        "decode_s": np.array([[math.nan if x is None else x for x in e["decode_s"]] for e in examples]).T,
        "full_decode_s": np.array([math.nan if e["full_decode_s"] is None else e["full_decode_s"] for e in examples]),
    }


def depth_and_speed(data: dict, index: int | None, idx: np.ndarray, num_layers: int) -> tuple[float, float]:
    """Average layers per token and decode speedup over full depth of threshold `index` on documents idx
    (None: nothing certified, the full model)."""
    if index is None:
        return float(num_layers), 1.0
    layers = data["layer_sum"][index, idx].sum() / data["tokens"][index, idx].sum()
    timed = idx[~np.isnan(data["full_decode_s"][idx]) & ~np.isnan(data["decode_s"][index, idx])]
    point = data["decode_s"][index, timed].sum()
    return float(layers), float(data["full_decode_s"][timed].sum() / point) if point > 0 else math.nan


def run_splits(data: dict, thresholds: list[float], args, num_layers: int) -> list[dict]:
    n = data["textual"].shape[1]
    rng = np.random.default_rng(args.seed)
    splits = [rng.permutation(n) for _ in range(args.splits)]
    cut = int(round(args.calib_share * n))
    rows = []
    for consistency in CONSISTENCIES:
        losses = data[consistency]
        for delta in args.deltas:
            per_split = []
            for perm in splits:
                cal, test = perm[:cut], perm[cut:]
                index = fixed_sequence_test(losses[:, cal], delta, args.epsilon).certified_index
                test_loss = 0.0 if index is None else float(losses[index, test].mean())
                layers, speedup = depth_and_speed(data, index, test, num_layers)
                lam = math.nan if index is None else thresholds[index]
                per_split.append((test_loss, lam, layers, speedup, index is not None))
            rows.append(summarise(consistency, delta, args.epsilon, per_split))
    return rows


def summarise(consistency: str, delta: float, epsilon: float, per_split: list[tuple]) -> dict:
    test_loss, lam, layers, speedup, certified = (np.array(column, dtype=float) for column in zip(*per_split))
    violations = int((test_loss > delta).sum())
    return {
        "consistency": consistency,
        "delta": delta,
        "epsilon": epsilon,
        "splits": len(per_split),
        "violations": violations,
        "violation_rate": violations / len(per_split),
        "within_epsilon": violations / len(per_split) <= epsilon,
        "certified_share": float(certified.mean()),
        "mean_lambda": float(np.nanmean(lam)) if certified.any() else math.nan,
        "mean_test_loss": float(test_loss.mean()),
        "max_test_loss": float(test_loss.max()),
        "mean_layers": float(layers.mean()),
        "mean_decode_speedup": float(np.nanmean(speedup)),
    }


def threshold_rows(data: dict, thresholds: list[float], num_layers: int) -> list[dict]:
    everyone = np.arange(data["textual"].shape[1])
    rows = []
    for k, t in enumerate(thresholds):
        layers, speedup = depth_and_speed(data, k, everyone, num_layers)
        rows.append(
            {
                "threshold": t,
                "mean_textual": float(data["textual"][k].mean()),
                "mean_risk": float(data["risk"][k].mean()),
                "risk_nonzero_share": float((data["risk"][k] > 0).mean()),
                "avg_layers": layers,
                "decode_speedup": speedup,
            }
        )
    return rows


SPLIT_COLUMNS = (
    "objective", "δ", "violations", "rate", "≤ ε", "certified in", "mean λ", "mean test loss", "max test loss",
    "avg layers", "decode speedup",
)  # fmt: skip
THRESHOLD_COLUMNS = ("λ", "mean D (textual)", "mean risk", "documents with risk > 0", "avg layers", "decode speedup")
NOTE = (
    "A violation: the test part's mean loss above δ. Layers and decode speedup (prefill excluded) are the "
    "certified threshold's on each split's test part; where nothing is certified the knob runs the full "
    "model (30 layers, 1×, loss 0). Decode speedups count only documents whose full-depth and threshold "
    "outputs were timed in the same run (the same batch)."
)


def split_cells(r: dict) -> list[str]:
    return [
        r["consistency"],
        f"{r['delta']:g}",
        f"{r['violations']}/{r['splits']}",
        f"{r['violation_rate']:.2f}",
        "yes" if r["within_epsilon"] else "**no**",
        f"{100 * r['certified_share']:.0f}%",
        "–" if r["mean_lambda"] is None else f"{r['mean_lambda']:.3f}",
        f"{r['mean_test_loss']:.4f}",
        f"{r['max_test_loss']:.4f}",
        f"{r['mean_layers']:.2f}",
        format_speedup(r["mean_decode_speedup"] or math.nan),
    ]


def threshold_cells(r: dict) -> list[str]:
    return [
        f"{r['threshold']:g}",
        f"{r['mean_textual']:.4f}",
        f"{r['mean_risk']:.4f}",
        f"{100 * r['risk_nonzero_share']:.0f}%",
        f"{r['avg_layers']:.2f}",
        format_speedup(r["decode_speedup"] or math.nan),
    ]


def table(columns: tuple[str, ...], cells: list[list[str]]) -> list[str]:
    """A Markdown table: text columns left, numbers right."""
    align = ["---" if i == 0 else "---:" for i in range(len(columns))]
    return ["| " + " | ".join(row) + " |" for row in (list(columns), align, *cells)]


def markdown(report: dict) -> str:
    s, share = report["settings"], round(100 * report["calib_share"])
    grid = ", ".join(f"{t:g}" for t in s["thresholds"])
    intro = (
        f"{report['splits']} random {share}/{100 - share} splits of {report['n']} documents (calib ∪ test: "
        f"{report['n_calib']} of `{s['parts']['calib'][0]}` and {report['n_test']} of `{s['parts']['test'][0]}`), "
        f"measure {s['measure']} (τ={s['decay_tau']:g}), max {s['max_new_tokens']} new tokens, documents cut to "
        f"{s['max_doc_tokens']} tokens, Learn-then-Test (hb, ε = {report['epsilon']:g}) over λ ∈ {{{grid}}}."
    )
    return "\n".join(
        [f"# Calibration splits: {s['model']}, textual and risk consistency", "", intro, ""]
        + table(SPLIT_COLUMNS, [split_cells(r) for r in report["rows"]])
        + ["", NOTE, "", "Per threshold, over all documents:", ""]
        + table(THRESHOLD_COLUMNS, [threshold_cells(r) for r in report["thresholds"]])
        + ["", *machine_markdown(report["machine"])]
    )


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    meta = settings(args)
    cached = load_losses(args, meta)
    data = pooled(cached)
    num_layers = int(cached["num_layers"])
    report = {
        "settings": meta,
        "n": int(data["textual"].shape[1]),
        "n_calib": len(cached["parts"]["calib"]["examples"]),
        "n_test": len(cached["parts"]["test"]["examples"]),
        "splits": args.splits,
        "calib_share": args.calib_share,
        "epsilon": args.epsilon,
        "seed": args.seed,
        "rows": run_splits(data, meta["thresholds"], args, num_layers),
        "thresholds": threshold_rows(data, meta["thresholds"], num_layers),
        "machine": machine_info("cpu", "python " + " ".join(sys.argv)),
    }
    report = json_safe(report)
    files = write_json_markdown(args.out, args.stem, report, markdown(report))
    print(markdown(report))
    print("wrote " + ", ".join(map(str, files)), file=sys.stderr)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="calm/assets/smollm2")
    p.add_argument("--calib", default="../shared/data/xsum/calib.jsonl")
    p.add_argument("--calib-limit", type=int, default=120)
    p.add_argument("--calib-dir", default="build/calibrate-smollm2")
    p.add_argument("--test", default="../shared/data/xsum/test.jsonl")
    p.add_argument("--test-limit", type=int, default=100)
    p.add_argument("--test-dir", default="build/eval-smollm2-test-risk")
    p.add_argument("--losses", default="build/calibration-splits-losses.json")
    p.add_argument(
        "--thresholds",
        type=lambda v: [float(x) for x in v.split(",")],
        default=None,
        help="the λ grid, most conservative first (default: the model's calibration table's)",
    )
    p.add_argument("--splits", type=int, default=50)
    p.add_argument("--calib-share", type=float, default=0.8)
    p.add_argument("--deltas", type=lambda v: [float(x) for x in v.split(",")], default=[0.025, 0.05, 0.1, 0.2])
    p.add_argument("--epsilon", type=float, default=0.05)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="benchmarks/results")
    p.add_argument("--stem", default="calibration_splits_smollm2")
    return p.parse_args(argv)


if __name__ == "__main__":
    main()
