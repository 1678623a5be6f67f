"""A programmable loopback server for the adapters' hostile-server tests.

``Rogue`` answers ``/info``, ``/health`` and ``/v1/models`` with fixed (replaceable) JSON
and every generation route, TGI's and OpenAI's, with ``handler(request)``; the helpers
below build the handlers: a fixed reply, an endless body, SSE events.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

from aiohttp import web

from ensemble_async.testing._server import LoopbackServer

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

GENERATION_PATHS = ("/generate", "/generate_stream", "/", "/v1/completions", "/v1/chat/completions")


class Rogue(LoopbackServer):
    shutdown_timeout = 0.5

    def __init__(self, handler: Handler | None = None) -> None:
        super().__init__()
        self.handler = handler
        self.get_handler: Handler | None = None
        self.info: Any = {"model_id": "rogue/model", "max_stop_sequences": 4}
        self.models: Any = {"object": "list", "data": [{"id": "rogue-model"}]}
        self.bodies: list[Any] = []
        self.sent = 0
        """Bytes the endless handlers wrote before the client went away."""

    def routes(self, app: web.Application) -> None:
        app.router.add_get("/info", self._get)
        app.router.add_get("/health", self._get)
        app.router.add_get("/v1/models", self._get)
        for path in GENERATION_PATHS:
            app.router.add_post(path, self._generation)

    async def _get(self, request: web.Request) -> web.StreamResponse:
        if self.get_handler is not None:
            return await self.get_handler(request)
        if request.path == "/info":
            return web.json_response(self.info)
        if request.path == "/v1/models":
            return web.json_response(self.models)
        return web.Response()

    async def _generation(self, request: web.Request) -> web.StreamResponse:
        raw = await request.read()
        try:
            self.bodies.append(json.loads(raw))
        except ValueError:
            self.bodies.append(raw)
        assert self.handler is not None, "set Rogue.handler first"
        return await self.handler(request)

    async def write_forever(self, resp: web.StreamResponse, chunk: bytes) -> None:
        """Write ``chunk`` until the client goes away or the server stops."""
        with contextlib.suppress(ConnectionError, RuntimeError):
            while not self._stopping.is_set():
                await resp.write(chunk)
                self.sent += len(chunk)
                await asyncio.sleep(0)


def reply(
    body: bytes | str | Any,
    status: int = 200,
    content_type: str = "application/json",
    headers: dict[str, str] | None = None,
) -> Handler:
    """Always the same answer; ``body`` not bytes or str is sent as JSON."""
    if isinstance(body, str):
        data = body.encode()
    elif isinstance(body, bytes):
        data = body
    else:
        data = json.dumps(body).encode()

    async def handle(request: web.Request) -> web.StreamResponse:
        return web.Response(
            status=status, body=data, content_type=content_type, headers=headers or {}
        )

    return handle


def endless(
    server: Rogue, status: int = 200, head: bytes = b"", chunk: bytes = b"x" * 65536
) -> Handler:
    """``head`` and then ``chunk`` forever (no Content-Length: chunked)."""

    async def handle(request: web.Request) -> web.StreamResponse:
        content_type = "text/event-stream" if head.startswith(b"data") else "application/json"
        resp = web.StreamResponse(status=status, headers={"Content-Type": content_type})
        await resp.prepare(request)
        with contextlib.suppress(ConnectionError, RuntimeError):
            await resp.write(head)
        await server.write_forever(resp, chunk)
        return resp

    return handle


def sse(events: Sequence[bytes | str | Any], *, space: bool = True) -> Handler:
    """A 200 event stream of ``events`` (JSON unless bytes or str), each framed
    ``data: ...`` (bytes are written as they are)."""

    async def handle(request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        for event in events:
            if isinstance(event, bytes):
                await resp.write(event)
                continue
            data = event if isinstance(event, str) else json.dumps(event)
            await resp.write(f"data:{' ' if space else ''}{data}\n\n".encode())
        await resp.write_eof()
        return resp

    return handle


def tgi_final(text: str, **details: Any) -> dict[str, Any]:
    """A TGI answer (also the last stream event) with ``details``."""
    base: dict[str, Any] = {"finish_reason": "eos_token", "generated_tokens": 3}
    return {"generated_text": text, "details": {**base, **details}}


def tgi_token(text: Any, **extra: Any) -> dict[str, Any]:
    token = {"id": 1, "text": text, "logprob": -0.1, "special": False, **extra}
    return {"token": token, "generated_text": None, "details": None}


def openai_answer(text: Any, *, chat: bool = False, reason: Any = "stop") -> dict[str, Any]:
    choice: dict[str, Any] = {"index": 0, "finish_reason": reason}
    if chat:
        choice["message"] = {"role": "assistant", "content": text}
    else:
        choice["text"] = text
    return {"model": "rogue-model", "choices": [choice], "usage": {"prompt_tokens": 2}}


def openai_chunk(text: Any, *, chat: bool = False, reason: Any = None) -> dict[str, Any]:
    choice: dict[str, Any] = {"index": 0, "finish_reason": reason}
    if chat:
        choice["delta"] = {"content": text}
    else:
        choice["text"] = text
    return {"choices": [choice]}
