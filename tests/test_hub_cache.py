"""A hub id already in the local Hugging Face cache loads offline (nothing downloaded)."""

from __future__ import annotations

from pathlib import Path

import pytest

pytest.importorskip("transformers")

from ensemble_async import GenerationRequest
from ensemble_async.backends.transformers import TransformersBackend
from ensemble_async.models import MissingModelError, ensure_converted, resolve_source, smollm2_gguf

pytestmark = pytest.mark.slow


def _fake_hub_cache(root: Path, repo_id: str, files: Path) -> Path:
    """The cache layout huggingface_hub writes: refs/main -> snapshots/<rev>/<files>."""
    repo = root / f"models--{repo_id.replace('/', '--')}"
    snapshot = repo / "snapshots" / "0123456789abcdef"
    snapshot.mkdir(parents=True)
    for f in files.iterdir():
        if f.is_file():
            (snapshot / f.name).symlink_to(f)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("0123456789abcdef")
    return snapshot


async def test_hub_id_in_local_cache_loads_and_matches_the_gguf_model(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    converted = ensure_converted(smollm2_gguf()).path
    snapshot = _fake_hub_cache(tmp_path, "local-test/smollm2", converted)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))
    assert resolve_source("local-test/smollm2", None) == (snapshot, None)

    request = GenerationRequest(prompt="The capital of France is", max_new_tokens=6)
    async with TransformersBackend("local-test/smollm2", name="hub", threads=1) as hub:
        (from_hub,) = await hub.generate(request)
    gguf = smollm2_gguf()
    async with TransformersBackend(str(gguf), name="gguf", threads=1) as local:
        (from_gguf,) = await local.generate(request)
    assert from_hub.text and from_hub.text == from_gguf.text


def test_unknown_hub_id_is_a_clear_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))
    with pytest.raises(MissingModelError, match="not in the local Hugging Face cache"):
        resolve_source("nobody/nothing", None)
