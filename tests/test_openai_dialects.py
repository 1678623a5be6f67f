"""OpenAI-compatible servers differ; the adapter copes (both transports).

``Strict`` behaves like ``transformers serve`` and the hosted API: it refuses fields it
does not know with a 422 naming them, ignores ``stop`` and ``n``, and ends streams
without ``[DONE]``.  The adapter learns which fields to leave out (one resend per learnt
set, logged once: negotiation, not a retry), cuts every text at its first stop string
itself, learns whether ``n`` is honoured, and treats a validation error under a 500 as
a bad request.
"""

from __future__ import annotations

import json
import logging
import textwrap
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any, cast

import pytest
from aiohttp import web

from ensemble_async import errors
from ensemble_async.assemble import build_members
from ensemble_async.backend import info_of
from ensemble_async.backends.openai import OpenAIBackend, TransportName
from ensemble_async.config import load_config
from ensemble_async.member import Member
from ensemble_async.retry import RetryPolicy
from ensemble_async.testing._server import LoopbackServer
from ensemble_async.testing.openai_double import OpenAIDouble
from ensemble_async.types import Completion, GenerationRequest, TextDelta

STANDARD = {
    "model",
    "prompt",
    "messages",
    "max_tokens",
    "temperature",
    "top_p",
    "n",
    "stop",
    "seed",
    "stream",
    "stream_options",
}
TEXT = "The river runs. END of the story"


class Strict(LoopbackServer):
    def __init__(self, *, standard: set[str] = STANDARD, always_refuse: bool = False) -> None:
        super().__init__()
        self.standard = standard
        self.always_refuse = always_refuse
        self.bodies: list[dict[str, Any]] = []
        self.validation_500 = False

    def routes(self, app: web.Application) -> None:
        app.router.add_get("/v1/models", self._models)
        app.router.add_post("/v1/completions", self._create)
        app.router.add_post("/v1/chat/completions", self._create)

    async def _models(self, request: web.Request) -> web.Response:
        return web.json_response({"data": [{"id": "strict-model"}]})

    async def _create(self, request: web.Request) -> web.StreamResponse:
        body = await request.json()
        self.bodies.append(body)
        if self.validation_500:
            detail = "1 validation error for CompletionRequest\nmax_tokens\n  Input should be"
            return web.json_response({"detail": detail}, status=500)
        unknown = set(body) - self.standard
        if self.always_refuse:
            unknown = {"top_k"}
        if unknown:
            message = f"Unexpected fields in the request: {sorted(unknown)!r}"
            return web.json_response({"detail": message}, status=422)
        chat = request.path.endswith("/chat/completions")
        if not body.get("stream"):
            choice: dict[str, Any] = {"index": 0, "finish_reason": "stop"}
            if chat:
                choice["message"] = {"role": "assistant", "content": TEXT}
            else:
                choice["text"] = TEXT
            return web.json_response({"model": "strict-model", "choices": [choice]})
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        words = TEXT.split(" ")
        for i, word in enumerate(words):
            piece = word if i == 0 else " " + word
            reason = "stop" if i == len(words) - 1 else None
            delta: dict[str, Any] = {"index": 0, "finish_reason": reason}
            if chat:
                delta["delta"] = {"content": piece}
            else:
                delta["text"] = piece
            await resp.write(f"data: {json.dumps({'choices': [delta]})}\n\n".encode())
        await resp.write_eof()  # no [DONE]
        return resp


@pytest.fixture
async def strict() -> AsyncIterator[Strict]:
    async with Strict() as server:
        yield server


@pytest.fixture(params=["aiohttp", "sdk"])
def transport(request: pytest.FixtureRequest) -> TransportName:
    if request.param == "sdk":
        pytest.importorskip("openai")
    return cast(TransportName, request.param)


VLLM_STYLE = GenerationRequest(prompt="Tell me", max_new_tokens=16, top_k=5, min_new_tokens=2)


async def test_refused_fields_are_learnt_once_and_left_out(
    strict: Strict, transport: TransportName, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING)
    member = Member(
        OpenAIBackend(strict.url, name="strict", transport=transport),
        retry=RetryPolicy(max_attempts=1),  # the resend is no retry: one attempt suffices
    )
    async with member:
        [first] = await member.generate(VLLM_STYLE)
        [second] = await member.generate(VLLM_STYLE.replace(seed=3))
        info = await info_of(member.backend)
        assert member.snapshot()["retried"] == 0
    assert first.text == second.text == TEXT
    sent = [set(b) for b in strict.bodies]
    assert len(sent) == 3  # refused, resent without, then right from the start
    assert {"top_k", "min_tokens"} <= sent[0]
    assert not {"top_k", "min_tokens"} & (sent[1] | sent[2])
    assert info.extra["refused_fields"] == ["min_tokens", "top_k"]
    notes = [r.getMessage() for r in caplog.records if "refuses" in r.getMessage()]
    assert len(notes) == 1 and "top_k" in notes[0] and "strict" in notes[0]


async def test_a_stream_learns_too(strict: Strict, transport: TransportName) -> None:
    async with OpenAIBackend(strict.url, transport=transport) as backend:
        events = [e async for e in backend.stream(VLLM_STYLE)]
    final = events[-1]
    assert isinstance(final, Completion) and final.text == TEXT
    assert "".join(e.text for e in events if isinstance(e, TextDelta)) == TEXT
    assert len(strict.bodies) == 2 and "top_k" not in strict.bodies[1]


async def test_extensions_off_sends_only_standard_fields(
    strict: Strict, transport: TransportName
) -> None:
    async with OpenAIBackend(strict.url, transport=transport, extensions=False) as backend:
        [c] = await backend.generate(VLLM_STYLE)
    assert c.text == TEXT and len(strict.bodies) == 1
    assert set(strict.bodies[0]) <= STANDARD


async def test_negotiation_gives_up_when_nothing_new_is_learnt(transport: TransportName) -> None:
    async with (
        Strict(always_refuse=True) as server,
        OpenAIBackend(server.url, transport=transport) as backend,
    ):
        with pytest.raises(errors.BadRequestError, match="Unexpected fields"):
            await backend.generate(VLLM_STYLE)
        assert len(server.bodies) == 2  # one resend for the one learnt set, no more
        with pytest.raises(errors.BadRequestError):
            await backend.generate(GenerationRequest(prompt="plain"))
        assert len(server.bodies) == 3


@pytest.mark.parametrize("chat", [False, True])
async def test_stop_strings_are_applied_on_the_client(
    strict: Strict, transport: TransportName, chat: bool
) -> None:
    request = GenerationRequest(prompt="Tell me", stop=(" END", "never"))
    async with OpenAIBackend(
        strict.url, transport=transport, mode="chat" if chat else "completions"
    ) as backend:
        [plain] = await backend.generate(request)
        events = [e async for e in backend.stream(request)]
    assert strict.bodies[0]["stop"] == [" END", "never"]  # sent, and ignored by the server
    final = events[-1]
    assert isinstance(final, Completion)
    for c in (plain, final):
        assert c.text == "The river runs." and c.finish_reason == "stop"
    assert "".join(e.text for e in events if isinstance(e, TextDelta)) == "The river runs."


async def test_a_validation_error_under_500_is_a_bad_request_not_retried(
    strict: Strict,
) -> None:
    strict.validation_500 = True
    member = Member(
        OpenAIBackend(strict.url), retry=RetryPolicy(max_attempts=3, initial_backoff_s=0)
    )
    async with member:
        with pytest.raises(errors.BadRequestError, match="validation error") as info:
            await member.generate(GenerationRequest(prompt="x"))
    assert info.value.status == 500
    assert len(strict.bodies) == 1


async def test_supports_n_is_unknown_until_learnt(strict: Strict) -> None:
    async with OpenAIBackend(strict.url) as backend:
        assert (await backend.info()).supports_n is None
        got = await backend.generate(GenerationRequest(prompt="x", temperature=1.0, n=3))
        assert len(got) == 3
        assert (await backend.info()).supports_n is False
    async with (
        OpenAIDouble(model="m") as double,
        OpenAIBackend(double.url) as backend,
    ):
        await backend.generate(GenerationRequest(prompt="x"))
        assert (await backend.info()).supports_n is None  # n == 1 says nothing
        await backend.generate(GenerationRequest(prompt="x", temperature=1.0, n=2))
        assert (await backend.info()).supports_n is True


def test_the_config_passes_the_options_through(tmp_path: Path) -> None:
    cfg = tmp_path / "cfg.toml"
    cfg.write_text(
        textwrap.dedent(
            f"""
            [run]
            output = "{tmp_path / "r.jsonl"}"
            [backends.o]
            kind = "openai"
            url = "http://127.0.0.1:9"
            options = {{ extensions = false, max_response_bytes = 4096, max_completion_chars = 99 }}
            [backends.t]
            kind = "tgi"
            url = "http://127.0.0.1:9"
            options = {{ max_completion_chars = 77 }}
            [roles]
            writer = "t"
            answerers = ["o"]
            """
        )
    )
    writer, answerers = build_members(load_config(cfg))
    by_name = {m.name: m.backend for m in [writer, *answerers]}
    oai = cast(OpenAIBackend, by_name["o"])
    assert oai.extensions is False and oai.max_completion_chars == 99
    assert oai._http.max_response_bytes == 4096
    assert getattr(by_name["t"], "max_completion_chars", None) == 77
