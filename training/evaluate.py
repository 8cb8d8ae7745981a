"""Evaluation on held-out users: head AUC/log-loss, next-item HR@10/NDCG@10, simple baselines.

Baselines make the encoder's value visible: popularity (per-coupon base rates; most popular items) and
logistic regression on aggregate features of the same window of history the encoder sees.
"""
from __future__ import annotations

import logging
from typing import Mapping

import numpy as np
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import log_loss, roc_auc_score
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from runtime import blend
from training.dataset import IssuanceArrays, SequenceArrays

log = logging.getLogger(__name__)

HEADS = ("p_redeem", "p_buy", "p_buy_control")


def binary_metrics(y: np.ndarray, p: np.ndarray) -> dict[str, float]:
    y = np.asarray(y, dtype=np.float64)
    p = np.clip(np.asarray(p, dtype=np.float64), 1e-7, 1 - 1e-7)
    auc = float(roc_auc_score(y, p)) if 0 < y.sum() < len(y) else float("nan")
    return {"auc": auc, "logloss": float(log_loss(y, p, labels=[0, 1])), "n": int(len(y))}


def head_metrics(data: IssuanceArrays, p_redeem: np.ndarray, p_buy: np.ndarray, p_control: np.ndarray) -> dict:
    """Each head on the rows where its label is observed: p_redeem/p_buy on treated, control on control.

    ``p_redeem``/``p_buy`` are the probabilities for each row's issued coupon, ``[N]``.
    """
    t = data.treated
    return {
        "p_redeem": binary_metrics(data.redeemed[t], p_redeem[t]),
        "p_buy": binary_metrics(data.purchased[t], p_buy[t]),
        "p_buy_control": binary_metrics(data.purchased[~t], p_control[~t]),
    }


def ranking_metrics(scores: np.ndarray, targets: np.ndarray, k: int = 10) -> dict[str, float]:
    """HR@k and NDCG@k for full ranking: ``scores [N, V]`` over every candidate, ``targets [N]``."""
    target_scores = scores[np.arange(len(targets)), targets][:, None]
    # rank = how many candidates score strictly higher (ties count in the target's favour... and against:
    # we count ties as ahead, the pessimistic convention, so constant scores give no credit)
    ahead = (scores > target_scores).sum(axis=1) + (scores == target_scores).sum(axis=1) - 1
    hit = ahead < k
    ndcg = np.where(hit, 1.0 / np.log2(ahead + 2.0), 0.0)
    return {f"hr@{k}": float(hit.mean()), f"ndcg@{k}": float(ndcg.mean()), "n": int(len(targets))}


# --------------------------------------------------------------------------------------- baselines

def aggregate_features(seq: SequenceArrays, category_log_price: np.ndarray | None = None) -> np.ndarray:
    """Per-user aggregates of the featurized window, ``[N, 8]`` or with the habit features ``[N, 14]``
    (``runtime.blend``, which serves them)."""
    return blend.aggregate_features(seq.arrays, category_log_price)


def category_share(seq: SequenceArrays, coupon_category_ids: np.ndarray) -> np.ndarray:
    """``[N, C]`` share of each user's events in each coupon's category (1 for all-category coupons)."""
    return blend.category_share(seq.arrays, coupon_category_ids)


class AggregateLogistic:
    """Logistic regression on aggregate user features (x coupon terms for the coupon heads)."""

    def __init__(self, coupon_arrays: Mapping[str, np.ndarray], n_category_ids: int, seed: int = 0):
        self.coupon_terms = blend.coupon_terms(coupon_arrays)
        self.coupon_category = coupon_arrays["coupon_category_ids"]
        self.n_category_ids = n_category_ids  # the feature spec's; sizes the habit features' price table
        self.category_log_price: np.ndarray | None = None  # fitted on the training rows
        self.models = {h: make_pipeline(StandardScaler(), LogisticRegression(max_iter=1000, random_state=seed))
                       for h in HEADS}

    def _pair_features(self, seq: SequenceArrays, user_feats: np.ndarray, coupon_index: np.ndarray) -> np.ndarray:
        share = category_share(seq, self.coupon_category)[np.arange(len(coupon_index)), coupon_index]
        return blend.pair_features(user_feats, self.coupon_terms[coupon_index], share)

    def fit(self, data: IssuanceArrays) -> "AggregateLogistic":
        self.category_log_price = blend.category_log_prices(data.seq.arrays, self.n_category_ids)
        u = aggregate_features(data.seq, self.category_log_price)
        t = data.treated
        x_t = self._pair_features(_subset(data.seq, t), u[t], data.coupon_index[t])
        self.models["p_redeem"].fit(x_t, data.redeemed[t])
        self.models["p_buy"].fit(x_t, data.purchased[t])
        self.models["p_buy_control"].fit(u[~t], data.purchased[~t])
        return self

    def predict_rows(self, data: IssuanceArrays) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Per-row probabilities for the issued coupon (rows in the control arm use coupon 0; unused)."""
        u = aggregate_features(data.seq, self.category_log_price)
        idx = np.maximum(data.coupon_index, 0)
        x = self._pair_features(data.seq, u, idx)
        return (self.models["p_redeem"].predict_proba(x)[:, 1], self.models["p_buy"].predict_proba(x)[:, 1],
                self.models["p_buy_control"].predict_proba(u)[:, 1])

    def predict_all(self, seq: SequenceArrays) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """``[N, C]`` p_redeem, p_buy and ``[N]`` p_buy_control for every user x every coupon."""
        u = aggregate_features(seq, self.category_log_price)
        n, c = len(u), len(self.coupon_terms)
        p_redeem = np.zeros((n, c))
        p_buy = np.zeros((n, c))
        for j in range(c):
            x = self._pair_features(seq, u, np.full(n, j))
            p_redeem[:, j] = self.models["p_redeem"].predict_proba(x)[:, 1]
            p_buy[:, j] = self.models["p_buy"].predict_proba(x)[:, 1]
        return p_redeem, p_buy, self.models["p_buy_control"].predict_proba(u)[:, 1]


    def to_blend(self, network_weight: float = 0.5, gbm=None, tree_weight: float = 0.0) -> blend.Blend:
        """The fitted regressions as a :class:`runtime.blend.Blend` (what the model directory serves),
        with a fitted ``training.uplift_baselines.TLearnerGBM``'s trees at ``tree_weight`` when given
        (fitted on the same rows: the two share the blend's category price table)."""
        heads = {}
        for name, pipeline in self.models.items():
            scaler, logistic = pipeline[0], pipeline[-1]
            heads[name] = blend.LinearHead(scaler.mean_.astype(np.float64), scaler.scale_.astype(np.float64),
                                           logistic.coef_[0].astype(np.float64), float(logistic.intercept_[0]))
        if gbm is None:
            return blend.Blend(heads, network_weight, self.category_log_price)
        if not np.array_equal(gbm.category_log_price, self.category_log_price):
            raise ValueError("the trees were fitted with another category price table: fit both on the same rows")
        # through the blend file's own reader: the same validation and tree compilation as serving
        data = blend.Blend(heads, network_weight, self.category_log_price).to_dict()
        return blend.Blend.from_dict({**data, "trees": gbm.to_trees(), "tree_weight": tree_weight})


def popularity_rows(train: IssuanceArrays, data: IssuanceArrays, n_coupons: int):
    """Per-coupon base rates from training rows, applied to each evaluation row."""
    t = train.treated
    counts = np.bincount(train.coupon_index[t], minlength=n_coupons) + 2.0
    redeem = (np.bincount(train.coupon_index[t], weights=train.redeemed[t], minlength=n_coupons) + 1.0) / counts
    buy = (np.bincount(train.coupon_index[t], weights=train.purchased[t], minlength=n_coupons) + 1.0) / counts
    control = float(train.purchased[~t].mean())
    idx = np.maximum(data.coupon_index, 0)
    return redeem[idx], buy[idx], np.full(len(idx), control)


def _subset(seq: SequenceArrays, mask: np.ndarray) -> SequenceArrays:
    return SequenceArrays({k: v[mask] for k, v in seq.arrays.items()})


# ------------------------------------------------------------------------------- ground-truth checks

def truth_metrics(uplift_pred: np.ndarray, true_uplift: np.ndarray, rng: np.random.Generator) -> dict[str, float]:
    """Compare predicted ``[N, C]`` uplift with the simulator's true uplift on the same users x coupons.

    ``top1_true_uplift`` is the mean true uplift of the coupon each user would get by the prediction;
    ``random_true_uplift`` and ``oracle_true_uplift`` bracket it.
    """
    n = len(true_uplift)
    pick = uplift_pred.argmax(axis=1)
    rank_pred = uplift_pred.ravel().argsort().argsort()
    rank_true = true_uplift.ravel().argsort().argsort()
    return {
        "uplift_spearman": float(np.corrcoef(rank_pred, rank_true)[0, 1]),
        "top1_true_uplift": float(true_uplift[np.arange(n), pick].mean()),
        "random_true_uplift": float(true_uplift[np.arange(n), rng.integers(0, true_uplift.shape[1], n)].mean()),
        "oracle_true_uplift": float(true_uplift.max(axis=1).mean()),
    }


def format_table(metrics: Mapping) -> str:
    """The evaluation table printed by training and the demo."""
    lines = [f"{'model':<22}{'head':<15}{'AUC':>8}{'logloss':>10}"]
    for model_name, heads in metrics["heads"].items():
        for head in HEADS:
            m = heads[head]
            lines.append(f"{model_name:<22}{head:<15}{m['auc']:>8.4f}{m['logloss']:>10.4f}")
    lines.append("")
    lines.append(f"{'next-item (full ranking)':<37}{'HR@10':>8}{'NDCG@10':>10}")
    for model_name, m in metrics["next_item"].items():
        lines.append(f"{model_name:<37}{m['hr@10']:>8.4f}{m['ndcg@10']:>10.4f}")
    if metrics.get("truth"):
        lines.append("")
        lines.append(f"{'vs ground truth':<22}{'spearman':>10}{'top1 uplift':>13}{'random':>9}{'oracle':>9}")
        for model_name, m in metrics["truth"].items():
            lines.append(f"{model_name:<22}{m['uplift_spearman']:>10.4f}{m['top1_true_uplift']:>13.4f}"
                         f"{m['random_true_uplift']:>9.4f}{m['oracle_true_uplift']:>9.4f}")
    return "\n".join(lines)
