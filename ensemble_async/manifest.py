"""The run manifest: what defines a dataset, fingerprinted, kept beside its records.

A records file is one dataset only if every run that appended to it generated with the
same definition: preset and effective generation settings, run seed, seed tasks, prompt
templates, each member's backend kind, served model and prompt style
(``instruction_tuned``), the roles and the selection settings, and the library
version.  ``<records stem>.manifest.json`` holds that definition and its fingerprint
(sha256 of its canonical JSON).  A rerun builds the
manifest again and compares: any difference is refused, naming each changed field,
before anything is written.  Targets, concurrency, timeouts, rate limits and URLs only
decide how much and how fast, so they are not part of it.

The functions take plain values (the command line gathers them); nothing here does
network I/O.  A served model id that could not be read (the server was down) is
``None`` and matches any id; so does a member's ``instruction_tuned`` missing from a
manifest written before it was recorded.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from .records import sidecar_path, write_atomic
from .seedtasks import KINDS, SeedTask
from .templates import build_instance_prompt, build_instruction_prompt, build_step4_prompt

__all__ = [
    "MANIFEST_VERSION",
    "ManifestError",
    "ManifestMismatchError",
    "changed_fields",
    "check_manifest",
    "fingerprint",
    "manifest_path",
    "read_manifest",
    "run_manifest",
    "seed_tasks_digest",
    "templates_digest",
    "write_manifest",
]

MANIFEST_VERSION = 1


class ManifestError(Exception):
    """The manifest beside the records cannot be read."""


class ManifestMismatchError(ManifestError):
    """The run's definition differs from the one the records were generated with."""

    def __init__(self, path: Path, changes: Sequence[str]) -> None:
        self.path = path
        self.changes = list(changes)
        super().__init__(
            f"{path} says these records were generated differently; changed: "
            + "; ".join(self.changes)
            + ". Use the original settings to continue this dataset, or another output "
            "for a new one"
        )


def _digest(value: Any) -> str:
    text = json.dumps(value, ensure_ascii=False, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def seed_tasks_digest(seeds: Sequence[SeedTask]) -> str:
    """sha256 of the seed tasks' content, in order (whatever file they came from)."""
    return _digest([dataclasses.asdict(t) for t in seeds])


def templates_digest() -> str:
    """sha256 of the prompt templates, rendered for fixed inputs: changes whenever a
    template's text or layout does."""
    rendered = [build_instruction_prompt(["A.", "B."], drop_eos=False)]
    for kind in KINDS:
        rendered.append(build_instance_prompt(kind, "Do X.", drop_eos=False))
        for style in ("zero_shot", "few_shot"):
            rendered.append(build_step4_prompt(style, kind, "Do X.", "in"))
    return _digest(rendered)


def run_manifest(
    *,
    preset: str,
    seed: int,
    settings: Mapping[str, Any],
    seed_tasks_sha256: str,
    templates_sha256: str,
    members: Mapping[str, Mapping[str, Any]],
    roles: Mapping[str, Any],
    selection: Mapping[str, Any],
    library_version: str,
) -> dict[str, Any]:
    """The manifest (with its ``fingerprint``) from plain values.

    ``settings``: the generation settings that decide the output
    (``PipelineSettings.identity()``); ``members``: per member name, ``kind``,
    ``model`` (the served model id, or None when unknown) and whatever else of the
    member decides its prompts (``instruction_tuned``); ``roles``: writer and
    answerers; ``selection``: consensus settings not in ``settings`` (e.g.
    ``min_candidates``, ``writer_answers``, ``consensus_complete``).
    """
    body: dict[str, Any] = {
        "manifest_version": MANIFEST_VERSION,
        "preset": preset,
        "seed": seed,
        "settings": {k: v for k, v in settings.items() if k not in ("preset", "seed")},
        "seed_tasks_sha256": seed_tasks_sha256,
        "templates_sha256": templates_sha256,
        "members": {name: dict(m) for name, m in sorted(members.items())},
        "roles": dict(roles),
        "selection": dict(selection),
        "library_version": library_version,
    }
    body = json.loads(json.dumps(body))  # JSON-normal (tuples become lists)
    return {**body, "fingerprint": fingerprint(body)}


def fingerprint(manifest: Mapping[str, Any]) -> str:
    """sha256 of the manifest's canonical JSON (its own ``fingerprint`` left out)."""
    return _digest({k: v for k, v in manifest.items() if k != "fingerprint"})


def changed_fields(old: Mapping[str, Any], new: Mapping[str, Any], prefix: str = "") -> list[str]:
    """Each field that differs, as ``path: old -> new`` (nested fields dotted)."""
    changes: list[str] = []
    for key in sorted(set(old) | set(new) - {"fingerprint"}):
        if key == "fingerprint":
            continue
        name = f"{prefix}{key}"
        a, b = old.get(key), new.get(key)
        if isinstance(a, Mapping) and isinstance(b, Mapping):
            changes += changed_fields(a, b, name + ".")
        elif a != b and not _unknown(name, a, b):
            changes.append(f"{name}: {_show(a)} -> {_show(b)}")
    return changes


def _unknown(name: str, old: Any, new: Any) -> bool:
    """A member's served model id that could not be read matches any id; a member's
    ``instruction_tuned`` that a manifest written before it was recorded lacks matches
    either value (so a dataset begun then can still be finished)."""
    if not name.startswith("members."):
        return False
    if name.endswith(".model"):
        return None in (old, new)
    return name.endswith(".instruction_tuned") and old is None


def _show(value: Any) -> str:
    text = json.dumps(value, ensure_ascii=False, sort_keys=True)
    return text if len(text) <= 80 else text[:77] + "..."


def manifest_path(records: str | Path) -> Path:
    """``out/records.jsonl`` -> ``out/records.manifest.json``."""
    return sidecar_path(records, "manifest.json")


def read_manifest(path: Path) -> dict[str, Any] | None:
    """The manifest at ``path``; None when there is none."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return None
    except (OSError, UnicodeDecodeError) as exc:
        raise ManifestError(f"cannot read {path}: {exc}") from exc
    try:
        value = json.loads(text)
    except ValueError as exc:
        raise ManifestError(f"{path} is not valid JSON: {exc}") from None
    if not isinstance(value, dict):
        raise ManifestError(f"{path}: expected a JSON object")
    return value


def write_manifest(path: Path, manifest: Mapping[str, Any]) -> None:
    """Write the manifest atomically (``RecordStorageError`` when the disk refuses)."""
    write_atomic(path, json.dumps(manifest, ensure_ascii=False, indent=2, sort_keys=True) + "\n")


def check_manifest(path: Path, manifest: Mapping[str, Any]) -> str:
    """Compare with the manifest at ``path``: raise ``ManifestMismatchError`` naming each
    changed field; write it when there is none yet.  Returns the dataset's fingerprint,
    the one its records carry: the stored manifest's when there is one (it may differ
    from ``manifest``'s by what still matches, such as a model id that could not be
    read).  Blocking: call it off the event loop."""
    old = read_manifest(path)
    if old is None:
        write_manifest(path, manifest)
        return str(manifest["fingerprint"])
    if old.get("fingerprint") != manifest.get("fingerprint"):
        changes = changed_fields(old, manifest)
        if changes:
            raise ManifestMismatchError(path, changes)
    # the same definition (at most an unknown model id or a field not recorded then differs)
    return str(old.get("fingerprint") or manifest["fingerprint"])
