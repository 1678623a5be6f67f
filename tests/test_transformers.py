"""The transformers backend on the two real embedded models (no mocks).

Each model loads once per module (from the conversion cache after the first run). The
reference for "what a request gives alone" is a direct ``model.generate()`` call on the
same weights, run in a thread.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from typing import Any

import pytest
import pytest_asyncio
from lag import MAX_LAG_S, LagProbe

from ensemble_async.backends.transformers import TransformersBackend
from ensemble_async.errors import BadRequestError, ContextLengthError, FatalError
from ensemble_async.models import (
    MissingModelError,
    embedded_backend_options,
    smollm2_gguf,
)
from ensemble_async.registry import create_backend
from ensemble_async.types import ChatMessage, Completion, GenerationRequest, TextDelta

pytestmark = [pytest.mark.slow, pytest.mark.asyncio(loop_scope="module")]

KEYS = ["smollm2-135m-instruct", "gemma3-270m"]
PROMPTS = [
    "The capital of France is",
    "One, two, three,",
    "def add(a, b):",
    "My favourite fruit is",
    "The weather today is",
    "Water boils at",
    "A list of colours: red,",
    "Once upon a time",
]


@dataclass
class Loaded:
    key: str
    backend: TransformersBackend


def _options(key: str) -> dict[str, Any]:
    try:
        return embedded_backend_options(key)
    except MissingModelError as exc:
        pytest.skip(str(exc))


@pytest_asyncio.fixture(scope="module", loop_scope="module", params=KEYS)
async def loaded(request: pytest.FixtureRequest) -> AsyncIterator[Loaded]:
    key: str = request.param
    backend = TransformersBackend(**_options(key), threads=1, batch_window_s=0.1)
    await backend.start()
    yield Loaded(key, backend)
    await backend.aclose()


def _greedy(prompt: str, max_new_tokens: int = 8, **kw: Any) -> GenerationRequest:
    return GenerationRequest(prompt=prompt, max_new_tokens=max_new_tokens, **kw)


def _prompt_ids(b: TransformersBackend, request: GenerationRequest) -> list[int]:
    tok = b.tokenizer
    if request.messages is not None:
        text = tok.apply_chat_template(
            [m.to_dict() for m in request.messages],
            chat_template=b.chat_template,
            add_generation_prompt=True,
            tokenize=False,
        )
        return list(tok(text, add_special_tokens=False)["input_ids"])
    return list(tok(request.prompt, add_special_tokens=True)["input_ids"])


def _reference_ids(b: TransformersBackend, prompt_ids: list[int], max_new_tokens: int) -> list[int]:
    """Greedy ``model.generate()`` on one prompt: the generated ids up to the first EOS."""
    import torch

    with torch.inference_mode():
        out = b.model.generate(
            input_ids=torch.tensor([prompt_ids]),
            attention_mask=torch.ones((1, len(prompt_ids)), dtype=torch.long),
            max_new_tokens=max_new_tokens,
            do_sample=False,
            eos_token_id=sorted(b.eos_token_ids),
            pad_token_id=b.tokenizer.pad_token_id,
        )
    ids = [int(t) for t in out[0, len(prompt_ids) :].tolist()]
    for pos, tid in enumerate(ids):
        if tid in b.eos_token_ids:
            return ids[: pos + 1]
    return ids


async def _reference(b: TransformersBackend, request: GenerationRequest) -> list[int]:
    return await asyncio.to_thread(
        _reference_ids, b, _prompt_ids(b, request), request.max_new_tokens
    )


def _decode(b: TransformersBackend, ids: Sequence[int]) -> str:
    content = [t for t in ids if t not in b.eos_token_ids]
    return str(
        b.tokenizer.decode(content, skip_special_tokens=True, clean_up_tokenization_spaces=False)
    )


def _assert_matches_reference(b: TransformersBackend, c: Completion, ref: list[int]) -> None:
    ended = bool(ref) and ref[-1] in b.eos_token_ids
    assert c.text == _decode(b, ref)
    assert c.completion_tokens == len(ref)
    assert c.finish_reason == ("stop" if ended else "length")


# --------------------------------------------------------------------------- basics


async def test_loaded_model_facts(loaded: Loaded) -> None:
    b = loaded.backend
    info = await b.info()
    assert info.kind == "transformers" and info.name == loaded.key
    assert info.supports_n is True and info.max_batch_size == 8
    assert info.max_total_tokens == b.model.config.get_text_config().max_position_embeddings
    assert b.tokenizer.eos_token_id in b.eos_token_ids
    assert b.chat_template  # SmolLM2's own template; Gemma's turn format for the base model
    health = await b.health()
    assert health.ok, health.detail


async def test_plain_prompt_gives_reference_text(loaded: Loaded) -> None:
    b = loaded.backend
    request = _greedy(PROMPTS[0], 12)
    (c,) = await b.generate(request)
    assert c.text.strip()
    assert c.backend == loaded.key and c.index == 0
    assert c.prompt_tokens == len(_prompt_ids(b, request))
    _assert_matches_reference(b, c, await _reference(b, request))


async def test_chat_request_uses_the_chat_template(loaded: Loaded) -> None:
    b = loaded.backend
    request = GenerationRequest(
        messages=(
            ChatMessage("system", "You answer briefly."),
            ChatMessage("user", "Name three colours."),
        ),
        max_new_tokens=16,
    )
    (c,) = await b.generate(request)
    assert c.text.strip()
    ids = _prompt_ids(b, request)
    assert c.prompt_tokens == len(ids)
    rendered = b.tokenizer.decode(ids)
    assert "Name three colours." in rendered and "You answer briefly." in rendered
    _assert_matches_reference(b, c, await _reference(b, request))


async def test_registry_builds_the_backend() -> None:
    backend = create_backend("transformers", **_options(KEYS[0]))
    assert isinstance(backend, TransformersBackend)
    assert not backend.loaded  # nothing loads before first use
    assert not (await backend.health()).ok
    await backend.aclose()


# --------------------------------------------------------------------------- batching


def _shared_batches(sizes: dict[int, int]) -> int:
    return sum(count for size, count in sizes.items() if size > 1)


async def test_concurrent_requests_are_micro_batched_and_match_alone(loaded: Loaded) -> None:
    b = loaded.backend
    before = b.stats
    requests = [_greedy(p, 8) for p in PROMPTS]
    results = await asyncio.gather(*(b.generate(r) for r in requests))
    after = b.stats
    assert after.requests - before.requests == len(requests)
    assert after.batches - before.batches < len(requests)  # some shared a generate() call
    assert _shared_batches(after.batch_sizes) > _shared_batches(before.batch_sizes)
    for request, (c,) in zip(requests[:4], results[:4], strict=True):
        assert c.prompt_tokens == len(_prompt_ids(b, request))
        _assert_matches_reference(b, c, await _reference(b, request))
    for request, (c,) in zip(requests[4:], results[4:], strict=True):
        assert c.text and c.completion_tokens is not None
        assert 1 <= c.completion_tokens <= request.max_new_tokens


async def test_generate_many_runs_one_batch(loaded: Loaded) -> None:
    b = loaded.backend
    before = b.stats
    results = await b.generate_many([_greedy(p, 4) for p in PROMPTS])
    after = b.stats
    assert after.batches - before.batches == 1
    assert after.batch_sizes.get(8, 0) == before.batch_sizes.get(8, 0) + 1
    assert [len(r) for r in results] == [1] * 8
    assert all(r[0].completion_tokens == 4 or r[0].finish_reason == "stop" for r in results)


async def test_different_settings_do_not_share_a_batch(loaded: Loaded) -> None:
    b = loaded.backend
    before = b.stats
    await b.generate_many([_greedy(PROMPTS[0], 3), _greedy(PROMPTS[1], 4), _greedy(PROMPTS[2], 3)])
    after = b.stats
    assert after.batches - before.batches == 2  # the two 3-token requests together
    assert after.requests - before.requests == 3


async def test_sampling_n_gives_n_completions(loaded: Loaded) -> None:
    b = loaded.backend
    request = _greedy(PROMPTS[7], 8, temperature=1.0, top_k=50, n=3)
    completions = await b.generate(request)
    assert [c.index for c in completions] == [0, 1, 2]
    for c in completions:
        assert c.completion_tokens is not None and 1 <= c.completion_tokens <= 8
        assert c.finish_reason in ("stop", "length")
        assert c.prompt_tokens == len(_prompt_ids(b, request))


async def test_greedy_n_returns_identical_copies(loaded: Loaded) -> None:
    completions = await loaded.backend.generate(_greedy(PROMPTS[3], 6, n=2))
    assert [c.index for c in completions] == [0, 1]
    assert completions[0].text == completions[1].text
    assert completions[0].completion_tokens == completions[1].completion_tokens


async def test_seeded_sampling_is_reproducible(loaded: Loaded) -> None:
    b = loaded.backend
    request = _greedy(PROMPTS[7], 8, temperature=1.0, seed=1234, n=2)
    first, second = await asyncio.gather(b.generate(request), b.generate(request))
    assert [c.text for c in first] == [c.text for c in second]


# --------------------------------------------------------------------------- stops, counts


async def test_stop_string_cuts_text_and_counts_tokens_exactly(loaded: Loaded) -> None:
    b = loaded.backend
    unconstrained = _greedy("Count: 1, 2, 3, 4, 5,", 12)
    ref = await _reference(b, unconstrained)
    full = _decode(b, ref)
    assert "," in full  # the model continues the list
    (c,) = await b.generate(unconstrained.replace(stop=(",",)))
    assert c.finish_reason == "stop"
    assert c.text == full[: full.index(",")]
    assert "," not in c.text
    # The count is the shortest prefix of the reference whose text holds the stop string.
    k = next(i for i in range(1, len(ref) + 1) if "," in _decode(b, ref[:i]))
    assert c.completion_tokens == k


async def test_max_new_tokens_gives_finish_length(loaded: Loaded) -> None:
    b = loaded.backend
    request = _greedy("1 2 3 4 5 6 7 8 9", 4)
    (c,) = await b.generate(request)
    ref = await _reference(b, request)
    assert len(ref) == 4 and ref[-1] not in b.eos_token_ids
    assert c.finish_reason == "length" and c.completion_tokens == 4


async def test_context_overflow_is_rejected(loaded: Loaded) -> None:
    b = loaded.backend
    limit = (await b.info()).max_total_tokens
    assert limit is not None
    with pytest.raises(ContextLengthError):
        await b.generate(_greedy(PROMPTS[0], limit))


# --------------------------------------------------------------------------- streaming


async def test_stream_deltas_concatenate_to_the_completion(loaded: Loaded) -> None:
    b = loaded.backend
    request = _greedy("Count: 1, 2, 3, 4, 5, 6,", 16, stop=(" 9",))
    deltas: list[str] = []
    final: Completion | None = None
    async for event in b.stream(request):
        assert final is None, "nothing may follow the completion"
        if isinstance(event, TextDelta):
            deltas.append(event.text)
        else:
            final = event
    assert final is not None
    assert len(deltas) > 1
    assert "".join(deltas) == final.text
    (plain,) = await b.generate(request)
    assert plain.text == final.text and plain.completion_tokens == final.completion_tokens


async def test_stream_needs_n_1(loaded: Loaded) -> None:
    with pytest.raises(BadRequestError):
        async for _ in loaded.backend.stream(_greedy(PROMPTS[0], 4, n=2)):
            pass


# --------------------------------------------------------------------------- the loop


async def test_event_loop_is_never_blocked_while_generating(loaded: Loaded) -> None:
    b = loaded.backend
    requests = [_greedy(p, 16, stop=("\n\n",)) for p in PROMPTS[:4]]
    async with LagProbe() as ticker:
        results = await asyncio.gather(*(b.generate(r) for r in requests))
        async for _ in b.stream(_greedy(PROMPTS[4], 8)):
            pass
    assert all(r[0].completion_tokens for r in results)
    assert ticker.ticks > 10
    assert ticker.max_lag < MAX_LAG_S, f"the loop stalled for {ticker.max_lag:.3f} s"


# --------------------------------------------------------------------------- shutdown


@pytest_asyncio.fixture(loop_scope="module")
async def fresh() -> AsyncIterator[TransformersBackend]:
    """A second SmolLM2 backend for tests that close it (loads from the cache)."""
    try:
        gguf = smollm2_gguf()
    except MissingModelError as exc:
        pytest.skip(str(exc))
    backend = TransformersBackend(str(gguf), threads=1, batch_window_s=0.0)
    await backend.start()
    yield backend
    await backend.aclose()


async def test_aclose_fails_pending_requests_instead_of_hanging(
    fresh: TransformersBackend,
) -> None:
    # Different max_new_tokens: four batches, run one after the other.
    tasks = [asyncio.create_task(fresh.generate(_greedy(PROMPTS[i], 20 + i))) for i in range(4)]
    await asyncio.sleep(0)  # let each task queue its request
    await asyncio.wait_for(fresh.aclose(), timeout=60)
    results = await asyncio.wait_for(asyncio.gather(*tasks, return_exceptions=True), timeout=5)
    assert all(isinstance(r, FatalError) for r in results), results
    assert not (await fresh.health()).ok
    with pytest.raises(FatalError):
        await fresh.generate(_greedy(PROMPTS[0], 2))


async def test_cancelled_requests_do_not_break_the_worker(fresh: TransformersBackend) -> None:
    expected = await fresh.generate(_greedy(PROMPTS[5], 6))
    before = fresh.stats
    running = asyncio.create_task(fresh.generate(_greedy(PROMPTS[0], 12)))
    waiting = asyncio.create_task(fresh.generate(_greedy(PROMPTS[1], 7)))
    await asyncio.sleep(0)  # both are queued now
    waiting.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiting
    assert fresh.queued <= 1
    await running
    assert fresh.stats.requests - before.requests == 1  # the cancelled one never ran

    # Leave a stream after its first delta: its batch stops early, the worker goes on.
    tokens_before = fresh.stats.generated_tokens
    async with contextlib.aclosing(fresh.stream(_greedy(PROMPTS[2], 40))) as events:
        async for event in events:
            assert isinstance(event, TextDelta)
            break
    again = await fresh.generate(_greedy(PROMPTS[5], 6))
    assert [c.text for c in again] == [c.text for c in expected]
    assert fresh.stats.generated_tokens - tokens_before < 40 + 6  # the stream stopped early
    assert (await fresh.health()).ok
