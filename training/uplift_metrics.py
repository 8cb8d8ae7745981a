"""Uplift metrics a marketing team trusts: Qini curve and coefficient, uplift curve and AUUC, uplift@k,
and the cost curve (incremental gain against spend). numpy only.

The curve conventions follow ``scikit-uplift`` (``sklift.metrics``) exactly, and the tests check every
function against it: rows are ranked by predicted uplift, best first; tied scores form one group, so a
curve has one point per distinct score (plus the origin); the normalised scores divide the area
between the curve and the random-targeting diagonal by the same area for the perfect ranking.

* Qini curve at the top ``n`` rows: ``Y_t(n) - Y_c(n) x N_t(n) / N_c(n)`` (incremental responders,
  counted in treated units).
* Uplift curve: ``(Y_t(n) / N_t(n) - Y_c(n) / N_c(n)) x n``.
* Cost curve (ours): ``n x mean treated cost`` on x against ``n x (mean treated gain - mean control
  gain)`` on y, so the right "gain" (purchases, or margin x order value) and "cost" (redeemed x coupon
  cost) give incremental purchases or profit against spend.

Inputs must be a randomized experiment (treatment independent of the score). Degenerate inputs are
refused as scikit-uplift refuses them: a treatment or outcome array that is not binary, and data
without both treated and control rows, raise ``ValueError``. Unlike scikit-uplift, an outcome that is
all 0 or all 1 is accepted (the curves are flat; normalised scores are NaN).
"""
from __future__ import annotations

import logging
from typing import Sequence

import numpy as np

log = logging.getLogger(__name__)


def _check(y_true, uplift, treatment) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    y = np.asarray(y_true)
    u = np.asarray(uplift, dtype=np.float64)
    t = np.asarray(treatment)
    if not (y.ndim == u.ndim == t.ndim == 1):
        raise ValueError("y_true, uplift and treatment must be 1-D")
    if not (len(y) == len(u) == len(t)):
        raise ValueError(f"inconsistent lengths: y_true {len(y)}, uplift {len(u)}, treatment {len(t)}")
    if len(y) == 0:
        raise ValueError("no rows")
    if not np.isfinite(u).all():
        raise ValueError("uplift scores must be finite")
    for name, a in (("y_true", y), ("treatment", t)):
        if not np.isin(a, (0, 1)).all():
            raise ValueError(f"{name} must be binary (0/1), got values {np.unique(a)[:10]}")
    t = t.astype(np.float64)
    if t.min() == t.max():
        raise ValueError("uplift metrics need both treated and control rows, got only "
                         + ("treated" if t[0] == 1 else "control") + " rows")
    return y.astype(np.float64), u, t


def _sorted_groups(uplift: np.ndarray, *arrays: np.ndarray):
    """Rows by descending score (the same tie order as scikit-uplift: a stable ascending sort, reversed)
    and the index of the last row of each group of equal scores."""
    order = np.argsort(uplift, kind="mergesort")[::-1]
    u = uplift[order]
    ends = np.r_[np.flatnonzero(np.diff(u)), len(u) - 1]
    return order, ends, [a[order] for a in arrays]


def _with_origin(x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    if x.size == 0 or x[0] != 0 or y[0] != 0:
        x, y = np.r_[0, x], np.r_[0.0, y]
    return x, y


def _cumulative(y_true, uplift, treatment):
    """Per group of tied scores, best first: rows targeted ``n``, treated ``n_t`` and control ``n_c`` among
    them, and their responders ``y_t``, ``y_c`` (the counts both curves are made of)."""
    y, u, t = _check(y_true, uplift, treatment)
    _, ends, (ys, ts) = _sorted_groups(u, y, t)
    n_t = np.cumsum(ts)[ends]
    y_t = np.cumsum(ys * ts)[ends]
    y_c = np.cumsum(ys * (1 - ts))[ends]
    n = ends + 1
    return n, n_t, n - n_t, y_t, y_c


def qini_curve(y_true, uplift, treatment) -> tuple[np.ndarray, np.ndarray]:
    """Points ``(n targeted, incremental responders)`` of the Qini curve."""
    n, n_t, n_c, y_t, y_c = _cumulative(y_true, uplift, treatment)
    values = y_t - y_c * np.divide(n_t, n_c, out=np.zeros_like(n_t), where=n_c != 0)
    return _with_origin(n, values)


def uplift_curve(y_true, uplift, treatment) -> tuple[np.ndarray, np.ndarray]:
    """Points ``(n targeted, (treated rate - control rate) x n)`` of the uplift curve."""
    n, n_t, n_c, y_t, y_c = _cumulative(y_true, uplift, treatment)
    rate_t = np.divide(y_t, n_t, out=np.zeros_like(y_t), where=n_t != 0)
    rate_c = np.divide(y_c, n_c, out=np.zeros_like(y_c), where=n_c != 0)
    return _with_origin(n, (rate_t - rate_c) * n)


def perfect_qini_curve(y_true, treatment, negative_effect: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """The Qini curve of the best possible ranking (treated responders first, control responders last)."""
    y, _, t = _check(y_true, np.zeros(len(np.asarray(y_true))), treatment)
    if negative_effect:
        return qini_curve(y, y * t - y * (1 - t), t)
    gain = y[t == 1].sum() - (t == 1).sum() * y[t == 0].sum() / (t == 0).sum()
    return np.array([0, gain, len(y)]), np.array([0, gain, gain])


def perfect_uplift_curve(y_true, treatment) -> tuple[np.ndarray, np.ndarray]:
    """The uplift curve of the best possible ranking (scikit-uplift's construction)."""
    y, _, t = _check(y_true, np.zeros(len(np.asarray(y_true))), treatment)
    control_responders = np.sum((y == 1) & (t == 0))
    treated_non_responders = np.sum((y == 0) & (t == 1))
    summand = y if control_responders > treated_non_responders else t
    return uplift_curve(y, 2 * (y == t) + summand, t)


def _area(x: np.ndarray, y: np.ndarray) -> float:
    x = np.asarray(x, dtype=np.float64)
    return float(np.sum(np.diff(x) * (y[1:] + y[:-1]) / 2.0))


def _normalised(actual, perfect) -> float:
    (xa, ya), (xp, yp) = actual, perfect
    baseline = _area(np.array([0, xp[-1]]), np.array([0, yp[-1]]))
    denominator = _area(xp, yp) - baseline
    if denominator == 0:
        return float("nan")
    return (_area(xa, ya) - baseline) / denominator


def qini_auc_score(y_true, uplift, treatment, negative_effect: bool = True) -> float:
    """The Qini coefficient: area between the Qini curve and the diagonal, over the perfect ranking's."""
    y, u, t = _check(y_true, uplift, treatment)
    return _normalised(qini_curve(y, u, t), perfect_qini_curve(y, t, negative_effect))


def uplift_auc_score(y_true, uplift, treatment) -> float:
    """AUUC, normalised like scikit-uplift: area between the uplift curve and the diagonal over the perfect one's."""
    y, u, t = _check(y_true, uplift, treatment)
    return _normalised(uplift_curve(y, u, t), perfect_uplift_curve(y, t))


def uplift_at_k(y_true, uplift, treatment, strategy: str = "overall", k: float | int = 0.3) -> float:
    """Treated minus control response rate among the top ``k`` (share in (0, 1) or a row count).

    ``strategy="overall"`` takes the top k rows of everyone; ``"by_group"`` takes the top k share (or
    count) of each group separately. NaN when the top rows hold no row of a group.
    """
    y, u, t = _check(y_true, uplift, treatment)
    if strategy not in ("overall", "by_group"):
        raise ValueError(f"strategy must be 'overall' or 'by_group', got {strategy!r}")
    n = len(y)
    is_int = isinstance(k, (int, np.integer)) and not isinstance(k, bool)
    is_float = isinstance(k, (float, np.floating))
    if not (is_int or is_float) or (is_int and not 0 < k < n) or (is_float and not 0 < k < 1):
        raise ValueError(f"k={k!r} must be a share in (0, 1) or a row count in (0, {n})")
    order = np.argsort(u, kind="mergesort")[::-1]
    ys, ts = y[order], t[order]
    if strategy == "overall":
        top = int(n * k) if is_float else int(k)
        yt, tt = ys[:top], ts[:top]
        return _mean(yt[tt == 1]) - _mean(yt[tt == 0])
    n_t, n_c = int((t == 1).sum()), int((t == 0).sum())
    top_t, top_c = (int(n_t * k), int(n_c * k)) if is_float else (int(k), int(k))
    if top_t > n_t or top_c > n_c:
        raise ValueError(f"k={k} is more rows than a group has (treated {n_t}, control {n_c})")
    return _mean(ys[ts == 1][:top_t]) - _mean(ys[ts == 0][:top_c])


def _mean(a: np.ndarray) -> float:
    return float(a.mean()) if len(a) else float("nan")


def cost_curve(gain, uplift, treatment, cost) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Incremental gain against spend when targeting in order of predicted uplift, from an experiment.

    ``gain`` is each row's realized outcome worth counting (1/0 purchases for incremental purchases, or
    ``margin x order_value`` for incremental gross profit), ``cost`` its realized coupon cost
    (``redeemed x coupon cost``; 0 in control). At each distinct-score cut with ``n`` rows targeted,
    ``N_t`` of them treated::

        spend(n)       = n x sum(cost of treated) / N_t
        incremental(n) = n x (sum(gain of treated) / N_t - sum(gain of control) / N_c)

    Returns ``(n, spend, incremental)`` starting at the origin; profit is ``incremental - spend`` when
    ``gain`` is margin x order value. With ``gain = y`` and ``cost = treatment`` this is exactly the
    uplift curve against the number of treated rows.
    """
    g = np.asarray(gain, dtype=np.float64)
    s = np.asarray(cost, dtype=np.float64)
    _, u, t = _check(np.zeros(len(g), dtype=np.int8), uplift, treatment)
    if g.shape != u.shape or s.shape != u.shape:
        raise ValueError("gain, uplift, treatment and cost must have the same length")
    if not (np.isfinite(g).all() and np.isfinite(s).all()):
        raise ValueError("gain and cost must be finite")
    _, ends, (gs, ss, ts) = _sorted_groups(u, g, s, t)
    n = ends + 1
    n_t = np.cumsum(ts)[ends]
    n_c = n - n_t
    g_t = np.cumsum(gs * ts)[ends]
    g_c = np.cumsum(gs * (1 - ts))[ends]
    s_t = np.cumsum(ss * ts)[ends]
    rate = lambda total, count: np.divide(total, count, out=np.zeros_like(total), where=count != 0)  # noqa: E731
    spend = n * rate(s_t, n_t)
    incremental = n * (rate(g_t, n_t) - rate(g_c, n_c))
    return np.r_[0, n], np.r_[0.0, spend], np.r_[0.0, incremental]


def uplift_report(y_true, uplift, treatment, k: float = 0.3) -> dict[str, float]:
    """The summary row printed for a model: Qini coefficient, AUUC, uplift@k (overall and by group)."""
    y, u, t = _check(y_true, uplift, treatment)
    return {"qini": qini_auc_score(y, u, t), "auuc": uplift_auc_score(y, u, t),
            f"uplift@{k:g}": uplift_at_k(y, u, t, "overall", k),
            f"uplift@{k:g}_by_group": uplift_at_k(y, u, t, "by_group", k), "n": int(len(y)),
            "treated_share": float(t.mean())}


def truth_gain_curve(score: np.ndarray, true_gain: np.ndarray, true_cost: np.ndarray,
                     budgets: Sequence[float] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Exact curve from ground truth: target rows by ``score`` (best first) and add up their true
    expected gain against their true expected cost. Returns ``(cumulative cost, cumulative gain)``."""
    order = np.argsort(-np.asarray(score, dtype=np.float64), kind="stable")
    cost = np.r_[0.0, np.cumsum(np.asarray(true_cost, dtype=np.float64)[order])]
    gain = np.r_[0.0, np.cumsum(np.asarray(true_gain, dtype=np.float64)[order])]
    if budgets is None:
        return cost, gain
    idx = np.searchsorted(cost, np.asarray(budgets, dtype=np.float64), side="right") - 1
    return cost[idx], gain[idx]


__all__ = ["cost_curve", "perfect_qini_curve", "perfect_uplift_curve", "qini_auc_score", "qini_curve",
           "truth_gain_curve", "uplift_at_k", "uplift_auc_score", "uplift_curve", "uplift_report"]
