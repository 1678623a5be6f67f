"""Protocol details of the doubles that the real clients do not exercise, over raw HTTP:
TGI's defaults and validation quirks, its /v1 and side routes, and the OpenAI double's
echo and log-probs rules."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest

from ensemble_async.testing import _lm
from ensemble_async.testing.faults import Fault
from ensemble_async.testing.openai_double import OpenAIDouble
from ensemble_async.testing.tgi_double import TGIDouble

PROMPT = "Write a short poem about the sea"


@pytest.fixture
async def tgi() -> AsyncIterator[TGIDouble]:
    async with TGIDouble() as d:
        yield d


async def post(url: str, body: Any) -> tuple[int, dict[str, str], str]:
    async with aiohttp.ClientSession() as s, s.post(url, json=body) as resp:
        return resp.status, dict(resp.headers), await resp.text()


def events(text: str) -> list[Any]:
    return [json.loads(e[5:]) for e in text.split("\n\n") if e.startswith("data:{")]


# -- TGI ----------------------------------------------------------------------------------


async def test_tgi_without_parameters_samples_with_a_random_seed(tgi: TGIDouble) -> None:
    texts = set()
    for _ in range(3):
        status, headers, text = await post(tgi.url + "/generate", {"inputs": PROMPT})
        assert status == 200 and json.loads(text).keys() == {"generated_text"}
        texts.add(json.loads(text)["generated_text"])
        assert headers["x-prompt-tokens"] == str(len(PROMPT.split()))
    assert len(texts) > 1  # do_sample defaults to true when parameters are absent
    greedy = {"inputs": PROMPT, "parameters": {"max_new_tokens": 5}}
    first, second = [json.loads((await post(tgi.url + "/generate", greedy))[2]) for _ in "ab"]
    assert first == second  # ... but to false inside a parameters object
    status, _, text = await post(tgi.url + "/generate", {"inputs": PROMPT, "parameters": None})
    assert status == 422 and "parameters" in text


async def test_tgi_best_of_counts_any_temperature_as_sampling(tgi: TGIDouble) -> None:
    body = {"inputs": PROMPT, "parameters": {"best_of": 2, "temperature": 1.0, "details": True}}
    status, _, text = await post(tgi.url + "/generate", body)
    assert status == 200 and len(json.loads(text)["details"]["best_of_sequences"]) == 1
    body = {"inputs": PROMPT, "parameters": {"best_of": 2, "details": True}}
    status, _, text = await post(tgi.url + "/generate", body)
    assert status == 422 and "you must use sampling" in text


@pytest.mark.parametrize(
    ("params", "needle"),
    [
        ({"top_n_tokens": 6}, "`top_n_tokens` must be >= 0 and <= 5. Given: 6"),
        ({"frequency_penalty": -2.5}, "`frequency_penalty` must be >= -2.0 and <= 2.0"),
        ({"truncate": 0}, "`truncate` must be strictly positive and less than 4095. Given: 0"),
        ({"truncate": 5000}, "Given: 5000"),
    ],
)
async def test_tgi_validation(tgi: TGIDouble, params: dict[str, Any], needle: str) -> None:
    status, _, text = await post(tgi.url + "/generate", {"inputs": PROMPT, "parameters": params})
    assert status == 422
    body = json.loads(text)
    assert body["error_type"] == "validation" and needle in body["error"]


async def test_tgi_top_tokens_and_truncated_prefill(tgi: TGIDouble) -> None:
    params = {"max_new_tokens": 3, "top_n_tokens": 2, "details": True}
    _, _, text = await post(tgi.url + "/generate_stream", {"inputs": PROMPT, "parameters": params})
    got = events(text)
    assert [len(e["top_tokens"]) for e in got] == [2, 2, 2]
    assert all(e["top_tokens"][0] == e["token"] for e in got)
    params = {"max_new_tokens": 1, "decoder_input_details": True, "truncate": 3}
    _, headers, text = await post(tgi.url + "/generate", {"inputs": PROMPT, "parameters": params})
    prefill = json.loads(text)["details"]["prefill"]
    assert [t["text"] for t in prefill] == _lm.split_words(PROMPT)[-3:]
    assert prefill[0]["logprob"] is None and headers["x-prompt-tokens"] == "3"


async def test_tgi_stream_headers_and_cut_short_stream(tgi: TGIDouble) -> None:
    body = {"inputs": PROMPT, "parameters": {"max_new_tokens": 2}}
    _, headers, _ = await post(tgi.url + "/generate_stream", body)
    assert headers["x-compute-characters"] == str(len(PROMPT))
    assert headers["X-Accel-Buffering"] == "no"
    tgi.faults.push(Fault.truncate())
    _, _, text = await post(tgi.url + "/generate_stream", body)
    last = events(text)[-1]
    assert last == {
        "error": "Incomplete generation stream",
        "error_type": "incomplete_generation_stream",
    }
    tgi.faults.push(Fault.generation_error("CUDA out of memory"))
    status, _, text = await post(tgi.url + "/generate", body)
    assert status == 424
    assert json.loads(text) == {
        "error": "Request failed during generation: CUDA out of memory",
        "error_type": "generation",
    }


async def test_tgi_compat_full_text_follows_the_pipeline_tag() -> None:
    body = {"inputs": PROMPT, "parameters": {"max_new_tokens": 3}}
    for tag, full in (("text-generation", True), ("text2text-generation", False)):
        async with TGIDouble(pipeline_tag=tag) as double:
            _, _, text = await post(double.url + "/", body)
            generated = double.complete(PROMPT, {"max_new_tokens": 3})[0]
        [answer] = json.loads(text)
        assert answer["generated_text"] == (PROMPT if full else "") + generated


async def test_tgi_side_routes(tgi: TGIDouble) -> None:
    await post(tgi.url + "/generate", {"inputs": PROMPT, "parameters": {"max_new_tokens": 2}})
    async with aiohttp.ClientSession() as s:
        async with s.get(tgi.url + "/v1/models") as r:
            assert await r.json() == {
                "object": "list",
                "data": [
                    {"id": tgi.model_id, "object": "model", "created": 0, "owned_by": tgi.model_id}
                ],
            }
        async with s.get(tgi.url + "/metrics") as r:
            metrics = await r.text()
    assert "tgi_request_count 1" in metrics and "tgi_request_success 1" in metrics
    status, _, text = await post(tgi.url + "/tokenize", {"inputs": "a b\n"})
    assert status == 200
    assert json.loads(text) == [
        {"id": _lm.token_id("a"), "text": "a", "start": 0, "stop": 1},
        {"id": _lm.token_id(" b\n"), "text": " b\n", "start": 1, "stop": 4},
    ]


async def test_tgi_v1_chat_stream(tgi: TGIDouble) -> None:
    body = {
        "messages": [{"role": "user", "content": "hi"}],
        "max_tokens": 500,
        "temperature": 0,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    status, _, text = await post(tgi.url + "/v1/chat/completions", body)
    assert status == 200 and text.rstrip().endswith("[DONE]")
    got = events(text)
    usage = got.pop()
    assert usage["choices"] == [] and usage["usage"]["completion_tokens"] == len(got)
    last = got[-1]["choices"][0]
    assert last["finish_reason"] == "stop" and last["delta"]["content"] == ""  # the EOS token
    bad = {**body, "temperature": -1}
    status, _, text = await post(tgi.url + "/v1/chat/completions", bad)
    assert status == 200  # validation errors arrive inside the stream
    assert events(text)[0]["error"]["http_status_code"] == 422
    status, _, text = await post(tgi.url + "/v1/chat/completions", {**bad, "stream": False})
    assert status == 422 and json.loads(text)["error_type"] == "validation"
    tgi.faults.push(Fault.truncate(), Fault.stream_error("boom"))
    for needle in ("Incomplete generation stream", "boom"):
        status, _, text = await post(tgi.url + "/v1/chat/completions", body)
        assert status == 200 and text.rstrip().endswith("[DONE]")
        assert events(text)[-1]["error"] == {"message": needle, "http_status_code": 422}


# -- OpenAI -------------------------------------------------------------------------------


async def test_openai_echo_only_and_logprob_limits() -> None:
    async with OpenAIDouble(model="m") as double:
        url = double.url + "/v1/completions"
        status, _, text = await post(
            url, {"prompt": PROMPT, "echo": True, "max_tokens": 0, "logprobs": 1}
        )
        answer = json.loads(text)
        choice = answer["choices"][0]
        assert status == 200 and choice["text"] == PROMPT
        assert choice["logprobs"]["tokens"] == _lm.split_words(PROMPT)
        assert choice["logprobs"]["top_logprobs"][0] is None
        assert answer["usage"]["completion_tokens"] == 1  # vLLM counts its one hidden token
        status, _, text = await post(url, {"prompt": PROMPT, "logprobs": 21})
        assert status == 400 and json.loads(text)["error"]["param"] == "logprobs"
        status, _, text = await post(url, {"prompt": PROMPT, "prompt_logprobs": 1, "stream": True})
        assert status == 400 and "stream" in json.loads(text)["error"]["message"]
        chat = double.url + "/v1/chat/completions"
        status, _, text = await post(
            chat, {"messages": [{"role": "user", "content": [{"type": "image_url"}]}]}
        )
        assert status == 400
