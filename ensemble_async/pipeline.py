"""The Ensemble-Instruct pipeline (SPEC steps 1-5) as asyncio stages that stream into
each other.

::

    step 1  instructions  (per kind)  writer, novelty filter   --queue-->
    step 2+3 instances    (N workers) writer, validity parser  --queue-->
    step 4+5 answers      (M workers) Ensemble(answerers) + consensus --> committer --> sink

Each stage starts as soon as the previous one hands it an item; the queues between
stages are bounded, so a fast stage waits for a slow one instead of piling up work.

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
  each kind, kinds alternating), holding back any that finish early; step-1 rejects are
  written as they are committed (each kind in attempt order).

Resume: an item whose record id the sink already has is not answered again (steps 1-3
are replayed: with a response cache that costs nothing, and they decide the ids).

Record (one per kept example)::

    {"id": "ei-<16 hex>", "type": "input_output" | "output", "instruction", "input",
     "output", "provenance": {"writer", "instruction_attempt", "instruction_index",
     "novelty_max_rouge", "candidates": [{"index", "source", "status", "text", "error",
     "finish_reason", "completion_tokens", "prompt_style"}],
     "decision": {rule, index, scores, ...}, "preset", "seed"}}

``prompt_style`` is ``"instance"`` for candidate 0 (the writer's step-2 output) and
``"zero_shot"`` or ``"few_shot"`` for each answer (see :class:`Pipeline`).

Reject: ``{"id", "stage", "reason", "type", ...}`` with what is needed to understand it
(the text, the candidates, the scores).
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import random
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol, TypeAlias

from .consensus import select
from .ensemble import Candidate, Ensemble
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
from .rouge import NoveltyFilter
from .seedtasks import KINDS, SeedTask, TaskKind, split_by_kind
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
    "derive_seed",
    "record_id",
]

STAGES = ("instructions", "instances", "answers", "consensus")


class RecordSink(Protocol):
    """Where records and rejects go (``RecordWriter`` satisfies it)."""

    def has(self, id: str) -> bool: ...

    def write(self, record: dict[str, Any]) -> bool: ...

    def reject(self, record: dict[str, Any]) -> bool: ...


class EventSink(Protocol):
    """Progress events: ``stage`` in :data:`STAGES`, ``kind`` like ``started``,
    ``accepted``, ``rejected`` (with ``reason=``), ``skipped``, ``done``."""

    def event(self, stage: str, kind: str, **fields: Any) -> None: ...


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


@dataclass
class PipelineSummary:
    """Counts per stage (``accepted``/``rejected``/``skipped``...) and per reject reason."""

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
    wall_s: float = 0.0

    def count(self, stage: str, what: str, reason: str | None = None) -> None:
        self.counts[stage][what] += 1
        if reason is not None:
            self.reasons[stage][reason] += 1

    @property
    def complete(self) -> bool:
        return not self.exhausted

    def to_dict(self) -> dict[str, Any]:
        return {
            "counts": {s: dict(c) for s, c in self.counts.items()},
            "reasons": {s: dict(c) for s, c in self.reasons.items()},
            "attempts": dict(self.attempts),
            "accepted_instructions": dict(self.accepted_instructions),
            "exhausted": dict(self.exhausted),
            "records_written": self.records_written,
            "records_present": self.records_present,
            "rejects_written": self.rejects_written,
            "wall_s": self.wall_s,
        }


@dataclass(frozen=True)
class _Instruction:
    kind: TaskKind
    index: int  # position among the kind's accepted instructions
    attempt: int
    stored: str  # as the novelty filter saw it (may keep |EoS| in paper mode)
    novelty: float


@dataclass(frozen=True)
class _Instance:
    item: _Instruction
    id: str
    instruction: str
    input: str
    output: str
    completion: Completion


_OutcomeKind: TypeAlias = Literal["record", "reject", "skip"]


@dataclass(frozen=True)
class _Outcome:
    what: _OutcomeKind
    payload: dict[str, Any]


class _Committer:
    """Writes outcomes in the order (k, kind) whatever order they finish in."""

    def __init__(self, pipeline: Pipeline) -> None:
        self._p = pipeline
        self._pending: dict[tuple[int, TaskKind], _Outcome] = {}
        self._next: dict[TaskKind, int] = dict.fromkeys(KINDS, 0)
        self._total: dict[TaskKind, int | None] = dict.fromkeys(KINDS, None)

    def offer(self, kind: TaskKind, index: int, outcome: _Outcome) -> None:
        self._pending[(index, kind)] = outcome
        self._drain()

    def finish(self, kind: TaskKind, total: int) -> None:
        self._total[kind] = total
        self._drain()

    def _drain(self) -> None:
        while True:
            open_keys = [
                (self._next[kind], rank, kind)
                for rank, kind in enumerate(KINDS)
                if self._total[kind] is None or self._next[kind] < (self._total[kind] or 0)
            ]
            if not open_keys:
                return
            index, _, kind = min(open_keys)
            outcome = self._pending.pop((index, kind), None)
            if outcome is None:
                return
            self._next[kind] += 1
            self._p._emit(outcome)

    @property
    def held(self) -> int:
        return len(self._pending)


_Item1: TypeAlias = _Instruction | None
_Item2: TypeAlias = _Instance | None


class Pipeline:
    """Ensemble-Instruct over a writer (steps 1-2) and answerers (step 4).

    ``writer`` and ``answerers`` are ``Member``s the caller owns (started and closed by
    the caller); the answerers form an :class:`Ensemble` whose candidate 0 is the
    writer's step-2 output. ``seeds`` are split by kind; each kind's seed instructions
    seed its novelty pool and fill its step-1 demos.

    Each answerer gets the zero-shot prompt ``instruction + "\\n" + input`` when its
    ``Member.instruction_tuned`` is true, else the few-shot prompt of
    :func:`~ensemble_async.templates.build_fewshot_answer_prompt` (SPEC step 4); the
    style is recorded per candidate (``prompt_style``).
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
    ) -> None:
        self.writer = writer
        self.answerers = list(answerers)
        self.prompt_styles: list[PromptStyle] = [
            "zero_shot" if getattr(m, "instruction_tuned", True) else "few_shot"
            for m in self.answerers
        ]
        self.settings = settings
        self.sink = sink
        self.events = events
        self.seeds = split_by_kind(seeds)
        for kind in KINDS:
            if settings.target(kind) > 0 and not self.seeds[kind]:
                raise ValueError(f"no seed tasks of kind {kind!r} but its target is > 0")
        s = settings
        if self.answerers:
            complete = s.consensus_complete
            self.ensemble: Ensemble | None = Ensemble(
                self.answerers,
                policy="deadline" if complete else s.consensus_policy,
                threshold=s.consensus_threshold,
                deadline_s=s.consensus_deadline_s
                if complete or s.consensus_policy == "deadline"
                else None,
                max_items_in_flight=s.answer_concurrency,
            )
        else:
            self.ensemble = None
        self.summary = PipelineSummary()
        self._committer = _Committer(self)

    # -- events and output ----------------------------------------------------------------

    def _event(self, stage: str, kind: str, **fields: Any) -> None:
        if self.events is not None:
            self.events.event(stage, kind, **fields)

    def _reject(self, record: dict[str, Any]) -> None:
        if self.sink.reject(record):
            self.summary.rejects_written += 1

    def _emit(self, outcome: _Outcome) -> None:
        """Called by the committer, in the fixed order."""
        payload = outcome.payload
        if outcome.what == "record":
            if self.sink.write(payload):
                self.summary.records_written += 1
            else:
                self.summary.records_present += 1
            self.summary.count("consensus", "accepted")
            self._event("consensus", "accepted", id=payload["id"], type=payload["type"])
        elif outcome.what == "reject":
            self._reject(payload)
            stage = payload["stage"]
            self.summary.count(stage, "rejected", payload["reason"])
            self._event(stage, "rejected", reason=payload["reason"], id=payload["id"])
        else:
            self.summary.records_present += 1
            self.summary.count("consensus", "skipped")
            self._event("consensus", "skipped", id=payload["id"])

    # -- run ------------------------------------------------------------------------------

    async def run(self) -> PipelineSummary:
        """Run every stage to the end; return the summary."""
        started = time.perf_counter()
        s = self.settings
        q1: asyncio.Queue[_Item1] = asyncio.Queue(s.queue_size)
        q2: asyncio.Queue[_Item2] = asyncio.Queue(s.queue_size)
        for stage in STAGES:
            self._event(stage, "started", targets=dict(s.targets))

        async def instructions() -> None:
            async with asyncio.TaskGroup() as tg:
                for kind in KINDS:
                    tg.create_task(self._instructions(kind, q1))
            for _ in range(s.instance_concurrency):
                await q1.put(None)
            self._event("instructions", "done", **self.summary.accepted_instructions)

        async def instances() -> None:
            async with asyncio.TaskGroup() as tg:
                for _ in range(s.instance_concurrency):
                    tg.create_task(self._instance_worker(q1, q2))
            for _ in range(s.answer_concurrency):
                await q2.put(None)
            self._event("instances", "done")

        async def answers() -> None:
            async with asyncio.TaskGroup() as tg:
                for _ in range(s.answer_concurrency):
                    tg.create_task(self._answer_worker(q2))
            self._event("answers", "done")

        async with asyncio.TaskGroup() as tg:
            tg.create_task(instructions())
            tg.create_task(instances())
            tg.create_task(answers())
        assert self._committer.held == 0, "committer left outcomes unwritten"
        self.summary.wall_s = time.perf_counter() - started
        self._event("consensus", "done", **self.summary.to_dict())
        return self.summary

    # -- step 1 ---------------------------------------------------------------------------

    def _demos(self, kind: TaskKind, attempt: int, generated: Sequence[str]) -> list[str]:
        s = self.settings
        rng = random.Random(f"{s.seed}:demos:{kind}:{attempt}")
        total = s.demos.get(kind, 0)
        picked = rng.sample(list(generated), min(s.max_generated_demos, len(generated), total))
        seeds = [t.instruction for t in self.seeds[kind]]
        picked += rng.sample(seeds, min(total - len(picked), len(seeds)))
        rng.shuffle(picked)
        return picked

    async def _attempt(
        self, kind: TaskKind, attempt: int, generated: Sequence[str]
    ) -> Completion | BackendError:
        s = self.settings
        prompt = build_instruction_prompt(
            self._demos(kind, attempt, generated), drop_eos=not s.keep_eos
        )
        request = s.instruction_decoding.request(
            prompt, seed=derive_seed(s.seed, "instruction", kind, attempt)
        )
        try:
            return (await self.writer.generate(request))[0]
        except BackendError as exc:
            return exc

    async def _instructions(self, kind: TaskKind, out: asyncio.Queue[_Item1]) -> None:
        s = self.settings
        target = s.target(kind)
        max_attempts = s.max_attempts_factor * target
        window = s.instruction_window
        novelty = NoveltyFilter(
            (t.instruction for t in self.seeds[kind]), threshold=s.novelty_threshold
        )
        accepted: list[tuple[int, str]] = []
        tasks: dict[int, asyncio.Task[Completion | BackendError]] = {}
        launched = committed = 0
        try:
            while len(accepted) < target and committed < max_attempts:
                while launched < max_attempts and launched - committed < window:
                    horizon = launched - window + 1  # attempts below it are all committed
                    generated = [text for a, text in accepted if a < horizon]
                    tasks[launched] = asyncio.create_task(self._attempt(kind, launched, generated))
                    launched += 1
                result = await tasks.pop(committed)
                item = self._commit_instruction(kind, committed, result, novelty, accepted)
                committed += 1
                if item is not None:
                    await out.put(item)
        finally:
            for task in tasks.values():
                task.cancel()
            await asyncio.gather(*tasks.values(), return_exceptions=True)
        self.summary.attempts[kind] = committed
        self.summary.accepted_instructions[kind] = len(accepted)
        if len(accepted) < target:
            why = f"{len(accepted)}/{target} instructions accepted after {committed} attempts"
            self.summary.exhausted[kind] = why
            self._event("instructions", "exhausted", type=kind, detail=why)
        self._committer.finish(kind, len(accepted))
        self._event("instructions", "finished", type=kind, accepted=len(accepted))

    def _commit_instruction(
        self,
        kind: TaskKind,
        attempt: int,
        result: Completion | BackendError,
        novelty: NoveltyFilter,
        accepted: list[tuple[int, str]],
    ) -> _Instruction | None:
        s = self.settings
        base = {"stage": "instructions", "type": kind, "attempt": attempt, "seed": s.seed}
        if isinstance(result, BackendError):
            reason = f"backend_error:{type(result).__name__}"
            self._reject_now(
                {
                    "id": _reject_id(s.seed, "instructions", kind, attempt, reason),
                    **base,
                    "reason": reason,
                    "error": str(result),
                }
            )
            return None
        extracted = extract_instruction(
            result.text, keep_eos=s.keep_eos, stopped=result.finish_reason == "stop"
        )
        if isinstance(extracted, Rejection):
            self._reject_now(
                {
                    "id": _reject_id(s.seed, "instructions", kind, attempt, result.text),
                    **base,
                    "reason": extracted.reason,
                    "text": result.text,
                }
            )
            return None
        score = novelty.max_similarity(extracted)
        if score > s.novelty_threshold:
            similar = novelty.top_similar(extracted, 1)
            self._reject_now(
                {
                    "id": _reject_id(s.seed, "instructions", kind, attempt, extracted),
                    **base,
                    "reason": "not_novel",
                    "instruction": extracted,
                    "max_rouge": score,
                    "most_similar": similar[0][0] if similar else None,
                }
            )
            return None
        novelty.add(extracted)
        accepted.append((attempt, extracted))
        self.summary.count("instructions", "accepted")
        self._event("instructions", "accepted", type=kind, attempt=attempt)
        return _Instruction(kind, len(accepted) - 1, attempt, extracted, score)

    def _reject_now(self, record: dict[str, Any]) -> None:
        self._reject(record)
        self.summary.count(record["stage"], "rejected", record["reason"])
        self._event(record["stage"], "rejected", reason=record["reason"], id=record["id"])

    # -- steps 2 and 3 --------------------------------------------------------------------

    async def _instance_worker(
        self, inbox: asyncio.Queue[_Item1], out: asyncio.Queue[_Item2]
    ) -> None:
        while (item := await inbox.get()) is not None:
            result = await self._instance(item)
            if isinstance(result, _Outcome):
                self._committer.offer(item.kind, item.index, result)
            else:
                await out.put(result)

    async def _instance(self, item: _Instruction) -> _Instance | _Outcome:
        s = self.settings
        instruction = clean_instruction(item.stored)
        prompt = build_instance_prompt(item.kind, item.stored, drop_eos=not s.keep_eos)
        request = s.instance_decoding.request(
            prompt, seed=derive_seed(s.seed, "instance", item.kind, item.index)
        )
        base = {"stage": "instances", "type": item.kind, "instruction": instruction}
        try:
            completion = (await self.writer.generate(request))[0]
        except BackendError as exc:
            reason = f"backend_error:{type(exc).__name__}"
            rid = _reject_id(s.seed, "instances", item.kind, item.index, instruction)
            return _Outcome("reject", {"id": rid, **base, "reason": reason, "error": str(exc)})
        parsed = parse_instance(
            item.kind,
            completion.text,
            first_line_only=s.first_line_only,
            reject_empty_input=s.reject_empty_input,
        )
        if isinstance(parsed, Rejection):
            rid = _reject_id(s.seed, "instances", item.kind, item.index, completion.text)
            return _Outcome(
                "reject", {"id": rid, **base, "reason": parsed.reason, "text": completion.text}
            )
        assert isinstance(parsed, ParsedInstance)
        self.summary.count("instances", "accepted")
        self._event("instances", "accepted", type=item.kind)
        rid = record_id(item.kind, instruction, parsed.input)
        if self.sink.has(rid):
            return _Outcome("skip", {"id": rid})
        return _Instance(item, rid, instruction, parsed.input, parsed.output, completion)

    # -- steps 4 and 5 --------------------------------------------------------------------

    async def _answer_worker(self, inbox: asyncio.Queue[_Item2]) -> None:
        while (inst := await inbox.get()) is not None:
            outcome = await self._answer(inst)
            self._committer.offer(inst.item.kind, inst.item.index, outcome)

    async def _answer(self, inst: _Instance) -> _Outcome:
        s = self.settings
        writer_candidate = {
            "index": 0,
            "source": self.writer.name,
            "status": "given",
            "text": inst.output,
            "error": None,
            "finish_reason": inst.completion.finish_reason,
            "completion_tokens": inst.completion.completion_tokens,
            "prompt_style": "instance",
        }
        if self.ensemble is None:
            selection = select([inst.output], threshold=s.consensus_threshold)
            candidates = [writer_candidate]
            decision = {**selection.to_dict(), "policy": s.consensus_policy}
        else:
            seed = derive_seed(s.seed, "answer", inst.item.kind, inst.item.index)
            prompts = {
                style: build_step4_prompt(style, inst.item.kind, inst.instruction, inst.input)
                for style in set(self.prompt_styles)
            }
            requests = [
                s.answer_decoding.request(prompts[style], seed=seed) for style in self.prompt_styles
            ]
            result = await self.ensemble.run(
                requests, given=[(self.writer.name, inst.output)], item_index=inst.item.index
            )
            candidates = [writer_candidate] + [
                _candidate(c, style)
                for c, style in zip(result.candidates[1:], self.prompt_styles, strict=True)
            ]
            selection = result.decision.selection
            decision = {
                **selection.to_dict(),
                "policy": s.consensus_policy,
                "complete": s.consensus_complete,
            }
            self.summary.count("answers", "accepted")
            failed = sum(c.status != "ok" for c in result.candidates[1:])
            self._event("answers", "accepted", type=inst.item.kind, failed=failed)
        provenance = {
            "writer": self.writer.name,
            "instruction_attempt": inst.item.attempt,
            "instruction_index": inst.item.index,
            "novelty_max_rouge": inst.item.novelty,
            "candidates": candidates,
            "decision": decision,
            "preset": s.name,
            "seed": s.seed,
        }
        if selection.index is None or selection.text is None:
            return _Outcome(
                "reject",
                {
                    "id": inst.id,
                    "stage": "consensus",
                    "reason": selection.rule,
                    "type": inst.item.kind,
                    "instruction": inst.instruction,
                    "input": inst.input,
                    "provenance": provenance,
                },
            )
        return _Outcome(
            "record",
            {
                "id": inst.id,
                "type": inst.item.kind,
                "instruction": inst.instruction,
                "input": inst.input,
                "output": selection.text,
                "provenance": provenance,
            },
        )


def _candidate(c: Candidate, style: PromptStyle) -> dict[str, Any]:
    """A candidate for provenance, without timings (records must not depend on timing)."""
    return {
        "index": c.index,
        "source": c.source,
        "status": c.status,
        "text": c.text,
        "error": c.error,
        "finish_reason": None if c.completion is None else c.completion.finish_reason,
        "completion_tokens": None if c.completion is None else c.completion.completion_tokens,
        "prompt_style": style,
    }
