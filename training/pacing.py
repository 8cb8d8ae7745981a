"""Budget pacing: keep a live campaign's spend on plan by moving the policy's budget multiplier.

The offline solver (``runtime.allocation.solve``) sets the multiplier ``lambda`` from the model's
*expected* spend. Live, spend drifts from that plan: redemption rates differ from the model's, traffic
differs from the forecast, and the mix of users changes by day. The controller closes the loop.

The plan
    The campaign budget is spread over ``days x steps_per_day`` control steps in proportion to the
    traffic forecast (``plan`` weights: e.g. weekday x hour-of-day shares). A day's planned spend is
    the sum of its steps' shares.

The control law (after every step)
    ``target = remaining budget x w_step / sum of the remaining steps' weights``: what this step should
    have spent for the campaign to land exactly on budget, so under- and over-spending earlier is made
    up over all remaining steps instead of being carried as a debt.

    A step's realized spend is a handful of redemptions: far too noisy to steer by. The controller
    therefore measures a step by the spend it *committed*: the model's expected spend of the coupons
    it issued (``sum p_redeem x cost``), times the campaign's running calibration ratio ``realized /
    committed`` (shrunk towards 1 while little has been observed). The ratio carries what only
    realized spend can tell (the model's redemption rates are off); the committed spend carries the
    fast, low-noise signal. With ``e = (estimated step spend - target) / target``::

        log(lambda + floor) += gain x clip(e, -max_error, +max_error)

    Spending too much raises lambda (fewer, cheaper, surer coupons); too little lowers it, down to 0
    (every coupon with positive expected value). The update is multiplicative so the controller works
    at any scale of lambda, and ``floor`` lets lambda reach and leave 0. Anti-windup: in a step where
    the hard guards held coupons back, the controller does not lower lambda (the shortfall is the
    guard's doing, not a sign that coupons are too expensive).

Hard guards (checked before every coupon is issued)
    A coupon is only issued if, redeemed, it keeps the day's spend within ``plan x (1 + day_tolerance)``
    and the campaign's within the budget. Spend is counted on the day the coupon is issued (in the
    simulator, redemption is drawn at issue time; live, a redemption that comes later is booked to
    its issue day, and the guard uses coupon costs, i.e. the worst case).

:func:`simulate_campaign` replays a multi-day campaign on the simulator's ground truth: requests
arrive at random from the held-out population with daily and hourly traffic shapes and forecast
error, the edge rule (:func:`runtime.allocation.decide`) decides with the current multiplier, and
redemptions are drawn from the *true* probabilities, optionally inflated by a drift.

Run: ``python -m training.pacing --artifacts artifacts`` prints a day-by-day campaign.
"""
from __future__ import annotations

import argparse
import logging
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from runtime.allocation import NONE, Policy, decide, make_policy, solve

log = logging.getLogger(__name__)

WEEKLY_TRAFFIC = (1.0, 0.95, 0.95, 1.0, 1.1, 1.35, 1.25)  # Monday..Sunday
HOURLY_TRAFFIC = tuple(0.3 + math.sin(math.pi * h / 24.0) ** 2 for h in range(24))


@dataclass
class PacingConfig:
    gain: float = 0.3  # log-multiplier change per unit of relative spend error
    max_error: float = 1.0  # the relative error is clipped to +-this before the update
    floor: float = 0.05  # lambda is controlled as log(lambda + floor)
    lam_max: float = 1e4  # upper clip on lambda
    day_tolerance: float = 0.05  # hard guard: a day spends at most plan x (1 + this)
    prior_weight: float = 0.002  # calibration ratio prior, as a share of the budget of committed spend
    calibration_half_life: float = 24.0  # steps: the ratio realized / committed weighs recent steps more

    def __post_init__(self) -> None:
        if not (self.gain > 0 and self.max_error > 0 and self.floor > 0 and self.lam_max > 0 and self.day_tolerance >= 0):
            raise ValueError("PacingConfig: gain, max_error, floor and lam_max must be > 0, day_tolerance >= 0")


class PacingController:
    """Tracks spend against a per-step plan and adjusts the budget multiplier (see the module doc)."""

    def __init__(self, budget: float, plan: Sequence[Sequence[float]], lam0: float, config: PacingConfig | None = None):
        """``plan[d][k]``: forecast weight of step k of day d (any positive scale)."""
        if not budget > 0:
            raise ValueError("budget must be > 0")
        weights = [np.asarray(day, dtype=np.float64) for day in plan]
        if not weights or any(len(w) == 0 or (w < 0).any() for w in weights) or sum(w.sum() for w in weights) <= 0:
            raise ValueError("plan must be non-empty lists of non-negative step weights with a positive total")
        self.config = config or PacingConfig()
        self.budget = float(budget)
        self.steps_per_day = [len(w) for w in weights]
        self.weights = np.concatenate(weights)
        self.day_of_step = np.repeat(np.arange(len(weights)), self.steps_per_day)
        self.day_plan = self.budget * np.array([w.sum() for w in weights]) / self.weights.sum()
        self.day_spent = np.zeros(len(weights))
        self.step = 0
        self.spent = 0.0
        self.lam = float(lam0)
        self._spent_at_step_start = 0.0
        self.committed = 0.0  # model-expected spend of everything issued so far
        self._recent_spent = 0.0  # exponentially weighted realized and committed spend (calibration)
        self._recent_committed = 0.0
        self.history: list[dict[str, float]] = []

    @property
    def day(self) -> int:
        return int(self.day_of_step[min(self.step, len(self.weights) - 1)])

    @property
    def done(self) -> bool:
        return self.step >= len(self.weights)

    def day_cap(self, day: int | None = None) -> float:
        d = self.day if day is None else day
        return self.day_plan[d] * (1.0 + self.config.day_tolerance)

    def step_target(self) -> float:
        """What the current step should spend: the remaining budget (after the spend realized before this
        step) spread over the remaining steps by their forecast weights."""
        rest = self.weights[self.step:].sum()
        remaining = max(self.budget - self._spent_at_step_start, 0.0)
        return remaining * self.weights[self.step] / rest if rest > 0 else 0.0

    def allow(self, cost: float) -> bool:
        """May a coupon that would cost ``cost`` if redeemed be issued now?"""
        d = self.day
        return (self.day_spent[d] + cost <= self.day_cap(d) + 1e-9) and (self.spent + cost <= self.budget + 1e-9)

    def book(self, spend: float) -> None:
        """Record realized spend (on the current step's day)."""
        self.day_spent[self.day] += spend
        self.spent += spend

    @property
    def calibration(self) -> float:
        """Realized over committed (model-expected) spend, recent steps weighted more, shrunk towards 1."""
        prior = self.config.prior_weight * self.budget
        return (self._recent_spent + prior) / (self._recent_committed + prior)

    def end_step(self, committed: float, throttled: bool = False) -> float:
        """Close the step. ``committed``: the model-expected spend (p_redeem x cost) of the coupons issued
        in it; realized spend must already be booked with :meth:`book`. Returns the new multiplier."""
        if self.done:
            raise RuntimeError("the campaign is over")
        target = self.step_target()
        self.committed += committed
        decay = 0.5 ** (1.0 / self.config.calibration_half_life)
        self._recent_spent = self._recent_spent * decay + (self.spent - self._spent_at_step_start)
        self._recent_committed = self._recent_committed * decay + committed
        estimate = committed * self.calibration
        cfg = self.config
        if target > 0:
            error = float(np.clip((estimate - target) / target, -cfg.max_error, cfg.max_error))
        else:
            error = cfg.max_error if estimate > 0 else 0.0
        if throttled:
            error = max(error, 0.0)
        lam = math.exp(math.log(self.lam + cfg.floor) + cfg.gain * error) - cfg.floor
        self.lam = float(min(max(lam, 0.0), cfg.lam_max))
        self.history.append({"step": self.step, "day": self.day, "target": target, "estimate": estimate,
                             "spend": self.spent - self._spent_at_step_start, "lambda": self.lam})
        self.step += 1
        self._spent_at_step_start = self.spent
        return self.lam


# ------------------------------------------------------------------------------------- simulation

@dataclass
class Population:
    """Held-out users x coupons: what the edge sees (model) and what really happens (truth)."""

    p_redeem: np.ndarray  # [N, C] model
    p_buy: np.ndarray  # [N, C] model
    p_control: np.ndarray  # [N] model
    order_value: np.ndarray  # [N] edge estimate
    cost: np.ndarray  # [C]
    true_p_redeem: np.ndarray  # [N, C]
    true_value: np.ndarray | None = None  # [N, C] true incremental value, for reporting
    coupon_ids: list[str] = field(default_factory=list)


@dataclass
class CampaignResult:
    budget: float
    spent: float
    day_plan: np.ndarray
    day_spent: np.ndarray
    lam: np.ndarray  # per step
    issued: int
    requests: int
    throttled: int
    value: float  # true expected value of the issued coupons (when known)

    @property
    def final_error(self) -> float:
        return self.spent / self.budget - 1.0

    @property
    def worst_day_overspend(self) -> float:
        return float(np.max(self.day_spent / self.day_plan - 1.0))

    def to_dict(self) -> dict[str, Any]:
        return {"budget": self.budget, "spent": self.spent, "final_error": self.final_error,
                "worst_day_overspend": self.worst_day_overspend, "issued": self.issued, "requests": self.requests,
                "throttled": self.throttled, "value": self.value, "day_plan": self.day_plan.tolist(),
                "day_spent": self.day_spent.tolist(), "lambda_end_of_day": self.lam.tolist()}


def traffic_plan(days: int, steps_per_day: int = 24, weekly: Sequence[float] = WEEKLY_TRAFFIC,
                 hourly: Sequence[float] = HOURLY_TRAFFIC) -> list[np.ndarray]:
    """Forecast weights per day and step (weekday x hour-of-day shape)."""
    hours = np.asarray(hourly, dtype=np.float64)
    shape = np.interp(np.linspace(0, len(hours), steps_per_day, endpoint=False), np.arange(len(hours)), hours)
    return [weekly[d % len(weekly)] * shape / shape.sum() for d in range(days)]


def simulate_campaign(pop: Population, policy: Policy, budget: float, days: int = 14, requests_per_day: float = 4000,
                      steps_per_day: int = 24, config: PacingConfig | None = None, redemption_drift: Sequence[float] | float = 1.0,
                      traffic_noise: float = 0.1, pacing: bool = True, seed: int = 0) -> CampaignResult:
    """Replay a campaign: random requests from the population, edge decisions, true redemptions.

    ``redemption_drift`` multiplies the true redemption probabilities (one factor, or one per day):
    the model is off by that much and only the controller can notice. ``traffic_noise`` is the
    day-level forecast error (lognormal sd). ``pacing=False`` keeps the initial multiplier (with the
    hard guards still on), to show what the controller buys.
    """
    rng = np.random.default_rng(seed)
    plan = traffic_plan(days, steps_per_day)
    ctl = PacingController(budget, plan, policy.lam, config)
    drift = np.broadcast_to(np.asarray(redemption_drift, dtype=np.float64), (days,))
    coupon_ids = pop.coupon_ids or None
    lam_days = np.zeros(days)
    issued = requests = throttled = 0
    value = 0.0
    mean_weight = float(np.mean([w.sum() for w in plan]))
    for d in range(days):
        day_factor = float(np.exp(rng.normal(0.0, traffic_noise) - traffic_noise ** 2 / 2))
        for k in range(steps_per_day):
            lam = ctl.lam
            expected = requests_per_day * plan[d][k] / mean_weight * day_factor
            users = rng.integers(0, len(pop.p_control), size=rng.poisson(expected))
            requests += len(users)
            committed = 0.0
            held = False
            if len(users):
                current = policy.with_lambda(lam if pacing else policy.lam)
                choice = decide(pop.p_redeem[users], pop.p_buy[users], pop.p_control[users], pop.cost,
                                pop.order_value[users], current, coupon_ids)
                given = np.flatnonzero(choice != NONE)
                p_true = np.minimum(pop.true_p_redeem[users[given], choice[given]] * drift[d], 1.0)
                redeemed = rng.random(len(given)) < p_true
                for i, r in zip(given.tolist(), redeemed.tolist()):
                    c = int(choice[i])
                    if not ctl.allow(float(pop.cost[c])):
                        throttled += 1
                        held = True
                        continue
                    issued += 1
                    committed += float(pop.p_redeem[users[i], c] * pop.cost[c])
                    if pop.true_value is not None:
                        value += float(pop.true_value[users[i], c])
                    if r:
                        ctl.book(float(pop.cost[c]))
            ctl.end_step(committed, held)
        lam_days[d] = ctl.lam if pacing else policy.lam
    result = CampaignResult(budget=budget, spent=ctl.spent, day_plan=ctl.day_plan, day_spent=ctl.day_spent,
                            lam=lam_days, issued=issued, requests=requests, throttled=throttled, value=value)
    log.info("campaign: spent %.1f of %.1f (%+.2f%%), worst day %+.2f%% over plan, %d coupons for %d requests, "
             "%d throttled", result.spent, budget, 100 * result.final_error, 100 * result.worst_day_overspend,
             issued, requests, throttled)
    return result


def initial_policy(pop: Population, budget: float, days: int, requests_per_day: float, objective: str = "profit",
                   margin: float = 0.3, order_value_config: dict | None = None) -> Policy:
    """The offline plan: solve on the population with the budget scaled to one visit per user."""
    from runtime.allocation import incremental_value
    values = incremental_value(pop.p_redeem, pop.p_buy, pop.p_control, pop.cost, pop.order_value, objective, margin)
    spend = pop.p_redeem * pop.cost
    per_user_budget = budget / (days * requests_per_day) * len(pop.p_control)
    _, lam, stats = solve(values, spend, per_user_budget, fill=False)
    return make_policy(lam, pop.coupon_ids, stats.multipliers, objective=objective, margin=margin,
                       order_value=order_value_config, budget=per_user_budget)


def population_from(data, model: str = "transformer", margin: float = 0.3) -> Population:
    """A Population from ``training.policy_eval.PolicyData``."""
    from runtime.allocation import incremental_value
    p = data.models[model]
    t = data.truth
    true_value = incremental_value(t.p_redeem, t.p_buy, t.p_control, data.cost, data.true_order_value, "profit", margin)
    return Population(p.p_redeem, p.p_buy, p.p_control, data.order_value, data.cost, t.p_redeem, true_value,
                      list(data.coupon_ids))


def format_campaign(result: CampaignResult) -> str:
    lines = [f"{'day':>4}{'plan':>10}{'spent':>10}{'vs plan':>9}{'lambda':>9}"]
    for d, (plan, spent, lam) in enumerate(zip(result.day_plan, result.day_spent, result.lam)):
        lines.append(f"{d + 1:>4}{plan:>10.1f}{spent:>10.1f}{spent / plan - 1:>+9.1%}{lam:>9.3f}")
    lines.append(f"total: spent {result.spent:.1f} of {result.budget:.1f} ({result.final_error:+.2%}); worst day "
                 f"{result.worst_day_overspend:+.2%} over plan; {result.issued} coupons, {result.throttled} held back "
                 f"by the guards; true incremental profit {result.value:.1f}")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m training.pacing", description=__doc__.split("\n\n")[0])
    parser.add_argument("--artifacts", type=Path, default=Path("artifacts"))
    parser.add_argument("--days", type=int, default=14)
    parser.add_argument("--requests-per-day", type=float, default=4000)
    parser.add_argument("--budget-share", type=float, default=0.3,
                        help="campaign budget as a share of everyone-best-coupon spend over all requests")
    parser.add_argument("--drift", type=float, default=1.25, help="true redemption rate / the model's")
    parser.add_argument("--margin", type=float, default=0.3)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from training.policy_eval import Evaluator, load_policy_data
    checkpoint = args.artifacts / "run" / "checkpoint.pt"
    model_dir = args.artifacts / "model"
    model_dir = model_dir if (model_dir / "manifest.json").exists() else None  # the int8 model edge nodes serve
    if model_dir is None and not checkpoint.exists():
        print(f"error: neither {args.artifacts / 'model'} nor {checkpoint} exists (run `make demo` first)", file=sys.stderr)
        return 2
    data = load_policy_data(args.artifacts / "data", checkpoint, model_dir, baselines=False, seed=args.seed)
    pop = population_from(data, margin=args.margin)
    per_user_full = Evaluator(data, args.margin).full_budget() / len(data.user_ids)
    budget = args.budget_share * per_user_full * args.days * args.requests_per_day
    policy = initial_policy(pop, budget, args.days, args.requests_per_day, margin=args.margin,
                            order_value_config=data.order_value_config)
    for pacing in (False, True):
        result = simulate_campaign(pop, policy, budget, args.days, args.requests_per_day,
                                   redemption_drift=args.drift, pacing=pacing, seed=args.seed)
        print(f"\n{'with' if pacing else 'without'} pacing (redemption {args.drift:.2f}x the model's):")
        print(format_campaign(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
