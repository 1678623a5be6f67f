"""SPEC step 4: an answerer that is not instruction-tuned gets a few-shot prompt, an
instruction-tuned one the zero-shot ``instruction + "\\n" + input``."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Mapping, Sequence
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import pytest

from ensemble_async.backends.tgi import TGIBackend
from ensemble_async.member import Member
from ensemble_async.pipeline import Pipeline, PipelineSummary
from ensemble_async.presets import PipelineSettings
from ensemble_async.records import Deferred, Record, Reject, Slot
from ensemble_async.retry import RetryPolicy
from ensemble_async.seedtasks import load_seed_tasks
from ensemble_async.templates import (
    ANSWER_DEMOS,
    ANSWER_HEADER,
    EOS,
    INSTRUCTION_HEADER,
    build_answer_prompt,
    build_fewshot_answer_prompt,
    build_step4_prompt,
)
from ensemble_async.testing.ei_responder import EIResponder, true_answer
from ensemble_async.testing.tgi_double import TGIDouble

TARGETS = {"input_output": 12, "output": 8}


class FewShotAware:
    """``EIResponder`` that also answers the few-shot step-4 prompt: it reads the open
    ``instruction:``/``input:`` lines at the end and writes the true answer, then ``|EoS|``
    and a run-on demo (cut by the stop strings)."""

    def __init__(self, name: str) -> None:
        self.inner = EIResponder(name)

    def __call__(self, prompt: str, params: dict[str, Any]) -> str:
        if not prompt.startswith(ANSWER_HEADER):
            return self.inner(prompt, params)
        last = prompt.rsplit("\n\n", 1)[-1]
        assert last.endswith("\noutput:")
        fields = dict(line.split(": ", 1) for line in last.splitlines()[:-1])
        answer = true_answer(fields["instruction"], fields.get("input", ""))
        return f" {answer}\n{EOS}\n\ninstruction: more"


class ListSink:
    """An in-memory ``RecordSink``: records and rejects as their JSON objects."""

    def __init__(self) -> None:
        self.records: list[dict[str, Any]] = []
        self.rejects: list[dict[str, Any]] = []
        self.deferred: list[Deferred] = []
        self.summary: dict[str, Any] = {}

    def has(self, record_id: str) -> bool:
        return any(r["id"] == record_id for r in self.records)

    def decided(self, slot: Slot) -> Literal["record", "reject"] | None:
        return None

    async def submit(self, entry: Record | Reject) -> asyncio.Future[bool]:
        done: asyncio.Future[bool] = asyncio.get_running_loop().create_future()
        if isinstance(entry, Record):
            new = not self.has(entry.id)
            if new:
                self.records.append(entry.to_json())
        else:
            new = True
            self.rejects.append(entry.to_json())
        done.set_result(new)
        return done

    async def write_deferred(self, items: Sequence[Deferred]) -> None:
        self.deferred = list(items)

    async def write_summary(self, summary: Mapping[str, Any]) -> None:
        self.summary = dict(summary)


@dataclass
class Doubles:
    writer: TGIDouble
    tuned: TGIDouble
    base: TGIDouble


@asynccontextmanager
async def pipeline_run(
    sink: ListSink, **overrides: Any
) -> AsyncIterator[tuple[Pipeline, Doubles, PipelineSummary]]:
    async with AsyncExitStack() as stack:
        w = await stack.enter_async_context(TGIDouble(responder=FewShotAware("writer")))
        t = await stack.enter_async_context(TGIDouble(responder=FewShotAware("tuned")))
        b = await stack.enter_async_context(TGIDouble(responder=FewShotAware("base")))

        def member(url: str, name: str, *, tuned: bool = True) -> Member:
            m = Member(
                TGIBackend(url, name=name),
                concurrency=16,
                retry=RetryPolicy.never(),
                instruction_tuned=tuned,
            )
            stack.push_async_callback(m.aclose)
            return m

        writer = member(w.url, "writer")
        answerers = [member(t.url, "tuned"), member(b.url, "base", tuned=False)]
        overrides.setdefault("targets", dict(TARGETS))
        pipeline = Pipeline(
            writer=writer,
            answerers=answerers,
            seeds=load_seed_tasks(),
            settings=PipelineSettings.preset("default", **overrides),
            sink=sink,
            clock=lambda: "2026-01-01T00:00:00Z",
        )
        summary = await pipeline.run()
        yield pipeline, Doubles(w, t, b), summary


def _prompts(double: TGIDouble) -> list[str]:
    return [body["inputs"] for body in double.received]


async def test_base_answerer_gets_demos_and_tuned_one_the_bare_prompt() -> None:
    sink = ListSink()
    async with pipeline_run(sink) as (pipeline, doubles, summary):
        assert pipeline.prompt_styles == ["zero_shot", "few_shot"]
        tuned_prompts = _prompts(doubles.tuned)
        base_prompts = _prompts(doubles.base)
    assert summary.complete
    assert sink.records
    by_pair = {(r["instruction"], r["input"]): r for r in sink.records}
    answered = len(sink.records) + sum(rej["stage"] == "consensus" for rej in sink.rejects)
    # each answerer got one step-4 prompt per answered item, nothing else
    assert len(tuned_prompts) == len(base_prompts) == answered
    assert not any(p.startswith((ANSWER_HEADER, INSTRUCTION_HEADER)) for p in tuned_prompts)
    assert all(p.startswith(ANSWER_HEADER) for p in base_prompts)
    for (instruction, input_), rec in by_pair.items():
        assert build_answer_prompt(instruction, input_) in tuned_prompts
        fewshot = build_fewshot_answer_prompt(rec["type"], instruction, input_)
        assert fewshot in base_prompts
        # the kind's fixed demos, closed by the marker, and an open output line
        for demo in ANSWER_DEMOS[rec["type"]]:
            assert demo.render() + "\n\n" in fewshot
        assert fewshot.endswith(
            f"instruction: {instruction}\n" + (f"input: {input_}\n" if input_ else "") + "output:"
        )
        cands = rec["provenance"]["candidates"]
        assert [(c["source"], c["prompt_style"]) for c in cands] == [
            ("writer", "instance"),
            ("tuned", "zero_shot"),
            ("base", "few_shot"),
        ]
        # the base model's answer was cut at the marker: just the answer
        assert cands[2]["text"].strip() == true_answer(instruction, input_)
    # type-B items carry no input line
    assert any(r["type"] == "output" for r in sink.records)


async def test_all_tuned_answerers_get_only_zero_shot_prompts() -> None:
    sink = ListSink()
    async with AsyncExitStack() as stack:
        w = await stack.enter_async_context(TGIDouble(responder=FewShotAware("writer")))
        a = await stack.enter_async_context(TGIDouble(responder=FewShotAware("a")))
        members = [
            Member(TGIBackend(u, name=n), concurrency=8, retry=RetryPolicy.never())
            for u, n in ((w.url, "writer"), (a.url, "a"))
        ]
        for m in members:
            stack.push_async_callback(m.aclose)
        pipeline = Pipeline(
            writer=members[0],
            answerers=[members[1]],
            seeds=load_seed_tasks(),
            settings=PipelineSettings.preset("default", targets={"input_output": 4, "output": 0}),
            sink=sink,
        )
        await pipeline.run()
        prompts = _prompts(a)
    assert pipeline.prompt_styles == ["zero_shot"]
    assert prompts
    assert not any(p.startswith(ANSWER_HEADER) for p in prompts)
    assert {
        (c["source"], c["prompt_style"])
        for r in sink.records
        for c in r["provenance"]["candidates"]
    } == {("writer", "instance"), ("a", "zero_shot")}


async def test_few_shot_runs_are_deterministic() -> None:
    first, second = ListSink(), ListSink()
    async with pipeline_run(first, answer_concurrency=1, instance_concurrency=1):
        pass
    async with pipeline_run(second, answer_concurrency=16):
        pass
    assert first.records
    dump = [json.dumps(r, sort_keys=True) for r in first.records]
    assert dump == [json.dumps(r, sort_keys=True) for r in second.records]


def test_step4_prompt_styles() -> None:
    assert build_step4_prompt("zero_shot", "output", "Name a fruit.", "") == "Name a fruit.\n"
    assert build_step4_prompt("zero_shot", "input_output", "Sort.", "3, 1") == "Sort.\n3, 1"
    few_b = build_step4_prompt("few_shot", "output", " Name a fruit. ", "")
    assert few_b.startswith(ANSWER_HEADER + "\n\n")
    assert few_b.endswith("\n\ninstruction: Name a fruit.\noutput:")
    assert "input:" not in few_b  # type-B demos carry no input either
    few_a = build_step4_prompt("few_shot", "input_output", "Sort.", "3, 1")
    assert few_a.endswith("\n\ninstruction: Sort.\ninput: 3, 1\noutput:")
    assert few_a.count(EOS) == len(ANSWER_DEMOS["input_output"])
    # no blank line inside a demo: answering stops at "\n\n"
    for demos in ANSWER_DEMOS.values():
        assert all("\n\n" not in d.render() for d in demos)
    with pytest.raises(ValueError):
        build_step4_prompt("few_shot", "output", "  ", "")
    with pytest.raises(ValueError):
        build_step4_prompt("chat", "output", "x", "")  # type: ignore[arg-type]


def test_member_flag_comes_from_the_config(tmp_path: Path) -> None:
    from ensemble_async.assemble import make_member
    from ensemble_async.config import BackendConfig

    spec = BackendConfig(name="b", kind="tgi", url="http://127.0.0.1:9", instruction_tuned=False)
    backend = TGIBackend("http://127.0.0.1:9", name="b")
    assert make_member(spec, backend).instruction_tuned is False
    spec_t = BackendConfig(name="t", kind="tgi", url="http://127.0.0.1:9")
    assert make_member(spec_t, backend).instruction_tuned is True


async def test_member_snapshot_counts_cache_hits(tmp_path: Path) -> None:
    from ensemble_async.cache import ResponseCache
    from ensemble_async.types import GenerationRequest

    request = GenerationRequest(prompt="Name a fruit.\n", max_new_tokens=8)
    cache = ResponseCache(tmp_path / "c.sqlite")
    try:
        async with TGIDouble() as double:
            plain = Member(TGIBackend(double.url, name="plain"), retry=RetryPolicy.never())
            cached = Member(
                TGIBackend(double.url, name="c"),
                retry=RetryPolicy.never(),
                cache=cache,
                cache_identity="m",
            )
            for _ in range(3):
                await cached.generate(request)
            await plain.generate(request)
            snap = cached.snapshot()
            assert (snap["cache_hits"], snap["cache_misses"]) == (2, 1)
            assert snap["done"] == 1  # hits are not requests
            assert "cache_hits" not in plain.snapshot()
            assert len(double.received) == 2  # one miss, one plain call
            await cached.aclose()
            await plain.aclose()
    finally:
        await cache.aclose()
