"""OpenAIBackend against a real OpenAI-compatible server that installs from wheels:
``transformers serve`` (continuous batching) on the embedded SmolLM2, converted to a HF
folder.  This server differs from vLLM in ways the adapter must absorb: it refuses
unknown request fields with 422 (vLLM's ``top_k``, ``min_tokens``), ignores ``stop`` and
``n``, and ends streams without ``[DONE]``.  One server serves the whole module; skipped
with a reason when the ``serving`` extra or the embedded model is absent."""

from __future__ import annotations

import importlib.util
import shutil
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from served import free_port, real_server

from ensemble_async.backends.openai import OpenAIBackend
from ensemble_async.types import ChatMessage, Completion, GenerationRequest, TextDelta

for _module in ("fastapi", "uvicorn"):
    if importlib.util.find_spec(_module) is None:
        pytest.skip(
            f"{_module} is not installed (install the 'serving' extra for transformers serve)",
            allow_module_level=True,
        )

pytestmark = pytest.mark.slow

READY_TIMEOUT_S = 180.0
PROMPT = "List three colours:"


def _serve_command() -> list[str] | None:
    script = Path(sys.executable).parent / "transformers"
    if script.is_file():
        return [str(script), "serve"]
    found = shutil.which("transformers")
    return [found, "serve"] if found else None


@pytest.fixture(scope="module")
def serve(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, str]]:
    from ensemble_async.models import MissingModelError, ensure_converted, smollm2_gguf

    command = _serve_command()
    if command is None:
        pytest.skip("the `transformers` command is not installed")
    try:
        folder = ensure_converted(smollm2_gguf()).path
    except MissingModelError as exc:
        pytest.skip(f"embedded SmolLM2 not available: {exc}")
    port = free_port()
    log = tmp_path_factory.mktemp("serve") / "server.log"
    model = str(folder)
    cmd = [*command, model, "--host", "127.0.0.1", "--port", str(port)]
    cmd += ["--continuous-batching", "--device", "cpu"]
    url = f"http://127.0.0.1:{port}"
    with real_server(
        cmd, url + "/health", log, what="transformers serve", timeout_s=READY_TIMEOUT_S
    ):
        yield url, model


async def test_vllm_extension_fields_are_dropped_after_the_server_refuses_them(
    serve: tuple[str, str],
) -> None:
    url, model = serve
    request = GenerationRequest(
        prompt=PROMPT, max_new_tokens=8, min_new_tokens=2, temperature=0.7, top_k=40, seed=3
    )
    async with OpenAIBackend(url, model=model) as backend:
        first = await backend.generate(request)
        again = await backend.generate(request.replace(seed=4))
    for got in (first, again):
        assert len(got) == 1 and got[0].text.strip()
        assert got[0].finish_reason in ("stop", "length")


async def test_stop_strings_are_enforced_although_the_server_ignores_them(
    serve: tuple[str, str],
) -> None:
    url, model = serve
    async with OpenAIBackend(url, model=model) as backend:
        (free,) = await backend.generate(GenerationRequest(prompt=PROMPT, max_new_tokens=24))
        (cut,) = await backend.generate(
            GenerationRequest(prompt=PROMPT, max_new_tokens=24, stop=("\n",))
        )
    assert "\n" in free.text  # this model does write a newline here, so the cut is real
    assert "\n" not in cut.text
    assert free.text.startswith(cut.text) and cut.finish_reason == "stop"


async def test_chat_n_and_models(serve: tuple[str, str]) -> None:
    url, model = serve
    chat = GenerationRequest(messages=(ChatMessage("user", "Name one colour."),), max_new_tokens=8)
    sampled = GenerationRequest(prompt=PROMPT, max_new_tokens=8, temperature=0.9, seed=1, n=2)
    async with OpenAIBackend(url, model=model) as backend:
        (answer,) = await backend.generate(chat)
        pair = await backend.generate(sampled)
        info = await backend.info()
    assert answer.text.strip() and answer.model == model
    assert [c.index for c in pair] == [0, 1]  # the server ignores n: topped up
    assert info.supports_n is False
    served: Any = info.extra.get("models")
    assert isinstance(served, list) and model in served


async def test_stream_without_done_ends_with_a_completion(serve: tuple[str, str]) -> None:
    url, model = serve
    async with OpenAIBackend(url, model=model) as backend:
        events = [
            e
            async for e in backend.stream(
                GenerationRequest(prompt=PROMPT, max_new_tokens=12, stop=("\n",))
            )
        ]
    *deltas, final = events
    assert isinstance(final, Completion) and all(isinstance(d, TextDelta) for d in deltas)
    assert "".join(d.text for d in deltas) == final.text
    assert "\n" not in final.text
