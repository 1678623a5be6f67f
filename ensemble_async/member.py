"""One ensemble member: a ``Backend`` wrapped in a response cache, admission control,
retries, a circuit breaker and stats.

``Member.generate(request)`` runs::

    cache lookup                           # a hit returns here: no slot, no token
    breaker.guard()                        # open -> CircuitOpenError, nothing sent
      retry.run(attempt)                   # backoff waits hold no slot
        attempt:
          member limiter slot              # AdaptiveLimiter (AIMD on 429/503/timeouts)
            rpm bucket, tpm bucket         # rate limits
              global limit slot            # shared by all members, if given
                attempt timeout(backend.generate(request))
    cache store (a miss), stats

Why this order:

* The cache comes first because a hit sends nothing: it must not wait for a slot or a
  rate token, nor take them from requests that do go out, and it says nothing about the
  backend's health or speed (no breaker verdict, no AIMD success, no latency sample).
* The member's own slot comes before the global slot, so a task never holds a *global*
  slot while queueing for a slow member's slot or sleeping on its rate bucket: one slow
  or rate-limited member cannot starve the others of global capacity.
* Rate buckets come after the member slot, right before sending, so tokens are spent
  when the request is really sent.  Taken before the slot, tokens paid long ago by
  queued tasks would let a burst go out when slots free up together, above the
  server's rate.  While a member is rate-limited its slots wait on the bucket; that
  costs nothing, as nothing of this member could be sent any sooner.
* The per-attempt timeout is applied here and nowhere else, and covers only the backend
  call, never a wait for admission.  Transports keep connection-level limits only.

``Member.stream(request)`` goes through the same breaker, retries, admission and
timeout (streams are not cached).  Attempts are retried only until the first event
arrives; once an event has been yielded, an error propagates to the caller.  The slots
are held until the stream ends or the caller closes it.

Cancelling ``generate`` cancels the backend call and releases every slot.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable
from contextlib import AbstractAsyncContextManager, AsyncExitStack, nullcontext
from dataclasses import dataclass
from functools import partial
from types import TracebackType
from typing import Any, ParamSpec, Self, TypeVar

from .admission import AdaptiveLimiter, SlotSource, TokenBucket, estimate_tokens, used_tokens
from .backend import Backend, info_of, kind_of, stream_of
from .breaker import CircuitBreaker, CircuitOpenError
from .cache import ResponseCache, cache_key, score_cache_key
from .errors import BackendError, MalformedResponseError
from .retry import RetryEvent, RetryPolicy, attempt_deadline, attempt_timeout, is_retryable
from .scoring import CompletionScore, Scorer, ScoreRequest, ScoringUnsupportedError
from .stats import BackendStats
from .types import BackendInfo, Completion, GenerationRequest, StreamEvent

__all__ = ["Member"]

_T = TypeVar("_T")
_P = ParamSpec("_P")

log = logging.getLogger(__name__)


class Member:
    """A backend plus its scheduling policy.

    ``concurrency``: an ``AdaptiveLimiter``, or the initial limit of one whose upper
    bound is ``max_concurrency`` (default: ``concurrency``; ``start()`` raises it to
    the server's advertised ``BackendInfo.max_concurrency`` when that is known, and an
    explicit ``max_concurrency`` is always capped by it).
    ``rpm``/``tpm``: requests and tokens per minute (or ready ``TokenBucket``s); tokens are
    estimated before sending (``estimate_tokens``) and corrected with the server's
    counts afterwards.
    ``retry``/``breaker``: default ``RetryPolicy()`` and ``CircuitBreaker()``; pass
    ``RetryPolicy.never()`` for no retries.  A breaker passed in is used, never changed
    (its ``name`` and ``on_change`` stay the caller's).
    ``global_limit``: a ``SlotSource`` shared by all members (e.g. ``GlobalLimit(64)``).
    ``timeout_s``: per-attempt limit on the backend call (default:
    ``retry.attempt_timeout_s``).
    ``cache``: a ``ResponseCache`` looked up before any admission (see the module doc);
    the member does not close it (several members may share one).  The key is
    ``cache_key(kind, backend name, model, request)``; the model is ``cache_identity``
    when given (e.g. a configured model path: no ``info()`` call), else
    ``info().model``, read once on the first lookup (a failure to read it propagates,
    and the next call tries again).
    ``weight``: the member's share when an ensemble splits work (not used here).
    ``instruction_tuned``: whether the model follows bare instructions; the pipeline
    gives one that does not (a base model) few-shot answer prompts (SPEC step 4).
    """

    def __init__(
        self,
        backend: Backend,
        *,
        name: str | None = None,
        concurrency: int | AdaptiveLimiter = 8,
        max_concurrency: int | None = None,
        rpm: float | TokenBucket | None = None,
        tpm: float | TokenBucket | None = None,
        retry: RetryPolicy | None = None,
        breaker: CircuitBreaker | None = None,
        global_limit: SlotSource | None = None,
        timeout_s: float | None = None,
        weight: float = 1.0,
        instruction_tuned: bool = True,
        cache: ResponseCache | None = None,
        cache_identity: str | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if not weight > 0:
            raise ValueError(f"weight must be > 0, got {weight}")
        if timeout_s is not None and not timeout_s > 0:
            raise ValueError(f"timeout_s must be > 0, got {timeout_s}")
        self.backend = backend
        self.name = name or backend.name
        self.auto_named = name is None
        """True when the name is the backend's (an ``Ensemble`` may then suffix it to keep
        member names unique); an explicit name is never changed."""
        self.weight = weight
        self.instruction_tuned = instruction_tuned
        if isinstance(concurrency, AdaptiveLimiter):
            self.limiter = concurrency
            self._auto_maximum = False
        else:
            self.limiter = AdaptiveLimiter(concurrency, maximum=max_concurrency or concurrency)
            self._auto_maximum = max_concurrency is None
        self.rpm = _bucket(rpm)
        self.tpm = _bucket(tpm)
        self.retry = retry or RetryPolicy()
        self.timeout_s = timeout_s if timeout_s is not None else self.retry.attempt_timeout_s
        self.breaker = breaker or CircuitBreaker(name=self.name)
        self.global_limit = global_limit
        self.cache = cache
        self.cache_identity = cache_identity
        self._cache_kind = kind_of(backend)
        self._cache_model: str | None = cache_identity
        self._cache_resolved = cache_identity is not None
        self._cache_lock: asyncio.Lock | None = None
        self._clock = clock
        self.stats = BackendStats(self.name, clock=clock, cached=cache is not None)
        self._seen_breaker_state = self.breaker.state
        self.stats.breaker_state = str(self._seen_breaker_state)

    async def start(self) -> None:
        """Read the server's facts; its ``max_concurrency`` bounds the adaptive limit.

        Bounded by the per-attempt timeout: a server that accepts connections and never
        answers delays the start by that much at most, and the member goes on without
        the facts.
        """
        try:
            info = await self._info()
        except BackendError as exc:
            log.warning("member %s: could not read backend info: %s", self.name, exc)
            return
        self._learn_identity(info)
        server_max = info.max_concurrency
        if server_max is None or server_max < self.limiter.minimum:
            return
        if not self._auto_maximum:
            server_max = min(self.limiter.maximum, server_max)
        self.limiter.set_maximum(server_max)

    async def _info(self) -> BackendInfo:
        async with attempt_timeout(self.timeout_s, backend=self.name):
            return await info_of(self.backend)

    def rename(self, name: str) -> None:
        """Give this member another name (its stats follow).  Used by ``Ensemble`` to
        tell apart members whose backends share a default name."""
        self.name = name
        self.stats.name = name

    # -- the response cache ------------------------------------------------------------

    def _learn_identity(self, info: BackendInfo) -> None:
        if self.cache is None or self._cache_resolved:
            return
        self._cache_kind = info.kind or self._cache_kind
        self._cache_model = info.model
        self._cache_resolved = True

    async def cache_key_for(self, request: GenerationRequest) -> str:
        """The response-cache key of ``request`` for this member (reads ``info()`` once
        when no ``cache_identity`` was given)."""
        await self._resolve_identity()
        return cache_key(self._cache_kind, self.backend.name, self._cache_model, request)

    async def _resolve_identity(self) -> None:
        if not self._cache_resolved:
            if self._cache_lock is None:
                self._cache_lock = asyncio.Lock()
            async with self._cache_lock:
                if not self._cache_resolved:
                    self._learn_identity(await self._read_identity())

    async def _read_identity(self) -> BackendInfo:
        """``info()`` for the cache key, under the breaker and retries (no slots: it is
        no generation).  A failure counts as a failed call, so a dead server still
        shows in the stats and opens the breaker while a cache is in front of it."""
        try:
            try:
                with self.breaker.guard():
                    return await self.retry.run(self._info, on_retry=self._on_retry)
            finally:
                self._watch_breaker()
        except Exception as exc:
            self.stats.started()
            self.stats.failed_with(self._named(exc))
            raise

    # -- generate ----------------------------------------------------------------------

    async def generate(self, request: GenerationRequest) -> list[Completion]:
        """``request.n`` completions: from the cache when it has them, else from the
        backend under this member's policy (and then stored).

        Raises the backend's last error after retries, ``CircuitOpenError`` at once
        while the breaker is open, or ``CacheError`` when an answer cannot be stored.
        """
        if self.cache is None:
            return await self._send(request)
        key = await self.cache_key_for(request)
        stored = await self.cache.get(key)
        if stored is not None:
            self.stats.cache_hit()
            return stored
        completions = await self._send(request)
        await self.cache.put(key, completions)
        self.stats.cache_miss()
        return completions

    async def _send(self, request: GenerationRequest) -> list[Completion]:
        """The request through breaker, retries and admission to the backend."""
        completions, latency = await self._guarded(self._attempt, request)
        if len(completions) == 1:  # the common case, without the generators below
            prompt_tokens = completions[0].prompt_tokens or 0
            completion_tokens = completions[0].completion_tokens or 0
        else:
            prompt_tokens = next(
                (c.prompt_tokens for c in completions if c.prompt_tokens is not None), 0
            )
            completion_tokens = sum(c.completion_tokens or 0 for c in completions)
        self.stats.succeeded(
            latency,
            completions=len(completions),
            prompt_tokens=prompt_tokens,
            completion_tokens=completion_tokens,
        )
        return completions

    async def _guarded(
        self,
        attempt: Callable[_P, Awaitable[tuple[_T, float]]],
        *args: _P.args,
        **kwargs: _P.kwargs,
    ) -> tuple[_T, float]:
        """One call (generation or scoring), ``attempt(*args, **kwargs)``, through the
        breaker and the retries, counted as started and, on failure, as failed or
        cancelled; the caller counts success (what it counts depends on what was asked).

        The first attempt runs in this frame and retries continue in
        ``RetryPolicy.run_after`` (this runs once per request: bench/overhead.py)."""
        self.stats.started()
        try:
            try:
                with self.breaker.guard():
                    started = self.retry.clock()
                    try:
                        return await attempt(*args, **kwargs)
                    except BaseException as exc:
                        if not is_retryable(exc):
                            raise
                        return await self.retry.run_after(
                            exc,
                            partial(attempt, *args, **kwargs),
                            started=started,
                            on_retry=self._on_retry,
                        )
            finally:
                self._watch_breaker()
        except Exception as exc:
            self.stats.failed_with(self._named(exc))
            raise
        except BaseException:
            self.stats.was_cancelled()
            raise

    def _named(self, exc: BaseException) -> BaseException:
        # A caller's breaker may have no name: say which member refused.
        if isinstance(exc, CircuitOpenError) and exc.backend is None:
            exc.backend = self.name
        return exc

    def _watch_breaker(self) -> None:
        """Follow the breaker's state without hooking into the caller's object."""
        new = self.breaker.state
        old = self._seen_breaker_state
        if new is not old:
            self._seen_breaker_state = new
            self.stats.breaker_state = str(new)
            log.info("member %s: circuit %s -> %s", self.name, old, new)

    def _on_retry(self, event: RetryEvent) -> None:
        self.stats.retrying_after(event.error)
        log.debug(
            "member %s: attempt %d failed (%s); retry in %.2fs",
            self.name,
            event.attempt,
            type(event.error).__name__,
            event.wait_s,
        )

    async def _admit(self, stack: AsyncExitStack, request: GenerationRequest) -> int:
        """Enter member slot, rate buckets and global slot on ``stack``; returns the
        token estimate charged to the tpm bucket (0 without one)."""
        estimate = estimate_tokens(request) if self.tpm is not None else 0
        await self._admit_estimate(stack, estimate)
        return estimate

    async def _admit_estimate(self, stack: AsyncExitStack, estimate: int) -> None:
        """Member slot, rate buckets (``estimate`` tokens) and global slot, on ``stack``."""
        await stack.enter_async_context(self.limiter.slot())
        if self.rpm is not None:
            await self.rpm.acquire(1)
        if self.tpm is not None:
            await self.tpm.acquire(estimate)
        global_slot: AbstractAsyncContextManager[Any] = (
            self.global_limit.slot() if self.global_limit is not None else nullcontext()
        )
        await stack.enter_async_context(global_slot)

    def _correct_tokens(
        self, request: GenerationRequest, completions: list[Completion], estimate: int
    ) -> None:
        if self.tpm is None:
            return
        correction = used_tokens(request, completions) - estimate
        if correction > 0:
            self.tpm.charge(correction)
        elif correction < 0:
            self.tpm.refund(-correction)

    async def _attempt(self, request: GenerationRequest) -> tuple[list[Completion], float]:
        """One try: admission, then the timed backend call; returns it with its latency."""
        if self.rpm is None and self.tpm is None and self.global_limit is None:
            # Only the member's own slot to take: the same steps as below without the
            # exit stack (this runs once per request; see bench/overhead.py).
            async with self.limiter.slot():
                started = self._clock()
                if self.timeout_s is None:
                    completions = await self.backend.generate(request)
                else:
                    async with attempt_timeout(self.timeout_s, backend=self.name):
                        completions = await self.backend.generate(request)
                return completions, self._clock() - started
        async with AsyncExitStack() as stack:
            estimate = await self._admit(stack, request)
            started = self._clock()
            async with attempt_timeout(self.timeout_s, backend=self.name):
                completions = await self.backend.generate(request)
            latency = self._clock() - started
        self._correct_tokens(request, completions, estimate)
        return completions, latency

    # -- score -------------------------------------------------------------------------

    @property
    def can_score(self) -> bool:
        """Whether the backend implements scoring at all (see ``check_scoring``)."""
        return isinstance(self.backend, Scorer)

    def _scorer(self) -> Scorer:
        backend = self.backend
        if not isinstance(backend, Scorer):
            raise ScoringUnsupportedError(
                f"member {self.name!r} ({kind_of(backend)}) cannot score completions",
                backend=self.name,
            )
        return backend

    async def check_scoring(self) -> None:
        """Raise ``ScoringUnsupportedError`` now if this member cannot score (used when a
        run starts, so that a target model that cannot score stops it before any item)."""
        scorer = self._scorer()
        async with attempt_timeout(self.timeout_s, backend=self.name):
            await scorer.check_scoring()

    async def score(self, request: ScoreRequest) -> list[CompletionScore]:
        """Each completion's log-probabilities under this member's model: from the cache
        when it has them, else through the same breaker, retries, admission and timeout
        as ``generate`` (and then stored)."""
        scorer = self._scorer()
        key: str | None = None
        if self.cache is not None:
            await self._resolve_identity()
            key = score_cache_key(self._cache_kind, self.backend.name, self._cache_model, request)
            stored = await self.cache.get_scores(key)
            if stored is not None:
                self.stats.cache_hit()
                return stored
        estimate = _score_tokens(request)

        async def attempt() -> tuple[list[CompletionScore], float]:
            async with AsyncExitStack() as stack:
                await self._admit_estimate(stack, estimate)
                started = self._clock()
                async with attempt_timeout(self.timeout_s, backend=self.name):
                    scores = await scorer.score(request)
                return scores, self._clock() - started

        scores, latency = await self._guarded(attempt)
        self.stats.succeeded(
            latency,
            completions=0,
            prompt_tokens=sum(s.num_tokens for s in scores),
            completion_tokens=0,
        )
        if self.cache is not None and key is not None:
            await self.cache.put_scores(key, scores)
            self.stats.cache_miss()
        return scores

    # -- stream ------------------------------------------------------------------------

    async def stream(self, request: GenerationRequest) -> AsyncGenerator[StreamEvent, None]:
        """The backend's stream (text deltas, then one ``Completion``) under this
        member's breaker, admission, retries and per-attempt timeout.

        Attempts are retried until the first event arrives; after an event has been
        yielded an error propagates.  The timeout covers the whole stream of an attempt.
        Close the iterator (``contextlib.aclosing``) when stopping early: that releases
        the slots at once.
        """
        self.stats.started()
        final: Completion | None = None
        latency = 0.0
        try:
            try:
                with self.breaker.guard():
                    opened = await self.retry.run(
                        lambda: self._open_stream(request), on_retry=self._on_retry
                    )
                    failure: BaseException | None = None
                    try:
                        event: StreamEvent | None = opened.first
                        while event is not None:
                            if isinstance(event, Completion):
                                final = event
                            yield event
                            event = await opened.next_event()
                    except BaseException as exc:
                        failure = exc
                        raise
                    finally:
                        latency = self._clock() - opened.started
                        await opened.stack.__aexit__(
                            None if failure is None else type(failure),
                            failure,
                            None if failure is None else failure.__traceback__,
                        )
            finally:
                self._watch_breaker()
        except Exception as exc:
            self.stats.failed_with(self._named(exc))
            raise
        except BaseException:
            self.stats.was_cancelled()
            raise
        done = [] if final is None else [final]
        if final is not None:
            self._correct_tokens(request, done, opened.estimate)
        self.stats.succeeded(
            latency,
            completions=len(done),
            prompt_tokens=(final.prompt_tokens or 0) if final is not None else 0,
            completion_tokens=(final.completion_tokens or 0) if final is not None else 0,
        )

    async def _open_stream(self, request: GenerationRequest) -> _OpenStream:
        """One stream attempt up to its first event; the slots stay held on success."""
        stack = AsyncExitStack()
        await stack.__aenter__()
        try:
            estimate = await self._admit(stack, request)
            started = self._clock()
            when = (
                None
                if self.timeout_s is None
                else asyncio.get_running_loop().time() + self.timeout_s
            )
            events = stream_of(self.backend, request)
            closer = getattr(events, "aclose", None)
            if closer is not None:
                stack.push_async_callback(closer)
            opened = _OpenStream(self, stack, events, when, started, estimate)
            first = await opened.next_event()
            if first is None:
                raise MalformedResponseError("the stream ended without an event", backend=self.name)
            opened.first = first
            return opened
        except BaseException as exc:
            await stack.__aexit__(type(exc), exc, exc.__traceback__)
            raise

    # -- the rest ----------------------------------------------------------------------

    def snapshot(self) -> dict[str, Any]:
        """Stats plus the live admission state, JSON-ready (with ``cache_hits`` and
        ``cache_misses`` when the member has a response cache)."""
        self._watch_breaker()
        snap = self.stats.snapshot()
        snap["breaker"] = str(self.breaker.state)
        snap["limit"] = self.limiter.limit
        snap["waiting"] = self.limiter.waiting
        snap["weight"] = self.weight
        return snap

    async def aclose(self) -> None:
        """Close the backend (not the cache, which the caller owns)."""
        await self.backend.aclose()

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    def __repr__(self) -> str:
        return f"<Member {self.name!r} limit={self.limiter.limit} breaker={self.breaker.state}>"


@dataclass(eq=False)
class _OpenStream:
    """A stream attempt that has produced its first event, with its held slots."""

    member: Member
    stack: AsyncExitStack
    events: AsyncIterator[StreamEvent]
    deadline: float | None
    started: float
    estimate: int
    first: StreamEvent | None = None

    async def next_event(self) -> StreamEvent | None:
        """The next event under the attempt's deadline, or None at the end."""
        async with attempt_deadline(self.deadline, self.member.timeout_s, backend=self.member.name):
            try:
                return await anext(self.events)
            except StopAsyncIteration:
                return None


def _bucket(rate: float | TokenBucket | None) -> TokenBucket | None:
    if rate is None or isinstance(rate, TokenBucket):
        return rate
    return TokenBucket(rate)


def _score_tokens(request: ScoreRequest) -> int:
    """A token estimate of a scoring request (prompt once per completion, plus the
    completions), for the tpm bucket."""
    if request.prompt is not None:
        prompt = len(request.prompt)
    else:
        prompt = sum(len(m.content) for m in request.messages or ())
    chars = prompt * len(request.completions) + sum(len(c) for c in request.completions)
    return max(1, chars // 4)
