"""One ensemble member: a ``Backend`` wrapped in admission control, retries, a circuit
breaker and stats.

``Member.generate(request)`` runs::

    breaker.guard()                        # open -> CircuitOpenError, nothing sent
      retry.run(attempt)                   # backoff waits hold no slot
        attempt:
          member limiter slot              # AdaptiveLimiter (AIMD on 429/503/timeouts)
            rpm bucket, tpm bucket         # rate limits
              global limit slot            # shared by all members, if given
                attempt_timeout(backend.generate(request))
    stats

Why this order:

* The member's own slot comes first and the global slot last, so a task never holds a
  *global* slot while queueing for a slow member's slot or sleeping on its rate bucket:
  one slow or rate-limited member cannot starve the others of global capacity.
* Rate buckets come after the member slot, right before sending, so tokens are spent
  when the request is really sent.  Taken before the slot, tokens paid long ago by
  queued tasks would let a burst go out when slots free up together, above the
  server's rate.  While a member is rate-limited its slots wait on the bucket; that
  costs nothing, as nothing of this member could be sent any sooner.
* The per-attempt timeout covers only the backend call, never a wait for admission.

Cancelling ``generate`` cancels the backend call and releases every slot.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from contextlib import AbstractAsyncContextManager, nullcontext
from dataclasses import replace
from types import TracebackType
from typing import Any, Self

from .admission import AdaptiveLimiter, SlotSource, TokenBucket, estimate_tokens, used_tokens
from .backend import Backend
from .breaker import BreakerState, CircuitBreaker
from .errors import BackendError
from .retry import RetryEvent, RetryPolicy, attempt_timeout
from .stats import BackendStats
from .types import Completion, GenerationRequest

__all__ = ["Member"]

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
    ``RetryPolicy.never()`` for no retries.
    ``global_limit``: a ``SlotSource`` shared by all members (e.g. ``GlobalLimit(64)``).
    ``timeout_s``: per-attempt limit on the backend call (default:
    ``retry.attempt_timeout_s``).
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
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if not weight > 0:
            raise ValueError(f"weight must be > 0, got {weight}")
        self.backend = backend
        self.name = name or backend.name
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
        policy = retry or RetryPolicy()
        self.timeout_s = timeout_s if timeout_s is not None else policy.attempt_timeout_s
        # The timeout is applied around the backend call only (see the module doc).
        self.retry = replace(policy, attempt_timeout_s=None)
        self.breaker = breaker or CircuitBreaker()
        if self.breaker.name is None:
            self.breaker.name = self.name
        self.global_limit = global_limit
        self._clock = clock
        self.stats = BackendStats(self.name, clock=clock)
        self.stats.breaker_state = str(self.breaker.state)
        previous = self.breaker.on_change

        def on_change(old: BreakerState, new: BreakerState) -> None:
            self.stats.breaker_state = str(new)
            log.info("member %s: circuit %s -> %s", self.name, old, new)
            if previous is not None:
                previous(old, new)

        self.breaker.on_change = on_change

    async def start(self) -> None:
        """Read the server's facts; its ``max_concurrency`` bounds the adaptive limit.

        Bounded by the per-attempt timeout: a server that accepts connections and never
        answers delays the start by that much at most, and the member goes on without
        the facts.
        """
        try:
            async with attempt_timeout(self.timeout_s, backend=self.name):
                info = await self.backend.info()
        except BackendError as exc:
            log.warning("member %s: could not read backend info: %s", self.name, exc)
            return
        server_max = info.max_concurrency
        if server_max is None or server_max < self.limiter.minimum:
            return
        if not self._auto_maximum:
            server_max = min(self.limiter.maximum, server_max)
        self.limiter.set_maximum(server_max)

    async def generate(self, request: GenerationRequest) -> list[Completion]:
        """``request.n`` completions from the backend, under this member's policy.

        Raises the backend's last error after retries, or ``CircuitOpenError`` at once
        while the breaker is open.
        """
        self.stats.started()
        try:
            with self.breaker.guard():
                completions, latency = await self.retry.run(
                    lambda: self._attempt(request), on_retry=self._on_retry
                )
        except Exception as exc:
            self.stats.failed_with(exc)
            raise
        except BaseException:
            self.stats.was_cancelled()
            raise
        self.stats.succeeded(
            latency,
            completions=len(completions),
            prompt_tokens=next(
                (c.prompt_tokens for c in completions if c.prompt_tokens is not None), 0
            ),
            completion_tokens=sum(c.completion_tokens or 0 for c in completions),
        )
        return completions

    def _on_retry(self, event: RetryEvent) -> None:
        self.stats.retrying_after(event.error)
        log.debug(
            "member %s: attempt %d failed (%s); retry in %.2fs",
            self.name,
            event.attempt,
            type(event.error).__name__,
            event.wait_s,
        )

    async def _attempt(self, request: GenerationRequest) -> tuple[list[Completion], float]:
        """One try: admission, then the backend call; returns it with its latency."""
        async with self.limiter.slot():
            estimate = estimate_tokens(request)
            if self.rpm is not None:
                await self.rpm.acquire(1)
            if self.tpm is not None:
                await self.tpm.acquire(estimate)
            global_slot: AbstractAsyncContextManager[Any] = (
                self.global_limit.slot() if self.global_limit is not None else nullcontext()
            )
            async with global_slot:
                started = self._clock()
                async with attempt_timeout(self.timeout_s, backend=self.name):
                    completions = await self.backend.generate(request)
                latency = self._clock() - started
        if self.tpm is not None:
            correction = used_tokens(request, completions) - estimate
            if correction > 0:
                self.tpm.charge(correction)
            elif correction < 0:
                self.tpm.refund(-correction)
        return completions, latency

    def snapshot(self) -> dict[str, Any]:
        """Stats plus the live admission state, JSON-ready (with ``cache_hits`` and
        ``cache_misses`` when the backend is a response cache wrapper)."""
        snap = self.stats.snapshot()
        snap["breaker"] = str(self.breaker.state)
        snap["limit"] = self.limiter.limit
        snap["waiting"] = self.limiter.waiting
        snap["weight"] = self.weight
        hits = getattr(self.backend, "cache_hits", None)
        if isinstance(hits, int):  # a CachedBackend: calls answered without the model
            snap["cache_hits"] = hits
            snap["cache_misses"] = int(getattr(self.backend, "cache_misses", 0))
        return snap

    async def aclose(self) -> None:
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


def _bucket(rate: float | TokenBucket | None) -> TokenBucket | None:
    if rate is None or isinstance(rate, TokenBucket):
        return rate
    return TokenBucket(rate)
