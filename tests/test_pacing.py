"""Budget pacing: the controller's law and guards, and multi-day campaigns replayed on the simulator."""
from __future__ import annotations

import numpy as np
import pytest

from runtime.allocation import NONE, Policy
from training.pacing import (PacingConfig, PacingController, Population, format_campaign, initial_policy,
                             population_from, simulate_campaign, traffic_plan)


def test_controller_raises_lambda_when_overspending_and_lowers_it_when_under():
    plan = [np.ones(4)] * 2
    over = PacingController(80.0, plan, lam0=1.0)
    target = over.step_target()
    assert target == pytest.approx(10.0)
    over.book(20.0)
    assert over.end_step(committed=20.0) > 1.0
    under = PacingController(80.0, plan, lam0=1.0)
    under.book(2.0)
    assert under.end_step(committed=2.0) < 1.0
    # lambda reaches 0 when coupons are too scarce, and stays >= 0
    scarce = PacingController(80.0, [np.ones(200)], lam0=0.1)
    for _ in range(100):
        scarce.end_step(committed=0.0)
    assert scarce.lam == 0.0


def test_controller_catches_up_on_the_remaining_budget():
    ctl = PacingController(100.0, [np.ones(5), np.ones(5)], lam0=0.5)
    for _ in range(5):  # the first day spends nothing
        ctl.end_step(committed=0.0)
    assert ctl.step_target() == pytest.approx(20.0)  # 100 left over 5 steps
    ctl.book(60.0)
    ctl.end_step(committed=60.0)
    assert ctl.step_target() == pytest.approx(10.0)  # 40 left over 4 steps


def test_guards_cap_the_day_and_the_campaign():
    ctl = PacingController(100.0, [np.ones(2), np.ones(2)], lam0=0.0, config=PacingConfig(day_tolerance=0.1))
    assert ctl.day_cap() == pytest.approx(55.0)
    assert ctl.allow(55.0) and not ctl.allow(55.01)
    ctl.book(50.0)
    assert ctl.allow(5.0) and not ctl.allow(5.1)
    ctl.end_step(50.0)
    ctl.end_step(0.0, throttled=True)
    assert ctl.day == 1 and ctl.allow(50.0)
    ctl.book(49.0)
    assert not ctl.allow(1.5)  # the campaign total would pass the budget
    with pytest.raises(ValueError):
        PacingController(0.0, [np.ones(2)], lam0=0.0)
    with pytest.raises(ValueError):
        PacingConfig(gain=0.0)


def test_throttled_steps_do_not_wind_lambda_down():
    ctl = PacingController(100.0, [np.ones(10)], lam0=1.0)
    ctl.end_step(committed=0.0, throttled=True)
    assert ctl.lam == pytest.approx(1.0)


def test_traffic_plan_shape():
    plan = traffic_plan(7, steps_per_day=24)
    assert len(plan) == 7 and all(len(d) == 24 for d in plan)
    assert plan[5].sum() > plan[1].sum()  # weekends are busier


def _synthetic_population(seed: int = 0, n: int = 2000, c: int = 6) -> Population:
    rng = np.random.default_rng(seed)
    p_control = rng.uniform(0.02, 0.4, n)
    p_buy = np.clip(p_control[:, None] + rng.normal(0.05, 0.06, (n, c)), 0, 1)
    p_redeem = np.minimum(p_buy, rng.uniform(0.02, 0.3, (n, c)))
    return Population(p_redeem=p_redeem, p_buy=p_buy, p_control=p_control, order_value=rng.uniform(20, 60, n),
                      cost=rng.choice([5.0, 10.0, 15.0], c), true_p_redeem=p_redeem, coupon_ids=[f"c{j}" for j in range(c)])


@pytest.mark.parametrize("drift", [0.9, 1.0, 1.4])
def test_synthetic_campaign_lands_on_budget(drift):
    pop = _synthetic_population()
    days, rpd = 10, 6000
    spend = pop.p_redeem * pop.cost
    budget = 0.15 * spend.max(axis=1).mean() * days * rpd
    policy = initial_policy(pop, budget, days, rpd)
    result = simulate_campaign(pop, policy, budget, days, rpd, redemption_drift=drift, seed=3)
    assert abs(result.final_error) <= 0.02, format_campaign(result)
    assert result.worst_day_overspend <= 0.05 + 1e-9


# ------------------------------------------------------------------------------ on the simulator

@pytest.fixture(scope="module")
def tiny_policy_data(tiny_pipeline):
    from training.policy_eval import load_policy_data
    return load_policy_data(tiny_pipeline.data_dir, tiny_pipeline.checkpoint, None, baselines=False)


def _campaign_budget(data, share: float, days: int, rpd: float) -> float:
    from training.policy_eval import Evaluator
    return share * Evaluator(data).full_budget() / len(data.user_ids) * days * rpd


def _noisy_truth_population(data, seed: int, noise: float = 0.5) -> Population:
    """Decisions from the ground truth seen through logit noise: an imperfect model whose errors the
    controller has to live with (the tiny test model is too little trained to find any coupon worth
    giving, so it cannot drive a campaign)."""
    rng = np.random.default_rng(seed)

    def blur(p):
        p = np.clip(p, 1e-6, 1 - 1e-6)
        return 1.0 / (1.0 + np.exp(-(np.log(p / (1 - p)) + rng.normal(0.0, noise, p.shape))))

    pop = population_from(data)
    pop.p_redeem, pop.p_control = blur(data.truth.p_redeem), blur(data.truth.p_control)
    pop.p_buy = blur(data.truth.p_buy)
    return pop


@pytest.mark.parametrize("drift,seed", [(1.0, 0), (1.3, 1), (0.9, 2)])
def test_campaign_on_the_simulator_stays_within_budget_and_day_tolerance(tiny_policy_data, drift, seed):
    """14 days, weekday and hourly traffic with forecast error, requests from the simulator's held-out
    users, redemptions drawn from the true probabilities times ``drift`` (the model is off and only
    observed spend can tell)."""
    data = tiny_policy_data
    days, rpd, tolerance = 14, 20000, 0.05
    pop = _noisy_truth_population(data, seed)
    budget = _campaign_budget(data, 0.2, days, rpd)
    policy = initial_policy(pop, budget, days, rpd, order_value_config=data.order_value_config)
    result = simulate_campaign(pop, policy, budget, days, rpd, redemption_drift=drift, seed=seed,
                               config=PacingConfig(day_tolerance=tolerance))
    report = format_campaign(result)
    assert result.issued > 0
    assert abs(result.final_error) <= 0.02, report
    assert result.worst_day_overspend <= tolerance + 1e-9, report
    assert result.to_dict()["final_error"] == result.final_error


def test_pacing_beats_a_fixed_multiplier_when_redemptions_drift(tiny_policy_data):
    """With the true probabilities as the model and redemptions 30% above them, a fixed multiplier runs
    into the daily guard every day; the controller spreads the same budget over the day and earns more."""
    data = tiny_policy_data
    days, rpd = 14, 20000
    data_truth = population_from(data)
    data_truth.p_redeem, data_truth.p_buy, data_truth.p_control = data.truth.p_redeem, data.truth.p_buy, data.truth.p_control
    budget = _campaign_budget(data, 0.3, days, rpd)
    policy = initial_policy(data_truth, budget, days, rpd, order_value_config=data.order_value_config)
    fixed = simulate_campaign(data_truth, policy, budget, days, rpd, redemption_drift=1.3, pacing=False, seed=4)
    paced = simulate_campaign(data_truth, policy, budget, days, rpd, redemption_drift=1.3, pacing=True, seed=4)
    assert paced.throttled < fixed.throttled / 5
    assert paced.value > fixed.value
    assert abs(paced.final_error) <= 0.02


def test_edge_rule_in_campaign_uses_the_policy_multipliers():
    pop = _synthetic_population(n=50, c=3)
    policy = Policy(lam=1e6, version="t")  # nothing is worth any spend
    result = simulate_campaign(pop, policy, 100.0, days=2, requests_per_day=200, pacing=False, seed=0)
    assert result.issued == 0 and result.spent == 0.0
    assert NONE == -1
