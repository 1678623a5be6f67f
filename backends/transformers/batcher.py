"""The worker thread of a local model: a bounded queue, dynamic micro-batching, cancellation.

This module knows nothing about models and never imports torch: it moves :class:`Job`
objects from the event loop to one worker thread and results back.  What a batch *does*
is a :class:`BatchRunner`'s business (``runner.py`` for transformers; a fake in the tests).

The worker takes the oldest waiting job and every other waiting job with the same
``key`` (jobs with equal keys can share one model call), up to ``max_batch`` rows,
waiting at most ``window_s`` after the oldest job arrived for more to join.  A job marked
``solo`` never waits for company.  Results come back to the job's event loop through
``loop.call_soon_threadsafe``; the loop never runs model code.

Cancellation: a waiting job is removed from the queue; a running job is marked, and the
runner's ``abort()`` callable turns true once every job of the running batch is cancelled
(or the batcher is closing), so a long model call can stop at its next step.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import contextlib
import copy
import logging
import threading
import time
from collections.abc import Callable, Hashable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from ensemble_async.errors import BackendError, FatalError, OverloadedError, ServerError

__all__ = ["BatchOutcome", "BatchRunner", "BatchStats", "Batcher", "Job"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class BatchStats:
    """What the worker has done so far (a snapshot)."""

    batches: int = 0
    requests: int = 0
    rows: int = 0
    generated_tokens: int = 0
    """Tokens generated over all rows of generation jobs (what ``completion_tokens`` counts)."""
    max_batch_requests: int = 0
    max_batch_rows: int = 0
    busy_s: float = 0.0
    """Seconds spent running batches (model call and post-processing)."""
    batch_sizes: dict[int, int] = field(default_factory=dict)
    """Requests per batch -> how many batches had that many."""
    scored_tokens: int = 0
    """Completion tokens scored over all scoring jobs."""


@dataclass(eq=False)
class Job:
    """One request on its way through the worker.

    ``kind`` names what the runner does with it (``"generate"``, ``"score"``);
    ``payload`` is the request itself.  Exactly one of ``future`` (one result) and
    ``events`` (a stream: deltas, then the result) is set.
    """

    kind: str
    payload: Any
    loop: asyncio.AbstractEventLoop
    key: Hashable
    rows: int
    submitted: float = field(default_factory=time.perf_counter)
    future: asyncio.Future[Any] | None = None
    events: asyncio.Queue[Any] | None = None
    solo: bool = False
    cancelled: bool = False
    done: bool = False
    emitted: str = ""
    """Streamed text sent so far (kept by the runner)."""

    @classmethod
    def create(
        cls,
        kind: str,
        payload: Any,
        *,
        key: Hashable,
        rows: int,
        solo: bool = False,
        stream_capacity: int | None = None,
    ) -> Job:
        """A job bound to the running loop; ``stream_capacity`` makes it a streaming job."""
        loop = asyncio.get_running_loop()
        job = cls(kind=kind, payload=payload, loop=loop, key=key, rows=rows, solo=solo)
        if stream_capacity is not None:
            job.events = asyncio.Queue(maxsize=stream_capacity)
        else:
            job.future = loop.create_future()
        return job

    def _call(self, fn: Callable[..., Any], *args: Any) -> None:
        with contextlib.suppress(RuntimeError):  # the loop is closed: nobody is waiting
            self.loop.call_soon_threadsafe(fn, *args)

    def deliver(self, result: Any) -> None:
        self.done = True
        if self.events is not None:
            self._call(self.events.put_nowait, result)
        elif self.future is not None:
            self._call(_set_result, self.future, result)

    def fail(self, exc: BaseException) -> None:
        self.done = True
        if self.events is not None:
            self._call(self.events.put_nowait, exc)
        elif self.future is not None:
            self._call(_set_exception, self.future, exc)

    def delta(self, item: Any) -> None:
        """An intermediate stream event (ignored for a non-streaming job)."""
        if self.events is not None:
            self._call(self.events.put_nowait, item)


def _set_result(fut: asyncio.Future[Any], value: Any) -> None:
    if not fut.done():
        fut.set_result(value)


def _set_exception(fut: asyncio.Future[Any], exc: BaseException) -> None:
    if not fut.done():
        fut.set_exception(exc)


@dataclass
class BatchOutcome:
    """What a runner did with a batch: ``(job, result, tokens)`` for each job that
    succeeded (jobs that failed alone were already ``fail``-ed by the runner)."""

    results: list[tuple[Job, Any, int]] = field(default_factory=list)


class BatchRunner(Protocol):
    """The model side of the worker; every method runs in the worker thread."""

    def load(self) -> None:
        """Load the model (raise a ``BackendError`` saying what went wrong)."""

    def run(self, jobs: list[Job], abort: Callable[[], bool]) -> BatchOutcome:
        """Run one batch of jobs with equal keys.

        Raise a ``BackendError`` to fail the whole batch; any other exception fails it
        as a ``ServerError``.  ``abort()`` turns true when nobody waits any more.
        """

    def unload(self) -> None:
        """Drop the model once the worker stops."""


class _Closed(Exception):
    pass


class Batcher:
    """Owns the queue and the worker thread of one local model."""

    def __init__(
        self,
        name: str,
        runner: BatchRunner,
        *,
        max_batch: int = 8,
        window_s: float = 0.005,
        max_queue: int = 4096,
    ) -> None:
        if max_batch < 1:
            raise ValueError(f"max_batch_size must be >= 1, got {max_batch}")
        if window_s < 0:
            raise ValueError(f"batch_window_s must be >= 0, got {window_s}")
        if max_queue < 1:
            raise ValueError(f"max_queue must be >= 1, got {max_queue}")
        self.name = name
        self._runner = runner
        self.max_batch = max_batch
        self.window_s = window_s
        self.max_queue = max_queue
        self._cond = threading.Condition()
        self._pending: collections.deque[Job] = collections.deque()
        self._closing = False
        self._thread: threading.Thread | None = None
        self._loaded: concurrent.futures.Future[None] = concurrent.futures.Future()
        self._loaded.set_running_or_notify_cancel()  # nobody can cancel it from outside
        self.load_error: BackendError | None = None
        self._stats = BatchStats()
        self._stats_lock = threading.Lock()

    # ------------------------------------------------------------------ loop side

    @property
    def closing(self) -> bool:
        return self._closing

    @property
    def started(self) -> bool:
        return self._thread is not None

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    @property
    def loaded(self) -> concurrent.futures.Future[None]:
        """Resolves once the runner has loaded (or with the load error)."""
        return self._loaded

    @property
    def queued(self) -> int:
        with self._cond:
            return len(self._pending)

    @property
    def stats(self) -> BatchStats:
        with self._stats_lock:
            s = self._stats
            return BatchStats(
                s.batches,
                s.requests,
                s.rows,
                s.generated_tokens,
                s.max_batch_requests,
                s.max_batch_rows,
                s.busy_s,
                dict(s.batch_sizes),
                s.scored_tokens,
            )

    def closed_error(self) -> FatalError:
        return FatalError("backend is closed", backend=self.name)

    def start(self) -> None:
        """Start the worker thread (it loads the model first)."""
        with self._cond:
            if self._closing:
                raise self.closed_error()
            if self._thread is None:
                self._thread = threading.Thread(
                    target=self._worker, name=f"transformers-{self.name}", daemon=True
                )
                self._thread.start()

    def submit(self, jobs: Sequence[Job]) -> None:
        """Queue jobs (``OverloadedError`` beyond ``max_queue``, ``FatalError`` once closed)."""
        if self.load_error is not None:  # a fresh copy: tracebacks must not pile up
            raise copy.copy(self.load_error).with_traceback(None)
        self.start()
        with self._cond:
            if self._closing:
                raise self.closed_error()
            if len(self._pending) + len(jobs) > self.max_queue:
                raise OverloadedError(
                    f"queue full ({self.max_queue} requests waiting)", backend=self.name
                )
            self._pending.extend(jobs)
            self._cond.notify_all()

    def cancel(self, jobs: Iterable[Job]) -> None:
        """Cancel jobs: a waiting one leaves the queue, a running one is marked."""
        with self._cond:
            for job in jobs:
                if job.done:
                    continue
                job.cancelled = True
                with contextlib.suppress(ValueError):
                    self._pending.remove(job)
                if job.future is not None:
                    job.future.cancel()

    async def aclose(self) -> None:
        """Stop: waiting and running jobs fail with ``FatalError``; waits for the thread."""
        with self._cond:
            self._closing = True
            pending = list(self._pending)
            self._pending.clear()
            self._cond.notify_all()
        for job in pending:
            job.fail(self.closed_error())
        thread = self._thread
        # A running batch stops at its next step.  A load in progress cannot be
        # interrupted: the worker then exits on its own once loading ends.
        if thread is not None and thread.is_alive() and self._loaded.done():
            await asyncio.to_thread(thread.join)

    # ------------------------------------------------------------------ worker side

    def _worker(self) -> None:
        try:
            if self._closing:
                raise self.closed_error()
            self._runner.load()
        except BaseException as exc:
            err = (
                exc
                if isinstance(exc, BackendError)
                else FatalError(f"could not load model: {exc!r}", backend=self.name)
            )
            if err is not exc:
                err.__cause__ = exc
            self.load_error = err
            self._loaded.set_exception(err)
            with self._cond:
                pending = list(self._pending)
                self._pending.clear()
            for job in pending:
                job.fail(err)
            return
        self._loaded.set_result(None)
        while True:
            try:
                batch = self._next_batch()
            except _Closed:
                break
            try:
                self._run(batch)
            except BaseException as exc:  # a bug: fail the batch, keep serving
                log.exception("%s: batch failed", self.name)
                for job in batch:
                    if not job.done:
                        job.fail(ServerError(f"internal error: {exc!r}", backend=self.name))
        with self._cond:
            pending = list(self._pending)
            self._pending.clear()
        for job in pending:
            job.fail(self.closed_error())
        self._runner.unload()

    def _next_batch(self) -> list[Job]:
        """Wait for work; return the oldest job and the same-key jobs queued behind it."""
        with self._cond:
            while True:
                if self._closing:
                    raise _Closed
                if not self._pending:
                    self._cond.wait()
                    continue
                head = self._pending[0]
                deadline = head.submitted + self.window_s
                while (
                    not head.solo
                    and not self._closing
                    and self._pending
                    and self._pending[0] is head
                    and self._same_key_rows(head) < self.max_batch
                ):
                    remaining = deadline - time.perf_counter()
                    if remaining <= 0:
                        break
                    self._cond.wait(remaining)
                if self._closing:
                    raise _Closed
                if not self._pending or self._pending[0] is not head:
                    continue  # the head was cancelled while we waited
                batch: list[Job] = []
                rows = 0
                for job in self._pending:
                    if job.key != head.key:
                        continue
                    if batch and rows + job.rows > self.max_batch:
                        continue
                    batch.append(job)
                    rows += job.rows
                    if rows >= self.max_batch:
                        break
                for job in batch:
                    self._pending.remove(job)
                return batch

    def _same_key_rows(self, head: Job) -> int:
        return sum(j.rows for j in self._pending if j.key == head.key)

    def _run(self, batch: list[Job]) -> None:
        started = time.perf_counter()
        jobs = [j for j in batch if not j.cancelled]
        if not jobs:
            return

        def abort() -> bool:
            return self._closing or all(j.cancelled for j in jobs)

        try:
            outcome = self._runner.run(jobs, abort)
        except BackendError as exc:
            for job in jobs:
                if not job.done:
                    job.fail(exc)
            return
        except Exception as exc:
            log.exception("%s: the model call failed", self.name)
            err = ServerError(f"model call failed: {exc!r}", backend=self.name)
            for job in jobs:
                if not job.done:
                    job.fail(err)
            return
        ran = [j for j, _, _ in outcome.results]
        if ran:
            # Count first, then deliver: a caller that wakes up sees this batch in the stats.
            generated = sum(t for j, _, t in outcome.results if j.kind == "generate")
            scored = sum(t for j, _, t in outcome.results if j.kind == "score")
            rows = sum(j.rows for j in ran)
            with self._stats_lock:
                s = self._stats
                sizes = dict(s.batch_sizes)
                sizes[len(ran)] = sizes.get(len(ran), 0) + 1
                self._stats = BatchStats(
                    batches=s.batches + 1,
                    requests=s.requests + len(ran),
                    rows=s.rows + rows,
                    generated_tokens=s.generated_tokens + generated,
                    max_batch_requests=max(s.max_batch_requests, len(ran)),
                    max_batch_rows=max(s.max_batch_rows, rows),
                    busy_s=s.busy_s + time.perf_counter() - started,
                    batch_sizes=sizes,
                    scored_tokens=s.scored_tokens + scored,
                )
        for job, result, _ in outcome.results:
            if job.cancelled:
                continue
            if self._closing:
                job.fail(self.closed_error())
                continue
            job.deliver(result)
        for job in jobs:  # a runner that stopped early (abort) leaves jobs without a result
            if not job.done and not job.cancelled:
                job.fail(
                    self.closed_error()
                    if self._closing
                    else ServerError("the model call returned no result", backend=self.name)
                )
