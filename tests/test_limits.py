"""Bounded resources: what a server sends is bounded while it is read, never after.

Against hand-written loopback servers that flood: an endless 200 body, an endless error
body, an endless SSE line, a completion far over the limit (whole or streamed).  Each
ends in a classified error, with small limits so that the tests stay quick; the server
counts what it managed to write before the client went away, which shows that reading
stopped near the limit rather than at the end of a timeout.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest
from rogue import Rogue, endless, openai_answer, openai_chunk, reply, sse, tgi_final, tgi_token

from ensemble_async import errors
from ensemble_async.backend import Backend, stream_of
from ensemble_async.backends.openai import OpenAIBackend
from ensemble_async.backends.tgi import TGIBackend
from ensemble_async.member import Member
from ensemble_async.retry import RetryPolicy, is_retryable
from ensemble_async.types import GenerationRequest

LIMIT = 64 * 1024
BOUND_S = 10.0
REQUEST = GenerationRequest(prompt="Say something.", max_new_tokens=8)


@pytest.fixture
async def rogue() -> AsyncIterator[Rogue]:
    async with Rogue() as server:
        yield server


def tgi(url: str, **options: Any) -> Backend:
    return TGIBackend(url, name="flooded-tgi", **options)


def openai(url: str, **options: Any) -> Backend:
    return OpenAIBackend(url, name="flooded-openai", model="rogue-model", **options)


def openai_sdk(url: str, **options: Any) -> Backend:
    pytest.importorskip("openai")
    return OpenAIBackend(url, name="flooded-sdk", model="rogue-model", transport="sdk", **options)


ADAPTERS: list[Callable[..., Backend]] = [tgi, openai, openai_sdk]


async def drain(backend: Backend, request: GenerationRequest = REQUEST) -> list[Any]:
    return [event async for event in stream_of(backend, request)]


def test_too_large_is_classified_and_not_retried() -> None:
    exc = errors.ResponseTooLargeError("x")
    assert isinstance(exc, errors.MalformedResponseError)
    assert not is_retryable(exc)


@pytest.mark.parametrize("adapter", ADAPTERS)
async def test_an_endless_200_body_stops_at_the_limit(
    rogue: Rogue, adapter: Callable[..., Backend]
) -> None:
    rogue.handler = endless(rogue, head=b'{"generated_text": "')
    async with adapter(rogue.url, max_response_bytes=LIMIT) as backend:
        with pytest.raises(errors.ResponseTooLargeError, match="limit"):
            await asyncio.wait_for(backend.generate(REQUEST), BOUND_S)
    # (measured: about 0.3 MiB written; the socket buffers hold a few MiB at most, and an
    # unbounded read would go on until the timeout, writing hundreds of MiB)
    assert rogue.sent < 16 * 1024 * 1024


@pytest.mark.parametrize("adapter", ADAPTERS)
async def test_a_content_length_over_the_limit_is_refused_at_once(
    rogue: Rogue, adapter: Callable[..., Backend]
) -> None:
    rogue.handler = reply(b"{" + b" " * (2 * LIMIT) + b"}")
    async with adapter(rogue.url, max_response_bytes=LIMIT) as backend:
        with pytest.raises(errors.ResponseTooLargeError):
            await asyncio.wait_for(backend.generate(REQUEST), BOUND_S)


@pytest.mark.parametrize("adapter", [tgi, openai])
async def test_an_endless_error_body_is_read_only_in_part(
    rogue: Rogue, adapter: Callable[..., Backend]
) -> None:
    rogue.handler = endless(rogue, status=500, head=b'{"error": "', chunk=b"e" * 4096)
    async with adapter(rogue.url) as backend:  # the default limits
        with pytest.raises(errors.ServerError) as info:
            await asyncio.wait_for(backend.generate(REQUEST), BOUND_S)
    assert len(info.value.message) <= 500
    assert rogue.sent < 16 * 1024 * 1024


@pytest.mark.parametrize("adapter", ADAPTERS)
async def test_an_sse_line_without_end_stops_at_the_limit(
    rogue: Rogue, adapter: Callable[..., Backend]
) -> None:
    rogue.handler = endless(rogue, head=b"data: {", chunk=b"y" * 8192)
    async with adapter(rogue.url, max_response_bytes=LIMIT) as backend:
        with pytest.raises(errors.MalformedResponseError):
            await asyncio.wait_for(drain(backend), BOUND_S)
    assert rogue.sent < 16 * 1024 * 1024


def _long_answer(kind: str, size: int) -> Any:
    if kind == "tgi":
        return tgi_final("w" * size)
    return openai_answer("w" * size)


@pytest.mark.parametrize("adapter", ADAPTERS)
async def test_a_completion_over_the_limit_is_refused(
    rogue: Rogue, adapter: Callable[..., Backend]
) -> None:
    kind = "tgi" if adapter is tgi else "openai"
    rogue.handler = reply(_long_answer(kind, 5000))
    async with adapter(rogue.url, max_completion_chars=1000) as backend:
        with pytest.raises(errors.ResponseTooLargeError, match="1000"):
            await backend.generate(REQUEST)
        # just under the limit is fine
        rogue.handler = reply(_long_answer(kind, 1000))
        [ok] = await backend.generate(REQUEST)
    assert len(ok.text) == 1000


@pytest.mark.parametrize("adapter", ADAPTERS)
async def test_a_streamed_completion_over_the_limit_stops_while_reading(
    rogue: Rogue, adapter: Callable[..., Backend]
) -> None:
    if adapter is tgi:
        events: list[Any] = [tgi_token("w" * 100) for _ in range(50)] + [tgi_final("")]
    else:
        events = [openai_chunk("w" * 100) for _ in range(50)] + ["[DONE]"]
    rogue.handler = sse(events)
    async with adapter(rogue.url, max_completion_chars=1000) as backend:
        got: list[Any] = []
        with pytest.raises(errors.ResponseTooLargeError):
            async for event in stream_of(backend, REQUEST):
                got.append(event)
    assert sum(len(e.text) for e in got) <= 1000  # deltas stopped at the limit


async def test_the_member_does_not_retry_a_flood(rogue: Rogue) -> None:
    rogue.handler = reply(tgi_final("w" * 5000))
    member = Member(
        TGIBackend(rogue.url, max_completion_chars=100),
        retry=RetryPolicy(max_attempts=3, initial_backoff_s=0),
    )
    async with member:
        with pytest.raises(errors.ResponseTooLargeError):
            await member.generate(REQUEST)
        snap = member.snapshot()
    assert snap["retried"] == 0 and len(rogue.bodies) == 1


def test_limits_must_be_positive() -> None:
    with pytest.raises(ValueError):
        TGIBackend("http://127.0.0.1:9", max_completion_chars=0)
    with pytest.raises(ValueError):
        OpenAIBackend("http://127.0.0.1:9", max_response_bytes=0)
