"""Realistic request bodies for the load tests and the HTTP benchmark, drawn from the simulator's files.

From ``events.csv`` / ``issuance.csv`` / ``coupons.csv`` of a data directory (``make demo`` writes
``artifacts/data``): real user histories cut to mixed lengths (empty up to the model's ``max_len``),
``now`` = the user's issuance time, candidate lists and ``k`` drawn at random, and a set of bad requests,
one per class of malformed input the service must answer with a 4xx. The simulator injects dirty rows
on purpose; those are dropped here (with the runtime's own parsers), so "good" bodies are good.

Bodies are serialized once, up front: the load generator should spend its CPU on sending, not on JSON.
Only the standard library, numpy-free runtime parsers and orjson: no pandas, no torch.
"""
from __future__ import annotations

import csv
import logging
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson

from runtime.features import EVENT_KINDS, FeatureError, parse_price, parse_ts

log = logging.getLogger(__name__)

MAX_ROWS = 2_000_000  # events.csv rows read at most (bounded time and memory)


@dataclass(frozen=True)
class BadRequest:
    """A malformed request and the answer it must get."""

    name: str  # the class of bad input (locust request name: bad:<name>)
    path: str
    body: bytes
    status: int  # expected status
    field: str | None  # expected error.field (prefix match), None: any


@dataclass
class PayloadPool:
    users: list[dict[str, Any]]  # single-user bodies as dicts (for batch assembly and tests)
    score: list[bytes]  # /v1/score bodies
    batch: list[bytes]  # /v1/score:batch bodies
    profile: list[bytes]  # /v1/profile bodies
    bad: list[BadRequest]
    coupon_ids: list[str]
    max_len: int
    stats: dict[str, Any] = field(default_factory=dict)


def read_histories(data_dir: Path, max_users: int, rng: random.Random) -> tuple[dict[str, list[dict]], dict[str, float]]:
    """user -> clean events sorted by time (at most ``max_users`` users), and user -> issuance time."""
    issued: dict[str, float] = {}
    issuance = data_dir / "issuance.csv"
    if issuance.exists():
        with open(issuance, newline="") as fh:
            for row in csv.DictReader(fh):
                try:
                    if (row["user_id"] or "").strip():
                        issued.setdefault(row["user_id"].strip(), parse_ts(row["issued_ts"]))
                except (FeatureError, KeyError, AttributeError):
                    continue  # the simulator's dirty rows
    histories: dict[str, list[dict]] = {}
    dropped = 0
    kinds = set(EVENT_KINDS)
    with open(data_dir / "events.csv", newline="") as fh:
        for n, row in enumerate(csv.DictReader(fh)):
            if n >= MAX_ROWS:
                break
            try:
                user = row["user_id"].strip()
                ts = parse_ts(row["ts"])
                price = parse_price(row.get("price"))
                if not user or row["event"] not in kinds or not row["item_id"].strip() or not row["category"].strip():
                    raise FeatureError("row", "incomplete")
            except (FeatureError, KeyError, AttributeError):
                dropped += 1
                continue
            histories.setdefault(user, []).append({"ts": int(ts) if ts.is_integer() else ts, "event": row["event"],
                                                   "item_id": row["item_id"], "category": row["category"],
                                                   "price": price})
    users = list(histories)
    rng.shuffle(users)
    picked = {}
    for user in users[:max_users]:
        events = sorted(histories[user], key=lambda e: e["ts"])
        now = issued.get(user, events[-1]["ts"] + 3600.0)
        picked[user] = [e for e in events if e["ts"] <= now]
    # users without any event exist in production too (cold start): some issuance-only users
    for user in [u for u in issued if u not in histories][:max(1, max_users // 20)]:
        picked[user] = []
    log.info("payloads: %d users read (%d dirty event rows dropped)", len(picked), dropped)
    return picked, issued


def user_body(user: str, events: list[dict], now: float | None, coupon_ids: list[str], max_len: int,
              rng: random.Random) -> dict[str, Any]:
    """One /v1/score body: the most recent n events (n from empty to max_len), random candidates and k."""
    roll = rng.random()
    if roll < 0.1 or not events:
        n = 0
    elif roll < 0.2:
        n = len(events)  # the whole history, possibly longer than max_len (the server truncates)
    else:
        n = rng.randint(1, max(1, min(len(events), max_len)))
    body: dict[str, Any] = {"user_id": user, "events": events[len(events) - n:] if n else []}
    if now is not None:
        body["now"] = int(now) if float(now).is_integer() else now
    if rng.random() < 0.5 and len(coupon_ids) > 1:
        body["candidates"] = rng.sample(coupon_ids, rng.randint(1, min(10, len(coupon_ids))))
    if rng.random() < 0.5:
        body["k"] = rng.randint(1, 5)
    roll = rng.random()
    if roll < 0.1:
        body["objective"] = "p_redeem"
    elif roll < 0.2:
        body["objective"] = "p_buy"
    return body


def bad_requests(good: dict[str, Any], max_events: int, max_body_bytes: int) -> list[BadRequest]:
    """One request per class of bad input, each with the status and field it must get."""
    event = {"ts": 1_700_000_000, "event": "view", "item_id": "item_1", "category": "cat_001", "price": 9.5}
    base = {"user_id": good["user_id"], "events": [event, event]}
    if good.get("now") is not None:
        base["now"] = good["now"]
    else:
        base["now"] = 1_700_000_100

    def body(**changes: Any) -> bytes:
        return orjson.dumps({**base, **changes})

    def with_event(**changes: Any) -> bytes:
        return body(events=[event, {**event, **changes}])

    score = "/v1/score"
    huge_user = "x" * 100
    return [
        BadRequest("malformed_json", score, b'{"user_id": "u1", "events": [', 400, "body"),
        BadRequest("empty_body", score, b"", 400, "body"),
        BadRequest("not_an_object", score, b"[1, 2, 3]", 400, "body"),
        BadRequest("missing_user_id", score, orjson.dumps({"events": []}), 400, "user_id"),
        BadRequest("events_not_a_list", score, body(events={"ts": 1}), 400, "events"),
        BadRequest("event_not_an_object", score, body(events=[event, "view"]), 400, "events[1]"),
        BadRequest("unknown_event_kind", score, with_event(event="wishlist"), 400, "events[1].event"),
        BadRequest("non_finite_price", score, with_event(price="NaN"), 400, "events[1].price"),
        BadRequest("negative_price", score, with_event(price=-3), 400, "events[1].price"),
        BadRequest("bad_timestamp", score, with_event(ts="yesterday"), 400, "events[1].ts"),
        BadRequest("future_timestamp", score, with_event(ts=base["now"] + 86400 * 365), 400, "events[1].ts"),
        BadRequest("millisecond_timestamp", score, with_event(ts=int(base["now"]) * 1000), 400, "events[1].ts"),
        BadRequest("wrong_type_k", score, body(k="3"), 400, "k"),
        BadRequest("unknown_objective", score, body(objective="clicks"), 400, "objective"),
        BadRequest("unknown_field", score, body(candidate=["cp01"]), 400, "candidate"),
        BadRequest("unknown_candidate", score, body(candidates=["no-such-coupon"]), 422, "candidates[0]"),
        BadRequest("too_many_events", score, body(events=[event] * (max_events + 1)), 413, "events"),
        BadRequest("oversized_body", score, body(user_id=huge_user, events=[event] * (max_body_bytes // 60 + 10),
                                                 ), 413, "body"),
        BadRequest("batch_bad_user", "/v1/score:batch",
                   orjson.dumps({"requests": [base, {**base, "events": [{**event, "price": "inf"}]}]}), 400,
                   "requests[1].events[0].price"),
        BadRequest("batch_empty", "/v1/score:batch", orjson.dumps({"requests": []}), 400, "requests"),
    ]


def build_pool(data_dir: str | Path, max_len: int, *, n_users: int = 600, n_batches: int = 100,
               max_batch_users: int = 16, max_events: int = 1000, max_body_bytes: int = 1 << 20,
               seed: int = 0) -> PayloadPool:
    """The request bodies for a load test, reproducible for a given ``seed``."""
    data_dir = Path(data_dir)
    rng = random.Random(seed)
    coupon_ids = []
    with open(data_dir / "coupons.csv", newline="") as fh:
        for row in csv.DictReader(fh):
            coupon_id = (row.get("coupon_id") or "").strip()
            if coupon_id and coupon_id not in coupon_ids:
                coupon_ids.append(coupon_id)
    histories, issued = read_histories(data_dir, n_users, rng)
    users = [user_body(u, ev, issued.get(u), coupon_ids, max_len, rng) for u, ev in histories.items()]
    batch_bodies = []
    for _ in range(n_batches):
        members = rng.sample(users, min(len(users), rng.randint(2, max_batch_users)))
        items = [{k: v for k, v in m.items() if k in ("user_id", "events", "candidates", "now")} for m in members]
        batch = {"requests": items}
        if rng.random() < 0.5:
            batch["k"] = rng.randint(1, 5)
        batch_bodies.append(orjson.dumps(batch))
    profile = [orjson.dumps({k: v for k, v in u.items() if k in ("user_id", "events", "now")}) for u in users]
    lengths = sorted(len(u["events"]) for u in users)
    stats = {"users": len(users), "empty_histories": sum(1 for n in lengths if n == 0),
             "median_events": lengths[len(lengths) // 2] if lengths else 0, "max_events": lengths[-1] if lengths else 0}
    return PayloadPool(users=users, score=[orjson.dumps(u) for u in users], batch=batch_bodies, profile=profile,
                       bad=bad_requests(users[0], max_events, max_body_bytes), coupon_ids=coupon_ids,
                       max_len=max_len, stats=stats)


def bench_body(pool: PayloadPool) -> bytes:
    """One fixed, full-size /v1/score body (the longest history, whole catalog, k=10) for the benchmark."""
    longest = max(pool.users, key=lambda u: min(len(u["events"]), pool.max_len))
    events = longest["events"][-pool.max_len:]
    body = {"user_id": longest["user_id"], "events": events, "k": 10}
    if longest.get("now") is not None:
        body["now"] = longest["now"]
    return orjson.dumps(body)


def save_pool(pool: PayloadPool, path: str | Path) -> None:
    """Write a pool to one JSON file: the load generator loads it in a blink instead of reading the data."""
    data = {"users": pool.users, "score": [b.decode() for b in pool.score], "batch": [b.decode() for b in pool.batch],
            "profile": [b.decode() for b in pool.profile], "coupon_ids": pool.coupon_ids, "max_len": pool.max_len,
            "stats": pool.stats,
            "bad": [{"name": b.name, "path": b.path, "body": b.body.decode(), "status": b.status, "field": b.field}
                    for b in pool.bad]}
    Path(path).write_bytes(orjson.dumps(data))


def load_pool(path: str | Path) -> PayloadPool:
    data = orjson.loads(Path(path).read_bytes())
    return PayloadPool(users=data["users"], score=[s.encode() for s in data["score"]],
                       batch=[s.encode() for s in data["batch"]], profile=[s.encode() for s in data["profile"]],
                       bad=[BadRequest(b["name"], b["path"], b["body"].encode(), b["status"], b["field"])
                            for b in data["bad"]],
                       coupon_ids=data["coupon_ids"], max_len=data["max_len"], stats=data["stats"])
