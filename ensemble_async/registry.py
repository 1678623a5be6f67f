"""Backend lookup by kind name through the ``ensemble_async.backends`` entry-point group.

The built-in adapters register themselves in this project's own pyproject the same way
a third-party package would::

    [project.entry-points."ensemble_async.backends"]
    mykind = "mypackage.module:MyBackend"

The entry point must load a callable that takes keyword options and returns a Backend.
A class may declare the options it cannot do without in ``requires`` (see
``BaseBackend.requires``); :func:`backend_requires` reads it without constructing
anything, so config loading and the command line need no list of built-in kinds.

A few kinds are aliases of another (``vllm`` is the ``openai`` adapter: vLLM serves the
OpenAI-compatible API); an alias is accepted wherever a kind is, and resolves to the
entry point of its target.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from functools import cache
from importlib.metadata import EntryPoint, entry_points
from typing import Any, cast

from .backend import Backend
from .errors import UnknownBackendError

__all__ = [
    "ALIASES",
    "ENTRY_POINT_GROUP",
    "backend_factory",
    "backend_kinds",
    "backend_requires",
    "create_backend",
    "resolve_kind",
]

ENTRY_POINT_GROUP = "ensemble_async.backends"

ALIASES: dict[str, str] = {"vllm": "openai"}
"""Kind names accepted for another kind (alias -> registered kind)."""

BackendFactory = Callable[..., Backend]


@cache
def _entry_points() -> dict[str, EntryPoint]:
    found: dict[str, EntryPoint] = {}
    for ep in entry_points(group=ENTRY_POINT_GROUP):
        found.setdefault(ep.name, ep)
    return found


def backend_kinds() -> list[str]:
    """Every registered kind name, sorted (aliases of a registered kind included)."""
    eps = _entry_points()
    aliases = [a for a, target in ALIASES.items() if target in eps and a not in eps]
    return sorted([*eps, *aliases])


def resolve_kind(kind: str) -> str:
    """The registered kind ``kind`` stands for (itself unless it is an alias)."""
    eps = _entry_points()
    if kind not in eps and kind in ALIASES:
        return ALIASES[kind]
    return kind


def backend_factory(kind: str) -> BackendFactory:
    """The callable registered under ``kind``; raises UnknownBackendError if none."""
    eps = _entry_points()
    name = resolve_kind(kind)
    if name not in eps:
        known = ", ".join(backend_kinds()) or "none"
        raise UnknownBackendError(f"unknown backend kind {kind!r} (registered: {known})")
    try:
        factory = eps[name].load()
    except Exception as exc:  # a broken plug-in: say which, never a traceback
        raise UnknownBackendError(
            f"backend kind {kind!r} cannot be loaded ({type(exc).__name__}: {exc})"
        ) from None
    if not callable(factory):
        raise UnknownBackendError(f"entry point for backend kind {kind!r} is not callable")
    return cast(BackendFactory, factory)


def backend_requires(kind: str) -> tuple[str, ...]:
    """The options a kind cannot do without (its class's ``requires``), read without
    constructing anything; ``()`` when the factory declares none."""
    value = getattr(backend_factory(kind), "requires", ())
    if isinstance(value, str):
        return (value,)
    if isinstance(value, tuple | list) and all(isinstance(v, str) for v in value):
        return tuple(value)
    return ()


def create_backend(kind: str, urls: Sequence[str] | None = None, **options: Any) -> Backend:
    """Build a backend of the given kind with keyword options.

    With ``urls``, one backend of that kind per URL behind one
    :class:`~ensemble_async.replicas.ReplicaSet` (a single Backend; see that module for the
    balancing options it takes besides the adapter's own).
    """
    factory = backend_factory(kind)
    if urls is None:
        return factory(**options)
    from .replicas import ReplicaSet

    return ReplicaSet.from_urls(factory, list(urls), kind=kind, **options)


def refresh() -> None:
    """Forget cached entry points (after installing a plugin at run time)."""
    _entry_points.cache_clear()
