"""Random server answers thrown at the TGI and OpenAI adapters (hypothesis).

A programmable loopback double answers each request with a drawn status, headers and
body: JSON shapes close to the protocols with fields of random types, raw bytes, or an
SSE stream with random framing.  Whatever it sends, only ``BackendError`` subclasses may
leave an adapter, and neither an error's text nor a completion may show any part of the
key, which the double mixes into what it sends.  Bounded: a modest number of examples,
small limits, one server per test.
"""

from __future__ import annotations

import asyncio
import json
import traceback
from collections.abc import Iterator
from typing import Any, cast

import pytest
from aiohttp import web
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from rogue import Rogue

from ensemble_async.backend import Backend, health_of, info_of, stream_of
from ensemble_async.backends.openai import Mode, OpenAIBackend
from ensemble_async.backends.tgi import TGIBackend
from ensemble_async.errors import BackendError
from ensemble_async.types import ChatMessage, Completion, GenerationRequest, TextDelta

KEY = "sk-fuzz/KEY\u00e9+0123456789abcdef"
ASCII_KEY = KEY.replace("\u00e9", "e")  # for the SDK, which sends ASCII headers only


def echoes(key: str) -> list[str]:
    """How a careless server might show the key."""
    escaped = json.dumps(key)[1:-1]
    return [
        key,
        key[:-1],
        key[4:14],
        escaped,
        escaped.replace("/", "\\/"),
        key.replace("/", "%2F").replace("+", "%2B"),
    ]


def markers(key: str) -> set[str]:
    """Pieces of the key (9 characters, plain or JSON-escaped) none of our output shows."""
    escaped = json.dumps(key)[1:-1]
    return {k[i : i + 9] for k in (key, escaped) for i in range(0, len(k) - 8, 2)}


def scalars_for(key: str) -> st.SearchStrategy[Any]:
    return st.one_of(
        st.none(),
        st.booleans(),
        st.integers(-5, 10**6),
        st.floats(allow_nan=False, allow_infinity=False),
        st.text(max_size=20),
        st.sampled_from(echoes(key)),
        st.sampled_from(["stop", "length", "eos_token", "stop_sequence", "[DONE]"]),
    )


def kit(key: str) -> tuple[st.SearchStrategy[Any], ...]:
    scalars = scalars_for(key)
    values = st.recursive(
        scalars,
        lambda inner: (
            st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3)
        ),
        max_leaves=8,
    )
    texts = st.one_of(st.text(max_size=30), st.sampled_from(echoes(key)).map(lambda e: f"say {e}"))
    return scalars, values, texts


def tgi_like(key: str) -> st.SearchStrategy[Any]:
    scalars, values, texts = kit(key)
    details = st.fixed_dictionaries(
        {},
        optional={
            "finish_reason": st.one_of(scalars, st.sampled_from(["length", "eos_token"])),
            "generated_tokens": st.one_of(st.integers(0, 50), scalars),
            "input_length": scalars,
            "prefill": values,
        },
    )
    final = st.fixed_dictionaries({"generated_text": st.one_of(texts, scalars), "details": details})
    token = st.fixed_dictionaries(
        {"token": st.one_of(st.fixed_dictionaries({"text": st.one_of(texts, scalars)}), values)}
    )
    error = st.fixed_dictionaries({"error": st.one_of(texts, values), "error_type": scalars})
    return st.one_of(final, token, error, values)


def openai_like(key: str) -> st.SearchStrategy[Any]:
    scalars, values, texts = kit(key)
    choice = st.fixed_dictionaries(
        {},
        optional={
            "index": scalars,
            "text": st.one_of(texts, scalars),
            "message": st.one_of(
                st.fixed_dictionaries({"content": st.one_of(texts, scalars)}), values
            ),
            "delta": st.one_of(
                st.fixed_dictionaries({"content": st.one_of(texts, scalars)}), values
            ),
            "finish_reason": scalars,
        },
    )
    answer = st.fixed_dictionaries(
        {},
        optional={
            "choices": st.one_of(st.lists(st.one_of(choice, values), max_size=3), values),
            "usage": values,
            "model": scalars,
            "error": st.one_of(values, st.fixed_dictionaries({"message": texts, "code": scalars})),
        },
    )
    return st.one_of(answer, values)


def framed(events: list[Any], data: st.DataObject) -> bytes:
    out = b""
    for event in events:
        payload = event if isinstance(event, bytes) else json.dumps(event).encode()
        sep = data.draw(
            st.sampled_from([b"data:", b"data: ", b": keepalive\ndata:", b"event: x\ndata:"])
        )
        end = data.draw(st.sampled_from([b"\n\n", b"\r\n\r\n", b"\n", b""]))
        out += sep + payload + end
    if data.draw(st.booleans()):
        out += b"data: [DONE]\n\n"
    return out


@st.composite
def answers(draw: st.DrawFn, kind: str, key: str) -> tuple[int, dict[str, str], bytes]:
    status = draw(st.sampled_from([200, 200, 200, 400, 401, 404, 422, 424, 429, 500, 503]))
    shape = draw(st.sampled_from(["json", "sse", "raw"]))
    like = tgi_like(key) if kind == "tgi" else openai_like(key)
    headers: dict[str, str] = {}
    if draw(st.booleans()):
        headers["Retry-After"] = draw(st.sampled_from(["1", "soon", "-3", key[:10], "9" * 30]))
    if shape == "json":
        body = json.dumps(draw(like)).encode()
        if draw(st.booleans()):
            body = body.replace(b"/", b"\\/")
        headers["Content-Type"] = "application/json"
    elif shape == "sse":
        events = draw(st.lists(like, max_size=5))
        body = framed(events, draw(st.data()))
        headers["Content-Type"] = "text/event-stream"
    else:
        body = draw(st.binary(max_size=200)) + draw(st.sampled_from(echoes(key))).encode()
        headers["Content-Type"] = draw(st.sampled_from(["text/plain", "application/json"]))
    return status, headers, body


@pytest.fixture(scope="module")
def loop_server() -> Iterator[tuple[asyncio.AbstractEventLoop, Rogue]]:
    """One server (and one event loop) for all the examples of a test."""
    loop = asyncio.new_event_loop()
    server = Rogue()
    loop.run_until_complete(server.start())
    yield loop, server
    loop.run_until_complete(server.stop())
    loop.close()


def set_answer(server: Rogue, answer: tuple[int, dict[str, str], bytes]) -> None:
    status, headers, body = answer

    async def handle(request: web.Request) -> web.StreamResponse:
        return web.Response(status=status, body=body, headers=headers)

    server.handler = handle
    server.get_handler = handle


def clean(text: str, key: str) -> None:
    for marker in markers(key):
        assert marker not in text, text


REQUESTS = [
    GenerationRequest(prompt="p", max_new_tokens=8, stop=("ok",)),
    GenerationRequest(messages=(ChatMessage("user", "hi"),), max_new_tokens=8),
    GenerationRequest(prompt="p", temperature=1.0, n=2, seed=1),
]


async def exercise(backend: Backend, key: str) -> None:
    for request in REQUESTS:
        try:
            for c in await backend.generate(request):
                clean(json.dumps(c.to_dict()), key)
        except BackendError as exc:
            clean("".join(traceback.format_exception(exc)), key)
        if request.n != 1:
            continue
        try:
            async for event in stream_of(backend, request):
                assert isinstance(event, TextDelta | Completion)
                clean(event.text, key)
        except BackendError as exc:
            clean("".join(traceback.format_exception(exc)), key)
    try:
        info = await info_of(backend)
        clean(repr(info), key)
    except BackendError as exc:
        clean("".join(traceback.format_exception(exc)), key)
    clean(repr(await health_of(backend)), key)


def run_case(
    loop_server: Any, make: Any, answer: tuple[int, dict[str, str], bytes], key: str = KEY
) -> None:
    loop, server = loop_server
    set_answer(server, answer)

    async def go() -> None:
        async with make(server.url) as backend:
            await asyncio.wait_for(exercise(backend, key), 20)

    loop.run_until_complete(go())


SETTINGS = settings(
    max_examples=40,
    deadline=None,
    phases=[Phase.explicit, Phase.reuse, Phase.generate],  # no shrinking: bounded time
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)


@SETTINGS
@given(answer=answers("tgi", KEY))
def test_tgi_survives_any_answer(loop_server: Any, answer: Any) -> None:
    run_case(
        loop_server,
        lambda url: TGIBackend(url, api_key=KEY, max_completion_chars=500, timeout=5),
        answer,
    )


@SETTINGS
@given(answer=answers("openai", KEY), mode=st.sampled_from(["auto", "chat", "completions"]))
def test_openai_survives_any_answer(loop_server: Any, answer: Any, mode: str) -> None:
    run_case(
        loop_server,
        lambda url: OpenAIBackend(
            url,
            api_key=KEY,
            mode=cast(Mode, mode),
            max_completion_chars=500,
            timeout=5,
        ),
        answer,
    )


@SETTINGS
@given(answer=answers("openai", ASCII_KEY))
def test_openai_sdk_survives_any_answer(loop_server: Any, answer: Any) -> None:
    pytest.importorskip("openai")
    run_case(
        loop_server,
        lambda url: OpenAIBackend(
            url, api_key=ASCII_KEY, model="m", transport="sdk", max_completion_chars=500, timeout=5
        ),
        answer,
        ASCII_KEY,
    )
