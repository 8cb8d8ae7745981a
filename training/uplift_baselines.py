"""What practitioners use today for uplift: a two-model (T-learner) gradient-boosted model on aggregate
user features.

The T-learner fits one model on the treated rows (user aggregates x coupon terms -> p_buy, and the
same features -> p_redeem) and another on the control rows (user aggregates -> p_buy_control); the
uplift of coupon c is ``p_buy(u, c) - p_buy_control(u)``. The features are the ones the logistic
baseline in ``training.evaluate`` uses (``aggregate_features``: counts, prices, recency, conversion,
breadth, and the habit features; plus the coupon's kind/value/min_spend and the user's share of events
in the coupon's category), so the comparison with the Transformer is about the model, not about what
it may see. Its trees are also the served blend's third family (:meth:`TLearnerGBM.to_trees`).
"""
from __future__ import annotations

import logging
from typing import Mapping

import numpy as np
from sklearn.ensemble import HistGradientBoostingClassifier

from runtime import blend
from training.dataset import IssuanceArrays, SequenceArrays
from training.evaluate import aggregate_features, category_share

log = logging.getLogger(__name__)


def _gbm(seed: int) -> HistGradientBoostingClassifier:
    return HistGradientBoostingClassifier(learning_rate=0.05, max_iter=300, max_leaf_nodes=15, min_samples_leaf=40,
                                          l2_regularization=1.0, early_stopping=True, validation_fraction=0.15,
                                          n_iter_no_change=20, random_state=seed)


class TLearnerGBM:
    """Two gradient-boosted models: treated (per coupon terms) and control. Same API as AggregateLogistic."""

    def __init__(self, coupon_arrays: Mapping[str, np.ndarray], n_category_ids: int, seed: int = 0):
        self.coupon_terms = blend.coupon_terms(coupon_arrays).astype(np.float64)
        self.n_category_ids = n_category_ids  # the feature spec's; sizes the habit features' price table
        self.category_log_price: np.ndarray | None = None  # fitted on the training rows
        self.coupon_category = coupon_arrays["coupon_category_ids"]
        self.models = {"p_redeem": _gbm(seed), "p_buy": _gbm(seed + 1), "p_buy_control": _gbm(seed + 2)}

    def _pair_features(self, user_feats: np.ndarray, share: np.ndarray, coupon_index: np.ndarray) -> np.ndarray:
        return np.concatenate([user_feats, self.coupon_terms[coupon_index], share[:, None]], axis=1)

    def fit(self, data: IssuanceArrays) -> "TLearnerGBM":
        self.category_log_price = blend.category_log_prices(data.seq.arrays, self.n_category_ids)
        u = aggregate_features(data.seq, self.category_log_price)
        t = data.treated
        if t.all() or not t.any():
            raise ValueError("a T-learner needs both treated and control rows")
        rows = np.flatnonzero(t)
        share = category_share(data.seq, self.coupon_category)[rows, data.coupon_index[rows]]
        x_t = self._pair_features(u[rows], share, data.coupon_index[rows])
        self.models["p_redeem"].fit(x_t, data.redeemed[rows])
        self.models["p_buy"].fit(x_t, data.purchased[rows])
        self.models["p_buy_control"].fit(u[~t], data.purchased[~t])
        log.info("T-learner GBM fitted on %d treated and %d control rows (iterations: %s)", len(rows), int((~t).sum()),
                 {k: int(m.n_iter_) for k, m in self.models.items()})
        return self

    def predict_all(self, seq: SequenceArrays) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """``[N, C]`` p_redeem, p_buy and ``[N]`` p_buy_control for every user x every coupon."""
        u = aggregate_features(seq, self.category_log_price)
        share = category_share(seq, self.coupon_category)
        n, c = len(u), len(self.coupon_terms)
        x = np.concatenate([self._pair_features(u, share[:, j], np.full(n, j)) for j in range(c)])
        p_redeem = self.models["p_redeem"].predict_proba(x)[:, 1].reshape(c, n).T
        p_buy = self.models["p_buy"].predict_proba(x)[:, 1].reshape(c, n).T
        p_control = self.models["p_buy_control"].predict_proba(u)[:, 1]
        return p_redeem, p_buy, p_control

    def to_trees(self) -> dict[str, dict]:
        """The fitted trees as plain lists per head (``runtime.blend.TreeEnsemble``'s format): what a
        blend file serves. Read from scikit-learn's fitted predictors; the blend's tests check that
        the numpy evaluation reproduces ``predict_proba``."""
        return {name: _export_trees(model) for name, model in self.models.items()}


def _export_trees(model: HistGradientBoostingClassifier) -> dict:
    if model.n_trees_per_iteration_ != 1:
        raise ValueError("only binary classifiers can be exported")
    trees = []
    for (predictor,) in model._predictors:
        nodes = predictor.nodes
        leaf = nodes["is_leaf"].astype(bool)
        if nodes["is_categorical"].any():
            raise ValueError("categorical splits cannot be exported")
        trees.append({"feature": np.where(leaf, -1, nodes["feature_idx"].astype(np.int64)).tolist(),
                      "threshold": np.where(leaf, 0.0, nodes["num_threshold"]).tolist(),
                      "left": np.where(leaf, -1, nodes["left"].astype(np.int64)).tolist(),
                      "right": np.where(leaf, -1, nodes["right"].astype(np.int64)).tolist(),
                      "value": np.where(leaf, nodes["value"], 0.0).tolist()})
    return {"baseline": float(np.ravel(model._baseline_prediction)[0]), "trees": trees}
