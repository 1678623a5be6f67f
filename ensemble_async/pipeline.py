"""The Ensemble-Instruct pipeline (SPEC steps 1-5) as asyncio stages that stream into
each other.

::

    step 1  instructions  (per kind)  writer, novelty filter   --queue-->
    step 2+3 instances    (N workers) writer, validity parser  --queue-->
    step 4+5 answers      (M workers) Ensemble(answerers) + consensus
        --> committer (fixed order) --> sink (bounded queue, one writer thread)
        --> acknowledger (counts and events once each entry is on disk)

Each stage starts as soon as the previous one hands it an item; the queues between
stages are bounded, so a fast stage waits for a slow one instead of piling up work.
This layer decides what is written; :mod:`ensemble_async.sink` writes it (the loop never
waits on the disk, only for room in the sink's queue).

Determinism. The same settings, seeds and (deterministic) backends give the same
requests and the same records, whatever the timing:

* step-1 attempt ``k`` of a kind draws its demos from ``Random(f"{seed}:demos:{kind}:{k}")``
  and sees the generated instructions accepted by attempts ``< k - window + 1``, which are
  all committed before attempt ``k`` starts (``window = settings.instruction_window``
  attempts run at once). Results are committed -- filters, novelty check, acceptance --
  strictly in attempt order, so the novelty pool grows in the same order every run;
* every request carries a seed derived from ``settings.seed``, the step, the kind and
  the item's position (so a response cache keys every call apart);
* the committer writes outcomes in a fixed order (the ``k``-th accepted instruction of
  each kind, kinds alternating), holding back those that finish early.  What it holds
  is bounded: at most ``queue_size`` instructions are past step 1 and not yet written
  (plus the one whose turn it is, always let in), so a stalled kind makes the other
  wait instead of piling up outcomes.  Step-1 rejects are written as
  they are committed (each kind in attempt order).

Slots and resume.  The ``k``-th accepted instruction of a kind is an *instruction
slot*; a record or a reject (from step 2 on) fills it for good.  On resume steps 1-3 are
replayed (a response cache makes that free and decides the same instructions), and a
slot the sink already holds is never decided again.

Unavailable members.  An error that says the member is unavailable (retries exhausted on
a retryable error, breaker open, credentials refused, model or endpoint not found)
decides nothing:

* in step 1 the kind stops at that attempt (later attempts would see a different pool
  of generated instructions than an uninterrupted run), the rest of the kind deferred;
* in step 2 the slot is deferred;
* in step 4 a decision needs ``min_candidates`` candidates (default: every voice --
  the writer's output and each answerer); an item that falls short because a member
  was unavailable is deferred.

Deferred items are neither kept nor rejected; they are listed in the summary and in the
sink's deferred file, and the next run of the same command decides them.  An error of
the request itself (a ``FatalError``, e.g. context too long) is a reject in steps 1-2
and a failed candidate in step 4.

Record (one per kept example, :class:`~ensemble_async.records.Record`)::

    {"id": "ei-<16 hex>", "type": "input_output" | "output", "instruction", "input",
     "output", "provenance": {"writer", "instruction_attempt", "instruction_index",
     "novelty_max_rouge", "candidates": [{"index", "source", "status", "text", "error",
     "finish_reason", "completion_tokens", "prompt_style", "model", "backend", "host"}],
     "decision": {rule, index, scores, ...}, "preset", "seed", ["writer_answer"],
     "library_version", "created_at", ["fingerprint"]}}

``prompt_style`` is ``"instance"`` for candidate 0 (the writer's step-2 output) and
``"zero_shot"`` or ``"few_shot"`` for each answer (see :class:`Pipeline`).

Reject (:class:`~ensemble_async.records.Reject`): ``{"id", "stage", "type", "reason",
...}`` with what is needed to understand it (the text, the candidates, the scores).
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import random
import time
from bisect import bisect_left
from collections import Counter
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Literal, Protocol, TypeAlias, overload
from urllib.parse import urlsplit

from . import __version__
from .breaker import CircuitOpenError
from .consensus import Selection, select
from .ensemble import Candidate, Decide, Ensemble, unavailable
from .errors import BackendError
from .filters import (
    ParsedInstance,
    Rejection,
    clean_instruction,
    extract_instruction,
    parse_instance,
)
from .member import Member
from .presets import PipelineSettings
from .records import CandidateRecord, Deferred, Provenance, Record, Reject, Slot
from .rouge import NoveltyFilter
from .seedtasks import KINDS, SeedTask, TaskKind, split_by_kind
from .selection import SelectionConfig
from .templates import (
    PromptStyle,
    build_instance_prompt,
    build_instruction_prompt,
    build_step4_prompt,
)
from .types import Completion

__all__ = [
    "EventSink",
    "Pipeline",
    "PipelineSummary",
    "RecordSink",
    "ServedBy",
    "WriterAnswers",
    "derive_seed",
    "host_of",
    "record_id",
]

STAGES = ("instructions", "instances", "answers", "consensus")

EXACT_NOVELTY_SCORE_POOL = 50_000
"""Up to this pool size an accepted instruction's highest ROUGE-L against the pool is
recorded (``novelty_max_rouge``); past it the record says None, because the exact
maximum of a novel text needs every entry while the accept/reject decision does not."""

WriterAnswers: TypeAlias = Literal["vote", "provenance"]
"""What the writer's own answer is when the writer is also an answerer: a vote like any
other, or kept in provenance only (``Provenance.writer_answer``), never a vote."""


class RecordSink(Protocol):
    """Where records, rejects, deferred items and the summary go
    (:class:`~ensemble_async.sink.AsyncRecordWriter` is the one to use)."""

    def has(self, record_id: str) -> bool: ...

    def decided(self, slot: Slot) -> Literal["record", "reject"] | None: ...

    async def submit(self, entry: Record | Reject) -> asyncio.Future[bool]: ...

    async def write_deferred(self, items: Sequence[Deferred]) -> None: ...

    async def write_summary(self, summary: Mapping[str, Any]) -> None: ...


class EventSink(Protocol):
    """Progress events: ``stage`` in :data:`STAGES`, ``kind`` like ``started``,
    ``accepted``, ``rejected`` (with ``reason=``), ``skipped``, ``deferred``, ``done``."""

    def event(self, stage: str, kind: str, **fields: Any) -> None: ...


@dataclass(frozen=True)
class ServedBy:
    """Who serves a member, for provenance: the backend kind and ``host[:port]``."""

    backend: str
    host: str | None = None


def host_of(url: str | None) -> str | None:
    """``https://user:key@h.example:8080/v1?token=x`` -> ``h.example:8080``: no
    credentials, no path, no query."""
    if not url:
        return None
    try:
        parts = urlsplit(url)
        host = parts.hostname
        port = parts.port
    except ValueError:
        return None
    if host is None:
        return None
    return f"{host}:{port}" if port is not None else host


def record_id(kind: str, instruction: str, input: str) -> str:
    """The stable id of a record: ``ei-`` and 16 hex digits of sha256 of (type, instruction, input)."""
    key = json.dumps([kind, instruction, input], ensure_ascii=False)
    return "ei-" + hashlib.sha256(key.encode()).hexdigest()[:16]


def _reject_id(*parts: Any) -> str:
    key = json.dumps(parts, ensure_ascii=False)
    return "rj-" + hashlib.sha256(key.encode()).hexdigest()[:16]


def derive_seed(*parts: Any) -> int:
    """A non-negative 31-bit seed from ``parts`` (stable across runs and platforms)."""
    key = json.dumps(parts, ensure_ascii=False)
    return int.from_bytes(hashlib.sha256(key.encode()).digest()[:4], "big") & 0x7FFFFFFF


def _utc_now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds").replace("+00:00", "Z")


def _candidate_unavailable(c: Candidate) -> bool:
    """The ensemble marks a member that could not answer (retries spent on a retryable
    error, breaker open) by status; a request failing for its own reason is ``failed``."""
    return c.status in ("circuit_open", "unavailable")


@dataclass
class PipelineSummary:
    """Counts per stage (``accepted``/``rejected``/``skipped``/``deferred``...), per
    reject reason, and the deferred items' reasons."""

    counts: dict[str, Counter[str]] = field(
        default_factory=lambda: {stage: Counter() for stage in STAGES}
    )
    reasons: dict[str, Counter[str]] = field(
        default_factory=lambda: {stage: Counter() for stage in STAGES}
    )
    attempts: dict[str, int] = field(default_factory=dict)
    accepted_instructions: dict[str, int] = field(default_factory=dict)
    exhausted: dict[str, str] = field(default_factory=dict)
    """Kinds that missed their target, with why."""
    records_written: int = 0
    records_present: int = 0
    """Records already in the sink (resumed run) or refused by it as duplicates."""
    rejects_written: int = 0
    deferred: int = 0
    """Items neither kept nor rejected because a member was unavailable (a step-1
    deferral counts once, for the rest of its kind); the next run decides them."""
    deferred_reasons: Counter[str] = field(default_factory=Counter)
    deferred_before: int = 0
    """Items the previous run had deferred (picked up again by this one)."""
    wall_s: float = 0.0

    def count(self, stage: str, what: str, reason: str | None = None) -> None:
        self.counts[stage][what] += 1
        if reason is not None:
            self.reasons[stage][reason] += 1

    @property
    def complete(self) -> bool:
        return not self.exhausted and not self.deferred

    def to_dict(self) -> dict[str, Any]:
        return {
            "counts": {stage: dict(c) for stage, c in self.counts.items()},
            "reasons": {stage: dict(c) for stage, c in self.reasons.items()},
            "attempts": dict(self.attempts),
            "accepted_instructions": dict(self.accepted_instructions),
            "exhausted": dict(self.exhausted),
            "records_written": self.records_written,
            "records_present": self.records_present,
            "rejects_written": self.rejects_written,
            "deferred": self.deferred,
            "deferred_reasons": dict(self.deferred_reasons),
            "deferred_before": self.deferred_before,
            "wall_s": self.wall_s,
        }


class _TextPrefix(Sequence[str]):
    """The texts of the first ``length`` ``(attempt, text)`` pairs of a list, read in
    place (the list only grows at its end, so the prefix never changes)."""

    __slots__ = ("_items", "_length")

    def __init__(self, items: list[tuple[int, str]], length: int) -> None:
        self._items = items
        self._length = length

    def __len__(self) -> int:
        return self._length

    @overload
    def __getitem__(self, index: int) -> str: ...

    @overload
    def __getitem__(self, index: slice) -> Sequence[str]: ...

    def __getitem__(self, index: int | slice) -> str | Sequence[str]:
        if isinstance(index, slice):
            return [self._items[i][1] for i in range(*index.indices(self._length))]
        if not -self._length <= index < self._length:
            raise IndexError(index)
        return self._items[index % self._length][1]


@dataclass(frozen=True)
class _Instruction:
    """An accepted step-1 instruction: the ``index``-th of its kind (its slot)."""

    kind: TaskKind
    index: int
    attempt: int
    stored: str  # as the novelty filter saw it (may keep |EoS| in paper mode)
    novelty: float | None


@dataclass(frozen=True)
class _Instance:
    """A step-2 instance that passed step 3, waiting for its answers."""

    item: _Instruction
    id: str
    instruction: str
    input: str
    output: str
    completion: Completion


@dataclass(frozen=True)
class _Present:
    """A slot an earlier run already decided (or a record id already on disk)."""

    id: str | None
    what: Literal["record", "reject"]


_Outcome: TypeAlias = Record | Reject | Deferred | _Present
"""What one instruction slot ends as."""


class _Committer:
    """Hands outcomes to ``emit`` in the order (k, kind) whatever order they finish in.

    ``admit`` keeps what is held bounded (in a stage, in a queue, or finished and
    waiting): a new instruction enters step 2 while fewer than ``room`` are held, or when
    its turn comes before that of one already let in. The second rule keeps a kind that
    lags (a lower acceptance rate) from being starved or serialised: its instructions are
    the ones the held outcomes wait for, so they must run side by side, not one at a time
    as each becomes due (which slowed a whole run to one instruction per round trip).
    Each kind holds at most ``room + 1`` (the ones let in by the second rule sort before
    the latest let in by the first, and a kind is admitted in index order), so a stalled
    kind makes the other wait instead of piling up outcomes."""

    def __init__(self, room: int) -> None:
        self._room = room
        self._pending: dict[tuple[int, TaskKind], _Outcome] = {}
        self._next: dict[TaskKind, int] = dict.fromkeys(KINDS, 0)
        self._total: dict[TaskKind, int | None] = dict.fromkeys(KINDS, None)
        self._outstanding = 0
        self._frontier: tuple[int, int] = (-1, -1)  # latest turn let in, (index, rank)
        self._changed = asyncio.Condition()
        self.most_held = 0

    def _open(self, kind: TaskKind) -> bool:
        total = self._total[kind]
        return total is None or self._next[kind] < total

    async def admit(self, kind: TaskKind, index: int) -> None:
        """Wait until the instruction at (``index``, ``kind``) may enter step 2."""
        turn = (index, KINDS.index(kind))
        async with self._changed:
            await self._changed.wait_for(
                lambda: (
                    self._outstanding < self._room
                    or turn < self._frontier
                    or self._due() == (index, kind)
                )
            )
            self._outstanding += 1
            self._frontier = max(self._frontier, turn)

    async def offer(self, kind: TaskKind, index: int, outcome: _Outcome) -> None:
        async with self._changed:
            self._pending[(index, kind)] = outcome
            self.most_held = max(self.most_held, len(self._pending))
            self._changed.notify_all()

    async def finish(self, kind: TaskKind, total: int) -> None:
        async with self._changed:
            self._total[kind] = total
            self._changed.notify_all()

    def _due(self) -> tuple[int, TaskKind] | None:
        open_keys = [(self._next[k], rank, k) for rank, k in enumerate(KINDS) if self._open(k)]
        if not open_keys:
            return None
        index, _, kind = min(open_keys)
        return index, kind

    async def run(self, emit: Callable[[TaskKind, _Outcome], Awaitable[None]]) -> None:
        """Emit every outcome in order; return once every kind is finished and emitted."""
        while True:
            async with self._changed:
                await self._changed.wait_for(
                    lambda: (due := self._due()) is None or due in self._pending
                )
                due = self._due()
                if due is None:
                    return
                outcome = self._pending.pop(due)
                self._next[due[1]] += 1
                self._outstanding -= 1
                self._changed.notify_all()
            await emit(due[1], outcome)

    @property
    def held(self) -> int:
        return len(self._pending)


_Ack: TypeAlias = "tuple[asyncio.Future[bool], Record | Reject] | None"


class Pipeline:
    """Ensemble-Instruct over a writer (steps 1-2) and answerers (step 4).

    ``writer`` and ``answerers`` are ``Member``s the caller owns (started and closed by
    the caller); the answerers form an :class:`Ensemble` whose candidate 0 is the
    writer's step-2 output. ``seeds`` are split by kind; each kind's seed instructions
    seed its novelty pool and fill its step-1 demos.  ``sink`` is an open
    :class:`~ensemble_async.sink.AsyncRecordWriter` (or anything with its methods).

    Each answerer gets the zero-shot prompt ``instruction + "\\n" + input`` when its
    ``Member.instruction_tuned`` is true, else the few-shot prompt of
    :func:`~ensemble_async.templates.build_fewshot_answer_prompt` (SPEC step 4); the
    style is recorded per candidate (``prompt_style``).

    ``writer_answers``: see :data:`WriterAnswers` (only matters when the writer is among
    the answerers).  ``min_candidates``: candidates a decision needs (default: every
    voice).  ``served_by``: backend kind and host per member name, for provenance.
    ``fingerprint``: the run manifest's fingerprint, stored in each record.
    ``clock``: the UTC timestamp written in each record.
    ``selection``/``target``: the selection policy and, for the target-fit policies, the
    member whose model scores the candidates (conditioned on the step-4 answer prompt in
    the target's own style); an item whose target is unavailable is deferred.
    ``decide``: where the answers' consensus decisions are computed (see
    ``Ensemble(decide=...)``; default: here).
    """

    def __init__(
        self,
        *,
        writer: Member,
        answerers: Sequence[Member],
        seeds: Sequence[SeedTask],
        settings: PipelineSettings,
        sink: RecordSink,
        events: EventSink | None = None,
        writer_answers: WriterAnswers = "vote",
        min_candidates: int | None = None,
        served_by: Mapping[str, ServedBy] | None = None,
        fingerprint: str | None = None,
        clock: Callable[[], str] = _utc_now,
        selection: SelectionConfig | None = None,
        target: Member | None = None,
        decide: Decide | None = None,
    ) -> None:
        if writer_answers not in ("vote", "provenance"):
            raise ValueError(
                f"writer_answers must be 'vote' or 'provenance', got {writer_answers!r}"
            )
        self.writer = writer
        self.writer_answers = writer_answers
        self.answerers = [
            m for m in answerers if not (writer_answers == "provenance" and m is writer)
        ]
        self.writer_answers_too = writer_answers == "provenance" and any(
            m is writer for m in answerers
        )
        self.prompt_styles: list[PromptStyle] = [_style(m) for m in self.answerers]
        self.voices = 1 + len(self.answerers)
        if min_candidates is None:
            min_candidates = self.voices
        if not 1 <= min_candidates <= self.voices:
            raise ValueError(f"min_candidates must be in 1..{self.voices}, got {min_candidates}")
        self.min_candidates = min_candidates
        self.settings = settings
        self.sink = sink
        self.events = events
        self.served_by = dict(served_by or {})
        self.fingerprint = fingerprint
        self.clock = clock
        self.selection = selection or SelectionConfig()
        self.target = target
        if self.selection.needs_scores and target is None:
            raise ValueError(f"selection policy {self.selection.policy!r} needs a target member")
        self.seeds = split_by_kind(seeds)
        for kind in KINDS:
            if settings.target(kind) > 0 and not self.seeds[kind]:
                raise ValueError(f"no seed tasks of kind {kind!r} but its target is > 0")
        if self.answerers:
            complete = settings.consensus_complete
            self.ensemble: Ensemble | None = Ensemble(
                self.answerers,
                policy="deadline" if complete else settings.consensus_policy,
                threshold=settings.consensus_threshold,
                deadline_s=settings.consensus_deadline_s
                if complete or settings.consensus_policy == "deadline"
                else None,
                max_items_in_flight=settings.answer_concurrency,
                # Voices = the writer's given candidate plus every answerer, as here.
                min_candidates=self.min_candidates,
                selection=self.selection,
                target=target if self.selection.needs_scores else None,
                decide=decide,
            )
        else:
            self.ensemble = None
        self.summary = PipelineSummary()
        self.deferred: list[Deferred] = []
        self._committer = _Committer(settings.queue_size)
        self._acks: asyncio.Queue[_Ack] = asyncio.Queue(settings.queue_size)

    # -- events and output ----------------------------------------------------------------

    def _event(self, stage: str, kind: str, **fields: Any) -> None:
        if self.events is not None:
            self.events.event(stage, kind, **fields)

    async def _submit(self, entry: Record | Reject) -> None:
        """Queue an entry for the disk; the acknowledger counts it once it is there."""
        await self._acks.put((await self.sink.submit(entry), entry))

    async def _acknowledge(self) -> None:
        """Counts and events, in submission order, each once its entry is on disk."""
        while (ack := await self._acks.get()) is not None:
            done, entry = ack
            written = await done
            if isinstance(entry, Record):
                if written:
                    self.summary.records_written += 1
                else:
                    self.summary.records_present += 1
                self.summary.count("consensus", "accepted")
                self._event("consensus", "accepted", id=entry.id, type=entry.type)
            else:
                if written:
                    self.summary.rejects_written += 1
                self.summary.count(entry.stage, "rejected", entry.reason)
                self._event(entry.stage, "rejected", reason=entry.reason, id=entry.id)

    def _defer(self, item: Deferred) -> None:
        self.deferred.append(item)
        self.summary.deferred += 1
        self.summary.deferred_reasons[item.reason] += 1
        self.summary.count(item.stage, "deferred", item.reason)
        self._event(
            item.stage,
            "deferred",
            type=item.type,
            reason=item.reason,
            index=item.instruction_index,
            attempt=item.attempt,
        )

    async def _emit(self, kind: TaskKind, outcome: _Outcome) -> None:
        """Called by the committer, in the fixed order."""
        if isinstance(outcome, Record | Reject):
            await self._submit(outcome)
        elif isinstance(outcome, Deferred):
            self._defer(outcome)
        else:
            if outcome.what == "record":
                self.summary.records_present += 1
            self.summary.count("consensus", "skipped")
            self._event("consensus", "skipped", id=outcome.id, type=kind, decided=outcome.what)

    # -- run ------------------------------------------------------------------------------

    async def run(self) -> PipelineSummary:
        """Run every stage to the end; write the deferred list and the summary beside
        the records; return the summary."""
        started = time.perf_counter()
        settings = self.settings
        self.summary.deferred_before = len(getattr(self.sink, "previous_deferred", ()))
        accepted_instructions: asyncio.Queue[_Instruction | None] = asyncio.Queue(
            settings.queue_size
        )
        parsed_instances: asyncio.Queue[_Instance | None] = asyncio.Queue(settings.queue_size)
        for stage in STAGES:
            self._event(stage, "started", targets=dict(settings.targets))

        async def instructions() -> None:
            async with asyncio.TaskGroup() as tg:
                for kind in KINDS:
                    tg.create_task(self._instructions(kind, accepted_instructions))
            for _ in range(settings.instance_concurrency):
                await accepted_instructions.put(None)
            self._event("instructions", "done", **self.summary.accepted_instructions)

        async def instances() -> None:
            async with asyncio.TaskGroup() as tg:
                for _ in range(settings.instance_concurrency):
                    tg.create_task(self._instance_worker(accepted_instructions, parsed_instances))
            for _ in range(settings.answer_concurrency):
                await parsed_instances.put(None)
            self._event("instances", "done")

        async def answers() -> None:
            async with asyncio.TaskGroup() as tg:
                for _ in range(settings.answer_concurrency):
                    tg.create_task(self._answer_worker(parsed_instances))
            self._event("answers", "done")

        async def commit() -> None:
            await self._committer.run(self._emit)
            await self._acks.put(None)  # every step-1 reject was submitted before

        async with asyncio.TaskGroup() as tg:
            tg.create_task(instructions())
            tg.create_task(instances())
            tg.create_task(answers())
            tg.create_task(commit())
            tg.create_task(self._acknowledge())
        assert self._committer.held == 0, "committer left outcomes unwritten"
        self.summary.wall_s = time.perf_counter() - started
        await self.sink.write_deferred(self.deferred)
        await self.sink.write_summary(self.summary.to_dict())
        self._event("consensus", "done", **self.summary.to_dict())
        return self.summary

    # -- step 1 ---------------------------------------------------------------------------

    def _demos(self, kind: TaskKind, attempt: int, generated: Sequence[str]) -> list[str]:
        settings = self.settings
        rng = random.Random(f"{settings.seed}:demos:{kind}:{attempt}")
        total = settings.demos.get(kind, 0)
        # ``sample`` reads a sequence by length and index only: the same picks as from a
        # list copy, without making one
        picked = rng.sample(generated, min(settings.max_generated_demos, len(generated), total))
        seeds = [t.instruction for t in self.seeds[kind]]
        picked += rng.sample(seeds, min(total - len(picked), len(seeds)))
        rng.shuffle(picked)
        return picked

    async def _attempt(
        self, kind: TaskKind, attempt: int, generated: Sequence[str]
    ) -> Completion | BackendError:
        settings = self.settings
        prompt = build_instruction_prompt(
            self._demos(kind, attempt, generated), drop_eos=not settings.keep_eos
        )
        request = settings.instruction_decoding.request(
            prompt, seed=derive_seed(settings.seed, "instruction", kind, attempt)
        )
        try:
            return (await self.writer.generate(request))[0]
        except BackendError as exc:
            return exc

    async def _instructions(self, kind: TaskKind, out: asyncio.Queue[_Instruction | None]) -> None:
        settings = self.settings
        target = settings.target(kind)
        max_attempts = settings.max_attempts_factor * target
        window = settings.instruction_window
        novelty = NoveltyFilter(
            (t.instruction for t in self.seeds[kind]), threshold=settings.novelty_threshold
        )
        accepted: list[tuple[int, str]] = []
        in_flight: dict[int, asyncio.Task[Completion | BackendError]] = {}
        launched = committed = 0
        stopped: Deferred | None = None
        try:
            while len(accepted) < target and committed < max_attempts:
                while launched < max_attempts and launched - committed < window:
                    horizon = launched - window + 1  # attempts below it are all committed
                    # accepted is in attempt order: its entries below the horizon are a
                    # prefix, seen without a copy (a copy per attempt made step 1
                    # quadratic in the pool: bench/fleet.py --pipeline)
                    generated = _TextPrefix(accepted, bisect_left(accepted, (horizon,)))
                    in_flight[launched] = asyncio.create_task(
                        self._attempt(kind, launched, generated)
                    )
                    launched += 1
                result = await in_flight.pop(committed)
                if isinstance(result, BackendError) and unavailable(result):
                    stopped = Deferred(
                        stage="instructions",
                        type=kind,
                        reason=f"unavailable:{type(result).__name__}",
                        seed=settings.seed,
                        attempt=committed,
                        members=(self.writer.name,),
                    )
                    break
                item = await self._commit_instruction(kind, committed, result, novelty, accepted)
                committed += 1
                if item is not None:
                    await self._committer.admit(kind, item.index)
                    await out.put(item)
        finally:
            for task in in_flight.values():
                task.cancel()
            await asyncio.gather(*in_flight.values(), return_exceptions=True)
        self.summary.attempts[kind] = committed
        self.summary.accepted_instructions[kind] = len(accepted)
        if stopped is not None:
            self._defer(stopped)
        elif len(accepted) < target:
            why = f"{len(accepted)}/{target} instructions accepted after {committed} attempts"
            self.summary.exhausted[kind] = why
            self._event("instructions", "exhausted", type=kind, detail=why)
        await self._committer.finish(kind, len(accepted))
        self._event("instructions", "finished", type=kind, accepted=len(accepted))

    async def _commit_instruction(
        self,
        kind: TaskKind,
        attempt: int,
        result: Completion | BackendError,
        novelty: NoveltyFilter,
        accepted: list[tuple[int, str]],
    ) -> _Instruction | None:
        settings = self.settings
        base: dict[str, Any] = {
            "stage": "instructions",
            "type": kind,
            "attempt": attempt,
            "seed": settings.seed,
        }
        if isinstance(result, BackendError):  # the request's own fault (a FatalError)
            reason = f"backend_error:{type(result).__name__}"
            rid = _reject_id(settings.seed, "instructions", kind, attempt, reason)
            await self._submit(Reject(id=rid, **base, reason=reason, error=str(result)))
            return None
        extracted = extract_instruction(
            result.text, keep_eos=settings.keep_eos, stopped=result.finish_reason == "stop"
        )
        if isinstance(extracted, Rejection):
            rid = _reject_id(settings.seed, "instructions", kind, attempt, result.text)
            await self._submit(Reject(id=rid, **base, reason=extracted.reason, text=result.text))
            return None
        # One call: the decision, and the exact maximum while the pool is small (one
        # bounded pass over every entry, so its cost grows with the pool). Past that
        # only the decision (flat in the pool's size, by prefix filtering), with the
        # maximum and the most similar entry for a rejection (cheap above the threshold).
        novel, score, similar = novelty.judge(
            extracted, score=len(novelty) <= EXACT_NOVELTY_SCORE_POOL
        )
        if not novel:
            assert score is not None
            rid = _reject_id(settings.seed, "instructions", kind, attempt, extracted)
            await self._submit(
                Reject(
                    id=rid,
                    **base,
                    reason="not_novel",
                    instruction=extracted,
                    max_rouge=score,
                    most_similar=similar,
                )
            )
            return None
        novelty.add(extracted)
        accepted.append((attempt, extracted))
        self.summary.count("instructions", "accepted")
        self._event("instructions", "accepted", type=kind, attempt=attempt)
        return _Instruction(kind, len(accepted) - 1, attempt, extracted, score)

    # -- steps 2 and 3 --------------------------------------------------------------------

    async def _instance_worker(
        self,
        inbox: asyncio.Queue[_Instruction | None],
        out: asyncio.Queue[_Instance | None],
    ) -> None:
        while (item := await inbox.get()) is not None:
            result = await self._instance(item)
            if isinstance(result, _Instance):
                await out.put(result)
            else:
                await self._committer.offer(item.kind, item.index, result)

    async def _instance(self, item: _Instruction) -> _Instance | _Outcome:
        settings = self.settings
        decided = self.sink.decided((settings.seed, item.kind, item.index))
        if decided is not None:
            return _Present(None, decided)
        instruction = clean_instruction(item.stored)
        prompt = build_instance_prompt(item.kind, item.stored, drop_eos=not settings.keep_eos)
        request = settings.instance_decoding.request(
            prompt, seed=derive_seed(settings.seed, "instance", item.kind, item.index)
        )
        base: dict[str, Any] = {
            "stage": "instances",
            "type": item.kind,
            "seed": settings.seed,
            "instruction_index": item.index,
            "instruction": instruction,
        }
        try:
            completion = (await self.writer.generate(request))[0]
        except BackendError as exc:
            reason = f"backend_error:{type(exc).__name__}"
            if unavailable(exc):
                return Deferred(
                    stage="instances",
                    type=item.kind,
                    reason=f"unavailable:{type(exc).__name__}",
                    seed=settings.seed,
                    instruction_index=item.index,
                    instruction=instruction,
                    members=(self.writer.name,),
                )
            rid = _reject_id(settings.seed, "instances", item.kind, item.index, instruction)
            return Reject(id=rid, **base, reason=reason, error=str(exc))
        parsed = parse_instance(
            item.kind,
            completion.text,
            first_line_only=settings.first_line_only,
            reject_empty_input=settings.reject_empty_input,
        )
        if isinstance(parsed, Rejection):
            rid = _reject_id(settings.seed, "instances", item.kind, item.index, completion.text)
            return Reject(id=rid, **base, reason=parsed.reason, text=completion.text)
        assert isinstance(parsed, ParsedInstance)
        self.summary.count("instances", "accepted")
        self._event("instances", "accepted", type=item.kind)
        rid = record_id(item.kind, instruction, parsed.input)
        if self.sink.has(rid):
            return _Present(rid, "record")
        return _Instance(item, rid, instruction, parsed.input, parsed.output, completion)

    # -- steps 4 and 5 --------------------------------------------------------------------

    async def _answer_worker(self, inbox: asyncio.Queue[_Instance | None]) -> None:
        while (instance := await inbox.get()) is not None:
            outcome = await self._answer(instance)
            await self._committer.offer(instance.item.kind, instance.item.index, outcome)

    def _candidate(
        self,
        index: int,
        source: str,
        status: str,
        text: str | None,
        *,
        completion: Completion | None = None,
        error: str | None = None,
        style: str,
    ) -> CandidateRecord:
        served = self.served_by.get(source)
        return CandidateRecord(
            index=index,
            source=source,
            status=status,
            text=text,
            error=error,
            finish_reason=None if completion is None else completion.finish_reason,
            completion_tokens=None if completion is None else completion.completion_tokens,
            prompt_style=style,
            model=None if completion is None else completion.model,
            backend=None if served is None else served.backend,
            # With replicas (urls = [...]), the replica that answered (host:port).
            host=(completion.replica if completion is not None else None)
            or (None if served is None else served.host),
        )

    def _from_ensemble(self, c: Candidate, style: PromptStyle) -> CandidateRecord:
        return self._candidate(
            c.index, c.source, c.status, c.text, completion=c.completion, error=c.error, style=style
        )

    async def _writer_answer(self, request_prompt: str, seed: int) -> CandidateRecord:
        """The writer's own answer, for provenance only."""
        settings = self.settings
        style = _style(self.writer)
        request = settings.answer_decoding.request(request_prompt, seed=seed)
        try:
            completion = (await self.writer.generate(request))[0]
        except BackendError as exc:
            status = "circuit_open" if isinstance(exc, CircuitOpenError) else "failed"
            return self._candidate(
                -1,
                self.writer.name,
                status,
                None,
                error=f"{type(exc).__name__}: {exc}",
                style=style,
            )
        return self._candidate(
            -1, self.writer.name, "ok", completion.text, completion=completion, style=style
        )

    async def _answer(self, instance: _Instance) -> _Outcome:
        settings = self.settings
        kind, index = instance.item.kind, instance.item.index
        given = self._candidate(
            0,
            self.writer.name,
            "given",
            instance.output,
            completion=instance.completion,
            style="instance",
        )
        seed = derive_seed(settings.seed, "answer", kind, index)
        styles = set(self.prompt_styles) | (
            {_style(self.writer)} if self.writer_answers_too else set()
        )
        prompts = {
            style: build_step4_prompt(style, kind, instance.instruction, instance.input)
            for style in styles
        }
        writer_answer: asyncio.Task[CandidateRecord] | None = None
        if self.writer_answers_too:
            writer_answer = asyncio.create_task(
                self._writer_answer(prompts[_style(self.writer)], seed)
            )
        try:
            selection: Selection
            if self.ensemble is None:
                selection = select([instance.output], threshold=settings.consensus_threshold)
                candidates = [given]
                decision = {**selection.to_dict(), "policy": settings.consensus_policy}
                missing: list[str] = []
                too_few = False
            else:
                requests = [
                    settings.answer_decoding.request(prompts[style], seed=seed)
                    for style in self.prompt_styles
                ]
                score_with = None
                if self.target is not None and self.selection.needs_scores:
                    style = _style(self.target)
                    prompt = prompts.get(style) or build_step4_prompt(
                        style, kind, instance.instruction, instance.input
                    )
                    score_with = settings.answer_decoding.request(prompt, seed=seed)
                result = await self.ensemble.run(
                    requests,
                    given=[(self.writer.name, instance.output)],
                    item_index=index,
                    score_with=score_with,
                )
                answered = result.candidates[1:]
                candidates = [given] + [
                    self._from_ensemble(c, style)
                    for c, style in zip(answered, self.prompt_styles, strict=True)
                ]
                selection = result.decision.selection
                decision = {
                    **selection.to_dict(),
                    "policy": settings.consensus_policy,
                    "complete": settings.consensus_complete,
                }
                if result.choice is not None:
                    # A target-fit policy picked: the record keeps its pick, the decision
                    # keeps the consensus it started from and every score.
                    decision["selection"] = result.choice.to_dict()
                    selection = Selection(
                        result.choice.index,
                        result.choice.text,
                        result.choice.rule,
                        selection.indices,
                        threshold=selection.threshold,
                    )
                missing = [c.source for c in answered if _candidate_unavailable(c)]
                if result.rule == "too-few-candidates" and not missing:
                    # The item's deadline passed while these were still answering: too
                    # slow is unavailable for now, never a reason to reject the slot.
                    missing = [c.source for c in answered if c.status == "cancelled"]
                too_few = result.rule == "too-few-candidates"
                if result.rule == "target-unavailable" and self.target is not None:
                    missing.append(self.target.name)
                self.summary.count("answers", "accepted")
                failed = sum(c.status != "ok" for c in answered)
                self._event("answers", "accepted", type=kind, failed=failed)
            own_answer = None if writer_answer is None else await writer_answer
        finally:
            if writer_answer is not None and not writer_answer.done():
                writer_answer.cancel()
        target_down = self.target is not None and self.target.name in missing
        if too_few or target_down or self.voices - len(missing) < self.min_candidates:
            return Deferred(
                stage="answers",
                type=kind,
                reason="unavailable:" + ",".join(missing),
                seed=settings.seed,
                instruction_index=index,
                instruction=instance.instruction,
                members=tuple(missing),
            )
        provenance = Provenance(
            writer=self.writer.name,
            instruction_attempt=instance.item.attempt,
            instruction_index=index,
            novelty_max_rouge=instance.item.novelty,
            candidates=tuple(candidates),
            decision=decision,
            preset=settings.name,
            seed=settings.seed,
            writer_answer=own_answer,
            library_version=__version__,
            created_at=self.clock(),
            fingerprint=self.fingerprint,
        )
        if selection.index is None or selection.text is None:
            return Reject(
                id=instance.id,
                stage="consensus",
                reason=selection.rule,
                type=kind,
                instruction=instance.instruction,
                input=instance.input,
                provenance=provenance,
            )
        return Record(
            id=instance.id,
            type=kind,
            instruction=instance.instruction,
            input=instance.input,
            output=selection.text,
            provenance=provenance,
        )


def _style(member: Member) -> PromptStyle:
    return "zero_shot" if getattr(member, "instruction_tuned", True) else "few_shot"
