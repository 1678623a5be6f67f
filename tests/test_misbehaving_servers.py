"""Servers that misbehave without failing: they hang, trickle tokens forever, or answer
200 with nothing.  The adapters must turn each into the right retryable error within a
bounded time, and an ensemble with one healthy member must go on deciding items.

What bounds what (checked here):

* ``generate()`` has no end of its own on a hanging or trickling server; the
  ``Member``'s per-attempt ``timeout_s`` bounds it (-> ``RequestTimeoutError``).
* A stream that trickles a token every fraction of a second never trips the adapter's
  ``read_timeout`` (aiohttp's ``sock_read``: the longest silence between reads; the
  adapters keep only such connection-level limits); the ``Member``'s per-attempt
  ``timeout_s`` ends it (``Member.stream``).  ``read_timeout`` ends a stream that goes
  silent.

The servers are tiny aiohttp apps on loopback in this process.  Bounds are generous
(``asyncio.wait_for`` with 10 s) so that a loaded machine cannot fail them; they are not
speed measurements.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest
from aiohttp import web

from ensemble_async.backend import Backend, stream_of
from ensemble_async.backends.openai import OpenAIBackend
from ensemble_async.backends.tgi import TGIBackend
from ensemble_async.ensemble import Ensemble
from ensemble_async.errors import MalformedResponseError, RequestTimeoutError
from ensemble_async.member import Member
from ensemble_async.retry import RetryPolicy
from ensemble_async.testing._server import LoopbackServer
from ensemble_async.testing.openai_double import OpenAIDouble
from ensemble_async.testing.tgi_double import TGIDouble
from ensemble_async.types import Completion, GenerationRequest, TextDelta

BOUND_S = 10.0
"""Far above what any case needs (about 1-2 s); only a hang would reach it."""
TOKEN_GAP_S = 0.3
"""The trickling servers' pause between tokens: shorter than the read timeouts used."""

REQUEST = GenerationRequest(prompt="Say something.", max_new_tokens=8)

_INFO = {
    "model_id": "bad/tgi",
    "max_concurrent_requests": 8,
    "max_best_of": 2,
    "max_stop_sequences": 4,
    "max_input_tokens": 1000,
    "max_total_tokens": 2000,
}
_MODELS = {"object": "list", "data": [{"id": "bad-model", "object": "model"}]}


def _tgi_event(i: int) -> bytes:
    token = {"id": i, "text": " tok", "logprob": -0.1, "special": False}
    return (
        f"data:{json.dumps({'token': token, 'generated_text': None, 'details': None})}\n\n".encode()
    )


def _openai_event(i: int, chat: bool) -> bytes:
    choice: dict[str, Any] = {"index": 0, "finish_reason": None}
    if chat:
        choice["delta"] = {"content": " tok"}
    else:
        choice["text"] = " tok"
    return f"data: {json.dumps({'id': str(i), 'choices': [choice]})}\n\n".encode()


class Misbehaving(LoopbackServer):
    """Answers /info, /health and /v1/models properly (so that only generation
    misbehaves) and every generation route, TGI's and OpenAI's, with ``behaviour``:

    * ``hang``: accept the request and never answer;
    * ``silent``: send 200 and SSE headers, then nothing;
    * ``trickle``: send 200 and one token event every ``TOKEN_GAP_S``, forever;
    * ``empty``: 200 with an empty body.
    """

    shutdown_timeout = 0.5

    def __init__(self, behaviour: str) -> None:
        super().__init__()
        self.behaviour = behaviour
        self.requests = 0

    def routes(self, app: web.Application) -> None:
        app.router.add_get("/info", self._info)
        app.router.add_get("/health", self._health)
        app.router.add_get("/v1/models", self._models)
        for path in ("/generate", "/generate_stream", "/", "/v1/completions"):
            app.router.add_post(path, self._generation)
        app.router.add_post("/v1/chat/completions", self._generation)

    async def _info(self, request: web.Request) -> web.Response:
        return web.json_response(_INFO)

    async def _health(self, request: web.Request) -> web.Response:
        return web.Response()

    async def _models(self, request: web.Request) -> web.Response:
        return web.json_response(_MODELS)

    async def _generation(self, request: web.Request) -> web.StreamResponse:
        self.requests += 1
        await request.read()
        if self.behaviour == "hang":
            await self._stopping.wait()
            return web.Response(status=503)
        if self.behaviour == "empty":
            return web.Response(status=200, body=b"", content_type="application/json")
        resp = web.StreamResponse(status=200, headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        if self.behaviour == "silent":
            await self._stopping.wait()
            return resp
        tgi = not request.path.startswith("/v1/")
        chat = request.path.endswith("/chat/completions")
        i = 0
        while not self._stopping.is_set():
            await resp.write(_tgi_event(i) if tgi else _openai_event(i, chat))
            i += 1
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stopping.wait(), TOKEN_GAP_S)
        return resp


@pytest.fixture(params=["hang", "trickle", "silent", "empty"])
async def bad_server(request: pytest.FixtureRequest) -> AsyncIterator[Misbehaving]:
    async with Misbehaving(request.param) as server:
        yield server


Factory = Callable[..., Backend]


def tgi(url: str, **options: Any) -> Backend:
    return TGIBackend(url, name="bad-tgi", **options)


def openai_completions(url: str, **options: Any) -> Backend:
    return OpenAIBackend(url, name="bad-openai", model="bad-model", **options)


def openai_chat(url: str, **options: Any) -> Backend:
    return OpenAIBackend(url, name="bad-chat", model="bad-model", mode="chat", **options)


ADAPTERS = [tgi, openai_completions, openai_chat]
EXPECTED = {
    "hang": RequestTimeoutError,
    "trickle": RequestTimeoutError,
    "silent": RequestTimeoutError,
    "empty": MalformedResponseError,
}


def member(backend: Backend) -> Member:
    return Member(
        backend,
        timeout_s=0.5,
        retry=RetryPolicy(max_attempts=2, initial_backoff_s=0.01, max_backoff_s=0.02),
    )


@pytest.mark.parametrize("adapter", ADAPTERS)
async def test_generate_ends_with_the_right_error_after_retrying(
    bad_server: Misbehaving, adapter: Factory
) -> None:
    async with member(adapter(bad_server.url)) as m:
        with pytest.raises(EXPECTED[bad_server.behaviour]):
            await asyncio.wait_for(m.generate(REQUEST), BOUND_S)
        snap = m.snapshot()
    # both errors are retryable: the member tried twice, then gave up
    assert snap["retried"] == 1 and snap["failed"] == 1 and snap["in_flight"] == 0
    assert 1 <= bad_server.requests <= 2  # (the second may not have reached it yet)


async def _drain(backend: Backend) -> tuple[int, Completion | None]:
    deltas, final = 0, None
    async for event in stream_of(backend, REQUEST):
        if isinstance(event, TextDelta):
            deltas += 1
        else:
            final = event
    return deltas, final


@pytest.mark.parametrize("adapter", ADAPTERS)
async def test_a_trickling_stream_is_ended_by_the_members_attempt_timeout(
    adapter: Factory,
) -> None:
    deltas = 0

    async def count(member: Member) -> None:
        nonlocal deltas
        async for event in member.stream(REQUEST):
            deltas += isinstance(event, TextDelta)

    # a read timeout longer than the gap between tokens never fires on its own
    async with (
        Misbehaving("trickle") as server,
        adapter(server.url, read_timeout=1.0) as backend,
    ):
        member = Member(backend, timeout_s=1.5, retry=RetryPolicy.never())
        with pytest.raises(RequestTimeoutError):
            await asyncio.wait_for(count(member), BOUND_S)
    assert deltas >= 1  # tokens did arrive: the stream was alive, just endless


@pytest.mark.parametrize("adapter", ADAPTERS)
async def test_a_silent_stream_is_ended_by_the_read_timeout(adapter: Factory) -> None:
    async with (
        Misbehaving("silent") as server,
        adapter(server.url, timeout=None, read_timeout=0.5) as backend,
    ):
        with pytest.raises(RequestTimeoutError):
            await asyncio.wait_for(_drain(backend), BOUND_S)


@pytest.mark.parametrize("adapter", ADAPTERS)
async def test_an_empty_stream_is_malformed(adapter: Factory) -> None:
    async with Misbehaving("empty") as server, adapter(server.url, timeout=5.0) as backend:
        with pytest.raises(MalformedResponseError):
            await asyncio.wait_for(_drain(backend), BOUND_S)


@pytest.mark.parametrize("adapter", [tgi, openai_completions])
async def test_the_ensemble_goes_on_with_one_healthy_member(
    bad_server: Misbehaving, adapter: Factory
) -> None:
    healthy_double: TGIDouble | OpenAIDouble = (
        TGIDouble() if adapter is tgi else OpenAIDouble(model="bad-model")
    )
    async with healthy_double:
        healthy_backend = (
            TGIBackend(healthy_double.url, name="healthy")
            if adapter is tgi
            else OpenAIBackend(healthy_double.url, name="healthy", model="bad-model")
        )
        healthy = Member(healthy_backend, retry=RetryPolicy(max_attempts=2))
        bad = member(adapter(bad_server.url))
        ensemble = Ensemble([healthy, bad], min_candidates=1)  # one voice is enough here
        items = [
            GenerationRequest(prompt=f"Item {i}: name a colour.", max_new_tokens=8, seed=i)
            for i in range(6)
        ]

        async def decide_all() -> list[Any]:
            return [r async for r in ensemble.map(items, ordered=True)]

        try:
            results = await asyncio.wait_for(decide_all(), 3 * BOUND_S)
        finally:
            await ensemble.aclose()
    assert [r.index for r in results] == list(range(len(items)))
    for result in results:
        ok, failed = result.candidates
        assert ok.source == "healthy" and ok.status == "ok" and ok.text
        assert failed.status in ("unavailable", "circuit_open")
        assert failed.error and (
            failed.error.startswith(EXPECTED[bad_server.behaviour].__name__)
            or failed.error.startswith("CircuitOpenError")
        )
        # the one answer there is carries the item
        assert result.kept and result.winner is ok and result.text == ok.text.strip()
    assert healthy.snapshot()["done"] == len(items)
    assert bad.snapshot()["done"] == 0
