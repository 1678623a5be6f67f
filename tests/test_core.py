"""Core types, error classification, secrets, registry, gather_n."""

from __future__ import annotations

import asyncio
import pickle
from typing import Any

import pytest

import ensemble_async as ea
from ensemble_async import errors
from ensemble_async.backend import BaseBackend, gather_n, health_of, info_of, stream_of
from ensemble_async.registry import backend_factory, backend_kinds, create_backend
from ensemble_async.secret import MissingSecretError, Secret
from ensemble_async.types import ChatMessage, Completion, GenerationRequest


def test_request_needs_exactly_one_of_prompt_or_messages() -> None:
    with pytest.raises(ValueError, match="exactly one"):
        GenerationRequest()
    with pytest.raises(ValueError, match="exactly one"):
        GenerationRequest(prompt="a", messages=(ChatMessage("user", "b"),))
    assert GenerationRequest(prompt="a").is_chat is False
    chat = GenerationRequest(messages=[ChatMessage("user", "hi")])  # type: ignore[arg-type]
    assert chat.is_chat and isinstance(chat.messages, tuple)


@pytest.mark.parametrize(
    ("field", "value", "needle"),
    [
        ("max_new_tokens", 0, "max_new_tokens"),
        ("temperature", -0.1, "temperature"),
        ("top_p", 0.0, "top_p"),
        ("top_p", 1.5, "top_p"),
        ("top_k", 0, "top_k"),
        ("n", 0, "n must be"),
        ("min_new_tokens", 999, "min_new_tokens"),
        ("stop", ("",), "stop"),
    ],
)
def test_request_validation_names_the_field(field: str, value: Any, needle: str) -> None:
    with pytest.raises(ValueError, match=needle):
        GenerationRequest(prompt="x", **{field: value})


def test_request_to_dict_is_canonical() -> None:
    a = GenerationRequest(prompt="p", stop=["b", "a"], extra={"z": 1, "a": 2})  # type: ignore[arg-type]
    d = a.to_dict()
    assert d["stop"] == ["b", "a"]
    assert list(d["extra"]) == ["a", "z"]
    assert a.greedy and not a.replace(temperature=0.7).greedy
    assert a.replace(n=3).n == 3 and a.n == 1


@pytest.mark.parametrize(
    ("status", "message", "cls", "retryable"),
    [
        (429, "slow down", errors.RateLimitedError, True),
        (503, "overloaded", errors.OverloadedError, True),
        (500, "boom", errors.ServerError, True),
        (424, "generation failed", errors.ServerError, True),
        (408, "timeout", errors.RequestTimeoutError, True),
        (400, "bad", errors.BadRequestError, False),
        (
            422,
            "Input validation error: temperature must be strictly positive",
            errors.BadRequestError,
            False,
        ),
        (
            400,
            "This model's maximum context length is 2048 tokens",
            errors.ContextLengthError,
            False,
        ),
        (
            422,
            "inputs tokens + max_new_tokens must be <= max_total_tokens",
            errors.ContextLengthError,
            False,
        ),
        (401, "no key", errors.AuthenticationError, False),
        (403, "forbidden", errors.AuthenticationError, False),
        (404, "model not found", errors.NotFoundError, False),
    ],
)
def test_error_from_status(
    status: int, message: str, cls: type[errors.BackendError], retryable: bool
) -> None:
    err = errors.error_from_status(status, message, backend="b1", retry_after=3.0)
    assert type(err) is cls
    assert err.retryable is retryable
    assert "b1" in str(err) and str(status) in str(err)


def test_retry_after_parsing() -> None:
    assert errors.parse_retry_after("2") == 2.0
    assert errors.parse_retry_after("1.5") == 1.5
    assert errors.parse_retry_after(None) is None
    assert errors.parse_retry_after("soon") is None
    assert errors.parse_retry_after("Wed, 21 Oct 2015 07:28:00 GMT") == 0.0  # in the past
    err = errors.error_from_status(429, "x", retry_after=errors.parse_retry_after("7"))
    assert isinstance(err, errors.RateLimitedError) and err.retry_after == 7.0


def test_secret_never_shows_value(monkeypatch: pytest.MonkeyPatch) -> None:
    marker = "sk-test-MARKER-12345"
    monkeypatch.setenv("EA_TEST_KEY", marker)
    s = Secret.from_env("EA_TEST_KEY")
    assert s.reveal() == marker
    for shown in (repr(s), str(s), f"{s}", repr([s]), repr({"k": s})):
        assert marker not in shown
    assert "EA_TEST_KEY" in repr(s)
    with pytest.raises(TypeError):
        pickle.dumps(s)
    monkeypatch.delenv("EA_TEST_KEY")
    with pytest.raises(MissingSecretError, match="EA_TEST_KEY"):
        Secret.from_env("EA_TEST_KEY")


def test_builtin_backends_registered_through_entry_points() -> None:
    kinds = backend_kinds()
    assert {"openai", "tgi", "transformers"} <= set(kinds)
    with pytest.raises(ea.UnknownBackendError, match="nope"):
        backend_factory("nope")


async def test_create_backend_builds_a_protocol_instance() -> None:
    backend = create_backend("tgi", url="http://127.0.0.1:9", name="t")
    async with backend:
        assert isinstance(backend, ea.Backend)
        assert backend.name == "t"


class _Counting(BaseBackend):
    kind = "counting"


async def test_gather_n_tops_up_concurrently_and_reindexes() -> None:
    started: list[int] = []
    all_started = asyncio.Event()

    async def one_more(k: int) -> list[Completion]:
        started.append(k)
        if len(started) == 3:
            all_started.set()
        await all_started.wait()  # proves the three calls run at the same time
        return [Completion(text=f"extra{k}", finish_reason="stop", backend="b", latency_s=0.0)]

    first = [Completion(text="first", finish_reason="stop", backend="b", latency_s=0.0)]
    out = await asyncio.wait_for(gather_n(4, first, one_more), 5)
    assert [c.text for c in out] == ["first", "extra0", "extra1", "extra2"]
    assert [c.index for c in out] == [0, 1, 2, 3]
    same = await gather_n(1, first, one_more)
    assert same == first


async def test_gather_n_propagates_failure() -> None:
    async def one_more(k: int) -> list[Completion]:
        if k == 1:
            raise errors.ServerError("nope")
        await asyncio.Event().wait()  # would hang forever unless cancelled
        return []

    with pytest.raises(errors.ServerError, match="nope"):
        await asyncio.wait_for(gather_n(3, [], one_more), 5)


async def test_base_backend_context_manager() -> None:
    async with _Counting(name="x") as b:
        assert b.name == "x"
        assert "x" in repr(b)


class _OnlyGenerate(BaseBackend):
    kind = "minimal"

    async def generate(self, request: GenerationRequest) -> list[Completion]:
        return [Completion(f"echo {request.prompt}", "stop", self.name, 0.0)]


async def test_base_backend_defaults_for_the_optional_methods() -> None:
    b = _OnlyGenerate(name="m")
    events = [e async for e in b.stream(GenerationRequest(prompt="p"))]
    assert [type(e) for e in events] == [Completion]
    assert events[0].text == "echo p"
    health = await b.health()
    assert health.ok and "unknown" in health.detail
    info = await b.info()
    assert (info.name, info.kind, info.model) == ("m", "minimal", None)
    with pytest.raises(ValueError, match="n == 1"):
        [e async for e in b.stream(GenerationRequest(prompt="p", n=2))]


async def test_optional_methods_through_the_helpers() -> None:
    class Bare:  # not a BaseBackend: only the required part of the protocol
        kind = "bare"
        name = "b"

        async def generate(self, request: GenerationRequest) -> list[Completion]:
            return [Completion("x", "stop", "b", 0.0)]

        async def aclose(self) -> None:
            return None

    bare = Bare()
    assert (await info_of(bare)).kind == "bare"  # type: ignore[arg-type]
    assert (await health_of(bare)).ok  # type: ignore[arg-type]
    assert [e async for e in stream_of(bare, GenerationRequest(prompt="p"))] == [  # type: ignore[arg-type]
        Completion("x", "stop", "b", 0.0)
    ]
    own = _Counting(name="c")
    assert (await info_of(own)).name == "c"


def test_public_api_resolves_and_heavy_parts_load_lazily() -> None:
    import subprocess
    import sys

    code = (
        "import sys, ensemble_async as ea\n"
        "assert 'ensemble_async.consensus' not in sys.modules, 'eager import'\n"
        "missing = [n for n in ea.__all__ if not hasattr(ea, n)]\n"
        "assert not missing, missing\n"
        "assert ea.Ensemble.__module__ == 'ensemble_async.ensemble'\n"
        "print('ok')\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        _ = ea.nope
