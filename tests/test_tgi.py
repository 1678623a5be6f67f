"""The TGI adapter against the TGI double, and the double's own protocol behaviour."""

from __future__ import annotations

import asyncio
import json
import re
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest

from ensemble_async import errors
from ensemble_async.backend import Backend
from ensemble_async.backends.tgi import TGIBackend
from ensemble_async.testing.faults import Fault, FaultKind, FaultPlan
from ensemble_async.testing.tgi_double import VOCAB, TGIDouble
from ensemble_async.types import ChatMessage, Completion, GenerationRequest, TextDelta

PROMPT = "Write a short poem about the sea"
SECRET = "sk-very-secret-key-123"


@pytest.fixture
async def double() -> AsyncIterator[TGIDouble]:
    async with TGIDouble() as d:
        yield d


@pytest.fixture
async def backend(double: TGIDouble) -> AsyncIterator[TGIBackend]:
    async with TGIBackend(double.url, name="tgi-test") as b:
        yield b


async def one(backend: TGIBackend, **kw: Any) -> Completion:
    kw.setdefault("prompt", PROMPT)
    [c] = await backend.generate(GenerationRequest(**kw))
    return c


async def collect(backend: TGIBackend, request: GenerationRequest) -> tuple[str, Completion]:
    pieces: list[str] = []
    final: list[Completion] = []
    async for event in backend.stream(request):
        assert not final, "nothing may follow the final Completion"
        if isinstance(event, TextDelta):
            pieces.append(event.text)
        else:
            final.append(event)
    assert len(final) == 1
    return "".join(pieces), final[0]


async def raw_post(url: str, body: Any, *, raw: bytes | None = None) -> tuple[int, str, str]:
    """POST to the double without the adapter: (status, content type, body text)."""
    async with aiohttp.ClientSession() as s:
        if raw is not None:
            resp_cm = s.post(url, data=raw, headers={"Content-Type": "application/json"})
        else:
            resp_cm = s.post(url, json=body)
        async with resp_cm as resp:
            return resp.status, resp.content_type, await resp.text()


# -- payloads -----------------------------------------------------------------------------


def test_backend_satisfies_protocol() -> None:
    assert isinstance(TGIBackend("http://127.0.0.1:1"), Backend)
    assert TGIBackend("http://127.0.0.1:1").name == "tgi"


async def test_greedy_sends_do_sample_false_and_no_sampling_fields(
    backend: TGIBackend, double: TGIDouble
) -> None:
    c = await one(backend, temperature=0.0, top_p=0.5, top_k=5, max_new_tokens=7)
    params = double.last_body["parameters"]
    assert double.last_body["inputs"] == PROMPT
    assert params["do_sample"] is False
    for absent in ("temperature", "top_p", "top_k", "min_new_tokens", "n"):
        assert absent not in params
    assert params["max_new_tokens"] == 7
    assert params["details"] is True
    assert c.backend == "tgi-test" and c.text and c.latency_s >= 0


async def test_sampling_payload(backend: TGIBackend, double: TGIDouble) -> None:
    await one(
        backend,
        temperature=0.7,
        top_p=1.0,
        top_k=40,
        seed=11,
        min_new_tokens=2,
        extra={"repetition_penalty": 1.1, "watermark": False},
    )
    params = double.last_body["parameters"]
    assert params["do_sample"] is True
    assert params["temperature"] == 0.7
    assert "top_p" not in params  # TGI rejects 1.0
    assert params["top_k"] == 40
    assert params["seed"] == 11
    assert params["repetition_penalty"] == 1.1 and params["watermark"] is False
    assert "min_new_tokens" not in params  # not a TGI parameter

    await one(backend, temperature=0.7, top_p=0.9)
    params = double.last_body["parameters"]
    assert params["top_p"] == 0.9 and "seed" not in params and "top_k" not in params


async def test_greedy_is_deterministic_and_seeds_vary_samples(backend: TGIBackend) -> None:
    g1 = await one(backend, max_new_tokens=64)
    g2 = await one(backend, max_new_tokens=64, seed=99)
    assert g1.text == g2.text
    s1 = await one(backend, temperature=0.8, seed=1, max_new_tokens=64)
    s1_again = await one(backend, temperature=0.8, seed=1, max_new_tokens=64)
    s2 = await one(backend, temperature=0.8, seed=2, max_new_tokens=64)
    assert s1.text == s1_again.text
    assert s1.text != s2.text


async def test_n_fans_out_to_n_requests_with_distinct_seeds(
    backend: TGIBackend, double: TGIDouble
) -> None:
    out = await backend.generate(
        GenerationRequest(prompt=PROMPT, temperature=0.9, seed=5, n=3, max_new_tokens=32)
    )
    assert [c.index for c in out] == [0, 1, 2]
    assert double.stats.requests == 3
    assert sorted(b["parameters"]["seed"] for b in double.received) == [5, 6, 7]
    assert len({c.text for c in out}) == 3


async def test_n_failure_raises_backend_error_not_group(
    backend: TGIBackend, double: TGIDouble
) -> None:
    double.faults.push(Fault.status(503))
    with pytest.raises(errors.OverloadedError):
        await backend.generate(GenerationRequest(prompt=PROMPT, temperature=0.9, n=3))


async def test_chat_request_is_refused(backend: TGIBackend, double: TGIDouble) -> None:
    req = GenerationRequest(messages=(ChatMessage("user", "hi"),))
    with pytest.raises(errors.BadRequestError, match="prompt"):
        await backend.generate(req)
    assert double.stats.requests == 0


# -- answers ------------------------------------------------------------------------------


async def test_finish_reasons_and_token_counts(backend: TGIBackend, double: TGIDouble) -> None:
    short = await one(backend, max_new_tokens=3)  # natural length is at least 8
    assert short.finish_reason == "length"
    assert short.completion_tokens == 3
    assert len(short.text.split()) <= 3
    assert short.prompt_tokens == len(PROMPT.split())  # from TGI's x-prompt-tokens header

    full = await one(backend, max_new_tokens=500)  # ends with EOS before 500 tokens
    assert full.finish_reason == "stop"
    assert full.completion_tokens is not None and 8 < full.completion_tokens < 500
    assert "</s>" not in full.text

    counted = await one(backend, max_new_tokens=3, extra={"decoder_input_details": True})
    assert counted.prompt_tokens == len(PROMPT.split())


async def test_stop_string_cut_off_and_reported_as_stop(
    backend: TGIBackend, double: TGIDouble
) -> None:
    full = (await one(backend, max_new_tokens=500)).text
    words = [w for w in full.split() if w.isalpha()]
    assert len(words) >= 4
    stop = " " + words[3]
    c = await one(backend, max_new_tokens=500, stop=(stop, "never-there"))
    assert double.last_body["parameters"]["stop"] == [stop, "never-there"]
    assert c.finish_reason == "stop"
    assert c.text == full[: full.find(stop)]
    assert stop not in c.text


@pytest.mark.parametrize(("limit", "count"), [(4, 5), (2, 3)])
async def test_too_many_stop_strings_refused_before_sending(limit: int, count: int) -> None:
    async with (
        TGIDouble(max_stop_sequences=limit) as double,
        TGIBackend(double.url) as backend,
    ):
        stops = tuple(f"s{i}" for i in range(count))
        with pytest.raises(errors.BadRequestError, match="max_stop_sequences") as info:
            await one(backend, stop=stops)
        assert f"at most {limit}" in str(info.value)
        assert double.stats.requests == 0
        await one(backend, stop=stops[:limit])  # at the limit is fine
        assert double.stats.requests == 1


async def test_context_too_long_is_context_length_error() -> None:
    async with (
        TGIDouble(max_input_tokens=10, max_total_tokens=20) as double,
        TGIBackend(double.url) as backend,
    ):
        with pytest.raises(errors.ContextLengthError):
            await one(backend, prompt="word " * 30)
        with pytest.raises(errors.ContextLengthError):
            await one(backend, prompt="word " * 5, max_new_tokens=50)
        with pytest.raises(errors.ContextLengthError):
            await collect(backend, GenerationRequest(prompt="w " * 5, max_new_tokens=50))


async def test_empty_prompt_is_bad_request(backend: TGIBackend) -> None:
    with pytest.raises(errors.BadRequestError, match="cannot be empty") as info:
        await one(backend, prompt="")
    assert info.value.status == 422
    assert not isinstance(info.value, errors.ContextLengthError)


# -- streaming ----------------------------------------------------------------------------


@pytest.mark.parametrize(("space", "keepalive"), [(False, False), (True, False), (False, True)])
async def test_stream_deltas_add_up_to_final_text(space: bool, keepalive: bool) -> None:
    async with (
        TGIDouble(sse_space=space, keepalive=keepalive) as double,
        TGIBackend(double.url) as backend,
    ):
        plain = await one(backend, max_new_tokens=500)
        text, final = await collect(backend, GenerationRequest(prompt=PROMPT, max_new_tokens=500))
        assert double.stats.by_path["/generate_stream"] == 1
        assert text == final.text == plain.text
        assert final.finish_reason == "stop"
        assert final.completion_tokens == plain.completion_tokens
        assert final.prompt_tokens == len(PROMPT.split())


async def test_stream_with_stop_string_holds_it_back(backend: TGIBackend) -> None:
    full = (await one(backend, max_new_tokens=500)).text
    stop = " " + [w for w in full.split() if w.isalpha()][4]
    text, final = await collect(
        backend, GenerationRequest(prompt=PROMPT, max_new_tokens=500, stop=(stop,))
    )
    assert final.finish_reason == "stop"
    assert text == final.text == full[: full.find(stop)]


async def test_stream_length_finish(backend: TGIBackend) -> None:
    text, final = await collect(backend, GenerationRequest(prompt=PROMPT, max_new_tokens=4))
    assert final.finish_reason == "length" and final.completion_tokens == 4
    assert text == final.text and len(text.split()) <= 4


async def test_stream_needs_n_1(backend: TGIBackend) -> None:
    with pytest.raises(errors.BadRequestError, match="n == 1"):
        await collect(backend, GenerationRequest(prompt=PROMPT, temperature=1.0, n=2))


async def test_compat_endpoint(double: TGIDouble) -> None:
    async with TGIBackend(double.url, endpoint="compat") as backend:
        c = await one(backend, max_new_tokens=5)
        text, final = await collect(backend, GenerationRequest(prompt=PROMPT, max_new_tokens=5))
    assert double.stats.by_path["/"] == 2
    assert c.text == text == final.text
    assert c.finish_reason == final.finish_reason == "length"


# -- info and health ----------------------------------------------------------------------


async def test_info_mapping_and_cache() -> None:
    async with (
        TGIDouble(
            model_id="org/model-7b",
            max_concurrent_requests=17,
            max_best_of=3,
            max_stop_sequences=6,
            max_input_tokens=1000,
            max_total_tokens=2000,
        ) as double,
        TGIBackend(double.url, name="t") as backend,
    ):
        info = await backend.info()
        assert (info.name, info.kind, info.model) == ("t", "tgi", "org/model-7b")
        assert info.max_concurrency == 17
        assert info.max_best_of == 3
        assert info.max_stop_sequences == 6
        assert (info.max_input_tokens, info.max_total_tokens) == (1000, 2000)
        assert info.supports_n is False
        assert info.extra["version"] == "3.3.4-double"
        assert await backend.info() is info
        assert double.stats.by_path["/info"] == 1
        c = await one(backend, max_new_tokens=2)
        assert c.model == "org/model-7b"


async def test_health_ok_and_unhealthy(backend: TGIBackend, double: TGIDouble) -> None:
    assert (await backend.health()).ok
    double.healthy = False
    h = await backend.health()
    assert not h.ok and "503" in h.detail and "unhealthy" in h.detail


async def test_health_unreachable_is_not_an_exception() -> None:
    double = TGIDouble()
    url = await double.start()
    await double.stop()
    async with TGIBackend(url) as backend:
        h = await backend.health()
        assert not h.ok and h.detail
        with pytest.raises(errors.ConnectError):
            await one(backend)


# -- faults -------------------------------------------------------------------------------


async def test_rate_limited_with_retry_after(backend: TGIBackend, double: TGIDouble) -> None:
    double.faults.push(Fault.status(429, retry_after=2))
    with pytest.raises(errors.RateLimitedError) as info:
        await one(backend)
    assert info.value.retry_after == 2.0 and info.value.status == 429
    assert await one(backend)  # the next request is served
    assert double.stats.requests == 2 and double.stats.faults == 1


@pytest.mark.parametrize(
    ("code", "error"),
    [
        (503, errors.OverloadedError),
        (424, errors.ServerError),
        (500, errors.ServerError),
        (422, errors.BadRequestError),
        (401, errors.AuthenticationError),
    ],
)
async def test_status_faults(
    backend: TGIBackend, double: TGIDouble, code: int, error: type[Exception]
) -> None:
    double.faults.push(Fault.status(code, message="injected trouble"))
    with pytest.raises(error, match="injected trouble"):
        await one(backend)


async def test_plain_text_status_body(backend: TGIBackend, double: TGIDouble) -> None:
    double.faults.push(Fault.status(503, "upstream went away", retry_after=1.5))
    with pytest.raises(errors.OverloadedError, match="upstream went away") as info:
        await one(backend)
    assert info.value.retry_after == 1.5


@pytest.mark.parametrize(
    ("fault", "error"),
    [
        (Fault.reset(), errors.ConnectError),
        (Fault.truncate(), errors.MalformedResponseError),
        (Fault.malformed(), errors.MalformedResponseError),
        (Fault.empty(), errors.MalformedResponseError),
        (Fault.stream_error("busy", "overloaded"), errors.RateLimitedError),
        (Fault.stream_error("boom", "generation"), errors.ServerError),
    ],
    ids=lambda v: v.kind.value if isinstance(v, Fault) else v.__name__,
)
async def test_transport_faults_generate(
    backend: TGIBackend, double: TGIDouble, fault: Fault, error: type[Exception]
) -> None:
    double.faults.push(fault)
    with pytest.raises(error):
        await one(backend)
    assert await one(backend, max_new_tokens=2)  # the backend still works afterwards


@pytest.mark.parametrize(
    ("fault", "error", "needle"),
    [
        (Fault.reset(), errors.ConnectError, None),
        # TGI ends a generation cut short with an error event (500 incomplete_generation_stream)
        (Fault.truncate(), errors.ServerError, "incomplete_generation_stream"),
        (Fault.malformed(), errors.MalformedResponseError, "not JSON"),
        (Fault.empty(), errors.MalformedResponseError, "truncated"),
        (Fault.stream_error("busy", "overloaded"), errors.OverloadedError, "busy"),
        (Fault.stream_error("bad", "validation"), errors.BadRequestError, "bad"),
        (Fault.stream_error("boom", "generation"), errors.ServerError, "boom"),
        (Fault.stream_error("cut", "incomplete_generation"), errors.ServerError, "cut"),
        (Fault.status(429, retry_after=3), errors.RateLimitedError, None),
    ],
    ids=lambda v: v.kind.value + ":" + v.error_type if isinstance(v, Fault) else "",
)
async def test_transport_faults_stream(
    backend: TGIBackend, double: TGIDouble, fault: Fault, error: type[Exception], needle: str | None
) -> None:
    double.faults.push(fault)
    with pytest.raises(error, match=needle):
        await collect(backend, GenerationRequest(prompt=PROMPT))
    _, final = await collect(backend, GenerationRequest(prompt=PROMPT, max_new_tokens=2))
    assert final.finish_reason == "length"


async def test_hang_times_out(double: TGIDouble) -> None:
    double.faults.push(Fault.hang(), Fault.hang())
    async with TGIBackend(double.url, timeout=0.3) as backend:
        with pytest.raises(errors.RequestTimeoutError):
            await one(backend)
        with pytest.raises(errors.RequestTimeoutError):
            await collect(backend, GenerationRequest(prompt=PROMPT))


async def test_random_faults_are_seeded() -> None:
    def kinds(seed: int) -> list[FaultKind | None]:
        plan = FaultPlan(0.5, [Fault.reset(), Fault.status(503)], seed=seed)
        return [f.kind if f else None for f in (plan.next() for _ in range(40))]

    first = kinds(3)
    assert first == kinds(3)
    assert 5 < sum(k is not None for k in first) < 35
    assert {FaultKind.RESET, FaultKind.STATUS} <= set(first)
    plan = FaultPlan()
    plan.push(Fault.empty())
    plan.set_rate(1.0, [Fault.hang()])
    assert [plan.next(), plan.next()] == [Fault.empty(), Fault.hang()]
    plan.clear()
    assert plan.next() is None and plan.injected == 2
    with pytest.raises(ValueError):
        FaultPlan(1.5)


async def test_fault_rate_on_the_double(double: TGIDouble) -> None:
    double.faults.set_rate(1.0, [Fault.status(503)])
    async with TGIBackend(double.url) as backend:
        for _ in range(3):
            with pytest.raises(errors.OverloadedError):
                await one(backend)
    assert double.stats.faults == 3


# -- sessions and secrets -----------------------------------------------------------------


async def test_owned_session_closed_on_aclose(double: TGIDouble) -> None:
    backend = TGIBackend(double.url)
    await one(backend, max_new_tokens=1)
    session = backend._http.session
    await backend.aclose()
    assert session.closed


async def test_shared_session_left_open(double: TGIDouble) -> None:
    async with aiohttp.ClientSession() as session:
        async with TGIBackend(double.url, session=session) as b1:
            await one(b1, max_new_tokens=1)
        assert not session.closed
        async with TGIBackend(double.url, session=session) as b2:
            assert await one(b2, max_new_tokens=1)
    assert double.stats.requests == 2


async def test_api_key_sent_but_never_shown(
    double: TGIDouble, monkeypatch: pytest.MonkeyPatch
) -> None:
    backend = TGIBackend(double.url, api_key=SECRET)
    await one(backend, max_new_tokens=1)
    assert double.last_authorization == f"Bearer {SECRET}"
    double.faults.push(Fault.status(401, message="bad credentials"), Fault.reset())
    for _ in range(2):
        with pytest.raises(errors.BackendError) as info:
            await one(backend)
        assert SECRET not in str(info.value) and SECRET not in repr(info.value)
    assert SECRET not in repr(backend) and SECRET not in str(backend)
    await backend.aclose()

    monkeypatch.setenv("TGI_TEST_KEY", SECRET)
    async with TGIBackend(double.url, api_key_env="TGI_TEST_KEY") as from_env:
        await one(from_env, max_new_tokens=1)
        assert SECRET not in repr(from_env)
    assert double.last_authorization == f"Bearer {SECRET}"
    with pytest.raises(ValueError):
        TGIBackend(double.url, api_key="a", api_key_env="TGI_TEST_KEY")


# -- the double's own protocol ------------------------------------------------------------


@pytest.mark.parametrize(
    ("params", "inputs", "needle"),
    [
        ({"temperature": 0.0}, PROMPT, "temperature"),
        ({"top_p": 1.0}, PROMPT, "top_p"),
        ({"top_p": 0.0}, PROMPT, "top_p"),
        ({"typical_p": 1.0}, PROMPT, "typical_p"),
        ({"top_k": 0}, PROMPT, "top_k"),
        ({"max_new_tokens": 0}, PROMPT, "max_new_tokens"),
        ({"stop": ["a", "b", "c", "d", "e"]}, PROMPT, "up to 4"),
        ({}, "", "cannot be empty"),
        ({"max_new_tokens": 4090}, "a b c d e f g", "must be <= 4096"),
        ({"best_of": 2}, PROMPT, "sampling"),
        ({"best_of": 2, "do_sample": True, "seed": 1}, PROMPT, "seed"),
        ({"best_of": 3, "do_sample": True}, PROMPT, "best_of"),
        ({"best_of": 0}, PROMPT, "best_of"),
    ],
)
async def test_double_validation(
    double: TGIDouble, params: dict[str, Any], inputs: str, needle: str
) -> None:
    status, ctype, text = await raw_post(
        double.url + "/generate", {"inputs": inputs, "parameters": params}
    )
    assert status == 422 and ctype == "application/json"
    body = json.loads(text)
    assert body["error_type"] == "validation" and needle in body["error"]
    # a stream reports the same problem as an event under HTTP 200
    status, ctype, text = await raw_post(
        double.url + "/generate_stream", {"inputs": inputs, "parameters": params}
    )
    assert status == 200 and ctype == "text/event-stream"
    assert text.startswith("data:{") and '"error_type": "validation"' in text


async def test_double_bad_bodies(double: TGIDouble) -> None:
    status, ctype, _ = await raw_post(double.url + "/generate", None, raw=b"{not json")
    assert (status, ctype) == (400, "text/plain")
    status, ctype, _ = await raw_post(double.url + "/generate", {"parameters": {}})
    assert (status, ctype) == (422, "text/plain")
    status, _, _ = await raw_post(
        double.url + "/generate", {"inputs": "x", "parameters": {"max_new_tokens": "5"}}
    )
    assert status == 422
    async with (
        aiohttp.ClientSession() as s,
        s.post(double.url + "/generate", data=b'{"inputs": "x"}') as resp,
    ):
        assert resp.status == 415
    assert len(double.received) == 0


async def test_double_compat_list_and_best_of(double: TGIDouble) -> None:
    body = {"inputs": PROMPT, "parameters": {"max_new_tokens": 3, "details": True}}
    status, _, text = await raw_post(double.url + "/", body)
    answer = json.loads(text)
    assert status == 200 and isinstance(answer, list) and len(answer) == 1
    assert answer[0]["details"]["finish_reason"] == "length"
    assert len(answer[0]["details"]["tokens"]) == 3

    status, ctype, text = await raw_post(double.url + "/", {**body, "stream": True})
    assert status == 200 and ctype == "text/event-stream"
    events = [json.loads(line[5:]) for line in text.split("\n\n") if line.startswith("data:")]
    assert [e["index"] for e in events] == [1, 2, 3]
    assert events[-1]["generated_text"] == answer[0]["generated_text"]
    assert events[-1]["details"]["input_length"] == len(PROMPT.split())
    assert all(e["generated_text"] is None for e in events[:-1])

    best = {"inputs": PROMPT, "parameters": {"best_of": 2, "do_sample": True, "details": True}}
    status, _, text = await raw_post(double.url + "/generate", best)
    assert status == 200
    assert len(json.loads(text)["details"]["best_of_sequences"]) == 1


async def test_double_text_shape(double: TGIDouble) -> None:
    text, reason = double.complete(PROMPT, {"max_new_tokens": 500})
    assert reason == "eos_token"
    assert re.fullmatch(r"(?: [a-z]+|\.|\n)+", text)
    assert {" " + w for w in re.findall("[a-z]+", text)} <= set(VOCAB)
    assert double.complete(PROMPT, {"max_new_tokens": 2})[1] == "length"
    full, _ = double.complete(PROMPT, {"max_new_tokens": 500, "return_full_text": True})
    assert full == PROMPT + text


async def test_double_overloaded_beyond_max_concurrent_requests() -> None:
    async with (
        TGIDouble(max_concurrent_requests=1, latency=30) as double,
        TGIBackend(double.url) as backend,
    ):
        first = asyncio.create_task(one(backend))
        try:
            async with asyncio.timeout(5):
                await double.wait_active(1)
            # TGI answers 429 "overloaded"; in a stream it is an error event under 200
            with pytest.raises(errors.RateLimitedError, match="overloaded"):
                await one(backend)
            with pytest.raises(errors.OverloadedError, match="overloaded"):
                await collect(backend, GenerationRequest(prompt=PROMPT))
        finally:
            first.cancel()
            with pytest.raises(asyncio.CancelledError):
                await first
        assert double.stats.rejected == 2


def test_fault_plan_counts_what_it_hands_out_by_label() -> None:
    plan = FaultPlan()
    plan.push(Fault.status(429), Fault.reset(), Fault.status(429))
    handed = [plan.next() for _ in range(4)]
    assert handed[3] is None
    assert plan.injected == 3
    assert plan.by_kind == {"429": 2, "reset": 1}
