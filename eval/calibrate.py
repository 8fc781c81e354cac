"""`calm calibrate`: choose the fastest threshold that Learn-then-Test certifies.

Every calibration document is summarised at full depth and at each threshold of a grid (through the
resumable sweep of calm.eval.sweep). One sweep gives both of CALM's losses of an example at threshold λ:
its textual inconsistency D = 1 − ROUGE-L(early output, full output), and, where the documents have
reference summaries, its risk inconsistency max(0, R_full − R_early), R = ROUGE-L F1 against the
references. Fixed-sequence testing runs from the most conservative threshold down with
Hoeffding–Bentkus p-values (calm.calibration.table), for each objective, and the resulting table (mean and
quantiles of both losses, average layers, measured speedup, p-values) is stored in the calm checkpoint,
where the `speed` and `tolerance` knobs read it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from statistics import fmean

import numpy as np

from calm.calibration.table import (
    CONSISTENCIES,
    MIN_CALIBRATION_DOCUMENTS,
    RISK,
    TEXTUAL,
    CalibrationTable,
    build_calibration_table,
    fixed_sequence_test,
)
from calm.checkpoints.checkpoint import is_checkpoint, read_config
from calm.errors import InputError
from calm.eval.grids import DEFAULT_GRID
from calm.eval.progress import ProgressCallback
from calm.eval.report import FULL, timed_speedup
from calm.eval.reporting import format_speedup
from calm.eval.rouge import risk_loss, textual_loss
from calm.eval.sweep import EvalConfig, run_sweep
from calm.exits.policy import ExitPolicy
from calm.model import CalmModel
from calm.prompts.documents import Record


@dataclass(frozen=True)
class CalibrateConfig:
    model: str
    data: str
    delta: float = 0.1
    epsilon: float = 0.05
    method: str = "hb"
    thresholds: tuple[float, ...] = DEFAULT_GRID  # most conservative (highest λ) first
    measure: str | None = None
    min_exit_layer: int | None = None  # None: the model's exit floor (calm.engine.decode.exit_floor)
    max_new_tokens: int = 64
    batch_size: int = 8
    document_field: str = "document"
    limit: int | None = None
    max_doc_tokens: int | None = None
    decay_tau: float = ExitPolicy.decay_tau  # τ of CALM's decaying threshold; 0: λ stays fixed
    consistency: str = TEXTUAL  # the objective the summary line reports (the table holds both)

    def __post_init__(self) -> None:
        if self.consistency not in CONSISTENCIES:
            raise InputError(f"consistency must be one of {', '.join(CONSISTENCIES)}, got {self.consistency!r}")
        if not self.decay_tau >= 0:
            raise InputError(f"decay_tau must be >= 0, got {self.decay_tau}")
        if not (0 < self.delta < 1 and 0 < self.epsilon < 1):
            raise InputError(f"delta and epsilon must lie in (0, 1), got δ={self.delta:g}, ε={self.epsilon:g}")
        if list(self.thresholds) != sorted(set(self.thresholds), reverse=True):
            raise InputError(
                "calibration thresholds must be distinct and listed from the most conservative "
                "(highest) down, e.g. 0.99,0.95,0.9,0.8"
            )
        self.sweep()  # the sweep's own checks (thresholds in [0, 1], ...) up front

    def sweep(self) -> EvalConfig:
        return EvalConfig(
            model=self.model,
            data=self.data,
            thresholds=self.thresholds,
            measure=self.measure,
            min_exit_layer=self.min_exit_layer,
            max_new_tokens=self.max_new_tokens,
            batch_size=self.batch_size,
            document_field=self.document_field,
            summary_field="summary",
            limit=self.limit,
            max_doc_tokens=self.max_doc_tokens,
            decay_tau=self.decay_tau,
            with_transformers=False,
        )


@dataclass(frozen=True)
class CalibrationRun:
    table: CalibrationTable
    measure: str
    summary: str

    def table_markdown(self) -> str:
        t = self.table
        risk = t.has_risk
        head = "| λ | mean D | D q50 | D q90 | D q95 | avg layers | speedup | p-value | certified (textual) |"
        lines = [
            head + (" mean risk | risk q90 | risk p-value | certified (risk) |" if risk else ""),
            "|---:|---:|---:|---:|---:|---:|---:|---:|:---:|" + ("---:|---:|---:|:---:|" if risk else ""),
        ]
        for i, r in enumerate(t.rows):
            line = (
                f"| {r.threshold:g} | {r.mean_loss:.3f} | {r.q50:.3f} | {r.q90:.3f} | {r.q95:.3f} | "
                f"{r.avg_layers:.2f} | {format_speedup(r.speedup)} | {r.pvalue:.3g} | {_mark(t.certified_index, i)} |"
            )
            if r.risk_mean_loss is not None:
                line += (
                    f" {r.risk_mean_loss:.3f} | {r.risk_q90:.3f} | {r.risk_pvalue:.3g} | "
                    f"{_mark(t.risk_certified_index, i)} |"
                )
            lines.append(line)
        return "\n".join(lines)

    def checkpoint_table(self, config: CalibrateConfig) -> CalibrationTable:
        """The table as a calm checkpoint keeps it: with the settings the knob needs to rebuild the policy."""
        return replace(
            self.table,
            measure=self.measure,
            min_exit_layer=config.min_exit_layer,
            decay_tau=config.decay_tau,
            max_new_tokens=config.max_new_tokens,
            max_doc_tokens=config.max_doc_tokens,
            data=str(config.data),
        )


def calibrate(
    model: CalmModel,
    records: Sequence[Record],
    config: CalibrateConfig,
    work_dir: str | Path,
    resume: bool = True,
    progress: ProgressCallback | None = None,
) -> CalibrationRun | None:
    """Run the sweep on the calibration records and certify a threshold for each objective (risk where
    every record has a reference summary); None on non-main processes."""
    with_risk = all(r.all_references for r in records)
    if config.consistency == RISK and not with_risk:
        raise InputError(
            "risk consistency scores outputs against reference summaries, and some calibration documents have "
            "none; give data with a 'summary' field (a string or a list of them) or use --consistency textual"
        )
    sweep = config.sweep().for_model(model)
    rows = run_sweep(model, records, sweep, work_dir, resume, progress)
    if rows is None:
        return None
    early = [p for p in sweep.points() if p.name != FULL]
    sweep_losses = consistency_losses(records, rows, [p.name for p in early], with_risk)
    ltt = fixed_sequence_test(sweep_losses.textual, config.delta, config.epsilon, config.method)
    table = build_calibration_table(
        [p.threshold for p in early],
        sweep_losses.textual,
        sweep_losses.avg_layers,
        sweep_losses.speedup,
        ltt,
        sweep_losses.risk,
    )
    summary = _summary(table, sweep.measure, len(records), config.consistency)
    return CalibrationRun(table=table, measure=sweep.measure, summary=summary)


@dataclass(frozen=True)
class SweepLosses:
    """Per-example losses of a sweep's early points ([K, n] each; risk None without references), and each
    point's average layers, wall-clock speedup and decode-only speedup over the full model."""

    textual: np.ndarray
    risk: np.ndarray | None
    avg_layers: tuple[float, ...]
    speedup: tuple[float, ...]
    decode_speedup: tuple[float, ...]


def consistency_losses(
    records: Sequence[Record], rows: dict[str, dict[str, dict]], points: Sequence[str], with_risk: bool = True
) -> SweepLosses:
    """Both of CALM's losses for every record at every named point, from one sweep's cached outputs."""
    ids = [r.id for r in records]
    refs = [r.all_references for r in records]
    full = [rows[FULL][i]["summary"] for i in ids]
    outputs = [[rows[p][i] for i in ids] for p in points]
    textual = np.array([[textual_loss(o["summary"], f) for o, f in zip(out, full)] for out in outputs])
    risk = (
        np.array([[risk_loss(o["summary"], f, ref) for o, f, ref in zip(out, full, refs)] for out in outputs])
        if with_risk
        else None
    )
    base = [rows[FULL][i] for i in ids]
    return SweepLosses(
        textual,
        risk,
        tuple(_avg_layers(out) for out in outputs),
        tuple(timed_speedup(base, out) for out in outputs),
        tuple(timed_speedup(base, out, "decode_seconds") for out in outputs),
    )


def _avg_layers(outputs: list[dict]) -> float:
    layers = [k for o in outputs for k in o["exit_layers"]]
    return fmean(layers) if layers else float("nan")


def check_target(out: str | Path, overwrite: bool) -> None:
    """Refuse to replace the calibration of the checkpoint in `out` (the shipped one included) unless asked."""
    if overwrite or not is_checkpoint(out):
        return
    table = read_config(out).calibration
    if table is not None:
        raise InputError(
            f"{out} already holds a calibration (n={table.n} documents); pass --overwrite to replace it, "
            "or write to another --out"
        )


def _mark(certified: int | None, i: int) -> str:
    return "yes" if certified is not None and i <= certified else ""


def _summary(table: CalibrationTable, measure: str, n: int, consistency: str = TEXTUAL) -> str:
    loss = "D" if consistency == TEXTUAL else "risk"
    if n < MIN_CALIBRATION_DOCUMENTS:
        return (
            f"only {n} calibration documents: a table from fewer than {MIN_CALIBRATION_DOCUMENTS} certifies "
            "nothing, and the knob will run the full model; calibrate on more documents"
        )
    index = table.certified_index_for(consistency)
    if index is None:
        return (
            f"no {measure} threshold is certified at δ={table.delta:g}, ε={table.epsilon:g} with n={n} "
            f"examples ({consistency} consistency): the knob will run the full model"
        )
    row = table.rows[index]
    return (
        f"certified {measure} threshold λ={row.threshold:g} for {consistency} consistency: "
        f"P(mean {loss} ≤ {table.delta:g}) ≥ 1−{table.epsilon:g} over n={n} calibration examples; "
        f"calibration-set mean {loss} {row.mean_for(consistency):.3f}, "
        f"{row.avg_layers:.2f} layers on average, {format_speedup(row.speedup)} measured speedup"
    )
