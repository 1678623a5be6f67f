"""Kind ``ray``: one model hosted by a pool of Ray actors, used as one ensemble member.

``RayBackend(model, replicas=2, num_cpus=1, num_gpus=0, **options)`` starts ``replicas``
actors, each holding its own copy of a backend of ``hosted_kind`` (``transformers`` by
default, so ``options`` are the transformers backend's: ``gguf_file``, ``device``,
``max_batch_size``, ``threads`` ...).  Requests go to the actor with the least outstanding
work (requested tokens in flight); inside an actor the local model micro-batches them.
Replicas are spread over the cluster's nodes (``spread=False`` packs them).

Generation requests picked for the same actor in the same event-loop tick (or within
``batch_window_s``), up to ``max_batch``, travel as one actor call
(:class:`~ensemble_async.ray.coalesce.Coalescer`): Ray's fixed cost per call is paid once
per batch.  Each request keeps its own outcome, error and cancellation.

It is a Backend like any other, so the member around it brings admission, retries and the
circuit breaker.  A dead actor (process killed, node lost) is restarted by Ray
(``max_restarts``); the requests it had in flight fail with ``ConnectError``, which is
retryable, so the member's retry policy sends them again (to a live actor) and nothing is
lost.  Errors raised by the hosted backend come back as themselves.

Ray is started on first use when it is not running (``address=None``: a local cluster;
``"auto"`` or ``"ray://..."``: an existing one).  Starting actors and talking to the Ray
core run off the event loop where they can block.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import functools
import threading
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

import ray
import ray.exceptions

from ..backend import BaseBackend
from ..errors import BackendError, ConnectError, ServerError
from ..scoring import CompletionScore, ScoreRequest
from ..types import BackendInfo, Completion, GenerationRequest, Health
from .coalesce import Coalescer, Send
from .host import BackendHost, renamed

__all__ = ["RayBackend", "ensure_ray"]


_INIT = threading.Lock()
CLOSE_TIMEOUT_S = 10.0
"""How long ``aclose`` lets each actor close its hosted backend before killing it."""


def ensure_ray(address: str | None = None, **init_options: Any) -> None:
    """Connect to (or start) Ray unless this process already did.  Blocking; safe to call
    from several threads at once (backends start their actors off the event loop, and
    two racing ``ray.init`` calls would start two local clusters)."""
    with _INIT:
        if not ray.is_initialized():
            ray.init(address=address, ignore_reinit_error=True, **init_options)


@dataclass
class _Replica:
    index: int
    actor: Any
    outstanding: int = 0
    """Requested tokens in flight (max_new_tokens x n per request)."""
    served: int = 0
    """Generation and scoring requests answered or failed."""
    queue: Coalescer | None = None
    """Generation requests on their way to this actor, sent in batches."""


class RayBackend(BaseBackend):
    """A model hosted by ``replicas`` Ray actors (see the module docstring)."""

    kind = "ray"
    requires: ClassVar[tuple[str, ...]] = ("model",)

    def __init__(
        self,
        model: str | None = None,
        *,
        replicas: int = 1,
        num_cpus: float = 1.0,
        num_gpus: float = 0.0,
        address: str | None = None,
        hosted_kind: str = "transformers",
        max_restarts: int = 8,
        spread: bool = True,
        batch_window_s: float = 0.0,
        max_batch: int = 64,
        name: str | None = None,
        **options: Any,
    ) -> None:
        if batch_window_s < 0:
            raise ValueError(f"batch_window_s must be >= 0, got {batch_window_s}")
        if max_batch < 1:
            raise ValueError(f"max_batch must be >= 1, got {max_batch}")
        if replicas < 1:
            raise ValueError(f"replicas must be >= 1, got {replicas}")
        if num_cpus < 0 or num_gpus < 0:
            raise ValueError("num_cpus and num_gpus must be >= 0")
        if max_restarts < 0:
            raise ValueError(f"max_restarts must be >= 0, got {max_restarts}")
        hosted: dict[str, Any] = dict(options)
        if model is not None:
            hosted["model"] = model
        label = model.rstrip("/").rsplit("/", 1)[-1] if model else hosted_kind
        super().__init__(name=name or f"ray:{label}")
        self.model = model
        self.replicas = replicas
        self.num_cpus = num_cpus
        self.num_gpus = num_gpus
        self.address = address
        self.hosted_kind = hosted_kind
        self.max_restarts = max_restarts
        self.spread = spread
        self.batch_window_s = batch_window_s
        self.max_batch = max_batch
        self._hosted_options: Mapping[str, Any] = hosted
        self._pool: list[_Replica] = []
        self._lock = asyncio.Lock()
        self._closed = False

    # -- the pool ----------------------------------------------------------------------

    def _spawn(self) -> list[_Replica]:
        ensure_ray(self.address)
        actor_class = ray.remote(BackendHost).options(
            num_cpus=self.num_cpus,
            num_gpus=self.num_gpus,
            max_restarts=self.max_restarts,
            max_task_retries=0,  # the member retries, and knows whether it may
            max_concurrency=1000,
            # SPREAD puts replicas on different nodes where it can (one node down then
            # takes one replica, not all); DEFAULT packs them.
            scheduling_strategy="SPREAD" if self.spread else "DEFAULT",
        )
        pool = [
            _Replica(i, actor_class.remote(self.hosted_kind, self._hosted_options))
            for i in range(self.replicas)
        ]
        for replica in pool:
            replica.queue = Coalescer(
                self._sender(replica),
                replica.actor.cancel.remote,  # fire and forget
                lost=functools.partial(self._lost, replica),
                window_s=self.batch_window_s,
                max_batch=self.max_batch,
            )
        return pool

    def _sender(self, replica: _Replica) -> Send:
        async def send(
            batch: list[tuple[int, GenerationRequest]],
        ) -> AsyncIterator[tuple[int, Any]]:
            # One actor call, one result object: Ray's cost per call is paid once.
            # (Streaming each outcome back as it is ready cost 3x the CPU per request.)
            try:
                got = await self._call(replica, "generate_many", batch)
            except BackendError:
                return  # the requests it held are lost: ConnectError, retried
            for (key, _), outcome in zip(batch, got, strict=True):
                yield key, outcome

        return send

    def _lost(self, replica: _Replica) -> ConnectError:
        return ConnectError(
            f"actor {replica.index} of {self.name!r} is unavailable or closed; Ray restarts it",
            backend=self.name,
        )

    async def _replicas(self) -> list[_Replica]:
        if self._closed:
            raise ConnectError(f"ray backend {self.name!r} is closed", backend=self.name)
        if not self._pool:
            async with self._lock:
                if not self._pool:
                    self._pool = await asyncio.to_thread(self._spawn)
        return self._pool

    def _pick(self, pool: list[_Replica]) -> _Replica:
        return min(pool, key=lambda r: (r.outstanding, r.served, r.index))

    async def _call(self, replica: _Replica, method: str, *args: Any, work: int = 0) -> Any:
        replica.outstanding += work
        ref = getattr(replica.actor, method).remote(*args)
        try:
            return await ref
        except asyncio.CancelledError:
            ray.cancel(ref)
            raise
        except ray.exceptions.RayTaskError as exc:
            cause = exc.cause
            if isinstance(cause, BackendError):
                raise cause from None
            raise ServerError(
                f"actor {replica.index} of {self.name!r} failed: {type(cause).__name__}",
                backend=self.name,
            ) from None
        except ray.exceptions.RayError as exc:  # actor died or is restarting, node lost
            raise ConnectError(
                f"actor {replica.index} of {self.name!r} is unavailable "
                f"({type(exc).__name__}); Ray restarts it",
                backend=self.name,
            ) from None
        finally:
            replica.outstanding -= work
            if work:
                replica.served += 1

    # -- the Backend protocol ----------------------------------------------------------

    async def start(self) -> None:
        """Start the actors now (otherwise on the first request)."""
        await self._replicas()

    async def generate(self, request: GenerationRequest) -> list[Completion]:
        pool = await self._replicas()
        replica = self._pick(pool)
        assert replica.queue is not None
        work = request.max_new_tokens * request.n
        replica.outstanding += work
        try:
            got: list[Completion] = await replica.queue.submit(request)
        finally:
            replica.outstanding -= work
            replica.served += 1
        return [renamed(c, self.name) for c in got]

    async def score(self, request: ScoreRequest) -> list[CompletionScore]:
        pool = await self._replicas()
        replica = self._pick(pool)
        got: list[CompletionScore] = await self._call(
            replica, "score", request, work=len(request.completions)
        )
        return [dataclasses.replace(s, backend=self.name) for s in got]

    async def check_scoring(self) -> None:
        pool = await self._replicas()
        await self._call(pool[0], "check_scoring")

    async def info(self) -> BackendInfo:
        pool = await self._replicas()
        hosted: BackendInfo = await self._call(pool[0], "info")
        per_actor = hosted.max_concurrency
        return BackendInfo(
            name=self.name,
            # The hosted kind: what serves the model (and keys the response cache, so a
            # run moved onto the cluster replays the same entries).
            kind=hosted.kind,
            model=hosted.model,
            max_concurrency=None if per_actor is None else per_actor * len(pool),
            max_batch_size=hosted.max_batch_size,
            max_stop_sequences=hosted.max_stop_sequences,
            max_input_tokens=hosted.max_input_tokens,
            max_total_tokens=hosted.max_total_tokens,
            supports_n=hosted.supports_n,
            extra={**hosted.extra, "replicas": len(pool), "hosted_kind": self.hosted_kind},
        )

    async def health(self) -> Health:
        pool = await self._replicas()
        checks = await asyncio.gather(
            *(self._call(r, "health") for r in pool), return_exceptions=True
        )
        ok = [c for c in checks if isinstance(c, Health) and c.ok]
        latency = max((c.latency_s for c in ok), default=0.0)
        return Health(
            ok=bool(ok), latency_s=latency, detail=f"{len(ok)}/{len(pool)} actors healthy"
        )

    def served(self) -> list[int]:
        """Requests answered (or failed) per actor, in actor order."""
        return [r.served for r in self._pool]

    def batches(self) -> int:
        """Actor calls that carried generation requests so far (each carries one or more)."""
        return sum(r.queue.batches for r in self._pool if r.queue is not None)

    async def actor_pids(self) -> list[int]:
        """The process id of each actor (for tests and diagnostics)."""
        pool = await self._replicas()
        return [await self._call(r, "pid") for r in pool]

    async def actor_loads(self) -> list[tuple[int, int]]:
        """(actor calls, requests) each actor answered in batches, in actor order."""
        pool = await self._replicas()
        return [await self._call(r, "load") for r in pool]

    async def aclose(self) -> None:
        if self._closed:
            return
        self._closed = True
        pool, self._pool = self._pool, []
        for replica in pool:
            if replica.queue is not None:
                await replica.queue.aclose()
        for replica in pool:
            # Bounded: an actor the cluster never found room for would not answer.
            with contextlib.suppress(BackendError, TimeoutError):
                await asyncio.wait_for(self._call(replica, "close"), CLOSE_TIMEOUT_S)
        await asyncio.to_thread(_kill_all, [r.actor for r in pool])


def _kill_all(actors: list[Any]) -> None:
    for actor in actors:
        ray.kill(actor, no_restart=True)
