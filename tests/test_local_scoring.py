"""The local scorer and seeded sampling on the two real embedded models (no mocks).

Each model loads once for the module.  The reference for a score is a direct forward
pass on the same weights: ``model(input_ids).logits``, ``log_softmax``, then the
log-probability of each completion token at the position before it.
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import AsyncIterator, Sequence
from typing import Any

import pytest
import pytest_asyncio

from ensemble_async.backends.transformers import TransformersBackend
from ensemble_async.errors import BadRequestError
from ensemble_async.models import MissingModelError, embedded_backend_options
from ensemble_async.scoring import CompletionScore, Scorer, ScoreRequest, can_score
from ensemble_async.types import ChatMessage, GenerationRequest

pytestmark = [pytest.mark.slow, pytest.mark.asyncio(loop_scope="module")]

SMOL = "smollm2-135m-instruct"
GEMMA = "gemma3-270m"
KEYS = [SMOL, GEMMA]
TOL = 1e-4
PROMPT = "The capital of France is"
COMPLETIONS = (
    " Paris.",
    " Paris, a city on the Seine with many museums and old bridges.",
    " Lyon",
    " a question that every schoolchild can answer without thinking twice about it.",
)


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def backends() -> AsyncIterator[dict[str, TransformersBackend]]:
    try:
        options = {k: embedded_backend_options(k) for k in KEYS}
    except MissingModelError as exc:
        pytest.skip(str(exc))
    loaded = {
        k: TransformersBackend(**o, threads=1, batch_window_s=0.05) for k, o in options.items()
    }
    await asyncio.gather(*(b.start() for b in loaded.values()))
    yield loaded
    await asyncio.gather(*(b.aclose() for b in loaded.values()))


def _ids(b: TransformersBackend, text: str, special: bool = True) -> list[int]:
    return [int(i) for i in b.tokenizer(text, add_special_tokens=special)["input_ids"]]


def _reference(b: TransformersBackend, prompt_ids: list[int], completion_ids: list[int]) -> Any:
    """Direct forward pass: log p(completion token | everything before it)."""
    import torch

    ids = prompt_ids + completion_ids
    with torch.inference_mode():
        logits = b.model(torch.tensor([ids])).logits[0].float()
    logprobs = torch.log_softmax(logits, dim=-1)
    k = len(prompt_ids)
    return [float(logprobs[k - 1 + i, t]) for i, t in enumerate(completion_ids)]


def _split(b: TransformersBackend, prompt: str, completion: str, special: bool) -> list[int]:
    prompt_ids = _ids(b, prompt, special)
    joint = _ids(b, prompt + completion, special)
    assert joint[: len(prompt_ids)] == prompt_ids, "this test needs a clean boundary"
    return joint[len(prompt_ids) :]


def _close(got: Sequence[float], want: Sequence[float]) -> None:
    assert len(got) == len(want)
    worst = max((abs(a - b) for a, b in zip(got, want, strict=True)), default=0.0)
    assert worst <= TOL, f"max abs diff {worst:.2e}"


@pytest.mark.parametrize("key", KEYS)
async def test_scores_match_a_direct_forward_pass(
    backends: dict[str, TransformersBackend], key: str
) -> None:
    b = backends[key]
    scores = await b.score(ScoreRequest(prompt=PROMPT, completions=COMPLETIONS))
    assert [s.text for s in scores] == list(COMPLETIONS)
    prompt_ids = _ids(b, PROMPT)
    for s in scores:
        completion_ids = _split(b, PROMPT, s.text, True)
        assert s.tokens == tuple(b.tokenizer.convert_ids_to_tokens(completion_ids))
        assert s.backend == key and s.num_tokens == len(completion_ids) > 0
        _close(s.token_logprobs, await asyncio.to_thread(_reference, b, prompt_ids, completion_ids))
        assert all(x <= 0 for x in s.token_logprobs)
    # The model prefers the right answer to the wrong one.
    assert scores[0].total > scores[2].total


@pytest.mark.parametrize("key", KEYS)
async def test_padding_and_batching_do_not_change_scores(
    backends: dict[str, TransformersBackend], key: str
) -> None:
    b = backends[key]
    alone = [(await b.score(ScoreRequest(prompt=PROMPT, completions=(c,))))[0] for c in COMPLETIONS]
    together = await b.score(ScoreRequest(prompt=PROMPT, completions=COMPLETIONS))
    before = b.stats
    prompts = [PROMPT, "Water boils at", "def add(a, b):", PROMPT]
    concurrent = await asyncio.gather(
        *(
            b.score(ScoreRequest(prompt=p, completions=(COMPLETIONS[i],)))
            for i, p in enumerate(prompts)
        )
    )
    after = b.stats
    assert after.batches - before.batches < len(prompts)  # requests shared forward passes
    assert after.scored_tokens - before.scored_tokens == sum(s[0].num_tokens for s in concurrent)
    for one, both in zip(alone, together, strict=True):
        _close(both.token_logprobs, one.token_logprobs)
    _close(concurrent[0][0].token_logprobs, alone[0].token_logprobs)
    _close(concurrent[3][0].token_logprobs, alone[3].token_logprobs)
    prompt_ids = _ids(b, "Water boils at")
    want = _reference(b, prompt_ids, _split(b, "Water boils at", COMPLETIONS[1], True))
    _close(concurrent[1][0].token_logprobs, want)


async def test_an_empty_completion_has_no_tokens(backends: dict[str, TransformersBackend]) -> None:
    b = backends[SMOL]
    empty, full = await b.score(ScoreRequest(prompt=PROMPT, completions=("", " Paris.")))
    assert empty.token_logprobs == () and empty.tokens == ()
    assert empty.total == 0.0 and empty.mean == -math.inf
    (alone,) = await b.score(ScoreRequest(prompt=PROMPT, completions=(" Paris.",)))
    _close(full.token_logprobs, alone.token_logprobs)


async def test_chat_scores_use_the_chat_template(backends: dict[str, TransformersBackend]) -> None:
    b = backends[SMOL]
    messages = (
        ChatMessage("system", "You answer briefly."),
        ChatMessage("user", "What is the capital of France?"),
    )
    answers = ("The capital of France is Paris.", "Bananas are yellow.")
    scores = await b.score(ScoreRequest(messages=messages, completions=answers))
    rendered = b.tokenizer.apply_chat_template(
        [m.to_dict() for m in messages],
        chat_template=b.chat_template,
        add_generation_prompt=True,
        tokenize=False,
    )
    assert rendered.endswith("<|im_start|>assistant\n")
    prompt_ids = _ids(b, rendered, special=False)
    for s in scores:
        completion_ids = _split(b, rendered, s.text, False)
        # Only the assistant's words are scored: no template token, no end of turn.
        assert b.tokenizer.decode(completion_ids) == s.text
        _close(s.token_logprobs, await asyncio.to_thread(_reference, b, prompt_ids, completion_ids))
    assert scores[0].mean > scores[1].mean


async def test_a_token_merged_across_the_boundary_keeps_the_prompt_tokens(
    backends: dict[str, TransformersBackend],
) -> None:
    b = backends[SMOL]
    prompt = "The capital of France is "  # the trailing space joins the next word's token
    prompt_ids = _ids(b, prompt)
    joint = _ids(b, prompt + "Paris")
    assert joint[: len(prompt_ids)] != prompt_ids  # the tokenizer did merge
    (s,) = await b.score(ScoreRequest(prompt=prompt, completions=("Paris",)))
    completion_ids = _ids(b, "Paris", special=False)
    assert b.tokenizer.decode(completion_ids) == "Paris"
    _close(s.token_logprobs, await asyncio.to_thread(_reference, b, prompt_ids, completion_ids))


async def test_scoring_errors_and_the_protocol(backends: dict[str, TransformersBackend]) -> None:
    b = backends[SMOL]
    assert isinstance(b, Scorer) and can_score(b)
    await b.check_scoring()
    with pytest.raises(BadRequestError, match="prompt is empty"):
        await b.score(ScoreRequest(prompt="", completions=("x",)))
    (ok,) = await b.score(ScoreRequest(prompt="Hi", completions=(" there",)))
    assert isinstance(ok, CompletionScore) and ok.num_tokens >= 1


async def test_seeded_sampling_holds_with_two_backends_sampling_at_once(
    backends: dict[str, TransformersBackend],
) -> None:
    requests = {
        key: GenerationRequest(
            prompt="Once upon a time", max_new_tokens=16, temperature=1.0, seed=7 + i, n=2
        )
        for i, key in enumerate(KEYS)
    }

    async def texts(key: str) -> list[str]:
        return [c.text for c in await backends[key].generate(requests[key])]

    alone = {key: await texts(key) for key in KEYS}
    for key in KEYS:
        assert len(alone[key]) == 2 and all(alone[key])
    for _ in range(3):
        both = await asyncio.gather(*(texts(key) for key in KEYS), texts(SMOL), texts(GEMMA))
        assert both == [alone[SMOL], alone[GEMMA], alone[SMOL], alone[GEMMA]]
    other = requests[SMOL].replace(seed=12345)
    assert [c.text for c in await backends[SMOL].generate(other)] != alone[SMOL]
