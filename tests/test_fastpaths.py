"""The optional fast paths: orjson for JSON on the wire (``jsonio``) and uvloop as the
event loop (``runner``).  Results never depend on which one is installed."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import textwrap

import pytest

from ensemble_async import jsonio, runner


def _python(code: str, **env: str) -> str:
    done = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, **env},
        check=False,
    )
    assert done.returncode == 0, done.stderr
    return done.stdout.strip()


BODIES = [
    b'{"choices": [{"message": {"content": "caf\\u00e9 \xc3\xa9"}}], "usage": {"prompt_tokens": 3}}',
    b'{"logprobs": [NaN, -Infinity, Infinity, -0.5]}',  # what some servers send
    b'{"count": 18446744073709551615, "neg": -9223372036854775808}',  # 64-bit limits
    b"[1, 2.5, true, null]",
]


@pytest.mark.parametrize("body", BODIES)
def test_loads_parses_what_the_standard_library_parses(body: bytes) -> None:
    got = jsonio.loads(body)
    want = json.loads(body)
    assert json.dumps(got) == json.dumps(want)  # NaN-safe comparison
    assert json.dumps(jsonio.loads(body.decode())) == json.dumps(want)


@pytest.mark.parametrize("body", [b"", b"{", b"not json", b'{"a": 1} trailing'])
def test_loads_refuses_what_is_not_json_with_a_value_error(body: bytes) -> None:
    with pytest.raises(ValueError):
        jsonio.loads(body)


def test_loads_gives_text_that_is_valid_unicode() -> None:
    """A lone surrogate escape (half an emoji) or raw surrogate bytes from a server are
    read as U+FFFD: such text could not be hashed for the cache, sent in the next
    request or written in a record (the run stopped with a traceback, and every rerun
    stopped at the same answer)."""
    body = b'{"text": "a\\ud83d b \\udc00", "pair": "\\ud83d\\ude00", "k\\ud800": ["\\ud800"]}'
    want = {"text": "a\ufffd b \ufffd", "pair": "\U0001f600", "k\ufffd": ["\ufffd"]}
    assert jsonio.loads(body) == want
    assert jsonio.loads(body.decode()) == want
    assert jsonio.loads(b'{"t": "\xed\xa0\x80 \xed\x9f\xbf"}') == {"t": "\ufffd \ud7ff"}


def test_dumps_gives_compact_utf8_that_reads_back() -> None:
    value = {"model": "m", "messages": [{"role": "user", "content": "naïve ✓"}], "t": 0.7}
    raw = jsonio.dumps(value)
    assert isinstance(raw, bytes)
    assert json.loads(raw) == value
    assert b" " not in raw.replace("naïve ✓".encode(), b"")
    # values orjson refuses fall back to the standard library, never fail
    assert json.loads(jsonio.dumps({1: "a", "big": 1 << 70})) == {"1": "a", "big": 1 << 70}


def test_without_orjson_the_standard_library_answers() -> None:
    out = _python(
        """
        import sys
        sys.modules["orjson"] = None  # as if not installed
        from ensemble_async import jsonio
        print(jsonio.JSON_LIBRARY, jsonio.loads(b'{"a": [NaN]}')["a"][0] != 0,
              jsonio.dumps({"x": "é"}).decode())
        """
    )
    assert out == 'json True {"x":"é"}'


def test_the_standard_library_can_be_forced() -> None:
    out = _python(
        """
        from ensemble_async import jsonio
        print(jsonio.JSON_LIBRARY)
        """,
        ENSEMBLE_ASYNC_JSON="json",
    )
    assert out == "json"


def test_aiohttp_can_carry_every_request_when_asked() -> None:
    out = _python(
        """
        from ensemble_async import http
        t = http.HTTPTransport("http://127.0.0.1:9", backend="b")
        print(http.WIRE, t._origin is None)
        """,
        ENSEMBLE_ASYNC_HTTP="aiohttp",
    )
    assert out == "False True"
    default = _python(
        """
        from ensemble_async import http
        t = http.HTTPTransport("http://127.0.0.1:9", backend="b")
        print(http.WIRE, t._origin is None)
        """,
        ENSEMBLE_ASYNC_HTTP="",
    )
    assert default == "True False"


def test_the_runner_uses_uvloop_when_installed_and_asyncio_when_asked() -> None:
    async def loop_module() -> str:
        return type(asyncio.get_running_loop()).__module__

    assert runner.run(loop_module(), loop="asyncio", gc_tuning=False).startswith("asyncio")
    has_uvloop = runner.EVENT_LOOP == "uvloop"
    auto = runner.run(loop_module(), gc_tuning=False)
    assert auto.startswith("uvloop") == has_uvloop
    forced = _python(
        """
        from ensemble_async import runner
        print(runner.EVENT_LOOP)
        """,
        ENSEMBLE_ASYNC_LOOP="asyncio",
    )
    assert forced == "asyncio"


def test_asking_for_uvloop_without_it_names_the_extra() -> None:
    out = _python(
        """
        import sys
        sys.modules["uvloop"] = None
        from ensemble_async import runner
        assert runner.EVENT_LOOP == "asyncio"
        try:
            runner.loop_factory("uvloop")
        except ImportError as exc:
            print(exc)
        """
    )
    assert "ensemble-async[fast]" in out


def test_the_program_tunes_the_collector_and_the_library_does_not() -> None:
    out = _python(
        """
        import gc, sys
        from ensemble_async import Ensemble, cli, runner
        before = gc.get_threshold()[0]
        cli.main(["backends"])  # in-process, as a library user or a test calls it
        assert gc.get_threshold()[0] == before and gc.get_freeze_count() == 0
        assert runner.tune_gc()
        print(gc.get_threshold()[0], gc.get_freeze_count() > 0)
        """
    )
    assert out.splitlines()[-1] == f"{runner.GC_THRESHOLD} True"
    kept = _python(
        """
        import gc
        from ensemble_async import runner
        print(runner.tune_gc(), gc.get_freeze_count())
        """,
        ENSEMBLE_ASYNC_GC="default",
    )
    assert kept == "False 0"


def test_the_cli_runs_its_commands_on_the_runners_loop() -> None:
    from ensemble_async import cli

    async def loop_module() -> str:
        return type(asyncio.get_running_loop()).__module__

    module = cli._run_async(loop_module())
    assert module.startswith("uvloop") == (runner.EVENT_LOOP == "uvloop")
