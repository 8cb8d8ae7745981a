"""Service configuration: defaults, then a TOML file, then environment variables, then overrides.

Layers, later ones win:

1. the defaults of :class:`ServerConfig` below;
2. a TOML file named by ``EDGECOUPON_CONFIG`` (flat ``key = value`` pairs, keys are the field names);
3. environment variables ``EDGECOUPON_<FIELD>`` (e.g. ``EDGECOUPON_MODEL_DIR``, ``EDGECOUPON_CATALOG``);
4. a mapping (or a ``ServerConfig``) passed to ``create_app(config)``: what tests use.

Unknown keys fail loudly in every layer (a typo in a TOML key or an ``EDGECOUPON_*`` variable is an
error, not a silently ignored setting), and so do values of the wrong type or out of range.
"""
from __future__ import annotations

import dataclasses
import os
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

ENV_PREFIX = "EDGECOUPON_"
CONFIG_ENV = "EDGECOUPON_CONFIG"  # path of the TOML file; not a field itself
# the test suite's own variables (e.g. EDGECOUPON_TEST_PG_URL, set by `make test`): not settings, and not
# typos either, so they are ignored rather than refused (the service may start inside the tests' environment)
TEST_ENV_PREFIX = "EDGECOUPON_TEST_"
OBJECTIVES = ("uplift", "p_redeem", "p_buy", "profit")  # "profit" needs a budget policy (the policy key)
PRECISIONS = ("int8", "fp32")
LOAD_MODES = ("eager", "deferred")
# the ledger's backends (server.ledger): an embedded SQLite file, or PostgreSQL shared by several nodes
LEDGER_URL_PREFIXES = ("sqlite:///", "postgresql://", "postgres://")


class ConfigError(ValueError):
    """A configuration key is unknown or its value is invalid."""


@dataclass(frozen=True)
class ServerConfig:
    # --- model and catalog
    model_dir: str = "artifacts/model"  # exported model directory (model.onnx + manifest.json)
    catalog: str = "artifacts/data/coupons.csv"  # coupon catalog, CSV or JSON
    precision: str = "int8"  # "int8" (model.onnx) or "fp32" (model_fp32.onnx)
    threads: int = 1  # onnxruntime intra-op threads per worker process (1: one worker per core instead)
    verify_model: bool = True  # check the model files' sha256 against the manifest when loading
    load: str = "eager"  # "eager": create_app loads the model; "deferred": load_model(app) does (gunicorn, after fork)
    warmup_rounds: int = 3  # warm-up inferences before the worker reports ready
    # budget policy file (runtime.allocation; python -m training.policy_eval writes policy.json): enables
    # objective "profit" in /v1/score and is the choice rule of /v1/issue. Empty: no policy ("profit" is a 400)
    policy: str = ""

    # --- request limits (see the API section of the README)
    max_body_bytes: int = 1 << 20  # larger request bodies get 413
    max_events: int = 1000  # hard cap on events per user: more gets 413; the most recent max_len are used
    max_batch: int = 64  # users per /v1/score:batch call: more gets 413
    max_candidates: int = 1000  # candidate coupons per user: more gets 413
    max_k: int = 1000  # largest accepted k
    max_user_id_chars: int = 256  # longest accepted user_id
    future_tolerance_s: float = 300.0  # event ts may be at most this far after `now` (or the server clock)
    default_objective: str = "uplift"  # ranking objective when the request has none

    # --- serving
    bind: str = "127.0.0.1:8000"  # gunicorn listen address (host:port)
    workers: int = 0  # gunicorn worker processes; 0 means one per available core
    timeout_s: int = 30  # gunicorn worker timeout
    metrics: bool = True  # collect Prometheus metrics and serve GET /metrics
    bench_endpoints: bool = False  # mount POST /v1/_noop (benchmarks/bench_http.py); never in production
    log_level: str = "INFO"  # level of the edgecoupon loggers

    # --- ledger: issuing and tracking coupons (server.ledger; /v1/issue, /v1/redeem, ...)
    ledger_url: str = ""  # "sqlite:///<data_dir>/ledger.db" or "postgresql://user@host:port/db"; empty: 503
    admin_token: str = ""  # bearer token of /v1/admin/*; empty: the admin API is disabled (403)
    default_campaign: str = ""  # campaign of /v1/issue and /v1/conversions requests that name none
    coupon_ttl_s: float = 7 * 86400.0  # an issued coupon can be redeemed this long (and not after the campaign)
    attribution_window_s: float = 7 * 86400.0  # a purchase is attributed to a decision at most this long before it
    ledger_busy_timeout_s: float = 10.0  # how long a request waits for the ledger's write lock before a 503

    def __post_init__(self) -> None:
        positive = ("threads", "max_body_bytes", "max_events", "max_batch", "max_candidates", "max_k",
                    "max_user_id_chars", "timeout_s")
        for name in positive:
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be >= 1, got {getattr(self, name)!r}")
        if self.workers < 0:
            raise ConfigError(f"workers must be >= 0, got {self.workers!r}")
        if self.warmup_rounds < 0:
            raise ConfigError(f"warmup_rounds must be >= 0, got {self.warmup_rounds!r}")
        if not self.future_tolerance_s >= 0:
            raise ConfigError(f"future_tolerance_s must be >= 0, got {self.future_tolerance_s!r}")
        for name in ("coupon_ttl_s", "attribution_window_s", "ledger_busy_timeout_s"):
            if not getattr(self, name) > 0:
                raise ConfigError(f"{name} must be > 0, got {getattr(self, name)!r}")
        if self.ledger_url and not self.ledger_url.startswith(LEDGER_URL_PREFIXES):
            raise ConfigError(f"ledger_url must be sqlite:///<path> or postgresql://user@host:port/database "
                              f"(postgres:// too), got {self.ledger_url!r}")
        choices = {"precision": PRECISIONS, "load": LOAD_MODES, "default_objective": OBJECTIVES}
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise ConfigError(f"{name} must be one of {list(allowed)}, got {getattr(self, name)!r}")
        if self.default_objective == "profit" and not self.policy:
            raise ConfigError("default_objective 'profit' needs a budget policy: set policy (a policy.json)")
        if ":" not in self.bind:
            raise ConfigError(f"bind must be host:port, got {self.bind!r}")

    @property
    def effective_workers(self) -> int:
        """Worker processes to run: ``workers``, or the cores this process may use when it is 0."""
        if self.workers:
            return self.workers
        try:
            return max(1, len(os.sched_getaffinity(0)))
        except AttributeError:  # not on Linux
            return max(1, os.cpu_count() or 1)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


_FIELDS = {f.name: f for f in dataclasses.fields(ServerConfig)}
_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off"}


def _coerce(name: str, value: Any, source: str) -> Any:
    """A raw value (TOML-typed, or a string from the environment) -> the field's type."""
    kind = type(getattr(ServerConfig, name))
    try:
        if kind is bool:
            if isinstance(value, bool):
                return value
            if isinstance(value, str) and value.strip().lower() in _TRUE | _FALSE:
                return value.strip().lower() in _TRUE
            raise ValueError("expected a boolean")
        if kind is int:
            if isinstance(value, bool) or isinstance(value, float):
                raise ValueError("expected an integer")
            return int(value)
        if kind is float:
            if isinstance(value, bool):
                raise ValueError("expected a number")
            return float(value)
        if not isinstance(value, (str, Path)):
            raise ValueError("expected a string")
        return str(value)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"{source}: {name}={value!r}: {exc}") from None


def _layer(values: Mapping[str, Any], source: str) -> dict[str, Any]:
    unknown = sorted(set(values) - set(_FIELDS))
    if unknown:
        raise ConfigError(f"{source}: unknown configuration key(s) {unknown}; known: {sorted(_FIELDS)}")
    return {name: _coerce(name, value, source) for name, value in values.items()}


def from_toml(path: str | Path) -> dict[str, Any]:
    """The settings of a TOML file (flat keys named like the fields)."""
    path = Path(path)
    try:
        with open(path, "rb") as fh:
            data = tomllib.load(fh)
    except FileNotFoundError:
        raise ConfigError(f"config file {path} does not exist") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"config file {path} is not valid TOML: {exc}") from None
    nested = sorted(k for k, v in data.items() if isinstance(v, dict))
    if nested:
        raise ConfigError(f"{path}: tables are not supported, use flat keys; found {nested}")
    return _layer(data, str(path))


def from_env(environ: Mapping[str, str]) -> dict[str, Any]:
    """The settings of ``EDGECOUPON_*`` variables (``EDGECOUPON_CONFIG`` names the TOML file;
    ``EDGECOUPON_TEST_*`` belong to the test suite and are ignored)."""
    values = {key[len(ENV_PREFIX):].lower(): value for key, value in environ.items()
              if key.startswith(ENV_PREFIX) and key != CONFIG_ENV and not key.startswith(TEST_ENV_PREFIX)}
    unknown = sorted(set(values) - set(_FIELDS))
    if unknown:
        names = [ENV_PREFIX + u.upper() for u in unknown]
        raise ConfigError(f"unknown environment variable(s) {names}; known: "
                          f"{[ENV_PREFIX + f.upper() for f in sorted(_FIELDS)] + [CONFIG_ENV]}")
    return _layer(values, "environment")


def load_config(overrides: ServerConfig | Mapping[str, Any] | None = None,
                environ: Mapping[str, str] | None = None) -> ServerConfig:
    """Defaults <- TOML (``EDGECOUPON_CONFIG``) <- ``EDGECOUPON_*`` variables <- ``overrides``.

    A ``ServerConfig`` passed as ``overrides`` is taken as it is (no file, no environment).
    """
    if isinstance(overrides, ServerConfig):
        return overrides
    environ = os.environ if environ is None else environ
    values: dict[str, Any] = {}
    if environ.get(CONFIG_ENV):
        values.update(from_toml(environ[CONFIG_ENV]))
    values.update(from_env(environ))
    if overrides:
        values.update(_layer(overrides, "overrides"))
    return ServerConfig(**values)
