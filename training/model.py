"""The EdgeCoupon model: a Transformer user encoder, a coupon tower, and user x coupon heads.

Shapes: B users, T sequence positions (events then the USER token, see runtime.features),
C candidate coupons, D = config.width, H = config.head_hidden.

    user encoder  : sequence features [B, T]      -> profile u [B, D]   (read off the USER position)
    coupon tower  : coupon features   [C]         -> coupon vector [C, H]
    heads         : (u, coupon vectors)           -> p_redeem [B, C], p_buy [B, C], p_buy_control [B]

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

from runtime.features import N_COUPON_NUMERIC, N_SEQ_NUMERIC, PAD, FeatureSpec


@dataclass
class ModelConfig:
    n_layers: int = 2  # Transformer blocks
    n_heads: int = 2  # attention heads per block
    width: int = 64  # model width D (profile vector size)
    head_hidden: int = 64  # hidden size H of the user x coupon interaction
    dropout: float = 0.1  # dropout inside the encoder during training
    max_len: int = 50  # most recent events kept (must equal the FeatureSpec's)
    n_event_ids: int = 5  # vocabulary sizes, filled from the FeatureSpec
    n_category_ids: int = 303
    n_item_buckets: int = 8192
    n_recency_ids: int = 18
    n_price_ids: int = 18
    n_coupon_kind_ids: int = 4

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
        return cls(**dict(data))

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

    def forward(self, x: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        hd = d // self.n_heads
        q, k, v = self.qkv(x).split(d, dim=2)  # each [B, T, D]
        q = q.view(b, t, self.n_heads, hd).transpose(1, 2)  # [B, nh, T, hd]
        k = k.view(b, t, self.n_heads, hd).transpose(1, 2)
        v = v.view(b, t, self.n_heads, hd).transpose(1, 2)
        att = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(hd)) + bias  # [B, nh, T, T]
        att = self.dropout(F.softmax(att, dim=-1))
        y = (att @ v).transpose(1, 2).reshape(b, t, d)  # [B, T, D]
        return self.proj(y)


class Block(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.ln1 = nn.LayerNorm(config.width)
        self.attn = SelfAttention(config)
        self.ln2 = nn.LayerNorm(config.width)
        self.mlp = nn.Sequential(nn.Linear(config.width, 4 * config.width), nn.GELU(),
                                 nn.Linear(4 * config.width, config.width), nn.Dropout(config.dropout))

    def forward(self, x: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln1(x), bias)
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
        bias = torch.where(allowed, 0.0, -1e4).to(x.dtype)
        for block in self.blocks:
            x = block(x, bias)
        kinds = torch.arange(self.counts.in_features, device=event_ids.device)  # [K]
        # PAD is not a kind: counting it would make a user's score depend on how much left padding
        # the batch gave them (i.e. on who else is in the batch)
        kinds = torch.where(kinds == PAD, -1, kinds)
        counts = (event_ids[:, :, None] == kinds).sum(dim=1).to(x.dtype)  # [B, K]
        user_extra = self.counts(torch.log1p(counts))[:, None, :]  # [B, 1, D]
        is_user = (idx == t - 1).to(x.dtype)[None, :, None]  # [1, T, 1]: only the USER position gets it
        return self.ln_f(x + is_user * user_extra)


class CouponTower(nn.Module):
    """Coupon terms -> vector, so an unseen coupon with familiar terms still gets a sensible vector."""

    def __init__(self, config: ModelConfig, category_emb: nn.Embedding):
        super().__init__()
        d, h = config.width, config.head_hidden
        self.kind_emb = nn.Embedding(config.n_coupon_kind_ids, d, padding_idx=PAD)
        self.category_emb = category_emb  # shared with the encoder: a coupon's category means the same
        self.mlp = nn.Sequential(nn.Linear(2 * d + N_COUPON_NUMERIC, h), nn.GELU(), nn.Linear(h, h))

    def forward(self, coupon_kind_ids, coupon_category_ids, coupon_numeric) -> torch.Tensor:
        x = torch.cat([self.kind_emb(coupon_kind_ids), self.category_emb(coupon_category_ids), coupon_numeric], dim=-1)
        return self.mlp(x)  # [C, H]


class CouponHeads(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        d, h = config.width, config.head_hidden
        self.user_proj = nn.Linear(d, h)
        self.user_gate = nn.Linear(d, h)  # multiplicative user x coupon term (does the coupon's scope fit the user?)
        self.out = nn.Linear(h, 2)  # [delta_buy, redeem] logits
        self.control = nn.Sequential(nn.Linear(d, h), nn.GELU(), nn.Linear(h, 1))

    def forward(self, profile: torch.Tensor, coupon_vectors: torch.Tensor):
        hu = self.user_proj(profile)  # [B, H]
        gate = self.user_gate(profile)  # [B, H]
        hidden = F.gelu(hu[:, None, :] + coupon_vectors[None, :, :]
                        + gate[:, None, :] * coupon_vectors[None, :, :])  # [B, C, H]
        logits = self.out(hidden)  # [B, C, 2]
        control_logit = self.control(profile)  # [B, 1]
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

    def next_item_logits(self, hidden: torch.Tensor):
        """Pre-training logits from hidden states [..., D]: (category [..., n_cat], item [..., n_items])."""
        return self.next_category(hidden), hidden @ self.encoder.item_emb.weight.T

    def forward(self, seq: Mapping[str, torch.Tensor], coupons: Mapping[str, torch.Tensor]):
        """Logits (redeem [B, C], buy [B, C], control [B]) for every user x every coupon."""
        return self.heads(self.profile(seq), self.coupon_tower(**coupons))


class ServingModel(nn.Module):
    """The exported graph: sequence features + precomputed coupon vectors -> probabilities.

    Coupon vectors come from the separately exported coupon tower, computed once per catalog load.
    """

    def __init__(self, model: CouponModel):
        super().__init__()
        self.encoder = model.encoder
        self.heads = model.heads

    def forward(self, event_ids, category_ids, item_ids, recency_ids, price_ids, seq_numeric, coupon_vectors):
        profile = self.encoder(event_ids, category_ids, item_ids, recency_ids, price_ids, seq_numeric)[:, -1]
        redeem_logit, buy_logit, control_logit = self.heads(profile, coupon_vectors)
        return profile, torch.sigmoid(redeem_logit), torch.sigmoid(buy_logit), torch.sigmoid(control_logit)


class CouponTowerExport(nn.Module):
    def __init__(self, model: CouponModel):
        super().__init__()
        self.tower = model.coupon_tower

    def forward(self, coupon_kind_ids, coupon_category_ids, coupon_numeric):
        return self.tower(coupon_kind_ids, coupon_category_ids, coupon_numeric)
