"""The budgeted-allocation solver at population scale, and the per-request decision at the edge.

Run: ``python -m benchmarks.bench_allocation [--users 1000000] [--coupons 50]``

Prints the solver's wall time on a synthetic ``users x coupons`` instance shaped like the simulator's
(many coupons worth nothing or less for a user, a budget of 30% of everyone's best coupon),
the budget use, and the Lagrangian bound's gap (an upper bound on the distance to the exact optimum:
no exact solver can check 50M variables on this machine). Then the same with per-coupon caps, and the
latency of :func:`runtime.allocation.decide` for one request and for a batch.
"""
from __future__ import annotations

import argparse
import logging
import time

import numpy as np

from runtime.allocation import decide, incremental_value, make_policy, solve

log = logging.getLogger("bench_allocation")


def instance(users: int, coupons: int, seed: int = 0, margin: float = 0.3):
    """Probabilities like the simulator's: uplift mostly small, sometimes negative; p_redeem <= p_buy."""
    rng = np.random.default_rng(seed)
    p_control = rng.beta(1.2, 4.0, users).astype(np.float32)
    responsive = rng.random(users).astype(np.float32)
    strength = rng.uniform(0.2, 1.5, coupons).astype(np.float32)
    uplift = (0.25 * responsive[:, None] * strength[None, :] * rng.random((users, coupons), dtype=np.float32)
              - 0.02 * rng.random((users, coupons), dtype=np.float32))
    p_buy = np.clip(p_control[:, None] + uplift, 0.0, 1.0)
    p_redeem = p_buy * rng.uniform(0.3, 0.95, (users, coupons)).astype(np.float32)
    cost = rng.choice(np.array([5.0, 10.0, 15.0, 20.0, 25.0, 30.0], dtype=np.float32), coupons)
    order_value = rng.lognormal(np.log(30.0), 0.4, users).astype(np.float32)
    return p_redeem, p_buy, p_control, cost, order_value


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.bench_allocation", description=__doc__.split("\n\n")[0])
    parser.add_argument("--users", type=int, default=1_000_000)
    parser.add_argument("--coupons", type=int, default=50)
    parser.add_argument("--budget-share", type=float, default=0.3)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    started = time.perf_counter()
    p_redeem, p_buy, p_control, cost, order_value = instance(args.users, args.coupons, args.seed)
    values = incremental_value(p_redeem, p_buy, p_control, cost, order_value, "profit", 0.3)
    spend = (p_redeem * cost).astype(np.float64)
    best = values.argmax(axis=1)
    full = float(spend[np.arange(len(best)), best].sum())
    budget = args.budget_share * full
    print(f"instance: {args.users:,} users x {args.coupons} coupons ({values.nbytes / 1e9:.2f} GB of values), "
          f"built in {time.perf_counter() - started:.1f} s; budget {budget:,.0f} = {args.budget_share:.0%} of {full:,.0f}")

    for label, caps in (("budget only", None),
                        ("budget + caps on 10 coupons", np.where(np.arange(args.coupons) < 10, args.users // 200, np.inf))):
        choice, lam, stats = solve(values, spend, budget, caps)
        over = "" if caps is None else f", capped coupons at {int(stats.counts[:10].max())} of {args.users // 200}"
        print(f"solve ({label}): {stats.seconds:.1f} s, {stats.iterations} bisection steps, lambda {lam:.4f}, "
              f"spend {stats.spend / budget:.6%} of budget, {stats.n_assigned:,} users get a coupon, value "
              f"{stats.value:,.0f}, Lagrangian gap {stats.gap:.2e}{over}")

    ids = [f"cp{j:02d}" for j in range(args.coupons)]
    policy = make_policy(lam, ids, stats.multipliers, caps=caps)
    n_single = 2000
    t = time.perf_counter()
    for i in range(n_single):
        decide(p_redeem[i], p_buy[i], float(p_control[i]), cost, float(order_value[i]), policy, ids)
    per_request = (time.perf_counter() - t) / n_single
    rows = slice(0, 256)
    t = time.perf_counter()
    for _ in range(50):
        decide(p_redeem[rows], p_buy[rows], p_control[rows], cost, order_value[rows], policy, ids)
    per_batch = (time.perf_counter() - t) / 50
    print(f"decide: {per_request * 1e6:.0f} us per single request, {per_batch * 1e3:.2f} ms per batch of 256 "
          f"({args.coupons} candidates)")
    print(f"total {time.perf_counter() - started:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
