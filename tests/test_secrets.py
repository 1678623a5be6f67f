"""API keys are never written anywhere: not in records, rejects, the cache, logs,
console output, exports, exception text or reprs.

The end-to-end test runs ``python -m ensemble_async generate`` against test-double
servers in subprocesses (as ``test_cli_generate`` does).  One OpenAI-compatible server
demands a key; the ``answerer`` backend sends the right one, the ``intruder`` backend a
wrong one, which the server quotes back in its 401 (some servers do).  Both keys carry a
unique marker, and every byte the run leaves behind is searched for the markers.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import textwrap
import traceback
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import quote

import pytest
from aiohttp import web
from rogue import Handler, Rogue, openai_answer, openai_chunk, reply, sse, tgi_final, tgi_token
from served import Server

from ensemble_async.assemble import build_members
from ensemble_async.backend import Backend, health_of, info_of, stream_of
from ensemble_async.backends.openai import OpenAIBackend
from ensemble_async.backends.tgi import TGIBackend
from ensemble_async.config import load_config
from ensemble_async.errors import AuthenticationError, BackendError
from ensemble_async.http import HTTPTransport
from ensemble_async.member import Member
from ensemble_async.retry import RetryPolicy
from ensemble_async.secret import Secret
from ensemble_async.testing.serve import echo_rejected_key
from ensemble_async.types import Completion, GenerationRequest, TextDelta

pytest.importorskip("ensemble_async.pipeline")

GOOD_ENV = "EA_TEST_SECRET_GOOD_KEY"
BAD_ENV = "EA_TEST_SECRET_WRONG_KEY"


def marker(kind: str) -> str:
    return f"sk-{kind}-{uuid.uuid4().hex}"


def leaks(data: bytes, secrets: list[str]) -> list[str]:
    """Which secrets (or their random cores) occur in ``data``."""
    found = []
    for s in secrets:
        core = s.rsplit("-", 1)[1]
        if s.encode() in data or core.encode() in data:
            found.append(s)
    return found


@pytest.fixture
def keys() -> tuple[str, str]:
    return marker("good"), marker("wrong")


@pytest.fixture
def servers(keys: tuple[str, str]) -> Iterator[tuple[str, str]]:
    good, _ = keys
    tgi = Server("tgi", "--ei", "writer-lm", "--latency", "0.002")
    oai = Server(
        "openai",
        "--ei",
        "answer-lm",
        "--latency",
        "0.002",
        "--api-key-env",
        GOOD_ENV,
        "--echo-rejected-key",
        "--fault-rate",
        "0.1",
        env={**os.environ, GOOD_ENV: good},
    )
    try:
        yield tgi.url, oai.url
    finally:
        tgi.stop()
        oai.stop()


def config_text(tgi: str, oai: str) -> str:
    return textwrap.dedent(
        f"""
        [run]
        seed = 5
        output = "out/records.jsonl"
        targets = {{ input_output = 8, output = 4 }}

        [backends.writer]
        kind = "tgi"
        url = "{tgi}"
        concurrency = 8

        [backends.answerer]
        kind = "openai"
        url = "{oai}"
        concurrency = 8
        api_key_env = "{GOOD_ENV}"

        [backends.intruder]
        kind = "openai"
        url = "{oai}"
        concurrency = 4
        max_attempts = 2
        api_key_env = "{BAD_ENV}"

        [roles]
        writer = "writer"
        answerers = ["answerer", "intruder"]
        """
    )


def run_cli(work: Path, env: dict[str, str], *args: str) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(
        [sys.executable, "-m", "ensemble_async", *args],
        check=False,
        cwd=work,
        env=env,
        capture_output=True,
        timeout=240,
    )


def test_the_echoing_server_really_quotes_a_wrong_key(
    servers: tuple[str, str], keys: tuple[str, str]
) -> None:
    """The control: without our scrubbing the wrong key would be in the error text."""
    import urllib.error
    import urllib.request

    _, wrong = keys
    req = urllib.request.Request(
        servers[1] + "/v1/models", headers={"Authorization": f"Bearer {wrong}"}
    )
    with pytest.raises(urllib.error.HTTPError) as info:
        urllib.request.urlopen(req, timeout=10)
    assert info.value.code == 401
    assert wrong in info.value.read().decode()


def test_no_artifact_of_a_run_contains_a_key(
    servers: tuple[str, str], keys: tuple[str, str], tmp_path: Path
) -> None:
    good, wrong = keys
    work = tmp_path / "work"
    work.mkdir()
    (work / "cfg.toml").write_text(config_text(*servers))
    env = {**os.environ, GOOD_ENV: good, BAD_ENV: wrong}

    # the probe before the run finds the wrong key: exit 3, nothing written
    refused = run_cli(work, env, "generate", "--config", "cfg.toml", "--log-jsonl", "log.jsonl")
    assert refused.returncode == 3, refused.stderr.decode(errors="replace")[-3000:]
    assert b"member intruder" in refused.stderr and b"Authentication" in refused.stderr
    assert not (work / "out").exists()
    # without the intruder among the answerers the run goes (it is still checked below)
    text = (work / "cfg.toml").read_text()
    (work / "cfg.toml").write_text(text.replace('"answerer", "intruder"]', '"answerer"]'))
    gen = run_cli(work, env, "generate", "--config", "cfg.toml", "--log-jsonl", "log.jsonl")
    assert gen.returncode == 0, gen.stderr.decode(errors="replace")[-3000:]
    # a rerun (answers from the cache) and a check add their own output
    again = run_cli(work, env, "generate", "--config", "cfg.toml", "--log-jsonl", "log.jsonl")
    assert again.returncode == 0, again.stderr.decode(errors="replace")[-3000:]
    check = run_cli(work, env, "check", "--config", "cfg.toml", "--timeout", "10")
    assert check.returncode == 3 and b"intruder" in check.stdout
    exports = [
        run_cli(work, env, "export", "--format", fmt, "out/records.jsonl", f"out/export.{fmt}")
        for fmt in ("alpaca", "chat")
    ]
    assert all(e.returncode == 0 for e in exports)

    # the run did what the test is about: the right key worked, the wrong one failed
    log = [json.loads(line) for line in (work / "log.jsonl").read_text().splitlines()]
    summary = next(x for x in log if x["type"] == "summary")
    stats = {b["name"]: b for b in summary["backends"]}
    assert stats["answerer"]["done"] > 0
    records = (work / "out" / "records.jsonl").read_bytes()
    assert records.count(b"\n") > 0
    assert (work / "out" / "export.alpaca").exists() and (work / "out" / "export.chat").exists()

    # every file the runs left, and every byte they printed
    files = sorted(p for p in work.rglob("*") if p.is_file())
    names = {p.name for p in files}
    assert {"records.jsonl", "records.rejects.jsonl", "records.cache.sqlite"} <= names
    for path in files:
        assert not leaks(path.read_bytes(), [good, wrong]), f"key found in {path}"
    for proc in (refused, gen, again, check, *exports):
        assert not leaks(proc.stdout + proc.stderr, [good, wrong]), proc.args


# -- exception text and reprs, in process --------------------------------------------------


@pytest.fixture
async def echo_server() -> AsyncIterator[str]:
    """Answers every /v1/* and TGI route with a 401 quoting the token it was sent."""
    app = web.Application(middlewares=[echo_rejected_key("the-only-right-key")])

    async def quote(request: web.Request) -> web.Response:
        token = request.headers.get("Authorization", "").removeprefix("Bearer ")
        return web.json_response({"error": f"bad token {token}"}, status=401)

    app.router.add_post("/generate", quote)
    app.router.add_post("/generate_stream", quote)
    app.router.add_get("/info", quote)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        await runner.cleanup()


def _text_of(exc: BaseException) -> str:
    return "".join(traceback.format_exception(exc)) + repr(exc) + str(exc)


async def test_openai_authentication_error_never_quotes_the_key(echo_server: str) -> None:
    key = marker("oai")
    request = GenerationRequest(prompt="hi", max_new_tokens=4)
    async with OpenAIBackend(echo_server, api_key=key) as backend:
        # model discovery, a call with a known model, and a stream all meet the 401
        with pytest.raises(AuthenticationError) as first:
            await backend.generate(request)
    async with OpenAIBackend(echo_server, model="m", api_key=key) as backend:
        with pytest.raises(AuthenticationError) as second:
            await backend.generate(request)
        with pytest.raises(AuthenticationError) as third:
            async for _ in backend.stream(request):
                pass
    for info in (first, second, third):
        text = _text_of(info.value)
        assert "Incorrect API key provided" in text  # the server's message is kept
        assert "***" in text  # with the key blanked
        assert not leaks(text.encode(), [key]), text


async def test_openai_sdk_transport_authentication_error_never_quotes_the_key(
    echo_server: str,
) -> None:
    pytest.importorskip("openai")
    key = marker("sdk")
    request = GenerationRequest(prompt="hi", max_new_tokens=4)
    async with OpenAIBackend(echo_server, model="m", api_key=key, transport="sdk") as backend:
        with pytest.raises(AuthenticationError) as info:
            await backend.generate(request)
    text = _text_of(info.value)
    assert "***" in text
    assert not leaks(text.encode(), [key]), text


async def test_tgi_authentication_error_never_quotes_the_key(echo_server: str) -> None:
    key = marker("tgi")
    request = GenerationRequest(prompt="hi", max_new_tokens=4)
    async with TGIBackend(echo_server, api_key=key) as backend:
        with pytest.raises(AuthenticationError) as info:
            await backend.generate(request)
        with pytest.raises(AuthenticationError) as from_info:
            await backend.info()
        health = await health_of(backend)
    for exc in (info.value, from_info.value):
        text = _text_of(exc)
        assert "bad token" in text and "***" in text
        assert not leaks(text.encode(), [key]), text
    assert not health.ok and not leaks(str(health).encode(), [key])


async def test_openai_health_detail_never_quotes_the_key(echo_server: str) -> None:
    key = marker("health")
    async with OpenAIBackend(echo_server, api_key=key) as backend:
        health = await health_of(backend)
    assert not health.ok and health.detail and "***" in health.detail
    assert not leaks(str(health).encode(), [key])


async def test_member_stats_of_failed_calls_never_quote_the_key(echo_server: str) -> None:
    key = marker("member")
    backend = OpenAIBackend(echo_server, model="m", api_key=key)
    member = Member(backend, name="m1", retry=RetryPolicy(max_attempts=2, initial_backoff_s=0))
    async with member:
        with pytest.raises(BackendError):
            await member.generate(GenerationRequest(prompt="hi", max_new_tokens=4))
        snap = json.dumps(member.snapshot())
    assert snap and not leaks(snap.encode(), [key])


async def test_reprs_of_objects_holding_a_key_never_show_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    key = marker("repr")
    monkeypatch.setenv(GOOD_ENV, key)
    secret = Secret.from_env(GOOD_ENV)
    assert secret.reveal() == key
    cfg = tmp_path / "cfg.toml"
    cfg.write_text(
        textwrap.dedent(
            f"""
            [run]
            output = "{tmp_path / "r.jsonl"}"
            [backends.a]
            kind = "openai"
            url = "http://127.0.0.1:9"
            api_key_env = "{GOOD_ENV}"
            [backends.t]
            kind = "tgi"
            url = "http://127.0.0.1:9"
            api_key_env = "{GOOD_ENV}"
            [roles]
            writer = "t"
            answerers = ["a"]
            """
        )
    )
    config = load_config(cfg)
    writer, answerers = build_members(config)
    objects: list[Any] = [
        secret,
        config,
        config.backends,
        writer,
        *answerers,
        OpenAIBackend("http://127.0.0.1:9", api_key=key),
        OpenAIBackend("http://127.0.0.1:9", api_key_env=GOOD_ENV, transport="sdk"),
        TGIBackend("http://127.0.0.1:9", api_key=key),
        HTTPTransport("http://127.0.0.1:9", backend="x", api_key=secret),
    ]
    try:
        for obj in objects:
            for text in (repr(obj), str(obj)):
                assert not leaks(text.encode(), [key]), text
        for member in [writer, *answerers]:
            assert not leaks(repr(vars(member)).encode(), [key])
            assert not leaks(repr(vars(member.backend)).encode(), [key])
        assert not leaks(json.dumps(config.backends["a"].describe()).encode(), [key])
        with pytest.raises(TypeError):
            import pickle

            pickle.dumps(secret)
    finally:
        await asyncio.gather(
            *(o.aclose() for o in objects if hasattr(o, "aclose")),
            *(m.aclose() for m in {writer, *answerers}),
        )
    # nothing built here wrote a file
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cfg.toml"]  # noqa: ASYNC240


# -- a key echoed in any encoding, in part, or inside a completion -----------------------------


def fragments_of(key: str, text: str) -> list[str]:
    """Every 8-character window of ``key`` that ``text`` shows: plain, JSON-escaped (with
    or without ``\\/``, ASCII-only or not) or percent-encoded (either hex case)."""
    found = []
    lowered = text.lower()
    for i in range(len(key) - 7):
        window = key[i : i + 8]
        ascii_json = json.dumps(window)[1:-1]
        forms = {
            window,
            ascii_json,
            ascii_json.replace("/", "\\/"),
            json.dumps(window, ensure_ascii=False)[1:-1].replace("/", "\\/"),
        }
        if any(f in text for f in forms) or any(
            f.lower() in lowered for f in (quote(window, safe=""), ascii_json)
        ):
            found.append(window)
    return found


ECHOES: dict[str, Callable[[str], bytes]] = {
    # a 401 whose JSON escapes "/" as "\/"
    "slash": lambda t: json.dumps({"error": f"bad token {t}"}).replace("/", "\\/").encode(),
    # ... or escapes every non-ASCII character (ensure_ascii)
    "ascii": lambda t: json.dumps({"error": f"bad token {t}"}, ensure_ascii=True).encode(),
    # ... or quotes the key without its last character
    "prefix": lambda t: json.dumps({"error": f"bad token {t[:-1]}"}).encode(),
    # ... or percent-encoded, in an OpenAI-style error object
    "percent": lambda t: json.dumps(
        {"error": {"message": f"bad token {quote(t, safe='')}", "code": 401}}
    ).encode(),
    # ... or as plain text, twice, with lower-case escapes
    "text": lambda t: f"no: {t} / {json.dumps(t).lower()}".encode(),
}


def hostile_key(*, ascii_only: bool = False) -> str:
    """A key with a "/", a "+" and (unless ``ascii_only``) non-ASCII characters."""
    tail = "" if ascii_only else "\u00e9\u00df"
    return f"sk-live/MARKER{uuid.uuid4().hex[:12]}+Zz9{tail}"


def echo(form: str) -> Handler:
    async def handle(request: web.Request) -> web.StreamResponse:
        token = request.headers.get("Authorization", "").removeprefix("Bearer ")
        return web.Response(status=401, body=ECHOES[form](token), content_type="application/json")

    return handle


def tgi_backend(url: str, key: str) -> Backend:
    return TGIBackend(url, api_key=key)


def openai_backend(url: str, key: str) -> Backend:
    return OpenAIBackend(url, model="rogue-model", api_key=key)


def sdk_backend(url: str, key: str) -> Backend:
    pytest.importorskip("openai")
    return OpenAIBackend(url, model="rogue-model", api_key=key, transport="sdk")


BACKENDS = [tgi_backend, openai_backend, sdk_backend]


@pytest.mark.parametrize("form", sorted(ECHOES))
@pytest.mark.parametrize("make", BACKENDS)
async def test_an_echoed_key_is_masked_in_every_encoding(
    form: str, make: Callable[[str, str], Backend]
) -> None:
    key = hostile_key(ascii_only=make is sdk_backend)  # httpx sends ASCII headers only
    async with Rogue(echo(form)) as server:
        server.get_handler = echo(form)
        texts: list[str] = []
        async with make(server.url, key) as backend:
            for call in (
                lambda: backend.generate(GenerationRequest(prompt="hi", max_new_tokens=4)),
                lambda: backend.generate(GenerationRequest(prompt="hi", stop=("x",))),
                lambda: _drain(backend),
                lambda: info_of(backend),
            ):
                with pytest.raises(BackendError) as info:
                    await call()
                texts.append(_text_of(info.value))
            health = await health_of(backend)
        texts.append(str(health))
        raw = ECHOES[form](key).decode()
        assert fragments_of(key, raw), "the control: the server's body shows the key"
    for text in texts:
        assert not fragments_of(key, text), text
        assert "***" in text or "Authentication" in text, text


async def _drain(backend: Backend) -> list[Any]:
    return [e async for e in stream_of(backend, GenerationRequest(prompt="hi", max_new_tokens=4))]


def _key_answer(kind: str, key: str, *, stream: bool) -> Handler:
    said = f"Sure. Your key is {key} and again {key[:-2]}! Done."
    if not stream:
        return reply(tgi_final(said) if kind == "tgi" else openai_answer(said))
    pieces = [said[i : i + 3] for i in range(0, len(said), 3)]
    if kind == "tgi":
        return sse([tgi_token(p) for p in pieces] + [tgi_final(said)], space=False)
    return sse([openai_chunk(p) for p in pieces] + [openai_chunk("", reason="stop"), "[DONE]"])


@pytest.mark.parametrize("make", BACKENDS)
async def test_a_key_inside_a_completion_is_masked(make: Callable[[str, str], Backend]) -> None:
    key = hostile_key(ascii_only=make is sdk_backend)
    kind = "tgi" if make is tgi_backend else "openai"
    async with Rogue() as server, make(server.url, key) as backend:
        server.handler = _key_answer(kind, key, stream=False)
        [plain] = await backend.generate(GenerationRequest(prompt="hi", max_new_tokens=40))
        server.handler = _key_answer(kind, key, stream=True)
        events = await _drain(backend)
    deltas = [e.text for e in events if isinstance(e, TextDelta)]
    final = events[-1]
    assert isinstance(final, Completion)
    for completion in (plain, final):
        assert completion.text == "Sure. Your key is *** and again ***! Done."
        assert not fragments_of(key, json.dumps(completion.to_dict()))
    # the deltas add up to the masked text: no piece of the stream showed a part of the key
    assert "".join(deltas) == final.text and len(deltas) > 1


@pytest.mark.parametrize("form", ["slash", "prefix"])
def test_check_never_prints_an_echoed_key(
    form: str,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from ensemble_async import cli

    key = hostile_key()
    monkeypatch.setenv(GOOD_ENV, key)
    monkeypatch.setenv("COLUMNS", "250")

    async def serve_and_check() -> int:
        async with Rogue(echo(form)) as server:
            server.get_handler = echo(form)
            cfg = tmp_path / "cfg.toml"
            cfg.write_text(
                textwrap.dedent(
                    f"""
                    [run]
                    output = "{tmp_path / "r.jsonl"}"
                    [backends.t]
                    kind = "tgi"
                    url = "{server.url}"
                    api_key_env = "{GOOD_ENV}"
                    [backends.o]
                    kind = "openai"
                    url = "{server.url}"
                    api_key_env = "{GOOD_ENV}"
                    [roles]
                    writer = "t"
                    answerers = ["o"]
                    """
                )
            )
            return await asyncio.to_thread(
                cli.main, ["check", "--config", str(cfg), "--timeout", "5"]
            )

    loop = asyncio.new_event_loop()
    try:
        code = loop.run_until_complete(serve_and_check())
    finally:
        loop.close()
    out = capsys.readouterr()
    assert code == cli.EXIT_BACKENDS_FAILED
    text = out.out + out.err
    assert "Authentication" in " ".join(text.split()) or "401" in text
    assert not fragments_of(key, text), text


def test_the_sdk_transport_refuses_a_key_it_cannot_send() -> None:
    pytest.importorskip("openai")
    with pytest.raises(ValueError, match="ASCII"):
        OpenAIBackend("http://127.0.0.1:9", api_key=hostile_key(), transport="sdk")
