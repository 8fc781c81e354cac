"""Learn-then-Test (statistics only): p-values and fixed-sequence testing of early-exit thresholds.

CALM (Schuster et al. 2022) picks the confidence threshold λ with the
Learn-then-Test procedure (Angelopoulos et al. 2021): for each candidate
threshold we test H0: E[D(λ)] > δ, where D ∈ [0, 1] is the per-example
textual/risk dissimilarity between the early-exit output and the full model.
Candidates are ordered from the most conservative to the least and tested
with fixed-sequence testing at level ε, which controls the family-wise error
rate, so the returned threshold satisfies P(E[D] ≤ δ) ≥ 1 − ε.

Nothing here imports torch or model code; everything is numpy float64. The table
the results are stored in is calm.calibration.table.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

import numpy as np

try:  # scipy is optional; a log-space fallback is used without it.
    from scipy.stats import binom as _scipy_binom
except ImportError:  # pragma: no cover - depends on the environment
    _scipy_binom = None

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
    "check_losses",
    "check_thresholds",
]

METHODS = ("hb", "hoeffding")
_MEAN_TOL = 1e-9


# --------------------------------------------------------------------------
# validation helpers
# --------------------------------------------------------------------------


def _check_level(name: str, value: float) -> float:
    value = float(value)
    if not (0.0 < value < 1.0):  # also False for NaN
        raise ValueError(f"{name} must be in the open interval (0, 1), got {value!r}")
    return value


def _check_n(n: int) -> int:
    if isinstance(n, bool) or int(n) != n:
        raise ValueError(f"n must be a positive integer, got {n!r}")
    if n < 1:
        raise ValueError(f"n must be >= 1 (number of calibration examples), got {n!r}")
    return int(n)


def _check_mean(mean_loss: float) -> float:
    mean = float(mean_loss)
    if not (-_MEAN_TOL <= mean <= 1.0 + _MEAN_TOL):  # also False for NaN
        raise ValueError(f"mean_loss must be in [0, 1], got {mean_loss!r}")
    return min(max(mean, 0.0), 1.0)


def _check_method(method: str) -> str:
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    return method


def check_losses(losses: Any) -> np.ndarray:
    arr = np.asarray(losses, dtype=np.float64)
    if arr.ndim != 2:
        raise ValueError(f"losses must be a 2-D array [K thresholds, n examples], got shape {arr.shape}")
    k, n = arr.shape
    if k == 0:
        raise ValueError("losses has no thresholds (K == 0)")
    if n == 0:
        raise ValueError("losses has no calibration examples (n == 0)")
    if np.isnan(arr).any():
        raise ValueError("losses contain NaN")
    if arr.min() < 0.0 or arr.max() > 1.0:
        raise ValueError(f"losses must lie in [0, 1], got values in [{arr.min():g}, {arr.max():g}]")
    return arr


def check_thresholds(thresholds: Sequence[float], k: int) -> tuple[float, ...]:
    values = tuple(float(t) for t in thresholds)
    if len(values) != k:
        raise ValueError(f"got {len(values)} thresholds but losses has {k} rows; shapes must agree")
    if not all(math.isfinite(t) for t in values):
        raise ValueError(f"thresholds must be finite, got {values}")
    diffs = np.diff(np.asarray(values))
    if len(values) > 1 and not ((diffs > 0).all() or (diffs < 0).all()):
        raise ValueError(
            "thresholds must be strictly monotone, ordered from the most conservative "
            f"to the least conservative; got {values}"
        )
    return values


# --------------------------------------------------------------------------
# p-values
# --------------------------------------------------------------------------


def _h1(a: float, b: float) -> float:
    """KL divergence between Bernoulli(a) and Bernoulli(b), 0 < b < 1."""
    first = 0.0 if a == 0.0 else a * math.log(a / b)
    second = 0.0 if a == 1.0 else (1.0 - a) * math.log((1.0 - a) / (1.0 - b))
    return first + second


def hoeffding_pvalue(mean_loss: float, n: int, delta: float) -> float:
    """Hoeffding p-value for H0: E[loss] > delta, losses in [0, 1]."""
    mean, n, delta = _check_mean(mean_loss), _check_n(n), _check_level("delta", delta)
    a = min(mean, delta)
    if a >= delta:
        return 1.0
    return float(min(1.0, math.exp(-n * _h1(a, delta))))


@lru_cache(maxsize=64)
def _log_factorials(n: int) -> np.ndarray:
    """log(i!) for i = 0..n (read-only, cached per n)."""
    out = np.concatenate(([0.0], np.cumsum(np.log(np.arange(1, n + 1, dtype=np.float64)))))
    out.setflags(write=False)
    return out


def _binom_cdf_logspace(k: int, n: int, p: float) -> float:
    """P(Binomial(n, p) <= k) as a log-sum-exp over the pmf terms."""
    if k < 0:
        return 0.0
    if k >= n:
        return 1.0
    logf = _log_factorials(n)
    i = np.arange(k + 1)
    log_terms = logf[n] - logf[i] - logf[n - i] + i * math.log(p) + (n - i) * math.log1p(-p)
    top = log_terms.max()
    return float(min(1.0, math.exp(top) * np.exp(log_terms - top).sum()))


def _binom_cdf(k: int, n: int, p: float) -> float:
    if _scipy_binom is not None:
        return float(_scipy_binom.cdf(k, n, p))
    return _binom_cdf_logspace(k, n, p)


def _successes(mean: float, n: int) -> int:
    """ceil(n * mean), robust to float noise when mean = k / n."""
    x = n * mean
    nearest = round(x)
    if abs(x - nearest) <= 1e-9 * max(1.0, x):
        return int(nearest)
    return int(math.ceil(x))


def bentkus_pvalue(mean_loss: float, n: int, delta: float) -> float:
    """Bentkus p-value e * P(Binomial(n, delta) <= ceil(n * mean)), capped at 1."""
    mean, n, delta = _check_mean(mean_loss), _check_n(n), _check_level("delta", delta)
    return float(min(1.0, math.e * _binom_cdf(_successes(mean, n), n, delta)))


def hoeffding_bentkus_pvalue(mean_loss: float, n: int, delta: float) -> float:
    """Hoeffding-Bentkus p-value: min of the two, clipped to [0, 1]."""
    p = min(hoeffding_pvalue(mean_loss, n, delta), bentkus_pvalue(mean_loss, n, delta))
    return float(min(1.0, max(0.0, p)))


_PVALUE_FNS = {"hb": hoeffding_bentkus_pvalue, "hoeffding": hoeffding_pvalue}


# --------------------------------------------------------------------------
# fixed-sequence testing
# --------------------------------------------------------------------------


@dataclass(frozen=True)
class LTTResult:
    """Result of fixed-sequence testing over thresholds (index 0 = most conservative)."""

    certified_index: int | None
    pvalues: tuple[float, ...]
    delta: float
    epsilon: float
    method: str
    n: int

    @property
    def certified(self) -> bool:
        return self.certified_index is not None


def fixed_sequence_test(risks_per_threshold: np.ndarray, delta: float, epsilon: float, method: str = "hb") -> LTTResult:
    """Test H0_k: E[loss_k] > delta in order k = 0, 1, ... and stop at the first
    p-value above epsilon. Returns the last rejected index (or None)."""
    losses = check_losses(risks_per_threshold)
    return fixed_sequence_test_means(losses.mean(axis=1), losses.shape[1], delta, epsilon, method)


def fixed_sequence_test_means(
    mean_losses: Sequence[float], n: int, delta: float, epsilon: float, method: str = "hb"
) -> LTTResult:
    """Fixed-sequence testing from each threshold's mean loss over n examples (the Hoeffding and
    Hoeffding-Bentkus p-values depend on the losses only through their mean)."""
    delta, epsilon = _check_level("delta", delta), _check_level("epsilon", epsilon)
    pvalue_fn = _PVALUE_FNS[_check_method(method)]
    n = _check_n(n)
    means = np.clip(np.asarray(mean_losses, dtype=np.float64), 0.0, 1.0)
    pvalues = tuple(pvalue_fn(float(m), n, delta) for m in means)
    certified: int | None = None
    for k, p in enumerate(pvalues):
        if p > epsilon:
            break
        certified = k
    return LTTResult(certified, pvalues, delta, epsilon, method, n)


# --------------------------------------------------------------------------
# calibration entry point
# --------------------------------------------------------------------------


@dataclass(frozen=True)
class CalibrationOutcome:
    """The certified threshold (or None) plus the underlying test result."""

    threshold: float | None
    index: int | None
    ltt: LTTResult

    def summary(self) -> str:
        ltt = self.ltt
        if self.threshold is None or self.index is None:
            return (
                f"no threshold is certified at δ={ltt.delta:g}, ε={ltt.epsilon:g} "
                f"with n={ltt.n} examples (method={ltt.method}; most conservative "
                f"p={ltt.pvalues[0]:.3g}); fall back to the full model"
            )
        return (
            f"certified threshold λ={self.threshold:g} (P(mean D ≤ δ) ≥ 1−ε with "
            f"δ={ltt.delta:g}, ε={ltt.epsilon:g}, n={ltt.n} examples; "
            f"index {self.index} of {len(ltt.pvalues)}, method={ltt.method}, "
            f"p={ltt.pvalues[self.index]:.3g})"
        )


def ltt_calibrate(
    thresholds: Sequence[float], losses: np.ndarray, delta: float, epsilon: float, method: str = "hb"
) -> CalibrationOutcome:
    """Pick the least conservative threshold certified by Learn-then-Test.

    ``thresholds`` must be strictly monotone, ordered from the most
    conservative to the least; ``losses[k, i]`` is example i's loss in [0, 1]
    when decoding with ``thresholds[k]``.
    """
    arr = check_losses(losses)
    values = check_thresholds(thresholds, arr.shape[0])
    ltt = fixed_sequence_test(arr, delta, epsilon, method)
    idx = ltt.certified_index
    return CalibrationOutcome(None if idx is None else values[idx], idx, ltt)
