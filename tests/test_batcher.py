"""The local-model batcher with a fake runner: no torch, no model.

The fake runner records each batch and can hold a batch "running" until the test lets
it go, so the tests decide exactly what is queued while what runs.
"""

from __future__ import annotations

import asyncio
import subprocess
import sys
import threading
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest

from ensemble_async.backends.transformers.batcher import Batcher, BatchOutcome, Job
from ensemble_async.errors import FatalError, NotFoundError, OverloadedError, ServerError

WAIT_S = 10.0


class FakeRunner:
    def __init__(self, *, hold_first: bool = False, load_error: BaseException | None = None):
        self.batches: list[list[str]] = []
        self.started = threading.Event()  # set when a batch starts
        self.release = threading.Event()  # a held batch runs on once set
        self.aborted = threading.Event()  # set when a held batch saw abort()
        self.hold_first = hold_first
        self.load_error = load_error
        self.unloaded = False
        self.fail_next: Exception | None = None

    def load(self) -> None:
        if self.load_error is not None:
            raise self.load_error

    def run(self, jobs: list[Job], abort: Callable[[], bool]) -> BatchOutcome:
        self.batches.append([j.payload for j in jobs])
        if self.fail_next is not None:
            exc, self.fail_next = self.fail_next, None
            raise exc
        if self.hold_first and len(self.batches) == 1:
            self.started.set()
            # Like generate(): check abort() at every step until let go.
            while not self.release.wait(0.005):
                if abort():
                    self.aborted.set()
                    return BatchOutcome()
        out = BatchOutcome()
        for j in jobs:
            out.results.append((j, f"done:{j.payload}", len(j.payload)))
        return out

    def unload(self) -> None:
        self.unloaded = True


async def _wait(event: threading.Event) -> None:
    assert await asyncio.to_thread(event.wait, WAIT_S), "timed out waiting for the worker"


def _job(payload: str, key: Any = "k", rows: int = 1, solo: bool = False) -> Job:
    return Job.create("generate", payload, key=key, rows=rows, solo=solo)


async def _result(job: Job) -> Any:
    assert job.future is not None
    return await asyncio.wait_for(job.future, WAIT_S)


@pytest.fixture
async def held() -> AsyncIterator[tuple[Batcher, FakeRunner]]:
    runner = FakeRunner(hold_first=True)
    batcher = Batcher("fake", runner, max_batch=4, window_s=0.0)
    yield batcher, runner
    runner.release.set()
    await batcher.aclose()


def test_importing_the_package_imports_no_torch() -> None:
    code = (
        "import sys\n"
        "import ensemble_async.backends.transformers\n"
        "import ensemble_async.backends.transformers.batcher\n"
        "print('torch' in sys.modules, 'transformers' in sys.modules)\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120
    )
    assert out.stdout.split() == ["False", "False"]


async def test_requests_queued_while_a_batch_runs_form_the_next_batch(
    held: tuple[Batcher, FakeRunner],
) -> None:
    batcher, runner = held
    first = _job("a")
    batcher.submit([first])
    await _wait(runner.started)
    later = [_job("b"), _job("c"), _job("d", key="other"), _job("e"), _job("f"), _job("g")]
    batcher.submit(later)
    assert batcher.queued == 6
    runner.release.set()
    results = [await _result(j) for j in [first, *later]]
    assert results == [f"done:{x}" for x in "abcdefg"]
    # Same key together, at most max_batch (4) rows; the other key alone.
    assert runner.batches == [["a"], ["b", "c", "e", "f"], ["d"], ["g"]]
    stats = batcher.stats
    assert stats.batches == 4 and stats.requests == 7 and stats.max_batch_requests == 4
    assert stats.batch_sizes == {1: 3, 4: 1}
    assert stats.generated_tokens == 7  # the fake counts one token per payload character


async def test_rows_count_against_the_batch_size(held: tuple[Batcher, FakeRunner]) -> None:
    batcher, runner = held
    batcher.submit([_job("a")])
    await _wait(runner.started)
    jobs = [_job("x", rows=3), _job("y", rows=2), _job("z", rows=1), _job("big", rows=9)]
    batcher.submit(jobs)
    runner.release.set()
    for j in jobs:
        await _result(j)
    # x (3) + z (1) fill 4 rows; y (2) next; a request bigger than a batch runs alone.
    assert runner.batches[1:] == [["x", "z"], ["y"], ["big"]]


async def test_solo_jobs_never_share_a_batch(held: tuple[Batcher, FakeRunner]) -> None:
    batcher, runner = held
    batcher.submit([_job("a")])
    await _wait(runner.started)
    jobs = [_job("s1", key=("solo", 1), solo=True), _job("s2", key=("solo", 2), solo=True)]
    batcher.submit(jobs)
    runner.release.set()
    for j in jobs:
        await _result(j)
    assert runner.batches[1:] == [["s1"], ["s2"]]


async def test_cancelling_a_queued_request_removes_it(held: tuple[Batcher, FakeRunner]) -> None:
    batcher, runner = held
    running = _job("a")
    batcher.submit([running])
    await _wait(runner.started)
    queued = _job("b")
    batcher.submit([queued])
    assert batcher.queued == 1
    batcher.cancel([queued])
    assert batcher.queued == 0
    with pytest.raises(asyncio.CancelledError):
        await _result(queued)
    runner.release.set()
    assert await _result(running) == "done:a"
    after = _job("c")
    batcher.submit([after])
    assert await _result(after) == "done:c"
    assert runner.batches == [["a"], ["c"]]  # the cancelled request never ran


async def test_cancelling_the_running_request_aborts_its_batch(
    held: tuple[Batcher, FakeRunner],
) -> None:
    batcher, runner = held

    async def call(payload: str) -> Any:
        job = _job(payload)
        batcher.submit([job])
        try:
            return await _result(job)
        except BaseException:
            batcher.cancel([job])
            raise

    task = asyncio.create_task(call("a"))
    await _wait(runner.started)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    await _wait(runner.aborted)  # the runner saw abort() turn true and stopped early
    assert not runner.release.is_set()
    assert await call("b") == "done:b"  # the worker goes on serving
    assert batcher.stats.requests == 1


async def test_close_fails_running_and_waiting_requests() -> None:
    runner = FakeRunner(hold_first=True)
    batcher = Batcher("fake", runner, max_batch=4, window_s=0.0)
    running = _job("a")
    batcher.submit([running])
    await _wait(runner.started)
    waiting = _job("b", key="other")
    batcher.submit([waiting])
    await asyncio.wait_for(batcher.aclose(), WAIT_S)
    for job in (running, waiting):
        with pytest.raises(FatalError, match="closed"):
            await _result(job)
    assert runner.aborted.is_set() and runner.unloaded
    with pytest.raises(FatalError, match="closed"):
        batcher.submit([_job("c")])
    assert not batcher.alive


async def test_a_load_failure_fails_every_request() -> None:
    runner = FakeRunner(load_error=NotFoundError("no such model", backend="fake"))
    batcher = Batcher("fake", runner)
    job = _job("a")
    batcher.submit([job])
    with pytest.raises(NotFoundError, match="no such model"):
        await _result(job)
    with pytest.raises(NotFoundError, match="no such model"):
        await asyncio.wrap_future(batcher.loaded)
    with pytest.raises(NotFoundError):
        batcher.submit([_job("b")])
    await batcher.aclose()

    plain = Batcher("fake", FakeRunner(load_error=OSError("disk")))
    job = _job("a")
    plain.submit([job])
    with pytest.raises(FatalError, match="could not load model"):
        await _result(job)
    await plain.aclose()


async def test_a_full_queue_is_overloaded(held: tuple[Batcher, FakeRunner]) -> None:
    _, runner = held
    batcher = Batcher("small", runner, max_queue=2, window_s=0.0)
    batcher.submit([_job("a")])
    await _wait(runner.started)
    batcher.submit([_job("b"), _job("c")])
    with pytest.raises(OverloadedError, match="queue full"):
        batcher.submit([_job("d")])
    runner.release.set()
    await batcher.aclose()


async def test_a_runner_crash_fails_the_batch_and_the_worker_goes_on() -> None:
    runner = FakeRunner()
    batcher = Batcher("fake", runner, window_s=0.0)
    runner.fail_next = RuntimeError("boom")
    job = _job("a")
    batcher.submit([job])
    with pytest.raises(ServerError, match="boom"):
        await _result(job)
    again = _job("b")
    batcher.submit([again])
    assert await _result(again) == "done:b"
    await batcher.aclose()


def test_bad_settings_are_rejected() -> None:
    runner = FakeRunner()
    with pytest.raises(ValueError, match="max_batch_size"):
        Batcher("x", runner, max_batch=0)
    with pytest.raises(ValueError, match="batch_window_s"):
        Batcher("x", runner, window_s=-1)
    with pytest.raises(ValueError, match="max_queue"):
        Batcher("x", runner, max_queue=0)
