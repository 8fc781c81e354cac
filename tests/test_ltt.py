"""Tests for calm.calibration.ltt (Learn-then-Test statistics: p-values, fixed-sequence testing, ltt_calibrate)."""

from __future__ import annotations

import math
from fractions import Fraction

import numpy as np
import pytest

from calm.calibration import ltt
from calm.calibration.ltt import (
    CalibrationOutcome,
    LTTResult,
    bentkus_pvalue,
    fixed_sequence_test,
    hoeffding_bentkus_pvalue,
    hoeffding_pvalue,
    ltt_calibrate,
)

PVALUE_FNS = [hoeffding_pvalue, bentkus_pvalue, hoeffding_bentkus_pvalue]


# --------------------------------------------------------------------------
# p-values
# --------------------------------------------------------------------------


@pytest.mark.parametrize("fn", PVALUE_FNS)
def test_pvalue_monotone_in_mean_loss(fn):
    means = np.linspace(0.0, 1.0, 201)
    p = np.array([fn(m, 200, 0.2) for m in means])
    assert np.all((p >= 0.0) & (p <= 1.0))
    assert np.all(np.diff(p) >= -1e-12)


@pytest.mark.parametrize("fn", PVALUE_FNS)
@pytest.mark.parametrize("mean", [0.2, 0.25, 0.5, 1.0])
def test_pvalue_near_one_when_mean_at_or_above_delta(fn, mean):
    assert fn(mean, 500, 0.2) >= 0.5
    if fn is not bentkus_pvalue:
        assert fn(mean, 500, 0.2) == pytest.approx(1.0)


@pytest.mark.parametrize("fn", PVALUE_FNS)
def test_pvalue_tiny_when_mean_far_below_delta(fn):
    assert fn(0.01, 2000, 0.2) < 1e-20
    assert fn(0.0, 2000, 0.2) < 1e-20


def test_hoeffding_closed_form_and_edges():
    n, delta = 100, 0.3
    # mean = 0: h1(0, b) = -log(1 - b)
    assert hoeffding_pvalue(0.0, n, delta) == pytest.approx((1 - delta) ** n)
    a = 0.1
    h1 = a * math.log(a / delta) + (1 - a) * math.log((1 - a) / (1 - delta))
    assert hoeffding_pvalue(a, n, delta) == pytest.approx(math.exp(-n * h1))
    assert hoeffding_pvalue(1.0, n, delta) == 1.0


def test_hb_never_exceeds_hoeffding_or_bentkus():
    for n in (10, 50, 200, 1000):
        for delta in (0.05, 0.1, 0.3):
            for mean in np.linspace(0.0, 1.0, 41):
                hb = hoeffding_bentkus_pvalue(mean, n, delta)
                assert hb <= hoeffding_pvalue(mean, n, delta) + 1e-15
                assert hb <= bentkus_pvalue(mean, n, delta) + 1e-15


def test_bentkus_matches_exact_binomial():
    n, delta = 40, Fraction(1, 4)
    for k in (0, 3, 7):
        exact = sum(math.comb(n, i) * delta**i * (1 - delta) ** (n - i) for i in range(k + 1))
        assert bentkus_pvalue(k / n, n, 0.25) == pytest.approx(min(1.0, math.e * float(exact)), rel=1e-10)


def test_logspace_binomial_cdf_matches_exact():
    p = Fraction(1, 10)
    for n, k in [(10, 0), (10, 3), (200, 20), (1000, 60), (1000, 1000), (5, -1)]:
        exact = sum(math.comb(n, i) * p**i * (1 - p) ** (n - i) for i in range(max(k, -1) + 1))
        assert ltt._binom_cdf_logspace(k, n, 0.1) == pytest.approx(float(exact), rel=1e-9)


def test_logspace_binomial_cdf_matches_scipy_if_available():
    stats = pytest.importorskip("scipy.stats")
    for n, k, p in [(50, 5, 0.2), (500, 30, 0.1), (3000, 100, 0.05)]:
        assert ltt._binom_cdf_logspace(k, n, p) == pytest.approx(float(stats.binom.cdf(k, n, p)), rel=1e-8)


@pytest.mark.parametrize("fn", PVALUE_FNS)
@pytest.mark.parametrize(
    "args, match",
    [
        ((0.1, 0, 0.2), "n must be"),
        ((0.1, 10, 0.0), "delta"),
        ((0.1, 10, 1.0), "delta"),
        ((float("nan"), 10, 0.2), "mean_loss"),
        ((1.5, 10, 0.2), "mean_loss"),
        ((0.1, 10, float("nan")), "delta"),
    ],
)
def test_pvalue_bad_inputs(fn, args, match):
    with pytest.raises(ValueError, match=match):
        fn(*args)


# --------------------------------------------------------------------------
# fixed-sequence testing
# --------------------------------------------------------------------------


def test_fixed_sequence_stops_at_first_non_rejection():
    n = 400
    losses = np.zeros((4, n))
    losses[1, : n // 2] = 1.0  # mean 0.5 -> not rejected
    # index 2 and 3 are perfect but must not be reached
    res = fixed_sequence_test(losses, delta=0.1, epsilon=0.1)
    assert isinstance(res, LTTResult)
    assert res.certified_index == 0
    assert res.pvalues[0] <= 0.1 < res.pvalues[1]
    assert res.pvalues[2] <= 0.1 and res.pvalues[3] <= 0.1
    assert (res.delta, res.epsilon, res.method, res.n) == (0.1, 0.1, "hb", n)
    assert len(res.pvalues) == 4 and all(isinstance(p, float) for p in res.pvalues)


def test_fixed_sequence_all_rejected_returns_last_index():
    res = fixed_sequence_test(np.zeros((3, 100)), delta=0.2, epsilon=0.05, method="hoeffding")
    assert res.certified_index == 2
    assert res.method == "hoeffding"


def test_fixed_sequence_unknown_method():
    with pytest.raises(ValueError, match="method"):
        fixed_sequence_test(np.zeros((2, 10)), 0.1, 0.1, method="bonferroni")


# --------------------------------------------------------------------------
# statistical guarantee on synthetic losses with known truth
# --------------------------------------------------------------------------

DELTA, EPS, N, DRAWS, K = 0.2, 0.1, 200, 1000, 41
TRUE_RISKS = np.linspace(0.0, 0.4, K)  # index 0 = most conservative
THRESHOLDS = np.linspace(0.99, 0.5, K)  # decreasing confidence threshold


def _synthetic_losses(kind: str, rng: np.random.Generator) -> np.ndarray:
    """[DRAWS, K, N] losses with E[loss_k] = TRUE_RISKS[k]."""
    if kind == "bernoulli":
        # Nested (comonotone) losses, like real early-exit errors: an example
        # that fails at a conservative threshold also fails at looser ones.
        u = rng.random((DRAWS, 1, N))
        return (u < TRUE_RISKS[None, :, None]).astype(np.float64)
    conc = 2.0  # Beta(r c, (1 - r) c) has mean r
    a = np.maximum(TRUE_RISKS * conc, 1e-12)[None, :, None]
    b = ((1.0 - TRUE_RISKS) * conc)[None, :, None]
    losses = rng.beta(a, b, size=(DRAWS, K, N))
    losses[:, TRUE_RISKS == 0.0, :] = 0.0
    return losses


def _allowed_rate(eps: float, draws: int) -> float:
    return eps + 3.0 * math.sqrt(eps * (1.0 - eps) / draws)


@pytest.mark.parametrize("kind", ["bernoulli", "beta"])
@pytest.mark.parametrize("method", ["hb", "hoeffding"])
def test_ltt_risk_guarantee_and_power(kind, method):
    rng = np.random.default_rng(1234)
    losses = _synthetic_losses(kind, rng)
    chosen = np.full(DRAWS, -1)
    for d in range(DRAWS):
        out = ltt_calibrate(THRESHOLDS, losses[d], DELTA, EPS, method)
        if out.index is not None:
            chosen[d] = out.index
            assert out.threshold == THRESHOLDS[out.index]
    certified = chosen >= 0
    true_risk = np.where(certified, TRUE_RISKS[np.maximum(chosen, 0)], 0.0)
    violation_rate = np.mean(true_risk > DELTA)
    assert violation_rate <= _allowed_rate(EPS, DRAWS)
    # Not trivially conservative: almost always goes past index 0, and the
    # typical certified threshold has a substantial true risk.
    assert np.mean(chosen >= 1) >= 0.95
    assert np.median(true_risk) >= 0.1


def test_synthetic_check_detects_an_invalid_procedure():
    """Sanity check of the harness: the naive rule 'take the loosest threshold
    whose empirical risk is <= delta' violates the guarantee far more often."""
    rng = np.random.default_rng(99)
    losses = _synthetic_losses("bernoulli", rng)
    means = losses.mean(axis=2)  # [DRAWS, K]
    ok = means <= DELTA
    naive = np.where(ok.any(axis=1), K - 1 - np.argmax(ok[:, ::-1], axis=1), -1)
    naive_risk = np.where(naive >= 0, TRUE_RISKS[np.maximum(naive, 0)], 0.0)
    assert np.mean(naive_risk > DELTA) > 3 * _allowed_rate(EPS, DRAWS)


@pytest.mark.parametrize("method", ["hb", "hoeffding"])
def test_single_hypothesis_type_one_error(method):
    """Every threshold is slightly too risky: certifying anything is an error."""
    draws, n, risk = 2000, 200, DELTA + 0.01
    rng = np.random.default_rng(7)
    counts = rng.binomial(n, risk, size=draws)
    rejected = 0
    for c in counts:
        row = np.zeros((1, n))
        row[0, :c] = 1.0
        rejected += fixed_sequence_test(row, DELTA, EPS, method).certified_index is not None
    assert rejected / draws <= _allowed_rate(EPS, draws)


# --------------------------------------------------------------------------
# ltt_calibrate outcomes and validation
# --------------------------------------------------------------------------


def test_nothing_certified_returns_none_and_says_so():
    losses = np.ones((3, 50))
    out = ltt_calibrate([0.9, 0.8, 0.7], losses, delta=0.1, epsilon=0.1)
    assert isinstance(out, CalibrationOutcome)
    assert out.threshold is None and out.index is None
    assert out.ltt.certified_index is None
    s = out.summary()
    assert "no threshold is certified at δ=0.1, ε=0.1 with n=50 examples" in s


def test_small_sample_cannot_certify():
    # Perfect losses, but n is too small for the bound to reach epsilon.
    out = ltt_calibrate([0.9, 0.8], np.zeros((2, 5)), delta=0.1, epsilon=0.05)
    assert out.threshold is None


def test_certified_summary():
    losses = np.zeros((3, 300))
    losses[2, :150] = 1.0
    out = ltt_calibrate([0.9, 0.8, 0.7], losses, delta=0.1, epsilon=0.1)
    assert out.index == 1 and out.threshold == 0.8
    s = out.summary()
    assert s.startswith("certified threshold λ=0.8 (P(mean D ≤ δ) ≥ 1−ε")
    assert "δ=0.1" in s and "ε=0.1" in s and "n=300" in s


def test_increasing_thresholds_are_accepted():
    out = ltt_calibrate([1.0, 2.0, 3.0], np.zeros((3, 300)), 0.1, 0.1)
    assert out.threshold == 3.0


@pytest.mark.parametrize(
    "thresholds, losses, delta, epsilon, method, match",
    [
        ([0.9, 0.9, 0.7], np.zeros((3, 10)), 0.1, 0.1, "hb", "strictly monotone"),
        ([0.9, 0.7, 0.8], np.zeros((3, 10)), 0.1, 0.1, "hb", "strictly monotone"),
        ([0.9, float("nan")], np.zeros((2, 10)), 0.1, 0.1, "hb", "finite"),
        ([0.9, 0.8], np.zeros((3, 10)), 0.1, 0.1, "hb", "shapes must agree"),
        ([0.9, 0.8], np.zeros(10), 0.1, 0.1, "hb", "2-D"),
        ([0.9, 0.8], np.zeros((2, 0)), 0.1, 0.1, "hb", r"n == 0"),
        ([], np.zeros((0, 10)), 0.1, 0.1, "hb", r"K == 0"),
        ([0.9, 0.8], np.full((2, 10), 1.5), 0.1, 0.1, "hb", r"\[0, 1\]"),
        ([0.9, 0.8], np.full((2, 10), -0.1), 0.1, 0.1, "hb", r"\[0, 1\]"),
        ([0.9, 0.8], np.array([[0.0, np.nan], [0.0, 0.0]]), 0.1, 0.1, "hb", "NaN"),
        ([0.9, 0.8], np.zeros((2, 10)), 0.0, 0.1, "hb", "delta"),
        ([0.9, 0.8], np.zeros((2, 10)), 1.0, 0.1, "hb", "delta"),
        ([0.9, 0.8], np.zeros((2, 10)), 0.1, 0.0, "hb", "epsilon"),
        ([0.9, 0.8], np.zeros((2, 10)), 0.1, 1.5, "hb", "epsilon"),
        ([0.9, 0.8], np.zeros((2, 10)), 0.1, float("nan"), "hb", "epsilon"),
        ([0.9, 0.8], np.zeros((2, 10)), 0.1, 0.1, "bentkus!", "method"),
    ],
)
def test_ltt_calibrate_bad_inputs(thresholds, losses, delta, epsilon, method, match):
    with pytest.raises(ValueError, match=match):
        ltt_calibrate(thresholds, losses, delta, epsilon, method)


# --------------------------------------------------------------------------
# the same guarantee on risk-consistency losses
# --------------------------------------------------------------------------

RISK_DELTA, RISK_K, POPULATION = 0.05, 21, 200_000


def _risk_population(rng: np.random.Generator) -> np.ndarray:
    """[K, POPULATION] risk losses max(0, R_full − R_early) shaped like ROUGE-L's: R_full ~ Beta(2, 8); at
    threshold k a nested share of examples (u < p_k) loses a Beta(2, 2) fraction of its R_full, and every
    early output's R moves by a little noise either way (outputs better than the full one lose nothing)."""
    r_full = rng.beta(2.0, 8.0, POPULATION)
    u, severity = rng.random(POPULATION), rng.beta(2.0, 2.0, POPULATION)
    noise = rng.normal(0.0, 0.03, POPULATION)
    p = np.linspace(0.0, 1.0, RISK_K)[:, None]
    r_early = np.clip(r_full - np.where(u < p, severity * r_full, 0.0) + np.where(p > 0, noise, 0.0), 0.0, 1.0)
    return np.maximum(0.0, r_full - r_early)


@pytest.mark.parametrize("method", ["hb", "hoeffding"])
def test_ltt_risk_consistency_guarantee_on_risk_losses(method):
    """1000 calibration draws of N examples from a population whose true mean risk per threshold is
    known: the certified threshold's true risk exceeds δ in at most ε of them (within sampling error)."""
    rng = np.random.default_rng(2024)
    population = _risk_population(rng)
    true_risks = population.mean(axis=1)
    assert true_risks[0] == 0.0 and true_risks[-1] > 2 * RISK_DELTA  # the grid crosses δ
    thresholds = np.linspace(0.99, 0.5, RISK_K)
    chosen = np.full(DRAWS, -1)
    for d in range(DRAWS):
        sample = population[:, rng.integers(0, POPULATION, N)]
        out = ltt_calibrate(thresholds, sample, RISK_DELTA, EPS, method)
        chosen[d] = -1 if out.index is None else out.index
    true_risk = np.where(chosen >= 0, true_risks[np.maximum(chosen, 0)], 0.0)
    assert np.mean(true_risk > RISK_DELTA) <= _allowed_rate(EPS, DRAWS)
    assert np.mean(chosen >= 1) >= 0.95 and np.median(true_risk) >= 0.3 * RISK_DELTA  # and not trivially safe
