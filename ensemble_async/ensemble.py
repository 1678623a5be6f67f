"""The ensemble: one item fanned out to every member, candidates streaming into an
incremental consensus selector, stragglers cancelled once the decision is final.

    async with Ensemble([tgi, vllm, local]) as ens:
        result = await ens.run("Name three prime numbers.")
        async for result in ens.map(prompts):          # results stream as items finish
            print(result.key, result.kept, result.text)  # key: the prompt

Admission, retries and the circuit breaker live in ``Member``; consensus lives in
``consensus``; this module only orchestrates.  ``map`` reads its input lazily: at most
``max_items_in_flight`` items are running or waiting to be taken by the consumer, so
memory does not grow with the input.
"""

from __future__ import annotations

import asyncio
import itertools
import time
from collections.abc import AsyncIterable, AsyncIterator, Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any, Literal, Self, TypeAlias

from .admission import GlobalLimit
from .backend import Backend
from .breaker import CircuitOpenError
from .consensus import Decision, IncrementalSelector, Policy, Similarity
from .errors import BackendError, FatalError, RetryableError, cannot_serve
from .member import Member
from .retry import RetryPolicy
from .scoring import CompletionScore, ScoreRequest
from .selection import FitChoice, SelectionConfig, choose
from .types import Completion, GenerationRequest

__all__ = ["Candidate", "Decide", "Ensemble", "EnsembleResult", "Item", "unavailable"]

Item: TypeAlias = str | GenerationRequest | Sequence[GenerationRequest]
"""A prompt, one request for every member, or one request per member (in member order)."""
Decide: TypeAlias = Callable[[IncrementalSelector], Awaitable[Decision]]
"""Computes ``selector.finalize()`` somewhere else (see ``Ensemble(decide=...)``)."""

CandidateStatus = Literal["ok", "given", "failed", "unavailable", "circuit_open", "cancelled"]
"""``failed``: the request failed for its own reason (a ``FatalError``: bad request,
context too long); ``unavailable``: the member could not answer (retries spent on
timeouts, refused connections, 5xx, 429; credentials refused; model not found);
``circuit_open``: its breaker refused; ``cancelled``: not needed any more (decided
without it, or past the deadline)."""


def unavailable(exc: BaseException) -> bool:
    """Whether an error says the member is unavailable (its breaker is open, or
    ``errors.cannot_serve``: it decides nothing) rather than that the request itself is
    bad."""
    return isinstance(exc, CircuitOpenError) or cannot_serve(exc)


@dataclass(frozen=True)
class Candidate:
    """One member's contribution to an item (or a candidate given by the caller)."""

    index: int
    source: str
    status: CandidateStatus
    completion: Completion | None = None
    text: str | None = None
    error: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "index": self.index,
            "source": self.source,
            "status": self.status,
            "text": self.text,
            "error": self.error,
            "finish_reason": None if self.completion is None else self.completion.finish_reason,
            "latency_s": None if self.completion is None else self.completion.latency_s,
            "completion_tokens": None
            if self.completion is None
            else self.completion.completion_tokens,
        }


@dataclass(frozen=True)
class EnsembleResult:
    """What the ensemble decided for one item, with full provenance.

    ``index``: the item's position (in ``map``'s input, or as given to ``run``);
    ``key``: the input item itself, or what ``map(..., key=)`` made of it.
    ``min_candidates``: the answered candidates the decision needed (arrived, or failed
    for their own reason).
    """

    index: int
    candidates: tuple[Candidate, ...]
    decision: Decision
    wall_s: float
    key: Any = None
    min_candidates: int = 1
    meta: dict[str, Any] = field(default_factory=dict)
    choice: FitChoice | None = None
    """The selection policy's pick when one other than plain consensus is configured
    (then ``kept``/``text``/``rule``/``winner`` follow it, not ``decision``)."""

    @property
    def kept(self) -> bool:
        if self.choice is not None:
            return self.choice.kept
        return self.decision.index is not None

    @property
    def text(self) -> str | None:
        if self.choice is not None:
            return self.choice.text
        return self.decision.text

    @property
    def rule(self) -> str:
        if self.choice is not None:
            return self.choice.rule
        return self.decision.selection.rule

    @property
    def winner(self) -> Candidate | None:
        i = self.decision.index if self.choice is None else self.choice.index
        return None if i is None else self.candidates[i]

    @property
    def deferred(self) -> bool:
        """Not decided because too few members were available (``too-few-candidates``),
        or the target model could not be reached to score (``target-unavailable``):
        trying the item again later may succeed.  A request that failed for its own
        reason counts as answered, so it never defers an item."""
        return self.rule in ("too-few-candidates", "target-unavailable")

    def to_dict(self) -> dict[str, Any]:
        key = self.key if isinstance(self.key, str | int | float | bool) else None
        return {
            "index": self.index,
            **({"key": key} if key is not None else {}),
            "kept": self.kept,
            "deferred": self.deferred,
            "text": self.text,
            "winner": None if self.winner is None else self.winner.source,
            "decision": self.decision.to_dict(),
            "min_candidates": self.min_candidates,
            "candidates": [c.to_dict() for c in self.candidates],
            "wall_s": self.wall_s,
            **({"selection": self.choice.to_dict()} if self.choice is not None else {}),
            **({"meta": self.meta} if self.meta else {}),
        }


class Ensemble:
    """Members (``Member`` or bare ``Backend``, wrapped with defaults) as one generator.

    ``policy``: ``exact`` (early only when no straggler can change the outcome; always
    what waiting for everyone gives; under a target-fit selection every candidate is
    waited for, as any of them may be the target's pick), ``quorum`` (decide once
    ``quorum`` candidates agree at ``agreement`` similarity, cancel the rest) or
    ``deadline`` (decide with what has arrived after ``deadline_s``).  ``deadline_s``
    also bounds the other policies when set.
    ``min_candidates``: how many candidates (given ones included) must answer for an
    item to be decided; default: all of them.  A candidate answers by arriving or by
    failing for its own reason (a ``FatalError``: bad request, context too long), which
    is recorded as a failed candidate.  When unavailable members (retries spent, breaker
    open, cancelled at the deadline) leave fewer, the rule is ``"too-few-candidates"``:
    nothing is kept and ``EnsembleResult.deferred`` is true, so the caller can try the
    item later.  No policy decides early on fewer, so lower it to let
    ``exact``/``quorum`` cancel stragglers.
    ``global_concurrency`` and ``retry`` apply to the bare backends this wraps; for a
    ready ``Member`` they are an error (give them to ``Member(...)`` instead).
    ``selection``: the selection policy (default: plain consensus); the target-fit
    policies score the candidates under ``target`` (a ``Member``, a backend, or the name
    of one of ``members``), whose scoring requests go through its own cache, admission,
    retries and breaker; ``__aenter__`` checks that it can score.  An item whose scores
    cannot be had because the target is unavailable is deferred (``target-unavailable``).
    ``decide``: where an item's consensus decision is computed once all its candidates
    are in (default: here).  ``decide(selector)`` returns what ``selector.finalize()``
    returns, computed elsewhere (``generate --ray`` computes it on the cluster); early
    decisions of ``exact``/``quorum`` are still made here, as candidates arrive.
    """

    def __init__(
        self,
        members: Sequence[Member | Backend],
        *,
        policy: Policy = "exact",
        threshold: float = 0.01,
        similarity: Similarity | None = None,
        weights: Sequence[float] | None = None,
        quorum: int = 2,
        agreement: float = 1.0,
        deadline_s: float | None = None,
        min_candidates: int | None = None,
        global_concurrency: int | None = None,
        max_items_in_flight: int = 64,
        retry: RetryPolicy | None = None,
        selection: SelectionConfig | None = None,
        target: Member | Backend | str | None = None,
        decide: Decide | None = None,
    ) -> None:
        if not members:
            raise ValueError("an ensemble needs at least one member")
        if policy == "deadline" and deadline_s is None:
            raise ValueError("policy 'deadline' needs deadline_s")
        if max_items_in_flight < 1:
            raise ValueError("max_items_in_flight must be >= 1")
        if min_candidates is not None and min_candidates < 1:
            raise ValueError(f"min_candidates must be >= 1, got {min_candidates}")
        wrapping_options = [
            option
            for option, value in (("global_concurrency", global_concurrency), ("retry", retry))
            if value is not None
        ]
        ready = [m.name for m in members if isinstance(m, Member)]
        if wrapping_options and ready:
            raise ValueError(
                f"Ensemble({', '.join(wrapping_options)}=...) applies only to bare backends, "
                f"but member {ready[0]!r} is already a Member; give it to that Member instead"
            )
        self.global_limit = GlobalLimit(global_concurrency) if global_concurrency else None
        self.members: list[Member] = [
            m if isinstance(m, Member) else Member(m, retry=retry, global_limit=self.global_limit)
            for m in members
        ]
        _unique_names(self.members)
        self.policy: Policy = policy
        self.threshold = threshold
        self.similarity = similarity
        self.weights = None if weights is None else list(weights)
        self.quorum = quorum
        self.agreement = agreement
        self.deadline_s = deadline_s
        self.min_candidates = min_candidates
        self.max_items_in_flight = max_items_in_flight
        self.decide = decide
        self._next_index = 0
        self.selection = selection or SelectionConfig()
        self.target: Member | None = self._target(target)
        self._own_target = self.target is not None and self.target not in self.members

    def _target(self, target: Member | Backend | str | None) -> Member | None:
        if not self.selection.needs_scores:
            if target is not None:
                raise ValueError("a target model is only used by the target-fit policies")
            return None
        if target is None:
            target = self.selection.target
        if target is None:
            raise ValueError(f"selection policy {self.selection.policy!r} needs a target")
        if isinstance(target, str):
            named = [m for m in self.members if m.name == target]
            if not named:
                raise ValueError(
                    f"target {target!r} is not a member; pass the target Member or backend"
                )
            return named[0]
        return target if isinstance(target, Member) else Member(target)

    # -- lifecycle ----------------------------------------------------------------------

    async def __aenter__(self) -> Self:
        await asyncio.gather(*(m.start() for m in self.members))
        if self.target is not None:
            if self._own_target:
                await self.target.start()
            await self.target.check_scoring()  # a target that cannot score stops us here
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        owned = [self.target] if self.target is not None and self._own_target else []
        await asyncio.gather(*(m.aclose() for m in [*self.members, *owned]), return_exceptions=True)

    def stats(self) -> dict[str, dict[str, Any]]:
        """Per-member stats snapshots (JSON-ready)."""
        return {m.name: m.snapshot() for m in self.members}

    # -- one item -----------------------------------------------------------------------

    def _requests(self, item: Item) -> list[GenerationRequest]:
        if isinstance(item, str):
            return [GenerationRequest(prompt=item)] * len(self.members)
        if isinstance(item, GenerationRequest):
            return [item] * len(self.members)
        requests = list(item)
        if len(requests) != len(self.members):
            raise ValueError(
                f"got {len(requests)} requests for {len(self.members)} members; "
                "give one request, or one per member"
            )
        return requests

    async def run(
        self,
        item: Item,
        *,
        given: Sequence[tuple[str, str]] = (),
        item_index: int | None = None,
        key: Any = None,
        score_with: GenerationRequest | None = None,
    ) -> EnsembleResult:
        """Fan ``item`` out to every member and decide.

        ``given``: candidates that already exist, as ``(source, text)``, placed first in
        priority order (Ensemble-Instruct's step-2 output is candidate 0).  Each member
        contributes its first completion.  ``key``: carried to the result (default: the
        item itself).  ``score_with``: the request whose prompt conditions the target
        model's scores (default: the target's own request when it is a member, else the
        first member's).
        """
        requests = self._requests(item)
        if item_index is None:
            item_index = self._next_index
            self._next_index += 1
        first_member = len(given)
        total = first_member + len(self.members)
        needed = total if self.min_candidates is None else self.min_candidates
        if needed > total:
            raise ValueError(
                f"min_candidates={needed} but this item has only {total} candidates "
                f"({len(given)} given, {len(self.members)} members)"
            )
        selector = IncrementalSelector(
            total,
            policy=self.policy,
            threshold=self.threshold,
            similarity=self.similarity,
            weights=self.weights,
            quorum=self.quorum,
            agreement=self.agreement,
            min_candidates=needed,
            finalize_complete=self.decide is not None,
        )
        candidates: dict[int, Candidate] = {}
        started = time.perf_counter()
        for i, (source, text) in enumerate(given):
            candidates[i] = Candidate(i, source, "given", text=text)
            selector.add(i, text)

        loop = asyncio.get_running_loop()
        deadline = None if self.deadline_s is None else loop.time() + self.deadline_s
        candidate_of: dict[asyncio.Task[list[Completion]], int] = {}
        # Finished tasks are handed over by a done-callback and one future per wait,
        # which costs less per item than ``asyncio.wait`` (bench/overhead.py).
        finished: list[asyncio.Task[list[Completion]]] = []
        waiter: asyncio.Future[None] | None = None

        def arrived(task: asyncio.Task[list[Completion]]) -> None:
            finished.append(task)
            if waiter is not None and not waiter.done():
                waiter.set_result(None)

        for k, (member, request) in enumerate(zip(self.members, requests, strict=True)):
            task = loop.create_task(member.generate(request))
            candidate_of[task] = first_member + k
            task.add_done_callback(arrived)
        remaining = len(candidate_of)
        # A target-fit policy picks among every candidate, so an exact consensus made
        # early must not cut off a straggler the target could prefer: wait for them all.
        settled = self.policy != "exact" or not self.selection.needs_scores
        try:
            while remaining and not (settled and selector.done):
                if not finished:
                    waiter = loop.create_future()
                    timer = None if deadline is None else loop.call_at(deadline, _wake, waiter)
                    try:
                        await waiter
                    finally:
                        if timer is not None:
                            timer.cancel()
                    if not finished:  # the deadline passed
                        break
                batch = (
                    finished.copy()
                    if len(finished) == 1
                    else sorted(finished, key=candidate_of.__getitem__)
                )
                finished.clear()
                for task in batch:
                    remaining -= 1
                    i = candidate_of[task]
                    name = self.members[i - first_member].name
                    self._collect(task, i, name, candidates, selector)
        finally:
            pending = [t for t, i in candidate_of.items() if i not in candidates]
            for task in pending:
                task.cancel()
            if pending:
                await asyncio.gather(*pending, return_exceptions=True)
        for task in pending:
            i = candidate_of[task]
            name = self.members[i - first_member].name
            candidates[i] = Candidate(i, name, "cancelled")
        decision = selector.decision or (
            selector.finalize() if self.decide is None else await self.decide(selector)
        )
        ordered = tuple(candidates[i] for i in range(total))
        choice = None
        if self.target is not None and decision.selection.rule != "too-few-candidates":
            choice = await self._select(ordered, decision, requests, score_with)
        return EnsembleResult(
            item_index,
            ordered,
            decision,
            time.perf_counter() - started,
            key=item if key is None else key,
            min_candidates=needed,
            choice=choice,
        )

    async def _select(
        self,
        candidates: tuple[Candidate, ...],
        decision: Decision,
        requests: list[GenerationRequest],
        score_with: GenerationRequest | None,
    ) -> FitChoice:
        """Score the candidates under the target model and apply the selection policy."""
        assert self.target is not None
        texts = [c.text if c.status in ("ok", "given") else None for c in candidates]
        scorable = [i for i, t in enumerate(texts) if t]
        # The prompt as the target sees it: its own request when it is a member.
        if score_with is not None:
            request = score_with
        elif self.target in self.members:
            request = requests[self.members.index(self.target)]
        else:
            request = requests[0]
        scores: dict[int, CompletionScore] = {}
        if scorable:
            ask = ScoreRequest(
                completions=tuple(texts[i] or "" for i in scorable),
                prompt=request.prompt,
                messages=request.messages,
            )
            try:
                got = await self.target.score(ask)
            except (RetryableError, CircuitOpenError, FatalError) as exc:
                if unavailable(exc):
                    return FitChoice(
                        None,
                        None,
                        "target-unavailable",
                        self.selection.policy,
                        why=f"the target could not score: {type(exc).__name__}",
                    )
                return FitChoice(
                    None,
                    None,
                    "scoring-failed",
                    self.selection.policy,
                    why=f"the target refused to score: {exc}",
                )
            scores = dict(zip(scorable, got, strict=True))
        return choose(texts, decision.selection, scores, self.selection, similarity=self.similarity)

    @staticmethod
    def _collect(
        task: asyncio.Task[list[Completion]],
        index: int,
        name: str,
        candidates: dict[int, Candidate],
        selector: IncrementalSelector,
    ) -> None:
        exc = task.exception()
        if exc is None:
            completion = task.result()[0]
            candidates[index] = Candidate(
                index, name, "ok", completion=completion, text=completion.text
            )
            selector.add(index, completion.text)
            return
        if not isinstance(exc, BackendError):
            raise exc
        status: CandidateStatus
        if isinstance(exc, CircuitOpenError):
            status = "circuit_open"
        elif cannot_serve(exc):
            status = "unavailable"
        else:
            status = "failed"
        candidates[index] = Candidate(index, name, status, error=f"{type(exc).__name__}: {exc}")
        selector.fail(index, unavailable=status != "failed")

    # -- many items ---------------------------------------------------------------------

    async def map(
        self,
        items: Iterable[Item] | AsyncIterable[Item],
        *,
        ordered: bool = False,
        key: Callable[[Item], Any] | None = None,
    ) -> AsyncIterator[EnsembleResult]:
        """Run every item; yield results as they finish (or in input order).

        Each result carries its input position (``index``) and ``key``: the item itself,
        or ``key(item)`` when given (e.g. an id, so the item need not be kept).  The
        input is read only as fast as items complete: at most ``max_items_in_flight``
        items are running or waiting to be yielded.  Closing the iterator early cancels
        the items still running.
        """
        window = asyncio.Semaphore(self.max_items_in_flight)
        outcomes: asyncio.Queue[EnsembleResult | BaseException | None] = asyncio.Queue()

        async def one(index: int, item: Item) -> None:
            try:
                result = await self.run(
                    item, item_index=index, key=item if key is None else key(item)
                )
                outcomes.put_nowait(result)  # unbounded: the window bounds it
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                outcomes.put_nowait(exc)

        async def feed() -> None:
            source = _aiter(items)
            async with asyncio.TaskGroup() as tg:
                for index in itertools.count():
                    await window.acquire()  # take an item only when there is room for it
                    try:
                        item = await anext(source)
                    except StopAsyncIteration:
                        break
                    except Exception as exc:  # the input itself failed: say so, stop reading
                        await outcomes.put(exc)
                        return
                    tg.create_task(one(index, item))
            await outcomes.put(None)

        def feeder_done(task: asyncio.Task[None]) -> None:
            # The feeder's own failure (not one it reported) must wake the consumer.
            if not task.cancelled() and task.exception() is not None:
                outcomes.put_nowait(task.exception())

        feeder = asyncio.create_task(feed())
        feeder.add_done_callback(feeder_done)
        early_results: dict[int, EnsembleResult] = {}  # ordered: finished before their turn
        next_index = 0
        try:
            while True:
                outcome = await outcomes.get()
                if outcome is None:
                    break
                if isinstance(outcome, BaseException):
                    raise outcome
                if not ordered:
                    window.release()
                    yield outcome
                    continue
                early_results[outcome.index] = outcome
                while next_index in early_results:
                    window.release()
                    yield early_results.pop(next_index)
                    next_index += 1
        finally:
            feeder.cancel()
            await asyncio.gather(feeder, return_exceptions=True)


def _wake(waiter: asyncio.Future[None]) -> None:
    if not waiter.done():
        waiter.set_result(None)


async def _aiter(items: Iterable[Item] | AsyncIterable[Item]) -> AsyncIterator[Item]:
    if isinstance(items, AsyncIterable):
        async for item in items:
            yield item
    else:
        for item in items:
            yield item


def _unique_names(members: Sequence[Member]) -> None:
    """Member names must be unique (they key stats, provenance and the cache).  Members
    named after their backend by default (two ``openai`` servers, say) are told apart by
    a suffix (``openai``, ``openai-2``); explicitly given names are never changed, and
    two equal ones are an error."""
    explicit = [m.name for m in members if not m.auto_named]
    if len(set(explicit)) != len(explicit):
        raise ValueError(f"member names must be unique, got {[m.name for m in members]}")
    taken = set(explicit)
    for member in members:
        if not member.auto_named:
            continue
        name, k = member.name, 1
        while name in taken:
            k += 1
            name = f"{member.name}-{k}"
        if name != member.name:
            member.rename(name)
        taken.add(name)
