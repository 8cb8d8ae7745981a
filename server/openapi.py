"""The OpenAPI 3.1 document of the service, served at ``/openapi.json``.

Limits come from the running config, so the document states the limits in force. ``tests/test_server.py``
validates real responses of every endpoint against the schemas here, which keeps the document true.
"""
from __future__ import annotations

from typing import Any

from runtime.features import EVENT_KINDS
from server.config import OBJECTIVES, ServerConfig

REF = "#/components/schemas/"


def _ref(name: str) -> dict[str, str]:
    return {"$ref": REF + name}


def _json_content(schema: dict[str, Any]) -> dict[str, Any]:
    return {"application/json": {"schema": schema}}


def _error(description: str) -> dict[str, Any]:
    return {"description": description, "content": _json_content(_ref("Error"))}


def schemas(config: ServerConfig) -> dict[str, Any]:
    timestamp = {"oneOf": [{"type": "number", "minimum": 0, "description": "unix seconds"},
                           {"type": "string", "description": "ISO-8601 (naive means UTC) or unix seconds as text"}]}
    user_id = {"oneOf": [{"type": "string", "minLength": 1, "maxLength": config.max_user_id_chars},
                         {"type": "integer"}], "description": "the caller's user id, echoed back"}
    events = {"type": "array", "maxItems": config.max_events, "items": _ref("Event"),
              "description": f"the user's recent events, any order; at most {config.max_events} (413 beyond), "
                             f"the model uses the most recent ones (its max_len). [] for a user without history."}
    candidates = {"type": "array", "minItems": 1, "maxItems": config.max_candidates,
                  "items": {"type": "string"},
                  "description": "coupon ids to rank (default: the whole catalog); unknown ids are a 422"}
    k = {"type": "integer", "minimum": 1, "maximum": config.max_k, "description": "return the best k only"}
    objective = {"type": "string", "enum": list(OBJECTIVES), "default": config.default_objective,
                 "description": "what to rank by: uplift = p_buy - p_buy_control; profit applies the service's "
                                "budget policy and lists only coupons worth giving ([] = no coupon)"}
    now = {**timestamp, "description": f"decision time (default: the server clock); events after it are ignored, "
                                       f"events more than {config.future_tolerance_s:g} s after it are a 400"}
    number = {"type": "number"}
    return {
        "Event": {
            "type": "object",
            "required": ["ts", "event", "item_id", "category"],
            "properties": {
                "ts": timestamp,
                "event": {"type": "string", "enum": list(EVENT_KINDS)},
                "item_id": {"type": ["string", "number"], "description": "any scalar, hashed as text"},
                "category": {"type": ["string", "number"],
                             "description": "any scalar; categories the model was not trained on share one id"},
                "price": {"type": ["number", "null"], "minimum": 0, "description": "null: unknown"},
            },
        },
        "ScoreRequest": {
            "type": "object",
            "required": ["user_id", "events"],
            "additionalProperties": False,
            "properties": {"user_id": user_id, "events": events, "candidates": candidates, "k": k,
                           "objective": objective, "now": now},
        },
        "BatchItem": {
            "type": "object",
            "required": ["user_id", "events"],
            "additionalProperties": False,
            "properties": {"user_id": user_id, "events": events, "candidates": candidates, "now": now},
        },
        "BatchRequest": {
            "type": "object",
            "required": ["requests"],
            "additionalProperties": False,
            "properties": {"requests": {"type": "array", "minItems": 1, "maxItems": config.max_batch,
                                        "items": _ref("BatchItem")},
                           "k": k, "objective": objective},
        },
        "CouponScore": {
            "type": "object",
            "required": ["coupon_id", "score", "p_redeem", "p_buy", "p_buy_control", "uplift"],
            "additionalProperties": False,
            "properties": {"coupon_id": {"type": "string"},
                           "score": {**number, "description": "the value of the objective"},
                           "p_redeem": {**number, "minimum": 0, "maximum": 1},
                           "p_buy": {**number, "minimum": 0, "maximum": 1},
                           "p_buy_control": {**number, "minimum": 0, "maximum": 1},
                           "uplift": {**number, "minimum": -1, "maximum": 1},
                           # objective "profit" only: the budget policy's terms (runtime.allocation)
                           "expected_value": {**number, "description": "profit objective: expected incremental "
                                                                       "profit (or purchases) of giving this coupon"},
                           "expected_spend": {**number, "minimum": 0, "description": "p_redeem x coupon cost"},
                           "order_value": {**number, "minimum": 0,
                                           "description": "the order value the policy assumed for this user"}},
        },
        "ScoreResponse": {
            "type": "object",
            "required": ["model_version", "user_id", "objective", "coupons"],
            "additionalProperties": False,
            "properties": {"model_version": {"type": "string"}, "user_id": user_id,
                           "objective": {"type": "string", "enum": list(OBJECTIVES)},
                           "coupons": {"type": "array", "items": _ref("CouponScore"),
                                       "description": "best first"}},
        },
        "BatchResponse": {
            "type": "object",
            "required": ["model_version", "objective", "results"],
            "additionalProperties": False,
            "properties": {
                "model_version": {"type": "string"},
                "objective": {"type": "string", "enum": list(OBJECTIVES)},
                "results": {"type": "array", "description": "one per request, in order",
                            "items": {"type": "object", "required": ["user_id", "coupons"],
                                      "additionalProperties": False,
                                      "properties": {"user_id": user_id,
                                                     "coupons": {"type": "array", "items": _ref("CouponScore")}}}},
            },
        },
        "ProfileResponse": {
            "type": "object",
            "required": ["model_version", "user_id", "dim", "profile"],
            "additionalProperties": False,
            "properties": {"model_version": {"type": "string"}, "user_id": user_id,
                           "dim": {"type": "integer", "minimum": 1},
                           "profile": {"type": "array", "items": number}},
        },
        "ModelInfo": {
            "type": "object",
            "required": ["model_version", "ready", "precision", "feature_spec", "catalog", "limits"],
            "properties": {
                "model_version": {"type": "string"},
                "ready": {"type": "boolean"},
                "precision": {"type": "string", "enum": ["int8", "fp32"]},
                "format": {"type": ["string", "null"]},
                "created_at": {"type": ["string", "null"]},
                "feature_spec": {"type": "object", "required": ["max_len", "n_item_buckets", "n_categories"],
                                 "properties": {"max_len": {"type": "integer"}, "n_item_buckets": {"type": "integer"},
                                                "n_categories": {"type": "integer"}}},
                "model_config": {"type": "object"},
                "quantization": {"type": "object"},
                "catalog": {"type": "object", "required": ["path", "size", "coupon_ids"],
                            "properties": {"path": {"type": "string"}, "size": {"type": "integer", "minimum": 1},
                                           "coupon_ids": {"type": "array", "items": {"type": "string"}}}},
                "limits": {"type": "object"},
            },
        },
        "Health": {
            "type": "object",
            "required": ["status"],
            "properties": {"status": {"type": "string", "enum": ["live", "ready", "loading"]},
                           "model_version": {"type": "string"}},
        },
        **ledger_schemas(user_id, events, timestamp),
        "Error": {
            "type": "object",
            "required": ["error"],
            "additionalProperties": False,
            "properties": {"error": {
                "type": "object",
                "required": ["field", "message"],
                "additionalProperties": False,
                "properties": {
                    "field": {"type": ["string", "null"],
                              "description": "the offending part of the request, e.g. events[3].price, "
                                             "candidates[0], requests[2].events, body, path, method"},
                    "message": {"type": "string"}}}},
        },
    }


def ledger_schemas(user_id: dict[str, Any], events: dict[str, Any], timestamp: dict[str, Any]) -> dict[str, Any]:
    """Schemas of the ledger endpoints (``server.ledger_views``)."""
    number = {"type": "number"}
    money = {"type": "number", "minimum": 0}
    nullable_number = {"type": ["number", "null"]}
    key = {"type": "string", "minLength": 1, "maxLength": 200}
    arm = {"type": "string", "enum": ["holdout", "explore", "policy"]}
    rate = {"type": ["number", "null"], "minimum": 0, "maximum": 1}
    campaign_coupon = {"type": "object", "required": ["coupon_id", "cost", "inventory", "remaining"],
                       "properties": {"coupon_id": {"type": "string"}, "cost": money,
                                      "inventory": {"type": "integer", "minimum": 0},
                                      "remaining": {"type": "integer", "minimum": 0}}}
    return {
        "IssueRequest": {
            "type": "object", "required": ["user_id", "events", "idempotency_key"], "additionalProperties": False,
            "properties": {"user_id": user_id, "events": events,
                           "idempotency_key": {**key, "description": "a retry with the same key (per campaign) "
                                                                     "answers the same decision"},
                           "campaign": {**key, "description": "default: the configured default_campaign"},
                           "now": {**timestamp, "description": "decision time (default: the server clock)"}},
        },
        "IssueResponse": {
            "type": "object", "additionalProperties": False,
            "required": ["decision_id", "campaign", "coupon_id", "arm", "propensity", "model_version",
                         "policy_version", "expires_at", "replayed"],
            "properties": {"decision_id": {"type": "string"}, "campaign": {"type": "string"},
                           "coupon_id": {"type": ["string", "null"], "description": "null: no coupon"},
                           "arm": arm,
                           "propensity": {"type": "number", "exclusiveMinimum": 0, "maximum": 1,
                                          "description": "probability that the logging policy takes this action"},
                           "model_version": {"type": "string"}, "policy_version": {"type": "string"},
                           "expires_at": nullable_number,
                           "replayed": {"type": "boolean", "description": "true: an earlier decision, same key"}},
        },
        "RedeemRequest": {
            "type": "object", "required": ["decision_id", "order_value"], "additionalProperties": False,
            "properties": {"decision_id": {"type": "string"}, "order_value": money,
                           "ts": {**timestamp, "description": "redemption time (default: the server clock)"}},
        },
        "RedeemResponse": {
            "type": "object", "required": ["decision_id", "coupon_id", "campaign_id", "order_value", "cost", "ts"],
            "properties": {"decision_id": {"type": "string"}, "coupon_id": {"type": "string"},
                           "campaign_id": {"type": "string"}, "order_value": money, "cost": money, "ts": number},
        },
        "ConversionRequest": {
            "type": "object", "required": ["user_id", "order_value"], "additionalProperties": False,
            "properties": {"user_id": user_id, "order_value": money, "ts": timestamp, "campaign": key},
        },
        "ConversionResponse": {
            "type": "object", "required": ["conversion_id", "user_id", "campaign_id", "decision_id", "attributed"],
            "properties": {"conversion_id": {"type": "integer"}, "user_id": {"type": "string"},
                           "campaign_id": {"type": ["string", "null"]}, "decision_id": {"type": ["string", "null"]},
                           "attributed": {"type": "boolean"}},
        },
        "CampaignRequest": {
            "type": "object", "required": ["campaign_id", "budget", "coupons"], "additionalProperties": False,
            "properties": {
                "campaign_id": key, "name": key, "budget": money,
                "holdout_share": {"type": "number", "minimum": 0, "exclusiveMaximum": 1, "default": 0.1},
                "exploration_share": {"type": "number", "minimum": 0, "exclusiveMaximum": 1, "default": 0.05},
                "starts_at": timestamp, "ends_at": timestamp,
                "coupons": {"type": "array", "minItems": 1, "items": {
                    "type": "object", "required": ["coupon_id", "inventory"], "additionalProperties": False,
                    "properties": {"coupon_id": {"type": "string"}, "inventory": {"type": "integer", "minimum": 0},
                                   "cost": {**money, "description": "default: the catalog's cost"}}}}},
        },
        "Campaign": {
            "type": "object", "required": ["campaign_id", "budget", "reserved", "holdout_share", "exploration_share",
                                           "status", "coupons"],
            "properties": {"campaign_id": {"type": "string"}, "name": {"type": "string"}, "budget": money,
                           "reserved": money, "holdout_share": number, "exploration_share": number,
                           "starts_at": nullable_number, "ends_at": nullable_number, "status": {"type": "string"},
                           "created_at": number, "coupons": {"type": "array", "items": campaign_coupon}},
        },
        "CampaignStats": {
            "type": "object",
            "required": ["campaign_id", "budget", "reserved", "spend", "budget_left", "coupons", "arms", "incremental"],
            "properties": {
                "campaign_id": {"type": "string"}, "status": {"type": "string"}, "budget": money, "reserved": money,
                "spend": money, "budget_left": number, "holdout_share": number, "exploration_share": number,
                "coupons": {"type": "array", "items": {
                    "type": "object",
                    "required": ["coupon_id", "issued", "redeemed", "redemption_rate", "spend", "inventory",
                                 "inventory_left"],
                    "properties": {"coupon_id": {"type": "string"}, "cost": money,
                                   "issued": {"type": "integer", "minimum": 0},
                                   "redeemed": {"type": "integer", "minimum": 0}, "redemption_rate": rate,
                                   "spend": money, "inventory": {"type": "integer", "minimum": 0},
                                   "inventory_left": {"type": "integer", "minimum": 0}}}},
                "arms": {"type": "object", "additionalProperties": {
                    "type": "object", "required": ["decisions", "with_coupon", "conversions", "conversion_rate"],
                    "properties": {"decisions": {"type": "integer"}, "with_coupon": {"type": "integer"},
                                   "conversions": {"type": "integer"}, "conversion_rate": rate}}},
                "incremental": {
                    "type": "object", "required": ["effect", "ci95"],
                    "description": "conversion rate of treated (not holdout) minus holdout, 95% Wald interval",
                    "properties": {"treated_decisions": {"type": "integer"}, "holdout_decisions": {"type": "integer"},
                                   "treated_rate": rate, "holdout_rate": rate, "effect": nullable_number,
                                   "ci95": {"type": ["array", "null"], "items": number, "minItems": 2, "maxItems": 2},
                                   "method": {"type": "string"}}},
            },
        },
    }


def _ledger_paths() -> dict[str, Any]:
    def op(summary: str, request_schema: str | None, ok: str, ok_schema: str, errors: dict[str, str],
           method: str = "post", admin: bool = False) -> dict[str, Any]:
        operation: dict[str, Any] = {"summary": summary, "responses": {
            ok: {"description": "OK", "content": _json_content(_ref(ok_schema))},
            **{code: _error(text) for code, text in errors.items()},
            "503": _error("the ledger is disabled (no ledger_url) or busy; the model is not loaded yet")}}
        if request_schema:
            operation["requestBody"] = {"required": True, "content": _json_content(_ref(request_schema))}
        if admin:
            operation["security"] = [{"adminToken": []}]
        return {method: operation}

    bad = "malformed request: the error names the field"
    return {
        "/v1/issue": op("Decide, reserve and record a coupon for one user", "IssueRequest", "200", "IssueResponse",
                        {"400": bad, "404": "unknown campaign", "409": "campaign not active, or the idempotency "
                                                                        "key was used for another user",
                         "413": "too many events", "422": "unknown coupon"}),
        "/v1/redeem": op("Redeem a decision's coupon (exactly once)", "RedeemRequest", "200", "RedeemResponse",
                         {"400": bad, "404": "unknown decision", "409": "already redeemed",
                          "410": "the coupon expired", "422": "the decision gave no coupon (holdout or none)"}),
        "/v1/conversions": op("Record a purchase for attribution", "ConversionRequest", "201", "ConversionResponse",
                              {"400": bad, "404": "unknown campaign"}),
        "/v1/campaigns/{campaign_id}/stats": {"get": {
            **op("A campaign's figures and measured incremental effect", None, "200", "CampaignStats",
                 {"404": "unknown campaign"}, method="get")["get"],
            "parameters": [{"name": "campaign_id", "in": "path", "required": True, "schema": {"type": "string"}}]}},
        "/v1/admin/campaigns": op("Create a campaign (admin token)", "CampaignRequest", "201", "Campaign",
                                  {"400": bad, "401": "missing or wrong bearer token",
                                   "403": "the admin API is disabled (no admin_token)",
                                   "409": "the campaign exists", "422": "a coupon is not in the catalog"},
                                  admin=True),
    }


def openapi_document(config: ServerConfig) -> dict[str, Any]:
    bad = _error("malformed request: the error names the field")
    too_large = _error(f"body over {config.max_body_bytes} bytes, over {config.max_events} events, "
                       f"{config.max_candidates} candidates or {config.max_batch} users")
    unknown = _error("a candidate coupon is not in the catalog")
    not_ready = _error("the model is not loaded yet")
    scoring_errors = {"400": bad, "413": too_large, "422": unknown, "503": not_ready}

    def post(summary: str, request_schema: str, response_schema: str, description: str) -> dict[str, Any]:
        return {"post": {
            "summary": summary, "description": description,
            "requestBody": {"required": True, "content": _json_content(_ref(request_schema))},
            "responses": {"200": {"description": "OK", "content": _json_content(_ref(response_schema))},
                          **scoring_errors},
        }}

    def get(summary: str, responses: dict[str, Any]) -> dict[str, Any]:
        return {"get": {"summary": summary, "responses": responses}}

    return {
        "openapi": "3.1.0",
        "info": {"title": "EdgeCoupon scoring service", "version": "1",
                 "description": "Stateless coupon scoring: the caller sends the user's recent events, the service "
                                "ranks coupons by predicted uplift (or redemption / purchase probability). "
                                "Every error is {\"error\": {\"field\", \"message\"}}."},
        "paths": {
            "/v1/score": post("Rank coupons for one user", "ScoreRequest", "ScoreResponse",
                              "Scores the user against the candidates (default: the whole catalog), best first."),
            "/v1/score:batch": post("Rank coupons for many users", "BatchRequest", "BatchResponse",
                                    f"Up to {config.max_batch} users per call; all or nothing: one malformed user "
                                    f"fails the call with a 4xx naming requests[i]."),
            "/v1/profile": post("The user's profile vector", "ScoreRequest", "ProfileResponse",
                                "The encoder's output for the user (for segments, lookalikes). Same body as "
                                "/v1/score; candidates, k and objective are validated and otherwise ignored."),
            **_ledger_paths(),
            "/v1/model": get("The loaded model, catalog and limits",
                             {"200": {"description": "OK", "content": _json_content(_ref("ModelInfo"))}}),
            "/v2/health/live": get("Liveness", {"200": {"description": "the process answers",
                                                        "content": _json_content(_ref("Health"))}}),
            "/v2/health/ready": get("Readiness", {
                "200": {"description": "model and catalog loaded, warm-up done",
                        "content": _json_content(_ref("Health"))},
                "503": {"description": "still loading", "content": _json_content(_ref("Health"))}}),
            "/metrics": get("Prometheus metrics", {"200": {"description": "exposition text format",
                                                           "content": {"text/plain": {"schema": {"type": "string"}}}}}),
            "/openapi.json": get("This document", {"200": {"description": "OpenAPI 3.1",
                                                           "content": _json_content({"type": "object"})}}),
        },
        "components": {"schemas": schemas(config),
                       "securitySchemes": {"adminToken": {"type": "http", "scheme": "bearer",
                                                          "description": "the configured admin_token"}}},
    }
