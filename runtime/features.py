"""Featurizer: raw behaviour events and coupon rows -> fixed-size model inputs.

This module is the single definition of the model's inputs. Training imports it from here and the
edge scorer uses it as is, so the two cannot drift apart. numpy only: it must run where torch is absent.

Sequence layout (per user, ``T = n_events + 1`` positions, left-padded in a batch)::

    [PAD ... PAD, e_1, e_2, ..., e_n, USER]

``e_1..e_n`` are the most recent ``max_len`` events in time order and ``USER`` is an always-present
token placed last. The encoder reads the user's profile off the USER position, so a user with no
history still has one real (unmasked) position and never yields a fully masked attention row.
"""
from __future__ import annotations

import dataclasses
import math
import zlib
from collections import abc
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any, Iterable, Mapping, Sequence

import numpy as np

# Token ids shared by every integer feature: 0 is padding everywhere.
PAD = 0
# event_ids: 1 is the USER token; real kinds follow.
USER_TOKEN = 1
EVENT_KINDS = ("view", "cart", "purchase")
# category ids: 1 is out-of-vocabulary, 2 is the coupon-only "all categories" scope ('*').
CATEGORY_OOV = 1
CATEGORY_ALL = 2
CATEGORY_OFFSET = 3
COUPON_KINDS = ("amount_off", "percent_off", "free_shipping")

ITEM_CACHE_SIZE = 200_000  # item id -> bucket memo entries per FeatureSpec
N_SEQ_NUMERIC = 2  # log price, log age in hours
N_COUPON_NUMERIC = 4  # log amount, percent fraction, log min_spend, all-categories flag

SEQUENCE_INPUTS = ("event_ids", "category_ids", "item_ids", "recency_ids", "price_ids", "seq_numeric")
COUPON_INPUTS = ("coupon_kind_ids", "coupon_category_ids", "coupon_numeric")


class FeatureError(ValueError):
    """A malformed event or coupon. ``field`` names the offending field, ``index`` its row."""

    def __init__(self, field_name: str, message: str, index: int | None = None):
        self.field = field_name
        self.index = index
        where = f"events[{index}].{field_name}" if index is not None else field_name
        super().__init__(f"{where}: {message}")


def _default_recency_edges() -> list[float]:
    # Seconds; roughly log-spaced from a minute to a year: recency matters most when it is small.
    return [60.0, 300.0, 900.0, 3600.0, 3 * 3600.0, 6 * 3600.0, 12 * 3600.0, 86400.0, 2 * 86400.0,
            4 * 86400.0, 7 * 86400.0, 14 * 86400.0, 30 * 86400.0, 60 * 86400.0, 120 * 86400.0,
            365 * 86400.0]


def _default_price_edges() -> list[float]:
    return [1.0, 2.0, 5.0, 10.0, 15.0, 20.0, 30.0, 50.0, 75.0, 100.0, 150.0, 200.0, 300.0, 500.0, 1000.0]


@dataclass
class FeatureSpec:
    """Everything needed to turn raw events into model inputs. Stored in the checkpoint and manifest."""

    max_len: int = 50  # most recent events kept per user (the USER token comes on top)
    n_item_buckets: int = 8192  # item ids are hashed into this many buckets (bucket 0 is padding)
    categories: list[str] = field(default_factory=list)  # category vocabulary (training data's)
    recency_edges: list[float] = field(default_factory=_default_recency_edges)  # age bucket edges, s
    price_edges: list[float] = field(default_factory=_default_price_edges)  # price bucket edges

    def __post_init__(self) -> None:
        if self.max_len < 1:
            raise ValueError("max_len must be >= 1")
        if self.n_item_buckets < 2:
            raise ValueError("n_item_buckets must be >= 2")
        self._category_index = {c: i + CATEGORY_OFFSET for i, c in enumerate(self.categories)}
        self._recency_edges = np.asarray(self.recency_edges, dtype=np.float64)
        self._price_edges = np.asarray(self.price_edges, dtype=np.float64)
        self._item_cache: dict[Any, int] = {}

    # vocabulary sizes the model needs for its embedding tables
    @property
    def n_event_ids(self) -> int:
        return len(EVENT_KINDS) + 2

    @property
    def n_category_ids(self) -> int:
        return len(self.categories) + CATEGORY_OFFSET

    @property
    def n_recency_ids(self) -> int:
        return len(self.recency_edges) + 2  # pad + (edges + 1) buckets

    @property
    def n_price_ids(self) -> int:
        return len(self.price_edges) + 3  # pad + unknown + (edges + 1) buckets

    @property
    def n_coupon_kind_ids(self) -> int:
        return len(COUPON_KINDS) + 1

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "FeatureSpec":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise ValueError(f"unknown FeatureSpec keys: {sorted(unknown)}")
        return cls(**dict(data))

    def category_id(self, category: Any) -> int:
        return self._category_index.get(str(category), CATEGORY_OOV)

    def item_buckets(self, item_ids: Iterable[Any]) -> list[int]:
        """``[item_bucket(i) for i in item_ids]`` without a method call per item (the per-request path)."""
        cache, bucket_of = self._item_cache, self.item_bucket
        out = []
        for item_id in item_ids:
            bucket = cache.get(item_id) if type(item_id) is str else None
            out.append(bucket if bucket is not None else bucket_of(item_id))
        return out

    def item_bucket(self, item_id: Any) -> int:
        # crc32 is stable across processes and platforms (Python's hash() is salted per process).
        key = item_id if type(item_id) is str else str(item_id)  # 1, 1.0 and True must not share a slot
        cache = self._item_cache
        bucket = cache.get(key)
        if bucket is None:
            bucket = 1 + zlib.crc32(key.encode("utf-8")) % (self.n_item_buckets - 1)
            if len(cache) >= ITEM_CACHE_SIZE:  # bounded: a long-running server sees unboundedly many items
                cache.clear()
            cache[key] = bucket
        return bucket


EVENT_IDS = {kind: i + 2 for i, kind in enumerate(EVENT_KINDS)}
_COUPON_KIND_ID = {kind: i + 1 for i, kind in enumerate(COUPON_KINDS)}


def parse_ts(value: Any, field_name: str = "ts", index: int | None = None) -> float:
    """Unix seconds (int/float/numeric string) or ISO-8601 (naive means UTC) -> float seconds."""
    if isinstance(value, bool) or value is None:
        raise FeatureError(field_name, f"expected unix seconds or ISO-8601, got {value!r}", index)
    if isinstance(value, (int, float, np.integer, np.floating)):
        ts = float(value)
    elif isinstance(value, str):
        text = value.strip()
        try:
            ts = float(text)
        except ValueError:
            try:
                parsed = datetime.fromisoformat(text.replace("Z", "+00:00"))
            except ValueError:
                raise FeatureError(field_name, f"not unix seconds or ISO-8601: {value!r}", index) from None
            if parsed.tzinfo is None:
                parsed = parsed.replace(tzinfo=timezone.utc)
            ts = parsed.timestamp()
    else:
        raise FeatureError(field_name, f"expected unix seconds or ISO-8601, got {type(value).__name__}", index)
    if not math.isfinite(ts) or ts < 0:
        raise FeatureError(field_name, f"must be a finite, non-negative time, got {value!r}", index)
    return ts


def parse_price(value: Any, index: int | None = None) -> float | None:
    """Price as a finite non-negative float; None (or empty) means unknown."""
    if value is None or (isinstance(value, str) and value.strip() == ""):
        return None
    if isinstance(value, bool):
        raise FeatureError("price", f"expected a number, got {value!r}", index)
    try:
        price = float(value)
    except (TypeError, ValueError):
        raise FeatureError("price", f"expected a number, got {value!r}", index) from None
    if not math.isfinite(price) or price < 0:
        raise FeatureError("price", f"must be finite and >= 0, got {value!r}", index)
    return price


_FAST_NUMBERS = (int, float)  # exact types take the fast path; bool (an int subclass) is not among them


def _clean_events(events: Iterable[Mapping[str, Any]], now: float | None) -> list[tuple]:
    """Validate events; return (ts, event_id, category, item_id, price) sorted by time.

    This runs on every request, so the common shapes (a dict, numeric ts and price, string ids) are
    checked by exact type first; anything else goes through the general, slower validation.
    """
    rows = []
    event_ids = EVENT_IDS
    for i, event in enumerate(events):
        if type(event) is not dict and not isinstance(event, abc.Mapping):
            raise FeatureError("event", f"each event must be an object, got {type(event).__name__}", i)
        if "ts" not in event:
            raise FeatureError("ts", "missing", i)
        ts = event["ts"]
        if type(ts) in _FAST_NUMBERS and 0 <= ts < math.inf:
            ts = float(ts)
        else:
            ts = parse_ts(ts, "ts", i)
        kind = event.get("event")
        event_id = event_ids.get(kind) if type(kind) is str else None
        if event_id is None:
            raise FeatureError("event", f"unknown event kind {kind!r}; expected one of {list(EVENT_KINDS)}", i)
        item_id = event.get("item_id")
        if type(item_id) is str:
            if not item_id.strip():
                raise FeatureError("item_id", "missing or not a scalar", i)
        elif item_id is None or isinstance(item_id, (dict, list)):
            raise FeatureError("item_id", "missing or not a scalar", i)
        category = event.get("category")
        if type(category) is not str and (category is None or isinstance(category, (dict, list))):
            raise FeatureError("category", "missing or not a scalar", i)
        price = event.get("price")
        if not (type(price) in _FAST_NUMBERS and 0 <= price < math.inf):
            price = parse_price(price, i)
        if now is not None and ts > now:
            continue  # the history "as of now": later events cannot inform a decision made now
        rows.append((ts, event_id, category, item_id, price))
    rows.sort(key=_by_time)  # stable: same-second events keep their given order
    return rows


def _by_time(row: tuple) -> float:
    return row[0]


def featurize_one(events: Iterable[Mapping[str, Any]], spec: FeatureSpec, now: float | None = None) -> dict[str, np.ndarray]:
    """One user's events -> unbatched arrays of length ``min(n, max_len) + 1`` (events then USER).

    ``now`` (unix seconds) is the decision time: recency is measured from it and events after it are
    ignored. Without it, the latest event's time is used.
    """
    now_s = None if now is None else parse_ts(now, "now")
    rows = _clean_events(events, now_s)[-spec.max_len:]
    n = len(rows)
    if now_s is None:
        now_s = rows[-1][0] if rows else 0.0
    # This runs on every request: one pass of plain Python over the rows, then a few whole-array
    # numpy operations (each numpy call costs ~1 us, as much as several rows of Python).
    ts, kinds, categories, items, prices = zip(*rows) if n else ((), (), (), (), ())
    category_index = spec._category_index
    event_ids = np.array(kinds + (USER_TOKEN,), dtype=np.int64)
    category_ids = np.array([category_index.get(c if type(c) is str else str(c), CATEGORY_OOV) for c in categories]
                            + [PAD], dtype=np.int64)
    item_ids = np.array(spec.item_buckets(items) + [PAD], dtype=np.int64)
    recency_ids = np.zeros(n + 1, dtype=np.int64)
    price_ids = np.zeros(n + 1, dtype=np.int64)
    numeric = np.zeros((n + 1, N_SEQ_NUMERIC), dtype=np.float32)
    if n:
        age = now_s - np.array(ts, dtype=np.float64)
        np.maximum(age, 0.0, out=age)
        recency_ids[:n] = np.searchsorted(spec._recency_edges, age, side="right")
        recency_ids[:n] += 1
        numeric[:n, 1] = np.log1p(age / 3600.0) / 5.0
        if None in prices:  # unknown prices: price id 1, log price 0
            known = np.array([p is not None for p in prices])
            price = np.array([0.0 if p is None else p for p in prices], dtype=np.float64)
            price_ids[:n] = np.where(known, 2 + np.searchsorted(spec._price_edges, price, side="right"), 1)
        else:  # known prices take ids 2..
            price = np.array(prices, dtype=np.float64)
            price_ids[:n] = np.searchsorted(spec._price_edges, price, side="right")
            price_ids[:n] += 2
        numeric[:n, 0] = np.log1p(price) / 5.0  # log1p(0) = 0 for an unknown price
    return {
        "event_ids": event_ids,
        "category_ids": category_ids,
        "item_ids": item_ids,
        "recency_ids": recency_ids,
        "price_ids": price_ids,
        "seq_numeric": numeric,
    }


def collate(featurized: Sequence[Mapping[str, np.ndarray]], length: int | None = None) -> dict[str, np.ndarray]:
    """Stack unbatched sequences into a batch, left-padding to the longest (or ``length``).

    A batch of one that needs no padding (a single request) is a view of its arrays, not a copy.
    """
    if not featurized:
        raise ValueError("collate needs at least one sequence")
    if len(featurized) == 1 and (length is None or length == len(featurized[0]["event_ids"])):
        return {name: featurized[0][name][None] for name in SEQUENCE_INPUTS}
    t = length if length is not None else max(len(f["event_ids"]) for f in featurized)
    batch = {}
    for name in SEQUENCE_INPUTS:
        first = featurized[0][name]
        out = np.zeros((len(featurized), t) + first.shape[1:], dtype=first.dtype)
        for row, f in enumerate(featurized):
            seq = f[name]
            out[row, t - len(seq):] = seq
        batch[name] = out
    return batch


def featurize(events: Iterable[Mapping[str, Any]], spec: FeatureSpec, now: float | None = None) -> dict[str, np.ndarray]:
    """One user's events -> a batch of one: arrays shaped ``[1, T]`` (``seq_numeric``: ``[1, T, 2]``)."""
    single = featurize_one(events, spec, now)
    return {name: value[None] for name, value in single.items()}


def featurize_batch(histories: Sequence[Iterable[Mapping[str, Any]]], spec: FeatureSpec,
                    nows: Sequence[float | None] | None = None) -> dict[str, np.ndarray]:
    """Many users' events -> one left-padded batch ``[B, T]`` with ``T`` the longest sequence."""
    nows = nows if nows is not None else [None] * len(histories)
    if len(nows) != len(histories):
        raise ValueError("nows must have one entry per history")
    return collate([featurize_one(h, spec, now) for h, now in zip(histories, nows)])


# ---------------------------------------------------------------------------------------------- coupons

def coupon_features(coupons: Sequence[Mapping[str, Any]], spec: FeatureSpec) -> dict[str, np.ndarray]:
    """Coupon rows (kind, value, min_spend, category) -> coupon tower inputs ``[C]`` / ``[C, 4]``.

    Coupons are described by their terms, not their id, so a coupon never seen in training still
    gets a meaningful vector.
    """
    n = len(coupons)
    kind_ids = np.zeros(n, dtype=np.int64)
    category_ids = np.zeros(n, dtype=np.int64)
    numeric = np.zeros((n, N_COUPON_NUMERIC), dtype=np.float32)
    for i, c in enumerate(coupons):
        kind = c.get("kind")
        if kind not in _COUPON_KIND_ID:
            raise FeatureError("kind", f"coupon {c.get('coupon_id')!r}: unknown kind {kind!r}; expected one of {list(COUPON_KINDS)}")
        value = coupon_number(c, "value")
        min_spend = coupon_number(c, "min_spend")
        if kind == "percent_off" and value > 100:
            raise FeatureError("value", f"coupon {c.get('coupon_id')!r}: percent_off value must be <= 100, got {value}")
        category = str(c.get("category", "*") or "*")
        kind_ids[i] = _COUPON_KIND_ID[kind]
        category_ids[i] = CATEGORY_ALL if category == "*" else spec.category_id(category)
        numeric[i, 0] = math.log1p(value) / 5.0 if kind != "percent_off" else 0.0
        numeric[i, 1] = value / 100.0 if kind == "percent_off" else 0.0
        numeric[i, 2] = math.log1p(min_spend) / 5.0
        numeric[i, 3] = 1.0 if category == "*" else 0.0
    return {"coupon_kind_ids": kind_ids, "coupon_category_ids": category_ids, "coupon_numeric": numeric}


def coupon_number(coupon: Mapping[str, Any], name: str) -> float:
    raw = coupon.get(name, 0)
    try:
        value = float(raw if raw not in (None, "") else 0)
    except (TypeError, ValueError):
        raise FeatureError(name, f"coupon {coupon.get('coupon_id')!r}: expected a number, got {raw!r}") from None
    if not math.isfinite(value) or value < 0:
        raise FeatureError(name, f"coupon {coupon.get('coupon_id')!r}: must be finite and >= 0, got {raw!r}")
    return value
