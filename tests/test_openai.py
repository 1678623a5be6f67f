"""OpenAIBackend (both transports) against the vLLM-style double, and the double itself."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, cast

import aiohttp
import pytest
from aiohttp import web

from ensemble_async import errors
from ensemble_async.backends.openai import (
    OpenAIBackend,
    TransportName,
    finish_reason,
    parse_response,
    server_root,
)
from ensemble_async.registry import create_backend
from ensemble_async.secret import Secret
from ensemble_async.testing.faults import Fault
from ensemble_async.testing.openai_double import OpenAIDouble
from ensemble_async.types import ChatMessage, Completion, GenerationRequest, TextDelta

TRANSPORTS = ["aiohttp", "sdk"]
PROMPT = "Write one sentence about rivers and stones"
CHAT = (ChatMessage("system", "Be brief."), ChatMessage("user", "Tell me about rivers."))
KEY = "sk-test-0123456789abcdef"


@pytest.fixture
async def double() -> AsyncIterator[OpenAIDouble]:
    async with OpenAIDouble(model="m-double", max_model_len=256) as d:
        yield d


@pytest.fixture(params=TRANSPORTS)
def transport(request: pytest.FixtureRequest) -> str:
    return str(request.param)


def _backend(url: str, transport: str, **options: Any) -> OpenAIBackend:
    return OpenAIBackend(url, transport=cast(TransportName, transport), **options)


async def _collect(backend: OpenAIBackend, request: GenerationRequest) -> list[Any]:
    return [event async for event in backend.stream(request)]


# -- plain generation -----------------------------------------------------------------------


async def test_completions_greedy_discovers_model_and_reports_usage(
    double: OpenAIDouble, transport: str
) -> None:
    async with _backend(double.url, transport) as backend:
        req = GenerationRequest(prompt=PROMPT, max_new_tokens=100)
        first = await backend.generate(req)
        again = await backend.generate(req)
    assert len(first) == 1 and first[0].text.strip()
    assert first[0].text == again[0].text  # greedy is deterministic
    c = first[0]
    assert c.model == "m-double" and c.backend == "openai" and c.index == 0
    assert c.prompt_tokens == len(PROMPT.split())
    assert c.completion_tokens == len(c.text.split())
    assert c.finish_reason == "stop"  # the double ends every text before 49 words
    assert double.counts["/v1/models"] == 1  # discovered once, on first use
    assert double.counts["/v1/completions"] == 2
    sent = double.last_payload
    assert sent["model"] == "m-double" and sent["prompt"] == PROMPT
    assert sent["temperature"] == 0 and sent["max_tokens"] == 100 and sent["n"] == 1
    assert "stream" not in sent and "seed" not in sent


async def test_length_finish_and_sampling_fields(double: OpenAIDouble, transport: str) -> None:
    req = GenerationRequest(prompt=PROMPT, max_new_tokens=2, temperature=0.7, top_p=0.9, seed=3)
    async with _backend(double.url, transport, model="m-double") as backend:
        (c,) = await backend.generate(req)
    assert c.finish_reason == "length" and c.completion_tokens == 2
    assert double.counts["/v1/models"] == 0  # the model was given
    sent = double.last_payload
    assert (sent["temperature"], sent["top_p"], sent["seed"]) == (0.7, 0.9, 3)


async def test_stop_string_cuts_the_text(double: OpenAIDouble, transport: str) -> None:
    async with _backend(double.url, transport) as backend:
        (full,) = await backend.generate(GenerationRequest(prompt=PROMPT, max_new_tokens=100))
        stop = full.text.split()[2]
        req = GenerationRequest(prompt=PROMPT, max_new_tokens=100, stop=(stop, "\n\n"))
        (cut,) = await backend.generate(req)
    assert double.last_payload["stop"] == [stop, "\n\n"]
    assert cut.text == full.text[: full.text.find(stop)]
    assert cut.finish_reason == "stop"


async def test_chat_modes(double: OpenAIDouble, transport: str) -> None:
    async with _backend(double.url, transport) as backend:
        (auto,) = await backend.generate(GenerationRequest(messages=CHAT, max_new_tokens=50))
        assert double.last_payload["messages"] == [m.to_dict() for m in CHAT]
        await backend.generate(GenerationRequest(prompt=PROMPT, max_new_tokens=5))
    assert auto.text.strip() and auto.completion_tokens == len(auto.text.split())
    assert double.counts["/v1/chat/completions"] == 1
    assert double.counts["/v1/completions"] == 1
    async with _backend(double.url, transport, mode="chat") as chat:
        await chat.generate(GenerationRequest(prompt=PROMPT, max_new_tokens=5))
    assert double.last_payload["messages"] == [{"role": "user", "content": PROMPT}]
    async with _backend(double.url, transport, mode="completions") as plain:
        with pytest.raises(errors.BadRequestError, match="chat messages"):
            await plain.generate(GenerationRequest(messages=CHAT))


async def test_vendor_fields_go_top_level(double: OpenAIDouble, transport: str) -> None:
    req = GenerationRequest(
        prompt=PROMPT,
        max_new_tokens=20,
        min_new_tokens=4,
        top_k=50,
        temperature=0.7,
        extra={"repetition_penalty": 1.1, "ignore_eos": True},
    )
    async with _backend(double.url, transport) as backend:
        await backend.generate(req)
    sent = double.last_payload
    assert sent["top_k"] == 50 and sent["min_tokens"] == 4
    assert sent["repetition_penalty"] == 1.1 and sent["ignore_eos"] is True
    assert "extra_body" not in sent and "extra" not in sent


async def test_n_is_honoured_in_one_request(double: OpenAIDouble, transport: str) -> None:
    req = GenerationRequest(prompt=PROMPT, max_new_tokens=30, temperature=0.8, seed=11, n=3)
    async with _backend(double.url, transport) as backend:
        got = await backend.generate(req)
        info = await backend.info()
    assert double.requests == 1 and double.last_payload["n"] == 3
    assert [c.index for c in got] == [0, 1, 2]
    assert len({c.text for c in got}) == 3  # different choices of a seeded request
    assert all(c.prompt_tokens == len(PROMPT.split()) for c in got)
    assert all(c.completion_tokens is None for c in got)  # one total for 3 choices: no split
    assert info.supports_n


async def test_n_is_topped_up_when_the_server_ignores_it(transport: str) -> None:
    async with (
        OpenAIDouble(honour_n=False) as double,
        _backend(double.url, transport) as backend,
    ):
        req = GenerationRequest(prompt=PROMPT, max_new_tokens=30, temperature=0.8, seed=5)
        got = await backend.generate(req.replace(n=3))
        assert double.requests == 3
        assert double.payloads[0]["n"] == 3 and double.payloads[0]["seed"] == 5
        assert sorted((p["n"], p["seed"]) for p in list(double.payloads)[1:]) == [
            (1, 6),
            (1, 7),
        ]
        assert [c.index for c in got] == [0, 1, 2]
        assert len({c.text for c in got}) == 3
        assert all(c.completion_tokens == len(c.text.split()) for c in got)
        # once known, later requests fan out with n=1 from the start
        again = await backend.generate(req.replace(n=2, seed=100))
        assert double.requests == 5
        assert sorted((p["n"], p["seed"]) for p in list(double.payloads)[3:]) == [
            (1, 100),
            (1, 101),
        ]
        assert len(again) == 2 and not (await backend.info()).supports_n


# -- streaming ------------------------------------------------------------------------------


@pytest.mark.parametrize("chat", [False, True])
async def test_stream_deltas_make_the_final_text(
    double: OpenAIDouble, transport: str, chat: bool
) -> None:
    req = (
        GenerationRequest(messages=CHAT, max_new_tokens=12)
        if chat
        else GenerationRequest(prompt=PROMPT, max_new_tokens=12)
    )
    async with _backend(double.url, transport) as backend:
        events = await _collect(backend, req)
        (plain,) = await backend.generate(req)
    *deltas, final = events
    assert isinstance(final, Completion) and all(isinstance(d, TextDelta) for d in deltas)
    assert len(deltas) >= 2
    assert "".join(d.text for d in deltas) == final.text == plain.text
    assert final.finish_reason == plain.finish_reason
    assert final.prompt_tokens == plain.prompt_tokens
    assert final.completion_tokens == len(final.text.split())
    stream_payload = double.payloads[-2]
    assert stream_payload["stream"] is True
    assert stream_payload["stream_options"] == {"include_usage": True}


async def test_stream_needs_n_1(double: OpenAIDouble) -> None:
    async with OpenAIBackend(double.url) as backend:
        with pytest.raises(errors.BadRequestError, match="n == 1"):
            await _collect(backend, GenerationRequest(prompt=PROMPT, n=2))


# -- errors ---------------------------------------------------------------------------------

FAULTS: list[tuple[str, Fault, type[errors.BackendError]]] = [
    ("429", Fault.status(429, retry_after=3), errors.RateLimitedError),
    ("503", Fault.status(503), errors.OverloadedError),
    ("500", Fault.status(500), errors.ServerError),
    ("400", Fault.status(400, message="bad field"), errors.BadRequestError),
    ("reset", Fault.reset(), errors.ConnectError),
    ("truncate", Fault.truncate(), errors.MalformedResponseError),
    ("malformed", Fault.malformed(), errors.MalformedResponseError),
    ("empty", Fault.empty(), errors.MalformedResponseError),
    ("stream_error", Fault.stream_error("engine died"), errors.ServerError),
    ("hang", Fault.hang(), errors.RequestTimeoutError),
]


@pytest.mark.parametrize("stream", [False, True], ids=["plain", "stream"])
@pytest.mark.parametrize(("fault", "expected"), [f[1:] for f in FAULTS], ids=[f[0] for f in FAULTS])
async def test_faults_map_to_error_classes_in_one_attempt(
    double: OpenAIDouble,
    transport: str,
    stream: bool,
    fault: Fault,
    expected: type[errors.BackendError],
) -> None:
    double.faults.push(fault)
    req = GenerationRequest(prompt=PROMPT, max_new_tokens=30, min_new_tokens=20)
    async with _backend(double.url, transport, model="m-double", timeout=0.5) as backend:
        with pytest.raises(errors.BackendError) as caught:
            if stream:
                await _collect(backend, req)
            else:
                await backend.generate(req)
    assert type(caught.value) is expected
    assert caught.value.retryable is issubclass(expected, errors.RetryableError)
    assert caught.value.backend == "openai"
    assert double.requests == 1  # no retry, in either transport
    if expected is errors.RateLimitedError:
        assert caught.value.retry_after == 3.0  # type: ignore[attr-defined]


async def test_mid_stream_error_comes_after_the_first_deltas(
    double: OpenAIDouble, transport: str
) -> None:
    double.faults.push(Fault.stream_error("engine died"))
    seen: list[str] = []
    async with _backend(double.url, transport) as backend:
        with pytest.raises(errors.ServerError, match="engine died"):
            async for event in backend.stream(
                GenerationRequest(prompt=PROMPT, max_new_tokens=30, min_new_tokens=20)
            ):
                assert isinstance(event, TextDelta)
                seen.append(event.text)
    assert seen  # the error arrived under HTTP 200, after some text


@pytest.mark.parametrize("flat", [False, True], ids=["nested", "flat"])
async def test_context_too_long_is_a_context_length_error(transport: str, flat: bool) -> None:
    async with (
        OpenAIDouble(max_model_len=64, flat_errors=flat) as double,
        _backend(double.url, transport) as backend,
    ):
        with pytest.raises(errors.ContextLengthError) as caught:
            await backend.generate(GenerationRequest(prompt=PROMPT, max_new_tokens=60))
    assert caught.value.status == 400 and not caught.value.retryable
    assert "maximum context length" in str(caught.value)


async def test_schema_error_is_a_bad_request(double: OpenAIDouble, transport: str) -> None:
    async with _backend(double.url, transport) as backend:
        with pytest.raises(errors.BadRequestError) as caught:
            await backend.generate(GenerationRequest(prompt=PROMPT, extra={"top_k": "many"}))
    assert type(caught.value) is errors.BadRequestError and caught.value.status == 400
    assert "top_k" in str(caught.value)


async def test_unknown_model_is_not_found(double: OpenAIDouble, transport: str) -> None:
    async with _backend(double.url, transport, model="no-such-model") as backend:
        with pytest.raises(errors.NotFoundError, match="no-such-model"):
            await backend.generate(GenerationRequest(prompt=PROMPT))


async def test_api_key_is_sent_but_never_shown(
    transport: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    async with OpenAIDouble(api_key=KEY) as double:
        async with _backend(double.url, transport, api_key=Secret(KEY)) as backend:
            (c,) = await backend.generate(GenerationRequest(prompt=PROMPT, max_new_tokens=5))
            assert c.text
            assert double.last_headers["Authorization"] == f"Bearer {KEY}"
            assert KEY not in repr(backend) and KEY not in str(backend)
        monkeypatch.setenv("TEST_OPENAI_KEY", KEY)
        async with _backend(double.url, transport, api_key_env="TEST_OPENAI_KEY") as backend:
            await backend.generate(GenerationRequest(prompt=PROMPT, max_new_tokens=5))
        wrong = KEY[:-1] + "X"
        async with _backend(double.url, transport, model="m", api_key=wrong) as backend:
            with pytest.raises(errors.AuthenticationError) as caught:
                await backend.generate(GenerationRequest(prompt=PROMPT))
        assert double.last_headers["Authorization"] == f"Bearer {wrong}"
        for shown in (str(caught.value), repr(caught.value), repr(backend)):
            assert wrong not in shown and KEY not in shown
        async with _backend(double.url, transport) as keyless:
            assert (await keyless.health()).ok  # /health stays open
            with pytest.raises(errors.AuthenticationError):
                await keyless.info()


@pytest.mark.parametrize("stream", [False, True], ids=["plain", "stream"])
async def test_a_key_echoed_by_the_server_is_scrubbed(
    double: OpenAIDouble, transport: str, stream: bool
) -> None:
    echo = json.dumps({"error": {"message": f"Incorrect API key provided: {KEY}", "code": 401}})
    double.faults.push(Fault.status(401, body=echo))
    req = GenerationRequest(prompt=PROMPT, max_new_tokens=5)
    async with _backend(double.url, transport, model="m-double", api_key=KEY) as backend:
        with pytest.raises(errors.AuthenticationError) as caught:
            if stream:
                await _collect(backend, req)
            else:
                await backend.generate(req)
    assert "Incorrect API key provided: ***" in str(caught.value)
    assert KEY not in str(caught.value) and KEY not in repr(caught.value)


def test_api_key_options_are_exclusive() -> None:
    with pytest.raises(ValueError, match="not both"):
        OpenAIBackend("http://127.0.0.1:1", api_key="a", api_key_env="B")
    grpc: Any = "grpc"
    with pytest.raises(ValueError, match="transport"):
        OpenAIBackend("http://127.0.0.1:1", transport=grpc)


# -- health, info, construction --------------------------------------------------------------


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def test_health(transport: str) -> None:
    async with OpenAIDouble() as double, _backend(double.url, transport) as backend:
        assert (await backend.health()).ok
        assert double.counts["/health"] == 1 and double.counts["/v1/models"] == 0
        double.healthy = False
        sick = await backend.health()
        assert not sick.ok and "503" in sick.detail
    async with OpenAIDouble(health_endpoint=False) as double, _backend(double.url, transport) as b:
        assert (await b.health()).ok  # llama.cpp style: /health is 404, /v1/models answers
        assert double.counts["/v1/models"] == 1
    async with _backend(f"http://127.0.0.1:{_closed_port()}", transport) as gone:
        down = await gone.health()
    assert not down.ok and down.detail


async def test_unreachable_server_is_a_connect_error(transport: str) -> None:
    url = f"http://127.0.0.1:{_closed_port()}"
    async with _backend(url, transport, model="m") as backend:
        with pytest.raises(errors.ConnectError):
            await backend.generate(GenerationRequest(prompt=PROMPT))
        with pytest.raises(errors.ConnectError):
            await _collect(backend, GenerationRequest(prompt=PROMPT))


async def test_info_reads_v1_models(double: OpenAIDouble, transport: str) -> None:
    async with _backend(double.url + "/v1/", transport, name="vllm-a") as backend:
        info = await backend.info()
    assert (info.name, info.kind, info.model) == ("vllm-a", "openai", "m-double")
    assert info.max_total_tokens == 256
    assert info.supports_n is None  # not known before an answer to n > 1 shows it
    assert info.extra["models"] == ["m-double"]
    assert info.extra["transport"] == transport


def test_server_root_accepts_v1_or_not() -> None:
    for url in ("http://h:8000", "http://h:8000/", "http://h:8000/v1", " http://h:8000/v1/ "):
        assert server_root(url) == "http://h:8000"


async def test_shared_session_is_left_open(double: OpenAIDouble) -> None:
    async with aiohttp.ClientSession() as session:
        async with OpenAIBackend(double.url, session=session) as backend:
            await backend.generate(GenerationRequest(prompt=PROMPT, max_new_tokens=3))
        assert not session.closed


async def test_registry_builds_the_adapter(double: OpenAIDouble) -> None:
    backend = create_backend("openai", url=double.url, name="reg")
    async with backend:
        assert isinstance(backend, OpenAIBackend) and backend.name == "reg"
        (c,) = await backend.generate(GenerationRequest(prompt=PROMPT, max_new_tokens=3))
    assert c.backend == "reg"


# -- parser rules ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("raw", "normal"),
    [
        ("stop", "stop"),
        ("length", "length"),
        ("stop_sequence", "stop"),
        ("eos_token", "stop"),
        (None, "unknown"),
        ("content_filter", "unknown"),
        (3, "unknown"),
    ],
)
def test_finish_reason_normalised(raw: object, normal: str) -> None:
    assert finish_reason(raw) == normal


def test_parse_response_orders_choices_and_splits_usage_only_when_exact() -> None:
    data: dict[str, Any] = {
        "model": "x",
        "choices": [
            {"index": 1, "text": "b", "finish_reason": "length"},
            {"index": 0, "text": "a", "finish_reason": "stop_sequence"},
        ],
        "usage": {"prompt_tokens": 4, "completion_tokens": 9},
    }
    got = parse_response(data, chat=False, backend="b", model=None, latency_s=0.1)
    assert [(c.index, c.text, c.finish_reason) for c in got] == [
        (0, "a", "stop"),
        (1, "b", "length"),
    ]
    assert [(c.prompt_tokens, c.completion_tokens) for c in got] == [(4, None), (4, None)]
    data["choices"] = data["choices"][:1]
    (one,) = parse_response(data, chat=False, backend="b", model=None, latency_s=0.1)
    assert one.completion_tokens == 9 and one.model == "x"
    bad: object
    for bad in ([], {"choices": []}, {"choices": [{"message": {}}]}, {"choices": [{"text": 3}]}):
        with pytest.raises(errors.MalformedResponseError):
            parse_response(bad, chat=False, backend="b", model=None, latency_s=0.0)
    with pytest.raises(errors.ContextLengthError):
        error = {"error": {"message": "maximum context length exceeded", "code": 400}}
        parse_response(error, chat=True, backend="b", model=None, latency_s=0.0)


# -- stream endings the double does not produce (llama.cpp's cut-off stream) -----------------

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


async def _serve(handler: Handler) -> tuple[web.AppRunner, str]:
    app = web.Application()
    app.router.add_post("/v1/completions", handler)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    return runner, f"http://127.0.0.1:{port}"


def _sse_handler(*events: str) -> Handler:
    async def handler(request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        for event in events:
            await resp.write(f"data: {event}\n\n".encode())
        await resp.write_eof()
        return resp

    return handler


CHUNK = json.dumps({"choices": [{"index": 0, "text": " hi", "finish_reason": None}]})


async def test_cut_off_stream_with_done_has_unknown_finish(transport: str) -> None:
    runner, url = await _serve(_sse_handler(CHUNK, CHUNK, "[DONE]"))
    try:
        async with _backend(url, transport, model="m") as backend:
            *deltas, final = await _collect(backend, GenerationRequest(prompt="p"))
    finally:
        await runner.cleanup()
    assert [d.text for d in deltas] == [" hi", " hi"]
    assert final.text == " hi hi" and final.finish_reason == "unknown"
    assert final.completion_tokens is None  # llama.cpp sends no usage chunk


async def test_stream_ending_without_finish_or_done_is_malformed() -> None:
    runner, url = await _serve(_sse_handler(CHUNK, CHUNK))
    try:
        async with OpenAIBackend(url, model="m") as backend:
            with pytest.raises(errors.MalformedResponseError, match="DONE"):
                await _collect(backend, GenerationRequest(prompt="p"))
    finally:
        await runner.cleanup()


# -- the double's own protocol -----------------------------------------------------------------


async def test_double_multi_prompt_indices_and_errors(double: OpenAIDouble) -> None:
    async with aiohttp.ClientSession() as s:
        url = double.url + "/v1/completions"
        body = {"prompt": ["a b c", "d e f"], "n": 2, "seed": 1, "temperature": 1.0}
        async with s.post(url, json=body) as r:
            both = await r.json()
        async with s.post(url, json={**body, "prompt": "d e f"}) as r:
            second = await r.json()
        assert [c["index"] for c in both["choices"]] == [0, 1, 2, 3]
        assert [c["text"] for c in both["choices"][2:]] == [c["text"] for c in second["choices"]]
        assert both["usage"]["prompt_tokens"] == 6
        cases: list[tuple[dict[str, Any], int, str]] = [
            ({"prompt": "x", "n": 0}, 400, "n"),
            ({"prompt": "x", "stream_options": {"include_usage": True}}, 400, "stream_options"),
            ({"prompt": 5}, 400, "prompt"),
            ({"prompt": "x", "model": "other"}, 404, "model"),
        ]
        for bad, status, param in cases:
            async with s.post(url, json=bad) as r:
                err = await r.json()
                assert r.status == status
                assert err["error"]["param"] == param and err["error"]["code"] == status
                assert set(err["error"]) == {"message", "type", "param", "code"}
        async with s.get(double.url + "/metrics") as r:
            assert "vllm:num_requests_running" in await r.text()


async def test_double_chat_stream_interleaves_choices(double: OpenAIDouble) -> None:
    body = {
        "messages": [{"role": "user", "content": "hi"}],
        "n": 2,
        "temperature": 0.5,
        "max_tokens": 6,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    async with (
        aiohttp.ClientSession() as s,
        s.post(double.url + "/v1/chat/completions", json=body) as r,
    ):
        raw = await r.text()
    lines = [line for line in raw.split("\n\n") if line]
    assert all(line.startswith("data: ") for line in lines)
    assert lines[-1] == "data: [DONE]"
    chunks = [json.loads(line[6:]) for line in lines[:-1]]
    usage = chunks.pop()
    assert usage["choices"] == [] and usage["usage"]["completion_tokens"] > 0
    order = [c["choices"][0]["index"] for c in chunks]
    assert order[:4] == [0, 1, 0, 1]  # role chunks, then the first tokens, interleaved
    finals = [c["choices"][0] for c in chunks if c["choices"][0]["finish_reason"]]
    assert sorted(f["index"] for f in finals) == [0, 1]


def test_openai_sdk_is_optional() -> None:
    """The default transport never imports openai; the SDK one says what to install."""
    code = (
        "import sys\n"
        "sys.modules['openai'] = None  # as if not installed\n"
        "from ensemble_async.backends.openai import OpenAIBackend\n"
        "OpenAIBackend('http://127.0.0.1:1')\n"
        "try:\n"
        "    OpenAIBackend('http://127.0.0.1:1', transport='sdk')\n"
        "except ImportError as exc:\n"
        "    print('IMPORT-ERROR', exc)\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True
    )
    assert "IMPORT-ERROR" in out.stdout and "ensemble-async[openai]" in out.stdout
