"""Scoring a sweep and writing it out: eval.json (every number, the machine and the command), eval.md
(a Markdown table) and two plots, rouge_vs_layers.png and rouge_vs_speedup.png (matplotlib, Agg)."""

from __future__ import annotations

import io
import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from statistics import fmean
from typing import TYPE_CHECKING

from calm.checkpoint import write_atomic
from calm.data import Record
from calm.errors import InputError
from calm.eval.reporting import format_speedup, json_safe, machine_markdown
from calm.eval.rouge import ROUGE_TYPES, rouge_f1, rouge_l_similarity
from calm.policy import ExitPolicy

if TYPE_CHECKING:
    from calm.eval.sweep import Point

FULL = "full"  # the names of the two reference points of a sweep
TRANSFORMERS = "transformers"
FILES = ("eval.json", "eval.md", "rouge_vs_layers.png", "rouge_vs_speedup.png")
COLUMNS = (
    "point",
    "λ",
    "ROUGE-1",
    "ROUGE-2",
    "ROUGE-L",
    "D",
    "ΔROUGE-L",
    "avg layers",
    "speedup vs full",
    "speedup vs transformers",
)


@dataclass(frozen=True)
class PointMetrics:
    name: str
    label: str
    threshold: float | None
    rouge1: float  # F1 in [0, 1], mean over documents, against the references
    rouge2: float
    rougeL: float
    dissimilarity: float  # D: mean of 1 - ROUGE-L(this output, full model's output)
    same_as_full: float  # fraction of documents with token-identical output to the full model
    avg_layers: float  # mean layers per generated token
    new_tokens: int
    seconds: float  # wall clock over all documents
    speedup_vs_full: float = math.nan
    speedup_vs_transformers: float = math.nan
    delta_rougeL: float = math.nan  # R_early - R_full (ROUGE-L against the references)


@dataclass(frozen=True)
class EvalReport:
    config: dict
    n: int
    num_layers: int
    machine: dict
    points: tuple[PointMetrics, ...]

    def point(self, name: str) -> PointMetrics:
        return next(p for p in self.points if p.name == name)

    def to_dict(self) -> dict:
        return {
            "config": self.config,
            "n": self.n,
            "num_layers": self.num_layers,
            "machine": self.machine,
            "columns": list(COLUMNS),
            "points": [json_safe(asdict(p)) for p in self.points],
        }

    def to_markdown(self) -> str:
        c = self.config
        lines = [
            f"# calm eval: {c['model']} on {c['data']}",
            "",
            f"{self.n} documents, measure {c['measure']} (threshold decay "
            f"τ={c.get('decay_tau', ExitPolicy.decay_tau):g}), max {c['max_new_tokens']} new tokens, "
            f"batch size {c['batch_size']}, {self.num_layers} layers.",
            "",
            "| " + " | ".join(COLUMNS) + " |",
            "|---|" + "---:|" * (len(COLUMNS) - 1),
        ]
        lines += [_markdown_row(p) for p in self.points]
        lines += [
            "",
            "ROUGE: F1 × 100 against the reference summaries (rouge-score, stemmed). "
            "D = 1 − ROUGE-L(output, full model's output), mean over documents. "
            "ΔROUGE-L = R_early − R_full. Speedups: wall clock over the same batches, timed in the same run "
            "(– where no batch was).",
            "",
        ]
        return "\n".join(lines + machine_markdown(self.machine))


def build_report(
    records: Sequence[Record],
    rows: Mapping[str, Mapping[str, dict]],
    points: Sequence[Point],
    config: dict,
    num_layers: int,
    machine: dict,
) -> EvalReport:
    """Score every point's cached outputs against the references and the full model's outputs."""
    ids = [r.id for r in records]
    for point in points:
        missing = [i for i in ids if i not in rows[point.name]]
        if missing:
            raise InputError(
                f"the cache lacks {len(missing)} outputs of {point.label} (e.g. id {missing[0]!r}); "
                "run calm eval again to compute them"
            )
    references = {r.id: r.summary or "" for r in records}
    full = rows[FULL]
    scored = [
        _score(p, [rows[p.name][i] for i in ids], [full[i] for i in ids], [references[i] for i in ids]) for p in points
    ]
    base = next(s for s in scored if s.name == FULL)
    hf = rows.get(TRANSFORMERS)
    scored = [
        replace(
            s,
            speedup_vs_full=timed_speedup([full[i] for i in ids], [rows[s.name][i] for i in ids]),
            speedup_vs_transformers=(
                timed_speedup([hf[i] for i in ids], [rows[s.name][i] for i in ids]) if hf else math.nan
            ),
            delta_rougeL=s.rougeL - base.rougeL,
        )
        for s in scored
    ]
    return EvalReport(config=config, n=len(ids), num_layers=num_layers, machine=machine, points=tuple(scored))


def write_report(report: EvalReport, out_dir: str | Path) -> list[Path]:
    """eval.json, eval.md and the two plots, each written atomically."""
    out = Path(out_dir)
    contents = (
        json.dumps(report.to_dict(), indent=2).encode(),
        report.to_markdown().encode(),
        plot_rouge_vs_layers(report),
        plot_rouge_vs_speedup(report),
    )
    for name, data in zip(FILES, contents):
        write_atomic(out / name, data)
    return [out / name for name in FILES]


def plot_rouge_vs_layers(report: EvalReport) -> bytes:
    """ROUGE-1/2/L against average layers per token, one marker per threshold (PNG bytes)."""
    fig, ax = _figure()
    points = sorted(_engine_points(report), key=lambda p: p.avg_layers)
    for key, name in zip(ROUGE_TYPES, ("ROUGE-1", "ROUGE-2", "ROUGE-L")):
        ax.plot([p.avg_layers for p in points], [100 * getattr(p, key) for p in points], marker="o", label=name)
    _annotate(ax, [(p.avg_layers, 100 * p.rougeL, p) for p in points])
    ax.set_xlabel(f"average layers per token (of {report.num_layers})")
    ax.set_ylabel("ROUGE F1 × 100")
    ax.set_title(f"ROUGE vs depth ({report.config['measure']}, n={report.n})")
    return _png(fig, ax)


def plot_rouge_vs_speedup(report: EvalReport) -> bytes:
    """ROUGE-L against wall-clock speedup, over full depth and over transformers generate (PNG bytes)."""
    fig, ax = _figure()
    points = sorted(_engine_points(report), key=lambda p: -p.avg_layers)  # from full depth to the earliest exits
    ax.plot(
        [p.speedup_vs_full for p in points],
        [100 * p.rougeL for p in points],
        marker="o",
        label="speedup over full depth (same engine)",
    )
    if not math.isnan(points[0].speedup_vs_transformers):
        ax.plot(
            [p.speedup_vs_transformers for p in points],
            [100 * p.rougeL for p in points],
            marker="s",
            linestyle="--",
            label="speedup over transformers generate",
        )
    _annotate(ax, [(p.speedup_vs_full, 100 * p.rougeL, p) for p in points])
    ax.axhline(100 * report.point(FULL).rougeL, color="grey", linewidth=0.8, linestyle=":")
    ax.set_xlabel("speedup (×)")
    ax.set_ylabel("ROUGE-L F1 × 100")
    ax.set_title(f"ROUGE-L vs speedup ({report.config['measure']}, n={report.n})")
    return _png(fig, ax)


def timed_speedup(base: Sequence[dict], rows: Sequence[dict], key: str = "seconds") -> float:
    """Wall clock of `base` over that of `rows` (per-example outputs, paired), counting only the
    examples both timed in the same run: a resumed sweep must not compare timings taken by another
    process, engine version or machine load. key: "seconds" (the whole generate call), or
    "decode_seconds" / "prefill_seconds" where the rows time them apart. NaN where no example qualifies."""
    pairs = [
        (b, r)
        for b, r in zip(base, rows)
        if b.get("run") is not None and b.get("run") == r.get("run") and key in b and key in r
    ]
    total = sum(r[key] for _, r in pairs)
    return sum(b[key] for b, _ in pairs) / total if pairs and total > 0 else math.nan


def _score(point: Point, outputs: list[dict], full: list[dict], references: list[str]) -> PointMetrics:
    rouge = [rouge_f1(o["summary"], ref) for o, ref in zip(outputs, references)]
    tokens = sum(len(o["exit_layers"]) for o in outputs)
    return PointMetrics(
        name=point.name,
        label=point.label,
        threshold=point.threshold,
        **{key: fmean(r[key] for r in rouge) for key in ROUGE_TYPES},
        dissimilarity=fmean(1.0 - rouge_l_similarity(o["summary"], f["summary"]) for o, f in zip(outputs, full)),
        same_as_full=fmean(float(o["token_ids"] == f["token_ids"]) for o, f in zip(outputs, full)),
        avg_layers=sum(sum(o["exit_layers"]) for o in outputs) / tokens if tokens else math.nan,
        new_tokens=tokens,
        seconds=sum(o["seconds"] for o in outputs),
    )


def _engine_points(report: EvalReport) -> list[PointMetrics]:
    """The full model and the thresholds (transformers generate is a timing baseline, not a point)."""
    return [p for p in report.points if p.name != TRANSFORMERS]


def _markdown_row(p: PointMetrics) -> str:
    cells = [
        p.label,
        "–" if p.threshold is None else f"{p.threshold:g}",
        f"{100 * p.rouge1:.2f}",
        f"{100 * p.rouge2:.2f}",
        f"{100 * p.rougeL:.2f}",
        f"{p.dissimilarity:.3f}",
        f"{100 * p.delta_rougeL:+.2f}",
        f"{p.avg_layers:.2f}",
        format_speedup(p.speedup_vs_full),
        format_speedup(p.speedup_vs_transformers),
    ]
    return "| " + " | ".join(cells) + " |"


def _figure():
    from matplotlib.figure import Figure  # the object API renders with Agg; no pyplot, no global state

    fig = Figure(figsize=(6.4, 4.4), dpi=110)
    return fig, fig.add_subplot()


def _annotate(ax, xy_points) -> None:
    for x, y, p in xy_points:
        ax.annotate(
            "full" if p.threshold is None else f"λ={p.threshold:g}",
            (x, y),
            textcoords="offset points",
            xytext=(4, 4),
            fontsize=7,
        )


def _png(fig, ax) -> bytes:
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    return buffer.getvalue()
