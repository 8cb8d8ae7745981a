"""Model-ready arrays from cleaned data, built with the runtime featurizer (never a copy of it)."""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from typing import Mapping, Sequence

import numpy as np
import pandas as pd
import torch

from runtime.features import SEQUENCE_INPUTS, FeatureSpec, collate, coupon_features, featurize_one

IGNORE = -100  # target value that cross-entropy skips


def build_category_vocab(events: pd.DataFrame, min_count: int = 1) -> list[str]:
    """Categories ordered by frequency (ties by name), so ids are stable for the same data."""
    return vocab_from_counts(Counter(events["category"].tolist()), min_count)


def vocab_from_counts(counts: Mapping[str, int], min_count: int = 1) -> list[str]:
    """:func:`build_category_vocab` from category counts (e.g. summed over training ranks)."""
    return sorted((c for c, n in counts.items() if n >= min_count), key=lambda c: (-counts[c], c))


@dataclass
class SequenceArrays:
    """Left-padded featurized sequences ``[N, T]`` for N users/rows."""

    arrays: dict[str, np.ndarray]

    def __len__(self) -> int:
        return len(self.arrays["event_ids"])

    def batch(self, index: np.ndarray) -> dict[str, torch.Tensor]:
        """Rows ``index`` as tensors, trimmed to the longest real sequence among them."""
        event_ids = self.arrays["event_ids"][index]
        real_cols = np.flatnonzero((event_ids != 0).any(axis=0))
        start = int(real_cols[0]) if len(real_cols) else event_ids.shape[1] - 1
        return {name: torch.from_numpy(np.ascontiguousarray(self.arrays[name][index][:, start:]))
                for name in SEQUENCE_INPUTS}


def sequence_arrays(histories: Mapping[str, list[dict]], user_ids: Sequence[str], nows: Sequence[float],
                    spec: FeatureSpec) -> SequenceArrays:
    featurized = [featurize_one(histories.get(u, []), spec, now) for u, now in zip(user_ids, nows)]
    return SequenceArrays(collate(featurized, length=spec.max_len + 1))


@dataclass
class PretrainArrays:
    seq: SequenceArrays
    category_targets: np.ndarray  # [N, T] next event's category id, IGNORE where none
    item_targets: np.ndarray  # [N, T] next event's item bucket, IGNORE where none
    user_ids: np.ndarray | None = None  # [N] the user of each row (users without events have no row)


def pretrain_arrays(histories: Mapping[str, list[dict]], user_ids: Sequence[str], nows: Sequence[float],
                    spec: FeatureSpec) -> PretrainArrays:
    """Next-event examples: the last event is held out; every position predicts the event after it.

    Input  ``[e_1 .. e_{n-1}, USER]``; targets ``[e_2 .. e_n, e_n]``: the USER position predicts the
    held-out event, which is exactly how HR@10 / NDCG@10 are evaluated.
    """
    t = spec.max_len + 1
    inputs, cat_targets, item_targets, kept = [], [], [], []
    for user, now in zip(user_ids, nows):
        full = featurize_one(histories.get(user, []), spec, now)
        n = len(full["event_ids"]) - 1
        if n == 0:
            continue
        keep = np.r_[0:n - 1, n]  # drop the last event, keep the USER token
        inputs.append({name: value[keep] for name, value in full.items()})
        kept.append(user)
        cats = np.r_[full["category_ids"][1:n], full["category_ids"][n - 1]]
        items = np.r_[full["item_ids"][1:n], full["item_ids"][n - 1]]
        pad = t - len(cats)
        cat_targets.append(np.r_[np.full(pad, IGNORE), cats])
        item_targets.append(np.r_[np.full(pad, IGNORE), items])
    return PretrainArrays(SequenceArrays(collate(inputs, length=t)),
                          np.stack(cat_targets).astype(np.int64), np.stack(item_targets).astype(np.int64),
                          np.array(kept, dtype=object))


@dataclass
class IssuanceArrays:
    seq: SequenceArrays
    coupon_index: np.ndarray  # [N] index into the catalog, -1 for the control arm
    redeemed: np.ndarray  # [N] float32 0/1
    purchased: np.ndarray  # [N] float32 0/1
    user_ids: np.ndarray  # [N] str

    @property
    def treated(self) -> np.ndarray:
        return self.coupon_index >= 0


def issuance_arrays(issuance: pd.DataFrame, histories: Mapping[str, list[dict]], spec: FeatureSpec,
                    coupon_ids: Sequence[str]) -> IssuanceArrays:
    """One example per issuance row; the history is taken as of ``issued_ts`` (no leakage)."""
    index = {c: i for i, c in enumerate(coupon_ids)}
    coupon_index = np.array([index[c] if c else -1 for c in issuance["coupon_id"]], dtype=np.int64)
    seq = sequence_arrays(histories, issuance["user_id"].tolist(), issuance["issued_ts"].tolist(), spec)
    return IssuanceArrays(seq, coupon_index, issuance["redeemed"].to_numpy(np.float32),
                          issuance["purchased"].to_numpy(np.float32), issuance["user_id"].to_numpy())


def coupon_tensors(coupons: Sequence[Mapping], spec: FeatureSpec) -> dict[str, torch.Tensor]:
    return {k: torch.from_numpy(v) for k, v in coupon_features(coupons, spec).items()}
