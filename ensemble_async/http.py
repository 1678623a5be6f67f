"""The HTTP transport shared by the remote adapters: one pooled aiohttp session,
JSON requests, server-sent events, and the mapping of transport failures to our errors.

Adapters speak their protocol on top of ``HTTPTransport``; nothing here retries.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from typing import Any

import aiohttp
from multidict import CIMultiDict

from . import jsonio
from .errors import (
    BackendError,
    ConnectError,
    MalformedResponseError,
    RequestTimeoutError,
    ResponseTooLargeError,
    error_from_status,
    parse_retry_after,
)
from .scrub import Scrubber
from .secret import Secret

__all__ = [
    "DEFAULT_MAX_ERROR_BYTES",
    "DEFAULT_MAX_RESPONSE_BYTES",
    "HTTPTransport",
    "error_message",
    "iter_sse_data",
    "new_session",
    "read_capped",
]

_MAX_ERROR_CHARS = 500
DEFAULT_MAX_RESPONSE_BYTES = 16 * 1024 * 1024
"""The largest answer body (and the longest stream event) read before giving up."""
DEFAULT_MAX_ERROR_BYTES = 8 * 1024
"""How much of an error body is read: enough for any server's message, never a flood."""


def new_session(*, limit: int = 0) -> aiohttp.ClientSession:
    """A pooled session; ``limit`` caps open connections (0 = no cap, admission is the
    scheduler's job).  Timeouts are set per request."""
    connector = aiohttp.TCPConnector(limit=limit, limit_per_host=0, ttl_dns_cache=300)
    return aiohttp.ClientSession(
        connector=connector,
        timeout=aiohttp.ClientTimeout(total=None),
        json_serialize=json.dumps,
    )


def error_message(body: str) -> str:
    """The human part of an error body, for TGI, vLLM/OpenAI (nested or flat) or text.
    ``body`` must already be scrubbed (it is cut here)."""
    text = body.strip()
    try:
        data = json.loads(text)
    except ValueError:
        return text[:_MAX_ERROR_CHARS] or "empty error body"
    if isinstance(data, dict):
        err = data.get("error", data)
        if isinstance(err, dict):
            msg = err.get("message") or err.get("detail") or json.dumps(err)[:_MAX_ERROR_CHARS]
            return _short(msg)
        if isinstance(err, str):
            kind = data.get("error_type")
            return _short(f"{err} ({kind})" if isinstance(kind, str) else err)
        if "detail" in data:
            return _short(data["detail"])
    return text[:_MAX_ERROR_CHARS]


def _short(value: object) -> str:
    text = value if isinstance(value, str) else json.dumps(value, default=str)
    return text[:_MAX_ERROR_CHARS]


async def read_capped(
    resp: aiohttp.ClientResponse, limit: int, *, backend: str | None = None, strict: bool = True
) -> bytes:
    """At most ``limit`` bytes of ``resp``'s body, read as it arrives.

    ``strict``: a longer body is a ``ResponseTooLargeError`` (raised as soon as the limit
    is passed, or at once when Content-Length says so); otherwise it is cut to ``limit``.
    Either way no more than ``limit`` bytes (plus one network chunk) are ever held.
    """
    if strict and resp.content_length is not None and resp.content_length > limit:
        raise ResponseTooLargeError(
            f"answer of {resp.content_length} bytes is over the limit of {limit} bytes",
            backend=backend,
        )
    if resp.content_length is not None and resp.content_length <= limit:
        # The common case: a declared length within the limit is read in one go (aiohttp
        # stops at Content-Length), without the chunked loop's extra awaits and copy.
        return await resp.read()
    body = bytearray()
    while True:
        chunk = await resp.content.read(max(1, min(65536, limit + 1 - len(body))))
        if not chunk:
            return bytes(body)
        body += chunk
        if len(body) > limit:
            if strict:
                raise ResponseTooLargeError(
                    f"answer is over the limit of {limit} bytes", backend=backend
                )
            return bytes(body[:limit])


def _sse_value(line: str) -> tuple[str, str] | None:
    if not line or line.startswith(":"):
        return None
    field, _, value = line.partition(":")
    return field, value[1:] if value.startswith(" ") else value


async def iter_sse_data(
    content: aiohttp.StreamReader, *, max_event_bytes: int = DEFAULT_MAX_RESPONSE_BYTES
) -> AsyncIterator[str]:
    """Yield the data of each server-sent event.

    Accepts ``data:`` with or without the space, joins multi-line data, skips comment
    (``:``) and other field lines.  A line (or an event) longer than ``max_event_bytes``
    is a ``ResponseTooLargeError`` as soon as it passes the limit; the buffer is scanned
    once (no quadratic copying while a long line arrives).
    """
    buffer = bytearray()
    scanned = 0  # bytes of buffer known to hold no newline
    data_lines: list[str] = []
    event_size = 0
    async for chunk in content.iter_any():
        buffer += chunk
        start = 0
        while True:
            cut = buffer.find(b"\n", max(start, scanned))
            if cut < 0:
                break
            line = bytes(buffer[start:cut]).rstrip(b"\r").decode("utf-8", errors="replace")
            start = scanned = cut + 1
            if not line:
                if data_lines:
                    yield "\n".join(data_lines)
                    data_lines, event_size = [], 0
                continue
            parsed = _sse_value(line)
            if parsed is not None and parsed[0] == "data":
                data_lines.append(parsed[1])
                event_size += len(line)
                if event_size > max_event_bytes:
                    raise ResponseTooLargeError(
                        f"stream event is over the limit of {max_event_bytes} bytes"
                    )
        if start:
            del buffer[:start]
            scanned -= start
        scanned = max(scanned, len(buffer))
        if len(buffer) > max_event_bytes:
            raise ResponseTooLargeError(f"stream line is over the limit of {max_event_bytes} bytes")
    parsed = _sse_value(bytes(buffer).rstrip(b"\r").decode("utf-8", errors="replace"))
    if parsed is not None and parsed[0] == "data":
        data_lines.append(parsed[1])
    if data_lines:
        yield "\n".join(data_lines)


class HTTPTransport:
    """JSON and SSE over one pooled aiohttp session, errors mapped to ours.

    The session is shared when given (and then not closed here), else created lazily
    and closed by ``aclose``.  ``api_key`` is sent as a bearer token and never shown:
    every body read here is scrubbed (``scrubber``) before it is parsed or quoted.

    ``max_response_bytes`` bounds an answer body and each stream event while they are
    read (``ResponseTooLargeError``); an error body is read up to ``max_error_bytes``
    and cut there.
    """

    def __init__(
        self,
        base_url: str,
        *,
        backend: str,
        session: aiohttp.ClientSession | None = None,
        api_key: Secret | None = None,
        headers: Mapping[str, str] | None = None,
        timeout: float | None = 600.0,
        connect_timeout: float = 10.0,
        read_timeout: float | None = None,
        max_response_bytes: int = DEFAULT_MAX_RESPONSE_BYTES,
        max_error_bytes: int = DEFAULT_MAX_ERROR_BYTES,
    ) -> None:
        if max_response_bytes < 1 or max_error_bytes < 1:
            raise ValueError("max_response_bytes and max_error_bytes must be >= 1")
        self.max_response_bytes = max_response_bytes
        self.max_error_bytes = max_error_bytes
        self.scrubber = Scrubber(api_key.reveal() if api_key is not None else None)
        self.base_url = base_url.rstrip("/")
        self.backend = backend
        self._session = session
        self._owns_session = session is None
        # a CIMultiDict, as aiohttp keeps headers: it is not converted on every request
        self._headers: CIMultiDict[str] = CIMultiDict(
            {"Content-Type": "application/json", **(headers or {})}
        )
        self._api_key = api_key
        if api_key is not None:
            self._headers["Authorization"] = f"Bearer {api_key.reveal()}"
        # Connection-level limits only (connecting; silence on the socket, ``timeout``
        # unless ``read_timeout`` is given): a whole attempt is timed by the member.
        self._timeout = aiohttp.ClientTimeout(
            total=None,
            sock_connect=connect_timeout,
            sock_read=read_timeout if read_timeout is not None else timeout,
        )
        self._closed = False
        self._urls: dict[str, str] = {}

    @property
    def session(self) -> aiohttp.ClientSession:
        if self._closed:
            raise RuntimeError(f"transport for backend {self.backend!r} is closed")
        if self._session is None:
            self._session = new_session()
        return self._session

    async def aclose(self) -> None:
        self._closed = True
        if self._owns_session and self._session is not None:
            await self._session.close()
        self._session = None

    def url(self, path: str) -> str:
        return f"{self.base_url}/{path.lstrip('/')}"

    def scrub(self, text: str) -> str:
        """``text`` with the API key (which some servers quote back) masked."""
        return self.scrubber.scrub(text)

    def _decode(self, raw: bytes) -> str:
        """A body as scrubbed text (scrubbed as bytes and again once decoded)."""
        return self.scrubber.scrub(self.scrubber.scrub_bytes(raw).decode("utf-8", errors="replace"))

    def __repr__(self) -> str:  # never shows headers
        return f"<HTTPTransport {self.backend!r} {self.base_url}>"

    def _translated(self, exc: Exception) -> BaseException | None:
        """Our error for a transport failure ``exc`` (None: re-raise ``exc`` itself).
        A ``BackendError`` passes through, named after this backend."""
        if isinstance(exc, BackendError):
            if exc.backend is None:
                exc.backend = self.backend
            return None
        if isinstance(exc, TimeoutError | aiohttp.ServerTimeoutError):
            return RequestTimeoutError("request timed out", backend=self.backend)
        if isinstance(exc, aiohttp.ClientPayloadError):
            return MalformedResponseError(
                f"response body broken off: {type(exc).__name__}", backend=self.backend
            )
        if isinstance(exc, aiohttp.ClientConnectionError | ConnectionError):
            return ConnectError(
                f"connection to {self.base_url} failed: {type(exc).__name__}: {exc}",
                backend=self.backend,
            )
        if isinstance(exc, aiohttp.ClientError):
            return ConnectError(f"{type(exc).__name__}: {exc}", backend=self.backend)
        return None

    @asynccontextmanager
    async def _translate(self) -> AsyncIterator[None]:
        try:
            yield
        except Exception as exc:
            mapped = self._translated(exc)
            if mapped is None:
                raise
            raise mapped from exc

    async def _raise_for_status(self, resp: aiohttp.ClientResponse) -> None:
        if resp.status < 400:
            return
        body = await read_capped(resp, self.max_error_bytes, strict=False)
        raise error_from_status(
            resp.status,
            error_message(self._decode(body)),  # scrubbed before any cut
            backend=self.backend,
            retry_after=parse_retry_after(resp.headers.get("Retry-After")),
        )

    async def get(self, path: str, *, timeout: float | None = None) -> tuple[int, str]:
        """GET returning (status, scrubbed body text); errors only for transport failures
        and bodies over the limit (an error body is cut to ``max_error_bytes``)."""
        t = self._timeout if timeout is None else aiohttp.ClientTimeout(total=timeout)
        async with (
            self._translate(),
            self.session.get(self.url(path), headers=self._headers, timeout=t) as resp,
        ):
            if resp.status >= 400:
                raw = await read_capped(resp, self.max_error_bytes, strict=False)
            else:
                raw = await read_capped(resp, self.max_response_bytes, backend=self.backend)
            return resp.status, self._decode(raw)

    async def post_json(
        self,
        path: str,
        payload: Mapping[str, Any],
        *,
        response_headers: dict[str, str] | None = None,
    ) -> Any:
        """POST JSON and return the decoded JSON answer; non-2xx raises our error.
        ``response_headers``: the answer headers to read, as the keys of this dict; each
        one the answer has (matched without regard to case) gets its value.

        This runs once per generation request, so it avoids per-call helpers: the body
        is encoded here (``jsonio``: orjson when installed) and errors are translated
        by a plain ``except`` rather than a generator-based context manager.
        """
        url = self._urls.get(path)
        if url is None:
            url = self._urls[path] = self.url(path)
        body = jsonio.dumps(payload)
        try:
            async with self.session.post(
                url, data=body, headers=self._headers, timeout=self._timeout
            ) as resp:
                if resp.status >= 400:
                    await self._raise_for_status(resp)
                raw = self.scrubber.scrub_bytes(
                    await read_capped(resp, self.max_response_bytes, backend=self.backend)
                )
                if response_headers:
                    for name in response_headers:
                        value = resp.headers.get(name)
                        if value is not None:
                            response_headers[name] = value
        except Exception as exc:
            mapped = self._translated(exc)
            if mapped is None:
                raise
            raise mapped from exc
        try:
            return jsonio.loads(raw)
        except ValueError:
            raise MalformedResponseError(
                f"response is not JSON: {raw[:120]!r}", backend=self.backend
            ) from None

    async def post_sse(self, path: str, payload: Mapping[str, Any]) -> AsyncIterator[str]:
        """POST and yield each server-sent event's data; non-2xx raises our error."""
        async with (
            self._translate(),
            self.session.post(
                self.url(path),
                data=jsonio.dumps(payload),
                headers=self._headers,
                timeout=self._timeout,
            ) as resp,
        ):
            await self._raise_for_status(resp)
            async for data in iter_sse_data(resp.content, max_event_bytes=self.max_response_bytes):
                yield self.scrubber.scrub(data)

    def decode_event(self, data: str) -> Any:
        try:
            return jsonio.loads(data)
        except ValueError:
            raise MalformedResponseError(
                f"stream event is not JSON: {data[:120]!r}", backend=self.backend
            ) from None
