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
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from served import Server

from ensemble_async.assemble import build_members
from ensemble_async.backends.openai import OpenAIBackend
from ensemble_async.backends.tgi import TGIBackend
from ensemble_async.config import load_config
from ensemble_async.errors import AuthenticationError, BackendError
from ensemble_async.http import HTTPTransport
from ensemble_async.member import Member
from ensemble_async.retry import RetryPolicy
from ensemble_async.secret import Secret
from ensemble_async.testing.serve import echo_rejected_key
from ensemble_async.types import GenerationRequest

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
        health = await backend.health()
    for exc in (info.value, from_info.value):
        text = _text_of(exc)
        assert "bad token" in text and "***" in text
        assert not leaks(text.encode(), [key]), text
    assert not health.ok and not leaks(str(health).encode(), [key])


async def test_openai_health_detail_never_quotes_the_key(echo_server: str) -> None:
    key = marker("health")
    async with OpenAIBackend(echo_server, api_key=key) as backend:
        health = await backend.health()
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
