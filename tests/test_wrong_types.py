"""Answers with fields of the wrong type: each is a MalformedResponseError for that
request (never a TypeError, KeyError or AttributeError escaping an adapter), and a
wrong type in an optional server fact leaves that fact unknown."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import pytest
from rogue import Rogue, openai_answer, openai_chunk, reply, sse, tgi_final, tgi_token

from ensemble_async import errors
from ensemble_async.backends.openai import OpenAIBackend
from ensemble_async.backends.tgi import TGIBackend
from ensemble_async.member import Member
from ensemble_async.retry import RetryPolicy
from ensemble_async.types import GenerationRequest

REQUEST = GenerationRequest(prompt="Say something.", max_new_tokens=8)


@pytest.fixture
async def rogue() -> AsyncIterator[Rogue]:
    async with Rogue() as server:
        yield server


TGI_ANSWERS: dict[str, Any] = {
    "generated_tokens is a word": tgi_final("ok", generated_tokens="three"),
    "generated_tokens is a float": tgi_final("ok", generated_tokens=2.5),
    "generated_tokens is a bool": tgi_final("ok", generated_tokens=True),
    "input_length is a list": tgi_final("ok", input_length=[1]),
    "finish_reason is a number": tgi_final("ok", finish_reason=5),
    "prefill is a string": tgi_final("ok", prefill="abc"),
    "generated_text is a number": {"generated_text": 5, "details": {}},
    "details is a list": {"generated_text": "ok", "details": []},
    "answer is a list of two": [tgi_final("a"), tgi_final("b")],
    "answer is a string": "just text",
}


@pytest.mark.parametrize("answer", list(TGI_ANSWERS.values()), ids=list(TGI_ANSWERS))
async def test_tgi_generate_wrong_types(rogue: Rogue, answer: Any) -> None:
    rogue.handler = reply(answer)
    async with TGIBackend(rogue.url) as backend:
        with pytest.raises(errors.MalformedResponseError):
            await backend.generate(REQUEST)


TGI_STREAMS: dict[str, list[Any]] = {
    "token is a string": [{"token": "tok"}, tgi_final("ok")],
    "token text is a number": [tgi_token(5), tgi_final("ok")],
    "token special is a string": [tgi_token("a", special="no"), tgi_final("a")],
    "final generated_tokens is a word": [tgi_token("a"), tgi_final("a", generated_tokens="x")],
    "event is a list": [[1, 2]],
    "error is an object": [{"error": {"nested": True}, "error_type": 7}],
}


@pytest.mark.parametrize("events", list(TGI_STREAMS.values()), ids=list(TGI_STREAMS))
async def test_tgi_stream_wrong_types(rogue: Rogue, events: list[Any]) -> None:
    rogue.handler = sse(events, space=False)
    async with TGIBackend(rogue.url) as backend:
        with pytest.raises(errors.BackendError):
            _ = [e async for e in backend.stream(REQUEST)]


async def test_tgi_info_with_wrong_types_keeps_what_is_right(rogue: Rogue) -> None:
    rogue.info = {
        "model_id": 42,
        "max_concurrent_requests": "lots",
        "max_stop_sequences": 2,
        "max_total_tokens": -5,
        "max_input_tokens": True,
    }
    async with TGIBackend(rogue.url) as backend:
        info = await backend.info()
    assert info.model is None and info.max_concurrency is None
    assert info.max_total_tokens is None and info.max_input_tokens is None
    assert info.max_stop_sequences == 2


OPENAI_ANSWERS: dict[str, Any] = {
    "choices is a string": {"choices": "many"},
    "choice is a list": {"choices": [[1]]},
    "text is a number": openai_answer(5),
    "text is missing": {"choices": [{"index": 0, "finish_reason": "stop"}]},
    "finish_reason is a number": openai_answer("ok", reason=3),
    "chat message is a string": {"choices": [{"message": "hi", "finish_reason": "stop"}]},
    "error is a list": {"error": ["x"]},
}


@pytest.mark.parametrize("answer", list(OPENAI_ANSWERS.values()), ids=list(OPENAI_ANSWERS))
@pytest.mark.parametrize("transport", ["aiohttp", "sdk"])
async def test_openai_generate_wrong_types(rogue: Rogue, answer: Any, transport: str) -> None:
    if transport == "sdk":
        pytest.importorskip("openai")
        if answer == OPENAI_ANSWERS["text is missing"]:
            pytest.skip("the SDK's models fill a missing text with None (read as empty)")
    rogue.handler = reply(answer)
    chat = "chat" in str(answer) or "message" in str(answer)
    async with OpenAIBackend(
        rogue.url,
        model="rogue-model",
        mode="chat" if chat else "completions",
        transport=transport,  # type: ignore[arg-type]
    ) as backend:
        with pytest.raises(errors.BackendError) as info:
            await backend.generate(REQUEST)
    assert isinstance(info.value, errors.MalformedResponseError | errors.ServerError)


async def test_openai_usage_of_the_wrong_type_is_ignored(rogue: Rogue) -> None:
    answer = openai_answer("fine")
    answer["usage"] = {"prompt_tokens": "two", "completion_tokens": 1.5}
    rogue.handler = reply(answer)
    async with OpenAIBackend(rogue.url, model="rogue-model") as backend:
        [c] = await backend.generate(REQUEST)
    assert c.text == "fine" and c.prompt_tokens is None and c.completion_tokens is None


OPENAI_STREAMS: dict[str, list[Any]] = {
    "choices is an object": [{"choices": {"a": 1}}, "[DONE]"],
    "text is a number": [openai_chunk(5), "[DONE]"],
    "delta is a string": [{"choices": [{"delta": "x", "finish_reason": None}]}, "[DONE]"],
    "finish_reason is a list": [openai_chunk("a", reason=["stop"]), "[DONE]"],
    "chunk is a number": [7, "[DONE]"],
}


@pytest.mark.parametrize("events", list(OPENAI_STREAMS.values()), ids=list(OPENAI_STREAMS))
async def test_openai_stream_wrong_types(rogue: Rogue, events: list[Any]) -> None:
    rogue.handler = sse(events)
    chat = any(isinstance(e, dict) and "delta" in str(e) for e in events)
    async with OpenAIBackend(
        rogue.url, model="rogue-model", mode="chat" if chat else "completions"
    ) as backend:
        with pytest.raises(errors.MalformedResponseError):
            _ = [e async for e in backend.stream(REQUEST)]


@pytest.mark.parametrize(
    "models",
    [
        {"data": "m"},
        {"data": [{"id": 5}]},
        {"data": ["m"]},
        {"data": []},
        ["m"],
    ],
)
async def test_openai_models_of_the_wrong_shape(rogue: Rogue, models: Any) -> None:
    rogue.models = models
    async with OpenAIBackend(rogue.url) as backend:
        with pytest.raises(errors.MalformedResponseError):
            await backend.info()


async def test_openai_info_lists_the_served_models(rogue: Rogue) -> None:
    rogue.models = {"data": [{"id": "a", "max_model_len": "big"}, {"id": "b"}]}
    async with OpenAIBackend(rogue.url) as backend:
        info = await backend.info()
    assert info.model == "a" and info.extra["models"] == ["a", "b"]
    assert info.max_total_tokens is None  # "big" is no count


async def test_a_wrong_type_is_a_classified_failure_for_the_member(rogue: Rogue) -> None:
    """The reported crash: generated_tokens "three" used to raise TypeError downstream."""
    rogue.handler = reply(tgi_final("ok", generated_tokens="three"))
    member = Member(TGIBackend(rogue.url), retry=RetryPolicy(max_attempts=2, initial_backoff_s=0))
    async with member:
        with pytest.raises(errors.MalformedResponseError):
            await member.generate(REQUEST)
        snap = member.snapshot()
    assert snap["failed"] == 1 and snap["in_flight"] == 0
