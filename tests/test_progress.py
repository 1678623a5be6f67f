"""Progress display: event counting, jsonl output, summary, rich rendering."""

from __future__ import annotations

import asyncio
import io
import json
from typing import Any

import pytest
from rich.console import Console

from ensemble_async.progress import Progress


class FakeMember:
    def __init__(self, name: str, **snap: Any) -> None:
        self.name = name
        self.snap = {
            "name": name,
            "in_flight": 2,
            "done": 10,
            "requests_per_s": 3.5,
            "tokens_per_s": 120.0,
            "latency_s": {"p50": 0.25, "p95": 0.75},
            "errors": {"ServerError": 1},
            "breaker": "closed",
            **snap,
        }
        self.calls = 0
        self.want = 0
        self.polled = asyncio.Event()

    def snapshot(self) -> dict[str, Any]:
        self.calls += 1
        if self.want and self.calls >= self.want:
            self.polled.set()
        return dict(self.snap)


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def feed(p: Progress) -> None:
    p.event("instructions", "started", targets={"input_output": 3, "output": 1})
    for _ in range(4):
        p.event("instructions", "accepted", type="output")
    p.event("instructions", "rejected", reason="too_short", id="r1")
    p.event("instructions", "rejected", reason="too_short", id="r2")
    p.event("instructions", "rejected", reason="novelty", id="r3")
    p.event("instances", "rejected", reason="no_input_label", id="r4")
    p.event("consensus", "accepted", id="ei-1")
    p.event("consensus", "skipped", id="ei-0")
    p.event("consensus", "rejected", reason="below-threshold", id="r5")
    p.event("instructions", "exhausted", type="output")


def test_counts_and_reason_tallies() -> None:
    p = Progress("quiet", console=Console(file=io.StringIO()))
    feed(p)
    ins = p.stages["instructions"]
    assert (ins.accepted, ins.rejected, ins.target) == (4, 3, 4)
    assert ins.reasons == {"too_short": 2, "novelty": 1}
    assert ins.other == {"exhausted": 1}
    assert p.stages["instances"].reasons == {"no_input_label": 1}
    cons = p.stages["consensus"]
    assert (cons.accepted, cons.skipped, cons.rejected) == (1, 1, 1)
    # written (1) + already there (1) + rejected after step 1 (instances 1, consensus 1)
    assert p.items_finished() == 4
    assert p.events == 13


def test_eta_extrapolates_from_finished_items() -> None:
    clock = Clock()
    p = Progress("quiet", console=Console(file=io.StringIO()), clock=clock)
    assert p.eta_s() is None
    p.event("instructions", "started", targets={"input_output": 4})
    p.event("consensus", "accepted", id="a")
    clock.now += 10.0  # one of four items in 10 s -> 30 s left
    assert p.eta_s() == pytest.approx(30.0)
    p.event("instances", "rejected", reason="x", id="b")  # two of four in 10 s -> 10 s
    assert p.eta_s() == pytest.approx(10.0)
    p.event("consensus", "done")
    assert p.eta_s() == 0.0


async def test_jsonl_mode_writes_parseable_lines_without_secrets() -> None:
    log = io.StringIO()
    member = FakeMember("gpu1")
    p = Progress("jsonl", members=[member], console=Console(file=io.StringIO()), log=log)
    async with p:
        p.log_start(config="x.toml", backends=[{"name": "gpu1", "api_key_env": "K"}])
        feed(p)
        p.event("answers", "accepted", api_key="sk-LEAK", nested={"Authorization": "Bearer x"})
        p.write_stats()
    record = p.summary({"records_written": 1})
    lines = [json.loads(line) for line in log.getvalue().splitlines()]
    assert "sk-LEAK" not in log.getvalue() and "Bearer x" not in log.getvalue()
    assert lines[0]["type"] == "start" and lines[0]["config"] == "x.toml"
    events = [x for x in lines if x["type"] == "event"]
    assert len(events) == 14
    assert {k: v for k, v in events[5].items() if k != "t"} == {
        "type": "event",
        "stage": "instructions",
        "kind": "rejected",
        "fields": {"reason": "too_short", "id": "r1"},
    }
    assert events[1]["fields"] == {"type": "output"}  # a field named "type" is kept apart
    assert lines[0]["backends"] == [{"name": "gpu1", "api_key_env": "K"}]
    stats = [x for x in lines if x["type"] == "stats"]
    assert stats and stats[0]["backends"][0]["name"] == "gpu1"
    summary = lines[-1]
    assert summary["type"] == "summary" and summary["status"] == "finished"
    assert summary["pipeline"] == {"records_written": 1}
    assert summary["stages"]["instructions"]["reasons"] == {"too_short": 2, "novelty": 1}
    assert record["events"] == 14


async def test_periodic_task_is_cancelled_on_exit() -> None:
    log = io.StringIO()
    member = FakeMember("m")
    member.want = 2
    p = Progress("jsonl", members=[member], log=log, stats_interval_s=0.001)
    async with p:
        task = p._task
        assert task is not None
        await member.polled.wait()  # the periodic task polls the member
    assert task.done() and task.cancelled()
    lines = [json.loads(line) for line in log.getvalue().splitlines()]
    assert all(x["type"] == "stats" for x in lines) and len(lines) >= 2


def test_quiet_mode_prints_only_the_summary() -> None:
    out = io.StringIO()
    p = Progress("quiet", members=[FakeMember("gpu-a")], console=Console(file=out, width=200))
    feed(p)
    assert out.getvalue() == ""
    p.summary({"records_written": 1, "exhausted": {}})
    text = out.getvalue()
    assert "finished" in text and "gpu-a" in text
    assert "too_short: 2" in text and "novelty: 1" in text
    assert "4/4" in text  # instructions: accepted/target
    assert "records_written" in text


async def test_rich_mode_renders_without_errors() -> None:
    out = io.StringIO()
    console = Console(file=out, width=200, force_terminal=True, color_system=None)
    members = [FakeMember("gpu-a"), FakeMember("gpu-b", breaker="open", in_flight=0)]
    p = Progress("rich", members=members, console=console, interval_s=0.001)
    async with p:
        feed(p)
        members[0].want = members[0].calls + 3
        p.refresh()
        await members[0].polled.wait()  # redrawn by the periodic task too
    p.summary(None, status="interrupted")
    text = out.getvalue()
    for needle in ("gpu-a", "gpu-b", "open", "0.25s", "0.75s", "ServerError: 1", "ETA"):
        assert needle in text, needle
    assert "interrupted" in text
    assert p._live is None and p._task is None


def test_bad_mode_is_refused() -> None:
    with pytest.raises(ValueError, match="mode"):
        Progress("fancy")  # type: ignore[arg-type]
