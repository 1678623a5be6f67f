"""Resume is exact: an instruction slot is decided once; what a member's unavailability
left undecided is deferred and decided by the next run of the same command, which then
ends with exactly the records of an uninterrupted run."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Iterable
from contextlib import AsyncExitStack, asynccontextmanager
from pathlib import Path
from typing import Any

from ensemble_async import __version__
from ensemble_async.backends.openai import OpenAIBackend
from ensemble_async.backends.tgi import TGIBackend
from ensemble_async.member import Member
from ensemble_async.pipeline import Pipeline, PipelineSummary, ServedBy, _Committer, host_of
from ensemble_async.presets import PipelineSettings
from ensemble_async.records import Deferred
from ensemble_async.retry import RetryPolicy
from ensemble_async.seedtasks import load_seed_tasks
from ensemble_async.sink import AsyncRecordWriter
from ensemble_async.testing.ei_responder import EIResponder
from ensemble_async.testing.faults import Fault, FaultPlan
from ensemble_async.testing.openai_double import OpenAIDouble
from ensemble_async.testing.tgi_double import TGIDouble

RETRY_TWICE = RetryPolicy(max_attempts=2, initial_backoff_s=0.001, max_backoff_s=0.002)


class FailStep1Requests(FaultPlan):
    """HTTP 500 for the given step-1 requests of the writer (1-based, counted among the
    requests whose prompt is a step-1 prompt), normal answers otherwise."""

    def __init__(self, numbers: Iterable[int]) -> None:
        super().__init__()
        self.numbers = set(numbers)
        self.seen = 0
        self.double: TGIDouble | None = None

    def next(self) -> Fault | None:
        assert self.double is not None
        if not self.double.received[-1]["inputs"].startswith("List a series"):
            return None
        self.seen += 1
        return Fault.status(500) if self.seen in self.numbers else None


def _lines(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def _key(r: dict[str, Any]) -> tuple[str, str, str, str, int]:
    return (
        r["id"],
        r["instruction"],
        r["input"],
        r["output"],
        r["provenance"]["instruction_index"],
    )


@asynccontextmanager
async def _doubles(
    *,
    writer_faults: FaultPlan | None = None,
    answerer_up: bool = True,
    answerer_faults: FaultPlan | None = None,
) -> AsyncIterator[tuple[Member, list[Member]]]:
    async with AsyncExitStack() as stack:
        w = await stack.enter_async_context(
            TGIDouble(responder=EIResponder("writer"), faults=writer_faults)
        )
        if isinstance(writer_faults, FailStep1Requests):
            writer_faults.double = w
        a1 = await stack.enter_async_context(TGIDouble(responder=EIResponder("a1")))
        a2_url = "http://127.0.0.1:9"  # nothing listens: connection refused
        if answerer_up:
            a2 = await stack.enter_async_context(
                OpenAIDouble(responder=EIResponder("a2"), faults=answerer_faults)
            )
            a2_url = a2.url

        def member(backend: Any) -> Member:
            m = Member(backend, concurrency=16, retry=RETRY_TWICE)
            stack.push_async_callback(m.aclose)
            return m

        writer = member(TGIBackend(w.url, name="writer"))
        answerers = [
            member(TGIBackend(a1.url, name="a1")),
            member(OpenAIBackend(a2_url, name="a2", model="double-model")),
        ]
        yield writer, answerers


async def _run(
    out: Path,
    *,
    writer_faults: FaultPlan | None = None,
    answerer_up: bool = True,
    answerer_faults: FaultPlan | None = None,
    **overrides: Any,
) -> tuple[PipelineSummary, Pipeline]:
    overrides.setdefault("targets", {"input_output": 5, "output": 0})
    settings = PipelineSettings.preset("default", **overrides)
    async with (
        _doubles(
            writer_faults=writer_faults, answerer_up=answerer_up, answerer_faults=answerer_faults
        ) as (writer, answerers),
        await AsyncRecordWriter.open(out) as sink,
    ):
        pipeline = Pipeline(
            writer=writer,
            answerers=answerers,
            seeds=load_seed_tasks(),
            settings=settings,
            sink=sink,
            served_by={"writer": ServedBy("tgi", "127.0.0.1")},
            fingerprint="fp-test",
        )
        return await pipeline.run(), pipeline


async def test_a_writer_failing_transiently_is_reattempted_not_filled_twice(
    tmp_path: Path,
) -> None:
    # the uninterrupted, healthy run
    healthy = tmp_path / "healthy.jsonl"
    await _run(healthy, instruction_window=1)
    expected = _lines(healthy)
    assert len(expected) >= 3

    # step-1 requests #2 and #3 fail: the second attempt, and its one retry
    out = tmp_path / "records.jsonl"
    first, _ = await _run(out, writer_faults=FailStep1Requests({2, 3}), instruction_window=1)
    assert first.deferred == 1
    assert first.deferred_reasons == {"unavailable:ServerError": 1}
    assert first.attempts["input_output"] == 1  # the kind stopped at the failed attempt
    written = _lines(out)
    assert len(written) < len(expected)
    assert not any(
        r["reason"].startswith("backend_error")
        for r in _lines(out.with_name("records.rejects.jsonl"))
    )
    deferred = _lines(out.with_name("records.deferred.jsonl"))
    assert deferred == [
        {
            "stage": "instructions",
            "type": "input_output",
            "reason": "unavailable:ServerError",
            "seed": 42,
            "attempt": 1,
            "members": ["writer"],
        }
    ]

    # the same command again, the server healthy: it finishes, filling no slot twice
    second, _ = await _run(out, instruction_window=1)
    assert second.deferred == 0 and second.deferred_before == 1
    assert second.records_written == len(expected) - len(written)
    final = _lines(out)
    assert sorted(map(_key, final)) == sorted(map(_key, expected))
    slots = [(r["type"], r["provenance"]["instruction_index"]) for r in final]
    assert len(slots) == len(set(slots))
    assert not out.with_name("records.deferred.jsonl").exists()
    # a third run decides nothing again
    third, _ = await _run(out, instruction_window=1)
    assert (third.records_written, third.rejects_written) == (0, 0)
    assert third.records_present == len(expected)


async def test_items_short_of_candidates_are_deferred_then_finished(tmp_path: Path) -> None:
    targets = {"input_output": 6, "output": 4}
    healthy = tmp_path / "healthy.jsonl"
    await _run(healthy, targets=targets)
    expected = _lines(healthy)
    expected_rejects = _lines(healthy.with_name("healthy.rejects.jsonl"))

    out = tmp_path / "records.jsonl"
    first, pipeline = await _run(out, targets=targets, answerer_up=False)
    assert pipeline.min_candidates == 3  # the writer's output and both answerers
    assert first.deferred > 0 and first.deferred_reasons == {"unavailable:a2": first.deferred}
    assert first.records_written == 0
    rejects = _lines(out.with_name("records.rejects.jsonl"))
    assert not any(r["stage"] == "consensus" for r in rejects)  # nothing decided without a2
    deferred = _lines(out.with_name("records.deferred.jsonl"))
    assert len(deferred) == first.deferred
    assert all(d["stage"] == "answers" and d["members"] == ["a2"] for d in deferred)
    assert first.to_dict()["deferred"] == first.deferred
    summary_file = json.loads(out.with_name("records.summary.json").read_text())
    assert summary_file["deferred"] == first.deferred

    second, _ = await _run(out, targets=targets)
    assert second.deferred == 0
    final = _lines(out)
    assert sorted(map(_key, final)) == sorted(map(_key, expected))
    assert len({r["id"] for r in final}) == len(final)
    final_rejects = _lines(out.with_name("records.rejects.jsonl"))
    assert sorted(r["id"] for r in final_rejects) == sorted(r["id"] for r in expected_rejects)


def _always(status: int) -> FaultPlan:
    return FaultPlan(rate=1.0, choices=[Fault.status(status)])


async def test_a_member_refused_for_its_credentials_or_model_defers_never_decides_without_it(
    tmp_path: Path,
) -> None:
    """A 401/403 (key revoked mid-run) or a 404 (the server now serves another model)
    says the member cannot serve, not that the request is bad: nothing is decided
    without it and the same command, once it is fixed, finishes the dataset exactly."""
    targets = {"input_output": 4, "output": 2}
    healthy = tmp_path / "healthy.jsonl"
    await _run(healthy, targets=targets)
    expected = _lines(healthy)

    out = tmp_path / "records.jsonl"
    for status in (401, 404):
        first, _ = await _run(out, targets=targets, answerer_faults=_always(status))
        assert first.records_written == 0  # no consensus of the writer and a1 alone
        assert first.deferred > 0
        assert not _lines(out)
        assert not any(
            r["stage"] == "consensus" for r in _lines(out.with_name("records.rejects.jsonl"))
        )
        assert all(d["members"] == ["a2"] for d in _lines(out.with_name("records.deferred.jsonl")))

    # the writer refused in step 1: the kinds stop there (deferred), no attempt is burnt
    # as a permanent reject
    stopped, _ = await _run(out, targets=targets, writer_faults=_always(403))
    assert stopped.deferred == 2 and stopped.attempts == {"input_output": 0, "output": 0}
    assert not any(
        r["reason"].startswith("backend_error")
        for r in _lines(out.with_name("records.rejects.jsonl"))
    )

    second, _ = await _run(out, targets=targets)
    assert second.deferred == 0
    assert sorted(map(_key, _lines(out))) == sorted(map(_key, expected))


async def test_an_answerer_past_the_consensus_deadline_defers_the_item_not_rejects_it(
    tmp_path: Path,
) -> None:
    """At ``consensus_deadline_s`` the answers still missing are cancelled: too few
    candidates, because a member was too slow, leaves the slot open (deferred), never
    a permanent ``too-few-candidates`` reject."""
    targets = {"input_output": 3, "output": 1}
    healthy = tmp_path / "healthy.jsonl"
    await _run(healthy, targets=targets)
    expected = _lines(healthy)

    out = tmp_path / "records.jsonl"
    hang = FaultPlan(rate=1.0, choices=[Fault.hang()])
    first, _ = await _run(out, targets=targets, answerer_faults=hang, consensus_deadline_s=0.2)
    assert first.records_written == 0
    consensus = [
        r for r in _lines(out.with_name("records.rejects.jsonl")) if r["stage"] == "consensus"
    ]
    assert consensus == []
    assert first.deferred > 0
    assert all(d["members"] == ["a2"] for d in _lines(out.with_name("records.deferred.jsonl")))

    second, _ = await _run(out, targets=targets)
    assert second.deferred == 0
    assert sorted(map(_key, _lines(out))) == sorted(map(_key, expected))


async def test_fewer_candidates_may_decide_when_allowed(tmp_path: Path) -> None:
    out = tmp_path / "records.jsonl"
    settings = PipelineSettings.preset("default", targets={"input_output": 4, "output": 2})
    async with (
        _doubles(answerer_up=False) as (writer, answerers),
        await AsyncRecordWriter.open(out) as sink,
    ):
        summary = await Pipeline(
            writer=writer,
            answerers=answerers,
            seeds=load_seed_tasks(),
            settings=settings,
            sink=sink,
            min_candidates=2,
        ).run()
    assert summary.deferred == 0 and summary.records_written > 0
    for r in _lines(out):
        a2 = r["provenance"]["candidates"][2]
        assert a2["status"] == "unavailable" and a2["error"].startswith("ConnectError")


async def test_a_request_failing_for_its_own_reason_is_a_candidate_failure(
    tmp_path: Path,
) -> None:
    out = tmp_path / "records.jsonl"
    settings = PipelineSettings.preset("default", targets={"input_output": 4, "output": 2})
    async with AsyncExitStack() as stack:
        w = await stack.enter_async_context(TGIDouble(responder=EIResponder("writer")))
        a1 = await stack.enter_async_context(
            TGIDouble(responder=EIResponder("a1"), faults=FaultPlan(1.0, [Fault.status(400)]))
        )
        writer = Member(TGIBackend(w.url, name="writer"), retry=RETRY_TWICE)
        a1m = Member(TGIBackend(a1.url, name="a1"), retry=RETRY_TWICE)
        for m in (writer, a1m):
            stack.push_async_callback(m.aclose)
        sink = await stack.enter_async_context(await AsyncRecordWriter.open(out))
        summary = await Pipeline(
            writer=writer, answerers=[a1m], seeds=load_seed_tasks(), settings=settings, sink=sink
        ).run()
    assert summary.deferred == 0
    decided = _lines(out) + [
        r for r in _lines(out.with_name("records.rejects.jsonl")) if r["stage"] == "consensus"
    ]
    assert decided
    for r in decided:
        assert r["provenance"]["candidates"][1]["error"].startswith("BadRequestError")


async def test_writer_answer_kept_in_provenance_only(tmp_path: Path) -> None:
    out = tmp_path / "records.jsonl"
    settings = PipelineSettings.preset("default", targets={"input_output": 4, "output": 2})
    async with (
        _doubles() as (writer, answerers),
        await AsyncRecordWriter.open(out) as sink,
    ):
        pipeline = Pipeline(
            writer=writer,
            answerers=[writer, *answerers],
            seeds=load_seed_tasks(),
            settings=settings,
            sink=sink,
            writer_answers="provenance",
            served_by={
                "writer": ServedBy("tgi", host_of("http://u:secret@127.0.0.1:8080/x?key=k")),
                "a1": ServedBy("tgi", "127.0.0.1"),
                "a2": ServedBy("openai", "127.0.0.1"),
            },
            fingerprint="fp-1",
        )
        await pipeline.run()
    assert pipeline.voices == 3
    records = _lines(out)
    assert records
    for r in records:
        prov = r["provenance"]
        assert [c["source"] for c in prov["candidates"]] == ["writer", "a1", "a2"]
        assert prov["writer_answer"]["source"] == "writer"
        assert prov["writer_answer"]["status"] == "ok"
        assert prov["library_version"] == __version__
        assert prov["fingerprint"] == "fp-1"
        assert prov["created_at"].endswith("Z")
        assert prov["candidates"][0]["host"] == "127.0.0.1:8080"
        assert "secret" not in json.dumps(r) and "key=k" not in json.dumps(r)
        assert prov["candidates"][1]["model"] and prov["candidates"][2]["backend"] == "openai"


async def test_a_stalled_kind_bounds_what_the_committer_holds() -> None:
    committer = _Committer(room=3)
    admitted: list[int] = []

    async def produce() -> None:
        for index in range(10):
            await committer.admit("input_output", index)
            admitted.append(index)
            await committer.offer("input_output", index, Deferred("answers", "x", "r", 0))

    emitted: list[str] = []

    async def emit(kind: str, outcome: object) -> None:
        emitted.append(kind)

    producer = asyncio.create_task(produce())
    runner = asyncio.create_task(committer.run(emit))
    for _ in range(50):  # let every runnable task run until it blocks
        await asyncio.sleep(0)
    # input_output 0 was written; then "output" 0 is due and nothing of it exists yet:
    # input_output may hold only `room` more, and waits
    assert emitted == ["input_output"]
    assert admitted == [0, 1, 2, 3]
    assert committer.held == 3 and not producer.done()
    await committer.admit("output", 0)  # the one due is let in although the room is full
    await committer.offer("output", 0, Deferred("answers", "x", "r", 0))
    await committer.finish("output", 1)
    await asyncio.wait_for(producer, 5)
    await committer.finish("input_output", 10)
    await asyncio.wait_for(runner, 5)
    assert admitted == list(range(10))
    assert len(emitted) == 11 and committer.held == 0
    assert committer.most_held <= 3 + 1  # the room, and the one due


async def test_a_lagging_kind_runs_side_by_side_not_one_at_a_time() -> None:
    """The kind the held outcomes wait for may bring in its earlier turns all at once;
    before, each waited for the previous one's emission (a whole fleet run crawled at
    one instruction per round trip)."""
    committer = _Committer(room=3)
    emitted: list[tuple[str, int]] = []

    async def emit(kind: str, outcome: object) -> None:
        assert isinstance(outcome, Deferred)
        emitted.append((kind, outcome.instruction_index or 0))

    runner = asyncio.create_task(committer.run(emit))
    for index in range(4):  # input_output runs ahead: 0 is written, 1..3 wait for output
        await asyncio.wait_for(committer.admit("input_output", index), 5)
        await committer.offer(
            "input_output", index, Deferred("answers", "x", "r", 0, instruction_index=index)
        )
    for _ in range(50):
        await asyncio.sleep(0)
    assert emitted == [("input_output", 0)] and committer.held == 3
    # output 0, 1 and 2 all come before input_output 3: let in together, none written yet
    for index in range(3):
        await asyncio.wait_for(committer.admit("output", index), 5)
    assert emitted == [("input_output", 0)]
    # output 3 comes after everything let in and the room is full: it waits
    late = asyncio.create_task(committer.admit("output", 3))
    for _ in range(50):
        await asyncio.sleep(0)
    assert not late.done()
    for index in (2, 1, 0):  # finish in any order; written in turn order
        await committer.offer(
            "output", index, Deferred("answers", "x", "r", 0, instruction_index=index)
        )
    await asyncio.wait_for(late, 5)
    await committer.offer("output", 3, Deferred("answers", "x", "r", 0, instruction_index=3))
    await committer.finish("output", 4)
    await committer.finish("input_output", 4)
    await asyncio.wait_for(runner, 5)
    assert emitted == [(k, i) for i in range(4) for k in ("input_output", "output")]
    assert committer.most_held <= 2 * (3 + 1)  # room + 1 per kind


async def test_pipeline_holds_a_bounded_number_of_outcomes(tmp_path: Path) -> None:
    summary, pipeline = await _run(
        tmp_path / "r.jsonl", targets={"input_output": 40, "output": 10}, queue_size=4
    )
    assert summary.records_written > 10
    assert pipeline._committer.most_held <= 2 * (4 + 1)  # queue_size + 1 per kind
