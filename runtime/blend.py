"""A second model family served beside the network: logistic regressions on aggregate features.

The budgeted allocation is sensitive to errors that AUC does not show. On the default data, the
network's heads alone captured 13.2% of the oracle's incremental profit at a 30% budget, a logistic
regression on aggregate features 31.8%, and the average of the two models' probabilities 35.4%:
the two families make different errors (README, "Which coupon, for whom"). So the exported model
can carry the logistic's coefficients (``blend.json``, plain JSON) and the scorer
averages the two families' probabilities with the weight given there.

The features are computed here, from the featurizer's arrays, so that training (which fits the
regressions, ``training.evaluate.AggregateLogistic``) and serving compute them the same way:

* per user (:func:`aggregate_features`, ``[B, 8]``): log counts of views, carts and purchases, mean log
  price, age of the latest event, purchases per cart, log number of distinct categories, empty flag;
  plus, with a table of each category's mean log price (fitted on the training rows and stored in the
  blend file), six habit features (:func:`habit_features`): carts per view, the share and number of
  repeat purchases, prices relative to the category's (all events; carts and purchases), and the share
  of purchases made without carting the item first. These trace the simulator's latent funnel,
  loyalty and price sensitivity, which the counts alone blur: with them the logistic's allocation went
  from 31.8% to 41.2% of the oracle's profit (README, "Which coupon, for whom");
* per user x coupon (:func:`pair_features`): the user's features, the coupon's numeric terms and kind
  (one-hot), the share of the user's events in the coupon's category (1 for all-category coupons), and
  the user's features times that share.

Each head is ``sigmoid(((x - mean) / scale) . coef + intercept)``: scikit-learn's StandardScaler +
LogisticRegression, with the coefficients copied out.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache
from typing import Any, Mapping

import numpy as np

from runtime.features import EVENT_IDS, CATEGORY_ALL

BLEND_FORMAT = "edgecoupon-blend/2"  # /2 adds the habit features' category price table
LEGACY_FORMATS = ("edgecoupon-blend/1",)  # still read: the 8 base user features, no price table
BLEND_FILE = "blend.json"  # its name in a model directory (listed in the manifest's "blend" entry)
HEADS = ("p_redeem", "p_buy", "p_buy_control")
N_KINDS = 4  # one-hot width of the coupon kind ids (PAD + COUPON_KINDS)
N_BASE = 8  # user features without a price table
N_HABIT = 6  # user features the price table adds
MIN_PRICED_EVENTS = 5  # a category needs this many priced events for a mean of its own
VIEW, CART, PURCHASE = (EVENT_IDS[k] for k in ("view", "cart", "purchase"))  # the featurizer's event ids
_KINDS = np.array([VIEW, CART, PURCHASE])
PAIR_BLOCK = 2048  # rows per block of the habit features' event x event comparison


def _sigmoid(z: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-z))


class BlendError(ValueError):
    """A blend file that cannot be used (wrong format, missing head, shapes that do not fit)."""


def aggregate_features(seq: Mapping[str, np.ndarray], category_log_price: np.ndarray | None = None) -> np.ndarray:
    """Per-user aggregates of a featurized, left-padded batch: ``[B, 8]``, or ``[B, 14]`` with the
    habit features (:func:`habit_features`) when a category price table (:func:`category_log_prices`) is given.

    This runs on every scoring request, so it is written as few whole-array operations (each numpy call
    costs about a microsecond on a one-user batch)."""
    ev = seq["event_ids"]
    b, t = ev.shape
    kinds = ev[:, :, None] == _KINDS  # [B, T, 3] view, cart, purchase
    counts = kinds.sum(axis=1)  # [B, 3]
    n = counts.sum(axis=1)  # [B] real events
    # float64: float32 sums would round differently with more left padding, so a user's features would
    # depend on the batch they are scored in
    numeric = seq["seq_numeric"].astype(np.float64)  # [B, T, 2]
    log_price = numeric[..., 0]  # [B, T]; 0 for padding, the USER token and unknown prices
    # distinct categories per row (ids > 0), vectorized: sorted, count where a positive id starts
    ordered = np.sort(seq["category_ids"], axis=1)
    starts = ordered[:, 1:] != ordered[:, :-1]
    starts &= ordered[:, 1:] > 0
    n_cats = starts.sum(axis=1) + (ordered[:, 0] > 0)
    out = np.empty((b, N_BASE if category_log_price is None else N_BASE + N_HABIT))
    np.log1p(counts, out=out[:, :3])  # views, carts, purchases
    out[:, 3] = log_price.sum(axis=1) / np.maximum(n, 1)  # mean log price
    # age of the event just before the USER token (left padding); an empty history gets a fixed "long ago"
    out[:, 4] = np.where(n > 0, numeric[:, -2, 1], 2.0) if t >= 2 else 2.0
    out[:, 5] = counts[:, 2] / np.maximum(counts[:, 1], 1)  # purchases per cart
    out[:, 6] = np.log1p(n_cats)
    out[:, 7] = n == 0
    if category_log_price is not None:
        out[:, N_BASE:] = habit_features(seq, category_log_price, kinds, counts, log_price)
    return out


def category_log_prices(seq: Mapping[str, np.ndarray], n_categories: int) -> np.ndarray:
    """``[n_categories]`` mean log price (the featurizer's scale) of each category's priced events; a
    category with fewer than ``MIN_PRICED_EVENTS`` gets the mean over all of them."""
    ev, cats = seq["event_ids"], seq["category_ids"]
    log_price = seq["seq_numeric"][..., 0].astype(np.float64)
    priced = (ev >= VIEW) & (log_price > 0)
    if cats[priced].size and int(cats[priced].max()) >= n_categories:
        raise ValueError(f"category id {int(cats[priced].max())} is outside a table of {n_categories}")
    total = np.bincount(cats[priced], weights=log_price[priced], minlength=n_categories)
    count = np.bincount(cats[priced], minlength=n_categories)
    overall = total.sum() / max(int(count.sum()), 1)
    return np.where(count >= MIN_PRICED_EVENTS, total / np.maximum(count, 1), overall)


def habit_features(seq: Mapping[str, np.ndarray], category_log_price: np.ndarray, kinds: np.ndarray,
                   counts: np.ndarray, log_price: np.ndarray) -> np.ndarray:
    """``[B, 6]``: carts per view, repeat-purchase share and log count, mean price relative to the
    category's (all priced events; carts and purchases), share of purchases not carted before.
    ``kinds`` ``[B, T, 3]``, ``counts`` ``[B, 3]`` and ``log_price`` ``[B, T]`` come from :func:`aggregate_features`."""
    items = seq["item_ids"]
    b, t = items.shape
    earlier = _earlier(t)  # [T, T]: event j came before event i
    kinds_f = kinds.astype(np.float32)
    prior = np.empty((b, t, 3), dtype=np.float32)  # [B, T, 3] earlier events on the same item, per kind
    for lo in range(0, b, PAIR_BLOCK):  # [block, T, T] pairs: bounded memory for training-sized batches
        rows = slice(lo, lo + PAIR_BLOCK)
        same_before = (items[rows, :, None] == items[rows, None, :]) & earlier
        np.matmul(same_before.astype(np.float32), kinds_f[rows], out=prior[rows])
    buy = kinds[..., 2]
    n_repeat = (buy & (prior[..., 2] > 0)).sum(axis=1)  # bought an item bought before
    carted_first = (buy & (prior[..., 1] > 0)).sum(axis=1)  # bought an item carted before
    priced = log_price > 0
    relative = np.where(priced, log_price - category_log_price[seq["category_ids"]], 0.0)  # [B, T]
    intent = priced & (kinds[..., 1] | buy)
    views, carts, buys = counts[:, 0], counts[:, 1], counts[:, 2]
    per_buy = np.maximum(buys, 1)
    return np.stack([carts / np.maximum(views, 1), n_repeat / per_buy, np.log1p(n_repeat),
                     relative.sum(axis=1) / np.maximum(priced.sum(axis=1), 1),
                     (relative * intent).sum(axis=1) / np.maximum(intent.sum(axis=1), 1),
                     (buys - carted_first) / per_buy], axis=1)


@lru_cache(maxsize=8)
def _earlier(t: int) -> np.ndarray:
    return np.tri(t, t, -1, dtype=bool)


def category_share(seq: Mapping[str, np.ndarray], coupon_category_ids: np.ndarray) -> np.ndarray:
    """``[B, C]`` share of each user's events in each coupon's category (1 for all-category coupons)."""
    cats = seq["category_ids"]
    n = np.maximum((cats > 0).sum(axis=1), 1)[:, None]
    share = (cats[:, :, None] == coupon_category_ids[None, None, :]).sum(axis=1) / n
    return np.where(coupon_category_ids[None, :] == CATEGORY_ALL, 1.0, share)


def coupon_terms(coupons: Mapping[str, np.ndarray]) -> np.ndarray:
    """``[C, 4 + N_KINDS]``: the coupon tower's numeric terms and the kind, one-hot."""
    return np.concatenate([coupons["coupon_numeric"], np.eye(N_KINDS)[coupons["coupon_kind_ids"]]], axis=1)


def pair_features(user: np.ndarray, terms: np.ndarray, share: np.ndarray) -> np.ndarray:
    """``[..., F]`` rows for users ``[..., A]`` x coupon terms ``[..., K]`` with category share ``[...]``."""
    share = share[..., None]
    return np.concatenate([user, terms, share, user * share], axis=-1)


@dataclass
class LinearHead:
    mean: np.ndarray  # [F] StandardScaler mean
    scale: np.ndarray  # [F] StandardScaler scale
    coef: np.ndarray  # [F] LogisticRegression coefficients
    intercept: float

    def __post_init__(self) -> None:
        # the scaler folded into the coefficients: one dot product per row at serving time
        self.weights = self.coef / self.scale
        self.bias = float(self.intercept - self.mean @ self.weights)

    def probability(self, x: np.ndarray) -> np.ndarray:
        return _sigmoid(x @ self.weights + self.bias)

    def pair_logits(self, user: np.ndarray, terms: np.ndarray, share: np.ndarray) -> np.ndarray:
        """``[B, C]`` logits of ``pair_features(user, terms, share)`` without building that ``[B, C, F]`` array:
        the features are user | terms | share | user x share, so the logit splits into a user part, a
        coupon part, and the share times a user-dependent slope."""
        a, k = user.shape[1], terms.shape[1]
        w = self.weights
        user_part = user @ w[:a]  # [B]
        coupon_part = terms @ w[a:a + k]  # [C]
        slope = w[a + k] + user @ w[a + k + 1:]  # [B]
        return user_part[:, None] + coupon_part[None, :] + share * slope[:, None] + self.bias

    def to_dict(self) -> dict[str, Any]:
        return {"mean": self.mean.tolist(), "scale": self.scale.tolist(), "coef": self.coef.tolist(),
                "intercept": self.intercept}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], width: int, name: str) -> "LinearHead":
        try:
            mean, scale, coef = (np.asarray(data[k], dtype=np.float64) for k in ("mean", "scale", "coef"))
            intercept = float(data["intercept"])
        except (KeyError, TypeError, ValueError) as exc:
            raise BlendError(f"blend head {name!r}: {exc}") from None
        if not all(a.shape == (width,) for a in (mean, scale, coef)):
            raise BlendError(f"blend head {name!r}: expected {width} features")
        if not (np.isfinite(coef).all() and np.isfinite(mean).all() and (scale > 0).all() and math.isfinite(intercept)):
            raise BlendError(f"blend head {name!r}: non-finite coefficients or non-positive scale")
        return cls(mean, scale, coef, intercept)


@dataclass
class Blend:
    """The logistic heads and the weight of the network's probabilities in the average."""

    heads: dict[str, LinearHead]
    network_weight: float = 0.5  # the network's share of each blended probability; the rest is the logistic's
    category_log_price: np.ndarray | None = None  # [n_category_ids] for the habit features; None: base features only

    def check_categories(self, n_category_ids: int) -> None:
        """Refuse a price table that does not match the feature spec's category vocabulary."""
        if self.category_log_price is not None and len(self.category_log_price) != n_category_ids:
            raise BlendError(f"category_log_price has {len(self.category_log_price)} entries, the feature spec "
                             f"{n_category_ids} category ids")

    def probabilities(self, seq: Mapping[str, np.ndarray], coupons: Mapping[str, np.ndarray]) -> list[np.ndarray]:
        """The logistic's [p_redeem [B, C], p_buy [B, C], p_buy_control [B]] for a featurized batch."""
        user = aggregate_features(seq, self.category_log_price)  # [B, A]
        terms = coupon_terms(coupons)  # [C, K]
        share = category_share(seq, coupons["coupon_category_ids"])  # [B, C]
        return [_sigmoid(self.heads["p_redeem"].pair_logits(user, terms, share)),
                _sigmoid(self.heads["p_buy"].pair_logits(user, terms, share)),
                self.heads["p_buy_control"].probability(user)]

    def mix(self, network: list[np.ndarray], seq: Mapping[str, np.ndarray],
            coupons: Mapping[str, np.ndarray]) -> list[np.ndarray]:
        """Average the network's probabilities with the logistic's (same order and shapes as ``OUTPUTS``; float64)."""
        w = self.network_weight
        # float64 out: rounding the average back to float32 would add a last-bit flip of its own, which the
        # cancellation in uplift x margin x order value - p_redeem x cost magnifies
        return [w * net.astype(np.float64) + (1.0 - w) * lin for net, lin in zip(network, self.probabilities(seq, coupons))]

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"format": BLEND_FORMAT, "network_weight": self.network_weight}
        if self.category_log_price is not None:
            out["category_log_price"] = self.category_log_price.tolist()
        out["heads"] = {name: head.to_dict() for name, head in self.heads.items()}
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "Blend":
        if not isinstance(data, Mapping) or data.get("format") not in (BLEND_FORMAT,) + LEGACY_FORMATS:
            raise BlendError(f"not a blend file of format {BLEND_FORMAT!r}")
        weight = data.get("network_weight")
        if not isinstance(weight, (int, float)) or isinstance(weight, bool) or not 0.0 <= weight <= 1.0:
            raise BlendError(f"network_weight must be a number in [0, 1], got {weight!r}")
        heads = data.get("heads")
        if not isinstance(heads, Mapping) or set(heads) != set(HEADS):
            raise BlendError(f"heads must be exactly {list(HEADS)}")
        prices = None
        if data["format"] == BLEND_FORMAT:
            try:
                prices = np.asarray(data["category_log_price"], dtype=np.float64)
            except (KeyError, TypeError, ValueError) as exc:
                raise BlendError(f"category_log_price: {exc!r}") from None
            if prices.ndim != 1 or not len(prices) or not np.isfinite(prices).all():
                raise BlendError("category_log_price must be a non-empty list of finite numbers")
        n_user = N_BASE + (N_HABIT if prices is not None else 0)
        n_pair = n_user + 4 + N_KINDS + 1 + n_user
        return cls({name: LinearHead.from_dict(heads[name], n_user if name == "p_buy_control" else n_pair, name)
                    for name in HEADS}, float(weight), prices)
