"""How fast this machine runs a fixed piece of request-like work, so CPU and latency gates travel between machines.

The load tests gate the server's CPU time per request and its latency in milliseconds. Those figures
scale with the machine: the same commit measured 1.4 CPU ms per request on one 2-core machine of this
workplace and 5.0 on another (a slower and busier host; the test suite took 3.2x as long there). A limit
in plain milliseconds is then either too loose for the fast machine or red on the slow one.

So each run also times, in the runner process and while the server is idle, a fixed workload shaped
like the request path (JSON parsing, a Python loop over events, small numpy arithmetic) and compares it
with the same workload's time on the machine where the limits were measured (``[calibration]
reference_ms`` in ``thresholds.toml``). The server gates are scaled by that ratio. The workload does not
touch the project's code, so a slower request path still fails the gate on any machine.
"""
from __future__ import annotations

import json
import statistics
import time

import numpy as np

_EVENT_KINDS = ("view", "cart", "purchase")


def _request_like_body(n_events: int = 64) -> str:
    events = [{"ts": 1_700_000_000 + 60 * i, "event": _EVENT_KINDS[i % 3], "item_id": f"item{i:05d}",
               "category": f"cat{i % 20:02d}", "price": 9.99 + i} for i in range(n_events)]
    return json.dumps({"user_id": "calibration-user", "events": events, "k": 10})


def _workload(body: str, weights: np.ndarray, rounds: int) -> float:
    """Parse, featurize and score ``rounds`` times; returns a checksum so nothing is optimised away."""
    checksum = 0.0
    for _ in range(rounds):
        parsed = json.loads(body)
        kinds = np.array([_EVENT_KINDS.index(e["event"]) for e in parsed["events"]], dtype=np.int64)
        categories = np.array([int(e["category"][3:]) for e in parsed["events"]], dtype=np.int64)
        log_prices = np.log1p(np.array([e["price"] for e in parsed["events"]], dtype=np.float32))
        features = np.stack([kinds, categories, log_prices], axis=1).astype(np.float32)  # [L, 3]
        hidden = np.tanh(features @ weights[:3] + weights[3])  # [L, H]
        scores = 1.0 / (1.0 + np.exp(-(hidden.mean(axis=0) @ weights[4:].T)))  # [H - 4]
        checksum += float(scores.sum()) + len(json.dumps({"scores": scores.round(4).tolist()}))
    return checksum


def calibration_ms(reps: int = 15, rounds: int = 20) -> list[float]:
    """CPU milliseconds of the fixed workload, once per rep (this process's CPU time, not wall time)."""
    body = _request_like_body()
    weights = np.random.default_rng(0).normal(size=(36, 32)).astype(np.float32)
    _workload(body, weights, rounds)  # warm caches and numpy's dispatch before timing
    times = []
    for _ in range(reps):
        start = time.process_time()
        _workload(body, weights, rounds)
        times.append((time.process_time() - start) * 1e3)
    return times


def speed_factor(samples_ms: list[float], reference_ms: float) -> float:
    """How many times slower than the reference machine this one ran the workload (median of the samples)."""
    if not samples_ms or reference_ms <= 0:
        raise ValueError("calibration needs samples and a positive reference time")
    return statistics.median(samples_ms) / reference_ms
