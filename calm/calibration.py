"""The calibration table: per-threshold statistics of a Learn-then-Test run (calm.ltt), stored in calm
checkpoints, read by the speed and tolerance knobs.

The Learn-then-Test names (p-values, fixed-sequence testing, ltt_calibrate) are re-exported here, so
`from calm.calibration import ...` reaches the whole calibration.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from calm.ltt import (
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
    "CalibrationRow",
    "CalibrationTable",
    "build_calibration_table",
]

_TABLE_FORMAT = "calm.calibration_table"
_TABLE_VERSION = 1


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

    def __post_init__(self) -> None:
        for name in _ROW_FIELDS:
            raw = getattr(self, name)
            value = math.nan if raw is None and name == "speedup" else float(raw)
            if not math.isfinite(value) and not (name == "speedup" and math.isnan(value)):
                raise ValueError(f"CalibrationRow.{name} must be finite, got {value!r}")
            object.__setattr__(self, name, value)

    def to_dict(self) -> dict[str, float | None]:
        """Fields as floats; a speedup that was not measured (NaN) as None."""
        row: dict[str, float | None] = {name: float(getattr(self, name)) for name in _ROW_FIELDS}
        if math.isnan(self.speedup):
            row["speedup"] = None
        return row


_ROW_FIELDS = ("threshold", "mean_loss", "q50", "q90", "q95", "avg_layers", "speedup", "pvalue")


_SETTING_FIELDS = ("measure", "min_exit_layer", "decay_tau", "max_new_tokens", "max_doc_tokens", "data")


def _optional_float(value: Any) -> float | None:
    return None if value is None else float(value)


# A table from fewer documents certifies nothing: it is kept (its rows are still a measurement) but marked
# uncertified, and the knob runs the full model on it. At the shipped δ=0.1, ε=0.05 Hoeffding-Bentkus needs
# 38 loss-free documents to pass anything; this floor stops a loose δ on a handful of documents too.
MIN_CALIBRATION_DOCUMENTS = 10


@dataclass(frozen=True)
class CalibrationTable:
    """Rows ordered from the most conservative threshold to the least, and how the thresholds ran
    when they were calibrated (the knob runs them the same way). A setting that was not recorded is
    None; a table without ``decay_tau`` was made with the default decay of calm.policy.ExitPolicy."""

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

    def __post_init__(self) -> None:
        rows = tuple(self.rows)
        object.__setattr__(self, "rows", rows)
        if not rows:
            raise ValueError("CalibrationTable needs at least one row")
        check_thresholds([r.threshold for r in rows], len(rows))
        idx = self.certified_index
        if idx is not None and (isinstance(idx, bool) or not 0 <= idx < len(rows)):
            raise ValueError(f"certified_index must be None or in [0, {len(rows) - 1}], got {idx!r}")
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
    def thresholds(self) -> tuple[float, ...]:
        return tuple(r.threshold for r in self.rows)

    @property
    def certified_threshold(self) -> float | None:
        idx = self.certified_index
        return None if idx is None else self.rows[idx].threshold

    def threshold_for_tolerance(self, delta: float) -> float | None:
        """The least conservative threshold certified at risk tolerance delta (at the table's epsilon
        and method), or None when none is."""
        if self.n is None or self.epsilon is None:
            raise ValueError("this calibration table records no sample size or epsilon")
        if self.n < MIN_CALIBRATION_DOCUMENTS:
            return None
        ltt = fixed_sequence_test_means(
            [r.mean_loss for r in self.rows], self.n, delta, self.epsilon, self.method or "hb"
        )
        return None if ltt.certified_index is None else self.rows[ltt.certified_index].threshold

    def speed_to_threshold(self, speed: float) -> float:
        """Map a knob in [0, 1] to a threshold: 0 -> most conservative row,
        1 -> certified row. In between, the target average depth is linearly
        interpolated and the row closest to it from the conservative side
        (avg_layers >= target) is returned."""
        speed = float(speed)
        if not (0.0 <= speed <= 1.0):  # also False for NaN
            raise ValueError(f"speed must be in [0, 1], got {speed!r}")
        c = self.certified_index
        if c is None:
            raise ValueError(
                "no threshold is certified in this calibration table; run the full model instead of early exiting"
            )
        if speed == 0.0:
            return self.rows[0].threshold
        if speed == 1.0:
            return self.rows[c].threshold
        layers = np.array([r.avg_layers for r in self.rows[: c + 1]])
        target = layers[0] + speed * (layers[c] - layers[0])
        tol = 1e-9 * max(1.0, abs(target))
        gaps = np.where(layers >= target - tol, layers - target, np.inf)
        return self.rows[int(np.argmin(gaps))].threshold  # ties -> most conservative

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
            rows = tuple(CalibrationRow(**{k: row[k] for k in _ROW_FIELDS}) for row in data["rows"])
        except KeyError as exc:
            raise ValueError(f"calibration table row is missing field {exc}") from None
        idx = data.get("certified_index")
        n = data.get("n")
        if n is not None and int(n) < MIN_CALIBRATION_DOCUMENTS:
            idx = None  # an older table from too few documents: never used by the knob
        return cls(
            rows=rows,
            certified_index=None if idx is None else int(idx),
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
) -> CalibrationTable:
    """Summarise per-threshold losses into a CalibrationTable using ``ltt``'s p-values."""
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
    rows = tuple(
        CalibrationRow(values[i], means[i], q50[i], q90[i], q95[i], avg_layers[i], speedup[i], ltt.pvalues[i])
        for i in range(k)
    )
    certified = ltt.certified_index if ltt.n >= MIN_CALIBRATION_DOCUMENTS else None
    return CalibrationTable(rows, certified, ltt.delta, ltt.epsilon, ltt.n, ltt.method)
