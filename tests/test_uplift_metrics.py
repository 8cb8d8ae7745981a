"""Our uplift metrics against scikit-uplift's (``sklift.metrics``) on random and adversarial inputs."""
from __future__ import annotations

import warnings

import numpy as np
import pytest

from training import uplift_metrics as um



def _import_sklift():
    """scikit-uplift (pinned in the ``test`` extra) is the reference: a missing one fails, never skips.

    Its last release (0.5.1) imports ``sklearn.utils.extmath.stable_cumsum``, deprecated in
    scikit-learn 1.8 and due to go in 1.10. When it is gone, put back the function it was (a float64
    cumsum) before importing, so the comparison stays against scikit-uplift's own code."""
    import sklearn.utils.extmath as extmath
    if not hasattr(extmath, "stable_cumsum"):
        extmath.stable_cumsum = lambda arr, axis=None, rtol=1e-05, atol=1e-08: np.cumsum(arr, axis=axis, dtype=np.float64)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        import sklift.metrics
    return sklift.metrics


sk = _import_sklift()


def _sk(fn, *args, **kwargs):
    with warnings.catch_warnings():  # sklift uses deprecated sklearn helpers and warns on empty means
        warnings.simplefilter("ignore")
        return fn(*args, **kwargs)


def _cases():
    rng = np.random.default_rng(0)
    cases = []
    for i in range(12):
        n = int(rng.integers(5, 400))
        y = rng.integers(0, 2, n)
        t = rng.integers(0, 2, n)
        t[0], t[1] = 0, 1
        y[2], y[3] = 0, 1
        if i % 3 == 0:
            u = rng.normal(size=n)
        elif i % 3 == 1:
            u = rng.integers(0, 4, n).astype(float)  # heavy ties
        else:
            u = np.round(y * t - y * (1 - t) + rng.normal(0, 0.3, n), 1)  # informative, with ties
        cases.append((f"random{i}", y, u, t))
    n = 50
    y = rng.integers(0, 2, n)
    y[:2] = [0, 1]
    t = np.r_[np.zeros(25, int), np.ones(25, int)]
    cases.append(("all_tied", y, np.zeros(n), t))
    cases.append(("one_control", y, rng.normal(size=n), np.r_[0, np.ones(n - 1, int)]))
    cases.append(("one_treated", y, rng.normal(size=n), np.r_[1, np.zeros(n - 1, int)]))
    cases.append(("sorted_by_treatment", y, t.astype(float), t))
    cases.append(("float_labels", y.astype(float), rng.normal(size=n), t.astype(float)))
    return cases


CASES = _cases()
IDS = [c[0] for c in CASES]


@pytest.mark.parametrize("name,y,u,t", CASES, ids=IDS)
def test_curves_match_sklift(name, y, u, t):
    for ours, theirs in ((um.qini_curve, sk.qini_curve), (um.uplift_curve, sk.uplift_curve)):
        x1, y1 = ours(y, u, t)
        x2, y2 = _sk(theirs, y, u, t)
        np.testing.assert_array_equal(x1, x2)
        np.testing.assert_allclose(y1, y2, rtol=1e-12, atol=1e-9)
    for neg in (True, False):
        np.testing.assert_allclose(um.perfect_qini_curve(y, t, neg), _sk(sk.perfect_qini_curve, y, t, neg), atol=1e-9)
    np.testing.assert_allclose(um.perfect_uplift_curve(y, t), _sk(sk.perfect_uplift_curve, y, t), atol=1e-9)


@pytest.mark.parametrize("name,y,u,t", CASES, ids=IDS)
def test_scores_match_sklift(name, y, u, t):
    for neg in (True, False):
        try:
            theirs = _sk(sk.qini_auc_score, y, u, t, neg)
        except ValueError:
            # scikit-uplift's perfect curve without negative effects uses the random gain as an x
            # coordinate; when that gain is negative sklearn's auc() refuses the curve. Ours integrates it.
            assert not neg and np.isfinite(um.qini_auc_score(y, u, t, neg))
            continue
        np.testing.assert_allclose(um.qini_auc_score(y, u, t, neg), theirs, rtol=1e-9, atol=1e-12, equal_nan=True)
    np.testing.assert_allclose(um.uplift_auc_score(y, u, t), _sk(sk.uplift_auc_score, y, u, t),
                               rtol=1e-9, atol=1e-12, equal_nan=True)


@pytest.mark.parametrize("name,y,u,t", CASES, ids=IDS)
@pytest.mark.parametrize("strategy", ["overall", "by_group"])
@pytest.mark.parametrize("k", [0.1, 0.3, 0.5, 0.99, 3])
def test_uplift_at_k_matches_sklift(name, y, u, t, strategy, k):
    try:
        theirs = _sk(sk.uplift_at_k, y, u, t, strategy, k)
    except ValueError:
        with pytest.raises(ValueError):
            um.uplift_at_k(y, u, t, strategy, k)
        return
    np.testing.assert_allclose(um.uplift_at_k(y, u, t, strategy, k), theirs, equal_nan=True)


@pytest.mark.parametrize("t", [np.ones(20, int), np.zeros(20, int)], ids=["all_treated", "all_control"])
def test_single_group_is_refused_like_sklift(t):
    y = np.r_[np.zeros(10, int), np.ones(10, int)]
    u = np.linspace(0, 1, 20)
    for ours, theirs in ((um.qini_auc_score, sk.qini_auc_score), (um.uplift_auc_score, sk.uplift_auc_score),
                         (um.qini_curve, sk.qini_curve), (um.uplift_curve, sk.uplift_curve)):
        with pytest.raises(ValueError):
            _sk(theirs, y, u, t)
        with pytest.raises(ValueError, match="both treated and control"):
            ours(y, u, t)
    with pytest.raises(ValueError):
        um.uplift_at_k(y, u, t, "overall", 0.5)
    with pytest.raises(ValueError):
        um.cost_curve(y, u, t, t)


def test_bad_inputs_are_refused():
    y, t = np.array([0, 1, 0, 1]), np.array([0, 0, 1, 1])
    with pytest.raises(ValueError, match="binary"):
        um.qini_curve(np.array([0, 2, 0, 1]), np.zeros(4), t)
    with pytest.raises(ValueError, match="binary"):
        um.qini_curve(y, np.zeros(4), np.array([0, 1, 2, 1]))
    with pytest.raises(ValueError, match="lengths"):
        um.uplift_curve(y, np.zeros(3), t)
    with pytest.raises(ValueError, match="finite"):
        um.uplift_curve(y, np.array([0, np.nan, 1, 2]), t)
    with pytest.raises(ValueError):
        um.uplift_at_k(y, np.zeros(4), t, "top", 0.5)
    with pytest.raises(ValueError):
        um.uplift_at_k(y, np.zeros(4), t, "overall", 1.5)


def test_constant_outcome_gives_flat_curves_and_nan_scores():
    """scikit-uplift refuses an all-0 outcome; we return flat curves and NaN coefficients."""
    y, t = np.zeros(10, int), np.r_[np.zeros(5, int), np.ones(5, int)]
    u = np.arange(10.0)
    assert np.all(um.qini_curve(y, u, t)[1] == 0)
    assert np.isnan(um.qini_auc_score(y, u, t))
    assert np.isnan(um.uplift_auc_score(y, u, t))


@pytest.mark.parametrize("name,y,u,t", CASES, ids=IDS)
def test_cost_curve_with_unit_costs_is_the_uplift_curve(name, y, u, t):
    n, spend, incremental = um.cost_curve(y, u, t, cost=t)
    x_ref, y_ref = _sk(sk.uplift_curve, y, u, t)
    # uplift_curve only adds the origin when its first point is not already (0, 0)
    if len(x_ref) < len(n):
        x_ref, y_ref = np.r_[0, x_ref], np.r_[0.0, y_ref]
    np.testing.assert_array_equal(n, x_ref)
    np.testing.assert_allclose(incremental, y_ref, atol=1e-9)
    treated_seen = np.r_[0, np.cumsum(t[np.argsort(u, kind="mergesort")[::-1]])][n]
    np.testing.assert_allclose(spend, np.where(treated_seen > 0, n, 0.0))


def test_cost_curve_profit_on_a_known_experiment():
    rng = np.random.default_rng(1)
    n = 40000
    good = rng.random(n) < 0.5  # coupon lifts purchase 0.1 -> 0.4 for "good" users, nothing for others
    t = rng.integers(0, 2, n)
    p = np.where(t == 1, np.where(good, 0.4, 0.1), 0.1)
    y = (rng.random(n) < p).astype(int)
    redeemed = y * t
    gain = 0.3 * 50.0 * y  # margin x order value
    cost = 5.0 * redeemed
    score = good + rng.normal(0, 0.01, n)
    rows, spend, incremental = um.cost_curve(gain, score, t, cost)
    half = np.searchsorted(rows, n // 2)
    # targeting the good half: incremental gross profit 0.3 x 15 x n/2, spend 0.4 x 5 x n/2
    assert incremental[half] == pytest.approx(0.3 * 15.0 * n / 2, rel=0.05)
    assert spend[half] == pytest.approx(0.4 * 5.0 * n / 2, rel=0.05)
    profit = incremental - spend
    assert profit[half] > profit[-1]  # the rest costs more than it brings


def test_truth_gain_curve_and_report():
    cost, gain = um.truth_gain_curve(np.array([0.1, 0.9, 0.5]), np.array([1.0, 3.0, 2.0]), np.array([1.0, 1.0, 1.0]))
    np.testing.assert_allclose(cost, [0, 1, 2, 3])
    np.testing.assert_allclose(gain, [0, 3, 5, 6])
    c_at, g_at = um.truth_gain_curve(np.array([0.1, 0.9, 0.5]), np.array([1.0, 3.0, 2.0]), np.ones(3), budgets=[1.5])
    assert c_at[0] == 1 and g_at[0] == 3
    rng = np.random.default_rng(3)
    y, t = rng.integers(0, 2, 100), rng.integers(0, 2, 100)
    report = um.uplift_report(y, rng.normal(size=100), t)
    assert set(report) >= {"qini", "auuc", "uplift@0.3", "uplift@0.3_by_group", "n"}
