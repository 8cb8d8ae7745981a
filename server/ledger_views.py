"""The ledger endpoints: issue, redeem, conversions, campaign stats, and the admin API (``server.ledger``).

- ``POST /v1/issue`` scores the user against the campaign's coupons, applies the policy (the scorer's
  budget policy, ``objective="profit"``, when one is loaded; else the uplift ranking, coupons with a
  positive predicted uplift only), assigns the arm, reserves inventory and budget and writes the
  decision in one transaction, and only then answers. A retry with the same ``idempotency_key`` (per
  campaign) answers the stored decision (``replayed: true``) and reserves nothing.
- ``POST /v1/redeem`` exactly once per decision; ``POST /v1/conversions`` attributes a purchase to the
  user's latest decision within ``attribution_window_s``.
- ``GET /v1/campaigns/<id>/stats``; ``POST /v1/admin/campaigns`` (bearer ``admin_token``; no token
  configured: the admin API is disabled, 403).

Without ``ledger_url`` every one of these answers 503 naming the setting. Errors are the service's
usual ``{"error": {"field", "message"}}``.
"""
from __future__ import annotations

import hmac
import logging
import math
import time
from typing import Any, Callable, TypeVar

import orjson
from flask import Blueprint, Response, request

from runtime.features import FeatureError, parse_ts
from server.app import ServiceState
from server.errors import JSON, ApiError
from server.ledger import Ledger, LedgerError, LedgerUnavailable
from server.validation import _check_fields, _json_type, feature_error, parse_json, parse_user

log = logging.getLogger(__name__)

ISSUE_FIELDS = frozenset(("user_id", "events", "idempotency_key", "campaign", "now"))
REDEEM_FIELDS = frozenset(("decision_id", "order_value", "ts"))
CONVERSION_FIELDS = frozenset(("user_id", "order_value", "ts", "campaign"))
CAMPAIGN_FIELDS = frozenset(("campaign_id", "name", "budget", "holdout_share", "exploration_share", "starts_at",
                             "ends_at", "coupons"))
COUPON_FIELDS = frozenset(("coupon_id", "inventory", "cost"))
MAX_KEY_CHARS = 200
UPLIFT_POLICY_VERSION = "uplift-positive/1"  # the built-in policy when the scorer has no budget policy

T = TypeVar("T")


def _json(payload: Any, status: int = 200) -> Response:
    return Response(orjson.dumps(payload), status=status, mimetype=JSON)


def _string(body: dict, name: str, max_chars: int = MAX_KEY_CHARS, required: bool = True) -> str | None:
    if name not in body or body[name] is None:
        if required:
            raise ApiError(400, name, "missing")
        return None
    value = body[name]
    if type(value) is not str:
        raise ApiError(400, name, f"expected a string, got {_json_type(value)}")
    if not 1 <= len(value) <= max_chars:
        raise ApiError(400, name, f"must be 1 to {max_chars} characters")
    return value


def _number(body: dict, name: str, minimum: float = 0.0, maximum: float | None = None, required: bool = True,
            default: float | None = None, below: bool = False) -> float | None:
    if name not in body or body[name] is None:
        if required:
            raise ApiError(400, name, "missing")
        return default
    value = body[name]
    if type(value) not in (int, float):
        raise ApiError(400, name, f"expected a number, got {_json_type(value)}")
    value = float(value)
    if not math.isfinite(value) or value < minimum:
        raise ApiError(400, name, f"must be a finite number >= {minimum:g}, got {body[name]!r}")
    if maximum is not None and (value >= maximum if below else value > maximum):
        raise ApiError(400, name, f"must be {'<' if below else '<='} {maximum:g}, got {body[name]!r}")
    return value


def _timestamp(body: dict, name: str, default: float | None, required: bool = False) -> float | None:
    if name not in body or body[name] is None:
        if required:
            raise ApiError(400, name, "missing")
        return default
    try:
        return parse_ts(body[name], name)
    except FeatureError as exc:
        raise ApiError(400, name, str(exc).split(": ", 1)[-1]) from None


def make_ledger_blueprint(state: ServiceState) -> Blueprint:
    bp = Blueprint("ledger", __name__)
    cfg = state.config
    limits = state.limits
    known = set(state.coupon_ids)
    catalog_cost = {c["coupon_id"]: c["cost"] for c in state.catalog}

    def ledger() -> Ledger:
        if state.ledger is None:
            raise ApiError(503, None, "the ledger is disabled: set ledger_url (e.g. sqlite:///data/ledger.db)")
        return state.ledger

    def run(call: Callable[[], T]) -> T:
        """A ledger call; its refusals become JSON errors, a busy or unreachable database a 503."""
        try:
            return call()
        except LedgerUnavailable as exc:  # busy or unreachable, on either backend: nothing was written
            log.warning("ledger unavailable: %s", exc.message)
            raise ApiError(503, None, exc.message) from None
        except LedgerError as exc:
            raise ApiError(exc.status, exc.field, exc.message) from None

    def campaign_of(body: dict) -> str:
        campaign = _string(body, "campaign", required=False) or cfg.default_campaign
        if not campaign:
            raise ApiError(400, "campaign", "missing (and no default_campaign is configured)")
        return campaign

    @bp.post("/v1/issue")
    def issue() -> Response:
        """Decide, reserve and record a coupon for one user: ``{user_id, events, idempotency_key, campaign?, now?}``."""
        led = ledger()
        body = parse_json(request.get_data(cache=False))
        _check_fields(body, ISSUE_FIELDS, "")
        key = _string(body, "idempotency_key")
        campaign_id = campaign_of(body)
        user = parse_user(body, limits, time.time())
        scorer = state.scorer
        if scorer is None:
            raise ApiError(503, None, "the model is not loaded yet; retry shortly (see GET /v2/health/ready)")
        camp = run(lambda: led.campaign(campaign_id))
        if camp is None:
            raise ApiError(404, "campaign", f"unknown campaign {campaign_id!r}")
        candidates = [c["coupon_id"] for c in camp["coupons"] if c["coupon_id"] in known]
        policy = scorer.policy
        ranked: list[str] = []
        if candidates:
            try:
                if policy is not None:
                    scored = scorer.score(user.events, candidates=candidates, now=user.now, objective="profit")
                    ranked = [c["coupon_id"] for c in scored]
                else:
                    scored = scorer.score(user.events, candidates=candidates, now=user.now, objective="uplift")
                    ranked = [c["coupon_id"] for c in scored if c["uplift"] > 0]
            except FeatureError as exc:
                raise feature_error(exc) from None
        policy_version = policy.version if policy is not None and policy.version else (
            "budget-policy" if policy is not None else UPLIFT_POLICY_VERSION)
        decision, replayed = run(lambda: led.issue(campaign_id, key, str(user.user_id), user.now, ranked,
                                                   state.model_version, policy_version, cfg.coupon_ttl_s, known))
        return _json({"decision_id": decision["decision_id"], "campaign": campaign_id,
                      "coupon_id": decision["coupon_id"], "arm": decision["arm"],
                      "propensity": decision["propensity"], "model_version": decision["model_version"],
                      "policy_version": decision["policy_version"], "expires_at": decision["expires_at"],
                      "replayed": replayed})

    @bp.post("/v1/redeem")
    def redeem() -> Response:
        """Redeem a decision's coupon, exactly once: ``{decision_id, order_value, ts?}``."""
        led = ledger()
        body = parse_json(request.get_data(cache=False))
        _check_fields(body, REDEEM_FIELDS, "")
        decision_id = _string(body, "decision_id")
        order_value = _number(body, "order_value")
        ts = _timestamp(body, "ts", time.time())
        return _json(run(lambda: led.redeem(decision_id, order_value, ts)))

    @bp.post("/v1/conversions")
    def conversions() -> Response:
        """A purchase, with or without a coupon: ``{user_id, order_value, ts?, campaign?}``."""
        led = ledger()
        body = parse_json(request.get_data(cache=False))
        _check_fields(body, CONVERSION_FIELDS, "")
        user_id = body.get("user_id")
        if type(user_id) not in (str, int) or (type(user_id) is str and not 1 <= len(user_id) <= limits.max_user_id_chars):
            raise ApiError(400, "user_id", "missing" if user_id is None else
                           f"expected a string of 1 to {limits.max_user_id_chars} characters or an integer")
        order_value = _number(body, "order_value")
        ts = _timestamp(body, "ts", time.time())
        campaign = _string(body, "campaign", required=False) or cfg.default_campaign or None
        answer = run(lambda: led.record_conversion(str(user_id), order_value, ts, campaign, cfg.attribution_window_s))
        return _json(answer, 201)

    @bp.get("/v1/campaigns/<campaign_id>/stats")
    def stats(campaign_id: str) -> Response:
        """Per coupon and per arm figures of a campaign, and its measured incremental effect."""
        led = ledger()
        return _json(run(lambda: led.stats(campaign_id)))

    def require_admin() -> None:
        if not cfg.admin_token:
            raise ApiError(403, None, "the admin API is disabled: no admin_token is configured")
        header = request.headers.get("Authorization", "")
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), cfg.admin_token.encode()):
            raise ApiError(401, "Authorization", "expected the header 'Authorization: Bearer <admin_token>'")

    @bp.post("/v1/admin/campaigns")
    def create_campaign() -> Response:
        """Create a campaign: ``{campaign_id, budget, coupons: [{coupon_id, inventory, cost?}], holdout_share?,
        exploration_share?, starts_at?, ends_at?, name?}`` (admin token)."""
        require_admin()
        led = ledger()
        body = parse_json(request.get_data(cache=False))
        _check_fields(body, CAMPAIGN_FIELDS, "")
        campaign_id = _string(body, "campaign_id")
        name = _string(body, "name", required=False) or ""
        budget = _number(body, "budget")
        holdout = _number(body, "holdout_share", maximum=1.0, below=True, required=False, default=0.1)
        explore = _number(body, "exploration_share", maximum=1.0, below=True, required=False, default=0.05)
        if holdout + explore >= 1.0:
            raise ApiError(400, "exploration_share", f"holdout_share + exploration_share must be < 1, "
                                                     f"got {holdout:g} + {explore:g}")
        starts_at = _timestamp(body, "starts_at", None)
        ends_at = _timestamp(body, "ends_at", None)
        if starts_at is not None and ends_at is not None and ends_at <= starts_at:
            raise ApiError(400, "ends_at", "must be after starts_at")
        coupons = body.get("coupons")
        if type(coupons) is not list or not coupons:
            raise ApiError(400, "coupons", "missing" if coupons is None else "expected a non-empty array of "
                                                                            "{coupon_id, inventory, cost?}")
        parsed, seen = [], set()
        for i, coupon in enumerate(coupons):
            prefix = f"coupons[{i}]"
            if type(coupon) is not dict:
                raise ApiError(400, prefix, f"expected an object, got {_json_type(coupon)}")
            _check_fields(coupon, COUPON_FIELDS, prefix + ".")
            coupon_id = coupon.get("coupon_id")
            if type(coupon_id) is not str:
                raise ApiError(400, prefix + ".coupon_id", "missing" if coupon_id is None else "expected a string")
            if coupon_id not in known:
                raise ApiError(422, prefix + ".coupon_id", f"unknown coupon id {coupon_id!r}: not in the loaded catalog")
            if coupon_id in seen:
                raise ApiError(400, prefix + ".coupon_id", f"coupon {coupon_id!r} is listed twice")
            seen.add(coupon_id)
            inventory = coupon.get("inventory")
            if type(inventory) is not int or inventory < 0:
                raise ApiError(400, prefix + ".inventory", "expected an integer >= 0")
            try:
                cost = _number(coupon, "cost", required=False, default=catalog_cost[coupon_id])
            except ApiError as exc:
                raise ApiError(exc.status, prefix + "." + (exc.field or "cost"), exc.message) from None
            parsed.append({"coupon_id": coupon_id, "inventory": inventory, "cost": float(cost)})
        created = run(lambda: led.create_campaign(campaign_id, budget, parsed, holdout, explore, name, starts_at,
                                                  ends_at))
        log.info("campaign %s created: budget %g, %d coupons", campaign_id, budget, len(parsed))
        return _json(created, 201)

    return bp
