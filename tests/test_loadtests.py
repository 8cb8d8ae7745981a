"""The load tests' own parts: payloads the service must accept (or reject exactly as expected) and the gate.

The payload pool is checked against the real app here, in-process, so a body the service rightly refuses
can never again pose as good traffic and fail a load test (the 3 failures of an early CI run were bodies
with an empty user_id, built from the simulator's deliberately dirty rows).
"""
from __future__ import annotations

from pathlib import Path

import orjson
import pytest

from loadtests.payloads import bench_body, build_pool
from loadtests.calibrate import calibration_ms, speed_factor
from loadtests.run import PERCENTILES, evaluate, load_profile, load_reference_ms, scale_server_limits
from runtime.scorer import read_manifest
from server.app import create_app
from server.config import load_config

THRESHOLDS = Path(__file__).resolve().parents[1] / "loadtests" / "thresholds.toml"


@pytest.fixture(scope="module")
def pool(tiny_pipeline):
    max_len = read_manifest(tiny_pipeline.model_dir, verify=False)["feature_spec"]["max_len"]
    return build_pool(tiny_pipeline.data_dir, max_len, n_users=300, n_batches=40)


@pytest.fixture(scope="module")
def client(tiny_pipeline):
    cfg = load_config({"model_dir": str(tiny_pipeline.model_dir), "catalog": str(tiny_pipeline.catalog)}, environ={})
    return create_app(cfg).test_client()


def _post(client, path, body):
    return client.post(path, data=body, content_type="application/json")


def test_every_good_body_of_the_pool_is_answered_200(pool, client):
    assert pool.stats["users"] >= 300 and pool.stats["empty_histories"] > 0  # mixed lengths, from empty
    assert pool.stats["max_events"] > pool.max_len  # and some longer than the model reads (truncated)
    assert all(type(u["user_id"]) is str and 1 <= len(u["user_id"]) <= 256 for u in pool.users)
    for path, bodies in (("/v1/score", pool.score), ("/v1/score:batch", pool.batch), ("/v1/profile", pool.profile)):
        for body in bodies:
            resp = _post(client, path, body)
            assert resp.status_code == 200, (path, body[:200], resp.get_data(as_text=True)[:300])


def test_every_bad_request_of_the_pool_gets_its_expected_error(pool, client):
    names = set()
    for bad in pool.bad:
        resp = _post(client, bad.path, bad.body)
        assert resp.status_code == bad.status, (bad.name, resp.get_data(as_text=True)[:300])
        error = resp.get_json()["error"]
        assert bad.field is None or error["field"].startswith(bad.field), (bad.name, error)
        names.add(bad.name)
    # the classes of the issue are all in the load test's mix
    assert {"malformed_json", "unknown_event_kind", "non_finite_price", "future_timestamp", "too_many_events",
            "oversized_body", "unknown_candidate", "batch_bad_user"} <= names


def test_pool_is_reproducible_and_bench_body_is_full_size(pool, tiny_pipeline, client):
    again = build_pool(tiny_pipeline.data_dir, pool.max_len, n_users=300, n_batches=40)
    assert again.score == pool.score and again.batch == pool.batch
    body = orjson.loads(bench_body(pool))
    assert len(body["events"]) == pool.max_len and body["k"] == 10
    assert _post(client, "/v1/score", bench_body(pool)).status_code == 200


def _stats(p95_score: float, failures: int = 0, requests: int = 2000, rps: float = 100.0) -> dict:
    def row(name, n, p95, fails=0):
        figures = {"50%": p95 / 2, "90%": p95 * 0.9, "95%": p95, "99%": p95 * 1.5}
        return {"Name": name, "Request Count": str(n), "Failure Count": str(fails), "Requests/s": str(rps),
                **{k: str(v) for k, v in figures.items()}}

    return {"Aggregated": row("Aggregated", requests, p95_score, failures), "/v1/score": row("/v1/score", 1400, p95_score),
            "/v1/score:batch": row("/v1/score:batch", 160, p95_score * 2), "/v1/profile": row("/v1/profile", 120, p95_score)}


def _server(cpu_ms: float, mean_ms: float = 1.0) -> dict:
    figures = {"requests": 1400, "mean": mean_ms, "p50": mean_ms, "p95": 2 * mean_ms, "p99": 3 * mean_ms}
    return {"workers": 2, "requests": 2000, "cpu_ms_per_request": cpu_ms, "latency_ms": {"/v1/score": figures}}


@pytest.mark.parametrize("name", ["full", "ci"])
def test_checked_in_thresholds_parse_and_gate(name):
    profile = load_profile(THRESHOLDS, name)
    assert profile["duration_s"] <= 120 and profile["users"] * profile["user_rate"] > 0  # bounded, fixed load
    offered = profile["users"] * profile["user_rate"]
    kind = profile["model"]
    cpu_limit = profile["server_cpu_ms"][kind]

    def gate(stats, server):
        return evaluate(stats, profile, profile["duration_s"], server, kind)

    summary, violations = gate(_stats(1.0, rps=offered), _server(cpu_limit / 2))
    assert violations == [] and summary["error_ratio"] == 0
    assert set(summary["latency_ms"]["/v1/score"]) == set(PERCENTILES) | {"requests"}
    # errors, a slow /v1/score (client side), a throughput shortfall each fail the gate
    assert any("error ratio" in v for v in gate(_stats(1.0, failures=10, rps=offered), _server(cpu_limit / 2))[1])
    assert any(v.startswith("/v1/score:") for v in gate(_stats(10_000.0, rps=offered), _server(cpu_limit / 2))[1])
    assert any("throughput" in v for v in gate(_stats(1.0, rps=offered / 2), _server(cpu_limit / 2))[1])
    # a request path 3x as expensive as the limit's half (the measured figures are below it) fails on CPU
    assert any("CPU ms per request" in v for v in gate(_stats(1.0, rps=offered), _server(cpu_limit / 2 * 3))[1])
    assert any(v.startswith("server /v1/score") for v in gate(_stats(1.0, rps=offered), _server(1.0, 1000.0))[1])
    no_server = {"workers": 2, "requests": 0, "cpu_ms_per_request": None, "latency_ms": {}}
    assert len(gate(_stats(1.0, rps=offered), no_server)[1]) == 2


def test_server_limits_follow_the_machine_speed_and_still_catch_a_slower_request_path():
    profile = load_profile(THRESHOLDS, "ci")
    offered = profile["users"] * profile["user_rate"]
    reference_cpu = profile["server_cpu_ms"]["tiny"]
    reference_p50 = profile["server_latency_ms"]["/v1/score"]["p50"]
    # a machine 3x as slow as the reference: its figures are 3x the reference's, and its limits too
    slow = scale_server_limits(profile, 3.0)
    assert slow["server_cpu_ms"]["tiny"] == pytest.approx(3 * reference_cpu, abs=0.01)
    assert slow["server_latency_ms"]["/v1/score"]["p50"] == pytest.approx(3 * reference_p50, abs=0.01)
    assert slow["latency_ms"] == profile["latency_ms"]  # the client's loose limits stay as written
    assert profile["server_cpu_ms"]["tiny"] == reference_cpu  # the checked-in profile is not changed

    def gate(limits, cpu_ms, p50_ms):
        return evaluate(_stats(1.0, rps=offered), limits, limits["duration_s"], _server(cpu_ms, p50_ms), "tiny")[1]

    usual_cpu, usual_p50 = reference_cpu / 2, reference_p50 / 2  # what the reference machine measures, or less
    assert gate(profile, usual_cpu, usual_p50) == []
    assert gate(slow, 3 * usual_cpu, 3 * usual_p50) == []  # the same code on the slow machine passes there
    at_reference = gate(profile, 3 * usual_cpu, 3 * usual_p50)  # and would fail at the reference's limits
    assert any("CPU ms per request" in v for v in at_reference)
    assert any(v.startswith("server /v1/score: p50") for v in at_reference)
    # a request path 3x as expensive fails on the slow machine too
    assert any("CPU ms per request" in v for v in gate(slow, 9 * usual_cpu, 3 * usual_p50))


def test_calibration_measures_cpu_time_and_its_reference_is_checked(tmp_path):
    samples = calibration_ms(reps=3, rounds=2)
    assert len(samples) == 3 and all(s > 0 for s in samples)
    assert speed_factor([1.0, 2.0, 9.0], 0.5) == 4.0  # the median, so one slow rep does not move it
    assert load_reference_ms(THRESHOLDS) > 0
    with pytest.raises(ValueError, match="has no profile 'calibration'"):
        load_profile(THRESHOLDS, "calibration")
    text = THRESHOLDS.read_text()
    for broken, message in ((text.replace("reference_ms =", "reference_msec =", 1), "exactly one key"),
                            (text.replace("[calibration]", "[calibrated]", 1), "needs a \\[calibration\\] table")):
        bad = tmp_path / "t.toml"
        bad.write_text(broken)
        with pytest.raises(ValueError, match=message):
            load_reference_ms(bad)
    with pytest.raises(ValueError, match="positive"):
        speed_factor([], 1.0)


def test_thresholds_reject_unknown_keys(tmp_path):
    bad = tmp_path / "t.toml"
    bad.write_text(THRESHOLDS.read_text().replace("max_error_ratio", "max_eror_ratio", 1))
    with pytest.raises(ValueError, match="unknown keys"):
        load_profile(bad, "full")


def _slow_server(delay_s: float):
    """A one-request-at-a-time HTTP server on 127.0.0.1 that answers ``{}`` after ``delay_s``."""
    import http.server
    import threading
    import time

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_POST(self):  # noqa: N802 (http.server's naming)
            self.rfile.read(int(self.headers.get("Content-Length", 0)))
            time.sleep(delay_s)
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", "2")
            self.end_headers()
            self.wfile.write(b"{}")

        def log_message(self, *args):
            pass

    class Server(http.server.HTTPServer):
        request_queue_size = 256  # queue in the server, not as dropped SYNs

    server = Server(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


def _bench_times(tmp_path, url: str, user_class: str, env_extra: dict) -> list[float]:
    import json
    import os
    import subprocess
    import sys

    (tmp_path / "body.json").write_bytes(b'{"user_id": "u1", "events": []}')
    times = tmp_path / f"times-{user_class}.json"
    env = {**os.environ, "BENCH_BODY_FILE": str(tmp_path / "body.json"), "BENCH_PATH": "/v1/score",
           "BENCH_TIMES_FILE": str(times), **env_extra}
    locustfile = Path(__file__).resolve().parents[1] / "loadtests" / "bench_locustfile.py"
    subprocess.run([sys.executable, "-m", "locust", "-f", str(locustfile), user_class, "--headless", "--host", url,
                    "-u", "1", "-r", "1", "-t", "3s", "--stop-timeout", "1", "--only-summary", "--loglevel", "WARNING"],
                   env=env, capture_output=True, timeout=60, check=True)
    samples = json.loads(times.read_text())
    assert samples and all(ok for _, _, ok in samples)
    return sorted(ms for _, ms, _ in samples)


def test_open_loop_generator_times_from_the_schedule_so_queueing_counts(tmp_path):
    """The latency figures of bench-http: offered 40 req/s to a server that manages 20, the open-loop
    user keeps sending on schedule and its response times grow with the queue, where a closed-loop
    client only ever sees the 50 ms of one request (and so would call the overloaded server healthy)."""
    server = _slow_server(0.05)
    url = f"http://127.0.0.1:{server.server_address[1]}"
    try:
        closed = _bench_times(tmp_path, url, "Bench", {"BENCH_USER_RATE": "0"})
        opened = _bench_times(tmp_path, url, "OpenLoopBench", {"BENCH_OPEN_RATE": "40"})
    finally:
        server.shutdown()
        server.server_close()
    closed_p90, open_p90 = closed[int(0.9 * len(closed))], opened[int(0.9 * len(opened))]
    assert 45 <= closed_p90 < 200  # one request's own time
    assert open_p90 > 4 * closed_p90  # the queue of the overload shows
    assert opened[-1] > 500  # about 1.5 s of backlog by the end of a 3 s run at twice the capacity
