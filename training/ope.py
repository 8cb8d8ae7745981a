"""Off-policy evaluation from the coupon ledger alone: what would a candidate policy have earned on the
users the ledger logged?

Input is the issuance export of ``server.ledger`` (``Ledger.issuance_rows`` / ``export_issuance``:
``user_id, coupon_id ('' = none), issued_ts, redeemed, purchased, order_value, campaign_id,
decision_id, arm, propensity``). ``propensity`` is the probability the logging policy (holdout +
exploration + the served policy) took the logged action for that user, so every estimator here is
unbiased for any target policy whose actions the logging policy could take (exploration over all
eligible coupons and a holdout arm make that hold for "any coupon or none").

The target policy is given per logged row: either the action it takes (deterministic: a coupon id, or
``''``/``None`` for no coupon) or, with :class:`StochasticTarget`, a probability for every action.

Estimators, each with a 95% (``1 - alpha``) normal-approximation interval from its per-row
contributions ``psi_i`` (``value = mean(psi)``, ``se = std(psi, ddof=1) / sqrt(n)``):

* **IPS**: ``psi_i = w_i r_i`` with ``w_i = pi(a_i | x_i) / p_i``. Unbiased; high variance when
  propensities are small.
* **SNIPS** (self-normalized): ``sum(w r) / sum(w)``. Slightly biased, usually much tighter. The
  interval is the **delta method**: ``psi_i = w_i (r_i - V) / mean(w)``.
* **DR** (doubly robust): ``psi_i = sum_a pi(a | x_i) q(x_i, a) + w_i (r_i - q(x_i, a_i))`` with an
  outcome model ``q`` fitted on the logged rows and **cross-fitted** (``n_folds`` folds, folds by user so
  a user's rows never train the model that predicts them). Unbiased whatever ``q`` is (the
  propensities are known); a good ``q`` lowers the variance. Outcome models: ``"action_mean"`` (mean
  reward per action; needs nothing but the ledger) or ``"ridge"`` (a ridge regression per action on
  ``features`` the caller supplies, e.g. the model's own predicted p_buy), or precomputed predictions
  ``q_hat`` ``[n, A]``.

The reward is a parameter: a column name (``"purchased"``, ``"redeemed"``, ``"order_value"``), an array,
or a callable of the rows; :func:`profit_reward` gives ``margin x order_value x purchased - cost x
redeemed``. numpy and pandas only.
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import pandas as pd

log = logging.getLogger(__name__)

LEDGER_COLUMNS = ("user_id", "coupon_id", "issued_ts", "redeemed", "purchased", "order_value", "campaign_id",
                  "decision_id", "arm", "propensity")
REQUIRED_COLUMNS = ("user_id", "coupon_id", "propensity")  # what the estimators themselves read
ESTIMATORS = ("ips", "snips", "dr")
OUTCOME_MODELS = ("action_mean", "ridge")
NONE = ""  # the no-coupon action, as the ledger exports it

Reward = str | Sequence[float] | np.ndarray | Callable[[pd.DataFrame], np.ndarray]


class OPEError(ValueError):
    """Inputs an off-policy estimate cannot be computed from (missing columns, invalid propensities, ...)."""


@dataclass(frozen=True)
class Estimate:
    """One estimator's value of the target policy (mean reward per logged decision) and its interval."""

    estimator: str
    value: float
    se: float
    ci_low: float
    ci_high: float
    n: int
    interval: str  # how the interval was computed
    details: dict[str, Any] = field(default_factory=dict)

    @property
    def ci(self) -> tuple[float, float]:
        return self.ci_low, self.ci_high

    def covers(self, value: float) -> bool:
        return self.ci_low <= value <= self.ci_high

    def to_dict(self) -> dict[str, Any]:
        return {"estimator": self.estimator, "value": self.value, "se": self.se, "ci95": [self.ci_low, self.ci_high],
                "n": self.n, "interval": self.interval, **self.details}


@dataclass(frozen=True)
class StochasticTarget:
    """A stochastic target policy: ``probs[i, j]`` = probability of ``actions[j]`` for logged row ``i``
    (each row sums to 1). ``actions`` use ``''`` for no coupon."""

    actions: Sequence[str]
    probs: np.ndarray


# ----------------------------------------------------------------------------------------- inputs

def _action(value: Any) -> str:
    """Normalize an action: None, NaN and '' all mean no coupon."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return NONE
    return str(value)


def _actions(values: Sequence[Any] | np.ndarray | pd.Series) -> np.ndarray:
    return np.array([_action(v) for v in (values.tolist() if hasattr(values, "tolist") else values)], dtype=object)


def check_rows(rows: pd.DataFrame, required: Sequence[str] = REQUIRED_COLUMNS) -> np.ndarray:
    """Validate the logged rows; returns the propensities. Raises OPEError naming what is wrong."""
    if not isinstance(rows, pd.DataFrame):
        raise OPEError(f"rows must be a pandas DataFrame, got {type(rows).__name__}")
    missing = [c for c in required if c not in rows.columns]
    if missing:
        raise OPEError(f"missing column(s) {missing}; found {list(rows.columns)}")
    if len(rows) == 0:
        raise OPEError("no logged rows")
    p = pd.to_numeric(rows["propensity"], errors="coerce").to_numpy(dtype=np.float64)
    bad = ~np.isfinite(p) | (p <= 0.0) | (p > 1.0)
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        raise OPEError(f"propensity must be in (0, 1]: {int(bad.sum())} row(s) are not, first at row {i} "
                       f"({rows['propensity'].iloc[i]!r})")
    return p


def reward_of(rows: pd.DataFrame, reward: Reward) -> np.ndarray:
    """The per-row reward: a column name, an array, or a callable of ``rows``. Must be finite."""
    if isinstance(reward, str):
        if reward not in rows.columns:
            raise OPEError(f"reward column {reward!r} is missing; found {list(rows.columns)}")
        r = pd.to_numeric(rows[reward], errors="coerce").fillna(0.0) if reward == "order_value" else \
            pd.to_numeric(rows[reward], errors="coerce")
        r = np.asarray(r, dtype=np.float64)
    elif callable(reward):
        r = np.asarray(reward(rows), dtype=np.float64)
    else:
        r = np.asarray(reward, dtype=np.float64)
    if r.shape != (len(rows),):
        raise OPEError(f"reward must have one value per row ({len(rows)}), got shape {r.shape}")
    if not np.isfinite(r).all():
        raise OPEError(f"reward must be finite: {int((~np.isfinite(r)).sum())} row(s) are not")
    return r


def profit_reward(margin: float, coupon_costs: Mapping[str, float]) -> Callable[[pd.DataFrame], np.ndarray]:
    """Reward ``margin x order_value x purchased - cost(coupon) x redeemed`` (e.g. the catalog's costs)."""
    if not 0.0 <= margin <= 1.0:
        raise ValueError(f"margin must be in [0, 1], got {margin}")

    def reward(rows: pd.DataFrame) -> np.ndarray:
        for c in ("purchased", "redeemed", "order_value", "coupon_id"):
            if c not in rows.columns:
                raise OPEError(f"profit reward needs column {c!r}")
        coupon = _actions(rows["coupon_id"])
        unknown = sorted({c for c in coupon.tolist() if c != NONE and c not in coupon_costs})
        if unknown:
            raise OPEError(f"no cost for coupon(s) {unknown[:5]}")
        cost = np.array([coupon_costs[c] if c != NONE else 0.0 for c in coupon.tolist()], dtype=np.float64)
        value = pd.to_numeric(rows["order_value"], errors="coerce").fillna(0.0).to_numpy(np.float64)
        bought = pd.to_numeric(rows["purchased"], errors="coerce").to_numpy(np.float64)
        redeemed = pd.to_numeric(rows["redeemed"], errors="coerce").to_numpy(np.float64)
        return margin * value * bought - cost * redeemed

    return reward


def _target_matrix(target, logged: np.ndarray) -> tuple[list[str], np.ndarray]:
    """(action list, probabilities [n, A]) over the union of logged and target actions."""
    n = len(logged)
    if isinstance(target, StochasticTarget):
        t_actions = [_action(a) for a in target.actions]
        if len(set(t_actions)) != len(t_actions):
            raise OPEError("StochasticTarget.actions has duplicates")
        probs = np.asarray(target.probs, dtype=np.float64)
        if probs.shape != (n, len(t_actions)):
            raise OPEError(f"StochasticTarget.probs must have shape {(n, len(t_actions))}, got {probs.shape}")
        if not np.isfinite(probs).all() or (probs < 0).any() or not np.allclose(probs.sum(axis=1), 1.0, atol=1e-6):
            raise OPEError("StochasticTarget.probs rows must be probabilities summing to 1")
        actions = t_actions + sorted(set(logged.tolist()) - set(t_actions))
        full = np.zeros((n, len(actions)))
        full[:, :len(t_actions)] = probs
        return actions, full
    chosen = _actions(target)
    if len(chosen) != n:
        raise OPEError(f"the target policy must give one action per logged row ({n}), got {len(chosen)}")
    actions = sorted(set(logged.tolist()) | set(chosen.tolist()))
    col = {a: j for j, a in enumerate(actions)}
    full = np.zeros((n, len(actions)))
    full[np.arange(n), [col[a] for a in chosen.tolist()]] = 1.0
    return actions, full


# -------------------------------------------------------------------------------- outcome models

def _fold_of(users: np.ndarray, n_folds: int, seed: int) -> np.ndarray:
    """A fold per row, the same for all rows of a user (random over users, seeded)."""
    codes, uniques = pd.factorize(pd.Series(users), sort=False)
    per_user = np.random.default_rng(seed).permutation(len(uniques)) % n_folds
    return per_user[codes]


def _fit_predict(model: str, train: np.ndarray, test: np.ndarray, logged_idx: np.ndarray, r: np.ndarray,
                 n_actions: int, features: np.ndarray | None, ridge: float) -> np.ndarray:
    """Predictions ``[len(test), A]`` of the reward of every action, fitted on rows ``train``."""
    prior = float(r[train].mean())
    out = np.full((len(test), n_actions), prior)
    for j in range(n_actions):
        rows = train[logged_idx[train] == j]
        if len(rows) == 0:
            continue  # an action never logged in the other folds: the overall mean
        # shrink small actions toward the overall mean (as if 5 rows at the prior had been seen)
        mean = (r[rows].sum() + 5.0 * prior) / (len(rows) + 5.0)
        if model == "action_mean" or len(rows) < 10:
            out[:, j] = mean
            continue
        x = features[rows]
        mu, sd = x.mean(axis=0), x.std(axis=0)
        sd = np.where(sd > 0, sd, 1.0)
        z = (x - mu) / sd
        beta = np.linalg.solve(z.T @ z + ridge * np.eye(z.shape[1]), z.T @ (r[rows] - mean))
        out[:, j] = mean + ((features[test] - mu) / sd) @ beta
    return out


def outcome_predictions(rows: pd.DataFrame, actions: Sequence[str], reward: np.ndarray, model: str = "action_mean",
                        features: np.ndarray | None = None, n_folds: int = 5, seed: int = 0,
                        ridge: float = 1.0) -> np.ndarray:
    """Cross-fitted predicted reward of every action for every row, ``[n, A]``: row ``i``'s prediction
    comes from a model fitted on the other folds (folds by user)."""
    if model not in OUTCOME_MODELS:
        raise OPEError(f"outcome model must be one of {list(OUTCOME_MODELS)}, got {model!r}")
    n = len(rows)
    if model == "ridge":
        if features is None:
            raise OPEError("outcome model 'ridge' needs features [n, d]")
        features = np.asarray(features, dtype=np.float64)
        if features.ndim == 1:
            features = features[:, None]
        if features.shape[0] != n or not np.isfinite(features).all():
            raise OPEError(f"features must be finite with {n} rows, got shape {features.shape}")
    col = {a: j for j, a in enumerate(actions)}
    logged_idx = np.array([col[a] for a in _actions(rows["coupon_id"]).tolist()], dtype=np.int64)
    folds = _fold_of(rows["user_id"].astype(str).to_numpy(), max(n_folds, 1), seed)
    q = np.empty((n, len(actions)))
    if n_folds <= 1:  # no cross-fitting: fitted and evaluated on the same rows
        everything = np.arange(n)
        return _fit_predict(model, everything, everything, logged_idx, reward, len(actions), features, ridge)
    for k in range(n_folds):
        test = np.flatnonzero(folds == k)
        train = np.flatnonzero(folds != k)
        if len(test) == 0:
            continue
        if len(train) == 0:
            raise OPEError("cross-fitting needs rows of more than one user")
        q[test] = _fit_predict(model, train, test, logged_idx, reward, len(actions), features, ridge)
    return q


# ------------------------------------------------------------------------------------- estimators

def _estimate(name: str, psi: np.ndarray, value: float, z: float, interval: str, **details: Any) -> Estimate:
    n = len(psi)
    se = float(np.std(psi, ddof=1) / math.sqrt(n)) if n > 1 else float("nan")
    return Estimate(name, float(value), se, float(value - z * se), float(value + z * se), n, interval, details)


def _z(alpha: float) -> float:
    if not 0.0 < alpha < 1.0:
        raise ValueError(f"alpha must be in (0, 1), got {alpha}")
    # inverse normal CDF by bisection on erf (no scipy): exact enough for an interval
    lo, hi = 0.0, 10.0
    for _ in range(100):
        mid = (lo + hi) / 2.0
        if 0.5 * math.erfc(mid / math.sqrt(2.0)) > alpha / 2.0:
            lo = mid
        else:
            hi = mid
    return (lo + hi) / 2.0


def evaluate(rows: pd.DataFrame, target, reward: Reward = "purchased", estimators: Sequence[str] = ESTIMATORS,
             outcome_model: str = "action_mean", features: np.ndarray | None = None,
             q_hat: np.ndarray | None = None, n_folds: int = 5, seed: int = 0, alpha: float = 0.05,
             ridge: float = 1.0) -> dict[str, Estimate]:
    """Estimate the target policy's mean reward per decision from logged ledger rows.

    ``target``: the action per row (coupon id, or ``''``/None for none) or a :class:`StochasticTarget`.
    ``q_hat``: precomputed outcome predictions ``[n, A]`` for the action order of the returned
    ``details["actions"]`` (then ``outcome_model``/``features`` are ignored and nothing is cross-fitted).
    Returns ``{name: Estimate}`` for the requested ``estimators`` (``ips``, ``snips``, ``dr``).
    """
    unknown = [e for e in estimators if e not in ESTIMATORS]
    if unknown:
        raise OPEError(f"unknown estimator(s) {unknown}; choose from {list(ESTIMATORS)}")
    p = check_rows(rows)
    r = reward_of(rows, reward)
    logged = _actions(rows["coupon_id"])
    actions, pi = _target_matrix(target, logged)
    col = {a: j for j, a in enumerate(actions)}
    logged_idx = np.array([col[a] for a in logged.tolist()], dtype=np.int64)
    n = len(rows)
    pi_logged = pi[np.arange(n), logged_idx]
    w = pi_logged / p
    z = _z(alpha)
    level = f"{100 * (1 - alpha):g}%"
    out: dict[str, Estimate] = {}
    common = {"matched_share": float((pi_logged > 0).mean()), "mean_weight": float(w.mean()),
              "max_weight": float(w.max()), "effective_n": float(w.sum() ** 2 / max((w ** 2).sum(), 1e-300))}
    if "ips" in estimators:
        psi = w * r
        out["ips"] = _estimate("ips", psi, psi.mean(), z, f"{level} normal, per-row contributions", **common)
    if "snips" in estimators:
        if w.sum() <= 0:
            raise OPEError("SNIPS is undefined: the target policy never takes a logged action")
        value = float((w * r).sum() / w.sum())
        psi = w * (r - value) / w.mean()
        out["snips"] = _estimate("snips", psi, value, z, f"{level} normal, delta method", **common)
    if "dr" in estimators:
        if q_hat is not None:
            q = np.asarray(q_hat, dtype=np.float64)
            if q.shape != (n, len(actions)) or not np.isfinite(q).all():
                raise OPEError(f"q_hat must be finite with shape {(n, len(actions))} (actions {actions}), "
                               f"got {q.shape}")
            how = "given q_hat"
        else:
            q = outcome_predictions(rows, actions, r, outcome_model, features, n_folds, seed, ridge)
            how = f"{outcome_model}, cross-fitted over {n_folds} user folds" if n_folds > 1 else outcome_model
        direct = (pi * q).sum(axis=1)
        psi = direct + w * (r - q[np.arange(n), logged_idx])
        out["dr"] = _estimate("dr", psi, psi.mean(), z, f"{level} normal, per-row contributions",
                              outcome_model=how, direct_method=float(direct.mean()), **common)
    for e in out.values():
        e.details["actions"] = actions
    return out


def on_policy(rows: pd.DataFrame, reward: Reward = "purchased", alpha: float = 0.05) -> Estimate:
    """The logging policy's realized mean reward with its normal interval (what every estimator returns
    for the logging policy itself: there all importance weights are 1)."""
    check_rows(rows)
    r = reward_of(rows, reward)
    return _estimate("on_policy", r, r.mean(), _z(alpha), f"{100 * (1 - alpha):g}% normal")


def logging_policy_target(rows: pd.DataFrame, policy_actions: Sequence[Any], eligible: Sequence[Sequence[str]] | Sequence[str],
                          holdout_share: float, exploration_share: float) -> StochasticTarget:
    """The ledger's logging policy as a :class:`StochasticTarget`: ``h`` on no coupon, ``e`` spread over
    the eligible coupons, ``1 - h - e`` on the policy's choice (``policy_actions``, None for none).
    ``eligible``: one list for every row, or a list per row. Evaluating it must give the on-policy mean."""
    n = len(rows)
    per_row = isinstance(eligible[0], (list, tuple, np.ndarray)) if len(eligible) else False
    elig = [list(e) for e in eligible] if per_row else [list(eligible)] * n
    if len(elig) != n or len(policy_actions) != n:
        raise OPEError("policy_actions and eligible must have one entry per row")
    chosen = _actions(policy_actions)
    actions = sorted({NONE} | {c for e in elig for c in e} | set(chosen.tolist()) | set(_actions(rows["coupon_id"]).tolist()))
    col = {a: j for j, a in enumerate(actions)}
    probs = np.zeros((n, len(actions)))
    h, e = holdout_share, exploration_share
    for i in range(n):
        probs[i, col[NONE]] += h
        if elig[i]:
            for c in elig[i]:
                probs[i, col[c]] += e / len(elig[i])
        else:
            probs[i, col[NONE]] += e
        probs[i, col[chosen[i]]] += 1.0 - h - e
    return StochasticTarget(actions, probs)


def format_estimates(estimates: Mapping[str, Estimate]) -> str:
    """A small table: estimator, value, 95% interval, standard error, effective sample size."""
    lines = [f"{'estimator':<10}{'value':>12}{'ci low':>12}{'ci high':>12}{'se':>10}{'eff. n':>10}"]
    for e in estimates.values():
        lines.append(f"{e.estimator:<10}{e.value:>12.5f}{e.ci_low:>12.5f}{e.ci_high:>12.5f}{e.se:>10.5f}"
                     f"{e.details.get('effective_n', float('nan')):>10.0f}")
    return "\n".join(lines)


__all__ = ["ESTIMATORS", "Estimate", "LEDGER_COLUMNS", "OPEError", "StochasticTarget", "check_rows", "evaluate",
           "format_estimates", "logging_policy_target", "on_policy", "outcome_predictions", "profit_reward",
           "reward_of"]
