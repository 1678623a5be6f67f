"""Error classes.  Each says whether a retry can help (``retryable``).

Only ``RetryableError`` subclasses are ever retried, and only by the scheduler; adapters
never retry on their own.  Messages never carry request headers or API keys.
"""

from __future__ import annotations

__all__ = [
    "AuthenticationError",
    "BackendError",
    "BadRequestError",
    "ConnectError",
    "ContextLengthError",
    "FatalError",
    "MalformedResponseError",
    "NotFoundError",
    "OverloadedError",
    "RateLimitedError",
    "RequestTimeoutError",
    "ResponseTooLargeError",
    "RetryableError",
    "ServerError",
    "UnknownBackendError",
    "cannot_serve",
    "error_from_event",
    "error_from_status",
    "parse_retry_after",
]

import email.utils
import json
import time
from collections.abc import Callable, Mapping
from typing import ClassVar


class BackendError(Exception):
    """Base class of every error a backend raises."""

    retryable: ClassVar[bool] = False

    def __init__(self, message: str, *, backend: str | None = None, status: int | None = None):
        super().__init__(message)
        self.message = message
        self.backend = backend
        self.status = status

    def __str__(self) -> str:
        where = f"[{self.backend}] " if self.backend else ""
        code = f" (HTTP {self.status})" if self.status is not None else ""
        return f"{where}{self.message}{code}"


class RetryableError(BackendError):
    """A later attempt may succeed."""

    retryable = True


class RateLimitedError(RetryableError):
    """HTTP 429: the server asks us to slow down, possibly saying for how long."""

    def __init__(
        self,
        message: str,
        *,
        backend: str | None = None,
        status: int | None = 429,
        retry_after: float | None = None,
    ):
        super().__init__(message, backend=backend, status=status)
        self.retry_after = retry_after


class OverloadedError(RetryableError):
    """The server is up but cannot take the request now (503, TGI's overloaded)."""

    def __init__(
        self,
        message: str,
        *,
        backend: str | None = None,
        status: int | None = 503,
        retry_after: float | None = None,
    ):
        super().__init__(message, backend=backend, status=status)
        self.retry_after = retry_after


class ServerError(RetryableError):
    """5xx, TGI's 424 generation error, or an error event inside a stream."""


class RequestTimeoutError(RetryableError):
    """The request took longer than its time limit."""


class ConnectError(RetryableError):
    """Could not connect, or the connection broke before the answer was complete."""


class MalformedResponseError(RetryableError):
    """The server answered something that is not the protocol (bad JSON, truncated stream)."""


class ResponseTooLargeError(MalformedResponseError):
    """The answer (its body, one stream line, or a completion) is larger than the
    backend's limit (``max_response_bytes``, ``max_completion_chars``).

    Not retried: the same request would most likely meet the same flood, and every try
    costs up to the limit in memory and bandwidth.  It is still a ``RetryableError``
    subclass so that the circuit breaker counts it: a server that floods is sick, the
    request is not at fault.
    """

    retryable = False


class FatalError(BackendError):
    """Retrying the same request cannot help."""


class BadRequestError(FatalError):
    """The server rejected the request (400/422)."""


class ContextLengthError(BadRequestError):
    """Prompt plus max_new_tokens does not fit the model's context."""


class AuthenticationError(FatalError):
    """401/403: missing or wrong credentials."""


class NotFoundError(FatalError):
    """404: unknown model or endpoint."""


def cannot_serve(exc: BaseException) -> bool:
    """Whether ``exc`` says the backend cannot serve now, rather than that the request is
    bad: a ``RetryableError`` (once the retries are spent), refused credentials (401/403:
    a key revoked mid-run) or an unknown model or endpoint (404: the server now serves
    another model).  What it leaves undone is deferred, never decided without it."""
    return isinstance(exc, RetryableError | AuthenticationError | NotFoundError)


class UnknownBackendError(LookupError):
    """No backend is registered under this kind name."""


_CONTEXT_MARKERS = (
    "context length",
    "context_length",
    "maximum context",
    "too long",
    "max_total_tokens",
    "max_input_tokens",
    "exceeds the context",
    "exceed context window",
)


# A 5xx whose message is one of these is the server's request validation failing
# (a pydantic-style error surfacing as a 500): the same request fails again.
_VALIDATION_MARKERS = (
    "validation error",
    "validationerror",
    "field required",
    "extra inputs are not permitted",
    "unexpected fields",
    "unexpected keyword argument",
    "input should be",
)

_MAX_MESSAGE_CHARS = 500


def parse_retry_after(value: str | None) -> float | None:
    """Seconds to wait from a Retry-After header (delta-seconds or an HTTP date)."""
    if value is None:
        return None
    value = value.strip()
    if not value:
        return None
    try:
        seconds = float(value)
    except ValueError:
        try:
            when = email.utils.parsedate_to_datetime(value)
        except (TypeError, ValueError):
            return None
        seconds = when.timestamp() - time.time()
    return max(0.0, seconds)


def error_from_status(
    status: int,
    message: str,
    *,
    backend: str | None = None,
    retry_after: float | None = None,
) -> BackendError:
    """Map an HTTP status (and the server's message) to the error class that fits."""
    lowered = message.lower()
    if status == 429:
        return RateLimitedError(message, backend=backend, status=status, retry_after=retry_after)
    if status == 503:
        return OverloadedError(message, backend=backend, status=status, retry_after=retry_after)
    if status in (408, 504):
        return RequestTimeoutError(message, backend=backend, status=status)
    if status in (401, 403):
        return AuthenticationError(message, backend=backend, status=status)
    if status == 404:
        return NotFoundError(message, backend=backend, status=status)
    if status in (400, 413, 415, 422):
        if any(marker in lowered for marker in _CONTEXT_MARKERS):
            return ContextLengthError(message, backend=backend, status=status)
        return BadRequestError(message, backend=backend, status=status)
    if status >= 500 and status != 503 and any(m in lowered for m in _VALIDATION_MARKERS):
        return BadRequestError(message, backend=backend, status=status)
    if status == 424 or status >= 500:
        return ServerError(message, backend=backend, status=status)
    if status == 409:
        return ServerError(message, backend=backend, status=status)
    return BadRequestError(message, backend=backend, status=status)


def error_from_event(
    error: object, *, backend: str | None = None, scrub: Callable[[str], str] | None = None
) -> BackendError:
    """Our error for an ``{"error": ...}`` object met in a 200 answer or a stream event
    (OpenAI-style: ``{"message", "code"}``; anything else is a server error).
    ``scrub`` (e.g. a ``Scrubber``'s) is applied to the message before it is cut short."""
    status = 500
    if isinstance(error, Mapping):
        raw = error.get("message")
        message = raw if isinstance(raw, str) and raw else json.dumps(error, default=str)
        code = error.get("code")
        if isinstance(code, int) and not isinstance(code, bool) and 400 <= code < 600:
            status = code
    else:
        message = str(error)
    if scrub is not None:
        message = scrub(message)
    return error_from_status(status, message[:_MAX_MESSAGE_CHARS], backend=backend)
