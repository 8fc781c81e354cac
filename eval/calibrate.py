"""`calm calibrate`: choose the fastest threshold that Learn-then-Test certifies.

Every calibration document is summarised at full depth and at each threshold of a grid (through the
resumable sweep of calm.eval.sweep). The loss of an example at threshold λ is its textual
inconsistency D = 1 − ROUGE-L(early output, full output). Fixed-sequence testing runs from the most
conservative threshold down with Hoeffding–Bentkus p-values (calm.calibration), and the resulting
table (mean and quantiles of D, average layers, measured speedup, p-values) is stored in the calm
checkpoint, where the `speed` and `tolerance` knobs read it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from statistics import fmean

import numpy as np

from calm.calibration import MIN_CALIBRATION_DOCUMENTS, CalibrationTable, build_calibration_table, fixed_sequence_test
from calm.checkpoint import is_checkpoint, read_config
from calm.data import Record
from calm.errors import InputError
from calm.eval.grids import DEFAULT_GRID
from calm.eval.progress import ProgressCallback
from calm.eval.report import FULL, timed_speedup
from calm.eval.reporting import format_speedup
from calm.eval.rouge import rouge_l_similarity
from calm.eval.sweep import EvalConfig, run_sweep
from calm.model import CalmModel
from calm.policy import ExitPolicy


@dataclass(frozen=True)
class CalibrateConfig:
    model: str
    data: str
    delta: float = 0.1
    epsilon: float = 0.05
    method: str = "hb"
    thresholds: tuple[float, ...] = DEFAULT_GRID  # most conservative (highest λ) first
    measure: str | None = None
    min_exit_layer: int | None = None  # None: the model's exit floor (calm.decode.exit_floor)
    max_new_tokens: int = 64
    batch_size: int = 8
    document_field: str = "document"
    limit: int | None = None
    max_doc_tokens: int | None = None
    decay_tau: float = ExitPolicy.decay_tau  # τ of CALM's decaying threshold; 0: λ stays fixed

    def __post_init__(self) -> None:
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
        lines = [
            "| λ | mean D | D q50 | D q90 | D q95 | avg layers | speedup | p-value | certified |",
            "|---:|---:|---:|---:|---:|---:|---:|---:|:---:|",
        ]
        for i, r in enumerate(t.rows):
            mark = "yes" if t.certified_index is not None and i <= t.certified_index else ""
            lines.append(
                f"| {r.threshold:g} | {r.mean_loss:.3f} | {r.q50:.3f} | {r.q90:.3f} | {r.q95:.3f} | "
                f"{r.avg_layers:.2f} | {format_speedup(r.speedup)} | {r.pvalue:.3g} | {mark} |"
            )
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
    """Run the sweep on the calibration records and certify a threshold; None on non-main processes."""
    sweep = config.sweep().for_model(model)
    rows = run_sweep(model, records, sweep, work_dir, resume, progress)
    if rows is None:
        return None
    ids = [r.id for r in records]
    full = rows[FULL]
    early = [p for p in sweep.points() if p.name != FULL]
    losses = np.array(
        [[1.0 - rouge_l_similarity(rows[p.name][i]["summary"], full[i]["summary"]) for i in ids] for p in early]
    )  # [K, n]
    avg_layers = [_avg_layers([rows[p.name][i] for i in ids]) for p in early]
    speedup = [timed_speedup([full[i] for i in ids], [rows[p.name][i] for i in ids]) for p in early]
    ltt = fixed_sequence_test(losses, config.delta, config.epsilon, config.method)
    table = build_calibration_table([p.threshold for p in early], losses, avg_layers, speedup, ltt)
    return CalibrationRun(table=table, measure=sweep.measure, summary=_summary(table, sweep.measure, len(ids)))


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


def _summary(table: CalibrationTable, measure: str, n: int) -> str:
    if n < MIN_CALIBRATION_DOCUMENTS:
        return (
            f"only {n} calibration documents: a table from fewer than {MIN_CALIBRATION_DOCUMENTS} certifies "
            "nothing, and the knob will run the full model; calibrate on more documents"
        )
    if table.certified_threshold is None:
        return (
            f"no {measure} threshold is certified at δ={table.delta:g}, ε={table.epsilon:g} with n={n} "
            "examples: the knob will run the full model"
        )
    row = table.rows[table.certified_index]
    return (
        f"certified {measure} threshold λ={row.threshold:g}: P(mean D ≤ {table.delta:g}) ≥ 1−{table.epsilon:g} "
        f"over n={n} calibration examples; calibration-set mean D {row.mean_loss:.3f}, "
        f"{row.avg_layers:.2f} layers on average, {format_speedup(row.speedup)} measured speedup"
    )
