"""Prometheus metrics, correct under several gunicorn workers.

Under gunicorn, ``server/gunicorn_conf.py`` sets ``PROMETHEUS_MULTIPROC_DIR`` before anything imports
prometheus_client: each worker then writes its samples to memory-mapped files there, ``GET /metrics``
(answered by any worker) merges the files of all workers, and the ``child_exit`` hook marks dead
workers. Without the variable (tests, a single process) the metrics live in a registry of the app.

Per request the cost is a few memory-mapped writes: label children are cached, and the endpoint label
is looked up from the path in a dict (unknown paths share one label, so the label set stays bounded).

Metrics (all prefixed ``edgecoupon_``):

- ``http_requests_total{endpoint,method,status}``: requests answered;
- ``http_request_duration_seconds{endpoint,method,status}``: histogram of the time in the app;
- ``inference_duration_seconds{endpoint}``: histogram of the time in the scorer (featurizer + model);
- ``model_info{model_version,precision}``: 1 for the loaded model (max over live workers).
"""
from __future__ import annotations

import logging
import os
import time
from typing import Any, Callable, Iterable

from prometheus_client import (CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, disable_created_metrics,
                               generate_latest)
from prometheus_client import values as prometheus_values

log = logging.getLogger(__name__)

# seconds; the service answers in about a millisecond, so the buckets are dense below 50 ms
REQUEST_BUCKETS = (0.0005, 0.001, 0.002, 0.003, 0.005, 0.0075, 0.01, 0.015, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0,
                   2.5, float("inf"))
INFERENCE_BUCKETS = (0.0001, 0.0002, 0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.5, float("inf"))
OTHER_ENDPOINT = "other"
_METHODS = frozenset(("GET", "POST", "HEAD", "OPTIONS", "PUT", "PATCH", "DELETE"))


def multiprocess_enabled() -> bool:
    """True when prometheus_client was imported with PROMETHEUS_MULTIPROC_DIR set (gunicorn)."""
    return prometheus_values.ValueClass is not prometheus_values.MutexValue


class Metrics:
    """The service's metrics; ``registry`` is None in multiprocess mode (samples go to files)."""

    def __init__(self, endpoints: dict[str, str]):
        self.multiprocess = multiprocess_enabled()
        if self.multiprocess and not os.path.isdir(os.environ.get("PROMETHEUS_MULTIPROC_DIR", "")):
            raise RuntimeError("PROMETHEUS_MULTIPROC_DIR is set but is not a directory")
        self.registry = None if self.multiprocess else CollectorRegistry()
        disable_created_metrics()  # no *_created series: less output, one value less to update per request
        self._endpoints = endpoints  # path -> endpoint label
        labels = ("endpoint", "method", "status")
        self.requests = Counter("edgecoupon_http_requests_total", "HTTP requests answered", labels,
                                registry=self.registry)
        self.latency = Histogram("edgecoupon_http_request_duration_seconds", "Time spent answering a request",
                                 labels, buckets=REQUEST_BUCKETS, registry=self.registry)
        self.inference = Histogram("edgecoupon_inference_duration_seconds",
                                   "Time spent in the scorer (featurizer + onnxruntime)", ("endpoint",),
                                   buckets=INFERENCE_BUCKETS, registry=self.registry)
        self.model_info = Gauge("edgecoupon_model_info", "The loaded model (value 1)", ("model_version", "precision"),
                                registry=self.registry, multiprocess_mode="livemax")
        self._request_children: dict[tuple[str, str, str], tuple[Any, Any]] = {}
        self._inference_children: dict[str, Any] = {}

    def set_model(self, model_version: str, precision: str) -> None:
        self.model_info.labels(model_version, precision).set(1)

    def observe_request(self, path: str, method: str, status: str, seconds: float) -> None:
        key = (self._endpoints.get(path, OTHER_ENDPOINT), method, status)
        children = self._request_children.get(key)
        if children is None:
            # every label is bounded: known paths, known methods, and HTTP status codes
            key = (key[0], method if method in _METHODS else "other", status)
            children = (self.requests.labels(*key), self.latency.labels(*key))
            self._request_children[key] = children
        children[0].inc()
        children[1].observe(seconds)

    def observe_inference(self, endpoint: str, seconds: float) -> None:
        child = self._inference_children.get(endpoint)
        if child is None:
            child = self._inference_children[endpoint] = self.inference.labels(endpoint)
        child.observe(seconds)

    def render(self) -> tuple[bytes, str]:
        """The exposition text (merged over all workers in multiprocess mode) and its content type."""
        if self.multiprocess:
            from prometheus_client import multiprocess

            registry = CollectorRegistry()
            multiprocess.MultiProcessCollector(registry)
            return generate_latest(registry), CONTENT_TYPE_LATEST
        return generate_latest(self.registry), CONTENT_TYPE_LATEST


class MetricsMiddleware:
    """WSGI middleware timing every request (cheaper than Flask's before/after hooks)."""

    def __init__(self, wsgi_app: Callable, metrics: Metrics):
        self.wsgi_app = wsgi_app
        self.metrics = metrics

    def __call__(self, environ: dict, start_response: Callable) -> Iterable[bytes]:
        started = time.perf_counter()
        status_holder = []

        def _start_response(status: str, headers: list, exc_info: Any = None) -> Callable:
            status_holder.append(status)
            return start_response(status, headers, exc_info)

        try:
            return self.wsgi_app(environ, _start_response)
        finally:
            status = status_holder[-1][:3] if status_holder else "500"
            self.metrics.observe_request(environ.get("PATH_INFO", ""), environ.get("REQUEST_METHOD", ""), status,
                                         time.perf_counter() - started)
