"""A seeded simulator of a shop: behaviour events, a coupon catalog, a randomized issuance log and the
ground truth behind it.

The truth is built so that a sequence model *can* learn it: every quantity it depends on leaves a
(noisy) trace in the user's behaviour history.

* **Category taste** is sparse (a few categories, popular ones more likely) and drifts over the
  history window from a preference vector A to B. Category-scoped coupons work through B, the taste at
  the end of the window, which the most recent events reveal.
* **Price sensitivity** decides which items a user picks inside a category (sensitive users pick
  cheaper ones). A user's typical basket is computed from the prices in their own history.
* **Repeat purchases**: habitual users re-buy a couple of staple items.
* **Response type** shapes the funnel: persuadables cart a lot and rarely buy, and are price
  sensitive; sure things buy often at full price; lost causes only browse; sleeping dogs are loyal
  repeat buyers whom a coupon puts off. Each type has continuous variation inside it.
* **Coupon terms** matter: the effect grows with the discount relative to the user's basket (more so
  for price-sensitive users), a scoped coupon only works if the user currently likes its category, and
  a min_spend above the user's typical basket lowers effect and redemption.

``ground_truth.csv`` holds, for every held-out user (``training.data.is_eval_user``) and coupon, the
probability of buying within the outcome window with and without that coupon, the probability of
redeeming it if issued (unconditional, so ``p_redeem <= p_buy_coupon``), the expected gross order
value, and the user's latent response type (for per-segment analysis only).

Run: ``python -m training.simulate --out DIR [--seed N] [--n-users N] ...``
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import pandas as pd

from training.data import is_eval_user

log = logging.getLogger(__name__)

DAY = 86400.0
RESPONSE_TYPES = ("persuadable", "sure_thing", "lost_cause", "sleeping_dog")
TYPE_SHARES = np.array([0.33, 0.22, 0.33, 0.12])

# Per response type (order of RESPONSE_TYPES). Logits are for buying within 7 days.
_BASE_LOGIT = np.array([-2.7, 0.2, -3.8, -0.2])  # no-coupon purchase logit, mean
_BASE_LOGIT_SD = np.array([0.45, 0.5, 0.4, 0.4])
_RESPONSE = np.array([1.75, 0.25, 0.4, -0.7])  # coupon effect on the logit at full strength, mean
_RESPONSE_SD = np.array([0.3, 0.12, 0.15, 0.2])
_PRICE_SENS_BETA = np.array([[6.0, 2.0], [2.0, 6.0], [2.0, 2.0], [2.0, 5.0]])  # Beta(a, b)
_CART_BETA = np.array([[7.0, 13.0], [4.0, 16.0], [1.5, 48.0], [3.0, 22.0]])  # view -> cart rate
_REPEAT_BETA = np.array([[1.0, 25.0], [1.0, 9.0], [1.0, 1.0], [6.0, 4.0]])  # staple re-buy share
_ACTIVITY = np.array([1.2, 1.3, 0.8, 0.55])  # relative number of events

MAX_SLOTS = 4  # categories per preference vector
EXPLORE = 0.1  # share of browsing outside one's taste (popularity-weighted)
UNKNOWN_PRICE_SHARE = 0.005  # view events logged without a price
BASKET_ITEMS = 1.3  # typical basket = this x median price of the user's carted/bought items
ORDER_SIGMA = 0.35  # lognormal spread of order values around their expectation
SHIPPING_COST = 5.0  # free_shipping coupons' value and cost


@dataclass
class SimConfig:
    seed: int = 0  # seeds everything: same seed, same files byte for byte
    n_users: int = 20000  # users (each gets one issuance row)
    n_categories: int = 300  # item categories (popularity is Zipf-skewed)
    n_items: int = 5000  # items (each has one category and a lognormal price); >= n_categories
    n_coupons: int = 30  # coupons in the catalog
    history_days: float = 60.0  # length of the behaviour history window
    mean_events_per_user: float = 30.0  # average events of users that have any
    cold_start_share: float = 0.03  # users with no events at all
    eval_fraction: float = 0.2  # held-out users (training.data.is_eval_user); ground truth is for them
    control_share: float = 0.2  # share of issuance rows in the no-coupon arm
    outcome_window_days: float = 7.0  # purchases count if within this many days of issuance
    dirty_fraction: float = 0.002  # injected dirty rows per file (duplicates, missing ids, bad ts/price, ...)
    start_ts: int = 1_700_000_000  # unix seconds at the start of the history window

    def __post_init__(self) -> None:
        checks = [
            (self.n_users >= 1, "n_users must be >= 1"),
            (self.n_categories >= 1, "n_categories must be >= 1"),
            (self.n_items >= self.n_categories, "n_items must be >= n_categories"),
            (self.n_coupons >= 1, "n_coupons must be >= 1"),
            (self.history_days > 0, "history_days must be > 0"),
            (self.mean_events_per_user > 0, "mean_events_per_user must be > 0"),
            (0 <= self.cold_start_share < 1, "cold_start_share must be in [0, 1)"),
            (0 <= self.eval_fraction <= 1, "eval_fraction must be in [0, 1]"),
            (0 <= self.control_share <= 1, "control_share must be in [0, 1]"),
            (self.outcome_window_days > 0, "outcome_window_days must be > 0"),
            (0 <= self.dirty_fraction < 0.5, "dirty_fraction must be in [0, 0.5)"),
            (self.start_ts >= 0, "start_ts must be >= 0"),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(f"SimConfig: {message}")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "SimConfig":
        unknown = set(data) - {f.name for f in dataclasses.fields(cls)}
        if unknown:
            raise ValueError(f"unknown SimConfig keys: {sorted(unknown)}")
        return cls(**dict(data))


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-x))


# ------------------------------------------------------------------------------------------ catalog

def _categories(cfg: SimConfig, rng: np.random.Generator):
    names = np.array([f"cat_{i:03d}" for i in range(cfg.n_categories)], dtype=object)
    popularity = 1.0 / (1.0 + np.arange(cfg.n_categories)) ** 0.9
    popularity = popularity[rng.permutation(cfg.n_categories)]  # popularity unrelated to the name
    return names, popularity / popularity.sum()


def _items(cfg: SimConfig, cat_pop: np.ndarray, rng: np.random.Generator):
    n_c = cfg.n_categories
    cat = np.r_[np.arange(n_c), rng.choice(n_c, size=cfg.n_items - n_c, p=cat_pop)]  # every category has items
    cat = cat[rng.permutation(cfg.n_items)]
    cat_log_mu = rng.normal(np.log(22.0), 0.5, size=n_c)
    price = np.round(np.exp(cat_log_mu[cat] + rng.normal(0.0, 0.45, size=cfg.n_items)), 2)
    price = np.maximum(price, 0.5)
    ids = np.array([f"item_{i:05d}" for i in range(cfg.n_items)], dtype=object)
    order = np.argsort(cat, kind="stable")  # items grouped by category for sampling
    counts = np.bincount(cat, minlength=n_c)
    starts = np.r_[0, np.cumsum(counts)[:-1]]
    return ids, cat, price, order, starts, counts


def _coupons(cfg: SimConfig, cat_names: np.ndarray, cat_pop: np.ndarray, typical_order: float,
             rng: np.random.Generator) -> pd.DataFrame:
    n = cfg.n_coupons
    pattern = np.array(["amount_off", "percent_off", "amount_off", "percent_off", "free_shipping"], dtype=object)
    kinds = np.resize(pattern, n)[rng.permutation(n)]
    value = np.where(kinds == "free_shipping", SHIPPING_COST,
                     rng.choice(np.array([5.0, 10.0, 15.0, 20.0, 25.0, 30.0]), size=n))
    min_spend = rng.choice(np.array([0.0, 0.0, 0.0, 20.0, 30.0, 50.0, 75.0, 100.0]), size=n)
    popular = np.argsort(-cat_pop, kind="stable")[:max(1, min(20, cfg.n_categories))]
    scoped = rng.random(n) < 0.5
    scope_cat = rng.choice(popular, size=n, p=cat_pop[popular] / cat_pop[popular].sum())
    category = np.where(scoped, cat_names[scope_cat], "*")
    # expected cost per redemption; percent_off: value% of the typical order (or of min_spend if larger)
    cost = np.where(kinds == "amount_off", value,
                    np.where(kinds == "percent_off", value / 100.0 * np.maximum(typical_order, min_spend),
                             SHIPPING_COST))
    width = len(str(n))
    return pd.DataFrame({
        "coupon_id": [f"cp{i + 1:0{max(2, width)}d}" for i in range(n)],
        "kind": kinds.astype(str),
        "value": value,
        "min_spend": min_spend,
        "category": category.astype(str),
        "cost": np.round(cost, 2),
    })


# -------------------------------------------------------------------------------------------- users

def _preferences(n_users: int, cat_pop: np.ndarray, rng: np.random.Generator):
    """Sparse taste: up to MAX_SLOTS categories (popularity-weighted, no repeats) with Dirichlet weights."""
    n_c = len(cat_pop)
    k = min(MAX_SLOTS, n_c)
    keys = np.log(cat_pop)[None, :] + rng.gumbel(size=(n_users, n_c))  # Gumbel top-k = weighted sampling
    cats = np.argpartition(-keys, k - 1, axis=1)[:, :k] if k < n_c else np.tile(np.arange(n_c), (n_users, 1))
    row_keys = np.take_along_axis(keys, cats, axis=1)
    cats = np.take_along_axis(cats, np.argsort(-row_keys, axis=1), axis=1)
    n_active = np.minimum(rng.choice(np.arange(1, MAX_SLOTS + 1), size=n_users, p=[0.25, 0.35, 0.25, 0.15]), k)
    active = np.arange(k)[None, :] < n_active[:, None]
    weights = rng.gamma(1.0, size=(n_users, k)) * active
    weights /= weights.sum(axis=1, keepdims=True)
    if k < MAX_SLOTS:
        cats = np.pad(cats, ((0, 0), (0, MAX_SLOTS - k)))
        weights = np.pad(weights, ((0, 0), (0, MAX_SLOTS - k)))
    return cats, weights


def _sample_slot(weights: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    cum = np.cumsum(weights, axis=1)
    r = rng.random(len(weights)) * cum[:, -1]
    return np.minimum((cum < r[:, None]).sum(axis=1), weights.shape[1] - 1)


def _pick_items(cats: np.ndarray, beta: np.ndarray, item_order, item_start, item_count, item_price,
                rng: np.random.Generator, n_candidates: int = 4) -> np.ndarray:
    """One item per row from category ``cats``: the best of a few random candidates by
    ``-beta * log(price) + Gumbel`` (price-sensitive users, beta > 0, pick cheaper items)."""
    n = len(cats)
    pos = item_start[cats][:, None] + (rng.random((n, n_candidates)) * item_count[cats][:, None]).astype(np.int64)
    cand = item_order[pos]
    utility = -beta[:, None] * np.log(item_price[cand]) + rng.gumbel(size=(n, n_candidates))
    return cand[np.arange(n), np.argmax(utility, axis=1)]


def _users(cfg: SimConfig, cat_pop: np.ndarray, rng: np.random.Generator) -> dict[str, np.ndarray]:
    n = cfg.n_users
    width = max(6, len(str(n)))
    rtype = rng.choice(len(RESPONSE_TYPES), size=n, p=TYPE_SHARES)
    u = {
        "user_id": np.array([f"u{i:0{width}d}" for i in range(n)], dtype=object),
        "type": rtype,
        "base_logit": rng.normal(_BASE_LOGIT[rtype], _BASE_LOGIT_SD[rtype]),
        "response": rng.normal(_RESPONSE[rtype], _RESPONSE_SD[rtype]),
        "price_sens": rng.beta(_PRICE_SENS_BETA[rtype, 0], _PRICE_SENS_BETA[rtype, 1]),
        "cart_rate": rng.beta(_CART_BETA[rtype, 0], _CART_BETA[rtype, 1]),
        "repeat": np.where(rtype == RESPONSE_TYPES.index("lost_cause"), 0.0,  # lost causes never buy
                           rng.beta(_REPEAT_BETA[rtype, 0], _REPEAT_BETA[rtype, 1])),
        "cold": rng.random(n) < cfg.cold_start_share,
        "drifts": rng.random(n) < 0.7,
    }
    # purchase given cart follows the (visible) base propensity to buy
    u["buy_rate"] = _sigmoid(u["base_logit"] + 1.5)
    a_cats, a_w = _preferences(n, cat_pop, rng)
    b_cats, b_w = _preferences(n, cat_pop, rng)
    keep_top = rng.random(n) < 0.5  # half the drifting users keep their old favourite as a new slot 0
    b_cats[:, 0] = np.where(keep_top, a_cats[:, 0], b_cats[:, 0])
    b_cats = _dedupe_slots(b_cats, b_w)
    no_drift = ~u["drifts"]
    b_cats[no_drift], b_w[no_drift] = a_cats[no_drift], a_w[no_drift]
    u.update(a_cats=a_cats, a_w=a_w, b_cats=b_cats, b_w=b_w)
    return u


def _dedupe_slots(cats: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """After overwriting slot 0, a later slot may repeat it: merge its weight into slot 0."""
    for j in range(1, cats.shape[1]):
        same = (cats[:, j] == cats[:, 0]) & (weights[:, j] > 0)
        weights[same, 0] += weights[same, j]
        weights[same, j] = 0.0
    return cats


# ------------------------------------------------------------------------------------------- events

def _events(cfg: SimConfig, users: dict, cat_names: np.ndarray, cat_pop: np.ndarray, items,
            rng: np.random.Generator) -> pd.DataFrame:
    item_ids, item_cat, item_price, item_order, item_start, item_count = items
    n = cfg.n_users
    window = cfg.history_days * DAY
    end_ts = cfg.start_ts + window
    beta = 4.0 * users["price_sens"] - 1.0
    rho, pc, pp = users["repeat"], users["cart_rate"], users["buy_rate"]

    # events per interaction: browse = view (+cart (+purchase)); staple re-buy = (view) + purchase
    per_interaction = (1 - rho) * (1 + pc * (1 + pp)) + rho * 1.5
    act = _ACTIVITY[users["type"]]
    target = cfg.mean_events_per_user * act / np.mean(act) * rng.lognormal(-0.32, 0.8, size=n)
    n_int = np.maximum(1, np.round(target / per_interaction)).astype(np.int64)
    n_int[users["cold"]] = 0

    # staples: two items from the current taste
    st_cat = np.stack([users["b_cats"][:, 0], users["b_cats"][np.arange(n), _sample_slot(users["b_w"], rng)]], axis=1)
    staples = np.stack([_pick_items(st_cat[:, j], beta, item_order, item_start, item_count, item_price, rng)
                        for j in range(2)], axis=1)

    user = np.repeat(np.arange(n), n_int)
    m = len(user)
    # sessions: interactions cluster in time
    n_sess = np.maximum(1, np.round(n_int / 4 * rng.uniform(0.5, 1.5, size=n))).astype(np.int64)
    sess_offset = np.r_[0, np.cumsum(n_sess)[:-1]]
    sess_time = rng.random(int(n_sess.sum())) * (window - 2 * 3600.0)
    sess = sess_offset[user] + (rng.random(m) * n_sess[user]).astype(np.int64)
    t = cfg.start_ts + sess_time[sess] + rng.random(m) * 1800.0
    f = (t - cfg.start_ts) / window

    # category: drifts from taste A to taste B over the window, with some exploration
    w_b = np.clip((f - 0.15) / 0.7, 0.0, 1.0)
    use_b = rng.random(m) < w_b
    w = np.where(use_b[:, None], users["b_w"][user], users["a_w"][user])
    c = np.where(use_b[:, None], users["b_cats"][user], users["a_cats"][user])
    cat = c[np.arange(m), _sample_slot(w, rng)]
    explore = rng.random(m) < EXPLORE
    cat[explore] = rng.choice(len(cat_pop), size=int(explore.sum()), p=cat_pop)
    item = _pick_items(cat, beta[user], item_order, item_start, item_count, item_price, rng)

    staple = rng.random(m) < rho[user]
    which = (rng.random(m) < 0.3).astype(np.int64)
    item[staple] = staples[user[staple], which[staple]]

    # funnel
    view = ~staple | (rng.random(m) < 0.5)
    cart = ~staple & (rng.random(m) < pc[user])
    buy = staple | (cart & (rng.random(m) < pp[user]))
    t_cart = t + 30 + rng.exponential(180.0, size=m)
    t_buy = np.where(cart, t_cart, t) + 20 + rng.exponential(240.0, size=m)

    ev_user = np.r_[user[view], user[cart], user[buy]]
    ev_item = np.r_[item[view], item[cart], item[buy]]
    ev_kind = np.r_[np.zeros(view.sum(), np.int64), np.ones(cart.sum(), np.int64), np.full(buy.sum(), 2)]
    ev_ts = np.floor(np.minimum(np.r_[t[view], t_cart[cart], t_buy[buy]], end_ts - 1)).astype(np.int64)
    order = np.lexsort((ev_kind, ev_user, ev_ts))
    ev_user, ev_item, ev_kind, ev_ts = ev_user[order], ev_item[order], ev_kind[order], ev_ts[order]
    price = item_price[ev_item].copy()
    unknown = (ev_kind == 0) & (rng.random(len(price)) < UNKNOWN_PRICE_SHARE)
    price[unknown] = np.nan
    events = pd.DataFrame({
        "user_id": users["user_id"][ev_user],
        "ts": ev_ts,
        "event": np.array(["view", "cart", "purchase"], dtype=object)[ev_kind],
        "item_id": item_ids[ev_item],
        "category": cat_names[item_cat[ev_item]],
        "price": price,
    })
    return events.loc[~events.duplicated()].reset_index(drop=True)  # same-second repeats: keep rows unique


def _baskets(events: pd.DataFrame, user_ids: np.ndarray) -> np.ndarray:
    """Typical basket per user from their own history: BASKET_ITEMS x median price of carted/bought
    items (else viewed items, else the population's median)."""
    known = events.loc[events["price"].notna(), ["user_id", "event", "price"]]
    intent = known.loc[known["event"] != "view"].groupby("user_id", sort=False)["price"].median()
    viewed = known.groupby("user_id", sort=False)["price"].median()
    fallback = float(intent.median()) if len(intent) else (float(viewed.median()) if len(viewed) else 20.0)
    ids = pd.Index(user_ids)
    med = intent.reindex(ids).fillna(viewed.reindex(ids)).fillna(fallback).to_numpy(dtype=np.float64)
    return BASKET_ITEMS * med


# ------------------------------------------------------------------------------------- ground truth

def _truth(cfg: SimConfig, users: dict, basket: np.ndarray, coupons: pd.DataFrame,
           cat_index: dict[str, int], cat_pop: np.ndarray) -> dict[str, np.ndarray]:
    """[U, C] matrices: p_buy_coupon, p_redeem, expected_order_value; [U]: p_buy_control, basket."""
    kind = coupons["kind"].to_numpy()
    value = coupons["value"].to_numpy(np.float64)[None, :]
    min_spend = coupons["min_spend"].to_numpy(np.float64)[None, :]
    scoped = (coupons["category"] != "*").to_numpy()
    b = basket[:, None]
    s = users["price_sens"][:, None]
    rtype = users["type"]

    discount = np.where(kind == "amount_off", np.minimum(value, b),
                        np.where(kind == "percent_off", value / 100.0 * b, value))
    strength = 1.0 - np.exp(-(discount / b) / (0.08 + 0.3 * (1.0 - s)))

    # taste at the end of the window decides whether a category-scoped coupon is relevant
    coupon_cat = np.array([cat_index.get(c, -1) for c in coupons["category"]])
    share_b = ((users["b_cats"][:, :, None] == coupon_cat[None, None, :]) * users["b_w"][:, :, None]).sum(axis=1)
    share_now = (1 - EXPLORE) * share_b + EXPLORE * np.where(coupon_cat >= 0, cat_pop[np.maximum(coupon_cat, 0)], 0)[None, :]
    scope = np.where(scoped[None, :], np.clip(share_b / 0.3, 0.0, 1.0), 1.0)
    in_scope = np.where(scoped[None, :], share_now, 1.0)  # chance an ordinary order is in the coupon's scope

    with np.errstate(divide="ignore"):
        log_ms = np.log(np.where(min_spend > 0, min_spend, 1.0))
    def clears(typical: np.ndarray) -> np.ndarray:  # P(order >= min_spend), logistic approx. to lognormal
        return np.where(min_spend > 0, _sigmoid(1.702 * (np.log(typical) - log_ms) / ORDER_SIGMA), 1.0)
    stretch_ok = clears(1.25 * b)  # users stretch a little to reach a threshold
    order_ok = clears(b)

    resp = users["response"][:, None]
    is_type = {t: (rtype == i)[:, None] for i, t in enumerate(RESPONSE_TYPES)}
    rho = users["repeat"][:, None]
    positive = resp * (0.6 + 0.8 * s) * strength * scope * stretch_ok
    negative = resp * (0.5 + rho) * (0.4 + 0.6 * strength) * scope
    delta = np.where(is_type["sleeping_dog"], negative, positive)

    horizon = cfg.outcome_window_days / 7.0  # logits are for 7 days; scale the hazard to the window
    p7_control = _sigmoid(users["base_logit"])[:, None]
    p7_coupon = _sigmoid(users["base_logit"][:, None] + delta)
    p_control = 1.0 - (1.0 - p7_control) ** horizon
    p_coupon = 1.0 - (1.0 - p7_coupon) ** horizon

    # redemption: coupon-driven (incremental) purchases redeem; ordinary ones if eligible and noticed
    incremental = np.maximum(p_coupon - p_control, 0.0)
    ordinary = np.minimum(p_coupon, p_control)
    p_redeem = 0.95 * incremental + 0.85 * ordinary * in_scope * order_ok
    p_redeem = np.minimum(p_redeem, p_coupon)
    q = np.divide(p_redeem, p_coupon, out=np.zeros_like(p_coupon), where=p_coupon > 0)
    expected_order = b + q * 0.8 * np.maximum(0.0, np.minimum(min_spend, 1.6 * b) - b)
    return {"p_buy_coupon": p_coupon, "p_buy_control": p_control[:, 0], "p_redeem": p_redeem,
            "expected_order_value": expected_order, "basket": basket}


def sample_outcomes(p_buy: np.ndarray, p_redeem: np.ndarray, expected_order_value: np.ndarray,
                    rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Draw (purchased, redeemed, order_value) for issuance rows from their true probabilities.

    ``p_redeem`` is unconditional (0 for the control arm); redemption is drawn only for purchases, with
    probability ``p_redeem / p_buy``. Order values are lognormal around the expectation (mean-preserving).
    """
    p_buy = np.asarray(p_buy, dtype=np.float64)
    n = len(p_buy)
    purchased = rng.random(n) < p_buy
    cond = np.divide(p_redeem, p_buy, out=np.zeros(n), where=p_buy > 0)
    redeemed = purchased & (rng.random(n) < cond)
    noise = np.exp(ORDER_SIGMA * rng.standard_normal(n) - ORDER_SIGMA ** 2 / 2)
    order_value = np.where(purchased, np.round(np.asarray(expected_order_value) * noise, 2), 0.0)
    return purchased.astype(np.int8), redeemed.astype(np.int8), order_value


def simulate_outcomes(truth_rows: pd.DataFrame, rng: np.random.Generator) -> pd.DataFrame:
    """Sample outcomes for ground-truth rows (e.g. the (user, coupon) pairs a policy picked): returns
    ``truth_rows`` plus ``purchased``, ``redeemed``, ``order_value`` drawn from p_buy_coupon, p_redeem and
    expected_order_value. For a no-coupon decision pass rows whose p_buy_coupon is p_buy_control and
    p_redeem is 0."""
    purchased, redeemed, order_value = sample_outcomes(
        truth_rows["p_buy_coupon"].to_numpy(np.float64), truth_rows["p_redeem"].to_numpy(np.float64),
        truth_rows["expected_order_value"].to_numpy(np.float64), rng)
    return truth_rows.assign(purchased=purchased, redeemed=redeemed, order_value=order_value)


# ------------------------------------------------------------------------------------- dirty rows

def _inject_dirty(frame: pd.DataFrame, kinds: list[str], corrupt, fraction: float,
                  rng: np.random.Generator) -> tuple[pd.DataFrame, dict[str, int]]:
    """Add ``fraction`` x rows dirty copies of distinct clean rows, one defect each, at random places.

    Each copy's defect maps to exactly one loader reason ('duplicates' = exact copies), so a correct
    loader's report reproduces the returned counts.
    """
    n_dirty = min(int(round(fraction * len(frame))), len(frame))
    if n_dirty == 0:
        return frame, {}
    src = rng.choice(len(frame), size=n_dirty, replace=False)
    kind_of = np.array(kinds, dtype=object)[rng.integers(len(kinds), size=n_dirty)]
    dirty = frame.iloc[src].astype(object).reset_index(drop=True)
    for k in kinds:
        rows = np.flatnonzero(kind_of == k)
        if len(rows) and k != "duplicates":
            corrupt(dirty, rows, k, rng)
    out = pd.concat([frame.astype(object), dirty], ignore_index=True)
    # dirty rows go to random places; clean rows keep their relative order
    pos = np.sort(rng.choice(len(out), size=n_dirty, replace=False))
    order = np.empty(len(out), dtype=np.int64)
    mask = np.zeros(len(out), dtype=bool)
    mask[pos] = True
    order[mask] = np.arange(len(frame), len(out))
    order[~mask] = np.arange(len(frame))
    counts = {k: int((kind_of == k).sum()) for k in kinds if (kind_of == k).any()}
    return out.iloc[order].reset_index(drop=True), counts


def _corrupt_event(dirty: pd.DataFrame, rows: np.ndarray, kind: str, rng: np.random.Generator) -> None:
    col = dirty.columns.get_loc
    if kind == "missing_user_id":
        dirty.iloc[rows, col("user_id")] = ""
    elif kind == "bad_ts":
        bad = np.array(["not-a-time", "-5", "2023-13-45T99:00:00", "NaN", "inf"], dtype=object)
        dirty.iloc[rows, col("ts")] = bad[rng.integers(len(bad), size=len(rows))]
    elif kind == "bad_price":
        old = dirty.iloc[rows, col("price")].to_numpy()
        neg = np.array([f"-{(p if p == p else 1.0):.2f}" for p in old], dtype=object)
        dirty.iloc[rows, col("price")] = np.where(rng.random(len(rows)) < 0.7, neg, "n/a")
    elif kind == "missing_item_id":
        dirty.iloc[rows, col("item_id")] = ""
    elif kind == "missing_category":
        dirty.iloc[rows, col("category")] = ""
    else:  # pragma: no cover
        raise ValueError(kind)


def _corrupt_issuance(dirty: pd.DataFrame, rows: np.ndarray, kind: str, rng: np.random.Generator) -> None:
    col = dirty.columns.get_loc
    if kind == "missing_user_id":
        dirty.iloc[rows, col("user_id")] = ""
    elif kind == "bad_issued_ts":
        dirty.iloc[rows, col("issued_ts")] = "yesterday"
    elif kind == "bad_redeemed":
        dirty.iloc[rows, col("redeemed")] = "maybe"
    elif kind == "bad_order_value":
        dirty.iloc[rows, col("order_value")] = "-1.00"
    else:  # pragma: no cover
        raise ValueError(kind)


EVENT_DIRT = ["duplicates", "missing_user_id", "bad_ts", "bad_price", "missing_item_id", "missing_category"]
ISSUANCE_DIRT = ["duplicates", "missing_user_id", "bad_issued_ts", "bad_redeemed", "bad_order_value"]


# ------------------------------------------------------------------------------------------- driver

def simulate(config: SimConfig, out_dir: str | Path) -> dict[str, Path]:
    """Write events.csv, coupons.csv, issuance.csv, ground_truth.csv, sim_config.json and
    dirty_rows.json (what was injected, per file and loader reason) to ``out_dir``."""
    cfg = config
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(cfg.seed)
    r_cat, r_item, r_user, r_event, r_coupon, r_issue, r_dirty = rng.spawn(7)

    cat_names, cat_pop = _categories(cfg, r_cat)
    items = _items(cfg, cat_pop, r_item)
    users = _users(cfg, cat_pop, r_user)
    events = _events(cfg, users, cat_names, cat_pop, items, r_event)
    basket = _baskets(events, users["user_id"])
    typical_order = float(np.median(basket))
    coupons = _coupons(cfg, cat_names, cat_pop, typical_order, r_coupon)
    truth = _truth(cfg, users, basket, coupons, {c: i for i, c in enumerate(cat_names)}, cat_pop)

    # issuance: one randomized row per user, just after the history window
    n, n_cp = cfg.n_users, cfg.n_coupons
    end_ts = cfg.start_ts + cfg.history_days * DAY
    control = r_issue.random(n) < cfg.control_share
    cp = r_issue.integers(n_cp, size=n)
    rows = np.arange(n)
    p_buy = np.where(control, truth["p_buy_control"], truth["p_buy_coupon"][rows, cp])
    p_red = np.where(control, 0.0, truth["p_redeem"][rows, cp])
    eov = np.where(control, truth["basket"], truth["expected_order_value"][rows, cp])
    purchased, redeemed, order_value = sample_outcomes(p_buy, p_red, eov, r_issue)
    issued_ts = np.floor(end_ts + r_issue.random(n) * 6 * 3600.0).astype(np.int64)
    coupon_ids = coupons["coupon_id"].to_numpy(dtype=object)
    issuance = pd.DataFrame({
        "user_id": users["user_id"],
        "coupon_id": np.where(control, "", coupon_ids[cp]),
        "issued_ts": issued_ts,
        "redeemed": redeemed,
        "purchased": purchased,
        "order_value": order_value,
    })
    issuance = issuance.iloc[np.argsort(issued_ts, kind="stable")].reset_index(drop=True)

    # ground truth for held-out users only
    eval_mask = is_eval_user(users["user_id"], cfg.eval_fraction)
    eu = np.flatnonzero(eval_mask)
    gt = pd.DataFrame({
        "user_id": np.repeat(users["user_id"][eu], n_cp),
        "coupon_id": np.tile(coupon_ids, len(eu)),
        "p_buy_coupon": np.round(truth["p_buy_coupon"][eu].ravel(), 6),
        "p_buy_control": np.round(np.repeat(truth["p_buy_control"][eu], n_cp), 6),
        "p_redeem": np.round(truth["p_redeem"][eu].ravel(), 6),
        "expected_order_value": np.round(truth["expected_order_value"][eu].ravel(), 2),
        "response_type": np.repeat(np.array(RESPONSE_TYPES, dtype=object)[users["type"][eu]], n_cp),
    })
    # rounding must not break p_redeem <= p_buy_coupon
    gt["p_redeem"] = np.minimum(gt["p_redeem"], gt["p_buy_coupon"])

    r_ev_dirty, r_is_dirty = r_dirty.spawn(2)
    events_out, ev_dirt = _inject_dirty(events, EVENT_DIRT, _corrupt_event, cfg.dirty_fraction, r_ev_dirty)
    issuance_out, is_dirt = _inject_dirty(issuance, ISSUANCE_DIRT, _corrupt_issuance, cfg.dirty_fraction, r_is_dirty)

    paths = {name: out / f"{name}.csv" for name in ("events", "coupons", "issuance", "ground_truth")}
    events_out.to_csv(paths["events"], index=False, lineterminator="\n")
    coupons.to_csv(paths["coupons"], index=False, lineterminator="\n")
    issuance_out.to_csv(paths["issuance"], index=False, lineterminator="\n")
    gt.to_csv(paths["ground_truth"], index=False, lineterminator="\n")
    paths["config"] = out / "sim_config.json"
    paths["config"].write_text(json.dumps(cfg.to_dict(), indent=2, sort_keys=True) + "\n")
    paths["dirty_rows"] = out / "dirty_rows.json"
    paths["dirty_rows"].write_text(json.dumps({"events.csv": ev_dirt, "issuance.csv": is_dirt},
                                              indent=2, sort_keys=True) + "\n")

    _log_summary(cfg, users, truth, events, issuance, gt, paths)
    return paths


@dataclass
class SimTruth:
    """The simulator's true response model for some users (rows) x every coupon (columns).

    What ``ground_truth.csv`` holds, for any users (training users too), plus ``basket`` (the expected
    order value of a purchase without a coupon). Built by :func:`recompute_truth`.
    """

    user_ids: np.ndarray  # [U] object
    coupon_ids: np.ndarray  # [C] object, catalog order
    p_buy_coupon: np.ndarray  # [U, C]
    p_buy_control: np.ndarray  # [U]
    p_redeem: np.ndarray  # [U, C] unconditional (<= p_buy_coupon)
    expected_order_value: np.ndarray  # [U, C]
    basket: np.ndarray  # [U] expected order value without a coupon
    response_type: np.ndarray  # [U] object, one of RESPONSE_TYPES

    def index(self, user_ids) -> np.ndarray:
        """Row of each of ``user_ids``; KeyError naming the first unknown one."""
        pos = {u: i for i, u in enumerate(self.user_ids.tolist())}
        try:
            return np.fromiter((pos[str(u)] for u in user_ids), dtype=np.int64)
        except KeyError as exc:
            raise KeyError(f"user {exc.args[0]!r} is not in this truth") from None

    def frame(self) -> pd.DataFrame:
        """The ``ground_truth.csv`` layout (same rounding), one row per user x coupon."""
        n_cp = len(self.coupon_ids)
        gt = pd.DataFrame({
            "user_id": np.repeat(self.user_ids, n_cp),
            "coupon_id": np.tile(self.coupon_ids, len(self.user_ids)),
            "p_buy_coupon": np.round(self.p_buy_coupon.ravel(), 6),
            "p_buy_control": np.round(np.repeat(self.p_buy_control, n_cp), 6),
            "p_redeem": np.round(self.p_redeem.ravel(), 6),
            "expected_order_value": np.round(self.expected_order_value.ravel(), 2),
            "response_type": np.repeat(self.response_type, n_cp),
        })
        gt["p_redeem"] = np.minimum(gt["p_redeem"], gt["p_buy_coupon"])
        return gt


def recompute_truth(config: SimConfig, user_ids=None) -> SimTruth:
    """The true response model of ``config``'s world for ``user_ids`` (default: every user), training
    users included, which ``ground_truth.csv`` leaves out.

    It replays :func:`simulate`'s generator with the same seed and the same order of random streams up
    to the truth (catalog, users, events, baskets), so the numbers are exactly those behind the files
    ``simulate(config)`` wrote; nothing is written. Costs about as much as simulating without writing.
    """
    cfg = config
    rng = np.random.default_rng(cfg.seed)
    r_cat, r_item, r_user, r_event, r_coupon, _r_issue, _r_dirty = rng.spawn(7)  # simulate()'s streams
    cat_names, cat_pop = _categories(cfg, r_cat)
    items = _items(cfg, cat_pop, r_item)
    users = _users(cfg, cat_pop, r_user)
    events = _events(cfg, users, cat_names, cat_pop, items, r_event)
    basket = _baskets(events, users["user_id"])
    coupons = _coupons(cfg, cat_names, cat_pop, float(np.median(basket)), r_coupon)
    truth = _truth(cfg, users, basket, coupons, {c: i for i, c in enumerate(cat_names)}, cat_pop)
    rows = np.arange(cfg.n_users)
    all_ids = users["user_id"]
    if user_ids is not None:
        pos = {u: i for i, u in enumerate(all_ids.tolist())}
        missing = [u for u in user_ids if str(u) not in pos]
        if missing:
            raise KeyError(f"{len(missing)} user(s) not in the simulated population, e.g. {missing[0]!r}")
        rows = np.fromiter((pos[str(u)] for u in user_ids), dtype=np.int64)
    return SimTruth(
        user_ids=all_ids[rows],
        coupon_ids=coupons["coupon_id"].to_numpy(dtype=object),
        p_buy_coupon=truth["p_buy_coupon"][rows],
        p_buy_control=truth["p_buy_control"][rows],
        p_redeem=truth["p_redeem"][rows],
        expected_order_value=truth["expected_order_value"][rows],
        basket=truth["basket"][rows],
        response_type=np.array(RESPONSE_TYPES, dtype=object)[users["type"][rows]],
    )


def truth_summary(users: dict | None = None, truth: dict | None = None, *, ground_truth: pd.DataFrame | None = None
                  ) -> dict[str, dict[str, float]]:
    """Mean p_buy_control, mean uplift and share of negative uplift, overall and per response type,
    from a ground-truth frame (``ground_truth=``) or the simulator's internal arrays."""
    if ground_truth is not None:
        frame = ground_truth.assign(uplift=ground_truth["p_buy_coupon"] - ground_truth["p_buy_control"])
    else:
        assert users is not None and truth is not None
        n_cp = truth["p_buy_coupon"].shape[1]
        frame = pd.DataFrame({
            "p_buy_control": np.repeat(truth["p_buy_control"], n_cp),
            "uplift": (truth["p_buy_coupon"] - truth["p_buy_control"][:, None]).ravel(),
            "p_redeem": truth["p_redeem"].ravel(),
            "response_type": np.repeat(np.array(RESPONSE_TYPES, dtype=object)[users["type"]], n_cp),
        })
    out = {}
    for name, part in [("all", frame)] + [(t, frame[frame["response_type"] == t]) for t in RESPONSE_TYPES]:
        if len(part):
            out[name] = {"share": len(part) / len(frame), "p_buy_control": float(part["p_buy_control"].mean()),
                         "uplift": float(part["uplift"].mean()), "uplift_p90": float(part["uplift"].quantile(0.9)),
                         "negative_share": float((part["uplift"] < 0).mean()),
                         "p_redeem": float(part["p_redeem"].mean())}
    return out


def _log_summary(cfg, users, truth, events, issuance, gt, paths) -> None:
    log.info("wrote %s: events %d rows (%d users with history), issuance %d, ground truth %d (%d eval users)",
             paths["events"].parent, len(events), events["user_id"].nunique(), len(issuance), len(gt),
             gt["user_id"].nunique())
    log.info("issuance: purchase rate %.3f (control %.3f, coupon %.3f), redemption rate among coupons %.3f",
             issuance["purchased"].mean(), issuance.loc[issuance["coupon_id"] == "", "purchased"].mean(),
             issuance.loc[issuance["coupon_id"] != "", "purchased"].mean(),
             issuance.loc[issuance["coupon_id"] != "", "redeemed"].mean())
    for name, s in truth_summary(users, truth).items():
        log.info("truth %-12s share %.2f  p_buy_control %.3f  uplift mean %+.3f p90 %+.3f  negative %.2f  p_redeem %.3f",
                 name, s["share"], s["p_buy_control"], s["uplift"], s["uplift_p90"], s["negative_share"], s["p_redeem"])


# ---------------------------------------------------------------------------------------------- CLI

def get_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m training.simulate", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, help="output folder")
    parser.add_argument("--config", default=None, help="JSON file with SimConfig fields (flags override it)")
    for f in dataclasses.fields(SimConfig):
        parser.add_argument("--" + f.name.replace("_", "-"), dest=f.name, type=type(f.default), default=None,
                            help=f"SimConfig.{f.name} (default {f.default})")
    parser.add_argument("--log-level", default="INFO")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = get_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    data = json.loads(Path(args.config).read_text()) if args.config else {}
    for f in dataclasses.fields(SimConfig):
        value = getattr(args, f.name)
        if value is not None:
            data[f.name] = value
    paths = simulate(SimConfig.from_dict(data), args.out)
    for name, path in paths.items():
        print(f"{name:<13} {path}  ({path.stat().st_size / 1e6:.1f} MB)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
