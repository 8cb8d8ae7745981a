"""Budget-constrained coupon allocation: the Lagrangian solver, the policy file, and the per-request decision.

numpy only (edge nodes install numpy + onnxruntime): no torch, scipy or pandas here.

The problem (a multiple-choice knapsack)::

    maximise    sum_u v[u, x_u]                 x_u in {none, 0..C-1}, v[u, none] = 0
    subject to  sum_u s[u, x_u] <= budget       s = expected spend = p_redeem x cost
                #{u : x_u = c} <= cap[c]        optional per-coupon inventory caps

``v`` is the expected incremental value of giving coupon c to user u (:func:`incremental_value`):

* ``objective="profit"``:    ``(p_buy - p_buy_control) x margin x order_value - p_redeem x cost``
* ``objective="purchases"``: ``p_buy - p_buy_control``

Its Lagrangian relaxation decouples the users: with a budget multiplier ``lambda >= 0`` and per-coupon
multipliers ``mu[c] >= 0`` each user independently takes ``argmax_c v - lambda s - mu[c]`` if that net
score is positive, and nothing otherwise. :func:`solve` finds the multipliers (bisection on lambda, an
auction-style ascent on mu for capped coupons), then spends what the relaxation leaves of the budget
with a greedy fill. ``SolveStats.dual_bound`` is the Lagrangian bound, an upper bound on the exact
optimum, so every solution carries its own optimality certificate (``gap``).

The multipliers are all an edge node needs: :func:`save_policy` writes them to a small JSON file
and :func:`decide` applies them to one request's scores, answering "no coupon" when
no coupon is worth its cost at the current multiplier. The pacing controller
(``training.pacing``) moves ``lambda`` during a campaign so that observed spend follows the plan.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import math
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import numpy as np

from runtime.features import FeatureError, parse_price, parse_ts

log = logging.getLogger(__name__)

POLICY_FORMAT = "edgecoupon-policy/1"
OBJECTIVES = ("profit", "purchases")
ORDER_VALUE_METHODS = ("history", "constant")
DEFAULT_MARGIN = 0.3
DEFAULT_ORDER_VALUE = 30.0
NONE = -1  # "no coupon" in choice arrays
_CHUNK_ROWS = 1 << 15  # rows per block when scanning [N, C] matrices (bounds temporary memory)


class PolicyError(ValueError):
    """A policy file is missing, not JSON, of an unknown format, or has an invalid field."""


# ------------------------------------------------------------------------------------------ values

def incremental_value(p_redeem: np.ndarray, p_buy: np.ndarray, p_control: np.ndarray | float, costs: np.ndarray,
                      order_value: np.ndarray | float, objective: str = "profit",
                      margin: float = DEFAULT_MARGIN) -> np.ndarray:
    """Expected incremental value of each coupon: ``[C]`` for one user or ``[N, C]`` for a batch.

    ``p_control`` is ``[]``/``[N]`` (one per user), ``costs`` ``[C]`` or ``[N, C]`` (cost per redemption),
    ``order_value`` a scalar, ``[N]`` or ``[N, C]`` (expected gross order value of an incremental purchase).
    """
    if objective not in OBJECTIVES:
        raise ValueError(f"objective must be one of {list(OBJECTIVES)}, got {objective!r}")
    p_buy = np.asarray(p_buy, dtype=np.float64)
    uplift = p_buy - _per_user(p_control, p_buy.ndim)
    if objective == "purchases":
        return uplift
    ov = np.asarray(order_value, dtype=np.float64)
    if ov.ndim == 1 and p_buy.ndim == 2:
        ov = ov[:, None]
    return uplift * (margin * ov) - np.asarray(p_redeem, dtype=np.float64) * np.asarray(costs, dtype=np.float64)


def expected_spend(p_redeem: np.ndarray, costs: np.ndarray) -> np.ndarray:
    """Expected coupon spend ``p_redeem x cost`` (``[C]`` or ``[N, C]``)."""
    return np.asarray(p_redeem, dtype=np.float64) * np.asarray(costs, dtype=np.float64)


def _per_user(x: np.ndarray | float, ndim: int) -> np.ndarray:
    x = np.asarray(x, dtype=np.float64)
    return x[:, None] if (ndim == 2 and x.ndim == 1) else x


# -------------------------------------------------------------------------------------------- solver

@dataclass
class SolveStats:
    """What :func:`solve` found. ``dual_bound`` >= the exact optimum, so ``gap`` bounds the sub-optimality."""

    lam: float  # budget multiplier (value per unit of spend at the margin)
    multipliers: np.ndarray  # [C] per-coupon multipliers (0 where uncapped)
    budget: float
    spend: float  # sum of costs of the chosen coupons (<= budget)
    value: float  # sum of values of the chosen coupons
    relaxed_value: float  # value of the pure multiplier rule, before the greedy fill
    dual_bound: float  # Lagrangian upper bound on the optimum value
    n_assigned: int
    counts: np.ndarray  # [C] users per coupon
    iterations: int  # bisection steps
    filled: int  # users whose choice the greedy fill changed
    seconds: float

    @property
    def gap(self) -> float:
        """Relative distance to the Lagrangian bound (0 = provably optimal)."""
        if not math.isfinite(self.dual_bound) or self.dual_bound <= 0:
            return 0.0
        return max(0.0, (self.dual_bound - self.value) / self.dual_bound)

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["multipliers"] = [float(m) for m in self.multipliers]
        out["counts"] = [int(c) for c in self.counts]
        out["gap"] = self.gap
        return out


def solve(values: np.ndarray, costs: np.ndarray, budget: float, caps: Sequence[float] | np.ndarray | None = None, *,
          max_iter: int = 64, rel_tol: float = 1e-7, fill: bool = True, max_cap_rounds: int = 50,
          exchange_max_cells: int = 2_000_000) -> tuple[np.ndarray, float, SolveStats]:
    """Choose at most one coupon per user to maximise total value within ``budget`` (and ``caps``).

    ``values`` and ``costs`` are ``[N, C]``; a coupon that may not go to a user is ``-inf`` (or NaN) in
    ``values``. Costs must be finite and >= 0. ``caps`` is ``[C]`` (users per coupon; ``inf`` = none).

    Returns ``(choice [N] int64 with -1 for no coupon, lambda, stats)``. The budget and the caps are
    never exceeded. Work is O(N C) per bisection step, in row blocks, so 1M x 50 takes tens of seconds.

    With ``fill`` the multiplier rule's leftover budget is spent greedily, and on small instances
    (``N x C <= exchange_max_cells``), where a handful of users decide the optimum, 1-for-1 exchanges
    follow (and below a tenth of that, 1-for-2 and 2-for-1 exchanges). Neither step is reproduced by
    the per-request rule (:func:`decide`), which only matters on small populations: on large ones the
    relaxation's own solution is within ``stats.gap`` of optimal.

    Quality: tested against an exact MILP within 1% of the optimum when the budget funds a few dozen
    users or more. A budget that funds only a handful of coupons is a combinatorial knapsack where one
    coupon more or less decides the optimum; the solution can then be several percent short, and
    ``stats.gap`` (from the Lagrangian bound) always covers the shortfall.
    """
    started = time.perf_counter()
    values = np.asarray(values)
    costs = np.asarray(costs)
    if values.ndim != 2 or values.shape != costs.shape:
        raise ValueError(f"values and costs must both be [N, C], got {values.shape} and {costs.shape}")
    if not np.isfinite(budget) or budget < 0:
        raise ValueError(f"budget must be finite and >= 0, got {budget}")
    if not values.dtype.kind == "f":
        values = values.astype(np.float64)
    if np.isnan(values).any():
        values = np.where(np.isnan(values), -np.inf, values)
    if not np.isfinite(costs).all() or (costs < 0).any():
        raise ValueError("costs must be finite and >= 0")
    n, c = values.shape
    cap_arr = _caps(caps, c)
    budget = float(budget)

    def evaluate(lam: float) -> tuple[np.ndarray, np.ndarray]:
        return _assign_capped(values, costs, lam, cap_arr, max_cap_rounds)

    iterations = 0
    lam_lo, lam_hi = 0.0, 0.0
    choice, mu = evaluate(0.0)
    spend = _total(costs, choice)
    if spend > budget:
        # above lam_max every coupon with a positive cost has a negative net score: spend is 0
        lam_max = _max_ratio(values, costs) * (1.0 + 1e-9) + 1e-300
        hi_choice, hi_mu = evaluate(lam_max)
        lam_hi = lam_max
        best = (hi_choice, hi_mu)
        for iterations in range(1, max_iter + 1):
            lam = 0.5 * (lam_lo + lam_hi)
            cand, cand_mu = evaluate(lam)
            cand_spend = _total(costs, cand)
            if cand_spend > budget:
                lam_lo = lam
            else:
                lam_hi, best = lam, (cand, cand_mu)
                if cand_spend >= budget * (1.0 - rel_tol):
                    break
            if lam_hi - lam_lo <= rel_tol * lam_hi:
                break
        choice, mu = best
    lam = lam_hi
    choice = _enforce(values, costs, choice, lam, mu, cap_arr, budget)
    relaxed_value = _total(values, choice)
    dual = _dual_bound(values, costs, lam, mu, cap_arr, budget)
    filled = 0
    if fill:
        base = choice
        choice = _improve(values, costs, base, budget, cap_arr, n * c <= exchange_max_cells,
                          n * c <= exchange_max_cells // 10)
        filled = int((choice != base).sum())
    counts = np.bincount(choice[choice >= 0], minlength=c)
    stats = SolveStats(lam=float(lam), multipliers=mu, budget=budget, spend=_total(costs, choice),
                       value=_total(values, choice), relaxed_value=relaxed_value, dual_bound=dual,
                       n_assigned=int((choice >= 0).sum()), counts=counts, iterations=iterations, filled=filled,
                       seconds=time.perf_counter() - started)
    log.debug("solve: N=%d C=%d budget=%.4g lambda=%.6g spend=%.6g value=%.6g gap=%.2e in %.2fs",
              n, c, budget, lam, stats.spend, stats.value, stats.gap, stats.seconds)
    return choice, float(lam), stats


def _caps(caps: Sequence[float] | np.ndarray | None, c: int) -> np.ndarray | None:
    if caps is None:
        return None
    arr = np.asarray(caps, dtype=np.float64)
    if arr.shape != (c,):
        raise ValueError(f"caps must have one entry per coupon ({c}), got shape {arr.shape}")
    if np.isnan(arr).any() or (arr < 0).any():
        raise ValueError("caps must be >= 0 (inf for no cap)")
    return None if np.isinf(arr).all() else np.floor(arr)


def _blocks(n: int):
    for start in range(0, n, _CHUNK_ROWS):
        yield slice(start, min(n, start + _CHUNK_ROWS))


def _net(values: np.ndarray, costs: np.ndarray, lam: float, mu: np.ndarray | None) -> np.ndarray:
    net = values - lam * costs if lam else values.astype(np.float64, copy=True)
    if mu is not None:
        net -= mu
    return net


def _argmax_positive(net: np.ndarray, threshold: float = 0.0) -> np.ndarray:
    best = net.argmax(axis=1)
    top = net[np.arange(len(net)), best]
    return np.where(top > threshold, best, NONE)


def _assign(values: np.ndarray, costs: np.ndarray, lam: float, mu: np.ndarray | None) -> np.ndarray:
    choice = np.empty(len(values), dtype=np.int64)
    for rows in _blocks(len(values)):
        choice[rows] = _argmax_positive(_net(values[rows], costs[rows], lam, mu))
    return choice


def _assign_capped(values: np.ndarray, costs: np.ndarray, lam: float, caps: np.ndarray | None,
                   max_rounds: int) -> tuple[np.ndarray, np.ndarray]:
    """Per-user argmax at ``lam``; with caps, raise each over-subscribed coupon's multiplier until only
    ``cap`` users still prefer it (an ascending auction; displaced users move to their next best)."""
    c = values.shape[1]
    mu = np.zeros(c)
    choice = _assign(values, costs, lam, None)
    if caps is None:
        return choice, mu
    for _ in range(max_rounds):
        counts = np.bincount(choice[choice >= 0], minlength=c)
        over = np.flatnonzero(counts > caps)
        if not len(over):
            break
        for j in over:
            rows = np.flatnonzero(choice == j)
            net = _net(values[rows], costs[rows], lam, mu)
            own = net[:, j].copy()
            net[:, j] = -np.inf
            alternative = np.maximum(net.max(axis=1), 0.0)
            margin = np.sort(own - alternative)[::-1]
            k = int(caps[j])
            mu[j] += max(margin[k], 0.0) * (1.0 + 1e-12) + 1e-12
        choice = _assign(values, costs, lam, mu)
    return choice, mu


def _enforce(values: np.ndarray, costs: np.ndarray, choice: np.ndarray, lam: float, mu: np.ndarray,
             caps: np.ndarray | None, budget: float) -> np.ndarray:
    """Make ``choice`` strictly feasible: drop the weakest users of a still over-cap coupon, then (never
    needed after bisection, kept as a guard) the lowest value-per-spend users while over budget."""
    choice = choice.copy()
    if caps is not None:
        counts = np.bincount(choice[choice >= 0], minlength=values.shape[1])
        for j in np.flatnonzero(counts > caps):
            rows = np.flatnonzero(choice == j)
            net = values[rows, j] - lam * costs[rows, j] - mu[j]
            drop = rows[np.argsort(-net, kind="stable")[int(caps[j]):]]
            choice[drop] = NONE
    spend = _total(costs, choice)
    if spend > budget:
        rows = np.flatnonzero(choice >= 0)
        v, s = values[rows, choice[rows]], costs[rows, choice[rows]]
        order = np.argsort(np.divide(v, s, out=np.full(len(v), np.inf), where=s > 0), kind="stable")
        excess = np.cumsum(s[order])
        k = int(np.searchsorted(excess, spend - budget, side="left")) + 1
        choice[rows[order[:k]]] = NONE
    return choice


def _greedy_fill(values: np.ndarray, costs: np.ndarray, choice: np.ndarray, budget: float,
                 caps: np.ndarray | None, rounds: int = 6, max_candidates: int = 50_000) -> tuple[np.ndarray, int]:
    """Spend what the multiplier rule leaves of the budget: repeatedly move users to a better coupon
    (best value gain that still fits), best gain per extra spend first."""
    choice = choice.copy()
    n, c = values.shape
    changed = np.zeros(n, dtype=bool)
    rows_all = np.arange(n)
    for _ in range(rounds):
        spend = _total(costs, choice)
        remaining = budget - spend
        counts = np.bincount(choice[choice >= 0], minlength=c).astype(np.float64)
        full = np.zeros(c, dtype=bool) if caps is None else counts >= caps
        best_gain = np.zeros(n)
        best_move = np.full(n, NONE, dtype=np.int64)
        best_extra = np.zeros(n)
        for rows in _blocks(n):
            cur = choice[rows]
            r = rows_all[rows]
            has = cur >= 0
            cur_v = np.where(has, values[r, np.maximum(cur, 0)], 0.0)
            cur_s = np.where(has, costs[r, np.maximum(cur, 0)], 0.0)
            gain = values[rows] - cur_v[:, None]
            extra = costs[rows] - cur_s[:, None]
            ok = (gain > 1e-12) & (extra <= remaining) & ~full[None, :]
            gain = np.where(ok, gain, -np.inf)
            move = gain.argmax(axis=1)
            g = gain[np.arange(len(move)), move]
            good = np.isfinite(g)
            best_gain[rows] = np.where(good, g, 0.0)
            best_move[rows] = np.where(good, move, NONE)
            best_extra[rows] = np.where(good, extra[np.arange(len(move)), move], 0.0)
        cand = np.flatnonzero(best_move >= 0)
        if not len(cand):
            break
        ratio = np.divide(best_gain[cand], best_extra[cand], out=np.full(len(cand), np.inf), where=best_extra[cand] > 0)
        cand = cand[np.lexsort((-best_gain[cand], -ratio))][:max_candidates]
        applied = 0
        for u in cand.tolist():
            j, extra = int(best_move[u]), float(best_extra[u])
            if extra > remaining or (caps is not None and counts[j] >= caps[j]):
                continue
            old = int(choice[u])
            if old >= 0:
                counts[old] -= 1
            counts[j] += 1
            choice[u] = j
            remaining -= extra
            changed[u] = True
            applied += 1
        if not applied:
            break
    return choice, int(changed.sum())


def _current(values: np.ndarray, costs: np.ndarray, choice: np.ndarray, rows: np.ndarray):
    """(has a coupon [N], its value [N], its spend [N]) of an assignment; 0 for users without one."""
    has = choice >= 0
    idx = np.maximum(choice, 0)
    return has, np.where(has, values[rows, idx], 0.0), np.where(has, costs[rows, idx], 0.0)


def _exchange(values: np.ndarray, costs: np.ndarray, choice: np.ndarray, budget: float, caps: np.ndarray | None,
              max_rounds: int = 200, pool: int = 128) -> tuple[np.ndarray, int]:
    """1-for-1 exchanges for small instances, where a few users decide the optimum: take a user's
    coupon away (freeing its spend) to give another user a coupon (or a better one) worth more."""
    choice = choice.copy()
    n, c = values.shape
    changed = np.zeros(n, dtype=bool)
    rows_all = np.arange(n)
    for _ in range(max_rounds):
        has, cur_v, cur_s = _current(values, costs, choice, rows_all)
        remaining = budget - float(cur_s.sum())
        assigned = np.flatnonzero(has)
        if not len(assigned):
            break
        counts = np.bincount(choice[has], minlength=c)
        # users to take a coupon from: the least valuable, and the least valuable per unit of spend
        ratio = np.divide(cur_v[assigned], cur_s[assigned], out=np.full(len(assigned), np.inf), where=cur_s[assigned] > 0)
        drops = np.union1d(assigned[np.argsort(cur_v[assigned], kind="stable")[:pool]],
                           assigned[np.argsort(ratio, kind="stable")[:pool]])
        gain = values - cur_v[:, None]
        extra = costs - cur_s[:, None]
        ok = (gain > 1e-12) & (extra <= remaining + cur_s[drops].max())
        mb, mj = np.nonzero(ok)
        if not len(mb):
            break
        g, e = gain[mb, mj], extra[mb, mj]
        mratio = np.divide(g, e, out=np.full(len(g), np.inf), where=e > 0)
        keep = np.union1d(np.argsort(-g, kind="stable")[:pool], np.argsort(-mratio, kind="stable")[:pool])
        mb, mj, g, e = mb[keep], mj[keep], g[keep], e[keep]
        # pair (drop a, move b -> j): fits if e <= remaining + s_a; nets g - v_a
        net = g[None, :] - cur_v[drops][:, None]
        fits = (e[None, :] <= remaining + cur_s[drops][:, None] + 1e-12) & (drops[:, None] != mb[None, :])
        if caps is not None:
            room = (counts[mj] < caps[mj])[None, :] | (choice[drops][:, None] == mj[None, :])
            fits &= room
        net = np.where(fits, net, -np.inf)
        best = int(np.argmax(net))
        a, m = np.unravel_index(best, net.shape)
        if not net[a, m] > 1e-9:
            break
        choice[drops[a]] = NONE
        choice[mb[m]] = mj[m]
        changed[drops[a]] = changed[mb[m]] = True
    return choice, int(changed.sum())


def _improve(values: np.ndarray, costs: np.ndarray, choice: np.ndarray, budget: float, caps: np.ndarray | None,
             exchange: bool, pairs: bool) -> np.ndarray:
    """Greedy fill, then (small instances) 1-for-1 and 1-for-2 / 2-for-1 exchanges, refilling after each."""
    choice, _ = _greedy_fill(values, costs, choice, budget, caps)
    if exchange:
        choice, swapped = _exchange(values, costs, choice, budget, caps)
        if swapped:
            choice, _ = _greedy_fill(values, costs, choice, budget, caps)
    if pairs:
        choice, paired = _pair_exchange(values, costs, choice, budget, caps)
        if paired:
            choice, _ = _exchange(values, costs, choice, budget, caps)
            choice, _ = _greedy_fill(values, costs, choice, budget, caps)
    return choice


def _pair_exchange(values: np.ndarray, costs: np.ndarray, choice: np.ndarray, budget: float, caps: np.ndarray | None,
                   pool: int = 48, adds: int = 160, max_rounds: int = 50) -> tuple[np.ndarray, int]:
    """1-for-2 and 2-for-1 exchanges for small instances whose budget funds only a few coupons, where one
    coupon more or less decides the optimum: take one coupon away to give two users without one a
    coupon each, or take two away to give one user a more valuable one. Best improving move first."""
    choice = choice.copy()
    n, c = values.shape
    changed = np.zeros(n, dtype=bool)
    rows_all = np.arange(n)
    for _ in range(max_rounds):
        has, cur_v, cur_s = _current(values, costs, choice, rows_all)
        slack = budget - float(cur_s.sum())
        counts = np.bincount(choice[has], minlength=c)
        assigned = np.flatnonzero(has)
        # add candidates: (user without a coupon, coupon) cells worth something, most valuable and best ratio
        free_u = np.flatnonzero(~has)
        cand_v = values[free_u]
        au, aj = np.nonzero(cand_v > 1e-12)
        if not len(au):
            break
        av, ac = cand_v[au, aj], costs[free_u[au], aj]
        aratio = np.divide(av, ac, out=np.full(len(av), np.inf), where=ac > 0)
        keep = np.union1d(np.argsort(-av, kind="stable")[:adds], np.argsort(-aratio, kind="stable")[:adds])
        au, aj, av, ac = free_u[au[keep]], aj[keep], av[keep], ac[keep]
        if len(assigned):
            ratio = np.divide(cur_v[assigned], cur_s[assigned], out=np.full(len(assigned), np.inf),
                              where=cur_s[assigned] > 0)
            drops = np.union1d(assigned[np.argsort(cur_v[assigned], kind="stable")[:pool]],
                               assigned[np.argsort(ratio, kind="stable")[:pool]])
        else:
            drops = np.zeros(0, dtype=np.int64)
        room = np.inf if caps is None else caps - counts  # [C] coupons each coupon may still take
        best_gain, best_move = 1e-9 * max(1.0, abs(float(cur_v.sum()))), None
        # 1 (or 0) for 2: free drop d's spend (or none), add two cells of different users
        pair_v = av[:, None] + av[None, :]
        pair_c = ac[:, None] + ac[None, :]
        distinct = au[:, None] != au[None, :]
        same_coupon = aj[:, None] == aj[None, :]

        def pair_values(room_left) -> np.ndarray:
            if caps is None:
                return np.where(distinct, pair_v, -np.inf)
            r = room_left[aj]
            fits = np.where(same_coupon, r[:, None] >= 2, (r[:, None] >= 1) & (r[None, :] >= 1))
            return np.where(distinct & fits, pair_v, -np.inf)

        uncapped = pair_values(room)
        for d in [None] + drops.tolist():
            freed = slack + (0.0 if d is None else cur_s[d])
            lost = 0.0 if d is None else cur_v[d]
            if caps is not None and d is not None:
                room_d = room.copy()
                room_d[choice[d]] += 1  # the dropped coupon frees one place of its own
                pv = pair_values(room_d)
            else:
                pv = uncapped
            gain = np.where(pair_c <= freed + 1e-12, pv, -np.inf) - lost
            k = int(np.argmax(gain))
            if gain.flat[k] > best_gain:
                i, m = divmod(k, len(av))
                best_gain, best_move = float(gain.flat[k]), ([] if d is None else [d], [(au[i], aj[i]), (au[m], aj[m])])
        # 2 for 1: free two drops' spend, add one cell
        if len(drops) >= 2:
            dv, ds = cur_v[drops], cur_s[drops]
            two_v = dv[:, None] + dv[None, :]
            two_s = ds[:, None] + ds[None, :]
            upper = np.triu(np.ones((len(drops), len(drops)), dtype=bool), 1)
            for i in range(len(av)):
                if caps is not None and room[aj[i]] < 1:
                    continue
                gain = np.where(upper & (two_s + slack + 1e-12 >= ac[i]), av[i] - two_v, -np.inf)
                k = int(np.argmax(gain))
                if gain.flat[k] > best_gain:
                    a, b = divmod(k, len(drops))
                    best_gain, best_move = float(gain.flat[k]), ([drops[a], drops[b]], [(au[i], aj[i])])
        if best_move is None:
            break
        for d in best_move[0]:
            choice[d] = NONE
            changed[d] = True
        for u, j in best_move[1]:
            choice[u] = j
            changed[u] = True
    return choice, int(changed.sum())


def _total(matrix: np.ndarray, choice: np.ndarray) -> float:
    rows = np.flatnonzero(choice >= 0)
    return float(matrix[rows, choice[rows]].sum()) if len(rows) else 0.0


def _max_ratio(values: np.ndarray, costs: np.ndarray) -> float:
    best = 0.0
    for rows in _blocks(len(values)):
        v, s = values[rows], costs[rows]
        with np.errstate(divide="ignore", invalid="ignore"):
            ratio = np.where((s > 0) & (v > 0), v / np.where(s > 0, s, 1.0), 0.0)
        best = max(best, float(ratio.max(initial=0.0)))
    return best


def _dual_bound(values: np.ndarray, costs: np.ndarray, lam: float, mu: np.ndarray, caps: np.ndarray | None,
                budget: float) -> float:
    """L(lam, mu) = lam B + sum_c mu_c cap_c + sum_u max(0, max_c v - lam s - mu_c) >= the optimum."""
    total = lam * budget
    if caps is not None:
        used = mu > 0
        total += float((mu[used] * caps[used]).sum())
    for rows in _blocks(len(values)):
        net = _net(values[rows], costs[rows], lam, mu if caps is not None else None)
        total += float(np.maximum(net.max(axis=1), 0.0).sum())
    return total


# --------------------------------------------------------------------------------------- the policy

@dataclass
class Policy:
    """What an edge node needs to decide one request without seeing the population."""

    objective: str = "profit"
    lam: float = 0.0  # budget multiplier: net score = value - lam x expected spend - multiplier[coupon]
    margin: float = DEFAULT_MARGIN  # gross margin on incremental order value (profit objective)
    min_value_threshold: float = 0.0  # a coupon is given only if its net score is above this
    coupon_multipliers: dict[str, float] = field(default_factory=dict)  # coupon_id -> mu (missing = 0)
    caps: dict[str, float] = field(default_factory=dict)  # coupon_id -> planned users (informational)
    disabled: list[str] = field(default_factory=list)  # coupon_ids never given (e.g. out of stock)
    order_value: dict[str, Any] = field(default_factory=lambda: {"method": "constant", "default": DEFAULT_ORDER_VALUE})
    version: str = ""
    created_at: str = ""
    budget: float | None = None  # planned expected spend over the planning population
    model_version: str | None = None
    stats: dict[str, Any] = field(default_factory=dict)
    format: str = POLICY_FORMAT

    def __post_init__(self) -> None:
        _validate_policy(self)

    def multipliers_for(self, coupon_ids: Sequence[str] | None, n: int) -> np.ndarray:
        """``[n]`` per-coupon multipliers for candidates ``coupon_ids`` (``inf`` for disabled coupons)."""
        if coupon_ids is None:
            if self.coupon_multipliers or self.disabled:
                raise ValueError("this policy has per-coupon multipliers: pass coupon_ids to decide()")
            return np.zeros(n)
        if len(coupon_ids) != n:
            raise ValueError(f"coupon_ids has {len(coupon_ids)} entries for {n} coupons")
        disabled = set(self.disabled)
        return np.array([np.inf if cid in disabled else float(self.coupon_multipliers.get(cid, 0.0))
                         for cid in coupon_ids])

    def with_lambda(self, lam: float) -> "Policy":
        """A copy with another budget multiplier (what the pacing controller publishes)."""
        return dataclasses.replace(self, lam=float(lam))

    def to_dict(self) -> dict[str, Any]:
        out = {"format": self.format, "version": self.version, "created_at": self.created_at,
               "objective": self.objective, "lambda": self.lam, "margin": self.margin,
               "min_value_threshold": self.min_value_threshold, "coupon_multipliers": self.coupon_multipliers,
               "caps": self.caps, "disabled": self.disabled, "order_value": self.order_value,
               "budget": self.budget, "model_version": self.model_version, "stats": self.stats}
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "Policy":
        if not isinstance(data, Mapping):
            raise PolicyError(f"a policy must be a JSON object, got {type(data).__name__}")
        if data.get("format") != POLICY_FORMAT:
            raise PolicyError(f"unsupported policy format {data.get('format')!r}, expected {POLICY_FORMAT!r}")
        known = {"format", "version", "created_at", "objective", "lambda", "margin", "min_value_threshold",
                 "coupon_multipliers", "caps", "disabled", "order_value", "budget", "model_version", "stats"}
        unknown = set(data) - known
        if unknown:
            raise PolicyError(f"unknown policy keys: {sorted(unknown)}")
        for key in ("version", "objective", "lambda"):
            if key not in data:
                raise PolicyError(f"policy is missing {key!r}")
        kwargs = {"lam" if k == "lambda" else k: v for k, v in data.items() if v is not None or k in ("budget", "model_version")}
        try:
            return cls(**kwargs)
        except (TypeError, ValueError) as exc:
            raise PolicyError(str(exc)) from None


def _finite(name: str, value: Any, minimum: float | None = None) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise PolicyError(f"policy field {name!r} must be a number, got {value!r}")
    x = float(value)
    if not math.isfinite(x) or (minimum is not None and x < minimum):
        raise PolicyError(f"policy field {name!r} must be finite{'' if minimum is None else f' and >= {minimum}'}, got {value!r}")
    return x


def _validate_policy(p: Policy) -> None:
    if p.format != POLICY_FORMAT:
        raise PolicyError(f"unsupported policy format {p.format!r}, expected {POLICY_FORMAT!r}")
    if p.objective not in OBJECTIVES:
        raise PolicyError(f"policy objective must be one of {list(OBJECTIVES)}, got {p.objective!r}")
    p.lam = _finite("lambda", p.lam, 0.0)
    p.margin = _finite("margin", p.margin, 0.0)
    p.min_value_threshold = _finite("min_value_threshold", p.min_value_threshold)
    if not isinstance(p.coupon_multipliers, Mapping):
        raise PolicyError("policy field 'coupon_multipliers' must be an object coupon_id -> number")
    p.coupon_multipliers = {str(k): _finite(f"coupon_multipliers[{k!r}]", v, 0.0) for k, v in p.coupon_multipliers.items()}
    if not isinstance(p.caps, Mapping):
        raise PolicyError("policy field 'caps' must be an object coupon_id -> number")
    p.caps = {str(k): _finite(f"caps[{k!r}]", v, 0.0) for k, v in p.caps.items()}
    if not isinstance(p.disabled, (list, tuple)) or not all(isinstance(x, str) for x in p.disabled):
        raise PolicyError("policy field 'disabled' must be a list of coupon_ids")
    p.disabled = list(p.disabled)
    ov = p.order_value
    if not isinstance(ov, Mapping) or ov.get("method") not in ORDER_VALUE_METHODS:
        raise PolicyError(f"policy field 'order_value' must be an object with method in {list(ORDER_VALUE_METHODS)}, got {ov!r}")
    p.order_value = {**ov, "default": _finite("order_value.default", ov.get("default", DEFAULT_ORDER_VALUE), 0.0)}
    if ov["method"] == "history":
        p.order_value["scale"] = _finite("order_value.scale", ov.get("scale", 1.0), 0.0)
    if not isinstance(p.version, str):
        raise PolicyError("policy field 'version' must be a string")
    if p.budget is not None:
        p.budget = _finite("budget", p.budget, 0.0)
    if not isinstance(p.stats, Mapping):
        raise PolicyError("policy field 'stats' must be an object")


def make_policy(lam: float, coupon_ids: Sequence[str], multipliers: np.ndarray | None = None, *,
                objective: str = "profit", margin: float = DEFAULT_MARGIN, min_value_threshold: float = 0.0,
                caps: np.ndarray | None = None, order_value: Mapping[str, Any] | None = None,
                budget: float | None = None, model_version: str | None = None,
                stats: Mapping[str, Any] | None = None, version: str | None = None) -> Policy:
    """A policy from :func:`solve`'s multipliers. ``version`` defaults to a UTC timestamp."""
    now = datetime.now(timezone.utc)
    mults = {} if multipliers is None else {cid: float(m) for cid, m in zip(coupon_ids, multipliers) if m > 0}
    cap_map = {} if caps is None else {cid: float(x) for cid, x in zip(coupon_ids, caps) if np.isfinite(x)}
    return Policy(objective=objective, lam=float(lam), margin=float(margin),
                  min_value_threshold=float(min_value_threshold), coupon_multipliers=mults, caps=cap_map,
                  order_value=dict(order_value or {"method": "constant", "default": DEFAULT_ORDER_VALUE}),
                  version=version or now.strftime("policy-%Y%m%dT%H%M%SZ"), created_at=now.isoformat(),
                  budget=None if budget is None else float(budget), model_version=model_version,
                  stats=dict(stats or {}))


def save_policy(policy: Policy, path: str | Path) -> Path:
    """Write the policy as JSON (atomically: a reader never sees half a file)."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(policy.to_dict(), indent=2, sort_keys=True, allow_nan=False) + "\n")
    tmp.replace(path)
    return path


def load_policy(source: str | Path | Mapping[str, Any]) -> Policy:
    """A policy from a JSON file (or an already parsed object). Raises PolicyError when invalid."""
    if isinstance(source, Mapping):
        return Policy.from_dict(source)
    path = Path(source)
    try:
        data = json.loads(path.read_text(), parse_constant=_reject_constant)
    except FileNotFoundError:
        raise PolicyError(f"policy file {path} does not exist") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise PolicyError(f"policy file {path} is not valid JSON: {exc}") from None
    return Policy.from_dict(data)


def _reject_constant(name: str) -> float:
    raise PolicyError(f"policy files may not contain {name}")


# ------------------------------------------------------------------------------- per-request decisions

def net_scores(p_redeem: np.ndarray, p_buy: np.ndarray, p_control: np.ndarray | float, costs: np.ndarray,
               order_value: np.ndarray | float, policy: Policy, coupon_ids: Sequence[str] | None = None) -> np.ndarray:
    """``value - lambda x expected spend - multiplier[coupon]`` for ``[C]`` or ``[B, C]`` inputs."""
    p_redeem = np.asarray(p_redeem, dtype=np.float64)
    costs = np.asarray(costs, dtype=np.float64)
    value = incremental_value(p_redeem, p_buy, p_control, costs, order_value, policy.objective, policy.margin)
    mu = policy.multipliers_for(coupon_ids, value.shape[-1])
    with np.errstate(invalid="ignore"):  # inf multiplier (disabled) x anything stays -inf
        return value - policy.lam * (p_redeem * costs) - mu


def decide(p_redeem: np.ndarray, p_buy: np.ndarray, p_control: np.ndarray | float, costs: np.ndarray,
           order_value: np.ndarray | float, policy: Policy, coupon_ids: Sequence[str] | None = None):
    """The coupon to give, by the policy's multipliers, or no coupon.

    One request: ``p_redeem``/``p_buy``/``costs`` are ``[C]``, ``p_control`` and ``order_value`` scalars;
    returns the chosen index into the candidates or ``None``. A batch: ``[B, C]`` and ``[B]``; returns
    ``[B]`` int64 with -1 for no coupon. ``coupon_ids`` (the candidates' ids) are needed when the
    policy has per-coupon multipliers or disabled coupons.
    """
    net = net_scores(p_redeem, p_buy, p_control, costs, order_value, policy, coupon_ids)
    if net.ndim == 1:
        if net.size == 0:
            return None
        best = int(np.argmax(net))
        return best if net[best] > policy.min_value_threshold else None
    if net.ndim != 2:
        raise ValueError(f"expected [C] or [B, C] scores, got shape {net.shape}")
    if net.shape[1] == 0:
        return np.full(len(net), NONE, dtype=np.int64)
    return _argmax_positive(net, policy.min_value_threshold)


def estimate_order_value(events: Iterable[Mapping[str, Any]], policy_or_config: Policy | Mapping[str, Any] | None = None,
                         now: float | str | None = None) -> float:
    """A per-user expected order value an edge node can compute from the request alone.

    ``method="history"``: ``scale x`` the median price of the user's carted/purchased items (viewed
    items if none; events after ``now`` ignored), else ``default``. ``scale`` is calibrated offline on
    the issuance log (``training.policy_eval.calibrate_order_value``). ``method="constant"``: ``default``
    (the shop's average order value) for everyone. Malformed events are skipped, not fatal.
    """
    config = (policy_or_config.order_value if isinstance(policy_or_config, Policy)
              else dict(policy_or_config or {"method": "constant", "default": DEFAULT_ORDER_VALUE}))
    default = float(config.get("default", DEFAULT_ORDER_VALUE))
    if config.get("method") != "history":
        return default
    if now is not None:
        now = parse_ts(now, "now")  # unix seconds or ISO-8601, as the featurizer takes it
    intent, viewed = [], []
    for event in events:
        if not isinstance(event, Mapping):
            continue
        try:
            price = parse_price(event.get("price"))
            if price is None or price <= 0:
                continue
            if now is not None and parse_ts(event.get("ts")) > now:
                continue
        except FeatureError:
            continue
        kind = str(event.get("event", "")).strip().lower()
        (intent if kind in ("cart", "purchase") else viewed).append(price)
    prices = intent or viewed
    if not prices:
        return default
    return float(config.get("scale", 1.0)) * float(np.median(prices))


def rank_with_policy(p_redeem: np.ndarray, p_buy: np.ndarray, p_control: float, costs: np.ndarray,
                     order_value: float, policy: Policy, coupon_ids: Sequence[str]) -> tuple[np.ndarray, np.ndarray, int | None]:
    """For a scorer's ``objective="profit"``: ``(net scores [C], order best first, decision or None)``."""
    net = net_scores(p_redeem, p_buy, p_control, costs, order_value, policy, coupon_ids)
    order = np.argsort(-net, kind="stable")
    choice = int(order[0]) if len(order) and net[order[0]] > policy.min_value_threshold else None
    return net, order, choice


__all__ = ["NONE", "OBJECTIVES", "POLICY_FORMAT", "Policy", "PolicyError", "SolveStats", "decide",
           "estimate_order_value", "expected_spend", "incremental_value", "load_policy", "make_policy",
           "net_scores", "rank_with_policy", "save_policy", "solve"]
