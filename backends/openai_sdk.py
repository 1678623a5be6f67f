"""The ``transport="sdk"`` wire of ``OpenAIBackend``: ``openai.AsyncOpenAI`` on aiohttp.

Imported only when that transport is chosen; ``openai`` is an optional dependency
(``pip install "ensemble-async[openai]"``).  The SDK makes exactly one attempt
(``max_retries=0``) and its exceptions become ours, Retry-After included.

Differences from the default transport, both documented in ``OpenAIBackend``:

- ``timeout`` bounds connecting and each network read, as with aiohttp (connection
  limits only: the member times a whole attempt).
- The SDK hides whether a stream ended with ``[DONE]``: a stream that closes cleanly
  after at least one chunk counts as finished, so a missing finish_reason reads
  ``unknown``; an empty stream is malformed.
"""

from __future__ import annotations

import json
from collections.abc import AsyncGenerator, Iterator, Mapping
from contextlib import contextmanager
from typing import Any

import aiohttp

from ensemble_async.errors import (
    BackendError,
    ConnectError,
    MalformedResponseError,
    RequestTimeoutError,
    error_from_status,
    parse_retry_after,
)
from ensemble_async.http import error_message
from ensemble_async.secret import Secret

from .openai import error_from_event

try:
    import openai
except ImportError:  # pragma: no cover - exercised only without the extra
    openai = None  # type: ignore[assignment]

__all__ = ["SDKWire"]


def _dump(obj: Any) -> Any:
    """A plain dict from an SDK model (or whatever the SDK returned)."""
    dump = getattr(obj, "model_dump", None)
    return dump(warnings=False) if callable(dump) else obj


class SDKWire:
    def __init__(
        self,
        base_url: str,
        *,
        backend: str,
        api_key: Secret | None,
        timeout: float | None,
        read_timeout: float | None,
        headers: Mapping[str, str] | None,
    ) -> None:
        if openai is None:
            raise ImportError(
                'transport="sdk" needs the openai package: pip install "ensemble-async[openai]"'
            )
        self.backend = backend
        connect = 10.0 if timeout is None else min(10.0, timeout)
        read = read_timeout if read_timeout is not None else timeout
        self._client = openai.AsyncOpenAI(
            base_url=base_url,
            # the SDK insists on a key; without ours it would read OPENAI_API_KEY and
            # send that to whatever server this is
            api_key=api_key.reveal() if api_key is not None else "EMPTY",
            max_retries=0,
            timeout=openai.Timeout(timeout, connect=connect, read=read),
            default_headers=dict(headers or {}),
            http_client=openai.DefaultAioHttpClient(),
        )

    def __repr__(self) -> str:
        return f"<SDKWire {self.backend!r}>"

    async def aclose(self) -> None:
        await self._client.close()

    def _endpoint(self, chat: bool) -> Any:
        return self._client.chat.completions if chat else self._client.completions

    async def create(self, chat: bool, body: dict[str, Any], vendor: dict[str, Any]) -> Any:
        with self._mapped():  # the SDK's own connect/read limits; the member times attempts
            result = await self._endpoint(chat).create(**body, extra_body=vendor or None)
        return _dump(result)

    async def stream(
        self, chat: bool, body: dict[str, Any], vendor: dict[str, Any]
    ) -> AsyncGenerator[Any, None]:
        with self._mapped():
            chunks = await self._endpoint(chat).create(**body, extra_body=vendor or None)
            seen = False
            try:
                async for chunk in chunks:
                    seen = True
                    yield _dump(chunk)
            finally:
                await chunks.close()
        if seen:  # the SDK stops at [DONE] or at a clean end of a non-empty body
            yield None

    def _broken(self, exc: BaseException) -> BackendError:
        """Name a transport failure by its root cause.  (The SDK's vendored aiohttp
        layer reports a dropped connection as a connect *timeout*; we look deeper.)"""
        chain = [exc]
        while len(chain) < 10 and (nxt := chain[-1].__cause__ or chain[-1].__context__):
            chain.append(nxt)
        if any(isinstance(e, aiohttp.ClientPayloadError) for e in chain):
            return MalformedResponseError("response body broken off", backend=self.backend)
        for e in chain:
            if isinstance(e, aiohttp.ClientConnectionError | ConnectionError) and not isinstance(
                e, TimeoutError
            ):
                detail = f"{type(e).__name__}: {e}"
                return ConnectError(f"connection failed: {detail}", backend=self.backend)
        if isinstance(exc, openai.APITimeoutError | TimeoutError):
            return RequestTimeoutError("request timed out", backend=self.backend)
        return ConnectError(f"connection failed: {exc}", backend=self.backend)

    @contextmanager
    def _mapped(self) -> Iterator[None]:
        """Turn the SDK's exceptions into ours (never showing request headers)."""
        try:
            yield
        except BackendError:
            raise
        except openai.APIStatusError as exc:
            raise error_from_status(
                exc.status_code,
                _message(exc.body, exc.message),
                backend=self.backend,
                retry_after=parse_retry_after(exc.response.headers.get("retry-after")),
            ) from exc
        except (openai.APIConnectionError, TimeoutError) as exc:  # timeouts included
            raise self._broken(exc) from exc
        except openai.APIResponseValidationError as exc:
            raise MalformedResponseError(exc.message, backend=self.backend) from exc
        except openai.APIError as exc:  # an error event inside a stream
            body = exc.body if isinstance(exc.body, Mapping) else {"message": exc.message}
            raise error_from_event(body, backend=self.backend) from exc
        except ValueError as exc:  # JSON that does not parse
            raise MalformedResponseError(
                f"answer is not JSON: {type(exc).__name__}", backend=self.backend
            ) from exc


def _message(body: object, fallback: str) -> str:
    if isinstance(body, Mapping):
        for key in ("message", "detail", "error"):
            if isinstance(body.get(key), str):
                return str(body[key])
        return json.dumps(body)[:500]
    if isinstance(body, str):
        return error_message(body)
    return fallback
