"""A content-addressed, crash-safe response cache (sqlite).

A rerun of a pipeline must repeat no call that already finished.  ``Member`` looks every
``generate`` request up by ``cache_key`` -- a SHA-256 over the canonical JSON of the
backend's identity (kind, name, model) and the full request -- before any admission
(breaker, concurrency slot, rate tokens, global slot), and only calls its backend on a
miss, storing the answer before returning it.  This module is storage only: it knows
nothing of backends or scheduling.

Durability.  The database runs in WAL mode with ``synchronous=NORMAL`` by default and
every ``put`` is its own committed transaction before ``put`` returns.  In WAL mode a
commit is appended to the ``-wal`` file with ``write()`` before sqlite returns, so a
process killed at any point (SIGKILL included) never corrupts the database and loses at
most the write that was in flight: the operating system still holds every committed
page.  ``NORMAL`` does not ``fsync`` at each commit, so a power loss or kernel crash may
roll back the last few commits (the database stays consistent; those calls are simply
made again).  Pass ``synchronous="FULL"`` to ``fsync`` the WAL at every commit and
survive power loss too, at the price of one disk flush per stored response.

Threading.  sqlite connections belong to the thread that made them, so the cache owns
one worker thread that opens the connection (on first use, or in ``await
ResponseCache.open(path)`` / ``async with ResponseCache(path)``) and runs every
statement; coroutines await its futures and never block the event loop, not even while
sqlite waits on a busy file.  A ``put`` whose awaiting task is cancelled
still completes (it is already queued to the worker).

What is stored: only the key (a hash) and the completions (``Completion.to_dict()``
as JSON).  Requests carry no secrets (API keys live in transports), and nothing of the
backend other than its kind, name and model enters the key.

Caveat: identical requests get identical answers.  Sampling with ``temperature > 0``
and no ``seed`` would therefore return one cached sample for every repeat of the same
request; give each request that must differ its own ``seed`` (the pipeline does).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import hashlib
import json
import logging
import sqlite3
import threading
import time
from collections.abc import Callable
from pathlib import Path
from types import TracebackType
from typing import Any, Literal, Self, TypeVar

from .scoring import CompletionScore, ScoreRequest
from .types import Completion, GenerationRequest

__all__ = ["CacheError", "ResponseCache", "cache_key"]

log = logging.getLogger(__name__)

KEY_VERSION = 1
"""Part of every key: bumped when the canonical form changes, so old entries miss."""

SCHEMA_VERSION = 1

_T = TypeVar("_T")


class CacheError(Exception):
    """The cache file cannot be opened, is not a response cache, or is closed."""


def canonical_json(value: Any, *, allow_nan: bool = False) -> str:
    """Sorted keys, no whitespace, UTF-8 text: one spelling per value.  No NaN/Infinity
    unless ``allow_nan`` (a stored score: a server's ``-Infinity`` or ``NaN``
    log-probability is kept as Python's JSON writes it, which ``json.loads`` reads back
    as the same float)."""
    return json.dumps(
        value, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=allow_nan
    )


def cache_key(
    backend_kind: str, backend_name: str, model: str | None, request: GenerationRequest
) -> str:
    """The SHA-256 (hex) of the canonical JSON of the backend identity and the request.

    Equal requests give equal keys in every process (no ``hash()``, no dict order);
    ``temperature`` and ``top_p`` are compared as floats (``0`` and ``0.0`` are one key).
    Raises ``ValueError`` when ``request.extra`` holds values JSON cannot represent.
    """
    body = request.to_dict()
    body["temperature"] = float(body["temperature"])
    body["top_p"] = float(body["top_p"])
    payload = {
        "v": KEY_VERSION,
        "kind": backend_kind,
        "name": backend_name,
        "model": model,
        "request": body,
    }
    try:
        text = canonical_json(payload)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"request cannot be cached (not canonical JSON): {exc}") from exc
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def score_cache_key(
    backend_kind: str, backend_name: str, model: str | None, request: ScoreRequest
) -> str:
    """The key of a scoring request: like :func:`cache_key`, in a namespace of its own
    (a scoring request and a generation request never share a key)."""
    payload = {
        "v": KEY_VERSION,
        "what": "score",
        "kind": backend_kind,
        "name": backend_name,
        "model": model,
        "prompt": request.prompt,
        "messages": None if request.messages is None else [m.to_dict() for m in request.messages],
        "completions": list(request.completions),
    }
    return hashlib.sha256(canonical_json(payload).encode("utf-8")).hexdigest()


_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (name TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS responses (
    key TEXT PRIMARY KEY,
    value TEXT NOT NULL,
    created REAL NOT NULL
) WITHOUT ROWID;
"""


class ResponseCache:
    """Completions by ``cache_key``, in one sqlite file (WAL).

    ``get``/``put`` are coroutines run on the cache's own worker thread.  ``put``
    returns once the entry is committed (see the module notes on durability); an
    existing entry is kept (first answer wins).

    The constructor touches no disk.  The file (and its parent folders) is opened on
    the worker thread: by ``await ResponseCache.open(path)``, on entering ``async with
    ResponseCache(path)``, or else by the first statement.  Opening raises ``CacheError``
    naming the path when the file cannot be opened or is not a response cache (and is
    tried again by the next call).  A failing statement later (disk full, I/O error)
    raises ``CacheError`` too, so a call whose answer could not be stored fails rather
    than being silently uncached.  Close with ``await aclose()`` (or leave the ``async
    with``); ``close()`` is the same for synchronous code and blocks until queued
    writes are done, so never call it from a coroutine.
    """

    def __init__(
        self,
        path: str | Path,
        *,
        synchronous: Literal["NORMAL", "FULL"] = "NORMAL",
        timeout_s: float = 30.0,
    ) -> None:
        if synchronous not in ("NORMAL", "FULL"):
            raise ValueError(f"synchronous must be NORMAL or FULL, got {synchronous!r}")
        self.path = Path(path)
        self.synchronous = synchronous
        self._timeout = timeout_s
        self._conn: sqlite3.Connection | None = None
        self._closed = False
        self._lock = threading.Lock()
        self._pool = concurrent.futures.ThreadPoolExecutor(
            max_workers=1, thread_name_prefix="ensemble-async-cache"
        )

    @classmethod
    async def open(
        cls,
        path: str | Path,
        *,
        synchronous: Literal["NORMAL", "FULL"] = "NORMAL",
        timeout_s: float = 30.0,
    ) -> ResponseCache:
        """A cache whose file is open (on the worker thread): errors show here, not later."""
        cache = cls(path, synchronous=synchronous, timeout_s=timeout_s)
        try:
            await cache._run(cache._ensure_open)
        except BaseException:
            await cache.aclose()
            raise
        return cache

    # ------------------------------------------------------------- worker thread

    def _ensure_open(self) -> None:
        if self._conn is None:
            self._open()

    def _open(self) -> None:
        where = self.path
        try:
            where.parent.mkdir(parents=True, exist_ok=True)
            conn = sqlite3.connect(where, timeout=self._timeout, isolation_level=None)
        except (OSError, sqlite3.Error) as exc:
            raise CacheError(f"cannot open the response cache {where}: {exc}") from exc
        try:
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute(f"PRAGMA synchronous={self.synchronous}")
            conn.executescript(_SCHEMA)
            row = conn.execute("SELECT value FROM meta WHERE name = 'schema'").fetchone()
            if row is None:
                conn.execute(
                    "INSERT OR IGNORE INTO meta (name, value) VALUES ('schema', ?)",
                    (str(SCHEMA_VERSION),),
                )
            elif row[0] != str(SCHEMA_VERSION):
                raise CacheError(
                    f"{where}: response cache schema {row[0]}, this version reads "
                    f"{SCHEMA_VERSION}; use another cache path"
                )
        except sqlite3.Error as exc:
            conn.close()
            raise CacheError(f"{where} is not a usable response cache: {exc}") from exc
        except BaseException:
            conn.close()
            raise
        self._conn = conn

    def _connection(self) -> sqlite3.Connection:
        # Only ever called on the worker thread, and never after _close_conn (close
        # refuses new jobs first), so a missing connection means "not opened yet".
        if self._conn is None:
            self._open()
        assert self._conn is not None
        return self._conn

    def _get(self, key: str) -> str | None:
        row = (
            self._connection()
            .execute("SELECT value FROM responses WHERE key = ?", (key,))
            .fetchone()
        )
        return None if row is None else str(row[0])

    def _put(self, key: str, value: str) -> None:
        # Autocommit mode: this one statement is one committed transaction.
        self._connection().execute(
            "INSERT OR IGNORE INTO responses (key, value, created) VALUES (?, ?, ?)",
            (key, value, time.time()),
        )

    def _count(self) -> int:
        return int(self._connection().execute("SELECT COUNT(*) FROM responses").fetchone()[0])

    def _close_conn(self) -> None:
        if self._conn is not None:
            conn, self._conn = self._conn, None
            conn.close()

    async def _run(self, fn: Callable[..., _T], *args: Any, shield: bool = False) -> _T:
        with self._lock:
            if self._closed:
                raise CacheError(f"the response cache {self.path} is closed")
            future = self._pool.submit(fn, *args)
        waiter = asyncio.wrap_future(future)
        if shield:
            # If the awaiting task is cancelled, nobody reads the job's outcome: read it
            # here so a failed write is not reported as "exception never retrieved".
            waiter.add_done_callback(_consume_outcome)
        try:
            # A shielded job still runs when the awaiting task is cancelled (writes).
            return await (asyncio.shield(waiter) if shield else waiter)
        except sqlite3.Error as exc:  # disk full, I/O error, ...
            raise CacheError(f"response cache {self.path}: {exc}") from exc

    # ------------------------------------------------------------------ public

    async def get(self, key: str) -> list[Completion] | None:
        """The stored completions, or None (also for an entry this version cannot read)."""
        raw = await self._run(self._get, key)
        if raw is None:
            return None
        try:
            return [Completion(**item) for item in json.loads(raw)]
        except (ValueError, TypeError) as exc:
            log.warning("response cache %s: unreadable entry %s (%s); ignored", self.path, key, exc)
            return None

    async def put(self, key: str, completions: list[Completion]) -> None:
        """Store ``completions`` under ``key``; returns once the entry is committed."""
        value = canonical_json([c.to_dict() for c in completions])
        await self._run(self._put, key, value, shield=True)

    async def get_scores(self, key: str) -> list[CompletionScore] | None:
        """Stored scores, or None (also for an entry this version cannot read)."""
        raw = await self._run(self._get, key)
        if raw is None:
            return None
        try:
            return [
                CompletionScore(
                    text=item["text"],
                    token_logprobs=tuple(float(x) for x in item["token_logprobs"]),
                    tokens=None if item.get("tokens") is None else tuple(item["tokens"]),
                    backend=item.get("backend", ""),
                    model=item.get("model"),
                )
                for item in json.loads(raw)
            ]
        except (ValueError, TypeError, KeyError) as exc:
            log.warning("response cache %s: unreadable entry %s (%s); ignored", self.path, key, exc)
            return None

    async def put_scores(self, key: str, scores: list[CompletionScore]) -> None:
        """Store ``scores`` under ``key``; returns once the entry is committed."""
        value = canonical_json(
            [
                {
                    "text": s.text,
                    "token_logprobs": list(s.token_logprobs),
                    "tokens": None if s.tokens is None else list(s.tokens),
                    "backend": s.backend,
                    "model": s.model,
                }
                for s in scores
            ],
            allow_nan=True,
        )
        await self._run(self._put, key, value, shield=True)

    async def count(self) -> int:
        """How many entries the cache holds."""
        return await self._run(self._count)

    def close(self) -> None:
        """Finish queued writes, close the connection and stop the worker (idempotent)."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            final = self._pool.submit(self._close_conn)
        self._pool.shutdown(wait=True)
        final.result()

    async def aclose(self) -> None:
        """``close()`` without blocking the event loop."""
        await asyncio.to_thread(self.close)

    async def __aenter__(self) -> Self:
        try:
            await self._run(self._ensure_open)
        except BaseException:
            await self.aclose()
            raise
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    def __repr__(self) -> str:
        return f"<ResponseCache {str(self.path)!r}{' closed' if self._closed else ''}>"


def _consume_outcome(future: asyncio.Future[Any]) -> None:
    if not future.cancelled():
        future.exception()
