"""Two more model families served beside the network: logistic regressions and gradient-boosted trees
on aggregate features.

The budgeted allocation is sensitive to errors that AUC does not show. On the default data, at a 30%
budget, the network's heads alone captured 13.2% of the oracle's incremental profit, the logistic
regressions 41.2%, the T-learner's trees 31.3%, and the average of all three families' probabilities
50.9%: the families make different errors (README, "Which coupon, for whom"). So the exported model
carries the logistic's coefficients and the trees (``blend.json``, plain JSON) and the scorer averages
the three families' probabilities with the weights given there (:class:`Blend`).

The features are computed here, from the featurizer's arrays, so that training (which fits the
regressions, ``training.evaluate.AggregateLogistic``, and the trees, ``training.uplift_baselines.TLearnerGBM``)
and serving compute them the same way:

* per user (:func:`aggregate_features`, ``[B, 8]``): log counts of views, carts and purchases, mean log
  price, age of the latest event, purchases per cart, log number of distinct categories, empty flag;
  plus, with a table of each category's mean log price (fitted on the training rows and stored in the
  blend file), six habit features (:func:`habit_features`): carts per view, the share and number of
  repeat purchases, prices relative to the category's (all events; carts and purchases), and the share
  of purchases made without carting the item first. These trace the simulator's latent funnel,
  loyalty and price sensitivity, which the counts alone blur: with them the logistic's allocation went
  from 31.8% to 41.2% of the oracle's profit;
* per user x coupon: for the logistic (:func:`pair_features`) the user's features, the coupon's numeric
  terms and kind (one-hot), the share of the user's events in the coupon's category (1 for
  all-category coupons), and the user's features times that share; for the trees the user's features,
  the coupon's terms and that share.

A logistic head is ``sigmoid(((x - mean) / scale) . coef + intercept)``: scikit-learn's StandardScaler +
LogisticRegression, with the coefficients copied out. The trees are scikit-learn's
HistGradientBoostingClassifier's, evaluated by :class:`TreeEnsemble`.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache
from typing import Any, Mapping, Sequence

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


class TreeEnsemble:
    """Gradient-boosted trees (scikit-learn's ``HistGradientBoostingClassifier``, copied out as plain
    arrays) evaluated in numpy, several heads at once.

    Walking each tree node by node would take numpy calls per tree level; instead every split of every
    tree is evaluated in one comparison, and each tree's exit leaf found with bit masks (QuickScorer,
    Lucchese et al., SIGIR 2015): leaves are numbered left to right, every split that sends a row right
    removes the leaves of its left subtree from the tree's mask, and the exit leaf is the lowest bit
    left. The features come in groups (user | coupon | user x coupon): a split on a user feature is
    evaluated once per user, not once per user x coupon, and the groups' masks are ANDed at the end.

    ``heads``: name -> ``{"baseline": raw score, "trees": [tree, ...]}``; a tree is parallel lists
    ``feature``, ``threshold``, ``left``, ``right``, ``value`` over its nodes (node 0 the root), a row
    going left when ``x[feature] <= threshold``; a leaf has ``left = right = -1``. Features must be
    finite (no missing-value routing). ``groups``: the width of each feature group, in column order.
    """

    MAX_LEAVES = 64  # leaves per tree: at most one uint64 mask

    def __init__(self, heads: Mapping[str, Mapping[str, Any]], groups: Sequence[int]):
        if not isinstance(heads, Mapping) or not heads:
            raise BlendError("tree heads must be a non-empty mapping")
        self.names = list(heads)
        self.group_widths = [int(g) for g in groups]
        n_features = sum(self.group_widths)
        self._source = {name: heads[name] for name in self.names}
        compiled, leaf_values, tree_head, baselines = [], [], [], []
        for h, name in enumerate(self.names):
            head = heads[name]
            try:
                baselines.append(float(head["baseline"]))
                trees = list(head["trees"])
            except (KeyError, TypeError, ValueError) as exc:
                raise BlendError(f"tree head {name!r}: {exc!r}") from None
            if not math.isfinite(baselines[-1]) or not trees:
                raise BlendError(f"tree head {name!r}: needs a finite baseline and at least one tree")
            for i, tree in enumerate(trees):
                splits, values = _compile_tree(tree, n_features, f"tree head {name!r}, tree {i}", self.MAX_LEAVES)
                compiled.append(splits)
                leaf_values.append(values)
                tree_head.append(h)
        most = max(len(v) for v in leaf_values)
        self._dtype = next(d for d in (np.uint16, np.uint32, np.uint64) if np.iinfo(d).bits >= most)
        bits = np.iinfo(self._dtype).bits
        full = (1 << bits) - 1
        self._all = self._dtype(full)
        self._compiled_groups = []  # per group: ("lookup" | "reduce", its arrays)
        lo = 0
        for width in self.group_widths:
            mine = [[(f - lo, t, m & full) for f, t, m in splits if lo <= f < lo + width] for splits in compiled]
            self._compiled_groups.append(_lookup_group(mine, full, self._dtype) if width == 1 else
                                _reduce_group(mine, full, self._dtype))
            lo += width
        self._leaf_values = np.array([v + [0.0] * (bits - len(v)) for v in leaf_values]).ravel()  # [K x bits]
        self._leaf_offset = np.arange(len(compiled), dtype=np.int64) * bits  # [K]
        self._per_head = np.eye(len(self.names))[tree_head]  # [K, heads]
        self._baseline = np.array(baselines)  # [heads]
        # index of the lowest set bit of every 16-bit mask: one lookup instead of isolating it and a log2
        self._lowest = _LOWEST_BIT_16 if self._dtype == np.uint16 else None

    @property
    def n_trees(self) -> int:
        return len(self._leaf_offset)

    def group_mask(self, group: int, part: np.ndarray) -> np.ndarray:
        """``[..., K]`` the leaves each tree keeps after the splits on feature group ``group``, for rows
        ``part [..., width]``: what :meth:`scores` combines (by AND) across groups."""
        kind, tables = self._compiled_groups[group]
        if kind == "lookup":  # one feature: the mask is a function of where the value falls among the thresholds
            thresholds, table = tables
            return table[np.searchsorted(thresholds, part[..., 0], side="left")]
        features, thresholds, masks, starts = tables
        keep = np.where(part[..., features] <= thresholds, self._all, masks)  # [..., splits]
        return np.bitwise_and.reduceat(keep, starts, axis=-1)

    def scores(self, alive: np.ndarray) -> np.ndarray:
        """Raw scores (log-odds) ``[..., heads]`` from the AND of every group's :meth:`group_mask`."""
        if self._lowest is not None:
            leaf = self._lowest[alive]
        else:
            lowest = alive & (~alive + self._dtype(1))  # the lowest set bit: each tree's exit leaf
            leaf = np.log2(lowest.astype(np.float64)).astype(np.int64)  # exact for powers of two
        return self._leaf_values[leaf + self._leaf_offset] @ self._per_head + self._baseline

    def raw(self, *parts: np.ndarray) -> np.ndarray:
        """Raw scores ``[..., heads]``: one array per feature group, ``[..., width]``, whose leading axes
        broadcast together (e.g. users ``[B, 1, U]``, coupons ``[1, C, K]``, pairs ``[B, C, P]``)."""
        alive = self.group_mask(0, parts[0])
        for g in range(1, len(parts)):
            alive = alive & self.group_mask(g, parts[g])
        return self.scores(alive)

    def to_dict(self) -> dict[str, Any]:
        return {name: dict(head) for name, head in self._source.items()}


def _reduce_group(splits_per_tree: list[list[tuple[int, float, int]]], full: int, dtype) -> tuple[str, tuple]:
    """A feature group's splits, tree by tree, each tree led by a split every row passes (so that every
    tree owns a segment for ``reduceat``)."""
    features, thresholds, masks, starts = [], [], [], []
    for splits in splits_per_tree:
        starts.append(len(features))
        features.append(0)
        thresholds.append(math.inf)
        masks.append(full)
        for feature, threshold, mask in splits:
            features.append(feature)
            thresholds.append(threshold)
            masks.append(mask)
    return "reduce", (np.array(features, dtype=np.int64), np.array(thresholds), np.array(masks, dtype=dtype),
                      np.array(starts, dtype=np.int64))


def _lookup_group(splits_per_tree: list[list[tuple[int, float, int]]], full: int, dtype) -> tuple[str, tuple]:
    """A one-feature group as a table: with the distinct thresholds sorted, a value above the first
    ``j`` of them (``searchsorted``) keeps, in each tree, the AND of the masks of those splits."""
    thresholds = np.unique([t for splits in splits_per_tree for _, t, _ in splits])
    table = np.full((len(thresholds) + 1, len(splits_per_tree)), full, dtype=dtype)  # [J + 1, K]
    for k, splits in enumerate(splits_per_tree):
        for _, threshold, mask in splits:
            table[np.searchsorted(thresholds, threshold) + 1:, k] &= dtype(mask)
    return "lookup", (thresholds, table)


def _lowest_bits_16() -> np.ndarray:
    values = np.arange(1 << 16, dtype=np.uint32)
    lowest = values & (~values + 1) & 0xFFFF
    return np.where(values > 0, np.log2(np.maximum(lowest, 1)).astype(np.int64), 0).astype(np.int8)  # 64 KB: small enough to stay in cache


_LOWEST_BIT_16 = _lowest_bits_16()


def _compile_tree(tree: Mapping[str, Any], n_features: int, where: str, max_leaves: int):
    """One tree's splits as ``(feature, threshold, mask of the leaves kept when the row goes right)``
    and its leaf values, leaves numbered left to right. A single-leaf tree gets one split that every
    row passes (threshold +inf), so each tree owns at least one split."""
    try:
        feature, threshold, left, right, value = (list(tree[k]) for k in ("feature", "threshold", "left", "right", "value"))
    except (KeyError, TypeError) as exc:
        raise BlendError(f"{where}: {exc!r}") from None
    n = len(feature)
    if not n or not all(len(a) == n for a in (threshold, left, right, value)):
        raise BlendError(f"{where}: feature, threshold, left, right and value must be equally long, non-empty lists")
    leaves: list[float] = []
    splits: list[tuple[int, float, int]] = []
    seen = set()

    def walk(node: int) -> tuple[int, int]:  # -> (first leaf, leaf count) of the subtree
        if not (isinstance(node, int) and 0 <= node < n) or node in seen:
            raise BlendError(f"{where}: node {node!r} is out of range or reached twice")
        seen.add(node)
        if left[node] == -1 and right[node] == -1:
            v = float(value[node])
            if not math.isfinite(v):
                raise BlendError(f"{where}: leaf value {value[node]!r} is not finite")
            leaves.append(v)
            return len(leaves) - 1, 1
        f, t = feature[node], float(threshold[node])
        if not (isinstance(f, int) and 0 <= f < n_features) or math.isnan(t):
            raise BlendError(f"{where}: split {node} on feature {f!r} at {threshold[node]!r}")
        index = len(splits)
        splits.append((f, t, 0))
        first, n_left = walk(left[node])
        _, n_right = walk(right[node])
        if first + n_left + n_right > max_leaves:
            raise BlendError(f"{where}: more than {max_leaves} leaves")
        left_leaves = ((1 << n_left) - 1) << first
        splits[index] = (f, t, ((1 << max_leaves) - 1) & ~left_leaves)
        return first, n_left + n_right

    walk(0)
    if not splits:
        splits.append((0, math.inf, (1 << max_leaves) - 1))
    return splits, leaves


@dataclass
class PreparedCoupons:
    """A catalog as the blend reads it, computed once per catalog load: its featurized arrays, the
    coupons' terms and the trees' masks for splits on coupon terms (which no user changes)."""

    arrays: Mapping[str, np.ndarray]  # runtime.features.coupon_features
    terms: np.ndarray  # [C, 4 + N_KINDS] coupon_terms
    tree_masks: np.ndarray | None  # [C, K] leaves the pair trees keep after their coupon-term splits

    def take(self, index: np.ndarray) -> "PreparedCoupons":
        """The same for a subset of the coupons (catalog positions ``index``)."""
        return PreparedCoupons({k: v[index] for k, v in self.arrays.items()}, self.terms[index],
                               None if self.tree_masks is None else self.tree_masks[index])


@dataclass
class Blend:
    """The second and third model families and their weights in the average with the network.

    Served probability = ``network_weight x network + tree_weight x trees + (1 - network_weight -
    tree_weight) x logistic``, head by head. ``trees`` (the T-learner's gradient-boosted trees, on the
    same user features, coupon terms and category share) are optional.
    """

    heads: dict[str, LinearHead]  # the logistic regressions
    network_weight: float = 0.5  # the network's share of each blended probability
    category_log_price: np.ndarray | None = None  # [n_category_ids] for the habit features; None: base features only
    trees: dict[str, TreeEnsemble] | None = None  # "pair": p_redeem and p_buy; "user": p_buy_control
    tree_weight: float = 0.0  # the trees' share; the logistic gets the rest

    @property
    def logistic_weight(self) -> float:
        return max(0.0, 1.0 - self.network_weight - self.tree_weight)

    def check_categories(self, n_category_ids: int) -> None:
        """Refuse a price table that does not match the feature spec's category vocabulary."""
        if self.category_log_price is not None and len(self.category_log_price) != n_category_ids:
            raise BlendError(f"category_log_price has {len(self.category_log_price)} entries, the feature spec "
                             f"{n_category_ids} category ids")

    def prepare(self, coupons: Mapping[str, np.ndarray] | PreparedCoupons) -> PreparedCoupons:
        """The catalog's per-coupon work, done once (``Scorer.set_catalog``) instead of per request."""
        if isinstance(coupons, PreparedCoupons):
            return coupons
        terms = coupon_terms(coupons)
        masks = None
        if self.trees is not None:
            masks = self.trees["pair"].group_mask(1, terms)
        return PreparedCoupons(coupons, terms, masks)

    def _inputs(self, seq: Mapping[str, np.ndarray], coupons) -> tuple[np.ndarray, np.ndarray, PreparedCoupons]:
        prepared = self.prepare(coupons)
        user = aggregate_features(seq, self.category_log_price)  # [B, A]
        share = category_share(seq, prepared.arrays["coupon_category_ids"])  # [B, C]
        return user, share, prepared

    def _logistic(self, user: np.ndarray, share: np.ndarray, prepared: PreparedCoupons) -> list[np.ndarray]:
        return [_sigmoid(self.heads["p_redeem"].pair_logits(user, prepared.terms, share)),
                _sigmoid(self.heads["p_buy"].pair_logits(user, prepared.terms, share)),
                self.heads["p_buy_control"].probability(user)]

    def _trees(self, user: np.ndarray, share: np.ndarray, prepared: PreparedCoupons) -> list[np.ndarray]:
        pair, single = self.trees["pair"], self.trees["user"]
        alive = pair.group_mask(0, user[:, None, :]) & prepared.tree_masks[None] & pair.group_mask(2, share[..., None])
        raw = pair.scores(alive)  # [B, C, 2]
        control = single.scores(single.group_mask(0, user))  # [B, 1]
        return [_sigmoid(raw[..., 0]), _sigmoid(raw[..., 1]), _sigmoid(control[:, 0])]

    def probabilities(self, seq: Mapping[str, np.ndarray], coupons) -> list[np.ndarray]:
        """The logistic's [p_redeem [B, C], p_buy [B, C], p_buy_control [B]] for a featurized batch."""
        return self._logistic(*self._inputs(seq, coupons))

    def tree_probabilities(self, seq: Mapping[str, np.ndarray], coupons) -> list[np.ndarray]:
        """The trees' [p_redeem [B, C], p_buy [B, C], p_buy_control [B]] (requires ``trees``)."""
        if self.trees is None:
            raise BlendError("this blend has no trees")
        return self._trees(*self._inputs(seq, coupons))

    def mix(self, network: list[np.ndarray], seq: Mapping[str, np.ndarray], coupons) -> list[np.ndarray]:
        """The weighted average of the families' probabilities (same order and shapes as ``OUTPUTS``; float64).
        ``coupons``: the catalog's featurized arrays, or better, :meth:`prepare`'s result for them."""
        user, share, prepared = self._inputs(seq, coupons)
        w_net, w_lin, w_tree = self.network_weight, self.logistic_weight, self.tree_weight
        # float64 out: rounding the average back to float32 would add a last-bit flip of its own, which the
        # cancellation in uplift x margin x order value - p_redeem x cost magnifies
        mixed = [w_net * net.astype(np.float64) + w_lin * lin
                 for net, lin in zip(network, self._logistic(user, share, prepared))]
        if self.trees is not None and w_tree > 0:
            mixed = [m + w_tree * tree for m, tree in zip(mixed, self._trees(user, share, prepared))]
        return mixed

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"format": BLEND_FORMAT, "network_weight": self.network_weight,
                               "tree_weight": self.tree_weight}
        if self.category_log_price is not None:
            out["category_log_price"] = self.category_log_price.tolist()
        out["heads"] = {name: head.to_dict() for name, head in self.heads.items()}
        if self.trees is not None:
            out["trees"] = {**self.trees["pair"].to_dict(), **self.trees["user"].to_dict()}
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "Blend":
        if not isinstance(data, Mapping) or data.get("format") not in (BLEND_FORMAT,) + LEGACY_FORMATS:
            raise BlendError(f"not a blend file of format {BLEND_FORMAT!r}")
        weight = _weight(data, "network_weight", None)
        tree_weight = _weight(data, "tree_weight", 0.0)
        if weight + tree_weight > 1.0 + 1e-9:
            raise BlendError(f"network_weight + tree_weight must be <= 1, got {weight} + {tree_weight}")
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
        n_terms = 4 + N_KINDS
        n_pair = n_user + n_terms + 1 + n_user
        linear = {name: LinearHead.from_dict(heads[name], n_user if name == "p_buy_control" else n_pair, name)
                  for name in HEADS}
        trees = None
        if data.get("trees") is not None:
            source = data["trees"]
            if not isinstance(source, Mapping) or set(source) != set(HEADS):
                raise BlendError(f"trees must have exactly the heads {list(HEADS)}")
            trees = {"pair": TreeEnsemble({h: source[h] for h in ("p_redeem", "p_buy")}, (n_user, n_terms, 1)),
                     "user": TreeEnsemble({"p_buy_control": source["p_buy_control"]}, (n_user,))}
        elif tree_weight > 0:
            raise BlendError("tree_weight > 0 but the blend has no trees")
        return cls(linear, weight, prices, trees, tree_weight)


def _weight(data: Mapping[str, Any], key: str, default: float | None) -> float:
    value = data.get(key, default)
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not 0.0 <= value <= 1.0:
        raise BlendError(f"{key} must be a number in [0, 1], got {value!r}")
    return float(value)
