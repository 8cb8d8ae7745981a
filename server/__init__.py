"""EdgeCoupon HTTP scoring service: Flask app factory, served by gunicorn (``python -m server``).

Imports numpy, onnxruntime, flask, orjson and prometheus_client; never torch. ``import server`` itself
is light (the names below load on first use): the gunicorn config imports ``server.config`` and must
set ``PROMETHEUS_MULTIPROC_DIR`` before anything imports prometheus_client.
"""
from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {"create_app": "server.app", "load_model": "server.app", "ServerConfig": "server.config",
            "ConfigError": "server.config", "load_config": "server.config"}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'server' has no attribute {name!r}")
