"""The HTTP transport shared by the remote adapters: JSON requests, server-sent events,
and the mapping of transport failures to our errors.

JSON exchanges (every generation request, ``GET /info``) go over ``wire.Origin``, a lean
keep-alive HTTP/1.1 client; streams go over a pooled aiohttp session. A session the
caller passes in (one not made by ``new_session``) carries everything, so a user's own
session settings (proxies, tracing) apply; ``ENSEMBLE_ASYNC_HTTP=aiohttp`` does the same
for every transport. Adapters speak their protocol on top of ``HTTPTransport``; nothing
here retries.
"""

from __future__ import annotations

import asyncio
import json
import os
import weakref
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from typing import Any
from urllib.parse import urlsplit

import aiohttp
from multidict import CIMultiDict

from . import jsonio
from .errors import (
    BackendError,
    BadRequestError,
    ConnectError,
    MalformedResponseError,
    RequestTimeoutError,
    ResponseTooLargeError,
    error_from_status,
    parse_retry_after,
)
from .scrub import Scrubber
from .secret import Secret
from .wire import Origin, build_head, check_header

__all__ = [
    "DEFAULT_MAX_ERROR_BYTES",
    "DEFAULT_MAX_RESPONSE_BYTES",
    "WIRE",
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


WIRE = os.environ.get("ENSEMBLE_ASYNC_HTTP", "").strip().lower() != "aiohttp"
"""Whether JSON exchanges use the lean client (``wire``); ``ENSEMBLE_ASYNC_HTTP=aiohttp``
turns it off (e.g. to measure what it buys)."""

USER_AGENT = "ensemble-async"

_OURS: weakref.WeakSet[aiohttp.ClientSession] = weakref.WeakSet()
"""Sessions made by ``new_session``: a transport given one of these still uses the lean
client for JSON; any other session is the caller's, and carries every request."""


def new_session(*, limit: int = 0) -> aiohttp.ClientSession:
    """A pooled session; ``limit`` caps open connections (0 = no cap, admission is the
    scheduler's job).  Timeouts are set per request."""
    connector = aiohttp.TCPConnector(limit=limit, limit_per_host=0, ttl_dns_cache=300)
    session = aiohttp.ClientSession(
        connector=connector,
        timeout=aiohttp.ClientTimeout(total=None),
        json_serialize=json.dumps,
    )
    _OURS.add(session)
    return session


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

    ``wire``: whether JSON exchanges go over the lean client (``wire.Origin``); None
    (the default) means yes unless ``ENSEMBLE_ASYNC_HTTP=aiohttp`` or ``session`` is the
    caller's own (not from ``new_session``).
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
        wire: bool | None = None,
    ) -> None:
        if max_response_bytes < 1 or max_error_bytes < 1:
            raise ValueError("max_response_bytes and max_error_bytes must be >= 1")
        if "@" in urlsplit(base_url).netloc:
            # it would be echoed in every connection error, and sent by neither client
            # the same way; the URL itself is not quoted (the part before "@" is secret)
            raise ValueError(
                f"backend {backend!r}: the base URL carries credentials (user:password@); "
                "pass the key as api_key instead"
            )
        if wire is None:
            wire = WIRE and (session is None or session in _OURS)
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
        for name, value in self._headers.items():
            check_header(name, value)
        self._api_key = api_key
        if api_key is not None:
            self._headers["Authorization"] = f"Bearer {api_key.reveal()}"
        if "User-Agent" not in self._headers:
            self._headers["User-Agent"] = USER_AGENT
        # Connection-level limits only (connecting; silence on the socket, ``timeout``
        # unless ``read_timeout`` is given): a whole attempt is timed by the member.
        self._timeout = aiohttp.ClientTimeout(
            total=None,
            sock_connect=connect_timeout,
            sock_read=read_timeout if read_timeout is not None else timeout,
        )
        self._closed = False
        self._origin: Origin | None = None
        if wire:
            self._origin = Origin(
                self.base_url,
                connect_timeout=connect_timeout,
                read_timeout=read_timeout if read_timeout is not None else timeout,
            )
        self._heads: dict[tuple[str, str], bytes] = {}

    @property
    def session(self) -> aiohttp.ClientSession:
        if self._closed:
            raise RuntimeError(f"transport for backend {self.backend!r} is closed")
        if self._session is None:
            self._session = new_session()
        return self._session

    async def aclose(self) -> None:
        self._closed = True
        if self._origin is not None:
            await self._origin.aclose()
        if self._owns_session and self._session is not None:
            await self._session.close()
        self._session = None

    def _head(self, method: str, path: str) -> bytes:
        """The request line and headers for ``method path`` over the lean client."""
        head = self._heads.get((method, path))
        if head is None:
            assert self._origin is not None
            head = self._heads[method, path] = build_head(
                method, self._origin.target(path), self._origin.host_header, self._headers
            )
        return head

    async def _exchange(
        self, method: str, path: str, body: bytes
    ) -> tuple[int, dict[str, str], bytes]:
        """One JSON exchange over the lean client, transport failures mapped to ours;
        a redirect is a ``BadRequestError`` (the URL should name the final address)."""
        if self._closed:
            raise RuntimeError(f"transport for backend {self.backend!r} is closed")
        assert self._origin is not None
        try:
            answer = await self._origin.request(
                self._head(method, path), body, self.max_response_bytes, self.max_error_bytes
            )
        except Exception as exc:
            mapped = self._translated(exc)
            if mapped is None:
                raise
            raise mapped from exc
        status = answer[0]
        if 300 <= status < 400:
            where = self.scrub(answer[1].get("location", "elsewhere"))[:200]
            raise BadRequestError(
                f"server redirects {method} {path} to {where}: give the final URL",
                backend=self.backend,
                status=status,
            )
        return answer

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
        if isinstance(exc, aiohttp.ClientConnectionError | OSError):
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

    def _status_error(self, status: int, body: bytes, retry_after: str | None) -> BackendError:
        """Our error for an answer with status >= 400 and (at most ``max_error_bytes`` of)
        its body."""
        return error_from_status(
            status,
            error_message(self._decode(body)),  # scrubbed before any cut
            backend=self.backend,
            retry_after=parse_retry_after(retry_after),
        )

    async def _raise_for_status(self, resp: aiohttp.ClientResponse) -> None:
        if resp.status < 400:
            return
        body = await read_capped(resp, self.max_error_bytes, strict=False)
        raise self._status_error(resp.status, body, resp.headers.get("Retry-After"))

    async def get(self, path: str, *, timeout: float | None = None) -> tuple[int, str]:
        """GET returning (status, scrubbed body text); errors only for transport failures
        and bodies over the limit (an error body is cut to ``max_error_bytes``)."""
        if self._origin is not None:
            try:
                async with asyncio.timeout(timeout):
                    status, _, raw = await self._exchange("GET", path, b"")
            except TimeoutError:
                raise RequestTimeoutError(
                    f"GET {path} took over {timeout} s", backend=self.backend
                ) from None
            return status, self._decode(raw)
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

        This runs once per generation request: the body is encoded once (``jsonio``:
        orjson when installed), and the lean client's path (``_exchange``) translates
        errors by a plain ``except`` rather than a generator-based context manager.
        """
        body = jsonio.dumps(payload)
        if self._origin is not None:
            status, headers, raw = await self._exchange("POST", path, body)
            if status >= 400:
                raise self._status_error(status, raw, headers.get("retry-after"))
            if response_headers:
                for name in response_headers:
                    value = headers.get(name.lower())
                    if value is not None:
                        response_headers[name] = value
        else:
            async with (
                self._translate(),
                self.session.post(
                    self.url(path), data=body, headers=self._headers, timeout=self._timeout
                ) as resp,
            ):
                await self._raise_for_status(resp)
                raw = await read_capped(resp, self.max_response_bytes, backend=self.backend)
                if response_headers:
                    for name in response_headers:
                        value = resp.headers.get(name)
                        if value is not None:
                            response_headers[name] = value
        return self._parse(self.scrubber.scrub_bytes(raw))

    def _parse(self, raw: bytes) -> Any:
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
