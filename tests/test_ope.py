"""Off-policy evaluation (training.ope) against values known exactly from the simulator's truth.

Logged data: simulated users x the ledger's own logging policy (``server.ledger.choose``: holdout,
uniform exploration over the eligible coupons, the served policy's choice, propensities as the ledger
records them), outcomes drawn from the TRUE probabilities (``training.simulate.sample_outcomes``). The
true value of a deterministic target policy is then the population mean of the true expected reward of
its action, computed exactly, so interval coverage can be checked.
"""
from __future__ import annotations

import random

import numpy as np
import pandas as pd
import pytest

from server.ledger import choose
from training.ope import (OPEError, StochasticTarget, check_rows, evaluate, logging_policy_target, on_policy,
                          profit_reward)
from training.simulate import SimConfig, recompute_truth, sample_outcomes, simulate

SIM = SimConfig(n_users=1500, n_categories=30, n_items=400, n_coupons=8, seed=7)
H, E = 0.1, 0.3  # holdout and exploration shares of the logging policy
MARGIN = 0.3
N_ROWS = 20_000


@pytest.fixture(scope="module")
def truth():
    return recompute_truth(SIM)


@pytest.fixture(scope="module")
def costs(tmp_path_factory):
    """The catalog's coupon costs (the profit reward's), from the same simulated world."""
    out = tmp_path_factory.mktemp("ope_sim")
    simulate(SIM, out)
    catalog = pd.read_csv(out / "coupons.csv", dtype={"coupon_id": str})
    return dict(zip(catalog["coupon_id"], catalog["cost"]))


def served_policy(truth, noise_seed: int = 123) -> np.ndarray:
    """The logging policy's model: a noisy view of the true uplift; its best coupon if positive, else none."""
    noisy = truth.p_buy_coupon - truth.p_buy_control[:, None]
    noisy = noisy + np.random.default_rng(noise_seed).normal(0.0, 0.05, noisy.shape)
    best = noisy.argmax(axis=1)
    return np.where(noisy.max(axis=1) > 0, truth.coupon_ids[best], "").astype(object)


def target_policies(truth) -> dict[str, np.ndarray]:
    """Deterministic targets, per user: a coupon id or '' (none)."""
    uplift = truth.p_buy_coupon - truth.p_buy_control[:, None]
    n = len(truth.user_ids)
    return {
        "oracle_uplift": truth.coupon_ids[uplift.argmax(axis=1)].astype(object),
        "no_coupon": np.full(n, "", dtype=object),
        "one_coupon": np.full(n, truth.coupon_ids[2], dtype=object),
        # something the logging policy rarely does: the WORST coupon by true uplift
        "worst_uplift": truth.coupon_ids[uplift.argmin(axis=1)].astype(object),
    }


def true_value(truth, actions: np.ndarray, costs=None) -> float:
    """Exact population value of a deterministic per-user policy: purchase rate, or with ``costs`` the
    expected profit margin x E[order value | buy] x p_buy - cost x p_redeem."""
    col = {c: j for j, c in enumerate(truth.coupon_ids.tolist())}
    idx = np.array([col.get(a, -1) for a in actions.tolist()])
    rows = np.arange(len(idx))
    treated = idx >= 0
    safe = np.maximum(idx, 0)
    p_buy = np.where(treated, truth.p_buy_coupon[rows, safe], truth.p_buy_control)
    if costs is None:
        return float(p_buy.mean())
    eov = np.where(treated, truth.expected_order_value[rows, safe], truth.basket)
    cost = np.where(treated, np.array([costs[c] for c in truth.coupon_ids.tolist()])[safe], 0.0)
    p_red = np.where(treated, truth.p_redeem[rows, safe], 0.0)
    return float((MARGIN * eov * p_buy - cost * p_red).mean())


def logged_data(truth, policy: np.ndarray, n_rows: int, seed: int) -> tuple[pd.DataFrame, np.ndarray]:
    """``n_rows`` decisions of the ledger's logging policy on users drawn uniformly; returns the rows in
    the ledger's export layout and the user index of each row."""
    rng = np.random.default_rng(seed)
    draw = random.Random(seed)
    users = rng.integers(len(truth.user_ids), size=n_rows)
    eligible = truth.coupon_ids.tolist()
    col = {c: j for j, c in enumerate(eligible)}
    coupon, arm, prop = [], [], []
    for i, u in enumerate(users.tolist()):
        ranked = [policy[u]] if policy[u] else []
        # one campaign per row: the holdout hash is a fresh draw for every decision
        c = choose(f"ope-{seed}-{i}", str(truth.user_ids[u]), ranked, eligible, H, E, draw)
        coupon.append(c.coupon_id or "")
        arm.append(c.arm)
        prop.append(c.propensity)
    idx = np.array([col.get(c, -1) for c in coupon])
    treated = idx >= 0
    safe = np.maximum(idx, 0)
    p_buy = np.where(treated, truth.p_buy_coupon[users, safe], truth.p_buy_control[users])
    p_red = np.where(treated, truth.p_redeem[users, safe], 0.0)
    eov = np.where(treated, truth.expected_order_value[users, safe], truth.basket[users])
    purchased, redeemed, order_value = sample_outcomes(p_buy, p_red, eov, rng)
    rows = pd.DataFrame({"user_id": truth.user_ids[users], "coupon_id": coupon, "issued_ts": 1.7e9 + np.arange(n_rows),
                         "redeemed": redeemed, "purchased": purchased, "order_value": order_value,
                         "campaign_id": "ope", "decision_id": [f"d{i}" for i in range(n_rows)], "arm": arm,
                         "propensity": prop})
    return rows, users


@pytest.fixture(scope="module")
def logged(truth):
    return logged_data(truth, served_policy(truth), N_ROWS, seed=0)


def test_propensities_are_the_logging_distribution(truth, logged):
    rows, users = logged
    assert ((rows["propensity"] > 0) & (rows["propensity"] <= 1)).all()
    # explore rows give each coupon with probability E / C; the ledger's propensity adds the policy share
    # when the coupon is also the policy's choice
    policy = served_policy(truth)[users]
    explore = rows["arm"] == "explore"
    expected = np.where(rows["coupon_id"] == policy, E / len(truth.coupon_ids) + 1 - H - E, E / len(truth.coupon_ids))
    assert np.allclose(rows.loc[explore, "propensity"], expected[explore.to_numpy()])
    # the arms' shares are the configured ones
    assert abs((rows["arm"] == "holdout").mean() - H) < 0.01
    assert abs((rows["arm"] == "explore").mean() - E) < 0.015


@pytest.mark.parametrize("name", ["oracle_uplift", "no_coupon", "one_coupon", "worst_uplift"])
def test_intervals_cover_the_true_purchase_rate(truth, logged, name):
    rows, users = logged
    actions = target_policies(truth)[name]
    value = true_value(truth, actions)
    est = evaluate(rows, actions[users], reward="purchased", seed=0)
    for e in est.values():
        assert e.covers(value), f"{name} {e.estimator}: {e.value:.4f} [{e.ci_low:.4f}, {e.ci_high:.4f}] vs {value:.4f}"
        assert e.ci_high - e.ci_low < 0.08  # informative, not just wide
    assert est["dr"].se <= est["ips"].se * 1.05  # the outcome model does not make things worse


def test_intervals_cover_the_true_profit(truth, logged, costs):
    rows, users = logged
    reward = profit_reward(MARGIN, costs)
    for name in ("oracle_uplift", "no_coupon"):
        actions = target_policies(truth)[name]
        value = true_value(truth, actions, costs)
        est = evaluate(rows, actions[users], reward=reward, seed=1)
        for e in est.values():
            assert e.covers(value), f"{name} {e.estimator}: {e.value:.4f} [{e.ci_low:.4f}, {e.ci_high:.4f}] vs {value:.4f}"


def test_ridge_outcome_model_with_features(truth, logged):
    rows, users = logged
    actions = target_policies(truth)["oracle_uplift"]
    value = true_value(truth, actions)
    # features a model could give: a noisy view of each user's control purchase propensity and basket
    rng = np.random.default_rng(9)
    feats = np.c_[np.log(truth.p_buy_control[users]) + rng.normal(0, 0.3, len(users)), np.log(truth.basket[users])]
    dr = evaluate(rows, actions[users], estimators=("dr",), outcome_model="ridge", features=feats)["dr"]
    mean_dr = evaluate(rows, actions[users], estimators=("dr",))["dr"]
    assert dr.covers(value)
    assert dr.se < mean_dr.se  # an informative outcome model tightens the interval


def test_coverage_over_seeds(truth):
    """Over 20 independent logs the 95% intervals cover the truth most of the time (DR >= 17 of 20)."""
    policy = served_policy(truth)
    actions = target_policies(truth)["oracle_uplift"]
    value = true_value(truth, actions)
    hits = {"ips": 0, "snips": 0, "dr": 0}
    for seed in range(20):
        rows, users = logged_data(truth, policy, 8000, seed=100 + seed)
        for name, e in evaluate(rows, actions[users], seed=seed, n_folds=3).items():
            hits[name] += e.covers(value)
    print(f"\ncoverage over 20 seeds (true value {value:.4f}): {hits}")
    assert hits["dr"] >= 17 and hits["ips"] >= 17 and hits["snips"] >= 17


def test_logging_policy_gives_the_on_policy_mean(truth, logged):
    rows, users = logged
    target = logging_policy_target(rows, served_policy(truth)[users], truth.coupon_ids.tolist(), H, E)
    est = evaluate(rows, target, reward="purchased")
    mean = on_policy(rows, "purchased")
    assert est["ips"].value == pytest.approx(mean.value, abs=1e-12)
    assert est["snips"].value == pytest.approx(mean.value, abs=1e-12)
    assert est["ips"].details["max_weight"] == pytest.approx(1.0)
    # DR's correction term has mean ~0 here: within a fraction of the interval
    assert abs(est["dr"].value - mean.value) < 0.25 * (mean.ci_high - mean.ci_low)
    # a deterministic target that takes exactly the logged actions is NOT the logging policy: weights 1/p
    same = evaluate(rows, rows["coupon_id"].to_numpy(), estimators=("ips",))["ips"]
    assert same.details["mean_weight"] > 1.0


def test_bad_inputs_raise(logged):
    rows, _ = logged
    small = rows.head(50).copy()
    target = small["coupon_id"].to_numpy()
    for bad in (0.0, -0.1, 1.5, float("nan")):
        broken = small.copy()
        broken.loc[broken.index[3], "propensity"] = bad
        with pytest.raises(OPEError, match="propensity must be in"):
            evaluate(broken, target)
    with pytest.raises(OPEError, match="missing column"):
        evaluate(small.drop(columns=["propensity"]), target)
    with pytest.raises(OPEError, match="missing column"):
        check_rows(small.drop(columns=["coupon_id"]))
    with pytest.raises(OPEError, match="reward column"):
        evaluate(small, target, reward="margin")
    with pytest.raises(OPEError, match="one action per logged row"):
        evaluate(small, target[:-1])
    with pytest.raises(OPEError, match="no logged rows"):
        evaluate(small.iloc[:0], target[:0])
    with pytest.raises(OPEError, match="unknown estimator"):
        evaluate(small, target, estimators=("switch",))
    with pytest.raises(OPEError, match="needs features"):
        evaluate(small, target, outcome_model="ridge")
    with pytest.raises(OPEError, match="summing to 1"):
        evaluate(small, StochasticTarget(["", "cp01"], np.full((50, 2), 0.7)))
    with pytest.raises(OPEError, match="q_hat"):
        evaluate(small, target, estimators=("dr",), q_hat=np.zeros((50, 1)))
