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

from .errors import (
    BackendError,
    ConnectError,
    MalformedResponseError,
    RequestTimeoutError,
    error_from_status,
    parse_retry_after,
)
from .secret import Secret

__all__ = ["HTTPTransport", "error_message", "iter_sse_data", "new_session"]

_MAX_ERROR_CHARS = 500


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
    """The human part of an error body, for TGI, vLLM/OpenAI (nested or flat) or text."""
    text = body.strip()
    try:
        data = json.loads(text)
    except ValueError:
        return text[:_MAX_ERROR_CHARS] or "empty error body"
    if isinstance(data, dict):
        err = data.get("error", data)
        if isinstance(err, dict):
            msg = err.get("message") or err.get("detail") or json.dumps(err)[:_MAX_ERROR_CHARS]
            return str(msg)[:_MAX_ERROR_CHARS]
        if isinstance(err, str):
            kind = data.get("error_type")
            return f"{err} ({kind})"[:_MAX_ERROR_CHARS] if kind else err[:_MAX_ERROR_CHARS]
        if "detail" in data:
            return str(data["detail"])[:_MAX_ERROR_CHARS]
    return text[:_MAX_ERROR_CHARS]


async def iter_sse_data(content: aiohttp.StreamReader) -> AsyncIterator[str]:
    """Yield the data of each server-sent event.

    Accepts ``data:`` with or without the space, joins multi-line data, skips comment
    (``:``) and other field lines, and copes with lines of any length.
    """
    buffer = b""
    data_lines: list[str] = []
    async for chunk in content.iter_any():
        buffer += chunk
        while True:
            cut = buffer.find(b"\n")
            if cut < 0:
                break
            raw, buffer = buffer[:cut], buffer[cut + 1 :]
            line = raw.rstrip(b"\r").decode("utf-8", errors="replace")
            if not line:
                if data_lines:
                    yield "\n".join(data_lines)
                    data_lines = []
                continue
            if line.startswith(":"):
                continue
            field, _, value = line.partition(":")
            if field == "data":
                data_lines.append(value[1:] if value.startswith(" ") else value)
    tail = buffer.rstrip(b"\r").decode("utf-8", errors="replace")
    if tail.startswith("data:"):
        value = tail[5:]
        data_lines.append(value[1:] if value.startswith(" ") else value)
    if data_lines:
        yield "\n".join(data_lines)


class HTTPTransport:
    """JSON and SSE over one pooled aiohttp session, errors mapped to ours.

    The session is shared when given (and then not closed here), else created lazily
    and closed by ``aclose``.  ``api_key`` is sent as a bearer token and never shown.
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
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self.backend = backend
        self._session = session
        self._owns_session = session is None
        self._headers = {"Content-Type": "application/json", **(headers or {})}
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
        """``text`` with the API key (which some servers quote back) replaced by ``***``."""
        secret = self._api_key.reveal() if self._api_key is not None else ""
        return text.replace(secret, "***") if secret else text

    def __repr__(self) -> str:  # never shows headers
        return f"<HTTPTransport {self.backend!r} {self.base_url}>"

    @asynccontextmanager
    async def _translate(self) -> AsyncIterator[None]:
        try:
            yield
        except BackendError:
            raise
        except (TimeoutError, aiohttp.ServerTimeoutError) as exc:
            raise RequestTimeoutError("request timed out", backend=self.backend) from exc
        except aiohttp.ClientPayloadError as exc:
            raise MalformedResponseError(
                f"response body broken off: {type(exc).__name__}", backend=self.backend
            ) from exc
        except (aiohttp.ClientConnectionError, ConnectionError) as exc:
            raise ConnectError(
                f"connection to {self.base_url} failed: {type(exc).__name__}: {exc}",
                backend=self.backend,
            ) from exc
        except aiohttp.ClientError as exc:
            raise ConnectError(f"{type(exc).__name__}: {exc}", backend=self.backend) from exc

    async def _raise_for_status(self, resp: aiohttp.ClientResponse) -> None:
        if resp.status < 400:
            return
        body = await resp.text(errors="replace")
        raise error_from_status(
            resp.status,
            error_message(self.scrub(body)),  # scrub before any cut to 500 chars
            backend=self.backend,
            retry_after=parse_retry_after(resp.headers.get("Retry-After")),
        )

    async def get(self, path: str, *, timeout: float | None = None) -> tuple[int, str]:
        """GET returning (status, body text); errors only for transport failures."""
        t = self._timeout if timeout is None else aiohttp.ClientTimeout(total=timeout)
        async with (
            self._translate(),
            self.session.get(self.url(path), headers=self._headers, timeout=t) as resp,
        ):
            return resp.status, await resp.text(errors="replace")

    async def post_json(
        self,
        path: str,
        payload: Mapping[str, Any],
        *,
        response_headers: dict[str, str] | None = None,
    ) -> Any:
        """POST JSON and return the decoded JSON answer; non-2xx raises our error.
        ``response_headers``, when given, receives the answer's headers."""
        async with (
            self._translate(),
            self.session.post(
                self.url(path), json=payload, headers=self._headers, timeout=self._timeout
            ) as resp,
        ):
            await self._raise_for_status(resp)
            raw = await resp.read()
            if response_headers is not None:
                response_headers.update(resp.headers)
        try:
            return json.loads(raw)
        except ValueError as exc:
            raise MalformedResponseError(
                f"response is not JSON: {raw[:120]!r}", backend=self.backend
            ) from exc

    async def post_sse(self, path: str, payload: Mapping[str, Any]) -> AsyncIterator[str]:
        """POST and yield each server-sent event's data; non-2xx raises our error."""
        async with (
            self._translate(),
            self.session.post(
                self.url(path), json=payload, headers=self._headers, timeout=self._timeout
            ) as resp,
        ):
            await self._raise_for_status(resp)
            async for data in iter_sse_data(resp.content):
                yield data

    def decode_event(self, data: str) -> Any:
        try:
            return json.loads(data)
        except ValueError as exc:
            raise MalformedResponseError(
                f"stream event is not JSON: {data[:120]!r}", backend=self.backend
            ) from exc
