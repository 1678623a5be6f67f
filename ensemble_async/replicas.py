"""One model served by several servers: a Backend that spreads requests over replicas.

:class:`ReplicaSet` wraps one backend per replica (usually one per URL, built by
``create_backend(kind, urls=[...])``) and is itself one Backend: one ensemble member, one
candidate per item, one name in provenance. Each completion names the replica that wrote
it in ``Completion.replica``; ``Completion.backend`` stays the set's name.

This layer sits between the member's scheduling (admission, retries, breaker) and the
protocol adapters. It only chooses a replica and keeps each replica's health; it never
retries (nothing retries twice): a failed request raises the replica's own error, and
the member's retry calls ``generate`` again, which then lands on another replica.

The rules:

* **Choice.** Power of two choices: two replicas drawn at random from those eligible,
  the one with the lower cost ``(outstanding + 1) * latency`` wins, where ``latency`` is
  an exponentially weighted moving average of the replica's recent successful calls. So
  load spreads evenly across equal replicas and a slow replica gets proportionally fewer
  requests.
* **Eligible.** In service, below its own concurrency limit (``max_concurrency`` from the
  replica's ``info()``, read by :meth:`ReplicaSet.info`, which the member calls at start,
  and again whenever a replica comes back into service), and not failed within the last
  ``avoid_s`` seconds when another one is available (so a member's retry goes to another
  replica). When every replica in service is at its limit, the request waits for a free
  slot.
* **Ejection.** A replica whose call fails with a connection error, a server error (5xx)
  or a timeout is taken out of service for a backoff (``eject_s``, doubling up to
  ``eject_max_s`` while it keeps failing). When the backoff ends, exactly one request is
  let through as a probe (or :meth:`ReplicaSet.health` finds it healthy): success puts
  it back in service, failure ejects it again for twice as long. Overload answers (429,
  503) and bad requests never eject: they are about load or the request, not health.
* **All out.** When every replica is out of service and no backoff has ended, the call
  fails at once with the class of the latest failure that ejected a replica (a
  ``ConnectError`` when the servers refuse connections), as a single server's would;
  but never as a timeout (a ``ConnectError`` then): nothing was sent, and a timeout
  would tell the member's adaptive limit that the server is overloaded.
* **Timeouts.** The adapter's own timeout (``RequestTimeoutError``) ejects. A call the
  member cancels (its attempt timeout, or a straggler the ensemble no longer needs)
  ejects nothing, but when it ran longer than the replica's average it raises that
  average, so a replica that hangs gets ever fewer requests.
* **Prefix affinity** (``affinity_chars > 0``, off by default): requests whose prompts
  share their first ``affinity_chars`` characters (the few-shot demos) prefer the same
  replica, so its prefix cache is reused, unless that replica is not eligible or has more
  than ``affinity_slack`` times the outstanding requests of the least loaded one (then
  the power of two choices decides).
"""

from __future__ import annotations

import asyncio
import dataclasses
import inspect
import random
import time
import zlib
from collections.abc import AsyncIterator, Callable, Sequence
from typing import Any
from urllib.parse import urlsplit

from .backend import Backend, BaseBackend, health_of, info_of, stream_of
from .errors import (
    BackendError,
    ConnectError,
    RequestTimeoutError,
    ServerError,
)
from .types import BackendInfo, Completion, GenerationRequest, Health, StreamEvent

__all__ = ["Replica", "ReplicaSet", "replica_label"]

# Failures that say the replica (not the request, not the load) is sick.
_EJECTING: tuple[type[BackendError], ...] = (ConnectError, ServerError, RequestTimeoutError)


def replica_label(url: str) -> str:
    """``host:port`` of a URL (the name a replica goes by in completions and stats)."""
    parts = urlsplit(url)
    if parts.hostname is None:
        return url
    default = 443 if parts.scheme == "https" else 80
    return f"{parts.hostname}:{parts.port or default}"


@dataclasses.dataclass(eq=False)
class Replica:
    """One replica's backend and live state (read-only to callers)."""

    backend: Backend
    label: str
    limit: int | None = None
    """Most requests at once (the server's ``max_concurrency``), once known."""
    outstanding: int = 0
    latency_s: float | None = None
    """EWMA of successful calls' latency."""
    requests: int = 0
    failures: int = 0
    in_service: bool = True
    probing: bool = False
    out_until: float = 0.0
    backoff_s: float = 0.0
    avoid_until: float = 0.0

    def snapshot(self) -> dict[str, Any]:
        return {
            "replica": self.label,
            "in_service": self.in_service,
            "outstanding": self.outstanding,
            "requests": self.requests,
            "failures": self.failures,
            "latency_s": self.latency_s,
            "limit": self.limit,
        }


class ReplicaSet(BaseBackend):
    """Several replicas of one model as one Backend (see the module docstring).

    ``backends``: one per replica; ``labels``: their names (default: each backend's name).
    ``ewma_alpha``: weight of the newest latency in the moving average. ``rng``: the
    random source of the power of two choices (seed it for reproducible tests).
    """

    kind = "replicas"

    def __init__(
        self,
        backends: Sequence[Backend],
        *,
        name: str | None = None,
        labels: Sequence[str] | None = None,
        affinity_chars: int = 0,
        affinity_slack: float = 2.0,
        eject_s: float = 1.0,
        eject_max_s: float = 30.0,
        avoid_s: float = 1.0,
        ewma_alpha: float = 0.2,
        owned: Sequence[Any] = (),
        rng: random.Random | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        super().__init__(name=name)
        if not backends:
            raise ValueError("a replica set needs at least one backend")
        if labels is not None and len(labels) != len(backends):
            raise ValueError(f"{len(labels)} labels for {len(backends)} replicas")
        if affinity_chars < 0 or affinity_slack < 1.0:
            raise ValueError("affinity_chars must be >= 0 and affinity_slack >= 1")
        if not 0.0 < ewma_alpha <= 1.0:
            raise ValueError(f"ewma_alpha must be in (0, 1], got {ewma_alpha}")
        names = labels if labels is not None else [b.name for b in backends]
        self.replicas = [Replica(b, label) for b, label in zip(backends, names, strict=True)]
        self.affinity_chars = affinity_chars
        self.affinity_slack = affinity_slack
        self.eject_s = eject_s
        self.eject_max_s = eject_max_s
        self.avoid_s = avoid_s
        self.ewma_alpha = ewma_alpha
        self._owned = list(owned)
        self._rng = rng or random.Random()
        self._clock = clock
        self._waiters: list[asyncio.Future[None]] = []
        self._last_error: BackendError | None = None
        self._info: BackendInfo | None = None
        self._out = 0  # replicas out of service
        self._next_probe_at = float("inf")
        self._set_latency: float | None = None  # EWMA over all replicas
        self._relearning: set[asyncio.Task[None]] = set()  # limits read again

    # -- construction ---------------------------------------------------------------------

    @classmethod
    def from_urls(
        cls,
        factory: Callable[..., Backend],
        urls: Sequence[str],
        *,
        name: str | None = None,
        kind: str | None = None,
        affinity_chars: int = 0,
        affinity_slack: float = 2.0,
        eject_s: float = 1.0,
        eject_max_s: float = 30.0,
        avoid_s: float = 1.0,
        **options: Any,
    ) -> ReplicaSet:
        """One backend per URL from ``factory(url=..., name=..., **options)``.

        HTTP adapters (those whose factory takes ``session``) share one pooled session,
        owned and closed by the set, unless ``options`` passes one.
        """
        if "url" in options:
            raise ValueError("give url (one server) or urls (replicas), not both")
        if not urls:
            raise ValueError("urls must name at least one replica")
        if len(set(urls)) != len(urls):
            raise ValueError("urls must not repeat a replica")
        owned: list[Any] = []
        if "session" not in options and _takes(factory, "session"):
            from .http import new_session  # aiohttp only when an HTTP adapter needs it

            session = new_session()
            owned.append(session)
            options = {**options, "session": session}
        set_name = name or kind or "replicas"
        labels = [replica_label(url) for url in urls]
        backends = [
            factory(url=url, name=f"{set_name}@{label}", **options)
            for url, label in zip(urls, labels, strict=True)
        ]
        return cls(
            backends,
            name=set_name,
            labels=labels,
            affinity_chars=affinity_chars,
            affinity_slack=affinity_slack,
            eject_s=eject_s,
            eject_max_s=eject_max_s,
            avoid_s=avoid_s,
            owned=owned,
        )

    # -- choosing a replica ---------------------------------------------------------------

    def _pick(self, request: GenerationRequest) -> Replica | None:
        """The replica for this request, or None when all in service are at their limit.

        Raises the latest failure's class when no replica is in service.
        """
        now = self._clock()
        if self._out and now >= self._next_probe_at:
            probe = self._due_probe(now)
            if probe is not None:
                probe.probing = True  # exactly one request goes through as the probe
                self._refresh_out()
                return probe
        replicas = self.replicas
        n = len(replicas)
        if n > 1 and not self.affinity_chars:
            # The common case in O(1): two distinct replicas at random, both eligible.
            rnd = self._rng.random
            i = int(rnd() * n)
            j = int(rnd() * (n - 1))
            j += j >= i
            a, b = replicas[i], replicas[j]
            if _eligible(a, now) and _eligible(b, now):
                return a if self._cost(a) <= self._cost(b) else b
        eligible: list[Replica] = []
        avoided: list[Replica] = []
        any_in_service = False
        for r in replicas:
            if not r.in_service:
                continue
            any_in_service = True
            if r.limit is not None and r.outstanding >= r.limit:
                continue
            (avoided if r.avoid_until > now else eligible).append(r)
        if not eligible:
            eligible = avoided
        if not eligible:
            if any_in_service:
                return None  # all full: wait for a slot
            raise self._all_out()
        if self.affinity_chars:
            preferred = self._preferred(request, eligible)
            if preferred is not None:
                return preferred
        return self._p2c(eligible)

    def _due_probe(self, now: float) -> Replica | None:
        for r in self.replicas:
            if not r.in_service and not r.probing and now >= r.out_until:
                return r
        return None

    def _refresh_out(self) -> None:
        """Recount the replicas out of service and when the next probe is due."""
        waiting = [r.out_until for r in self.replicas if not r.in_service and not r.probing]
        self._out = sum(not r.in_service for r in self.replicas)
        self._next_probe_at = min(waiting, default=float("inf"))

    def _p2c(self, eligible: list[Replica]) -> Replica:
        if len(eligible) == 1:
            return eligible[0]
        a, b = self._rng.sample(eligible, 2)
        return a if self._cost(a) <= self._cost(b) else b

    def _cost(self, r: Replica) -> float:
        latency = r.latency_s
        if latency is None:
            # No sample yet: half the fastest replica's, so an untried replica is tried
            # soon (the set's average could leave it unpicked behind a fast one for
            # good), while its outstanding requests still count against it.  Only
            # computed while some replica is untried.
            known = [x.latency_s for x in self.replicas if x.latency_s is not None]
            latency = 0.5 * min(known) if known else 1.0
        return (r.outstanding + 1) * latency

    def _preferred(self, request: GenerationRequest, eligible: list[Replica]) -> Replica | None:
        if request.prompt is not None:
            text = request.prompt
        else:
            text = "\n".join(f"{m.role}: {m.content}" for m in request.messages or ())
        prefix = text[: self.affinity_chars].encode("utf-8", "surrogatepass")
        home = self.replicas[zlib.crc32(prefix) % len(self.replicas)]
        if home not in eligible:
            return None
        least = min(r.outstanding for r in eligible)
        if home.outstanding <= self.affinity_slack * least + 1:
            return home
        return None

    def _all_out(self) -> BackendError:
        last = self._last_error
        # Nothing was sent, so nothing timed out: a timeout's class would tell the
        # member's adaptive limit "overloaded" on every instant failure.
        cls: type[BackendError] = (
            ConnectError if last is None or isinstance(last, RequestTimeoutError) else type(last)
        )
        detail = f"; last: {last}" if last is not None else ""
        message = f"all {len(self.replicas)} replicas are out of service{detail}"
        try:
            return cls(message, backend=self.name)
        except TypeError:  # pragma: no cover - a subclass with another signature
            return ConnectError(message, backend=self.name)

    async def _acquire(self, request: GenerationRequest) -> Replica:
        while True:
            replica = self._pick(request)
            if replica is not None:
                return self._take(replica)
            waiter = asyncio.get_running_loop().create_future()
            self._waiters.append(waiter)
            try:
                await waiter
            except BaseException:
                if waiter.done() and not waiter.cancelled():
                    # Woken for a free slot, then cancelled before it could take it:
                    # pass the turn on, or the next waiter may never be woken.
                    self._wake(everyone=False)
                raise
            finally:
                if waiter in self._waiters:
                    self._waiters.remove(waiter)

    def _release(self, replica: Replica, started: float, error: BaseException | None) -> None:
        replica.outstanding -= 1
        probe = replica.probing
        now = self._clock()
        if error is None:
            elapsed = now - started
            old = replica.latency_s
            replica.latency_s = elapsed if old is None else old + self.ewma_alpha * (elapsed - old)
            whole = self._set_latency
            self._set_latency = elapsed if whole is None else whole + 0.05 * (elapsed - whole)
            # Only the probe brings a replica back: a late success of a call sent before
            # the ejection says little about the server now.
            if replica.probing:
                self._back(replica)
        elif isinstance(error, BackendError) and error.retryable:
            replica.failures += 1
            replica.avoid_until = now + self.avoid_s
            if isinstance(error, _EJECTING):
                self._last_error = error
                self._eject(replica, now)
            elif replica.probing:  # an overloaded probe: the server is up, let it back
                self._back(replica)
        else:
            if not isinstance(error, BackendError):
                # Cancelled (a straggler the ensemble no longer needs, or the member's
                # attempt timeout): a call that ran longer than the replica's average
                # still tells that it is at least that slow.
                elapsed = now - started
                old = replica.latency_s
                if old is not None and elapsed > old:
                    replica.latency_s = old + self.ewma_alpha * (elapsed - old)
            if replica.probing:
                # A cancelled probe proved nothing; a fatal answer (4xx) proved the
                # server up. Let the next request decide, or put it back.
                replica.probing = False
                if isinstance(error, BackendError):
                    self._back(replica)
                else:
                    self._refresh_out()
        self._wake(everyone=probe or error is not None)

    def _wake(self, *, everyone: bool) -> None:
        """Wake one request waiting for a slot, or all of them (after a failure or a
        probe the replicas in service may have changed, and each must look again)."""
        while self._waiters:
            waiter = self._waiters.pop(0)
            if not waiter.done():
                waiter.set_result(None)
                if not everyone:
                    break

    def _back(self, replica: Replica) -> None:
        """Put ``replica`` back in service.  Once the set's facts have been read, its
        limit is read again in the background: it may have restarted with another
        one, or have been down when they were read (its limit then unknown)."""
        replica.in_service, replica.probing, replica.backoff_s = True, False, 0.0
        self._refresh_out()
        if self._info is not None:
            task = asyncio.get_running_loop().create_task(self._relearn(replica))
            self._relearning.add(task)
            task.add_done_callback(self._relearning.discard)

    async def _relearn(self, replica: Replica) -> None:
        try:
            info = await info_of(replica.backend)
        except Exception:  # it keeps the limit it had; its calls will tell the rest
            return
        replica.limit = info.max_concurrency
        self._wake(everyone=True)  # a larger limit has room for waiting requests

    def _eject(self, replica: Replica, now: float) -> None:
        if replica.in_service or replica.probing:
            replica.backoff_s = min(
                self.eject_max_s, replica.backoff_s * 2 if replica.backoff_s else self.eject_s
            )
        replica.in_service = False
        replica.probing = False
        replica.out_until = now + replica.backoff_s
        self._refresh_out()

    # -- the Backend protocol -------------------------------------------------------------

    def _take(self, replica: Replica) -> Replica:
        replica.outstanding += 1
        replica.requests += 1
        return replica

    async def generate(self, request: GenerationRequest) -> list[Completion]:
        # The common case (a replica is free) without the extra coroutine of _acquire.
        picked = self._pick(request)
        replica = self._take(picked) if picked is not None else await self._acquire(request)
        started = self._clock()
        try:
            completions = await replica.backend.generate(request)
        except BaseException as exc:
            self._release(replica, started, exc)
            raise
        self._release(replica, started, None)
        return [self._mark(c, replica) for c in completions]

    async def stream(self, request: GenerationRequest) -> AsyncIterator[StreamEvent]:
        replica = await self._acquire(request)
        started = self._clock()
        error: BaseException | None = None
        try:
            async for event in stream_of(replica.backend, request):
                yield self._mark(event, replica) if isinstance(event, Completion) else event
        except BaseException as exc:
            error = exc
            raise
        finally:
            self._release(replica, started, error)

    def _mark(self, c: Completion, replica: Replica) -> Completion:
        # Built field by field: ``dataclasses.replace`` costs several times more, once
        # per request (bench/fleet.py).
        return Completion(
            c.text,
            c.finish_reason,
            self.name,
            c.latency_s,
            c.prompt_tokens,
            c.completion_tokens,
            c.model,
            c.index,
            replica.label,
        )

    async def health(self) -> Health:
        """Healthy while at least one replica is; a healthy replica out of service is back."""
        started = self._clock()
        results = await asyncio.gather(
            *(health_of(r.backend) for r in self.replicas), return_exceptions=True
        )
        healthy = 0
        back = False
        try:
            for r, result in zip(self.replicas, results, strict=True):
                if isinstance(result, Health) and result.ok:
                    healthy += 1
                    if not r.in_service and not r.probing:
                        self._back(r)
                        back = True
                elif isinstance(result, BaseException) and not isinstance(result, Exception):
                    raise result  # cancellation and the like
        finally:
            if back:
                self._wake(everyone=True)  # its slots are free: every waiter looks again
        detail = f"{healthy}/{len(self.replicas)} replicas healthy"
        return Health(ok=healthy > 0, latency_s=self._clock() - started, detail=detail)

    async def info(self) -> BackendInfo:
        """The replicas' facts; each replica's ``max_concurrency`` becomes its limit, and
        the set's is their sum (the member's admission bound)."""
        results = await asyncio.gather(
            *(info_of(r.backend) for r in self.replicas), return_exceptions=True
        )
        infos: list[BackendInfo] = []
        for r, result in zip(self.replicas, results, strict=True):
            if isinstance(result, BackendInfo):
                infos.append(result)
                r.limit = result.max_concurrency
            elif not isinstance(result, Exception):
                raise result
        if not infos:
            first = next(x for x in results if isinstance(x, BaseException))
            raise first
        limits = [r.limit for r in self.replicas]
        total = sum(x for x in limits if x) if all(limits) else None
        base = infos[0]
        self._info = dataclasses.replace(
            base,
            name=self.name,
            max_concurrency=total,
            extra={**base.extra, "replicas": [r.label for r in self.replicas]},
        )
        return self._info

    def snapshot(self) -> list[dict[str, Any]]:
        """Each replica's state, JSON-ready."""
        return [r.snapshot() for r in self.replicas]

    async def aclose(self) -> None:
        try:
            await asyncio.gather(*(r.backend.aclose() for r in self.replicas))
        finally:
            for resource in self._owned:
                await resource.close()
            self._owned.clear()
            for waiter in self._waiters:
                waiter.cancel()
            for task in list(self._relearning):
                task.cancel()


def _eligible(r: Replica, now: float) -> bool:
    return r.in_service and (r.limit is None or r.outstanding < r.limit) and r.avoid_until <= now


def _takes(factory: Callable[..., Any], option: str) -> bool:
    try:
        params = inspect.signature(factory).parameters
    except (TypeError, ValueError):  # pragma: no cover - builtins without a signature
        return False
    return option in params
