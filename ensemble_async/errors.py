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
    "RetryableError",
    "ServerError",
    "UnknownBackendError",
    "error_from_status",
    "parse_retry_after",
]

import email.utils
import time
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
    if status == 424 or status >= 500:
        return ServerError(message, backend=backend, status=status)
    if status == 409:
        return ServerError(message, backend=backend, status=status)
    return BadRequestError(message, backend=backend, status=status)
