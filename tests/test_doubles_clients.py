"""The test doubles checked with the real clients: huggingface_hub's InferenceClient and
AsyncInferenceClient against the TGI double, the openai SDK against the OpenAI double (and
TGI's /v1).  If a real client parses what a double sends, and maps its errors to the
client's own error classes, the double speaks the protocol, not just our reading of it.

Everything runs on loopback; the synchronous InferenceClient runs in a worker thread so
the double keeps serving on the event loop.
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest

from ensemble_async.testing import _lm
from ensemble_async.testing.faults import Fault
from ensemble_async.testing.openai_double import OpenAIDouble
from ensemble_async.testing.tgi_double import TGIDouble

hub = pytest.importorskip("huggingface_hub")
openai = pytest.importorskip("openai")

from huggingface_hub import AsyncInferenceClient, InferenceClient  # noqa: E402
from huggingface_hub.errors import (  # noqa: E402
    GenerationError,
    OverloadedError,
    ValidationError,
)

PROMPT = "Write a short poem about the sea"


@pytest.fixture
async def tgi() -> AsyncIterator[TGIDouble]:
    async with TGIDouble() as d:
        yield d


@pytest.fixture
async def vllm() -> AsyncIterator[OpenAIDouble]:
    async with OpenAIDouble(model="m") as d:
        yield d


def sdk(double: OpenAIDouble | TGIDouble) -> Any:
    return openai.AsyncOpenAI(
        base_url=double.url + "/v1", api_key="EMPTY", max_retries=0, timeout=30
    )


def scored(context: str, tokens: list[str]) -> list[float]:
    """The made-up model's log-probs of ``tokens`` one after another after ``context``."""
    out = []
    for token in tokens:
        out.append(_lm.logprob(context, token))
        context += token
    return out


# -- TGI double, huggingface_hub ---------------------------------------------------------


async def test_hub_text_generation_plain_and_full_text(tgi: TGIDouble) -> None:
    client = InferenceClient(model=tgi.url)
    generated, _ = tgi.complete(PROMPT, {"max_new_tokens": 5})
    # The client posts to "/", where a text-generation model returns the prompt too
    # unless return_full_text is false.
    full = await asyncio.to_thread(client.text_generation, PROMPT, max_new_tokens=5)
    assert full == PROMPT + generated
    assert "return_full_text" not in tgi.last_body["parameters"]
    only = await asyncio.to_thread(
        client.text_generation, PROMPT, max_new_tokens=5, return_full_text=False
    )
    assert only == generated
    assert tgi.stats.by_path["/"] == 2


async def test_hub_details_prefill_and_top_tokens(tgi: TGIDouble) -> None:
    client = InferenceClient(model=tgi.url)
    out = await asyncio.to_thread(
        client.text_generation,
        PROMPT,
        max_new_tokens=4,
        details=True,
        decoder_input_details=True,
        top_n_tokens=3,
        return_full_text=False,
    )
    details = out.details
    assert details is not None and details.finish_reason == "length"
    assert details.generated_tokens == len(details.tokens) == 4
    assert "".join(t.text for t in details.prefill) == PROMPT
    assert details.prefill[0].logprob is None
    words = [t.text for t in details.prefill]
    assert [t.logprob for t in details.prefill[1:]] == scored(words[0], words[1:])
    assert "".join(t.text for t in details.tokens) == out.generated_text
    assert [t.logprob for t in details.tokens] == scored(PROMPT, [t.text for t in details.tokens])
    assert details.top_tokens is not None and len(details.top_tokens) == 4
    assert all(
        len(top) == 3 and top[0]["text"] == tok.text  # the hub leaves these as dicts
        for top, tok in zip(details.top_tokens, details.tokens, strict=True)
    )


async def test_decoder_input_details_alone_returns_details_and_headers(tgi: TGIDouble) -> None:
    body = {"inputs": PROMPT, "parameters": {"max_new_tokens": 2, "decoder_input_details": True}}
    async with (
        aiohttp.ClientSession() as s,
        s.post(tgi.url + "/generate", json=body) as resp,
    ):
        data = await resp.json()
        headers = resp.headers
    assert [t["text"] for t in data["details"]["prefill"]] == _lm.split_words(PROMPT)
    assert headers["x-prompt-tokens"] == str(len(PROMPT.split()))
    assert headers["x-generated-tokens"] == "2"
    assert headers["x-compute-characters"] == str(len(PROMPT))
    for name in ("x-compute-type", "x-total-time", "x-queue-time", "x-inference-time"):
        assert name in headers
    async with (
        aiohttp.ClientSession() as s,
        s.post(tgi.url + "/tokenize", json={"inputs": PROMPT}) as resp,
    ):
        tokens = await resp.json()
    assert [PROMPT[t["start"] : t["stop"]] for t in tokens] == _lm.split_words(PROMPT)


async def test_hub_stream_with_details(tgi: TGIDouble) -> None:
    client = InferenceClient(model=tgi.url)

    def run() -> list[Any]:
        return list(
            client.text_generation(
                PROMPT, max_new_tokens=3, stream=True, details=True, return_full_text=False
            )
        )

    events = await asyncio.to_thread(run)
    assert [e.index for e in events] == [1, 2, 3]
    assert all(e.generated_text is None for e in events[:-1])
    final = events[-1]
    assert final.generated_text == "".join(e.token.text for e in events)
    assert final.details.finish_reason == "length"
    assert final.details.input_length == len(PROMPT.split())


async def test_hub_chat_completion_with_logprobs(tgi: TGIDouble) -> None:
    client = InferenceClient(base_url=tgi.url)
    out = await asyncio.to_thread(
        client.chat_completion,
        [{"role": "user", "content": "hi"}],
        max_tokens=4,
        logprobs=True,
        top_logprobs=2,
        temperature=0,
    )
    [choice] = out.choices
    assert choice.finish_reason == "length"
    assert out.usage.completion_tokens == 4
    assert choice.logprobs is not None
    tokens = [c.token for c in choice.logprobs.content]
    assert "".join(tokens) == choice.message.content
    assert all(len(c.top_logprobs) == 2 for c in choice.logprobs.content)
    assert tgi.last_body["messages"][0]["content"] == "hi"


async def test_async_hub_clients() -> None:
    # huggingface_hub's chat stream parser ends at the literal line "data: [DONE]"
    # (with a space), so this double writes its events with one.
    async with TGIDouble(sse_space=True) as tgi:
        client = AsyncInferenceClient(base_url=tgi.url)
        text = await client.text_generation(PROMPT, max_new_tokens=4, return_full_text=False)
        assert text == tgi.complete(PROMPT, {"max_new_tokens": 4})[0]
        pieces, reasons = [], []
        stream = await client.chat_completion(
            [{"role": "user", "content": "hi"}], max_tokens=3, stream=True, temperature=0
        )
        async for chunk in stream:
            pieces.append(chunk.choices[0].delta.content or "")
            reasons.append(chunk.choices[0].finish_reason)
        assert len(pieces) == 3 and all(pieces)
        assert reasons == [None, None, "length"]
        tokens = [
            t async for t in await client.text_generation(PROMPT, max_new_tokens=2, stream=True)
        ]
        assert len(tokens) == 2


@pytest.mark.parametrize(
    ("fault", "error"),
    [
        (Fault.status(424, message="Request failed during generation: boom"), GenerationError),
        (Fault.status(429, message="Model is overloaded"), OverloadedError),
    ],
)
async def test_hub_maps_tgi_errors(tgi: TGIDouble, fault: Fault, error: type[Exception]) -> None:
    client = AsyncInferenceClient(model=tgi.url)
    tgi.faults.push(fault)
    with pytest.raises(error):
        await client.text_generation(PROMPT, max_new_tokens=2)


async def test_hub_validation_errors(tgi: TGIDouble) -> None:
    client = AsyncInferenceClient(model=tgi.url)
    with pytest.raises(ValidationError, match="top_n_tokens"):
        await client.text_generation(PROMPT, max_new_tokens=2, top_n_tokens=9)
    with pytest.raises(ValidationError, match="frequency_penalty"):
        await client.text_generation(PROMPT, max_new_tokens=2, frequency_penalty=3.0)
    with pytest.raises(ValidationError, match="truncate"):
        await client.text_generation(PROMPT, max_new_tokens=2, truncate=10**6)


# -- OpenAI double, openai SDK ----------------------------------------------------------


async def test_sdk_completions_logprobs(vllm: OpenAIDouble) -> None:
    async with sdk(vllm) as client:
        out = await client.completions.create(
            model="m", prompt=PROMPT, max_tokens=5, temperature=0, logprobs=2
        )
    [choice] = out.choices
    lp = choice.logprobs
    assert lp is not None and lp.tokens is not None and lp.token_logprobs is not None
    assert "".join(lp.tokens) == choice.text
    assert lp.text_offset == [sum(len(t) for t in lp.tokens[:i]) for i in range(len(lp.tokens))]
    assert lp.token_logprobs == scored(PROMPT, lp.tokens)
    assert lp.top_logprobs is not None
    assert all(
        len(top) == 3 and top[t] == v
        for top, t, v in zip(lp.top_logprobs, lp.tokens, lp.token_logprobs, strict=True)
    )


async def test_sdk_echo_scores_what_was_generated(vllm: OpenAIDouble) -> None:
    """Echoing prompt + completion reports, for the completion's tokens, exactly the
    log-probs the double reported while generating it."""
    async with sdk(vllm) as client:
        gen = await client.completions.create(
            model="m", prompt=PROMPT, max_tokens=6, temperature=0, logprobs=0
        )
        text = gen.choices[0].text
        echo = await client.completions.create(
            model="m", prompt=PROMPT + text, max_tokens=0, echo=True, logprobs=0
        )
        one = await client.completions.create(
            model="m", prompt=PROMPT + text, max_tokens=1, echo=True, logprobs=0
        )
    [choice] = echo.choices
    assert choice.text == PROMPT + text
    lp = choice.logprobs
    assert lp is not None and lp.token_logprobs is not None and lp.text_offset is not None
    assert lp.token_logprobs[0] is None  # the very first token has no context
    start = lp.text_offset.index(len(PROMPT))
    generated = gen.choices[0].logprobs.token_logprobs
    assert lp.token_logprobs[start:] == generated
    assert math.isclose(math.fsum(lp.token_logprobs[start:]), math.fsum(generated))
    # with max_tokens 1 one more token follows the echo
    assert one.choices[0].text.startswith(PROMPT + text)
    assert len(one.choices[0].logprobs.tokens) == len(lp.tokens) + 1


async def test_sdk_prompt_logprobs_extension(vllm: OpenAIDouble) -> None:
    async with sdk(vllm) as client:
        out = await client.completions.create(
            model="m", prompt=PROMPT, max_tokens=1, extra_body={"prompt_logprobs": 1}
        )
    data = out.choices[0].model_dump()
    prompt_lp = data["prompt_logprobs"]
    assert prompt_lp[0] is None and len(prompt_lp) == len(PROMPT.split())
    words = _lm.split_words(PROMPT)
    for i, entry in enumerate(prompt_lp[1:], start=1):
        mine = entry[str(_lm.token_id(words[i]))]
        assert mine["decoded_token"] == words[i]
        assert mine["logprob"] == _lm.logprob("".join(words[:i]), words[i])


async def test_sdk_chat_logprobs_parts_and_tools(vllm: OpenAIDouble) -> None:
    messages: list[Any] = [
        {"role": "system", "content": [{"type": "text", "text": "Be brief."}]},
        {"role": "user", "content": "What is 2+2?"},
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {"id": "c1", "type": "function", "function": {"name": "add", "arguments": "{}"}}
            ],
        },
        {"role": "tool", "tool_call_id": "c1", "content": "4"},
    ]
    async with sdk(vllm) as client:
        out = await client.chat.completions.create(
            model="m", messages=messages, max_tokens=4, temperature=0, logprobs=True, top_logprobs=3
        )
    [choice] = out.choices
    content = choice.logprobs.content
    assert "".join(c.token for c in content) == choice.message.content
    assert all(c.bytes == list(c.token.encode()) and len(c.top_logprobs) == 3 for c in content)
    assert all(c.top_logprobs[0].token == c.token for c in content)


async def test_sdk_chat_stream_finish_on_last_text_chunk(vllm: OpenAIDouble) -> None:
    async with sdk(vllm) as client:
        stream = await client.chat.completions.create(
            model="m",
            messages=[{"role": "user", "content": "hi"}],
            max_tokens=4,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
            logprobs=True,
        )
        chunks = [c async for c in stream]
    usage = chunks.pop()
    assert usage.choices == [] and usage.usage.completion_tokens == 4
    role, *texts = chunks
    assert role.choices[0].delta.role == "assistant"
    assert [c.choices[0].finish_reason for c in texts] == [None, None, None, "length"]
    assert all(c.choices[0].delta.content for c in texts)  # the last one carries text too
    assert all(len(c.choices[0].logprobs.content) == 1 for c in texts)


async def test_sdk_completion_stream_with_echo_and_logprobs(vllm: OpenAIDouble) -> None:
    async with sdk(vllm) as client:
        stream = await client.completions.create(
            model="m",
            prompt=PROMPT,
            max_tokens=3,
            temperature=0,
            stream=True,
            echo=True,
            logprobs=1,
        )
        chunks = [c async for c in stream]
    text = "".join(c.choices[0].text for c in chunks)
    assert text.startswith(PROMPT) and len(chunks) == 3
    offsets = [o for c in chunks for o in c.choices[0].logprobs.text_offset]
    tokens = [t for c in chunks for t in c.choices[0].logprobs.tokens]
    assert offsets == [sum(len(t) for t in tokens[:i]) for i in range(len(tokens))]
    assert chunks[-1].choices[0].finish_reason == "length"


async def test_sdk_error_classes(vllm: OpenAIDouble) -> None:
    async with sdk(vllm) as client:
        with pytest.raises(openai.BadRequestError):
            await client.chat.completions.create(
                model="m", messages=[{"role": "user", "content": "x"}], top_logprobs=2
            )
        with pytest.raises(openai.BadRequestError):
            await client.completions.create(model="m", prompt="x", max_tokens=0)
        with pytest.raises(openai.NotFoundError):
            await client.completions.create(model="nope", prompt="x")
        vllm.faults.push(Fault.status(429, retry_after=1), Fault.status(500))
        with pytest.raises(openai.RateLimitError):
            await client.completions.create(model="m", prompt="x")
        with pytest.raises(openai.InternalServerError):
            await client.completions.create(model="m", prompt="x")
        vllm.faults.push(Fault.stream_error("boom"))
        with pytest.raises(openai.APIError, match="boom"):
            stream = await client.completions.create(model="m", prompt="x", stream=True)
            async for _ in stream:
                pass


async def test_server_without_logprobs_ignores_them() -> None:
    async with OpenAIDouble(model="m", logprobs=False) as double, sdk(double) as client:
        out = await client.completions.create(
            model="m", prompt=PROMPT, max_tokens=2, echo=True, logprobs=1
        )
    assert out.choices[0].logprobs is None
    assert not out.choices[0].text.startswith(PROMPT)


# -- TGI's /v1, openai SDK ----------------------------------------------------------------


async def test_sdk_on_tgi_v1_routes(tgi: TGIDouble) -> None:
    async with sdk(tgi) as client:
        models = await client.models.list()
        assert [m.id for m in models.data] == [tgi.model_id]
        chat = await client.chat.completions.create(
            model="tgi", messages=[{"role": "user", "content": "hi"}], max_tokens=3, n=3
        )
        assert len(chat.choices) == 1  # TGI ignores n
        assert chat.choices[0].finish_reason == "length"
        assert chat.model == tgi.model_id
        done = await client.completions.create(
            model="tgi", prompt=["a b", "c d"], max_tokens=500, temperature=0, echo=True, logprobs=1
        )
        assert [c.index for c in done.choices] == [0, 1]
        assert all(c.logprobs is None for c in done.choices)  # TGI ignores echo and logprobs
        assert all(c.finish_reason == "stop" for c in done.choices)  # EOS reads "stop"
        assert not done.choices[0].text.startswith("a b")
        stream = await client.completions.create(
            model="tgi", prompt="a b", max_tokens=2, temperature=0, stream=True
        )
        chunks = [c async for c in stream]
        assert [c.choices[0].finish_reason for c in chunks] == ["", "length"]
        assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 2
        with pytest.raises(openai.UnprocessableEntityError):
            await client.completions.create(model="tgi", prompt="a", suffix="b")
    assert tgi.stats.by_path["/v1/chat/completions"] == 1
