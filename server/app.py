"""The Flask app factory and the service state (model, catalog, limits, metrics).

``create_app(config)`` reads the configuration (see ``server.config``), checks the model directory
and the catalog (manifest checksums, every catalog row), and, with ``load="eager"`` (the default),
creates the onnxruntime sessions and runs the warm-up. Under gunicorn the app is created in the
master with ``load="deferred"`` (``server.wsgi``) and ``load_model(app)`` runs in each worker after
the fork (``server/gunicorn_conf.py``), so no onnxruntime session ever crosses a fork.
"""
from __future__ import annotations

import logging
import threading
import time
from pathlib import Path
from typing import Any, Mapping

from flask import Flask

from runtime.allocation import Policy, PolicyError, load_policy
from runtime.features import EVENT_KINDS
from runtime.scorer import Scorer, load_catalog, read_manifest
from server.config import ServerConfig, load_config
from server.errors import register_error_handlers
from server.ledger import MIGRATIONS, Ledger
from server.metrics import Metrics, MetricsMiddleware
from server.validation import Limits

log = logging.getLogger(__name__)

EXTENSION = "edgecoupon"
# path -> metrics label; everything else is counted as "other"
ENDPOINTS = {p: p for p in ("/v1/score", "/v1/score:batch", "/v1/profile", "/v1/model", "/v2/health/live",
                            "/v2/health/ready", "/metrics", "/openapi.json", "/v1/_noop", "/v1/issue",
                            "/v1/redeem", "/v1/conversions", "/v1/admin/campaigns")}


class ServiceState:
    """What the views share: config, limits, the scorer once loaded, metrics."""

    def __init__(self, config: ServerConfig):
        self.config = config
        self.scorer: Scorer | None = None
        self.ready = False
        self.metrics: Metrics | None = None
        self.noop_coupons: list[dict[str, Any]] = []  # a real answer, the no-op endpoint's template
        self._lock = threading.Lock()
        # checked up front (in the gunicorn master too): a broken model or catalog fails the start
        model_dir = Path(config.model_dir)
        self.manifest = read_manifest(model_dir, verify=config.verify_model)
        self.model_version: str = self.manifest["model_version"]
        self.catalog = load_catalog(config.catalog)
        self.coupon_ids = [c["coupon_id"] for c in self.catalog]
        self.limits = Limits.from_config(config, self.coupon_ids)
        self.policy: Policy | None = None
        if config.policy:
            try:
                self.policy = load_policy(config.policy)
            except (OSError, PolicyError) as exc:
                raise PolicyError(f"policy {config.policy}: {exc}") from exc
        self.ledger: Ledger | None = None
        if config.ledger_url:
            # migrations run here (in the gunicorn master too); each process and thread then opens its own connection
            self.ledger = Ledger(config.ledger_url, busy_timeout_s=config.ledger_busy_timeout_s)
            self.ledger.close()
            log.info("ledger %s (schema version %d)", self.ledger.describe(), MIGRATIONS[-1][0])
        log.info("model %s and catalog %s (%d coupons) checked", self.model_version, config.catalog,
                 len(self.catalog))

    def load(self) -> None:
        """Create the onnxruntime sessions, run the warm-up, then report ready. Idempotent."""
        with self._lock:
            if self.scorer is not None:
                return
            started = time.perf_counter()
            cfg = self.config
            # checksums are checked again here (a few ms): a file replaced since the master's check fails
            scorer = Scorer(cfg.model_dir, self.catalog, threads=cfg.threads, precision=cfg.precision,
                            verify=cfg.verify_model, policy=self.policy)
            if scorer.model_version != self.model_version:
                raise RuntimeError(f"model changed while starting: {self.model_version} -> {scorer.model_version}")
            self.noop_coupons = warm_up(scorer, cfg.warmup_rounds)
            self.scorer = scorer
            if self.metrics is not None:
                self.metrics.set_model(self.model_version, cfg.precision)
            self.ready = True
            log.info("model %s (%s, %d thread(s)) loaded and warmed up in %.0f ms", self.model_version,
                     cfg.precision, cfg.threads, (time.perf_counter() - started) * 1e3)


def warm_up(scorer: Scorer, rounds: int) -> list[dict[str, Any]]:
    """A few full-size inferences (longest history, whole catalog) and an empty one; returns a ranking."""
    spec = scorer.spec
    now = time.time()
    categories = spec.categories or ["warm-up"]
    events = [{"ts": now - 60.0 * (spec.max_len - i), "event": EVENT_KINDS[i % len(EVENT_KINDS)],
               "item_id": f"warm-up-{i}", "category": categories[i % len(categories)], "price": 10.0 + i}
              for i in range(spec.max_len)]
    ranked = scorer.score(events, now=now)
    for _ in range(rounds):
        scorer.score(events, now=now)
        scorer.score([], now=now)
        scorer.profile(events, now=now)
    return ranked


def state_of(app: Flask) -> ServiceState:
    return app.extensions[EXTENSION]


def load_model(app: Flask) -> None:
    """Load the model of an app created with ``load="deferred"`` (gunicorn's post_worker_init)."""
    state_of(app).load()


def create_app(config: ServerConfig | Mapping[str, Any] | None = None) -> Flask:
    """The app. ``config``: a ServerConfig (taken as is) or overrides on top of defaults/TOML/environment."""
    cfg = load_config(config)
    logging.getLogger("server").setLevel(cfg.log_level.upper())
    app = Flask(__name__)
    app.config["MAX_CONTENT_LENGTH"] = cfg.max_body_bytes
    app.config["EDGECOUPON"] = cfg
    app.json.sort_keys = False  # type: ignore[attr-defined]

    state = ServiceState(cfg)
    app.extensions[EXTENSION] = state
    if cfg.metrics:
        state.metrics = Metrics(ENDPOINTS)
        app.wsgi_app = MetricsMiddleware(app.wsgi_app, state.metrics)  # type: ignore[method-assign]

    from server.ledger_views import make_ledger_blueprint
    from server.views import make_api_blueprint, make_ops_blueprint

    app.register_blueprint(make_api_blueprint(state))
    app.register_blueprint(make_ledger_blueprint(state))
    app.register_blueprint(make_ops_blueprint(state))
    register_error_handlers(app)
    if cfg.load == "eager":
        state.load()
    return app
