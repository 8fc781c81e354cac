"""Scoring a sweep and writing it out: eval.json (every number, the machine and the command), eval.md
(a Markdown table, time split into prefill and decode) and two plots, rouge_vs_layers.png and
rouge_vs_speedup.png (calm.eval.plots)."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, replace
from statistics import fmean
from typing import TYPE_CHECKING

from calm.errors import InputError
from calm.eval.reporting import format_speedup, json_safe, machine_markdown
from calm.eval.rouge import ROUGE_TYPES, rouge_f1, rouge_l_similarity
from calm.exits.policy import ExitPolicy
from calm.prompts.documents import Record

if TYPE_CHECKING:
    from calm.eval.point import Point

FULL = "full"  # the names of the reference points of a sweep
TRANSFORMERS = "transformers"
LOSSLESS = "lossless"
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
    "prefill s",
    "decode s",
    "decode speedup vs full",
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
    kind: str = "adaptive"  # full, adaptive, static, lossless, speculative or transformers
    prefill_seconds: float = math.nan  # of `seconds`: the prompts (NaN where not timed apart)
    decode_seconds: float = math.nan  # the tokens after each output's first, where exits save layers
    decode_speedup_vs_full: float = math.nan


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
            "ΔROUGE-L = R_early − R_full. Average layers count every token, the first (made by the prefill at "
            "full depth) too, as it runs; a static exit at layer k therefore averages a little above k. "
            "Time is split into prefill (the prompts and each output's first token) and decode (the rest, "
            "where exits save layers); speedups: wall clock over the same batches, timed in the same run "
            "(– where no batch was). The lossless point is exactly the full model's output.",
            "",
        ]
        if c.get("lossless_run"):
            lines += [f"Lossless at batch size {c['batch_size']}: {c['lossless_run']}.", ""]
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
            decode_speedup_vs_full=timed_speedup(
                [full[i] for i in ids], [rows[s.name][i] for i in ids], "decode_seconds"
            ),
            delta_rougeL=s.rougeL - base.rougeL,
        )
        for s in scored
    ]
    return EvalReport(config=config, n=len(ids), num_layers=num_layers, machine=machine, points=tuple(scored))


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
        kind=point.kind,
        prefill_seconds=_total(outputs, "prefill_seconds"),
        decode_seconds=_total(outputs, "decode_seconds"),
    )


def _total(outputs: list[dict], key: str) -> float:
    """The sum of a timing every output has; NaN where one lacks it (transformers, older caches)."""
    return sum(o[key] for o in outputs) if all(key in o for o in outputs) else math.nan


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
        _seconds(p.prefill_seconds),
        _seconds(p.decode_seconds),
        format_speedup(p.decode_speedup_vs_full),
        format_speedup(p.speedup_vs_full),
        format_speedup(p.speedup_vs_transformers),
    ]
    return "| " + " | ".join(cells) + " |"


def _seconds(value: float) -> str:
    return "–" if math.isnan(value) else f"{value:.1f}"
