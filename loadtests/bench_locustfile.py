"""Locust user of ``benchmarks/bench_http.py``: one fixed full-size body to one path, nothing else.

Settings (environment, set by the benchmark):
  BENCH_BODY_FILE   the request body (written by the benchmark: ``loadtests.payloads.bench_body``)
  BENCH_PATH        /v1/score or /v1/_noop
  BENCH_USER_RATE   requests/s per user; 0: as fast as the answers come (closed loop, max throughput)
  BENCH_TIMES_FILE  where to write every request's (end time, response time ms, ok) as JSON when locust stops
  BENCH_OPEN_RATE   requests/s of the open-loop user ``OpenLoopBench`` (named on the locust command line)

Two ways to offer load:
- ``Bench``: closed loop, each user sends its next request after the previous answer (with
  BENCH_USER_RATE, paced at that rate). Right for max throughput. At a fixed rate it is a poor latency
  probe: a slow answer delays the client's next request, so the paced users drift into step and
  arrive in bursts (p50 at half load swung from 3 to 13 ms with the number of users), and a stalled
  server is sent less work, which hides the stall ("coordinated omission").
- ``OpenLoopBench``: one scheduler sends requests at evenly spaced times, BENCH_OPEN_RATE per second,
  whether or not earlier ones were answered (each on its own greenlet and connection), and measures
  each response time **from its scheduled send time**, so any lag of the generator or queueing in the
  server counts against the service (as wrk2 does). The latency figures use this one.

Locust's own percentiles are rounded to whole milliseconds; the benchmark computes its figures from
the exact response times recorded here instead.
"""
from __future__ import annotations

import json
import os
import time
from pathlib import Path

import gevent
from locust import FastHttpUser, constant, constant_throughput, events, task

_TIMES: list[tuple[float, float, bool]] = []
_BODY = Path(os.environ["BENCH_BODY_FILE"]).read_bytes() if os.environ.get("BENCH_BODY_FILE") else b""
_RATE = float(os.environ.get("BENCH_USER_RATE", "0"))
_OPEN_RATE = float(os.environ.get("BENCH_OPEN_RATE", "0"))
JSON_HEADERS = {"Content-Type": "application/json"}


@events.request.add_listener
def _record(request_type, name, response_time, response_length, exception=None, context=None, **_kwargs) -> None:
    if context and "scheduled" in context:
        return  # OpenLoopBench records its own time, from the scheduled send
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
        _post(self.client, self.path)


def _post(client, path: str, context: dict | None = None) -> bool:
    with client.post(path, data=_BODY, headers=JSON_HEADERS, name=path, catch_response=True,
                     context=context or {}) as resp:
        if resp.status_code == 200 and (resp.content or b"")[:1] == b"{":
            resp.success()
            return True
        resp.failure(f"expected 200 with a JSON object, got {resp.status_code}: {(resp.content or b'')[:200]!r}")
        return False


class OpenLoopBench(FastHttpUser):
    """Open loop: requests at evenly spaced scheduled times, timed from the schedule (run one user)."""

    path = os.environ.get("BENCH_PATH", "/v1/score")
    concurrency = 256  # connections in flight at most; the sync server closes each after its answer
    connection_timeout = 10.0
    network_timeout = 10.0

    def wait_time(self) -> float:
        return 0.0

    @task
    def schedule(self) -> None:
        if _OPEN_RATE <= 0:
            raise RuntimeError("OpenLoopBench needs BENCH_OPEN_RATE > 0")
        interval = 1.0 / _OPEN_RATE
        due = time.monotonic()
        while True:  # until locust's run time stops this user
            due += interval
            delay = due - time.monotonic()
            if delay > 0:
                gevent.sleep(delay)
            gevent.spawn(self._one, due)

    def _one(self, scheduled: float) -> None:
        try:
            ok = _post(self.client, self.path, {"scheduled": scheduled})
        except Exception:  # noqa: BLE001  (a failed request is a data point; locust logged it)
            ok = False
        # a request still in flight when the run stops (GreenletExit) is not a data point
        end = time.monotonic()
        _TIMES.append((end, (end - scheduled) * 1e3, ok))
