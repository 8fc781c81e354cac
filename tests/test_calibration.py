"""Tests for calm.calibration (Learn-then-Test statistics)."""

from __future__ import annotations

import json
import math
from fractions import Fraction

import numpy as np
import pytest

from calm import calibration as cal
from calm.calibration import (
    CalibrationOutcome,
    CalibrationRow,
    CalibrationTable,
    LTTResult,
    bentkus_pvalue,
    build_calibration_table,
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
        exact = sum(
            math.comb(n, i) * delta**i * (1 - delta) ** (n - i) for i in range(k + 1)
        )
        assert bentkus_pvalue(k / n, n, 0.25) == pytest.approx(
            min(1.0, math.e * float(exact)), rel=1e-10
        )


def test_logspace_binomial_cdf_matches_exact():
    p = Fraction(1, 10)
    for n, k in [(10, 0), (10, 3), (200, 20), (1000, 60), (1000, 1000), (5, -1)]:
        exact = sum(math.comb(n, i) * p**i * (1 - p) ** (n - i) for i in range(max(k, -1) + 1))
        assert cal._binom_cdf_logspace(k, n, 0.1) == pytest.approx(float(exact), rel=1e-9)


def test_logspace_binomial_cdf_matches_scipy_if_available():
    stats = pytest.importorskip("scipy.stats")
    for n, k, p in [(50, 5, 0.2), (500, 30, 0.1), (3000, 100, 0.05)]:
        assert cal._binom_cdf_logspace(k, n, p) == pytest.approx(
            float(stats.binom.cdf(k, n, p)), rel=1e-8
        )


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
# CalibrationTable
# --------------------------------------------------------------------------


def _table(certified_index: int | None = 3) -> CalibrationTable:
    layers = [24.0, 20.0, 16.0, 12.0, 8.0]
    rows = tuple(
        CalibrationRow(
            threshold=0.95 - 0.1 * i,
            mean_loss=0.02 * i,
            q50=0.0,
            q90=0.05 * i,
            q95=0.06 * i,
            avg_layers=layers[i],
            speedup=24.0 / layers[i],
            pvalue=min(1.0, 1e-6 * 10 ** (2 * i)),
        )
        for i in range(5)
    )
    return CalibrationTable(rows, certified_index, delta=0.1, epsilon=0.1, n=200, method="hb")


def test_table_round_trip_dict_and_json():
    table = _table()
    d = table.to_dict()
    restored = CalibrationTable.from_dict(json.loads(json.dumps(d)))
    assert restored == table
    assert restored.certified_index == 3
    assert CalibrationTable.from_dict(d) == table
    none_table = _table(None)
    assert CalibrationTable.from_dict(json.loads(json.dumps(none_table.to_dict()))) == none_table


def test_table_from_dict_errors():
    d = _table().to_dict()
    with pytest.raises(ValueError, match="version"):
        CalibrationTable.from_dict({**d, "version": 99})
    with pytest.raises(ValueError, match="rows"):
        CalibrationTable.from_dict({k: v for k, v in d.items() if k != "rows"})
    bad_row = {k: v for k, v in d["rows"][0].items() if k != "q95"}
    with pytest.raises(ValueError, match="q95"):
        CalibrationTable.from_dict({**d, "rows": [bad_row]})
    with pytest.raises(ValueError, match="certified_index"):
        CalibrationTable.from_dict({**d, "certified_index": 7})


def test_table_validation():
    rows = _table().rows
    with pytest.raises(ValueError, match="at least one row"):
        CalibrationTable((), None)
    with pytest.raises(ValueError, match="strictly monotone"):
        CalibrationTable((rows[0], rows[2], rows[1]), None)
    with pytest.raises(ValueError, match="finite"):
        CalibrationRow(0.9, float("nan"), 0, 0, 0, 10, 1, 0.5)


def test_speed_to_threshold_endpoints_and_interpolation():
    table = _table()
    assert table.speed_to_threshold(0.0) == table.rows[0].threshold
    assert table.speed_to_threshold(1.0) == table.rows[3].threshold
    # layers 24 -> 12 between speed 0 and 1: target = 24 - 12 * speed
    assert table.speed_to_threshold(1 / 3) == table.rows[1].threshold  # target 20 exactly
    assert table.speed_to_threshold(0.5) == table.rows[1].threshold  # target 18 -> row with 20
    assert table.speed_to_threshold(0.7) == table.rows[2].threshold  # target 15.6 -> row with 16
    # never returns a threshold past the certified one
    speeds = np.linspace(0.0, 1.0, 101)
    chosen = [table.thresholds.index(table.speed_to_threshold(s)) for s in speeds]
    assert all(0 <= c <= 3 for c in chosen)
    assert chosen == sorted(chosen)


def test_speed_to_threshold_errors():
    table = _table()
    for bad in (-0.01, 1.01, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="speed"):
            table.speed_to_threshold(bad)
    with pytest.raises(ValueError, match="no threshold is certified"):
        _table(None).speed_to_threshold(0.5)


def test_build_calibration_table_from_ltt():
    rng = np.random.default_rng(0)
    thresholds = [0.9, 0.8, 0.7]
    losses = (rng.random((3, 400)) < np.array([[0.0], [0.03], [0.3]])).astype(float)
    out = ltt_calibrate(thresholds, losses, 0.1, 0.1)
    table = build_calibration_table(thresholds, losses, [24, 18, 10], [1.0, 1.3, 2.4], out.ltt)
    assert table.certified_index == out.index == 1
    assert table.certified_threshold == 0.8
    assert [r.pvalue for r in table.rows] == list(out.ltt.pvalues)
    assert table.rows[1].mean_loss == pytest.approx(losses[1].mean())
    assert table.rows[2].q50 == 0.0 and table.rows[2].q95 == 1.0
    assert (table.delta, table.epsilon, table.n, table.method) == (0.1, 0.1, 400, "hb")
    assert CalibrationTable.from_dict(json.loads(json.dumps(table.to_dict()))) == table
    with pytest.raises(ValueError, match="K=3"):
        build_calibration_table(thresholds, losses, [24, 18], [1.0, 1.3, 2.4], out.ltt)


def test_a_speedup_not_timed_is_stored_as_none_and_read_back_as_nan():
    import math

    row = CalibrationRow(threshold=0.9, mean_loss=0.1, q50=0.0, q90=0.2, q95=0.3, avg_layers=20.0,
                         speedup=math.nan, pvalue=0.01)
    assert row.to_dict()["speedup"] is None
    assert math.isnan(CalibrationRow(**row.to_dict()).speedup)
    with pytest.raises(ValueError):
        CalibrationRow(**{**row.to_dict(), "avg_layers": math.nan})
