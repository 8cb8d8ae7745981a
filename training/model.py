"""The EdgeCoupon model: a Transformer user encoder, a coupon tower, and user x coupon heads.

Shapes: B users, T sequence positions (events then the USER token, see runtime.features),
C candidate coupons, D = config.width, H = config.head_hidden.

    user encoder  : sequence features [B, T]      -> profile u [B, D]   (read off the USER position)
    coupon tower  : coupon features   [C]         -> coupon vector [C, H + 5] (learned [H] | terms [5])
    heads         : (sequence, coupon vectors[, u]) -> p_redeem [B, C], p_buy [B, C], p_buy_control [B]

The heads read the profile only with ``ModelConfig.heads_use_profile`` (off by default: see there).
Besides (or instead of) the learned profile, the heads get a few explicit "wide" features computed in the graph
from the same inputs (so serving needs nothing extra): per user, log event counts, typical price
paid and recency (:func:`user_aggregates`); per user x coupon, the share of the user's (recent,
intent) events in the coupon's category and the coupon's terms relative to the user's typical price
(:func:`cross_features`). With tens of thousands of labelled rows a Transformer does not rediscover
"does this coupon's category fit this user" on its own; a two-line feature does, and the encoder
then adds what aggregates cannot see (drift, order, items).

``p_buy = sigmoid(control_logit + delta)`` where ``delta`` is the coupon's effect on the logit, so the
uplift ``p_buy - p_buy_control`` is modelled directly rather than as the difference of two unrelated
heads.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, Mapping

import torch
import torch.nn as nn
import torch.nn.functional as F

from runtime.features import CATEGORY_ALL, EVENT_KINDS, N_COUPON_NUMERIC, N_SEQ_NUMERIC, PAD, FeatureSpec

# event ids of the featurizer (runtime.features): PAD 0, USER 1, then EVENT_KINDS in order
VIEW, CART, PURCHASE = (EVENT_KINDS.index(k) + 2 for k in ("view", "cart", "purchase"))
N_USER_AGGREGATES = 8
N_CROSS = 5
COUPON_TERMS = N_COUPON_NUMERIC + 1  # the coupon's numeric terms and its category id, appended to its vector
RECENT_DECAY = 8.0  # events: the "recent" category share weighs the k-th last event by exp(-k / RECENT_DECAY)


@dataclass
class ModelConfig:
    n_layers: int = 2  # Transformer blocks
    n_heads: int = 2  # attention heads per block
    width: int = 64  # model width D (profile vector size)
    head_hidden: int = 64  # hidden size H of the user x coupon interaction
    dropout: float = 0.1  # dropout inside the encoder during training
    head_dropout: float = 0.2  # dropout on the learned coupon vectors and head activations while fine-tuning
    max_len: int = 50  # most recent events kept (must equal the FeatureSpec's)
    n_event_ids: int = 5  # vocabulary sizes, filled from the FeatureSpec
    n_category_ids: int = 303
    n_item_buckets: int = 8192
    n_recency_ids: int = 18
    n_price_ids: int = 18
    n_coupon_kind_ids: int = 4
    # feed the encoder's profile vector to the user x coupon heads. Off by default: on the default data
    # (14k labelled rows) the 64-dimensional pre-trained profile let the heads fit noise in the uplift:
    # with it the budgeted allocation captured -11.8% of the oracle's profit at a 30% budget, without it
    # 13.2%, and the heads' AUCs and Spearman vs the true uplift rose too (README, "Evaluation"). The
    # heads then read the in-graph aggregates and user x coupon features of the same sequence; the
    # profile is still computed, served (/v1/profile) and exported.
    heads_use_profile: bool = False

    @classmethod
    def from_spec(cls, spec: FeatureSpec, **overrides: Any) -> "ModelConfig":
        return cls(max_len=spec.max_len, n_event_ids=spec.n_event_ids, n_category_ids=spec.n_category_ids,
                   n_item_buckets=spec.n_item_buckets, n_recency_ids=spec.n_recency_ids,
                   n_price_ids=spec.n_price_ids, n_coupon_kind_ids=spec.n_coupon_kind_ids, **overrides)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "ModelConfig":
        unknown = set(data) - {f.name for f in dataclasses.fields(cls)}
        if unknown:
            raise ValueError(f"unknown ModelConfig keys: {sorted(unknown)}")
        data = dict(data)
        data.setdefault("heads_use_profile", True)  # checkpoints from before the key were trained with it
        return cls(**data)

    def __post_init__(self) -> None:
        if self.width % self.n_heads:
            raise ValueError(f"width {self.width} must be divisible by n_heads {self.n_heads}")


class SelfAttention(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.n_heads = config.n_heads
        self.qkv = nn.Linear(config.width, 3 * config.width)
        self.proj = nn.Linear(config.width, config.width)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor, bias: torch.Tensor, last_only: bool = False) -> torch.Tensor:
        """``[B, T, D]``; with ``last_only`` only the last (USER) position's query: ``[B, 1, D]``."""
        b, t, d = x.shape
        hd = d // self.n_heads
        q, k, v = self.qkv(x).split(d, dim=2)  # each [B, T, D]
        if last_only:
            q, bias = q[:, -1:], bias[:, :, -1:]  # [B, 1, D], [B, 1, 1, T]
        tq = q.shape[1]  # T, or 1
        q = q.view(b, tq, self.n_heads, hd).transpose(1, 2)  # [B, nh, Tq, hd]
        k = k.view(b, t, self.n_heads, hd).transpose(1, 2)
        v = v.view(b, t, self.n_heads, hd).transpose(1, 2)
        att = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(hd)) + bias  # [B, nh, Tq, T]
        att = self.dropout(F.softmax(att, dim=-1))
        y = (att @ v).transpose(1, 2).reshape(b, tq, d)  # [B, Tq, D]
        return self.proj(y)


class Block(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.ln1 = nn.LayerNorm(config.width)
        self.attn = SelfAttention(config)
        self.ln2 = nn.LayerNorm(config.width)
        self.mlp = nn.Sequential(nn.Linear(config.width, 4 * config.width), nn.GELU(),
                                 nn.Linear(4 * config.width, config.width), nn.Dropout(config.dropout))

    def forward(self, x: torch.Tensor, bias: torch.Tensor, last_only: bool = False) -> torch.Tensor:
        """``[B, T, D]``; with ``last_only`` the last position's output only, ``[B, 1, D]`` (keys and values
        still come from every position)."""
        x = (x[:, -1:] if last_only else x) + self.attn(self.ln1(x), bias, last_only)
        return x + self.mlp(self.ln2(x))


class UserEncoder(nn.Module):
    """Causal Transformer over the behaviour sequence (SASRec-style)."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        d = config.width
        self.event_emb = nn.Embedding(config.n_event_ids, d, padding_idx=PAD)
        self.category_emb = nn.Embedding(config.n_category_ids, d, padding_idx=PAD)
        self.item_emb = nn.Embedding(config.n_item_buckets, d, padding_idx=PAD)
        self.recency_emb = nn.Embedding(config.n_recency_ids, d, padding_idx=PAD)
        self.price_emb = nn.Embedding(config.n_price_ids, d, padding_idx=PAD)
        self.numeric = nn.Linear(N_SEQ_NUMERIC, d)
        # positions count back from the USER token (last position), so left padding needs no offsets
        self.pos_emb = nn.Embedding(config.max_len + 1, d)
        self.drop = nn.Dropout(config.dropout)
        self.blocks = nn.ModuleList([Block(config) for _ in range(config.n_layers)])
        self.ln_f = nn.LayerNorm(d)
        # Softmax attention averages, so it cannot count; how many views/carts/purchases a user made
        # is a strong purchase signal, so log-counts per event kind are added to the USER state.
        self.counts = nn.Linear(config.n_event_ids, d)

    def forward(self, event_ids, category_ids, item_ids, recency_ids, price_ids, seq_numeric) -> torch.Tensor:
        """Return hidden states [B, T, D]; the USER token's state is ``[:, -1]``."""
        x, bias = self._inputs(event_ids, category_ids, item_ids, recency_ids, price_ids, seq_numeric)
        for block in self.blocks:
            x = block(x, bias)
        t = event_ids.shape[1]
        is_user = (torch.arange(t, device=event_ids.device) == t - 1).to(x.dtype)[None, :, None]  # [1, T, 1]
        return self.ln_f(x + is_user * self._user_extra(event_ids, x.dtype)[:, None, :])  # only USER gets it

    def user_state(self, event_ids, category_ids, item_ids, recency_ids, price_ids, seq_numeric) -> torch.Tensor:
        """``forward(...)[:, -1]``, the profile ``[B, D]``, with less work: no later layer reads the last
        block's other positions, so it runs attention and MLP for the USER row only (the serving graph)."""
        x, bias = self._inputs(event_ids, category_ids, item_ids, recency_ids, price_ids, seq_numeric)
        for block in self.blocks[:-1]:
            x = block(x, bias)
        x = self.blocks[-1](x, bias, last_only=True)[:, 0]  # [B, D]
        return self.ln_f(x + self._user_extra(event_ids, x.dtype))

    def _inputs(self, event_ids, category_ids, item_ids, recency_ids, price_ids, seq_numeric):
        """The summed input embeddings ``[B, T, D]`` and the attention bias ``[B, 1, T, T]``."""
        t = event_ids.shape[1]
        idx = torch.arange(t, device=event_ids.device)  # [T]
        positions = (t - 1) - idx  # [T]: T-1 ... 0, the USER token is position 0
        x = (self.event_emb(event_ids) + self.category_emb(category_ids) + self.item_emb(item_ids)
             + self.recency_emb(recency_ids) + self.price_emb(price_ids) + self.numeric(seq_numeric)
             + self.pos_emb(positions)[None])  # [B, T, D]
        x = self.drop(x)
        # Query i may see key j when j <= i (causal) and j is a real token. Every row keeps its own
        # diagonal, so padded rows never become fully masked (a fully masked softmax row is NaN).
        causal = idx[None, :] <= idx[:, None]  # [T, T]
        real = (event_ids != PAD)[:, None, None, :]  # [B, 1, 1, T]
        diag = idx[None, :] == idx[:, None]  # [T, T]
        allowed = (causal[None, None] & real) | diag[None, None]  # [B, 1, T, T]
        return x, torch.where(allowed, 0.0, -1e4).to(x.dtype)

    def _user_extra(self, event_ids: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """``[B, D]`` from the log-counts per event kind, added to the USER state."""
        kinds = torch.arange(self.counts.in_features, device=event_ids.device)  # [K]
        # PAD is not a kind: counting it would make a user's score depend on how much left padding
        # the batch gave them (i.e. on who else is in the batch)
        kinds = torch.where(kinds == PAD, -1, kinds)
        counts = (event_ids[:, :, None] == kinds).sum(dim=1).to(dtype)  # [B, K]
        return self.counts(torch.log1p(counts))


def user_aggregates(event_ids: torch.Tensor, seq_numeric: torch.Tensor) -> torch.Tensor:
    """What a data team would hand-craft from the window, ``[B, N_USER_AGGREGATES]``.

    log counts of views/carts/purchases, typical log price of carted/bought items (of all events if
    none), mean log price, age of the latest event, purchase/cart ratio, empty-history flag.
    """
    real = (event_ids > 1).to(seq_numeric.dtype)  # [B, T] real events (not PAD, not USER)
    intent = ((event_ids == CART) | (event_ids == PURCHASE)).to(seq_numeric.dtype)  # [B, T]
    n = real.sum(dim=1)  # [B]
    views = (event_ids == VIEW).to(seq_numeric.dtype).sum(dim=1)
    carts = (event_ids == CART).to(seq_numeric.dtype).sum(dim=1)
    buys = (event_ids == PURCHASE).to(seq_numeric.dtype).sum(dim=1)
    log_price = seq_numeric[..., 0]  # [B, T] log1p(price) / 5, 0 when unknown
    mean_price = (log_price * real).sum(dim=1) / n.clamp(min=1.0)
    intent_price = torch.where(intent.sum(dim=1) > 0,
                               (log_price * intent).sum(dim=1) / intent.sum(dim=1).clamp(min=1.0), mean_price)
    # the last real event sits just before the USER token (left padding); a zero column in front keeps
    # index -2 valid for an empty history (T = 1) without a shape-dependent branch in the exported graph
    ages = torch.cat([torch.zeros_like(seq_numeric[:, :1, 1]), seq_numeric[..., 1]], dim=1)  # [B, T + 1]
    last_age = torch.where(n > 0, ages[:, -2], torch.full_like(n, 2.0))
    return torch.stack([torch.log1p(views), torch.log1p(carts), torch.log1p(buys), intent_price, mean_price,
                        last_age, buys / carts.clamp(min=1.0), (n == 0).to(n.dtype)], dim=1)  # [B, A]


def cross_features(event_ids: torch.Tensor, category_ids: torch.Tensor, user: torch.Tensor,
                   coupon_terms: torch.Tensor) -> torch.Tensor:
    """User x coupon features ``[B, C, N_CROSS]``.

    ``coupon_terms [C, COUPON_TERMS]`` = (log amount, percent fraction, log min_spend, all-categories
    flag, category id); ``user`` = :func:`user_aggregates`. Category shares are 1 for all-category
    coupons. Prices are on the featurizer's log1p(x) / 5 scale, so differences are log ratios.
    """
    real = (event_ids > 1).to(user.dtype)  # [B, T]
    intent = ((event_ids == CART) | (event_ids == PURCHASE)).to(user.dtype)
    t = event_ids.shape[1]
    back = torch.arange(t - 1, -1, -1, device=event_ids.device).to(user.dtype)  # [T] 0 at the USER token
    recent = real * torch.exp(-back / RECENT_DECAY)[None, :]  # [B, T]
    coupon_category = coupon_terms[:, -1].round().to(category_ids.dtype)  # [C]
    same = (category_ids[:, :, None] == coupon_category[None, None, :]).to(user.dtype)  # [B, T, C]
    is_all = (coupon_category == CATEGORY_ALL).to(user.dtype)[None, :]  # [1, C]

    def share(weights: torch.Tensor) -> torch.Tensor:  # [B, T] -> [B, C]
        hits = (same * weights[:, :, None]).sum(dim=1)
        return torch.where(is_all > 0, torch.ones_like(hits), hits / weights.sum(dim=1, keepdim=True).clamp(min=1e-6))

    typical = user[:, 3:4]  # [B, 1] typical log price paid
    amount_vs_price = coupon_terms[None, :, 0] - typical  # [B, C] (0 - typical for percent/shipping: small)
    min_spend_gap = coupon_terms[None, :, 2] - typical  # [B, C] > 0: the threshold is above the usual order
    return torch.stack([share(real), share(recent), share(intent), amount_vs_price, min_spend_gap], dim=-1)


class CouponTower(nn.Module):
    """Coupon terms -> vector, so an unseen coupon with familiar terms still gets a sensible vector.

    The vector ends with the coupon's raw terms (numeric terms and category id, ``COUPON_TERMS``
    columns): the heads compute user x coupon features from them, and the serving graph's inputs stay
    one precomputed ``coupon_vectors`` tensor. Category ids are small integers, exact in float32.
    """

    def __init__(self, config: ModelConfig, category_emb: nn.Embedding):
        super().__init__()
        d, h = config.width, config.head_hidden
        self.kind_emb = nn.Embedding(config.n_coupon_kind_ids, d, padding_idx=PAD)
        self.category_emb = category_emb  # shared with the encoder: a coupon's category means the same
        self.mlp = nn.Sequential(nn.Linear(2 * d + N_COUPON_NUMERIC, h), nn.GELU(), nn.Linear(h, h))

    def forward(self, coupon_kind_ids, coupon_category_ids, coupon_numeric) -> torch.Tensor:
        x = torch.cat([self.kind_emb(coupon_kind_ids), self.category_emb(coupon_category_ids), coupon_numeric], dim=-1)
        terms = torch.cat([coupon_numeric, coupon_category_ids[:, None].to(coupon_numeric.dtype)], dim=-1)
        return torch.cat([self.mlp(x), terms], dim=-1)  # [C, H + COUPON_TERMS]


class CouponHeads(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        d, h = config.width, config.head_hidden
        self.head_hidden = h
        self.use_profile = config.heads_use_profile
        user_width = (d if self.use_profile else 0) + N_USER_AGGREGATES
        self.user_proj = nn.Linear(user_width, h)
        # multiplicative user x coupon term (does the coupon's scope fit the user?)
        self.user_gate = nn.Linear(d, h) if self.use_profile else None
        self.cross_proj = nn.Linear(N_CROSS + COUPON_TERMS - 1, h)
        self.hidden = nn.Linear(h, h)
        self.out = nn.Linear(h, 2)  # [delta_buy, redeem] logits
        self.control = nn.Sequential(nn.Linear(user_width, h), nn.GELU(), nn.Dropout(config.head_dropout),
                                     nn.Linear(h, 1))
        n_pair = N_CROSS + COUPON_TERMS - 1
        # the "wide" part (Wide & Deep): logits linear in the pair features and their products with the
        # user aggregates. It is what lets the effect of a coupon's value and scope generalize across
        # coupons instead of being learned coupon by coupon from a few hundred noisy rows each.
        self.wide = nn.Linear(n_pair + N_USER_AGGREGATES + n_pair * N_USER_AGGREGATES, 2)
        self.wide_control = nn.Linear(N_USER_AGGREGATES, 1)
        # a few dozen coupons carry thousands of labels between them: without dropout the learned part
        # of their vectors memorizes each coupon's noise instead of how terms and fit drive the effect
        self.drop = nn.Dropout(config.head_dropout)

    def forward(self, profile: torch.Tensor, coupon_vectors: torch.Tensor, user: torch.Tensor, cross: torch.Tensor):
        """``profile [B, D]``, ``coupon_vectors [C, H + COUPON_TERMS]``, ``user [B, A]``, ``cross [B, C, N_CROSS]``."""
        learned, terms = coupon_vectors[:, :self.head_hidden], coupon_vectors[:, self.head_hidden:-1]  # [C, H], [C, 4]
        learned = self.drop(learned)
        user_in = torch.cat([profile, user], dim=-1) if self.use_profile else user  # [B, D + A] or [B, A]
        hu = self.user_proj(user_in)  # [B, H]
        b, c = cross.shape[0], cross.shape[1]
        pair = torch.cat([cross, terms[None, :, :].expand(b, c, terms.shape[1])], dim=-1)  # [B, C, N_CROSS + 4]
        pre = hu[:, None, :] + learned[None, :, :] + self.cross_proj(pair)  # [B, C, H]
        if self.user_gate is not None:
            pre = pre + self.user_gate(profile)[:, None, :] * learned[None, :, :]
        hidden = F.gelu(pre)  # [B, C, H]
        user_bc = user[:, None, :].expand(b, c, user.shape[1])  # [B, C, A]
        products = (pair[..., :, None] * user_bc[..., None, :]).flatten(2)  # [B, C, P * A]
        wide = self.wide(torch.cat([pair, user_bc, products], dim=-1))  # [B, C, 2]
        logits = self.out(self.drop(F.gelu(self.hidden(self.drop(hidden))))) + wide  # [B, C, 2]
        control_logit = self.control(user_in) + self.wide_control(user)  # [B, 1]
        buy_logit = control_logit + logits[..., 0]  # [B, C]
        redeem_logit = logits[..., 1]  # [B, C]
        return redeem_logit, buy_logit, control_logit[:, 0]


class CouponModel(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.encoder = UserEncoder(config)
        self.coupon_tower = CouponTower(config, self.encoder.category_emb)
        self.heads = CouponHeads(config)
        # pre-training heads: next category, and next item bucket scored against the item table (tied)
        self.next_category = nn.Linear(config.width, config.n_category_ids)
        self.apply(self._init_weights)

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, std=0.02)
            nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, std=0.02)

    def profile(self, seq: Mapping[str, torch.Tensor]) -> torch.Tensor:
        return self.encoder(**seq)[:, -1]  # [B, D]

    def score(self, seq: Mapping[str, torch.Tensor], coupon_vectors: torch.Tensor, lean: bool = False):
        """(profile [B, D], logits: redeem [B, C], buy [B, C], control [B]) from precomputed coupon vectors.

        ``lean``: the profile through :meth:`UserEncoder.user_state` (same values, less work; serving)."""
        profile = self.encoder.user_state(**seq) if lean else self.profile(seq)
        return (profile,) + self.head_logits(seq, coupon_vectors, profile)

    def head_logits(self, seq: Mapping[str, torch.Tensor], coupon_vectors: torch.Tensor, profile: torch.Tensor | None):
        """Logits (redeem [B, C], buy [B, C], control [B]); ``profile [B, D]`` is read only with
        ``config.heads_use_profile`` (else it may be None: scoring then needs no encoder pass)."""
        if self.heads.use_profile and profile is None:
            raise ValueError("these heads read the profile (heads_use_profile): pass it")
        user = user_aggregates(seq["event_ids"], seq["seq_numeric"])
        cross = cross_features(seq["event_ids"], seq["category_ids"], user, coupon_vectors[:, -COUPON_TERMS:])
        return self.heads(profile, coupon_vectors, user, cross)

    def next_item_logits(self, hidden: torch.Tensor):
        """Pre-training logits from hidden states [..., D]: (category [..., n_cat], item [..., n_items])."""
        return self.next_category(hidden), hidden @ self.encoder.item_emb.weight.T

    def forward(self, seq: Mapping[str, torch.Tensor], coupons: Mapping[str, torch.Tensor]):
        """Logits (redeem [B, C], buy [B, C], control [B]) for every user x every coupon."""
        return self.score(seq, self.coupon_tower(**coupons))[1:]


class ServingModel(nn.Module):
    """Everything a request can ask for in one module: sequence features + precomputed coupon vectors ->
    (profile, probabilities). The export's torch reference for :class:`ProfileModel` and
    :class:`ScoringModel`, the two graphs it writes.

    Coupon vectors come from the separately exported coupon tower, computed once per catalog load.
    ``lean=True`` computes the profile with :meth:`UserEncoder.user_state`: the same function with less
    work per request; the export checks it against the plain one.
    """

    def __init__(self, model: CouponModel, lean: bool = False):
        super().__init__()
        self.model = model
        self.lean = lean

    def forward(self, event_ids, category_ids, item_ids, recency_ids, price_ids, seq_numeric, coupon_vectors):
        seq = _seq(event_ids, category_ids, item_ids, recency_ids, price_ids, seq_numeric)
        profile, redeem_logit, buy_logit, control_logit = self.model.score(seq, coupon_vectors, lean=self.lean)
        return profile, torch.sigmoid(redeem_logit), torch.sigmoid(buy_logit), torch.sigmoid(control_logit)


def _seq(event_ids, category_ids, item_ids, recency_ids, price_ids, seq_numeric) -> dict[str, torch.Tensor]:
    return {"event_ids": event_ids, "category_ids": category_ids, "item_ids": item_ids, "recency_ids": recency_ids,
            "price_ids": price_ids, "seq_numeric": seq_numeric}


class ProfileModel(nn.Module):
    """The exported profile graph: sequence features -> the profile ``[B, D]`` (the lean encoder pass)."""

    def __init__(self, model: CouponModel):
        super().__init__()
        self.encoder = model.encoder

    def forward(self, event_ids, category_ids, item_ids, recency_ids, price_ids, seq_numeric):
        return self.encoder.user_state(event_ids, category_ids, item_ids, recency_ids, price_ids, seq_numeric)


class ScoringModel(nn.Module):
    """The exported scoring graph: sequence features + precomputed coupon vectors (+ the profile, only
    for heads that read it) -> probabilities p_redeem [B, C], p_buy [B, C], p_buy_control [B].

    Without ``heads_use_profile`` this graph holds no encoder, so a scoring request skips the encoder
    pass; /v1/profile runs :class:`ProfileModel` instead. (onnxruntime runs a whole graph whatever
    outputs are asked for, so one graph with both would pay for the encoder on every score.)
    """

    def __init__(self, model: CouponModel):
        super().__init__()
        self.model = model

    def forward(self, event_ids, category_ids, item_ids, recency_ids, price_ids, seq_numeric, coupon_vectors,
                profile=None):
        seq = _seq(event_ids, category_ids, item_ids, recency_ids, price_ids, seq_numeric)
        redeem_logit, buy_logit, control_logit = self.model.head_logits(seq, coupon_vectors, profile)
        return torch.sigmoid(redeem_logit), torch.sigmoid(buy_logit), torch.sigmoid(control_logit)


class CouponTowerExport(nn.Module):
    def __init__(self, model: CouponModel):
        super().__init__()
        self.tower = model.coupon_tower

    def forward(self, coupon_kind_ids, coupon_category_ids, coupon_numeric):
        return self.tower(coupon_kind_ids, coupon_category_ids, coupon_numeric)
