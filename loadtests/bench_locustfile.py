"""Locust user of ``benchmarks/bench_http.py``: one fixed full-size body to one path, nothing else.

Settings (environment, set by the benchmark):
  BENCH_BODY_FILE   the request body (written by the benchmark: ``loadtests.payloads.bench_body``)
  BENCH_PATH        /v1/score or /v1/_noop
  BENCH_USER_RATE   requests/s per user; 0: as fast as the answers come (closed loop, max throughput)
  BENCH_TIMES_FILE  where to write every request's (end time, response time ms, ok) as JSON when locust stops

Locust's own percentiles are rounded to whole milliseconds; the benchmark computes its figures from
the exact response times recorded here instead.
"""
from __future__ import annotations

import json
import os
import time
from pathlib import Path

from locust import FastHttpUser, constant, constant_throughput, events, task

_TIMES: list[tuple[float, float, bool]] = []
_BODY = Path(os.environ["BENCH_BODY_FILE"]).read_bytes() if os.environ.get("BENCH_BODY_FILE") else b""
_RATE = float(os.environ.get("BENCH_USER_RATE", "0"))
JSON_HEADERS = {"Content-Type": "application/json"}


@events.request.add_listener
def _record(request_type, name, response_time, response_length, exception=None, **_kwargs) -> None:
    _TIMES.append((time.monotonic(), response_time, exception is None))


@events.quitting.add_listener
def _write(environment, **_kwargs) -> None:
    path = os.environ.get("BENCH_TIMES_FILE")
    if path:
        with open(path, "w") as fh:
            json.dump(_TIMES, fh)


class Bench(FastHttpUser):
    path = os.environ.get("BENCH_PATH", "/v1/score")
    wait_time = constant_throughput(_RATE) if _RATE > 0 else constant(0)
    connection_timeout = 10.0
    network_timeout = 10.0

    @task
    def post(self) -> None:
        with self.client.post(self.path, data=_BODY, headers=JSON_HEADERS, name=self.path, catch_response=True) as resp:
            if resp.status_code == 200 and (resp.content or b"")[:1] == b"{":
                resp.success()
            else:
                resp.failure(f"expected 200 with a JSON object, got {resp.status_code}: {(resp.content or b'')[:200]!r}")
