"""Fuzz ``generate`` end to end: random run configurations (valid and not) against a
server whose every answer is drawn at random (good text, error statuses, garbage,
fields of the wrong type, the API key echoed back).

Whatever happens, the run ends with a documented exit code and no traceback, the
records file (if any) is valid JSONL with unique ids, and the key appears nowhere: not
in any file the run left, not on stdout or stderr.
"""

from __future__ import annotations

import asyncio
import json
import random
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from rogue import Rogue

from ensemble_async import cli

KEY = "sk-fuzzKEY/9f8e7d6c5b4a+Zq"
KEY_ENV = "FUZZ_GENERATE_KEY"
DOCUMENTED = {0, 2, 3, 4, 5, 6, 7, 8}
WORDS = [
    "write",
    "list",
    "explain",
    "name",
    "describe",
    "give",
    "three",
    "colours",
    "rivers",
    "cats",
    "why",
    "how",
]


def markers(key: str) -> list[str]:
    """Every 9-character piece of the key: none may appear anywhere."""
    return [key[i : i + 9] for i in range(len(key) - 8)]


class ThreadedRogue:
    """A ``Rogue`` server on its own loop in a thread, so that ``cli.main`` (which runs
    its own event loop) can talk to it."""

    def __init__(self) -> None:
        self.server = Rogue()
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)

    def __enter__(self) -> Rogue:
        self.thread.start()
        asyncio.run_coroutine_threadsafe(self.server.start(), self.loop).result(10)
        return self.server

    def __exit__(self, *exc: object) -> None:
        asyncio.run_coroutine_threadsafe(self.server.stop(), self.loop).result(10)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        self.loop.close()


@pytest.fixture(scope="module")
def rogue() -> Iterator[Rogue]:
    with ThreadedRogue() as server:
        yield server


def _text(rng: random.Random) -> str:
    lines = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 9))) for _ in range(3)]
    return "\n".join(f"{i + 1}. {line}" for i, line in enumerate(lines))


def _good(path: str, text: str) -> Any:
    if path.startswith("/v1/chat"):
        return {
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": text},
                    "finish_reason": "stop",
                }
            ],
            "model": "rogue-model",
        }
    if path.startswith("/v1/"):
        return {
            "choices": [{"index": 0, "text": text, "finish_reason": "stop"}],
            "model": "rogue-model",
        }
    return {
        "generated_text": text,
        "details": {"finish_reason": "eos_token", "generated_tokens": len(text.split())},
    }


def make_handler(seed: int, weights: tuple[int, int, int, int, int]) -> Any:
    rng = random.Random(seed)
    kinds = ["good", "status", "garbage", "wrong", "echo"]

    async def handle(request: web.Request) -> web.StreamResponse:
        kind = rng.choices(kinds, weights=weights)[0]
        text = _text(rng)
        if kind == "status":
            status = rng.choice([400, 401, 404, 422, 429, 500, 502, 503])
            body = {"error": rng.choice(["overloaded", "validation error", f"bad key {KEY}"])}
            return web.json_response(body, status=status)
        if kind == "garbage":
            return web.Response(body=rng.randbytes(rng.randint(0, 60)), status=200)
        if kind == "wrong":
            good = _good(request.path, text)
            good[rng.choice(list(good))] = rng.choice([None, 3, "x", [1], {"a": 1}])
            return web.json_response(good)
        if kind == "echo":
            text = f"{text} {KEY[: rng.randint(8, len(KEY))]}"
        return web.json_response(_good(request.path, text))

    return handle


def config_text(url: str, out: Path, rng: random.Random) -> str:
    # Mostly valid runs (so that the answers are what gets fuzzed), sometimes one bad key.
    bad = rng.choice([None, None, None, None, None, "targets", "attempts", "rpm", "override"])
    io_n = rng.choice(["0", "-1", '"two"'] if bad == "targets" else ["1", "2"])
    o_n = rng.choice(["1", "0"])
    attempts = rng.choice(["0", "-2"] if bad == "attempts" else ["1", "2"])
    rpm = rng.choice(["rpm = 0.0000001", 'rpm = "fast"'] if bad == "rpm" else ["", "rpm = 6000"])
    override = rng.choice(
        [
            'novelty_threshold = "high"',
            "answer_decoding = { max_new_tokens = -3 }",
            "instruction_decoding = { top_k = 0 }",
        ]
        if bad == "override"
        else ["", "novelty_threshold = 0.7", "max_attempts_factor = 2"]
    )
    return f"""
[run]
seed = 1
output = "{out}"
targets = {{ input_output = {io_n}, output = {o_n} }}

[backends.w]
kind = "tgi"
url = "{url}"
api_key_env = "{KEY_ENV}"
max_attempts = {attempts}
timeout_s = 5
{rpm}

[backends.a]
kind = "openai"
url = "{url}"
model = "rogue-model"
api_key_env = "{KEY_ENV}"
max_attempts = 1
timeout_s = 5

[roles]
writer = "w"
answerers = ["a"]

[overrides]
{override}
"""


@settings(
    max_examples=20,
    deadline=None,
    phases=[Phase.explicit, Phase.reuse, Phase.generate],  # no shrinking: bounded time
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(
    seed=st.integers(0, 2**16),
    weights=st.tuples(*(st.integers(0, 4) for _ in range(5))).filter(any),
)
def test_generate_survives_random_configs_and_answers(
    rogue: Rogue,
    tmp_path_factory: pytest.TempPathFactory,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    seed: int,
    weights: tuple[int, int, int, int, int],
) -> None:
    monkeypatch.setenv(KEY_ENV, KEY)
    folder = tmp_path_factory.mktemp("fuzz")
    out = folder / "out" / "records.jsonl"
    rogue.handler = make_handler(seed, weights)
    cfg = folder / "cfg.toml"
    cfg.write_text(config_text(rogue.url, out, random.Random(seed ^ 0x5EED)))
    capsys.readouterr()
    code = cli.main(["generate", "--config", str(cfg), "--quiet"])
    captured = capsys.readouterr()
    assert code in DOCUMENTED, captured.err[-2000:]
    assert "Traceback" not in captured.err + captured.out
    if out.exists():
        ids = [json.loads(line)["id"] for line in out.read_text().splitlines()]
        assert len(ids) == len(set(ids))
    everything = captured.out + captured.err
    for path in folder.rglob("*"):
        if path.is_file():
            everything += path.read_bytes().decode("utf-8", "replace")
    for marker in markers(KEY):
        assert marker not in everything
