"""The Lagrangian allocation solver (against scipy's exact MILP), the policy file and per-request decisions."""
from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from runtime.allocation import (NONE, POLICY_FORMAT, Policy, PolicyError, decide, estimate_order_value, expected_spend,
                                incremental_value, load_policy, make_policy, net_scores, rank_with_policy, save_policy,
                                solve)


def exact_optimum(values: np.ndarray, costs: np.ndarray, budget: float, caps: np.ndarray | None = None) -> float:
    """Exact multiple-choice knapsack optimum with scipy's milp (HiGHS)."""
    import scipy.optimize as milp_mod  # in the test extra: a missing scipy fails the test, never skips it
    from scipy.sparse import csr_matrix, eye, kron

    n, c = values.shape
    allowed = np.isfinite(values).ravel()
    v = np.where(allowed, values.ravel(), 0.0)
    constraints = [milp_mod.LinearConstraint(kron(eye(n), np.ones((1, c))), 0, 1),
                   milp_mod.LinearConstraint(csr_matrix(costs.ravel()[None, :]), 0, budget)]
    if caps is not None:
        constraints.append(milp_mod.LinearConstraint(kron(np.ones((1, n)), eye(c)), 0, np.where(np.isinf(caps), n, caps)))
    result = milp_mod.milp(-v, constraints=constraints, integrality=np.ones(n * c),
                           bounds=milp_mod.Bounds(0, allowed.astype(float)), options={"mip_rel_gap": 1e-9})
    assert result.success, result.message
    return -result.fun


def random_instance(seed: int, caps: bool = False):
    rng = np.random.default_rng(seed)
    n, c = int(rng.integers(150, 400)), int(rng.integers(2, 9))
    costs = rng.gamma(2.0, 1.0, (n, c)) * rng.uniform(0.5, 2.0, c)
    values = costs * rng.normal(1.0, 0.6, (n, c)) + rng.normal(0.0, 0.5, (n, c))
    values[rng.random((n, c)) < 0.05] = -np.inf  # some coupons may not go to some users
    full = np.where(values > 0, costs, 0.0).max(axis=1).sum()
    budget = float(full * rng.uniform(0.05, 0.8))
    cap = np.where(rng.random(c) < 0.5, rng.integers(1, max(2, n // c), c), np.inf) if caps else None
    return values, costs, budget, cap


@pytest.mark.parametrize("seed", range(8))
@pytest.mark.parametrize("caps", [False, True], ids=["budget", "budget+caps"])
def test_solver_is_within_one_percent_of_the_exact_optimum(seed, caps):
    values, costs, budget, cap = random_instance(seed, caps)
    choice, lam, stats = solve(values, costs, budget, cap)
    optimum = exact_optimum(values, costs, budget, cap)
    rows = np.flatnonzero(choice >= 0)
    spend = costs[rows, choice[rows]].sum()
    assert spend <= budget * (1 + 1e-12)
    assert stats.spend == pytest.approx(spend)
    assert np.isfinite(values[rows, choice[rows]]).all()
    if cap is not None:
        assert (np.bincount(choice[rows], minlength=len(cap)) <= cap).all()
    assert stats.value >= 0.99 * optimum
    assert stats.dual_bound >= optimum - 1e-6 * abs(optimum)  # the Lagrangian bound is a valid certificate
    assert lam >= 0


ADVERSARIAL = ("ties", "tight", "loose", "free_coupons", "one_dominant")


def adversarial_instance(kind: str):
    rng = np.random.default_rng(ADVERSARIAL.index(kind))
    n, c = 120, 5
    if kind == "ties":  # a handful of distinct values and costs: many exactly equal ratios
        values = rng.integers(-1, 4, (n, c)).astype(float)
        costs = rng.integers(1, 4, (n, c)).astype(float)
        budget = 0.3 * np.where(values > 0, costs, 0).max(axis=1).sum()
    elif kind == "tight":  # the budget funds about 20 of the 120 users
        values, costs = rng.gamma(2.0, 1.0, (n, c)), rng.uniform(5.0, 10.0, (n, c))
        budget = 150.0
    elif kind == "loose":  # the budget is never binding
        values, costs = rng.normal(0.0, 1.0, (n, c)), rng.uniform(0.5, 2.0, (n, c))
        budget = 10.0 * costs.sum()
    elif kind == "free_coupons":  # zero-cost coupons next to costly ones
        values, costs = rng.gamma(2.0, 1.0, (n, c)), rng.uniform(1.0, 3.0, (n, c))
        costs[:, 0] = 0.0
        budget = 0.2 * costs.max(axis=1).sum()
    elif kind == "one_dominant":  # one coupon best for everyone but expensive
        values = rng.uniform(0.0, 1.0, (n, c))
        values[:, 0] += 5.0
        costs = np.ones((n, c))
        costs[:, 0] = 20.0
        budget = 100.0
    else:
        raise ValueError(kind)
    return values, costs, float(budget)


@pytest.mark.parametrize("kind", ADVERSARIAL)
def test_solver_matches_the_exact_optimum_on_adversarial_instances(kind):
    values, costs, budget = adversarial_instance(kind)
    choice, lam, stats = solve(values, costs, budget)
    optimum = exact_optimum(values, costs, budget)
    rows = np.flatnonzero(choice >= 0)
    assert costs[rows, choice[rows]].sum() <= budget * (1 + 1e-12)
    assert stats.value >= 0.99 * optimum - 1e-9
    assert stats.dual_bound >= optimum - 1e-6 * max(1.0, abs(optimum))
    if kind == "loose":  # unconstrained: exactly each user's best positive coupon
        best = values.argmax(axis=1)
        expected = np.where(values[np.arange(len(best)), best] > 0, best, NONE)
        assert lam == 0.0 and (choice == expected).all()


@pytest.mark.parametrize("seed", range(4))
def test_a_budget_for_a_handful_of_coupons_is_certified_by_the_dual_bound(seed):
    """When the budget funds only 2-4 coupons the knapsack is combinatorial: one coupon more or less
    decides the optimum and a multiplier rule plus local exchanges can miss it by several percent. The
    solution stays feasible and ``stats.gap`` (from the Lagrangian bound) always covers the shortfall."""
    rng = np.random.default_rng(100 + seed)
    values, costs = rng.gamma(2.0, 1.0, (120, 5)), rng.uniform(5.0, 10.0, (120, 5))
    choice, _, stats = solve(values, costs, 25.0)
    optimum = exact_optimum(values, costs, 25.0)
    assert stats.spend <= 25.0
    assert stats.value >= 0.85 * optimum
    assert stats.gap >= (optimum - stats.value) / optimum - 1e-9


def test_solver_edge_cases():
    values = np.array([[1.0, 2.0], [-1.0, -2.0], [3.0, 0.5]])
    costs = np.array([[1.0, 1.0], [1.0, 1.0], [0.0, 2.0]])
    choice, lam, stats = solve(values, costs, budget=0.0)
    assert choice.tolist() == [NONE, NONE, 0]  # only the free coupon fits a zero budget
    assert stats.spend == 0.0
    choice, lam, stats = solve(values, costs, budget=1e9)
    assert choice.tolist() == [1, NONE, 0] and lam == 0.0  # unconstrained: each user's best positive coupon
    neg = -np.ones((4, 3))
    assert (solve(neg, np.ones((4, 3)), 10.0)[0] == NONE).all()  # nothing is worth giving
    unavailable = np.array([[np.nan, 1.0], [-np.inf, -np.inf]])
    choice, _, _ = solve(unavailable, np.ones((2, 2)), 5.0)
    assert choice.tolist() == [1, NONE]
    ties = np.ones((50, 3))
    choice, _, stats = solve(ties, np.ones((50, 3)), 10.0)
    assert (choice >= 0).sum() == 10 and stats.spend == 10.0
    choice, _, stats = solve(np.ones((5, 2)), np.ones((5, 2)), 100.0, caps=[1, 2])
    assert np.bincount(choice[choice >= 0], minlength=2).tolist() == [1, 2]
    choice, _, _ = solve(np.ones((3, 2)), np.ones((3, 2)), 100.0, caps=[0, 0])
    assert (choice == NONE).all()


def test_solver_rejects_bad_input():
    with pytest.raises(ValueError, match="values and costs"):
        solve(np.ones((3, 2)), np.ones((3, 3)), 1.0)
    with pytest.raises(ValueError, match="costs"):
        solve(np.ones((3, 2)), -np.ones((3, 2)), 1.0)
    with pytest.raises(ValueError, match="budget"):
        solve(np.ones((3, 2)), np.ones((3, 2)), float("nan"))
    with pytest.raises(ValueError, match="caps"):
        solve(np.ones((3, 2)), np.ones((3, 2)), 1.0, caps=[1, 2, 3])


def test_pure_multiplier_rule_is_what_decide_applies():
    """The edge rule with the solver's multipliers reproduces the solver's choices (before its fill)."""
    rng = np.random.default_rng(5)
    n, c = 3000, 6
    p_redeem = rng.uniform(0.01, 0.4, (n, c))
    p_control = rng.uniform(0.01, 0.5, n)
    p_buy = np.clip(p_control[:, None] + rng.normal(0.03, 0.05, (n, c)), 0, 1)
    cost = rng.uniform(2, 20, c)
    order_value = rng.uniform(10, 80, n)
    ids = [f"cp{j}" for j in range(c)]
    values = incremental_value(p_redeem, p_buy, p_control, cost, order_value, "profit", 0.3)
    spend = expected_spend(p_redeem, cost)
    budget = 0.3 * np.where(values > 0, spend, 0).max(axis=1).sum()
    caps = np.array([np.inf, 80, np.inf, np.inf, 150, np.inf])
    choice, lam, stats = solve(values, spend, budget, caps, fill=False)
    policy = make_policy(lam, ids, stats.multipliers, margin=0.3, caps=caps)
    edge = decide(p_redeem, p_buy, p_control, cost, order_value, policy, ids)
    assert (edge == choice).mean() > 0.99
    single = [decide(p_redeem[i], p_buy[i], p_control[i], cost, order_value[i], policy, ids) for i in range(200)]
    assert [NONE if s is None else s for s in single] == edge[:200].tolist()


def test_decide_gives_no_coupon_when_none_is_worth_its_cost():
    policy = Policy(objective="profit", lam=0.5, margin=0.3, version="t")
    p_redeem, cost = np.array([0.5, 0.4]), np.array([10.0, 5.0])
    # uplift 0.01 x 0.3 x 40 = 0.12 < expected spend 5 or 2: nothing is worth it
    assert decide(p_redeem, np.array([0.31, 0.31]), 0.3, cost, 40.0, policy) is None
    # a big uplift on the cheap coupon: 0.3 x 0.3 x 40 = 3.6 > 2 x (1 + lambda)
    assert decide(p_redeem, np.array([0.31, 0.6]), 0.3, cost, 40.0, policy) == 1
    assert decide(np.zeros(0), np.zeros(0), 0.3, np.zeros(0), 40.0, policy) is None
    purchases = Policy(objective="purchases", lam=0.0, version="t")
    assert decide(p_redeem, np.array([0.31, 0.29]), 0.3, cost, 40.0, purchases) == 0
    net = net_scores(p_redeem, np.array([0.31, 0.6]), 0.3, cost, 40.0, policy)
    assert net[1] == pytest.approx(0.3 * 0.3 * 40 - 2.0 - 0.5 * 2.0)
    scores, order, pick = rank_with_policy(p_redeem, np.array([0.31, 0.6]), 0.3, cost, 40.0, policy, ["a", "b"])
    assert order.tolist() == [1, 0] and pick == 1 and scores.shape == (2,)


def test_disabled_coupons_and_multipliers_need_coupon_ids():
    policy = Policy(lam=0.0, version="t", coupon_multipliers={"a": 100.0}, disabled=["b"])
    p = np.array([0.1, 0.1, 0.1])
    pb = np.array([0.9, 0.9, 0.5])
    with pytest.raises(ValueError, match="coupon_ids"):
        decide(p, pb, 0.1, np.ones(3), 30.0, policy)
    assert decide(p, pb, 0.1, np.ones(3), 30.0, policy, ["a", "b", "c"]) == 2
    batch = decide(np.tile(p, (4, 1)), np.tile(pb, (4, 1)), np.full(4, 0.1), np.ones(3), np.full(4, 30.0), policy,
                   ["a", "b", "c"])
    assert batch.tolist() == [2, 2, 2, 2]


def test_policy_file_round_trip(tmp_path):
    policy = make_policy(0.25, ["a", "b"], np.array([0.0, 1.5]), margin=0.35, caps=np.array([np.inf, 100]),
                         order_value={"method": "history", "scale": 1.3, "default": 31.0}, budget=1000.0,
                         model_version="m1", stats={"users": 10})
    path = save_policy(policy, tmp_path / "policy.json")
    raw = json.loads(path.read_text())
    assert raw["format"] == POLICY_FORMAT and raw["lambda"] == 0.25 and raw["coupon_multipliers"] == {"b": 1.5}
    assert raw["caps"] == {"b": 100.0} and raw["created_at"] and raw["version"]
    loaded = load_policy(path)
    assert loaded.to_dict() == policy.to_dict()
    assert load_policy(raw).lam == 0.25
    assert loaded.with_lambda(2.0).lam == 2.0 and loaded.lam == 0.25


@pytest.mark.parametrize("mutate,match", [
    (lambda d: d.update(format="edgecoupon-policy/999"), "format"),
    (lambda d: d.update(objective="clicks"), "objective"),
    (lambda d: d.update({"lambda": -1.0}), "lambda"),
    (lambda d: d.update({"lambda": "0.5"}), "lambda"),
    (lambda d: d.update(margin=True), "margin"),
    (lambda d: d.pop("lambda"), "lambda"),
    (lambda d: d.update(surprise=1), "unknown"),
    (lambda d: d.update(coupon_multipliers={"a": -2}), "coupon_multipliers"),
    (lambda d: d.update(order_value={"method": "psychic"}), "order_value"),
    (lambda d: d.update(disabled="a"), "disabled"),
])
def test_invalid_policies_are_refused(tmp_path, mutate, match):
    data = make_policy(0.1, ["a"]).to_dict()
    mutate(data)
    path = tmp_path / "p.json"
    path.write_text(json.dumps(data))
    with pytest.raises(PolicyError, match=match):
        load_policy(path)


def test_unreadable_policy_files(tmp_path):
    with pytest.raises(PolicyError, match="does not exist"):
        load_policy(tmp_path / "missing.json")
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(PolicyError, match="not valid JSON"):
        load_policy(bad)
    nan = tmp_path / "nan.json"
    nan.write_text(json.dumps(make_policy(0.1, ["a"]).to_dict()).replace('"lambda": 0.1', '"lambda": NaN'))
    with pytest.raises(PolicyError, match="NaN"):
        load_policy(nan)
    binary = tmp_path / "pickle.json"
    binary.write_bytes(b"\x80\x04\x95")
    with pytest.raises(PolicyError):
        load_policy(binary)


def test_order_value_estimate_from_history():
    config = {"method": "history", "scale": 1.5, "default": 30.0}
    events = [{"ts": 1, "event": "view", "price": 100.0}, {"ts": 2, "event": "cart", "price": 10.0},
              {"ts": 3, "event": "purchase", "price": "20"}, {"ts": 4, "event": "cart", "price": "n/a"},
              {"ts": 99, "event": "purchase", "price": 1000.0}, "not an event", {"ts": 5, "event": "view"}]
    assert estimate_order_value(events, config, now=10) == pytest.approx(1.5 * 15.0)
    assert estimate_order_value(events[:1], config) == pytest.approx(150.0)  # only views: their median
    assert estimate_order_value([], config) == 30.0
    assert estimate_order_value(events, {"method": "constant", "default": 42.0}) == 42.0
    assert estimate_order_value(events, Policy(version="t", order_value=config), now=10) == pytest.approx(22.5)


def test_incremental_value_formula():
    v = incremental_value(np.array([[0.2, 0.1]]), np.array([[0.5, 0.4]]), np.array([0.3]), np.array([10.0, 5.0]),
                          np.array([40.0]), "profit", 0.3)
    np.testing.assert_allclose(v, [[0.2 * 0.3 * 40 - 2.0, 0.1 * 0.3 * 40 - 0.5]])
    np.testing.assert_allclose(incremental_value(0, np.array([0.5]), 0.3, 1.0, 1.0, "purchases"), [0.2])
    with pytest.raises(ValueError):
        incremental_value(0, np.array([0.5]), 0.3, 1.0, 1.0, "revenue")


def test_allocation_is_numpy_only():
    """Edge nodes have numpy + onnxruntime: the allocation module must not pull torch, scipy or pandas."""
    code = textwrap.dedent("""
        import sys
        BLOCKED = ("torch", "scipy", "pandas", "sklearn")
        class Block:
            def find_spec(self, name, path=None, target=None):
                if name.split(".")[0] in BLOCKED:
                    raise ImportError(name + " is blocked in this test")
                return None
        sys.meta_path.insert(0, Block())
        import numpy as np
        from runtime.allocation import solve, decide, make_policy
        choice, lam, stats = solve(np.ones((20, 3)), np.ones((20, 3)), 5.0)
        assert stats.spend <= 5.0
        assert decide(np.ones(3) * 0.1, np.ones(3) * 0.9, 0.1, np.ones(3), 30.0, make_policy(lam, list("abc"))) is not None
        assert not any(m.split(".")[0] in BLOCKED for m in sys.modules)
        print("ok")
    """)
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "ok"
