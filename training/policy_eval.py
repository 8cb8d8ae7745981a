"""Which coupon, for whom, within budget: policies evaluated exactly on the simulator's ground truth.

Run: ``python -m training.policy_eval --artifacts artifacts`` (after ``make demo``). It prints

1. uplift metrics (Qini coefficient, AUUC, uplift@30%) of the Transformer and the baselines on the
   held-out rows of the randomized issuance log (observed outcomes, no ground truth needed), and
2. the policy table: for budgets that are shares of "everyone gets their best coupon", the exact
   expected spend, incremental purchases and incremental profit of each policy under the true
   probabilities, and the share of the oracle's incremental profit it captures,

and writes ``policy_eval.json``, ``profit_vs_spend.png`` and ``policy.json`` (the Transformer's
budgeted allocation at the headline budget: what edge nodes load) to ``--out``.

Definitions (all configurable on the command line):

* value of coupon c for user u, profit objective: ``(p_buy - p_buy_control) x margin x order value
  - p_redeem x cost``; expected spend ``p_redeem x cost``. Policies plan with their model's
  probabilities; the evaluation uses the true ones (and the truth's ``expected_order_value``).
* order value the models plan with: the runtime's edge estimate, ``runtime.allocation.estimate_order_value``
  = scale x the median price of the user's carted/bought items, with the scale calibrated on the
  control arm of the training users' issuance rows (:func:`calibrate_order_value`).
* full budget: the true expected spend of giving every user the coupon with the highest true
  incremental profit; budgets are shares of it (30% is the headline).
* every policy spends the same budget under the true probabilities. Ranking policies (random,
  similarity, highest p_redeem, highest uplift) give each user their top coupon by the policy's score,
  users in order of that score, until the next user would exceed the budget. Budgeted allocations
  (ours and the baselines' models) apply the Lagrangian rule ``argmax value - lambda x spend`` with the
  multiplier set so that true spend meets the budget: what the pacing controller does in a live
  campaign (``training.pacing``). The row "planned" shows the solver's multiplier from model estimates
  alone, before pacing, and its true spend. The oracle is the same solver fed the true probabilities.
* ``--sensitivity`` adds yardstick rows: the same allocation fed the true probabilities through
  logit noise of sd 0.1 / 0.25 / 0.5, i.e. how accurate a model has to be for a given share.
* ``--ceiling`` adds a yardstick row: gradient boosting fitted to the *true* uplift and redemption on
  the served features, cross-fitted over the held-out users (:func:`add_feature_ceiling`): roughly
  what the features can tell with perfect labels.
* ``--objective purchases`` allocates for incremental purchases instead; the oracle share is then a
  share of incremental purchases.
* similarity policy: cosine between the user's category-preference profile (events weighted view 1 /
  cart 2 / purchase 3, halving every 14 days before the decision time) and the coupon's scope (its
  category; a sitewide coupon's scope is every category equally). It ignores the model entirely: the
  way "match the coupon to the user" systems rank offers.
"""
from __future__ import annotations

import argparse
import json
import logging
import math
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import pandas as pd

from runtime.allocation import (DEFAULT_MARGIN, NONE, estimate_order_value, incremental_value, make_policy, save_policy,
                                solve)
from training import data as data_io
from training import uplift_metrics as um

log = logging.getLogger(__name__)

HEADLINE_BUDGET = 0.3
DEFAULT_BUDGETS = (0.1, 0.2, 0.3, 0.5, 1.0)
TARGET_ORACLE_SHARE = 0.8  # the targets at the headline budget
TARGET_VS_SIMILARITY = 1.5
EVENT_WEIGHTS = {"view": 1.0, "cart": 2.0, "purchase": 3.0}
HALF_LIFE_DAYS = 14.0
RANK_POLICIES = ("random", "similarity", "p_redeem", "uplift")


@dataclass
class Predictions:
    p_redeem: np.ndarray  # [N, C]
    p_buy: np.ndarray  # [N, C]
    p_control: np.ndarray  # [N]

    @property
    def uplift(self) -> np.ndarray:
        return self.p_buy - self.p_control[:, None]


@dataclass
class PolicyData:
    """Everything the evaluation needs, aligned on held-out users x catalog coupons."""

    user_ids: np.ndarray  # [N]
    coupon_ids: list[str]  # [C]
    cost: np.ndarray  # [C] cost per redemption
    truth: Predictions  # true probabilities
    true_order_value: np.ndarray  # [N, C] expected order value (truth)
    order_value: np.ndarray  # [N] the edge estimate the models plan with
    order_value_config: dict[str, Any]
    similarity: np.ndarray  # [N, C]
    models: dict[str, Predictions] = field(default_factory=dict)
    experiment: dict[str, np.ndarray] = field(default_factory=dict)  # held-out issuance rows (observed)
    model_version: str | None = None
    segments: np.ndarray | None = None  # [N] the simulator's latent response type (analysis only, never an input)
    sequences: Any = None  # the held-out users' featurized histories (training.dataset.SequenceArrays)
    coupon_arrays: dict[str, np.ndarray] | None = None  # the catalog, featurized (runtime.features.coupon_features)
    n_category_ids: int | None = None  # the feature spec's category vocabulary size


# ------------------------------------------------------------------------------------------ loading

def truth_matrices(truth: pd.DataFrame, user_ids: Sequence[str], coupon_ids: Sequence[str]):
    """Ground-truth rows -> ``Predictions`` and expected order value ``[N, C]`` in the given order."""
    u_index = {u: i for i, u in enumerate(user_ids)}
    c_index = {c: j for j, c in enumerate(coupon_ids)}
    rows = truth["user_id"].map(u_index)
    cols = truth["coupon_id"].map(c_index)
    keep = rows.notna() & cols.notna()
    r, c = rows[keep].to_numpy(np.int64), cols[keep].to_numpy(np.int64)
    shape = (len(user_ids), len(coupon_ids))
    filled = np.zeros(shape, dtype=bool)
    filled[r, c] = True
    if not filled.all():
        raise ValueError(f"ground truth misses {int((~filled).sum())} user x coupon pairs")

    def matrix(column: str) -> np.ndarray:
        out = np.empty(shape)
        out[r, c] = truth.loc[keep, column].to_numpy(np.float64)
        return out

    control = matrix("p_buy_control")[:, 0]
    return Predictions(matrix("p_redeem"), matrix("p_buy_coupon"), control), matrix("expected_order_value")


def calibrate_order_value(histories: Mapping[str, list[dict]], issuance: pd.DataFrame) -> dict[str, Any]:
    """The edge order-value estimate's scale: control-arm orders of these users over their history-price
    median (ratio of sums), and the default for users without priced history (mean control order)."""
    control = issuance[(issuance["coupon_id"] == "") & (issuance["purchased"] == 1)]
    base = {"method": "history", "scale": 1.0, "default": 1.0}
    orders, medians = [], []
    for user, value, now in zip(control["user_id"], control["order_value"], control["issued_ts"]):
        history = histories.get(user)
        if history:
            m = estimate_order_value(history, {**base, "default": math.nan}, now=now)
            if math.isfinite(m):
                orders.append(value)
                medians.append(m)
    default = float(control["order_value"].mean()) if len(control) else 30.0
    if not orders:
        log.warning("no control-arm orders with a priced history: order value = %.2f for everyone", default)
        return {"method": "constant", "default": default}
    scale = float(np.sum(orders) / np.sum(medians))
    log.info("order value estimate: %.3f x median history price (from %d control orders), default %.2f",
             scale, len(orders), default)
    return {"method": "history", "scale": round(scale, 4), "default": round(default, 4)}


def similarity_matrix(histories: Mapping[str, list[dict]], user_ids: Sequence[str], nows: Sequence[float],
                      coupon_categories: Sequence[str], n_categories: int) -> np.ndarray:
    """Cosine between each user's category-preference profile and each coupon's category scope."""
    c = len(coupon_categories)
    out = np.zeros((len(user_ids), c))
    sitewide = np.array([cat == "*" for cat in coupon_categories])
    decay = math.log(2.0) / (HALF_LIFE_DAYS * 86400.0)
    for i, (user, now) in enumerate(zip(user_ids, nows)):
        profile: dict[str, float] = {}
        for e in histories.get(user, []):
            if e["ts"] > now:
                continue
            w = EVENT_WEIGHTS.get(e["event"], 1.0) * math.exp(-decay * (now - e["ts"]))
            profile[e["category"]] = profile.get(e["category"], 0.0) + w
        if not profile:
            continue
        weights = np.fromiter(profile.values(), dtype=np.float64)
        norm = float(np.sqrt((weights ** 2).sum()))
        for j, cat in enumerate(coupon_categories):
            out[i, j] = profile.get(cat, 0.0) / norm if not sitewide[j] else 0.0
        out[i, sitewide] = weights.sum() / (math.sqrt(max(n_categories, 1)) * norm)
    return out


def _first_issuance(issuance: pd.DataFrame) -> dict[str, float]:
    first = issuance.drop_duplicates("user_id", keep="first")
    return dict(zip(first["user_id"], first["issued_ts"]))


def load_policy_data(data_dir: str | Path, checkpoint: str | Path | None, model_dir: str | Path | None = None,
                     baselines: bool = True, seed: int = 0) -> PolicyData:
    """Load data, ground truth and the trained model; predict for held-out users; fit the baselines.

    The Transformer's probabilities come from the exported int8 ONNX model when ``model_dir`` is given
    (what edge nodes serve: then the torch checkpoint is not loaded at all, only its run's
    ``config.json`` is read for the held-out split), else from the checkpoint.
    """
    from runtime.features import FeatureSpec, coupon_features
    from training.dataset import issuance_arrays, sequence_arrays
    from training.evaluate import AggregateLogistic
    from training.uplift_baselines import TLearnerGBM

    started = time.perf_counter()
    data_dir = Path(data_dir)
    if checkpoint is None and model_dir is None:
        raise ValueError("need a checkpoint or an exported model folder")
    events, _ = data_io.load_events(data_dir / "events.csv")
    coupons_df, _ = data_io.load_coupons(data_dir / "coupons.csv")
    coupons = data_io.coupon_records(coupons_df)
    coupon_ids = [c["coupon_id"] for c in coupons]
    issuance, _ = data_io.load_issuance(data_dir / "issuance.csv", coupon_ids=set(coupon_ids))
    truth_path = data_dir / "ground_truth.csv"
    if not truth_path.exists():
        raise FileNotFoundError(f"{truth_path} is missing: policy evaluation needs the simulator's ground truth")
    truth_df = pd.read_csv(truth_path, dtype={"user_id": str, "coupon_id": str})
    histories = data_io.group_histories(events)

    user_ids = truth_df["user_id"].drop_duplicates().to_numpy()
    truth, true_ov = truth_matrices(truth_df, user_ids, coupon_ids)
    first_ts = _first_issuance(issuance)
    fallback_now = float(issuance["issued_ts"].median())
    nows = np.array([first_ts.get(u, fallback_now) for u in user_ids], dtype=np.float64)

    model_version = None
    if model_dir is not None:
        manifest = json.loads((Path(model_dir) / "manifest.json").read_text())
        model_version = manifest.get("model_version")
        spec = FeatureSpec.from_dict(manifest["feature_spec"])
        eval_seq = sequence_arrays(histories, user_ids.tolist(), nows.tolist(), spec)
        coupon_np = coupon_features(coupons, spec)
        models = {"transformer": _onnx_predictions(model_dir, eval_seq, coupons)}
        if manifest.get("blend"):  # the served model is a blend: show the network alone too
            models["network_only"] = _onnx_predictions(model_dir, eval_seq, coupons, blend=False)
        eval_fraction = _eval_fraction(checkpoint, data_dir)
    else:
        from training.train import load_checkpoint
        model, ckpt = load_checkpoint(checkpoint)
        spec = FeatureSpec.from_dict(ckpt["feature_spec"])
        eval_seq = sequence_arrays(histories, user_ids.tolist(), nows.tolist(), spec)
        coupon_np = coupon_features(coupons, spec)
        network = _torch_predictions(model, eval_seq, coupons, spec)
        models = {"transformer": network}
        if ckpt.get("blend") is not None:  # what the export will serve: the network blended with the other families
            from runtime.blend import Blend
            mixed = Blend.from_dict(ckpt["blend"]).mix([network.p_redeem, network.p_buy, network.p_control],
                                                       eval_seq.arrays, coupon_np)
            models = {"transformer": Predictions(*mixed), "network_only": network}
        eval_fraction = float(ckpt["train_config"].get("eval_fraction", 0.2))

    is_eval = data_io.is_eval_user(issuance["user_id"].tolist(), eval_fraction)
    leaked = int(np.isin(issuance.loc[~is_eval, "user_id"].to_numpy(), user_ids).sum())
    if leaked:
        log.warning("%d ground-truth users are training users at eval_fraction %.3g: the evaluation is not held out",
                    leaked, eval_fraction)
    train_rows = issuance[~is_eval]
    ov_config = calibrate_order_value(histories, train_rows)
    order_value = np.array([estimate_order_value(histories.get(u, []), ov_config, now=t) for u, t in zip(user_ids, nows)])

    if baselines:
        train_arrays = issuance_arrays(train_rows, histories, spec, coupon_ids)
        models["t_learner_gbm"] = Predictions(*TLearnerGBM(coupon_np, spec.n_category_ids, seed).fit(train_arrays).predict_all(eval_seq))
        models["logistic"] = Predictions(*AggregateLogistic(coupon_np, spec.n_category_ids, seed).fit(train_arrays).predict_all(eval_seq))

    categories = events["category"].unique()
    similarity = similarity_matrix(histories, user_ids, nows, [c["category"] for c in coupons], len(categories))
    experiment = _experiment_rows(issuance[is_eval], user_ids, coupon_ids, coupons_df)
    log.info("policy data: %d held-out users x %d coupons, %d models, loaded in %.1f s", len(user_ids), len(coupon_ids),
             len(models), time.perf_counter() - started)
    segments = None
    if "response_type" in truth_df.columns:
        segments = truth_df.drop_duplicates("user_id").set_index("user_id").loc[user_ids, "response_type"].to_numpy(str)
    return PolicyData(user_ids=user_ids, coupon_ids=coupon_ids, cost=coupons_df["cost"].to_numpy(np.float64),
                      truth=truth, true_order_value=true_ov, order_value=order_value, order_value_config=ov_config,
                      similarity=similarity, models=models, experiment=experiment, model_version=model_version,
                      segments=segments, sequences=eval_seq, coupon_arrays=coupon_np,
                      n_category_ids=spec.n_category_ids)


def _eval_fraction(checkpoint: str | Path | None, data_dir: Path) -> float:
    """The held-out share the model was trained with: its run's config.json, else the simulator's."""
    for path in ([Path(checkpoint).parent / "config.json"] if checkpoint is not None else []) + [data_dir / "sim_config.json"]:
        if path.exists():
            value = json.loads(path.read_text()).get("eval_fraction")
            if value is not None:
                return float(value)
    log.warning("no config.json or sim_config.json with eval_fraction: assuming 0.2")
    return 0.2


def _onnx_predictions(model_dir: str | Path, seq, coupons: list[dict], blend: bool = True) -> Predictions:
    """What the model directory serves for ``seq`` x ``coupons``; ``blend=False``: the network alone."""
    from runtime.scorer import Scorer
    scorer = Scorer(model_dir, coupons)
    if not blend:
        scorer.blend = None
    index = scorer.candidate_index([c["coupon_id"] for c in coupons])
    outs = [scorer.run({k: v[rows] for k, v in seq.arrays.items()}, index)
            for rows in np.array_split(np.arange(len(seq)), max(1, len(seq) // 512))]
    return Predictions(*(np.concatenate([o[k] for o in outs]).astype(np.float64)
                         for k in ("p_redeem", "p_buy", "p_buy_control")))


def _torch_predictions(model, seq, coupons: list[dict], spec) -> Predictions:
    from training.dataset import coupon_tensors
    from training.train import predict_all
    return Predictions(*(a.astype(np.float64) for a in predict_all(model, seq, coupon_tensors(coupons, spec))))


def _experiment_rows(rows: pd.DataFrame, user_ids: np.ndarray, coupon_ids: list[str], coupons_df: pd.DataFrame) -> dict:
    """Held-out issuance rows whose user is in the ground truth: for observed-outcome uplift metrics."""
    index = {u: i for i, u in enumerate(user_ids)}
    rows = rows[rows["user_id"].isin(index)]
    c_index = {c: j for j, c in enumerate(coupon_ids)}
    coupon = np.array([c_index.get(c, NONE) for c in rows["coupon_id"]], dtype=np.int64)
    cost = np.where(coupon >= 0, coupons_df["cost"].to_numpy(np.float64)[np.maximum(coupon, 0)], 0.0)
    return {"user": rows["user_id"].map(index).to_numpy(np.int64), "coupon": coupon,
            "treated": (coupon >= 0).astype(np.int64), "purchased": rows["purchased"].to_numpy(np.int64),
            "redeemed": rows["redeemed"].to_numpy(np.int64), "order_value": rows["order_value"].to_numpy(np.float64),
            "cost": cost * rows["redeemed"].to_numpy(np.float64)}


# --------------------------------------------------------------------------------------- evaluation

@dataclass
class Outcome:
    spend: float
    purchases: float
    profit: float
    n_given: int

    def to_dict(self) -> dict[str, float]:
        return {"spend": self.spend, "incremental_purchases": self.purchases, "incremental_profit": self.profit,
                "coupons_given": self.n_given}


class Evaluator:
    """Exact expected outcomes of allocations under the true probabilities."""

    def __init__(self, data: PolicyData, margin: float = DEFAULT_MARGIN, objective: str = "profit", seed: int = 0):
        self.data = data
        self.margin = margin
        self.objective = objective
        t = data.truth
        self.true_uplift = t.uplift
        self.true_profit = incremental_value(t.p_redeem, t.p_buy, t.p_control, data.cost, data.true_order_value,
                                             "profit", margin)
        self.true_spend = t.p_redeem * data.cost
        self.true_value = self.true_profit if objective == "profit" else self.true_uplift
        self.tiebreak = np.random.default_rng(seed).permutation(len(data.user_ids))
        self.random_scores = np.random.default_rng(seed + 1).random(self.true_spend.shape)

    # --- budgets
    def full_budget(self) -> float:
        """True spend of giving everyone the coupon with the highest true incremental value."""
        best = self.true_value.argmax(axis=1)
        return float(self.true_spend[np.arange(len(best)), best].sum())

    def outcome(self, choice: np.ndarray) -> Outcome:
        rows = np.flatnonzero(choice >= 0)
        cols = choice[rows]
        return Outcome(float(self.true_spend[rows, cols].sum()), float(self.true_uplift[rows, cols].sum()),
                       float(self.true_profit[rows, cols].sum()), int(len(rows)))

    # --- policies
    def model_values(self, name: str) -> tuple[np.ndarray, np.ndarray]:
        p = self.data.models[name]
        values = incremental_value(p.p_redeem, p.p_buy, p.p_control, self.data.cost, self.data.order_value,
                                   self.objective, self.margin)
        return values, p.p_redeem * self.data.cost

    def scores(self, policy: str) -> np.ndarray:
        if policy == "random":
            return self.random_scores
        if policy == "similarity":
            return self.data.similarity
        model = self.data.models["transformer"]
        return {"p_redeem": model.p_redeem, "uplift": model.uplift}[policy]

    def rank_policy(self, scores: np.ndarray, budget: float) -> np.ndarray:
        """Each user's top coupon by ``scores``; users by that score (ties in random order) until the
        next one would exceed the budget (true expected spend)."""
        pick = scores.argmax(axis=1)
        top = scores[np.arange(len(pick)), pick]
        order = np.lexsort((self.tiebreak, -top))
        spend = np.cumsum(self.true_spend[order, pick[order]])
        k = int(np.searchsorted(spend, budget * (1 + 1e-12), side="right"))
        choice = np.full(len(pick), NONE, dtype=np.int64)
        choice[order[:k]] = pick[order[:k]]
        return choice

    def paced_allocation(self, values: np.ndarray, spend: np.ndarray, budget: float, iters: int = 60) -> tuple[np.ndarray, float]:
        """The multiplier rule on model estimates, with lambda set so that true spend meets the budget."""
        def rule(lam: float) -> np.ndarray:
            net = values - lam * spend
            best = net.argmax(axis=1)
            return np.where(net[np.arange(len(best)), best] > 0, best, NONE)

        def true_spend(choice: np.ndarray) -> float:
            return self.outcome(choice).spend

        choice = rule(0.0)
        if true_spend(choice) <= budget:
            return choice, 0.0
        lo, hi = 0.0, 1.0
        while true_spend(rule(hi)) > budget:
            lo, hi = hi, hi * 4.0
            if hi > 1e12:
                return np.full(len(values), NONE, dtype=np.int64), hi
        best = rule(hi)
        for _ in range(iters):
            mid = 0.5 * (lo + hi)
            cand = rule(mid)
            if true_spend(cand) > budget:
                lo = mid
            else:
                hi, best = mid, cand
            if hi - lo <= 1e-9 * hi:
                break
        return best, hi

    def policies(self, budget: float) -> dict[str, dict[str, Any]]:
        """Every policy's outcome at ``budget`` (true expected spend)."""
        out: dict[str, dict[str, Any]] = {}
        for name in RANK_POLICIES:
            out[name] = self.outcome(self.rank_policy(self.scores(name), budget)).to_dict()
        for name in self.data.models:
            values, spend = self.model_values(name)
            choice, lam = self.paced_allocation(values, spend, budget)
            label = "allocation" if name == "transformer" else f"allocation_{name}"
            out[label] = {**self.outcome(choice).to_dict(), "lambda": lam}
            if name == "transformer":
                planned, plam, _ = solve(values, spend, budget, fill=False)
                out["allocation_planned"] = {**self.outcome(planned).to_dict(), "lambda": plam}
        oracle, olam, stats = solve(self.true_value, self.true_spend, budget)
        out["oracle"] = {**self.outcome(oracle).to_dict(), "lambda": olam, "gap": stats.gap}
        key = self.metric
        best = out["oracle"][key]
        for row in out.values():
            row["oracle_share"] = row[key] / best if best > 0 else float("nan")
        return out

    def segment_breakdown(self, budget: float) -> dict[str, dict[str, dict[str, float]]]:
        """Where each budgeted allocation's coupons go, per latent response type of the simulator
        (persuadable, sure thing, ...): coupons given, true spend and true incremental profit. What a
        share of the oracle does not say: *whom* a model wrongly pays (e.g. sure things, who buy anyway)."""
        if self.data.segments is None:
            return {}
        choices = {}
        for name in self.data.models:
            if name.startswith("truth_noise_") or name == "feature_ceiling":  # yardsticks: not in the segment table
                continue
            values, spend = self.model_values(name)
            choices["allocation" if name == "transformer" else f"allocation_{name}"] = self.paced_allocation(values, spend, budget)[0]
        choices["oracle"] = solve(self.true_value, self.true_spend, budget)[0]
        out: dict[str, dict[str, dict[str, float]]] = {}
        for segment in np.unique(self.data.segments):
            mask = self.data.segments == segment
            rows = {"users": {"n": int(mask.sum())}}
            for name, choice in choices.items():
                picked = np.where(mask, choice, NONE)
                rows[name] = self.outcome(picked).to_dict()
            out[str(segment)] = rows
        return out

    @property
    def metric(self) -> str:
        """What the oracle share is a share of: the objective's outcome."""
        return "incremental_profit" if self.objective == "profit" else "incremental_purchases"


def add_noisy_truth(data: PolicyData, noise: Sequence[float] = (0.1, 0.25, 0.5), seed: int = 0) -> None:
    """Yardstick models: the true probabilities seen through independent logit noise of sd ``noise``.
    Their allocation rows show how accurate a model must be for a given share of the oracle."""
    rng = np.random.default_rng(seed + 7)

    def blur(p: np.ndarray, sd: float) -> np.ndarray:
        p = np.clip(p, 1e-6, 1 - 1e-6)
        return 1.0 / (1.0 + np.exp(-(np.log(p / (1 - p)) + rng.normal(0.0, sd, p.shape))))

    t = data.truth
    for sd in noise:
        data.models[f"truth_noise_{sd:g}"] = Predictions(blur(t.p_redeem, sd), blur(t.p_buy, sd), blur(t.p_control, sd))


def add_feature_ceiling(data: PolicyData, seed: int = 0, folds: int = 5) -> None:
    """Yardstick model ``feature_ceiling``: roughly what the served features can tell. Gradient-boosted
    regressions fitted to the *true* uplift and redemption probability (noise-free labels no real data
    has) on the features the served logistic sees (user aggregates and habit features, coupon terms,
    category share, coupon id), each user predicted by the folds that do not contain them.

    It is an estimate, not a bound: another learner, or more users, would do somewhat differently (fitting
    redemption on the logit scale instead did far worse; at tight budgets near-zero redemption estimates
    make the value-per-spend ratios unreliable). It shows how far the histories alone get when the labels
    are perfect: what stays missing is what they do not reveal about the latent response (within-type
    variation, short histories)."""
    from sklearn.ensemble import HistGradientBoostingRegressor
    from sklearn.model_selection import GroupKFold
    from runtime.blend import aggregate_features, category_log_prices, category_share, coupon_terms

    seq = data.sequences.arrays
    n, c = data.truth.p_buy.shape
    user = aggregate_features(seq, category_log_prices(seq, data.n_category_ids))  # [N, A]
    coupons = data.coupon_arrays
    x = np.concatenate([np.repeat(user, c, axis=0), np.tile(coupon_terms(coupons), (n, 1)),
                        category_share(seq, coupons["coupon_category_ids"]).reshape(-1, 1),
                        np.tile(np.arange(c), n)[:, None]], axis=1)  # [N x C, F]
    users = np.repeat(np.arange(n), c)
    targets = {"uplift": data.truth.uplift.ravel(), "p_redeem": data.truth.p_redeem.ravel()}
    fitted = {name: np.empty(n * c) for name in targets}
    for train_rows, test_rows in GroupKFold(folds).split(x, groups=users):
        for name, y in targets.items():
            model = HistGradientBoostingRegressor(max_iter=300, learning_rate=0.1, categorical_features=[x.shape[1] - 1],
                                                  random_state=seed)
            fitted[name][test_rows] = model.fit(x[train_rows], y[train_rows]).predict(x[test_rows])
    control = data.truth.p_control
    data.models["feature_ceiling"] = Predictions(np.clip(fitted["p_redeem"], 0.0, 1.0).reshape(n, c),
                                                 control[:, None] + fitted["uplift"].reshape(n, c), control)


def uplift_table(data: PolicyData, k: float = 0.3) -> dict[str, dict[str, float]]:
    """Qini / AUUC / uplift@k on the held-out issuance rows, ranking users by each model's expected
    uplift of a random coupon (the experiment gave a uniformly random coupon or none)."""
    ex = data.experiment
    out = {}
    if len(ex.get("user", [])) == 0 or ex["treated"].min() == ex["treated"].max():
        log.warning("no held-out experiment rows with both arms: skipping uplift metrics")
        return out
    candidates = dict(data.models)
    candidates["truth"] = data.truth
    for name, p in candidates.items():
        score = p.uplift.mean(axis=1)[ex["user"]]
        out[name] = um.uplift_report(ex["purchased"], score, ex["treated"], k)
    return out


def evaluate_policies(data: PolicyData, budgets: Sequence[float] = DEFAULT_BUDGETS, margin: float = DEFAULT_MARGIN,
                      objective: str = "profit", seed: int = 0, curve_points: int = 24,
                      headline_share: float = HEADLINE_BUDGET) -> dict[str, Any]:
    ev = Evaluator(data, margin, objective, seed)
    full = ev.full_budget()
    result: dict[str, Any] = {"margin": margin, "objective": objective, "metric": ev.metric, "full_budget": full,
                              "n_users": int(len(data.user_ids)), "n_coupons": len(data.coupon_ids),
                              "order_value": data.order_value_config, "budgets": {}}
    for share in budgets:
        result["budgets"][f"{share:g}"] = {"share": share, "budget": share * full, "policies": ev.policies(share * full)}
    curve_shares = np.linspace(0.0, max(1.0, max(budgets)), curve_points + 1)[1:]
    curves: dict[str, list] = {}
    for share in curve_shares:
        for name, row in ev.policies(share * full).items():
            curves.setdefault(name, []).append((row["spend"], row["incremental_profit"]))
    result["curves"] = {name: [[0.0, 0.0]] + [list(p) for p in pts] for name, pts in curves.items()}
    result["uplift_metrics"] = uplift_table(data)
    result["segments"] = {"share": headline_share, "rows": ev.segment_breakdown(headline_share * full)}
    return result


def headline(result: Mapping[str, Any], share: float = HEADLINE_BUDGET) -> dict[str, float]:
    rows = result["budgets"][f"{share:g}"]["policies"]
    metric = result.get("metric", "incremental_profit")
    ours, sim = rows["allocation"][metric], rows["similarity"][metric]
    return {"budget_share": share, "metric": metric, "oracle_share": rows["allocation"]["oracle_share"],
            "ours": ours, "similarity": sim, "oracle": rows["oracle"][metric],
            "vs_similarity": ours / sim if sim > 0 else None,  # a ratio to a loss means nothing
            "meets_oracle_target": bool(rows["allocation"]["oracle_share"] >= TARGET_ORACLE_SHARE),
            "meets_similarity_target": bool(ours >= TARGET_VS_SIMILARITY * sim if sim > 0 else ours > 0)}


# ---------------------------------------------------------------------------------------- reporting

POLICY_LABELS = {
    "transformer": "ours (served model)",
    "network_only": "ours, network alone",
    "random": "random coupon",
    "similarity": "similarity (category match)",
    "p_redeem": "highest p_redeem",
    "uplift": "highest uplift",
    "allocation": "budgeted allocation (ours)",
    "allocation_planned": "  ours, lambda planned, unpaced",
    "allocation_network_only": "  ours, network alone (no blend)",
    "allocation_t_learner_gbm": "T-learner GBM allocation",
    "allocation_logistic": "logistic allocation",
    "feature_ceiling": "features fitted to truth",
    "allocation_feature_ceiling": "features fitted to truth (yardstick)",
    "oracle": "oracle (true probabilities)",
}


def _label(name: str) -> str:
    if name.startswith("allocation_truth_noise_"):
        return f"truth + logit noise {name.rsplit('_', 1)[1]} (yardstick)"
    if name.startswith("truth_noise_"):
        return f"truth + logit noise {name.rsplit('_', 1)[1]}"
    return POLICY_LABELS.get(name, name)


def format_tables(result: Mapping[str, Any], share: float = HEADLINE_BUDGET) -> str:
    lines = []
    if result.get("uplift_metrics"):
        lines.append("Uplift on held-out issuance rows (observed outcomes; users ranked by mean predicted uplift)")
        lines.append(f"{'model':<26}{'Qini':>8}{'AUUC':>8}{'uplift@30%':>12}{'rows':>7}")
        for name, m in result["uplift_metrics"].items():
            lines.append(f"{_label(name):<26}{m['qini']:>8.4f}{m['auuc']:>8.4f}{m['uplift@0.3']:>12.4f}{m['n']:>7d}")
        lines.append("")
    block = result["budgets"][f"{share:g}"]
    lines.append(f"Policies at a budget of {share:.0%} of everyone's best coupon ({block['budget']:.1f} of "
                 f"{result['full_budget']:.1f}), exact expected values under the ground truth, "
                 f"{result['n_users']} held-out users, objective {result['objective']}, margin {result['margin']:.2f}")
    lines.append(f"{'policy':<40}{'spend':>9}{'coupons':>9}{'incr. buys':>12}{'incr. profit':>14}{'of oracle':>11}")
    for name, row in block["policies"].items():
        lines.append(f"{_label(name):<40}{row['spend']:>9.1f}{row['coupons_given']:>9d}"
                     f"{row['incremental_purchases']:>12.1f}{row['incremental_profit']:>14.1f}{row['oracle_share']:>11.1%}")
    lines.append("")
    shares = list(result["budgets"])
    lines.append(f"Share of the oracle's {result.get('metric', 'incremental_profit').replace('_', ' ')}, by budget "
                 "(share of everyone's best coupon)")
    lines.append(f"{'policy':<40}" + "".join(f"{float(s):>8.0%}" for s in shares))
    for name in block["policies"]:
        lines.append(f"{_label(name):<40}" + "".join(
            f"{result['budgets'][s]['policies'][name]['oracle_share']:>8.1%}" for s in shares))
    segments = result.get("segments") or {}
    if segments.get("rows"):
        names = [n for n in next(iter(segments["rows"].values())) if n != "users"]
        lines.append("")
        lines.append(f"Where the coupons go at {segments['share']:.0%}, by the simulator's latent response type: "
                     "coupons given / true incremental profit")
        short = {"allocation": "ours", "allocation_network_only": "network alone",
                 "allocation_t_learner_gbm": "T-learner GBM", "allocation_logistic": "logistic", "oracle": "oracle"}
        lines.append(f"{'response type':<16}{'users':>7}" + "".join(f"{short.get(n, n):>18}" for n in names))
        for segment, row in segments["rows"].items():
            lines.append(f"{segment:<16}{row['users']['n']:>7d}" + "".join(
                f"{row[n]['coupons_given']:>9d} /{row[n]['incremental_profit']:>7.1f}" for n in names))
    if f"{share:g}" in result["budgets"]:
        h = headline(result, share)
        lines.append("")
        what = h["metric"].replace("_", " ")
        versus = (f"{h['vs_similarity']:.2f}x the similarity policy's" if h["vs_similarity"] is not None else
                  f"{h['ours']:.1f} where the similarity policy gets {h['similarity']:.1f}")
        lines.append(f"At {share:.0%}: our allocation captures {h['oracle_share']:.1%} of the oracle's {what} "
                     f"(target >= {TARGET_ORACLE_SHARE:.0%}: {'met' if h['meets_oracle_target'] else 'MISSED'}) and "
                     f"{versus} (target >= {TARGET_VS_SIMILARITY:.1f}x: {'met' if h['meets_similarity_target'] else 'MISSED'}).")
    return "\n".join(lines)


def plot(result: Mapping[str, Any], path: str | Path) -> Path | None:
    """Incremental profit against spend for every policy (PNG). Needs matplotlib (the ``eval`` extra)."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log.warning("matplotlib is not installed: no plot (pip install 'edgecoupon[eval]')")
        return None
    fig, ax = plt.subplots(figsize=(8.5, 5.5), dpi=110)
    styles = {"oracle": dict(color="black", lw=2.2, ls="--"), "allocation": dict(color="tab:red", lw=2.6),
              "random": dict(color="tab:gray", lw=1.2), "similarity": dict(color="tab:orange", lw=1.4),
              "p_redeem": dict(color="tab:green", lw=1.2), "uplift": dict(color="tab:blue", lw=1.2),
              "allocation_t_learner_gbm": dict(color="tab:purple", lw=1.4, ls="-."),
              "allocation_logistic": dict(color="tab:brown", lw=1.4, ls="-.")}
    for name, pts in result["curves"].items():
        if name == "allocation_planned" or "noise" in name:
            continue
        a = np.asarray(pts)
        ax.plot(a[:, 0], a[:, 1], marker=".", label=_label(name).strip(), **styles.get(name, dict(lw=1.3)))
    headline_budget = result["budgets"].get(f"{HEADLINE_BUDGET:g}", {}).get("budget")
    if headline_budget:
        ax.axvline(headline_budget, color="grey", lw=0.8, ls=":")
        ax.text(headline_budget, ax.get_ylim()[1], f" {HEADLINE_BUDGET:.0%} budget", va="top", fontsize=8, color="grey")
    ax.axhline(0, color="grey", lw=0.6)
    ax.set_xlabel("expected coupon spend (true)")
    ax.set_ylabel("expected incremental profit (true)")
    ax.set_title(f"Incremental profit against spend, {result['n_users']} held-out users (margin {result['margin']:.2f})")
    ax.legend(fontsize=8, loc="best")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path)
    plt.close(fig)
    return path


def write_policy(data: PolicyData, result: Mapping[str, Any], path: str | Path, share: float = HEADLINE_BUDGET,
                 margin: float = DEFAULT_MARGIN, objective: str = "profit", caps: np.ndarray | None = None) -> Path:
    """The Transformer's budgeted allocation at ``share`` as a policy file: multipliers solved on the
    model's own estimates (an edge node never sees the truth)."""
    ev = Evaluator(data, margin, objective)
    values, spend = ev.model_values("transformer")
    # the budget in the model's own expected-spend terms: the pacing controller corrects miscalibration live
    planned_budget = share * result["full_budget"]
    _, lam, stats = solve(values, spend, planned_budget, caps)
    policy = make_policy(lam, data.coupon_ids, stats.multipliers, objective=objective, margin=margin, caps=caps,
                         order_value=data.order_value_config, budget=planned_budget, model_version=data.model_version,
                         stats={"users": int(len(data.user_ids)), "planned_spend": stats.spend,
                                "planned_value": stats.value, "dual_gap": stats.gap, "budget_share": share})
    return save_policy(policy, path)


# --------------------------------------------------------------------------------------------- CLI

def get_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m training.policy_eval", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--artifacts", type=Path, default=Path("artifacts"), help="folder with data/, run/, model/")
    parser.add_argument("--data", type=Path, help="data folder (default ARTIFACTS/data)")
    parser.add_argument("--checkpoint", type=Path, help="checkpoint (default ARTIFACTS/run/checkpoint.pt)")
    parser.add_argument("--model", type=Path, help="exported model folder for the int8 runtime (default "
                        "ARTIFACTS/model when it exists; else the checkpoint's torch model)")
    parser.add_argument("--out", type=Path, help="output folder (default ARTIFACTS/policy)")
    parser.add_argument("--budgets", default=",".join(f"{b:g}" for b in DEFAULT_BUDGETS),
                        help="budgets as shares of everyone's best coupon")
    parser.add_argument("--headline", type=float, default=HEADLINE_BUDGET, help="budget share for the main table and policy.json")
    parser.add_argument("--margin", type=float, default=DEFAULT_MARGIN, help="gross margin on incremental order value")
    parser.add_argument("--objective", choices=("profit", "purchases"), default="profit")
    parser.add_argument("--no-baselines", action="store_true", help="skip the T-learner GBM and logistic baselines")
    parser.add_argument("--sensitivity", action="store_true",
                        help="add yardstick rows: the allocation fed the true probabilities with logit noise 0.1/0.25/0.5")
    parser.add_argument("--ceiling", action="store_true",
                        help="add a yardstick row: gradient boosting fitted to the true uplift and redemption on the "
                             "served features (cross-fitted over held-out users): what the features can tell at best")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--check", action="store_true", help="exit 1 when the headline targets are missed")
    parser.add_argument("--log-level", default="INFO")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = get_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    data_dir = args.data or args.artifacts / "data"
    checkpoint = args.checkpoint or args.artifacts / "run" / "checkpoint.pt"
    model_dir = args.model or (args.artifacts / "model" if (args.artifacts / "model" / "manifest.json").exists() else None)
    out = args.out or args.artifacts / "policy"
    try:
        budgets = sorted({float(b) for b in args.budgets.split(",") if b.strip()} | {args.headline})
    except ValueError:
        print(f"error: --budgets must be comma-separated numbers, got {args.budgets!r}", file=sys.stderr)
        return 2
    if model_dir is None and not checkpoint.exists():
        print(f"error: neither {args.artifacts / 'model'} nor {checkpoint} exists (run `make demo` first)", file=sys.stderr)
        return 2
    try:
        data = load_policy_data(data_dir, checkpoint, model_dir, baselines=not args.no_baselines, seed=args.seed)
    except (FileNotFoundError, data_io.DataError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if args.sensitivity:
        add_noisy_truth(data, seed=args.seed)
    if args.ceiling:
        add_feature_ceiling(data, seed=args.seed)
    result = evaluate_policies(data, budgets, args.margin, args.objective, args.seed, headline_share=args.headline)
    result["headline"] = headline(result, args.headline)
    result["source"] = {"data": str(data_dir), "checkpoint": str(checkpoint), "model": str(model_dir) if model_dir else None}
    out.mkdir(parents=True, exist_ok=True)
    (out / "policy_eval.json").write_text(json.dumps(result, indent=2, default=float) + "\n")
    png = plot(result, out / "profit_vs_spend.png")
    policy_path = write_policy(data, result, out / "policy.json", args.headline, args.margin, args.objective)
    print(format_tables(result, args.headline))
    print(f"\nwrote {out / 'policy_eval.json'}, {policy_path}" + (f", {png}" if png else ""))
    if args.check and not (result["headline"]["meets_oracle_target"] and result["headline"]["meets_similarity_target"]):
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
