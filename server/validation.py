"""Request validation: a JSON body -> the scorer's request, or an ``ApiError`` naming the field.

The server checks what the featurizer cannot know about (types of the request fields, limits, the
catalog, the clock); event-level checks (event kind, item_id, category, price) are the featurizer's
own, and its ``runtime.FeatureError`` is mapped to the same JSON error (``events[3].price``).

Choices (also in the README's API section):

- ``events``: at most ``max_events`` (1000) per user, 413 beyond; of those, the model uses the most
  recent ``max_len`` (the manifest's), older ones are dropped silently. An empty list is valid.
- ``now``: the decision time; the server clock when absent. Events after ``now`` are ignored (the
  history "as of now"), but an event more than ``future_tolerance_s`` (300 s) after ``now`` is a 400:
  it is a clock or unit bug on the caller's side (milliseconds sent as seconds), not a real event.
  ``now`` itself may not be more than ``future_tolerance_s`` after the server clock.
- ``candidates``: all coupons of the catalog when absent; otherwise a non-empty list of known coupon
  ids (an unknown one is a 422 naming ``candidates[i]``), at most ``max_candidates`` (413 beyond).
- unknown top-level fields are a 400 (a typo such as ``candidate`` must not silently score everything).
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Any

import orjson

from runtime.features import FeatureError, parse_ts
from server.config import OBJECTIVES, ServerConfig
from server.errors import ApiError

SCORE_FIELDS = frozenset(("user_id", "events", "candidates", "k", "objective", "now"))
BATCH_FIELDS = frozenset(("requests", "k", "objective"))
BATCH_ITEM_FIELDS = frozenset(("user_id", "events", "candidates", "now"))


@dataclass(frozen=True)
class Limits:
    """The request limits of a config plus the catalog, in the shape the hot path wants."""

    max_events: int
    max_batch: int
    max_candidates: int
    max_k: int
    max_user_id_chars: int
    future_tolerance_s: float
    default_objective: str
    coupon_ids: frozenset
    has_policy: bool = False  # objective "profit" is served only with a budget policy loaded

    @classmethod
    def from_config(cls, config: ServerConfig, coupon_ids: list[str]) -> "Limits":
        return cls(config.max_events, config.max_batch, config.max_candidates, config.max_k,
                   config.max_user_id_chars, config.future_tolerance_s, config.default_objective,
                   frozenset(coupon_ids), bool(config.policy))


def parse_json(data: bytes) -> dict[str, Any]:
    """The request body as a JSON object."""
    if not data:
        raise ApiError(400, "body", "empty body: expected a JSON object")
    try:
        body = orjson.loads(data)
    except orjson.JSONDecodeError as exc:
        raise ApiError(400, "body", f"malformed JSON: {exc}") from None
    if type(body) is not dict:
        raise ApiError(400, "body", f"expected a JSON object, got {_json_type(body)}")
    return body


def _json_type(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, (int, float)):
        return "number"
    if isinstance(value, str):
        return "string"
    if isinstance(value, list):
        return "array"
    return "object"


def _check_fields(body: dict, allowed: frozenset, prefix: str) -> None:
    if not allowed.issuperset(body):
        unknown = sorted(set(body) - allowed)
        raise ApiError(400, prefix + unknown[0], f"unknown field; expected some of {sorted(allowed)}")


def parse_user_id(body: dict, limits: Limits, prefix: str) -> str | int:
    if "user_id" not in body:
        raise ApiError(400, prefix + "user_id", "missing")
    user_id = body["user_id"]
    if type(user_id) is str:
        if not user_id or len(user_id) > limits.max_user_id_chars:
            raise ApiError(400, prefix + "user_id", f"must be 1 to {limits.max_user_id_chars} characters")
        return user_id
    if type(user_id) is int:
        return user_id
    raise ApiError(400, prefix + "user_id", f"expected a string or an integer, got {_json_type(user_id)}")


def parse_now(body: dict, limits: Limits, server_now: float, prefix: str) -> float:
    value = body.get("now")
    if value is None:
        return server_now
    try:
        now = parse_ts(value, "now")
    except FeatureError as exc:
        raise ApiError(400, prefix + "now", str(exc).split(": ", 1)[-1]) from None
    if now > server_now + limits.future_tolerance_s:
        raise ApiError(400, prefix + "now", f"{now:.0f} is more than {limits.future_tolerance_s:g} s after the "
                                            f"server clock ({server_now:.0f})")
    return now


def parse_events(body: dict, limits: Limits, now: float, prefix: str) -> list:
    """Type, size and time checks; ISO timestamps are replaced by unix seconds in place."""
    if "events" not in body:
        raise ApiError(400, prefix + "events", "missing (send [] for a user without history)")
    events = body["events"]
    if type(events) is not list:
        raise ApiError(400, prefix + "events", f"expected an array, got {_json_type(events)}")
    if len(events) > limits.max_events:
        raise ApiError(413, prefix + "events", f"{len(events)} events, the limit is {limits.max_events}; send the "
                                               f"most recent ones (the model uses the most recent few dozen)")
    latest = now + limits.future_tolerance_s
    for i, event in enumerate(events):
        if type(event) is not dict:
            raise ApiError(400, f"{prefix}events[{i}]", f"expected an object, got {_json_type(event)}")
        ts = event.get("ts")
        kind = type(ts)
        if (kind is int or kind is float) and 0 <= ts <= latest:
            continue  # the common case: unix seconds, in range (NaN fails the comparison)
        if ts is None:
            raise ApiError(400, f"{prefix}events[{i}].ts", "missing" if "ts" not in event else "must not be null")
        try:
            ts = parse_ts(ts, "ts", i)
        except FeatureError as exc:
            raise feature_error(exc, prefix) from None
        if ts > latest:
            raise ApiError(400, f"{prefix}events[{i}].ts",
                           f"{ts:.0f} is more than {limits.future_tolerance_s:g} s after now ({now:.0f}); "
                           f"timestamps are unix seconds or ISO-8601")
        event["ts"] = ts
    return events


def parse_candidates(body: dict, limits: Limits, prefix: str) -> list[str] | None:
    candidates = body.get("candidates")
    if candidates is None:
        return None
    if type(candidates) is not list:
        raise ApiError(400, prefix + "candidates", f"expected an array of coupon ids, got {_json_type(candidates)}")
    if not candidates:
        raise ApiError(400, prefix + "candidates", "must not be empty (omit it to score the whole catalog)")
    if len(candidates) > limits.max_candidates:
        raise ApiError(413, prefix + "candidates", f"{len(candidates)} candidates, the limit is {limits.max_candidates}")
    known = limits.coupon_ids
    for i, coupon_id in enumerate(candidates):
        # the type first: a list or an object is unhashable, and a set lookup on it would raise
        if type(coupon_id) is not str:
            raise ApiError(400, f"{prefix}candidates[{i}]", f"expected a coupon id string, got {_json_type(coupon_id)}")
        if coupon_id not in known:
            unknown = [c for c in candidates if type(c) is str and c not in known]
            raise ApiError(422, f"{prefix}candidates[{i}]",
                           f"unknown coupon id(s) {unknown[:10]!r}: not in the loaded catalog")
    return candidates


def parse_k(body: dict, limits: Limits) -> int | None:
    k = body.get("k")
    if k is None:
        return None
    if type(k) is not int:
        raise ApiError(400, "k", f"expected an integer, got {_json_type(k)}")
    if not 1 <= k <= limits.max_k:
        raise ApiError(400, "k", f"must be between 1 and {limits.max_k}, got {k}")
    return k


def parse_objective(body: dict, limits: Limits) -> str:
    objective = body.get("objective")
    if objective is None:
        return limits.default_objective
    if objective not in OBJECTIVES:
        raise ApiError(400, "objective", f"expected one of {list(OBJECTIVES)}, got {objective!r}")
    if objective == "profit" and not limits.has_policy:
        raise ApiError(400, "objective", "'profit' needs a budget policy and this service has none "
                                         "(its policy setting is empty); use uplift, p_redeem or p_buy")
    return objective


@dataclass
class UserRequest:
    user_id: str | int
    events: list
    candidates: list[str] | None
    now: float

    def for_scorer(self) -> dict[str, Any]:
        return {"events": self.events, "candidates": self.candidates, "now": self.now}


def parse_user(body: dict, limits: Limits, server_now: float, prefix: str = "") -> UserRequest:
    user_id = parse_user_id(body, limits, prefix)
    now = parse_now(body, limits, server_now, prefix)
    events = parse_events(body, limits, now, prefix)
    candidates = parse_candidates(body, limits, prefix)
    return UserRequest(user_id, events, candidates, now)


@dataclass
class ScoreRequest:
    user: UserRequest
    k: int | None
    objective: str


def parse_score(body: dict, limits: Limits) -> ScoreRequest:
    """The body of POST /v1/score (and /v1/profile, which ignores k, objective and candidates)."""
    _check_fields(body, SCORE_FIELDS, "")
    user = parse_user(body, limits, time.time())
    return ScoreRequest(user, parse_k(body, limits), parse_objective(body, limits))


@dataclass
class BatchRequest:
    users: list[UserRequest]
    k: int | None
    objective: str


def parse_batch(body: dict, limits: Limits) -> BatchRequest:
    """The body of POST /v1/score:batch: ``{requests: [{user_id, events, candidates?, now?}], k?, objective?}``."""
    _check_fields(body, BATCH_FIELDS, "")
    if "requests" not in body:
        raise ApiError(400, "requests", "missing")
    items = body["requests"]
    if type(items) is not list:
        raise ApiError(400, "requests", f"expected an array, got {_json_type(items)}")
    if not items:
        raise ApiError(400, "requests", "must not be empty")
    if len(items) > limits.max_batch:
        raise ApiError(413, "requests", f"{len(items)} users, the limit is {limits.max_batch} per call")
    server_now = time.time()
    users = []
    for i, item in enumerate(items):
        prefix = f"requests[{i}]."
        if type(item) is not dict:
            raise ApiError(400, f"requests[{i}]", f"expected an object, got {_json_type(item)}")
        _check_fields(item, BATCH_ITEM_FIELDS, prefix)
        users.append(parse_user(item, limits, server_now, prefix))
    return BatchRequest(users, parse_k(body, limits), parse_objective(body, limits))


def feature_error(exc: FeatureError, prefix: str = "") -> ApiError:
    """A featurizer error -> a 400 naming ``events[i].field`` (behind ``prefix`` in a batch)."""
    field = f"events[{exc.index}].{exc.field}" if exc.index is not None else exc.field
    message = str(exc)
    head = field + ": "
    if message.startswith(head):
        message = message[len(head):]
    return ApiError(400, prefix + field, message)


def finite_or_none(value: float) -> float | None:
    return value if math.isfinite(value) else None
