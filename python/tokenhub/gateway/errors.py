"""The gateway's errors: `ApiError` knows its HTTP status, OpenAI's error fields and how to
render itself in OpenAI's shape; a client of another dialect gets the same error in its own
shape (`tokenhub.gateway.dialects`, chosen by the error middleware in `app`)."""

from __future__ import annotations

import msgspec
from aiohttp import web

from tokenhub.quota import Refusal, format_reset


class ErrorBody(msgspec.Struct, kw_only=True):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorEnvelope(msgspec.Struct, kw_only=True):
    error: ErrorBody


_encode = msgspec.json.Encoder().encode


class ApiError(Exception):
    """An error returned to the API client. Messages must never contain secrets."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        type: str = "invalid_request_error",
        code: str | None = None,
        param: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type
        self.code = code
        self.param = param
        self.headers = headers or {}

    def body(self) -> bytes:
        return _encode(
            ErrorEnvelope(
                error=ErrorBody(
                    message=self.message, type=self.type, param=self.param, code=self.code
                )
            )
        )

    def response(self) -> web.Response:
        return web.Response(
            status=self.status,
            body=self.body(),
            content_type="application/json",
            headers=self.headers,
        )

    # -- the catalogue ------------------------------------------------------------------------

    @classmethod
    def invalid_key(cls) -> ApiError:
        return cls(
            401,
            "Incorrect API key provided. Pass a valid tokenhub key as "
            "'Authorization: Bearer <key>' or 'x-api-key: <key>'.",
            code="invalid_api_key",
        )

    @classmethod
    def bad_request(cls, message: str, *, param: str | None = None) -> ApiError:
        return cls(400, message, param=param)

    @classmethod
    def model_not_found(cls, model: str) -> ApiError:
        return cls(
            404,
            f"The model `{model}` does not exist or you do not have access to it.",
            code="model_not_found",
            param="model",
        )

    @classmethod
    def too_large(cls, limit: int) -> ApiError:
        return cls(
            413, f"Request body too large: the limit is {limit} bytes.", code="request_too_large"
        )

    @classmethod
    def upstream_failed(cls, detail: str) -> ApiError:
        return cls(
            502, f"The upstream provider failed: {detail}", type="api_error", code="upstream_error"
        )

    @classmethod
    def upstream_timeout(cls) -> ApiError:
        return cls(
            504, "The upstream provider timed out.", type="api_error", code="upstream_timeout"
        )

    @classmethod
    def quota_refused(cls, r: Refusal) -> ApiError:
        """429 for a refused reservation, as OpenAI words it: rate_limit_exceeded (rpm, tpm,
        concurrency) or insufficient_quota (a budget: tokens per day)."""
        if r.limit in ("rpm", "tpm"):
            kind = "requests" if r.limit == "rpm" else "tokens"
            message = (
                f"Rate limit reached for {r.account} on {kind} per minute: "
                f"Limit {r.limit_value}, Remaining {r.remaining}."
            )
            type_ = kind
        elif r.limit == "concurrent":
            message = (
                f"Concurrency limit reached for {r.account}: Limit {r.limit_value} requests "
                f"in flight, Remaining {r.remaining}."
            )
            type_ = "requests"
        else:
            unit = "tokens per day" if r.limit == "tokens" else r.limit
            message = (
                f"You exceeded your quota for {r.account}: {unit} Limit {r.limit_value}, "
                f"Remaining {r.remaining}."
            )
            type_ = "insufficient_quota"
        if r.retry_after_ms is not None:
            message += f" Please try again in {format_reset(r.retry_after_ms)}."
        return cls(429, message, type=type_, code=r.code, headers=r.headers())

    @classmethod
    def journal_unavailable(cls) -> ApiError:
        """The usage journal (or the database behind it) cannot persist usage: the request
        was not sent upstream (a full or read-only disk; it recovers by itself)."""
        return cls(
            503,
            "The gateway cannot record usage right now, so the request was not sent. "
            "Please retry shortly.",
            type="server_error",
            code="journal_unavailable",
            headers={"Retry-After": "1"},
        )

    @classmethod
    def internal(cls) -> ApiError:
        return cls(
            500, "The gateway had an internal error.", type="server_error", code="internal_error"
        )


def from_http_exception(exc: web.HTTPException, max_body: int) -> ApiError:
    """aiohttp's own errors (unknown path, wrong method, body too large) in the OpenAI shape."""
    if exc.status == 413:
        return ApiError.too_large(max_body)
    if exc.status == 404:
        return ApiError(
            404, "Unknown request URL. Please check the URL and method.", code="unknown_url"
        )
    if exc.status == 405:
        return ApiError(405, "Method not allowed for this URL.", code="method_not_allowed")
    return ApiError(exc.status, exc.reason or "HTTP error", code=None)
