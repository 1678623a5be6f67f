"""TGIBackend in chat mode: chat messages go to TGI's OpenAI-style /v1/chat/completions
(prompts still go to /generate), in TGI's dialect of that protocol."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any

import pytest
from aiohttp import web

from ensemble_async import errors
from ensemble_async.backends.tgi import TGIBackend
from ensemble_async.testing._server import LoopbackServer
from ensemble_async.types import ChatMessage, Completion, GenerationRequest, TextDelta

CHAT = (ChatMessage("system", "Be brief."), ChatMessage("user", "Name a colour."))
ANSWER = "Blue, like the sea. STOP and more"


class TGIChat(LoopbackServer):
    """A TGI-like server: /info, /generate, and /v1/chat/completions answering
    ``ANSWER`` with TGI's finish reasons; it ignores ``n`` and ``stop`` and refuses
    ``top_p == 1.0`` as TGI does."""

    def __init__(self) -> None:
        super().__init__()
        self.bodies: list[dict[str, Any]] = []
        self.paths: list[str] = []

    def routes(self, app: web.Application) -> None:
        app.router.add_get("/info", self._info)
        app.router.add_post("/generate", self._generate)
        app.router.add_post("/v1/chat/completions", self._chat)

    async def _info(self, request: web.Request) -> web.Response:
        return web.json_response({"model_id": "org/tgi-chat", "max_stop_sequences": 4})

    async def _generate(self, request: web.Request) -> web.Response:
        self.paths.append(request.path)
        self.bodies.append(await request.json())
        details = {"finish_reason": "length", "generated_tokens": 2}
        return web.json_response({"generated_text": "two words", "details": details})

    async def _chat(self, request: web.Request) -> web.StreamResponse:
        self.paths.append(request.path)
        body = await request.json()
        self.bodies.append(body)
        if body.get("top_p", 0.5) >= 1.0:
            return web.json_response(
                {
                    "error": "Input validation error: `top_p` must be > 0.0 and < 1.0",
                    "error_type": "validation",
                },
                status=422,
            )
        if not body.get("stream"):
            return web.json_response(
                {
                    "object": "chat.completion",
                    "model": "org/tgi-chat",
                    "choices": [
                        {
                            "index": 0,
                            "message": {"role": "assistant", "content": ANSWER},
                            "finish_reason": "stop_sequence",
                        }
                    ],
                    "usage": {"prompt_tokens": 7, "completion_tokens": 9, "total_tokens": 16},
                }
            )
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        words = ANSWER.split(" ")
        for i, word in enumerate(words):
            piece = word if i == 0 else " " + word
            last = i == len(words) - 1
            chunk = {
                "choices": [
                    {
                        "index": 0,
                        "delta": {"role": "assistant", "content": piece},
                        "finish_reason": "length" if last else None,
                    }
                ]
            }
            await resp.write(f"data: {json.dumps(chunk)}\n\n".encode())
        await resp.write(b"data: [DONE]\n\n")
        return resp


@pytest.fixture
async def server() -> AsyncIterator[TGIChat]:
    async with TGIChat() as s:
        yield s


async def test_chat_goes_to_v1_chat_completions(server: TGIChat) -> None:
    request = GenerationRequest(messages=CHAT, max_new_tokens=16, top_k=5, min_new_tokens=1)
    async with TGIBackend(server.url, name="tgi-chat") as backend:
        [c] = await backend.generate(request)
        [p] = await backend.generate(GenerationRequest(prompt="Hi", max_new_tokens=2))
    assert server.paths == ["/v1/chat/completions", "/generate"]
    body = server.bodies[0]
    assert body["messages"] == [m.to_dict() for m in CHAT]
    assert body["max_tokens"] == 16 and body["temperature"] == 0
    # TGI's dialect: no vLLM extensions, no n, no top_p == 1.0 (TGI refuses it)
    assert not {"top_k", "min_tokens", "n", "top_p"} & set(body)
    assert c.text == ANSWER and c.finish_reason == "stop"  # TGI's stop_sequence
    assert (c.prompt_tokens, c.completion_tokens) == (7, 9)
    assert p.text == "two words" and p.finish_reason == "length"


async def test_chat_n_fans_out_and_seeds_differ(server: TGIChat) -> None:
    request = GenerationRequest(messages=CHAT, temperature=0.7, top_p=0.9, seed=10, n=3)
    async with TGIBackend(server.url) as backend:
        got = await backend.generate(request)
    assert len(got) == 3
    assert sorted(b["seed"] for b in server.bodies) == [10, 11, 12]
    assert all(b["top_p"] == 0.9 and "n" not in b for b in server.bodies)


async def test_chat_stop_strings_are_cut_on_the_client(server: TGIChat) -> None:
    request = GenerationRequest(messages=CHAT, stop=(" STOP",))
    async with TGIBackend(server.url) as backend:
        [c] = await backend.generate(request)
        events = [e async for e in backend.stream(request)]
    assert c.text == "Blue, like the sea." and c.finish_reason == "stop"
    deltas = "".join(e.text for e in events if isinstance(e, TextDelta))
    final = events[-1]
    assert isinstance(final, Completion)
    assert deltas == final.text == "Blue, like the sea." and final.finish_reason == "stop"


async def test_chat_stream_deltas_add_up(server: TGIChat) -> None:
    async with TGIBackend(server.url) as backend:
        events = [e async for e in backend.stream(GenerationRequest(messages=CHAT))]
    final = events[-1]
    assert isinstance(final, Completion) and final.finish_reason == "length"
    assert "".join(e.text for e in events if isinstance(e, TextDelta)) == final.text == ANSWER
    assert server.bodies[0]["stream"] is True


async def test_chat_validation_error_is_a_bad_request(server: TGIChat) -> None:
    # a top_p the adapter passes on (below 1) but a server refuses still maps cleanly
    async with TGIBackend(server.url) as backend:
        with pytest.raises(errors.BadRequestError, match="top_p"):
            await backend.generate(
                GenerationRequest(messages=CHAT, temperature=1.0, top_p=0.5, extra={"top_p": 1.0})
            )


async def test_ask_with_tgi_members_uses_chat_by_default(
    server: TGIChat, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    import asyncio

    from ensemble_async import cli

    monkeypatch.setenv("COLUMNS", "200")
    argv = ["ask", "--member", f"tgi={server.url}", "--member", f"tgi={server.url}", "Hi"]
    code = await asyncio.to_thread(cli.main, [*argv, "--timeout", "10"])
    out = " ".join(capsys.readouterr().out.split())
    assert code == cli.EXIT_OK
    assert server.paths == ["/v1/chat/completions"] * 2
    assert "Blue, like the sea." in out and "kept" in out
