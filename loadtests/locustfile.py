"""Locust scenario for the scoring service: ``python -m loadtests`` (``make loadtest``) drives it headless.

One user class (FastHttpUser) mixing, by weight: single scores (mixed history lengths, candidate lists,
k, objectives), batch calls, profile calls, a share of bad requests (each must get its expected 4xx and
error field, then it counts as a success: only unexpected answers are failures), and a few model/health
reads. Each user paces itself to ``LOADTEST_USER_RATE`` requests/s (``constant_throughput``), so the
offered load is fixed: users x rate.

Settings (environment, set by ``loadtests/run.py``):
  LOADTEST_POOL_FILE   the payloads, built and saved by run.py (``payloads.save_pool``)     [or:]
  LOADTEST_DATA_DIR    simulator data directory (events.csv, issuance.csv, coupons.csv) to build them from
  LOADTEST_MAX_LEN     the model's max_len (history lengths are drawn up to it)          [50]
  LOADTEST_USER_RATE   requests/s per simulated user                                      [5]
  LOADTEST_SEED        payload seed                                                        [0]

run.py builds the pool before locust starts: locust's run time (-t) counts from its own start, and
reading a large events.csv there would eat into the measured minute.
"""
from __future__ import annotations

import logging
import os
import random

from locust import FastHttpUser, constant_throughput, events, task

from loadtests.payloads import PayloadPool, build_pool, load_pool

log = logging.getLogger(__name__)

JSON_HEADERS = {"Content-Type": "application/json"}
_POOL: PayloadPool | None = None


def pool() -> PayloadPool:
    global _POOL
    if _POOL is None:
        pool_file, data_dir = os.environ.get("LOADTEST_POOL_FILE"), os.environ.get("LOADTEST_DATA_DIR")
        if pool_file:
            _POOL = load_pool(pool_file)
        elif data_dir:
            _POOL = build_pool(data_dir, int(os.environ.get("LOADTEST_MAX_LEN", "50")),
                               seed=int(os.environ.get("LOADTEST_SEED", "0")))
        else:
            raise RuntimeError("set LOADTEST_POOL_FILE, or LOADTEST_DATA_DIR to the simulator's data directory")
        log.info("payload pool: %s", _POOL.stats)
    return _POOL


@events.init.add_listener
def _build_payloads(environment, **_kwargs) -> None:
    pool()  # before the first user spawns, so building the pool is not counted as latency


def _check_ok(resp) -> None:
    if resp.status_code == 200 and resp.content and resp.content[:1] == b"{":
        resp.success()
    else:
        resp.failure(f"expected 200 with a JSON object, got {resp.status_code}: {(resp.content or b'')[:200]!r}")


class PacedClient(FastHttpUser):
    """A client of the service that paces itself to ``LOADTEST_USER_RATE`` requests/s (the scenarios' base)."""

    abstract = True  # locust runs the scenarios below, never this class itself
    wait_time = constant_throughput(float(os.environ.get("LOADTEST_USER_RATE", "5")))
    # HTTP/1.1 keep-alive as a sidecar would; gunicorn's sync workers close after each response anyway
    connection_timeout = 10.0
    network_timeout = 10.0

    def on_start(self) -> None:
        self.rng = random.Random()
        self.payloads = pool()

    def _post(self, path: str, body: bytes, name: str):
        return self.client.post(path, data=body, headers=JSON_HEADERS, name=name, catch_response=True)


class ScoringUser(PacedClient):
    """Mixed traffic of an edge server or sidecar."""

    @task(70)
    def score(self) -> None:
        with self._post("/v1/score", self.rng.choice(self.payloads.score), "/v1/score") as resp:
            _check_ok(resp)

    @task(8)
    def score_batch(self) -> None:
        with self._post("/v1/score:batch", self.rng.choice(self.payloads.batch), "/v1/score:batch") as resp:
            _check_ok(resp)

    @task(6)
    def profile(self) -> None:
        with self._post("/v1/profile", self.rng.choice(self.payloads.profile), "/v1/profile") as resp:
            _check_ok(resp)

    @task(12)
    def bad_request(self) -> None:
        bad = self.rng.choice(self.payloads.bad)
        with self._post(bad.path, bad.body, f"bad:{bad.name}") as resp:
            content = resp.content or b""
            field = f'"field":"{bad.field}'.encode() if bad.field else b'"error"'
            if resp.status_code == bad.status and field in content:
                resp.success()
            else:
                resp.failure(f"{bad.name}: expected {bad.status} naming {bad.field}, got {resp.status_code}: "
                             f"{content[:200]!r}")

    @task(4)
    def read_only(self) -> None:
        path = self.rng.choice(("/v1/model", "/v2/health/ready", "/v2/health/live", "/metrics"))
        with self.client.get(path, name=path, catch_response=True) as resp:
            if resp.status_code == 200:
                resp.success()
            else:
                resp.failure(f"{path}: {resp.status_code}")
