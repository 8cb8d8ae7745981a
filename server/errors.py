"""JSON errors: every 4xx/5xx the service sends is ``{"error": {"field": ..., "message": ...}}``.

``field`` names the offending part of the request (``events[3].price``, ``candidates[0]``, ``body``,
``path``, ``method``...) so a caller can tell what to fix; it is ``null`` only for server-side errors.
Nothing ever answers with HTML or a traceback.
"""
from __future__ import annotations

import logging

import orjson
from flask import Flask, Response
from werkzeug.exceptions import HTTPException

log = logging.getLogger(__name__)

JSON = "application/json"


class ApiError(Exception):
    """A request the service refuses: raised anywhere in a view, answered by the handler below."""

    def __init__(self, status: int, field: str | None, message: str):
        super().__init__(f"{field}: {message}")
        self.status = status
        self.field = field
        self.message = message


def error_response(status: int, field: str | None, message: str, headers: dict | None = None) -> Response:
    body = orjson.dumps({"error": {"field": field, "message": message}})
    return Response(body, status=status, mimetype=JSON, headers=headers)


# the field named by the generic HTTP errors werkzeug raises itself
_HTTP_FIELD = {400: "body", 404: "path", 405: "method", 413: "body", 415: "body"}


def register_error_handlers(app: Flask) -> None:
    @app.errorhandler(ApiError)
    def _api_error(exc: ApiError) -> Response:
        return error_response(exc.status, exc.field, exc.message)

    @app.errorhandler(HTTPException)
    def _http_error(exc: HTTPException) -> Response:
        status = exc.code or 500
        headers = None
        if status == 405 and exc.valid_methods:  # type: ignore[attr-defined]
            headers = {"Allow": ", ".join(exc.valid_methods)}  # type: ignore[attr-defined]
        message = exc.description or exc.name
        if status == 413:
            message = f"request body larger than {app.config['MAX_CONTENT_LENGTH']} bytes"
        return error_response(status, _HTTP_FIELD.get(status), message, headers)

    @app.errorhandler(Exception)
    def _unexpected(exc: Exception) -> Response:
        # the last line of defence: log the traceback here, never send it
        log.exception("unhandled error")
        return error_response(500, None, "internal error")
