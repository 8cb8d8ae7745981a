"""The HTTP service through its app factory (Flask test client) and, once, as the real gunicorn server.

Every endpoint, every class of bad input (each must get a 4xx JSON error naming the field, never a 500),
the Prometheus metrics, and the OpenAPI document: real responses are validated against the document the
service serves, so the document cannot drift from the code.
"""
from __future__ import annotations

import math
import os
import random
import re
import socket
import subprocess
import sys
import textwrap
import threading
import time
import urllib.request
from pathlib import Path

import numpy as np
import orjson
import pytest
from jsonschema import Draft202012Validator
from prometheus_client.parser import text_string_to_metric_families
from referencing import Registry, Resource
from referencing.jsonschema import DRAFT202012

from runtime.scorer import Scorer, read_manifest
from server.app import create_app, load_model
from server.config import ConfigError, ServerConfig, load_config

NOW = 1_700_000_000  # decision time of the test requests (unix seconds, in the past)
DOC_URI = "urn:edgecoupon:openapi"


def make_app(tiny, **overrides):
    """An app from defaults + overrides only: the developer's EDGECOUPON_* variables do not leak in."""
    values = {"model_dir": str(tiny.model_dir), "catalog": str(tiny.catalog), **overrides}
    return create_app(load_config(values, environ={}))


def event(i: int = 0, **changes):
    base = {"ts": NOW - 3600 * (i + 1), "event": ("view", "cart", "purchase")[i % 3], "item_id": f"item_{i:05d}",
            "category": f"cat_{i % 30:03d}", "price": 5.0 + i}
    return {**base, **changes}


def history(n: int):
    return [event(i) for i in range(n)]


def post(client, path, body, **kwargs):
    data = body if isinstance(body, bytes) else orjson.dumps(body)
    return client.post(path, data=data, content_type="application/json", **kwargs)


@pytest.fixture(scope="module")
def app(tiny_pipeline):
    return make_app(tiny_pipeline, bench_endpoints=True)


@pytest.fixture(scope="module")
def client(app):
    return app.test_client()


@pytest.fixture(scope="module")
def catalog_ids(client):
    return client.get("/v1/model").get_json()["catalog"]["coupon_ids"]


@pytest.fixture(scope="module")
def scorer(tiny_pipeline):
    return Scorer(tiny_pipeline.model_dir, tiny_pipeline.catalog)


@pytest.fixture(scope="module")
def max_len(tiny_pipeline):
    return read_manifest(tiny_pipeline.model_dir, verify=False)["feature_spec"]["max_len"]


# ---------------------------------------------------------------------------------------- OpenAPI


@pytest.fixture(scope="module")
def openapi(client):
    resp = client.get("/openapi.json")
    assert resp.status_code == 200 and resp.mimetype == "application/json"
    return resp.get_json()


@pytest.fixture(scope="module")
def conform(openapi):
    """conform(path, method, status, body): validate a body against the served document."""
    registry = Registry().with_resource(DOC_URI, Resource.from_contents(openapi, default_specification=DRAFT202012))

    def pointer(*parts):
        return "/".join(str(p).replace("~", "~0").replace("/", "~1") for p in parts)

    def check(path, method, status, body, what="responses"):
        operation = openapi["paths"][path][method]
        if what == "request":
            ref = pointer("paths", path, method, "requestBody", "content", "application/json", "schema")
        else:
            assert str(status) in operation["responses"], f"{method.upper()} {path}: status {status} is not documented"
            ref = pointer("paths", path, method, "responses", str(status), "content", "application/json", "schema")
        Draft202012Validator({"$ref": f"{DOC_URI}#/{ref}"}, registry=registry).validate(body)

    return check


def test_openapi_document_is_valid_and_lists_every_route(app, openapi):
    from openapi_spec_validator import validate

    validate(openapi)  # a valid OpenAPI 3.1 document
    assert openapi["openapi"].startswith("3.1")
    # Flask's /<name> path parameters are OpenAPI's /{name}
    routes = {re.sub(r"<(?:\w+:)?(\w+)>", r"{\1}", rule.rule) for rule in app.url_map.iter_rules()
              if rule.endpoint != "static"}
    documented = set(openapi["paths"])
    assert routes - {"/v1/_noop"} == documented  # the no-op benchmark endpoint is not part of the API
    limits = openapi["components"]["schemas"]["ScoreRequest"]["properties"]
    assert limits["events"]["maxItems"] == ServerConfig().max_events  # limits come from the running config


def test_real_responses_conform_to_the_served_document(client, conform, catalog_ids):
    """Every endpoint's real answer, good and bad, validates against /openapi.json."""
    good = {"user_id": "u1", "events": history(5), "now": NOW, "candidates": catalog_ids[:3], "k": 2,
            "objective": "p_buy"}
    batch = {"requests": [{"user_id": "u1", "events": history(3), "now": NOW}, {"user_id": 7, "events": []}],
             "k": 3}
    conform("/v1/score", "post", None, good, what="request")
    conform("/v1/score:batch", "post", None, batch, what="request")
    checked = 0
    for path, body in (("/v1/score", good), ("/v1/score:batch", batch), ("/v1/profile",
                                                                         {"user_id": "u1", "events": history(4)}),
                       ("/v1/score", {"user_id": "u1", "events": [event(0, price="NaN")]}),
                       ("/v1/score", {"user_id": "u1", "events": [], "candidates": ["nope"]}),
                       ("/v1/score", {"user_id": "u1", "events": [event()] * 1001}),
                       ("/v1/score:batch", {"requests": []}), ("/v1/profile", b"{")):
        resp = post(client, path, body)
        conform(path, "post", resp.status_code, resp.get_json())
        checked += 1
    for path in ("/v1/model", "/v2/health/live", "/v2/health/ready", "/openapi.json"):
        resp = client.get(path)
        assert resp.status_code == 200
        conform(path, "get", 200, resp.get_json())
        checked += 1
    assert checked == 12


# ---------------------------------------------------------------------------------------- scoring


def test_score_ranks_the_whole_catalog_like_the_scorer(client, scorer, catalog_ids, tiny_pipeline):
    events = history(8)
    resp = post(client, "/v1/score", {"user_id": "u1", "events": events, "now": NOW})
    assert resp.status_code == 200 and resp.mimetype == "application/json"
    body = resp.get_json()
    assert body["model_version"] == read_manifest(tiny_pipeline.model_dir, verify=False)["model_version"]
    assert body["user_id"] == "u1" and body["objective"] == "uplift"
    coupons = body["coupons"]
    assert sorted(c["coupon_id"] for c in coupons) == sorted(catalog_ids)
    scores = [c["score"] for c in coupons]
    assert scores == sorted(scores, reverse=True)  # best first
    for c in coupons:
        assert c["score"] == c["uplift"]
        assert c["uplift"] == pytest.approx(c["p_buy"] - c["p_buy_control"], abs=1e-6)
        assert 0.0 <= c["p_redeem"] <= 1.0 and 0.0 <= c["p_buy"] <= 1.0
    direct = scorer.score(events, now=NOW)
    assert [c["coupon_id"] for c in coupons] == [c["coupon_id"] for c in direct]
    np.testing.assert_allclose(scores, [c["score"] for c in direct], atol=1e-6)


@pytest.mark.parametrize("objective", ["uplift", "p_redeem", "p_buy"])
def test_score_candidates_k_and_objective(client, catalog_ids, objective):
    candidates = catalog_ids[:5]
    resp = post(client, "/v1/score", {"user_id": 42, "events": history(6), "now": NOW, "candidates": candidates,
                                      "k": 3, "objective": objective})
    assert resp.status_code == 200
    body = resp.get_json()
    assert body["user_id"] == 42 and body["objective"] == objective
    coupons = body["coupons"]
    assert len(coupons) == 3 and {c["coupon_id"] for c in coupons} <= set(candidates)
    assert [c["score"] for c in coupons] == [c[objective] for c in coupons]
    assert [c["score"] for c in coupons] == sorted((c["score"] for c in coupons), reverse=True)


def test_empty_history_is_a_valid_request(client, catalog_ids):
    for path in ("/v1/score", "/v1/profile"):
        resp = post(client, path, {"user_id": "new-user", "events": []})
        assert resp.status_code == 200, resp.get_data(as_text=True)
    assert len(post(client, "/v1/score", {"user_id": "new", "events": []}).get_json()["coupons"]) == len(catalog_ids)


def test_history_longer_than_max_len_is_truncated_to_the_most_recent(client, max_len):
    """Past the model's max_len the oldest events are dropped (not an error); past max_events it is a 413."""
    events = history(3 * max_len)  # event(0) is the most recent
    full = post(client, "/v1/score", {"user_id": "u", "events": events, "now": NOW}).get_json()
    recent = post(client, "/v1/score", {"user_id": "u", "events": events[:max_len], "now": NOW}).get_json()
    assert full["coupons"] == recent["coupons"]
    older = post(client, "/v1/score", {"user_id": "u", "events": events[max_len:], "now": NOW}).get_json()
    assert older["coupons"] != recent["coupons"]


def test_iso_timestamps_any_order_and_unknown_prices_are_accepted(client):
    events = history(4)
    iso = [dict(e, ts=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(e["ts"]))) for e in events]
    base = post(client, "/v1/score", {"user_id": "u", "events": events, "now": NOW}).get_json()
    assert post(client, "/v1/score", {"user_id": "u", "events": iso, "now": NOW}).get_json() == base
    assert post(client, "/v1/score", {"user_id": "u", "events": events[::-1], "now": NOW}).get_json() == base
    unknown_price = [dict(e, price=None) for e in events]
    assert post(client, "/v1/score", {"user_id": "u", "events": unknown_price, "now": NOW}).status_code == 200


def test_batch_matches_single_requests(client, catalog_ids):
    users = [{"user_id": f"u{i}", "events": history(i * 3), "now": NOW - i * 60} for i in range(5)]
    users[2]["candidates"] = catalog_ids[:2]
    resp = post(client, "/v1/score:batch", {"requests": users, "k": 4, "objective": "p_redeem"})
    assert resp.status_code == 200
    body = resp.get_json()
    assert body["objective"] == "p_redeem" and [r["user_id"] for r in body["results"]] == [u["user_id"] for u in users]
    for user, result in zip(users, body["results"]):
        single = post(client, "/v1/score", {**user, "k": 4, "objective": "p_redeem"}).get_json()["coupons"]
        assert [c["coupon_id"] for c in result["coupons"]] == [c["coupon_id"] for c in single]
        np.testing.assert_allclose([c["score"] for c in result["coupons"]], [c["score"] for c in single], atol=1e-5)
    assert len(body["results"][2]["coupons"]) == 2


def test_profile_is_the_encoder_output(client, scorer, tiny_pipeline):
    events = history(7)
    resp = post(client, "/v1/profile", {"user_id": "u1", "events": events, "now": NOW})
    assert resp.status_code == 200
    body = resp.get_json()
    width = read_manifest(tiny_pipeline.model_dir, verify=False)["model_config"]["width"]
    assert body["dim"] == width == len(body["profile"])
    np.testing.assert_allclose(body["profile"], scorer.profile(events, now=NOW), atol=1e-5)
    other = post(client, "/v1/profile", {"user_id": "u2", "events": history(2), "now": NOW}).get_json()["profile"]
    assert not np.allclose(other, body["profile"])  # a function of the history, not a constant


def test_model_endpoint(client, tiny_pipeline):
    body = client.get("/v1/model").get_json()
    manifest = read_manifest(tiny_pipeline.model_dir, verify=False)
    assert body["model_version"] == manifest["model_version"] and body["ready"] is True
    assert body["precision"] == "int8"
    assert body["feature_spec"]["max_len"] == manifest["feature_spec"]["max_len"]
    with open(tiny_pipeline.catalog) as fh:
        n_coupons = sum(1 for _ in fh) - 1
    assert body["catalog"]["size"] == n_coupons == len(body["catalog"]["coupon_ids"])
    assert body["limits"]["max_events"] == 1000 and body["limits"]["max_batch"] == 64


def test_health_endpoints_and_not_ready_until_loaded(tiny_pipeline, client):
    assert client.get("/v2/health/live").get_json() == {"status": "live"}
    assert client.get("/v2/health/ready").get_json()["status"] == "ready"

    deferred = make_app(tiny_pipeline, load="deferred")
    c = deferred.test_client()
    assert c.get("/v2/health/live").status_code == 200  # alive, not ready
    resp = c.get("/v2/health/ready")
    assert resp.status_code == 503 and resp.get_json()["status"] == "loading"
    resp = post(c, "/v1/score", {"user_id": "u", "events": []})
    assert resp.status_code == 503 and resp.get_json()["error"]["message"].startswith("the model is not loaded")
    assert c.get("/v1/model").get_json()["ready"] is False
    load_model(deferred)  # what gunicorn's post_worker_init does in each worker
    assert c.get("/v2/health/ready").status_code == 200
    assert post(c, "/v1/score", {"user_id": "u", "events": []}).status_code == 200


def test_noop_benchmark_endpoint_is_off_by_default_and_same_size_when_on(tiny_pipeline, client):
    body = {"user_id": "u1", "events": history(10), "now": NOW, "k": 5}
    real, noop = post(client, "/v1/score", body), post(client, "/v1/_noop", body)
    assert noop.status_code == 200 and noop.get_json().keys() == real.get_json().keys()
    assert abs(len(noop.data) - len(real.data)) < 0.1 * len(real.data)
    assert post(client, "/v1/_noop", b"{").status_code == 400  # it parses the body like /v1/score
    plain = make_app(tiny_pipeline).test_client()
    assert post(plain, "/v1/_noop", body).status_code == 404


# ---------------------------------------------------------------------------------------- bad input

HUGE = 1 << 20  # the default max_body_bytes


def _bad_cases():
    ok = {"user_id": "u1", "events": history(2), "now": NOW}

    def score(**changes):
        return {**ok, **changes}

    def with_event(**changes):
        return score(events=[event(0), event(1, **changes)])

    future = time.time() + 86400
    cases = [
        # (id, path, body, status, field)
        ("malformed_json", "/v1/score", b'{"user_id": "u1", "events": [', 400, "body"),
        ("empty_body", "/v1/score", b"", 400, "body"),
        ("not_an_object", "/v1/score", b"[1, 2]", 400, "body"),
        ("invalid_utf8", "/v1/score", b'{"user_id": "\xff", "events": []}', 400, "body"),
        ("nan_literal", "/v1/score", b'{"user_id": "u", "events": [], "now": NaN}', 400, "body"),
        ("overflowing_number", "/v1/score",
         b'{"user_id":"u","events":[{"ts":1,"event":"view","item_id":"a","category":"c","price":1e400}]}', 400, "body"),
        ("deeply_nested", "/v1/score", b"[" * 5000 + b"]" * 5000, 400, "body"),
        ("missing_user_id", "/v1/score", {"events": []}, 400, "user_id"),
        ("empty_user_id", "/v1/score", score(user_id=""), 400, "user_id"),
        ("long_user_id", "/v1/score", score(user_id="x" * 257), 400, "user_id"),
        ("user_id_wrong_type", "/v1/score", score(user_id=["u1"]), 400, "user_id"),
        ("user_id_float", "/v1/score", score(user_id=1.5), 400, "user_id"),
        ("missing_events", "/v1/score", {"user_id": "u1"}, 400, "events"),
        ("events_not_a_list", "/v1/score", score(events={"ts": 1}), 400, "events"),
        ("events_null", "/v1/score", score(events=None), 400, "events"),
        ("event_not_an_object", "/v1/score", score(events=[event(0), "view"]), 400, "events[1]"),
        ("unknown_event_kind", "/v1/score", with_event(event="wishlist"), 400, "events[1].event"),
        ("event_kind_wrong_type", "/v1/score", with_event(event=["view"]), 400, "events[1].event"),
        ("missing_item_id", "/v1/score", score(events=[{"ts": NOW - 5, "event": "view", "category": "c"}]), 400,
         "events[0].item_id"),
        ("category_wrong_type", "/v1/score", with_event(category={"a": 1}), 400, "events[1].category"),
        ("price_nan", "/v1/score", with_event(price="NaN"), 400, "events[1].price"),
        ("price_inf", "/v1/score", with_event(price="inf"), 400, "events[1].price"),
        ("price_negative", "/v1/score", with_event(price=-3), 400, "events[1].price"),
        ("price_wrong_type", "/v1/score", with_event(price=[1]), 400, "events[1].price"),
        ("price_boolean", "/v1/score", with_event(price=True), 400, "events[1].price"),
        ("ts_missing", "/v1/score", score(events=[{"event": "view", "item_id": "a", "category": "c"}]), 400,
         "events[0].ts"),
        ("ts_null", "/v1/score", with_event(ts=None), 400, "events[1].ts"),
        ("ts_garbage", "/v1/score", with_event(ts="yesterday"), 400, "events[1].ts"),
        ("ts_negative", "/v1/score", with_event(ts=-1), 400, "events[1].ts"),
        ("ts_nan_text", "/v1/score", with_event(ts="nan"), 400, "events[1].ts"),
        ("ts_far_future", "/v1/score", with_event(ts=NOW + 365 * 86400), 400, "events[1].ts"),
        ("ts_milliseconds", "/v1/score", with_event(ts=NOW * 1000), 400, "events[1].ts"),
        ("ts_far_future_iso", "/v1/score", with_event(ts="9999-12-31T23:59:59"), 400, "events[1].ts"),
        ("now_far_future", "/v1/score", score(now=future), 400, "now"),
        ("now_wrong_type", "/v1/score", score(now=[NOW]), 400, "now"),
        ("now_boolean", "/v1/score", score(now=True), 400, "now"),
        ("k_wrong_type", "/v1/score", score(k="3"), 400, "k"),
        ("k_float", "/v1/score", score(k=2.0), 400, "k"),
        ("k_zero", "/v1/score", score(k=0), 400, "k"),
        ("k_too_large", "/v1/score", score(k=10_000), 400, "k"),
        ("unknown_objective", "/v1/score", score(objective="clicks"), 400, "objective"),
        ("objective_wrong_type", "/v1/score", score(objective={"a": 1}), 400, "objective"),
        ("unknown_field", "/v1/score", score(candidate=["cp01"]), 400, "candidate"),
        ("candidates_not_a_list", "/v1/score", score(candidates="cp01"), 400, "candidates"),
        ("candidates_empty", "/v1/score", score(candidates=[]), 400, "candidates"),
        ("candidate_wrong_type", "/v1/score", score(candidates=[1]), 400, "candidates[0]"),
        ("candidate_unhashable", "/v1/score", score(candidates=[["cp01"]]), 400, "candidates[0]"),
        ("candidate_object", "/v1/score", score(candidates=[{"id": "cp01"}]), 400, "candidates[0]"),
        ("unknown_candidate", "/v1/score", score(candidates=["no-such-coupon"]), 422, "candidates[0]"),
        ("too_many_events", "/v1/score", score(events=[event(0)] * 1001), 413, "events"),
        ("too_many_candidates", "/v1/score", score(candidates=["x"] * 1001), 413, "candidates"),
        ("oversized_body", "/v1/score", score(user_id="u", events=[event(0)] * (HUGE // 50)), 413, "body"),
        ("profile_bad_event", "/v1/profile", with_event(price="NaN"), 400, "events[1].price"),
        ("profile_malformed", "/v1/profile", b"{", 400, "body"),
        ("profile_unknown_candidate", "/v1/profile", score(candidates=["nope"]), 422, "candidates[0]"),
        ("batch_missing_requests", "/v1/score:batch", {"k": 3}, 400, "requests"),
        ("batch_empty", "/v1/score:batch", {"requests": []}, 400, "requests"),
        ("batch_not_a_list", "/v1/score:batch", {"requests": {"user_id": "u"}}, 400, "requests"),
        ("batch_item_not_an_object", "/v1/score:batch", {"requests": [ok, 3]}, 400, "requests[1]"),
        ("batch_item_unknown_field", "/v1/score:batch", {"requests": [dict(ok, k=3)]}, 400, "requests[0].k"),
        ("batch_bad_user", "/v1/score:batch", {"requests": [ok, dict(ok, user_id=None)]}, 400, "requests[1].user_id"),
        ("batch_bad_event", "/v1/score:batch", {"requests": [ok, with_event(price="inf")]}, 400,
         "requests[1].events[1].price"),
        ("batch_unknown_kind", "/v1/score:batch", {"requests": [ok, ok, with_event(event="x")]}, 400,
         "requests[2].events[1].event"),
        ("batch_unknown_candidate", "/v1/score:batch", {"requests": [dict(ok, candidates=["nope"])]}, 422,
         "requests[0].candidates[0]"),
        ("batch_too_large", "/v1/score:batch", {"requests": [ok] * 65}, 413, "requests"),
        ("batch_bad_k", "/v1/score:batch", {"requests": [ok], "k": -1}, 400, "k"),
        ("batch_unknown_field", "/v1/score:batch", dict(ok), 400, "events"),  # the first unknown one, sorted
    ]
    return [pytest.param(path, body, status, field, id=name) for name, path, body, status, field in cases]


@pytest.mark.parametrize("path,body,status,field", _bad_cases())
def test_bad_input_gets_a_4xx_json_error_naming_the_field(client, conform, path, body, status, field):
    resp = post(client, path, body)
    assert resp.status_code == status, resp.get_data(as_text=True)[:300]
    assert resp.mimetype == "application/json"
    error = resp.get_json()["error"]
    assert error["field"] == field
    assert error["message"] and "Traceback" not in error["message"]
    conform(path, "post", status, resp.get_json())  # and the error is the documented shape


@pytest.mark.parametrize("method,path,status,field", [("get", "/v1/nope", 404, "path"), ("get", "/v1/score", 405, "method"),
                                                      ("post", "/v2/health/live", 405, "method")])
def test_unknown_paths_and_methods_are_json_errors(client, method, path, status, field):
    resp = getattr(client, method)(path)
    assert resp.status_code == status and resp.get_json()["error"]["field"] == field


def test_random_mutations_of_a_good_body_never_yield_a_5xx(client, catalog_ids):
    """A small deterministic fuzz: values of every JSON type in every field of a good request."""
    rng = random.Random(1)
    values = [None, True, False, 0, -1, 1.5, 2 ** 63, 1e308, -1e308, "", "x", "nan", "-inf", "2023-01-01",
              "1e30", [], [1], [[]], {}, {"a": 1}, "\u0000", "é" * 300]
    good = {"user_id": "u1", "events": history(3), "now": NOW, "candidates": catalog_ids[:2], "k": 2,
            "objective": "uplift"}
    statuses = []
    for _ in range(300):
        body = orjson.loads(orjson.dumps(good))
        for _ in range(rng.randint(1, 3)):
            target = body
            if rng.random() < 0.5:
                target = rng.choice(body["events"]) if isinstance(body.get("events"), list) and body["events"] else body
            key = rng.choice(list(target) + ["extra"])
            target[key] = rng.choice(values)
        path = rng.choice(["/v1/score", "/v1/profile", "/v1/score:batch"])
        if path == "/v1/score:batch":
            body = {"requests": [{k: v for k, v in body.items() if k not in ("k", "objective")}], "k": body.get("k")}
        resp = post(client, path, body)
        assert resp.status_code < 500, (path, body, resp.get_data(as_text=True)[:300])
        if resp.status_code >= 400:
            assert resp.get_json()["error"]["field"], (path, body, resp.get_data(as_text=True)[:300])
        statuses.append(resp.status_code)
    assert 200 in statuses and 400 in statuses  # both kinds were exercised


# ---------------------------------------------------------------------------------------- metrics


def _samples(text: str) -> dict[tuple, float]:
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def _value(samples, name, **labels):
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def test_metrics_count_requests_latency_inference_and_model_version(tiny_pipeline):
    app = make_app(tiny_pipeline)  # its own registry: counts start at zero
    c = app.test_client()
    for _ in range(3):
        assert post(c, "/v1/score", {"user_id": "u", "events": history(2), "now": NOW}).status_code == 200
    assert post(c, "/v1/score", {"user_id": "u", "events": "nope"}).status_code == 400
    assert post(c, "/v1/score:batch", {"requests": [{"user_id": "u", "events": []}]}).status_code == 200
    assert c.get("/nowhere").status_code == 404
    resp = c.get("/metrics")
    assert resp.status_code == 200 and resp.content_type.startswith("text/plain")
    s = _samples(resp.get_data(as_text=True))
    version = read_manifest(tiny_pipeline.model_dir, verify=False)["model_version"]
    req = "edgecoupon_http_requests_total"
    assert _value(s, req, endpoint="/v1/score", method="POST", status="200") == 3
    assert _value(s, req, endpoint="/v1/score", method="POST", status="400") == 1
    assert _value(s, req, endpoint="/v1/score:batch", method="POST", status="200") == 1
    assert _value(s, req, endpoint="other", method="GET", status="404") == 1  # unknown paths share one label
    hist = "edgecoupon_http_request_duration_seconds"
    assert _value(s, hist + "_count", endpoint="/v1/score", method="POST", status="200") == 3
    assert _value(s, hist + "_bucket", endpoint="/v1/score", method="POST", status="200", le="+Inf") == 3
    assert 0 < _value(s, hist + "_sum", endpoint="/v1/score", method="POST", status="200") < 3
    # the inference histogram counts scorer calls only (the 400 never reached the model)
    assert _value(s, "edgecoupon_inference_duration_seconds_count", endpoint="/v1/score") == 3
    assert _value(s, "edgecoupon_inference_duration_seconds_count", endpoint="/v1/score:batch") == 1
    assert _value(s, "edgecoupon_model_info", model_version=version, precision="int8") == 1
    assert not any(name.endswith("_created") for name, _ in s)


def test_metrics_can_be_disabled(tiny_pipeline):
    c = make_app(tiny_pipeline, metrics=False).test_client()
    resp = c.get("/metrics")
    assert resp.status_code == 404 and resp.get_json()["error"]["field"] == "path"


# ---------------------------------------------------------------------------------------- config


def test_config_layers_defaults_toml_environment_overrides(tmp_path):
    toml = tmp_path / "service.toml"
    toml.write_text('max_batch = 8\nmax_events = 100\nprecision = "fp32"\n')
    env = {"EDGECOUPON_CONFIG": str(toml), "EDGECOUPON_MAX_EVENTS": "200", "EDGECOUPON_METRICS": "false"}
    cfg = load_config({"max_k": 5}, environ=env)
    assert (cfg.max_batch, cfg.max_events, cfg.precision, cfg.metrics, cfg.max_k) == (8, 200, "fp32", False, 5)
    assert load_config(environ={}).max_batch == ServerConfig().max_batch
    for bad_env in ({"EDGECOUPON_MAX_EVNTS": "1"}, {"EDGECOUPON_MAX_EVENTS": "many"}, {"EDGECOUPON_THREADS": "0"},
                    {"EDGECOUPON_PRECISION": "int4"}, {"EDGECOUPON_CONFIG": str(tmp_path / "missing.toml")}):
        with pytest.raises(ConfigError):
            load_config(environ=bad_env)
    toml.write_text("[server]\nmax_batch = 8\n")
    with pytest.raises(ConfigError, match="tables"):
        load_config(environ={"EDGECOUPON_CONFIG": str(toml)})


def test_limits_come_from_the_config(tiny_pipeline):
    c = make_app(tiny_pipeline, max_events=5, max_batch=2, max_body_bytes=4096).test_client()
    assert post(c, "/v1/score", {"user_id": "u", "events": history(6)}).status_code == 413
    assert post(c, "/v1/score", {"user_id": "u", "events": history(5), "now": NOW}).status_code == 200
    assert post(c, "/v1/score:batch", {"requests": [{"user_id": "u", "events": []}] * 3}).status_code == 413
    resp = post(c, "/v1/score", {"user_id": "u" * 200, "events": [], "pad": "x" * 5000})
    assert resp.status_code == 413 and resp.get_json()["error"]["field"] == "body"
    assert c.get("/openapi.json").get_json()["components"]["schemas"]["ScoreRequest"]["properties"]["events"][
        "maxItems"] == 5


# -------------------------------------------------------------------------------- budget policy


def test_profit_objective_applies_the_policy_file_and_may_answer_no_coupon(tiny_pipeline, tmp_path, conform):
    """The policy the allocation solver writes is what /v1/score's objective "profit" applies: the same
    ranking as the runtime scorer with that policy; a threshold no coupon clears answers "no coupon"."""
    from runtime.allocation import make_policy, save_policy

    ids = Scorer(tiny_pipeline.model_dir, tiny_pipeline.catalog).coupon_ids
    order_value = {"method": "history", "scale": 1.3, "default": 31.0}
    policy = save_policy(make_policy(0.3, ids, margin=0.3, order_value=order_value, version="p-test"),
                         tmp_path / "policy.json")
    client = make_app(tiny_pipeline, policy=str(policy)).test_client()
    body = {"user_id": "u1", "events": history(12), "now": NOW, "objective": "profit"}
    resp = post(client, "/v1/score", body)
    assert resp.status_code == 200, resp.get_json()
    conform("/v1/score", "post", 200, resp.get_json())
    got = resp.get_json()["coupons"]
    expected = Scorer(tiny_pipeline.model_dir, tiny_pipeline.catalog, policy=policy).score(
        history(12), now=NOW, objective="profit")
    assert [c["coupon_id"] for c in got] == [c["coupon_id"] for c in expected]
    assert [c["score"] for c in got] == pytest.approx([c["score"] for c in expected], abs=1e-9)
    assert all(c["score"] > 0 for c in got)  # only coupons worth their cost at the multiplier
    assert client.get("/v1/model").get_json()["policy"]["version"] == "p-test"

    stingy = save_policy(make_policy(0.3, ids, margin=0.3, order_value=order_value, min_value_threshold=1e6,
                                     version="p-none"), tmp_path / "stingy.json")
    resp = post(make_app(tiny_pipeline, policy=str(stingy)).test_client(), "/v1/score", body)
    assert resp.status_code == 200 and resp.get_json()["coupons"] == []  # "no coupon"


def test_profit_without_a_policy_is_a_400_and_a_bad_policy_fails_the_start(tiny_pipeline, client, tmp_path):
    from runtime.allocation import PolicyError

    resp = post(client, "/v1/score", {"user_id": "u1", "events": [], "objective": "profit"})
    assert resp.status_code == 400 and resp.get_json()["error"]["field"] == "objective"
    assert "policy" in resp.get_json()["error"]["message"]
    bad = tmp_path / "policy.json"
    bad.write_text('{"format": "edgecoupon-policy/1", "lambda": -1}')
    with pytest.raises(PolicyError):
        make_app(tiny_pipeline, policy=str(bad))
    with pytest.raises(ConfigError, match="policy"):
        make_app(tiny_pipeline, default_objective="profit")


def test_a_broken_model_directory_fails_the_start(tiny_pipeline, tmp_path):
    import shutil

    from runtime.scorer import ModelIntegrityError

    broken = tmp_path / "model"
    shutil.copytree(tiny_pipeline.model_dir, broken)
    with open(broken / "model.onnx", "ab") as fh:
        fh.write(b"tampered")
    with pytest.raises(ModelIntegrityError, match="sha256"):
        make_app(tiny_pipeline, model_dir=str(broken))


def test_server_imports_and_serves_without_torch(tiny_pipeline, tmp_path):
    code = textwrap.dedent(f"""
        import sys
        class BlockTorch:
            def find_spec(self, name, path=None, target=None):
                if name == "torch" or name.startswith("torch."):
                    raise ImportError("torch is blocked in this test")
                return None
        sys.meta_path.insert(0, BlockTorch())
        import server.views, server.launcher, server.gunicorn_conf, server.wsgi
        app = server.wsgi.app
        server.app.load_model(app)
        resp = app.test_client().post("/v1/score", json={{"user_id": "u", "events": []}})
        assert resp.status_code == 200, resp.get_data()
        assert not any(m == "torch" or m.startswith("torch.") for m in sys.modules)
        print("ok")
    """)
    env = {k: v for k, v in os.environ.items() if not k.startswith("EDGECOUPON_")}
    env.update({"EDGECOUPON_MODEL_DIR": str(tiny_pipeline.model_dir), "EDGECOUPON_CATALOG": str(tiny_pipeline.catalog)})
    env["PROMETHEUS_MULTIPROC_DIR"] = str(tmp_path)  # the gunicorn config would otherwise make a temporary one
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=env,
                            cwd=Path(__file__).resolve().parents[1])
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip().endswith("ok")


# ---------------------------------------------------------------------------------------- real gunicorn


def _worker_pids(metrics_dir: Path) -> set[int]:
    return {int(p.stem.rsplit("_", 1)[1]) for p in metrics_dir.glob("counter_*.db")}


def test_real_gunicorn_two_workers_merged_metrics(tiny_pipeline, tmp_path):
    """The real server (python -m server: gunicorn + the checked-in config), 2 workers on 127.0.0.1."""
    from server.launcher import ServerProcess, http_json

    metrics_dir = tmp_path / "metrics"
    body = orjson.dumps({"user_id": "u", "events": history(5), "now": NOW})
    sent = 0
    errors: list[str] = []
    lock = threading.Lock()
    with ServerProcess(tiny_pipeline.model_dir, tiny_pipeline.catalog, workers=2,
                       env={"PROMETHEUS_MULTIPROC_DIR": str(metrics_dir)}, ready_timeout=60) as srv:
        assert srv.url.startswith("http://127.0.0.1:")

        def client_loop(n):
            nonlocal sent
            for _ in range(n):
                status, answer = http_json("POST", srv.url + "/v1/score", body, timeout=10)
                with lock:
                    sent += 1
                    if status != 200 or not answer.get("coupons"):
                        errors.append(f"{status}: {answer}")

        deadline = time.monotonic() + 20
        # concurrent clients until both workers have answered (each worker writes its own sample files)
        while len(_worker_pids(metrics_dir)) < 2 and time.monotonic() < deadline:
            threads = [threading.Thread(target=client_loop, args=(10,)) for _ in range(4)]
            for t in threads:
                t.start()
            for t in threads:
                t.join(timeout=30)
        assert not errors, errors[:3]
        pids = _worker_pids(metrics_dir)
        assert len(pids) == 2, f"only {pids} answered"
        status, bad = http_json("POST", srv.url + "/v1/score", b"{", timeout=10)
        assert status == 400 and bad["error"]["field"] == "body"
        # any worker answers /metrics, and each answer is the merged count of both workers
        for _ in range(6):
            with urllib.request.urlopen(srv.url + "/metrics", timeout=10) as resp:
                s = _samples(resp.read().decode())
            assert _value(s, "edgecoupon_http_requests_total", endpoint="/v1/score", method="POST", status="200") == sent
            assert _value(s, "edgecoupon_http_requests_total", endpoint="/v1/score", method="POST", status="400") == 1
            assert _value(s, "edgecoupon_inference_duration_seconds_count", endpoint="/v1/score") == sent
            version = read_manifest(tiny_pipeline.model_dir, verify=False)["model_version"]
            assert _value(s, "edgecoupon_model_info", model_version=version, precision="int8") == 1
        status, doc = http_json("GET", srv.url + "/openapi.json")
        assert status == 200 and "/v1/score" in doc["paths"]
        port, proc = srv.port, srv.proc
    assert proc.poll() is not None  # stopped with the block
    with socket.socket() as sock:
        assert sock.connect_ex(("127.0.0.1", port)) != 0  # nothing listens any more


def test_demo_requests_against_the_real_server(tiny_pipeline, capsys):
    from server.launcher import demo_requests

    answers = demo_requests(tiny_pipeline.model_dir, tiny_pipeline.catalog, tiny_pipeline.data_dir, workers=1)
    printed = capsys.readouterr().out
    *good, malformed = answers
    assert [a["status"] for a in good] == [200] * len(good) and len(good) >= 4
    assert malformed["status"] == 400 and malformed["body"]["error"]["field"] == "events[0].price"
    paths = {a["path"] for a in answers}
    assert {"/v1/score", "/v1/profile", "/v1/score:batch", "/v1/model"} <= paths
    score = next(a for a in answers if a["path"] == "/v1/score")["body"]
    assert score["coupons"] and all(math.isfinite(c["score"]) for c in score["coupons"])
    assert "POST /v1/score -> 200" in printed and score["coupons"][0]["coupon_id"] in printed
    assert "service stopped" in printed
