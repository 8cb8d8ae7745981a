"""What the server itself says about a run: its /metrics (merged over the gunicorn workers) and its CPU time.

Client-side latencies (locust's) on a shared 2-core machine are mostly the load generator's own
scheduling; the server's figures are what a regression of the request path moves:

- ``cpu_ms_per_request``: CPU time of the workers over the run / requests they answered. Other
  processes on the machine barely change it (they take turns, they do not add to it), so it is a tight
  gate: a request path that got 3x as expensive costs 3x the CPU.
- the latency histogram of an endpoint (time in the app), read off ``/metrics``: quantiles interpolated
  within the buckets, and the exact mean (sum / count).
"""
from __future__ import annotations

import math
import urllib.request
from typing import Any

from prometheus_client.parser import text_string_to_metric_families

REQUESTS = "edgecoupon_http_requests_total"
LATENCY = "edgecoupon_http_request_duration_seconds"


def scrape(url: str, timeout: float = 10.0) -> list[tuple[str, dict[str, str], float]]:
    """(name, labels, value) of every sample of ``GET url/metrics``."""
    with urllib.request.urlopen(url.rstrip("/") + "/metrics", timeout=timeout) as resp:
        text = resp.read().decode()
    return [(s.name, dict(s.labels), s.value) for family in text_string_to_metric_families(text)
            for s in family.samples]


def total_requests(samples) -> float:
    return sum(v for name, _, v in samples if name == REQUESTS)


def histogram(samples, endpoint: str, status: str = "200", name: str = LATENCY) -> tuple[list[tuple[float, float]], float, float]:
    """(cumulative buckets [(le, count)], count, sum) of one endpoint, summed over methods."""
    buckets: dict[float, float] = {}
    count = total = 0.0
    for sample_name, labels, value in samples:
        if labels.get("endpoint") != endpoint or labels.get("status", status) != status:
            continue
        if sample_name == name + "_bucket":
            le = float(labels["le"])
            buckets[le] = buckets.get(le, 0.0) + value
        elif sample_name == name + "_count":
            count += value
        elif sample_name == name + "_sum":
            total += value
    return sorted(buckets.items()), count, total


def diff(after: tuple, before: tuple) -> tuple[list[tuple[float, float]], float, float]:
    """The histogram of what happened between two scrapes."""
    earlier = dict(before[0])
    return [(le, c - earlier.get(le, 0.0)) for le, c in after[0]], after[1] - before[1], after[2] - before[2]


def quantile(buckets: list[tuple[float, float]], q: float) -> float:
    """The q-quantile (seconds) of cumulative buckets, linear within a bucket (as Prometheus does)."""
    if not buckets or buckets[-1][1] <= 0:
        return math.nan
    rank = q * buckets[-1][1]
    lower_le, lower_count = 0.0, 0.0
    for le, count in buckets:
        if count >= rank:
            if math.isinf(le):
                return lower_le  # in the overflow bucket: the highest finite bound is all one can say
            span = count - lower_count
            return lower_le + (le - lower_le) * ((rank - lower_count) / span if span else 1.0)
        lower_le, lower_count = le, count
    return lower_le


def latency_ms(hist: tuple) -> dict[str, Any]:
    buckets, count, total = hist
    out: dict[str, Any] = {"requests": int(count), "mean": round(total / count * 1e3, 3) if count else math.nan}
    for name, q in (("p50", 0.5), ("p95", 0.95), ("p99", 0.99)):
        out[name] = round(quantile(buckets, q) * 1e3, 3)
    return out
