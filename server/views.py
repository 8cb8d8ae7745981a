"""The HTTP endpoints: scoring API (``/v1``), health, metrics and the OpenAPI document.

The views close over the service state instead of looking it up per request, read the raw body and
answer with orjson-encoded bytes (no Flask JSON provider on the hot path).
"""
from __future__ import annotations

import logging
import time
from typing import Any

import orjson
from flask import Blueprint, Response, request

from runtime.features import FeatureError, featurize_one
from runtime.scorer import UnknownCouponError
from server.app import ServiceState
from server.errors import JSON, ApiError, error_response
from server.openapi import openapi_document
from server.validation import BatchRequest, feature_error, parse_batch, parse_json, parse_score

log = logging.getLogger(__name__)

_NUMPY = orjson.OPT_SERIALIZE_NUMPY


def _json(payload: Any, status: int = 200) -> Response:
    return Response(orjson.dumps(payload, option=_NUMPY), status=status, mimetype=JSON)


def _not_ready() -> ApiError:
    return ApiError(503, None, "the model is not loaded yet; retry shortly (see GET /v2/health/ready)")


def make_api_blueprint(state: ServiceState) -> Blueprint:
    api = Blueprint("api", __name__)
    metrics = state.metrics
    limits = state.limits
    model_version = state.model_version

    def observe(endpoint: str, started: float) -> None:
        if metrics is not None:
            metrics.observe_inference(endpoint, time.perf_counter() - started)

    def scorer_or_503():
        scorer = state.scorer
        if scorer is None:
            raise _not_ready()
        return scorer

    @api.post("/v1/score")
    def score() -> Response:
        """Rank coupons for one user: ``{user_id, events, candidates?, k?, objective?, now?}``."""
        scorer = scorer_or_503()
        req = parse_score(parse_json(request.get_data(cache=False)), limits)
        started = time.perf_counter()
        try:
            ranked = scorer.score_many([req.user.for_scorer()], k=req.k, objective=req.objective)[0]
        except FeatureError as exc:
            raise feature_error(exc) from None
        except UnknownCouponError as exc:
            raise ApiError(422, "candidates", str(exc)) from None
        observe("/v1/score", started)
        return _json({"model_version": model_version, "user_id": req.user.user_id, "objective": req.objective,
                      "coupons": ranked})

    @api.post("/v1/score:batch")
    def score_batch() -> Response:
        """Rank coupons for up to ``max_batch`` users in one call: ``{requests: [...], k?, objective?}``."""
        scorer = scorer_or_503()
        req = parse_batch(parse_json(request.get_data(cache=False)), limits)
        started = time.perf_counter()
        try:
            ranked = scorer.score_many([u.for_scorer() for u in req.users], k=req.k, objective=req.objective)
        except FeatureError:
            raise _locate_feature_error(req, scorer.spec) from None
        except UnknownCouponError as exc:
            raise ApiError(422, "requests", str(exc)) from None
        observe("/v1/score:batch", started)
        return _json({"model_version": model_version, "objective": req.objective,
                      "results": [{"user_id": u.user_id, "coupons": r} for u, r in zip(req.users, ranked)]})

    @api.post("/v1/profile")
    def profile() -> Response:
        """The user's profile vector (the encoder's output) for the same body as /v1/score."""
        scorer = scorer_or_503()
        req = parse_score(parse_json(request.get_data(cache=False)), limits)
        started = time.perf_counter()
        try:
            vector = scorer.profile(req.user.events, now=req.user.now)
        except FeatureError as exc:
            raise feature_error(exc) from None
        observe("/v1/profile", started)
        return _json({"model_version": model_version, "user_id": req.user.user_id, "dim": int(vector.shape[0]),
                      "profile": vector})

    @api.get("/v1/model")
    def model() -> Response:
        """The loaded model: version, a summary of its manifest, the catalog and the request limits."""
        return _json(model_summary(state))

    if state.config.bench_endpoints:
        @api.post("/v1/_noop")
        def noop() -> Response:
            """Benchmark baseline: parses the body like /v1/score and answers the same shape and size, no model."""
            body = parse_json(request.get_data(cache=False))
            candidates = body.get("candidates")
            n = len(candidates) if isinstance(candidates, list) and candidates else len(state.noop_coupons)
            k = body.get("k")
            if isinstance(k, int) and k > 0:
                n = min(n, k)
            return _json({"model_version": model_version, "user_id": body.get("user_id"),
                          "objective": body.get("objective") or limits.default_objective,
                          "coupons": [dict(c) for c in state.noop_coupons[:n]]})

    return api


def _locate_feature_error(req: BatchRequest, spec) -> ApiError:
    """Which user of a batch had the malformed event (error path only: featurize each again)."""
    for i, user in enumerate(req.users):
        try:
            featurize_one(user.events, spec, user.now)
        except FeatureError as exc:
            return feature_error(exc, f"requests[{i}].")
    return ApiError(400, "requests", "malformed event")


def model_summary(state: ServiceState) -> dict[str, Any]:
    manifest = state.manifest
    spec = manifest.get("feature_spec", {})
    cfg = state.config
    return {
        "model_version": state.model_version,
        "ready": state.ready,
        "precision": cfg.precision,
        "format": manifest.get("format"),
        "created_at": manifest.get("created_at"),
        "feature_spec": {"max_len": spec.get("max_len"), "n_item_buckets": spec.get("n_item_buckets"),
                         "n_categories": len(spec.get("categories", []))},
        "model_config": manifest.get("model_config", {}),
        "quantization": {k: manifest.get("quantization", {}).get(k) for k in ("method", "weight_type", "size_ratio")},
        "catalog": {"path": cfg.catalog, "size": len(state.catalog), "coupon_ids": state.coupon_ids},
        "policy": None if state.policy is None else {
            "path": cfg.policy, "version": state.policy.version, "objective": state.policy.objective,
            "lambda": state.policy.lam, "model_version": state.policy.model_version},
        "limits": {"max_body_bytes": cfg.max_body_bytes, "max_events": cfg.max_events, "max_batch": cfg.max_batch,
                   "max_candidates": cfg.max_candidates, "max_k": cfg.max_k,
                   "future_tolerance_s": cfg.future_tolerance_s, "default_objective": cfg.default_objective},
    }


def make_ops_blueprint(state: ServiceState) -> Blueprint:
    ops = Blueprint("ops", __name__)
    openapi_body = orjson.dumps(openapi_document(state.config))

    @ops.get("/v2/health/live")
    def live() -> Response:
        """Liveness: the process answers HTTP."""
        return _json({"status": "live"})

    @ops.get("/v2/health/ready")
    def ready() -> Response:
        """Readiness: 200 once the model and catalog are loaded and the warm-up ran, else 503."""
        if state.ready:
            return _json({"status": "ready", "model_version": state.model_version})
        return _json({"status": "loading", "model_version": state.model_version}, 503)

    @ops.get("/metrics")
    def metrics() -> Response:
        """Prometheus exposition, merged over all gunicorn workers."""
        if state.metrics is None:
            return error_response(404, "path", "metrics are disabled (metrics = false)")
        body, content_type = state.metrics.render()
        return Response(body, mimetype=None, content_type=content_type)

    @ops.get("/openapi.json")
    def openapi() -> Response:
        """The OpenAPI 3.1 document of this API."""
        return Response(openapi_body, mimetype=JSON)

    return ops
