"""The calibration table: per-threshold statistics of a Learn-then-Test run (calm.calibration.ltt), stored in calm
checkpoints, read by the speed and tolerance knobs.

Each row holds the losses of two objectives (CALM's two consistencies): textual, D = 1 − ROUGE-L(early,
full), and risk, max(0, R_full − R_early) with R the ROUGE-L F1 against the references. Tables made
before risk consistency hold only the textual columns; they load, and asking them for risk is a
CalibrationError.

The Learn-then-Test names (p-values, fixed-sequence testing, ltt_calibrate) are re-exported here, so
`from calm.calibration.table import ...` reaches the whole calibration.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from calm.calibration.ltt import (
    METHODS,
    CalibrationOutcome,
    LTTResult,
    bentkus_pvalue,
    check_losses,
    check_thresholds,
    fixed_sequence_test,
    fixed_sequence_test_means,
    hoeffding_bentkus_pvalue,
    hoeffding_pvalue,
    ltt_calibrate,
)
from calm.errors import CalibrationError

__all__ = [
    "METHODS",
    "hoeffding_pvalue",
    "bentkus_pvalue",
    "hoeffding_bentkus_pvalue",
    "LTTResult",
    "fixed_sequence_test",
    "fixed_sequence_test_means",
    "CalibrationOutcome",
    "ltt_calibrate",
    "CONSISTENCIES",
    "CalibrationRow",
    "CalibrationTable",
    "build_calibration_table",
]

_TABLE_FORMAT = "calm.calibration_table"
_TABLE_VERSION = 1  # risk columns are optional fields of version 1: older readers ignore them
TEXTUAL, RISK = "textual", "risk"
CONSISTENCIES = (TEXTUAL, RISK)
NO_RISK = (
    "this calibration table has no risk-consistency rows (it was made before calm calibrate computed risk "
    "against the reference summaries); run calm calibrate again on documents with references, or use "
    "consistency 'textual'"
)


def check_consistency(consistency: str) -> str:
    if consistency not in CONSISTENCIES:
        raise CalibrationError(f"consistency must be one of {', '.join(CONSISTENCIES)}, got {consistency!r}")
    return consistency


@dataclass(frozen=True)
class CalibrationRow:
    """Per-threshold calibration statistics."""

    threshold: float
    mean_loss: float
    q50: float
    q90: float
    q95: float
    avg_layers: float
    speedup: float  # wall clock vs full depth; NaN where not timed in one run
    pvalue: float
    # risk consistency: max(0, R_full − R_early) against the references; None in tables made without it
    risk_mean_loss: float | None = None
    risk_q90: float | None = None
    risk_pvalue: float | None = None

    def __post_init__(self) -> None:
        for name in _ROW_FIELDS + _RISK_FIELDS:
            raw = getattr(self, name)
            if raw is None and name in _RISK_FIELDS:
                continue
            value = math.nan if raw is None and name == "speedup" else float(raw)
            if not math.isfinite(value) and not (name == "speedup" and math.isnan(value)):
                raise ValueError(f"CalibrationRow.{name} must be finite, got {value!r}")
            object.__setattr__(self, name, value)
        if len({getattr(self, name) is None for name in _RISK_FIELDS}) > 1:
            raise ValueError("CalibrationRow needs all of risk_mean_loss, risk_q90 and risk_pvalue, or none")

    @property
    def has_risk(self) -> bool:
        return self.risk_mean_loss is not None

    def mean_for(self, consistency: str) -> float:
        """The mean loss of one objective (risk: a CalibrationError where the row has none)."""
        if check_consistency(consistency) == TEXTUAL:
            return self.mean_loss
        if self.risk_mean_loss is None:
            raise CalibrationError(NO_RISK)
        return self.risk_mean_loss

    def to_dict(self) -> dict[str, float | None]:
        """Fields as floats; a speedup that was not measured (NaN) as None; risk fields where present."""
        row: dict[str, float | None] = {name: float(getattr(self, name)) for name in _ROW_FIELDS}
        if math.isnan(self.speedup):
            row["speedup"] = None
        if self.has_risk:
            row.update({name: float(getattr(self, name)) for name in _RISK_FIELDS})
        return row


_ROW_FIELDS = ("threshold", "mean_loss", "q50", "q90", "q95", "avg_layers", "speedup", "pvalue")
_RISK_FIELDS = ("risk_mean_loss", "risk_q90", "risk_pvalue")


_SETTING_FIELDS = ("measure", "min_exit_layer", "decay_tau", "max_new_tokens", "max_doc_tokens", "data")


def _optional_float(value: Any) -> float | None:
    return None if value is None else float(value)


# A table from fewer documents certifies nothing: it is kept (its rows are still a measurement) but marked
# uncertified, and the knob runs the full model on it. At the shipped δ=0.1, ε=0.05 Hoeffding-Bentkus needs
# 38 loss-free documents to pass anything; this floor stops a loose δ on a handful of documents too.
MIN_CALIBRATION_DOCUMENTS = 10
# A threshold whose measured speed-up is below this is within timing noise of the full model (as lossless's
# calm.speculative.lossless.MIN_GAIN): the knob never runs it.
MIN_SPEEDUP = 1.05


@dataclass(frozen=True)
class CalibrationTable:
    """Rows ordered from the most conservative threshold to the least, and how the thresholds ran
    when they were calibrated (the knob runs them the same way). A setting that was not recorded is
    None; a table without ``decay_tau`` was made with the default decay of calm.exits.policy.ExitPolicy."""

    rows: tuple[CalibrationRow, ...]
    certified_index: int | None
    delta: float | None = None
    epsilon: float | None = None
    n: int | None = None
    method: str | None = None
    measure: str | None = None  # the confidence measure the thresholds apply to
    min_exit_layer: int | None = None
    decay_tau: float | None = None  # τ of the threshold schedule; 0: λ fixed
    max_new_tokens: int | None = None
    max_doc_tokens: int | None = None
    data: str | None = None  # the calibration documents
    risk_certified_index: int | None = None  # the row risk consistency certifies at delta (None: none, or no risk)

    def __post_init__(self) -> None:
        rows = tuple(self.rows)
        object.__setattr__(self, "rows", rows)
        if not rows:
            raise ValueError("CalibrationTable needs at least one row")
        check_thresholds([r.threshold for r in rows], len(rows))
        for name in ("certified_index", "risk_certified_index"):
            idx = getattr(self, name)
            if idx is not None and (isinstance(idx, bool) or not 0 <= idx < len(rows)):
                raise ValueError(f"{name} must be None or in [0, {len(rows) - 1}], got {idx!r}")
        if len({r.has_risk for r in rows}) > 1:
            raise ValueError("either every calibration row has risk-consistency losses or none has")
        if self.risk_certified_index is not None and not self.has_risk:
            raise ValueError("risk_certified_index needs rows with risk-consistency losses")
        self._check_settings()

    def _check_settings(self) -> None:
        for name in ("min_exit_layer", "max_new_tokens", "max_doc_tokens"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or int(value) != value or value < 1):
                raise ValueError(f"{name} must be None or an integer >= 1, got {value!r}")
            object.__setattr__(self, name, None if value is None else int(value))
        tau = self.decay_tau
        if tau is not None and not (math.isfinite(float(tau)) and float(tau) >= 0):
            raise ValueError(f"decay_tau must be None or a finite number >= 0, got {tau!r}")
        object.__setattr__(self, "decay_tau", _optional_float(tau))
        for name in ("measure", "data", "method"):
            value = getattr(self, name)
            if value is not None and not isinstance(value, str):
                raise ValueError(f"{name} must be None or a string, got {value!r}")

    @property
    def certified_row(self) -> CalibrationRow | None:
        idx = self.certified_index
        return None if idx is None else self.rows[idx]

    @property
    def has_risk(self) -> bool:
        """Whether the rows hold risk-consistency losses (tables made before them do not)."""
        return self.rows[0].has_risk

    def require(self, consistency: str) -> str:
        """The consistency, checked: a known name, and risk only where the table has its rows."""
        if check_consistency(consistency) == RISK and not self.has_risk:
            raise CalibrationError(NO_RISK)
        return consistency

    def certified_index_for(self, consistency: str = TEXTUAL) -> int | None:
        """The row certified at the table's δ for one objective."""
        return self.certified_index if self.require(consistency) == TEXTUAL else self.risk_certified_index

    def mean_losses(self, consistency: str = TEXTUAL) -> tuple[float, ...]:
        self.require(consistency)
        return tuple(r.mean_for(consistency) for r in self.rows)

    @property
    def thresholds(self) -> tuple[float, ...]:
        return tuple(r.threshold for r in self.rows)

    @property
    def certified_threshold(self) -> float | None:
        idx = self.certified_index
        return None if idx is None else self.rows[idx].threshold

    def threshold_for_tolerance(self, delta: float, consistency: str = TEXTUAL) -> float | None:
        """The least conservative threshold certified at tolerance delta for one objective (at the
        table's epsilon and method), or None when none is."""
        if self.n is None or self.epsilon is None:
            raise ValueError("this calibration table records no sample size or epsilon")
        if self.n < MIN_CALIBRATION_DOCUMENTS:
            return None
        means = self.mean_losses(consistency)
        ltt = fixed_sequence_test_means(means, self.n, delta, self.epsilon, self.method or "hb")
        return None if ltt.certified_index is None else self.rows[ltt.certified_index].threshold

    def paying_indexes(self, consistency: str = TEXTUAL, last: int | None = None) -> tuple[int, ...]:
        """The certified rows (up to `last`, else the certified one) worth running: each measured at least
        MIN_SPEEDUP times the full model's speed and faster than every more careful certified row. A row
        measured slower than a more careful one, or not timed (NaN), is never among them: it would cost
        quality without buying speed."""
        c = self.certified_index_for(consistency)
        if c is None:
            return ()
        best, paying = 1.0, []
        for i in range(min(c, c if last is None else last) + 1):
            speedup = self.rows[i].speedup
            if math.isfinite(speedup) and speedup >= MIN_SPEEDUP and speedup > best:
                best = speedup
                paying.append(i)
        return tuple(paying)

    def speed_to_threshold(self, speed: float, consistency: str = TEXTUAL) -> float | None:
        """Map a knob in [0, 1] onto the measured speed-ups of the paying certified rows (paying_indexes):
        the target speed-up 1 + speed × (fastest − 1), and the most careful paying row that reaches it;
        1 -> the fastest certified row. None where no certified row was measured faster than the full model
        (the caller runs the full model's exact output instead); a ValueError where nothing is certified."""
        speed = float(speed)
        if not (0.0 <= speed <= 1.0):  # also False for NaN
            raise ValueError(f"speed must be in [0, 1], got {speed!r}")
        if self.certified_index_for(consistency) is None:
            raise ValueError(
                "no threshold is certified in this calibration table; run the full model instead of early exiting"
            )
        paying = self.paying_indexes(consistency)
        if not paying:
            return None
        speedups = [self.rows[i].speedup for i in paying]
        target = 1.0 + speed * (speedups[-1] - 1.0)
        tol = 1e-9 * max(1.0, target)
        return self.rows[next(i for i, s in zip(paying, speedups) if s >= target - tol)].threshold

    def fastest_paying(self, threshold: float, consistency: str = TEXTUAL) -> float | None:
        """The fastest paying row at most as loose as `threshold` (a certified one, e.g. what a tolerance
        certifies); None where none pays."""
        paying = self.paying_indexes(consistency, last=self.thresholds.index(threshold))
        return self.rows[paying[-1]].threshold if paying else None

    def fastest_certified(self, consistency: str = TEXTUAL, last: float | None = None) -> CalibrationRow | None:
        """The certified row (at most as loose as the threshold `last`) measured fastest, for the message that
        none pays; None: nothing certified or timed."""
        c = self.certified_index_for(consistency)
        c = c if c is None or last is None else min(c, self.thresholds.index(last))
        timed = [r for r in self.rows[: (c if c is not None else -1) + 1] if math.isfinite(r.speedup)]
        return max(timed, key=lambda r: r.speedup, default=None)

    def to_dict(self) -> dict[str, Any]:
        """The JSON form stored in calm checkpoints; settings that were not recorded are left out."""
        settings = {name: getattr(self, name) for name in _SETTING_FIELDS if getattr(self, name) is not None}
        return {
            "format": _TABLE_FORMAT,
            "version": _TABLE_VERSION,
            "certified_index": self.certified_index,
            "delta": self.delta,
            "epsilon": self.epsilon,
            "n": self.n,
            "method": self.method,
            "rows": [r.to_dict() for r in self.rows],
            **settings,
            **({"risk_certified_index": self.risk_certified_index} if self.has_risk else {}),
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> CalibrationTable:
        if data.get("format", _TABLE_FORMAT) != _TABLE_FORMAT:
            raise ValueError(f"not a calibration table: format={data.get('format')!r}")
        if data.get("version", _TABLE_VERSION) != _TABLE_VERSION:
            raise ValueError(f"unsupported calibration table version {data.get('version')!r}")
        if "rows" not in data:
            raise ValueError("calibration table dict is missing 'rows'")
        try:
            rows = tuple(
                CalibrationRow(**{k: row[k] for k in _ROW_FIELDS}, **{k: row.get(k) for k in _RISK_FIELDS})
                for row in data["rows"]
            )
        except KeyError as exc:
            raise ValueError(f"calibration table row is missing field {exc}") from None
        idx, risk_idx = data.get("certified_index"), data.get("risk_certified_index")
        n = data.get("n")
        if n is not None and int(n) < MIN_CALIBRATION_DOCUMENTS:
            idx = None  # an older table from too few documents: never used by the knob
        return cls(
            rows=rows,
            certified_index=None if idx is None else int(idx),
            risk_certified_index=None if risk_idx is None else int(risk_idx),
            delta=_optional_float(data.get("delta")),
            epsilon=_optional_float(data.get("epsilon")),
            n=None if n is None else int(n),
            method=data.get("method"),
            **{name: data.get(name) for name in _SETTING_FIELDS},
        )


def build_calibration_table(
    thresholds: Sequence[float],
    losses: np.ndarray,
    avg_layers: Sequence[float],
    speedup: Sequence[float],
    ltt: LTTResult,
    risk_losses: np.ndarray | None = None,
) -> CalibrationTable:
    """Summarise per-threshold losses into a CalibrationTable using ``ltt``'s p-values; with
    ``risk_losses`` ([K, n], the same examples), the risk columns too, tested at ``ltt``'s δ, ε and method."""
    arr = check_losses(losses)
    k = arr.shape[0]
    values = check_thresholds(thresholds, k)
    if len(avg_layers) != k or len(speedup) != k or len(ltt.pvalues) != k:
        raise ValueError(
            f"avg_layers ({len(avg_layers)}), speedup ({len(speedup)}) and "
            f"ltt.pvalues ({len(ltt.pvalues)}) must each have K={k} entries"
        )
    if ltt.n != arr.shape[1]:
        raise ValueError(f"ltt.n={ltt.n} but losses has n={arr.shape[1]} examples")
    q50, q90, q95 = np.quantile(arr, [0.5, 0.9, 0.95], axis=1)
    means = arr.mean(axis=1)
    risk: list[dict[str, float]] = [{} for _ in range(k)]
    risk_index = None
    if risk_losses is not None:
        risk_arr = check_losses(risk_losses)
        if risk_arr.shape != arr.shape:
            raise ValueError(f"risk_losses has shape {risk_arr.shape}, losses {arr.shape}; they must agree")
        risk_ltt = fixed_sequence_test(risk_arr, ltt.delta, ltt.epsilon, ltt.method)
        risk_q90 = np.quantile(risk_arr, 0.9, axis=1)
        risk = [
            {"risk_mean_loss": m, "risk_q90": q, "risk_pvalue": p}
            for m, q, p in zip(risk_arr.mean(axis=1), risk_q90, risk_ltt.pvalues)
        ]
        risk_index = risk_ltt.certified_index
    rows = tuple(
        CalibrationRow(
            values[i], means[i], q50[i], q90[i], q95[i], avg_layers[i], speedup[i], ltt.pvalues[i], **risk[i]
        )
        for i in range(k)
    )
    certified = ltt.certified_index if ltt.n >= MIN_CALIBRATION_DOCUMENTS else None
    risk_index = risk_index if ltt.n >= MIN_CALIBRATION_DOCUMENTS else None
    return CalibrationTable(rows, certified, ltt.delta, ltt.epsilon, ltt.n, ltt.method, risk_certified_index=risk_index)
