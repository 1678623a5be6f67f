"""Backend lookup by kind name through the ``ensemble_async.backends`` entry-point group.

The built-in adapters register themselves in this project's own pyproject the same way
a third-party package would::

    [project.entry-points."ensemble_async.backends"]
    mykind = "mypackage.module:MyBackend"

The entry point must load a callable that takes keyword options and returns a Backend.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from functools import cache
from importlib.metadata import EntryPoint, entry_points
from typing import Any, cast

from .backend import Backend
from .errors import UnknownBackendError

__all__ = ["ENTRY_POINT_GROUP", "backend_factory", "backend_kinds", "create_backend"]

ENTRY_POINT_GROUP = "ensemble_async.backends"

BackendFactory = Callable[..., Backend]


@cache
def _entry_points() -> dict[str, EntryPoint]:
    found: dict[str, EntryPoint] = {}
    for ep in entry_points(group=ENTRY_POINT_GROUP):
        found.setdefault(ep.name, ep)
    return found


def backend_kinds() -> list[str]:
    """Every registered kind name, sorted."""
    return sorted(_entry_points())


def backend_factory(kind: str) -> BackendFactory:
    """The callable registered under ``kind``; raises UnknownBackendError if none."""
    eps = _entry_points()
    if kind not in eps:
        known = ", ".join(sorted(eps)) or "none"
        raise UnknownBackendError(f"unknown backend kind {kind!r} (registered: {known})")
    factory = eps[kind].load()
    if not callable(factory):
        raise UnknownBackendError(f"entry point for backend kind {kind!r} is not callable")
    return cast(BackendFactory, factory)


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
