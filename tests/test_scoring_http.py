"""Scoring over HTTP: ``OpenAIBackend.score`` (echo + logprobs on /v1/completions) and
``TGIBackend.score`` (decoder_input_details on /generate), against the doubles.

The doubles' log-probs come from one made-up model (``ensemble_async.testing._lm``), so
the expected score of a completion is computed here independently, token by token, and
must also equal what the double reported while generating that very completion.
"""

from __future__ import annotations

import math
from collections.abc import AsyncIterator
from typing import Literal

import pytest
from aiohttp import web

from ensemble_async.backends.openai import OpenAIBackend, _completion_span
from ensemble_async.backends.tgi import TGIBackend
from ensemble_async.errors import ContextLengthError
from ensemble_async.scoring import ScoreRequest, ScoringUnsupportedError, can_score
from ensemble_async.testing import _lm
from ensemble_async.testing.openai_double import OpenAIDouble
from ensemble_async.testing.tgi_double import TGIDouble
from ensemble_async.types import ChatMessage, GenerationRequest

PROMPT = "Question: what grows in the garden?\nAnswer:"


def expected(prompt: str, completion: str) -> tuple[list[str], list[float]]:
    """The completion's tokens (a token straddling the boundary included) and their
    log-probs under the made-up model."""
    tokens, logprobs, seen = [], [], ""
    for token in _lm.split_words(prompt + completion):
        if len(seen) + len(token) > len(prompt):
            tokens.append(token)
            logprobs.append(_lm.logprob(seen, token))
        seen += token
    return tokens, logprobs


@pytest.fixture
async def vllm() -> AsyncIterator[OpenAIDouble]:
    async with OpenAIDouble(model="m") as d:
        yield d


@pytest.fixture
async def tgi() -> AsyncIterator[TGIDouble]:
    async with TGIDouble() as d:
        yield d


# -- OpenAI-compatible ----------------------------------------------------------------


@pytest.mark.parametrize("transport", ["aiohttp", "sdk"])
async def test_openai_scores_completion_tokens_only(
    vllm: OpenAIDouble, transport: Literal["aiohttp", "sdk"]
) -> None:
    if transport == "sdk":
        pytest.importorskip("openai")
    completions = (" green moss and ancient stone", " water", " ")
    async with OpenAIBackend(vllm.url, name="v", transport=transport) as backend:
        assert can_score(backend)
        scores = await backend.score(ScoreRequest(prompt=PROMPT, completions=completions))
    assert [s.text for s in scores] == list(completions)
    for s, c in zip(scores, completions, strict=True):
        tokens, logprobs = expected(PROMPT, c)
        assert list(s.tokens or ()) == tokens
        assert list(s.token_logprobs) == logprobs
        assert s.backend == "v" and s.model == "m"
    assert scores[0].num_tokens == 5
    body = vllm.last_payload
    assert body["echo"] is True and body["logprobs"] == 0 and body["max_tokens"] == 0


async def test_openai_score_equals_logprobs_reported_while_generating(
    vllm: OpenAIDouble,
) -> None:
    async with OpenAIBackend(vllm.url) as backend:
        [done] = await backend.generate(GenerationRequest(prompt=PROMPT, max_new_tokens=7))
        [score] = await backend.score(ScoreRequest(prompt=PROMPT, completions=(done.text,)))
    # ask the double what it reported for that generation, token by token
    again = await _post(
        vllm.url + "/v1/completions",
        {"model": "m", "prompt": PROMPT, "max_tokens": 7, "temperature": 0, "logprobs": 0},
    )
    reported = again["choices"][0]["logprobs"]
    assert "".join(reported["tokens"]) == done.text
    assert list(score.token_logprobs) == reported["token_logprobs"]
    assert math.isclose(score.total, math.fsum(reported["token_logprobs"]))


async def test_openai_straddling_token_counts_for_the_completion(vllm: OpenAIDouble) -> None:
    prompt = "Q: name a colour\n"  # ends with whitespace: "\nblue" is one token
    async with OpenAIBackend(vllm.url) as backend:
        [score] = await backend.score(ScoreRequest(prompt=prompt, completions=("blue sky",)))
    assert score.tokens == ("\nblue", " sky")
    assert list(score.token_logprobs) == expected(prompt, "blue sky")[1]


async def test_openai_falls_back_to_one_generated_token() -> None:
    async with (
        OpenAIDouble(model="m", echo_max_tokens_zero=False) as double,
        OpenAIBackend(double.url) as backend,
    ):
        for _ in range(2):
            [score] = await backend.score(ScoreRequest(prompt=PROMPT, completions=(" water",)))
            assert list(score.token_logprobs) == expected(PROMPT, " water")[1]
        # the first call learned that max_tokens must be 1; the second sent 1 at once
        assert [p["max_tokens"] for p in double.payloads] == [0, 1, 1]


def test_openai_span_skips_a_bos_token_and_the_generated_one() -> None:
    text = "Hi there you"
    tokens = ["<s>", "Hi", " there", " you", " now"]
    offsets = [0, 3, 5, 11, 15]
    data = {"choices": [{"text": text + " now", "logprobs": {"text_offset": offsets}}]}
    assert _completion_span(tokens, len("Hi"), len(text), data) == (2, 4)
    assert _completion_span(tokens, len("Hi th"), len(text), data) == (2, 4)  # straddles
    assert _completion_span(tokens, len("Hi there"), len(text), data) == (3, 4)


async def test_openai_chat_scoring_is_unsupported(vllm: OpenAIDouble) -> None:
    request = ScoreRequest(messages=(ChatMessage("user", "hi"),), completions=("hello",))
    async with OpenAIBackend(vllm.url, name="v") as backend:
        with pytest.raises(ScoringUnsupportedError, match="chat"):
            await backend.score(request)


async def test_openai_check_scoring() -> None:
    async with OpenAIDouble(model="m") as good, OpenAIBackend(good.url) as backend:
        await backend.check_scoring()
    async with (
        OpenAIDouble(model="m", logprobs=False) as bad,
        OpenAIBackend(bad.url, name="no-lp") as backend,
    ):
        with pytest.raises(ScoringUnsupportedError, match=r"'no-lp'.*echo"):
            await backend.check_scoring()
    # TGI's /v1/completions ignores echo and logprobs
    async with TGIDouble() as tgi, OpenAIBackend(tgi.url, name="tgi-v1") as backend:
        with pytest.raises(ScoringUnsupportedError, match="tgi-v1"):
            await backend.check_scoring()


# -- TGI --------------------------------------------------------------------------------


async def test_tgi_scores_completion_tokens_only(tgi: TGIDouble) -> None:
    completions = (" golf hotel india", "blue", " x")
    async with TGIBackend(tgi.url, name="t") as backend:
        assert can_score(backend)
        scores = await backend.score(ScoreRequest(prompt=PROMPT, completions=completions))
    for s, c in zip(scores, completions, strict=True):
        tokens, logprobs = expected(PROMPT, c)
        assert list(s.tokens or ()) == tokens and list(s.token_logprobs) == logprobs
    assert tgi.stats.by_path["/tokenize"] == 3
    params = tgi.last_body["parameters"]
    assert params["decoder_input_details"] is True and params["max_new_tokens"] == 1


async def test_tgi_score_equals_logprobs_reported_while_generating(tgi: TGIDouble) -> None:
    # The double's generated tokens include "." and "\n", which its prompt tokenizer
    # (whitespace-led words) would join to the word before: take a prompt whose first
    # six generated tokens are all words, so both sides split the text alike.
    for k in range(50):
        prompt = f"{PROMPT} ({k})"
        text, _ = tgi.complete(prompt, {"max_new_tokens": 6})
        if all(t.startswith(" ") and t[1:].isalpha() for t in _lm.split_words(text)):
            break
    else:
        pytest.fail("no prompt with word-only tokens")
    body = {"inputs": prompt, "parameters": {"max_new_tokens": 6, "details": True}}
    reported = (await _post(tgi.url + "/generate", body))["details"]["tokens"]
    assert "".join(t["text"] for t in reported) == text
    async with TGIBackend(tgi.url) as backend:
        [score] = await backend.score(ScoreRequest(prompt=prompt, completions=(text,)))
    assert list(score.token_logprobs) == [t["logprob"] for t in reported]
    assert math.isclose(score.total, math.fsum(t["logprob"] for t in reported))


class _NoTokenize(TGIDouble):
    async def _tokenize(self, request: web.Request) -> web.Response:
        return web.json_response({"error": "No fast tokenizer available"}, status=404)


async def test_tgi_scoring_without_tokenize_matches_from_the_end() -> None:
    prompt = "Q: name a colour\n"
    async with _NoTokenize() as double, TGIBackend(double.url) as backend:
        scores = await backend.score(ScoreRequest(prompt=prompt, completions=("blue sky", " red")))
    assert scores[0].tokens == ("\nblue", " sky")
    assert list(scores[0].token_logprobs) == expected(prompt, "blue sky")[1]
    assert list(scores[1].token_logprobs) == expected(prompt, " red")[1]


async def test_tgi_check_scoring_and_unsupported_cases() -> None:
    async with TGIDouble() as good, TGIBackend(good.url) as backend:
        await backend.check_scoring()
        with pytest.raises(ScoringUnsupportedError, match="chat"):
            await backend.score(
                ScoreRequest(messages=(ChatMessage("user", "hi"),), completions=("x",))
            )
    async with (
        TGIDouble(prefill_logprobs=False) as bad,
        TGIBackend(bad.url, name="no-prefill") as backend,
    ):
        with pytest.raises(ScoringUnsupportedError, match=r"'no-prefill'.*prefill"):
            await backend.check_scoring()


async def test_tgi_score_too_long_is_a_context_error() -> None:
    async with (
        TGIDouble(max_input_tokens=5, max_total_tokens=6) as double,
        TGIBackend(double.url) as backend,
    ):
        with pytest.raises(ContextLengthError):
            await backend.score(ScoreRequest(prompt="a b c d", completions=(" e f g",)))


async def _post(url: str, body: object) -> dict:  # type: ignore[type-arg]
    import aiohttp

    async with aiohttp.ClientSession() as s, s.post(url, json=body) as resp:
        assert resp.status == 200
        return await resp.json()  # type: ignore[no-any-return]
