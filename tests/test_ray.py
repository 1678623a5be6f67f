"""The Ray integration on a local cluster: a cluster-hosted model as an ensemble member,
recovery from a killed actor, and the ensemble as a Ray Data batch mapper.

One Ray instance serves the whole module (starting one takes seconds); the servers are
the project's doubles in subprocesses, so actors in other processes can reach them.
Skipped with a reason when Ray is not installed."""

from __future__ import annotations

import asyncio
import importlib.util
import json
import os
import signal
import subprocess
import sys
import textwrap
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
from served import Server

from ensemble_async.ensemble import Ensemble
from ensemble_async.member import Member
from ensemble_async.retry import RetryPolicy
from ensemble_async.types import GenerationRequest

if importlib.util.find_spec("ray") is None:
    pytest.skip("ray is not installed (the 'ray' extra)", allow_module_level=True)

import ray

from ensemble_async.errors import BadRequestError, ConnectError
from ensemble_async.ray import EnsembleMapper, RayBackend
from ensemble_async.ray.coalesce import Coalescer
from ensemble_async.ray.consensus import RayConsensus

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def cluster() -> Iterator[None]:
    ray.init(
        num_cpus=8,  # logical slots: actors here are I/O bound or tiny
        include_dashboard=False,
        log_to_driver=False,
        configure_logging=False,
    )
    try:
        yield
    finally:
        ray.shutdown()


@pytest.fixture(scope="module")
def doubles() -> Iterator[tuple[str, str]]:
    tgi = Server("tgi", "--latency", "0.05")
    oai = Server("openai", "--latency", "0.05")
    try:
        yield tgi.url, oai.url
    finally:
        tgi.stop()
        oai.stop()


def test_core_imports_every_module_without_ray() -> None:
    script = textwrap.dedent(
        """
        import importlib, pkgutil, sys
        class Absent:  # as if Ray were not installed: no finder knows it
            def find_spec(self, name, path=None, target=None):
                if name == "ray" or name.startswith("ray."):
                    raise ModuleNotFoundError(f"No module named {name!r}", name=name)
                return None
        sys.meta_path.insert(0, Absent())
        import ensemble_async
        names = [m.name for m in pkgutil.walk_packages(ensemble_async.__path__, "ensemble_async.")]
        core = [
            n for n in names
            if not n.startswith("ensemble_async.ray") and not n.endswith("__main__")
        ]
        for name in core:
            importlib.import_module(name)
        assert "ray" not in sys.modules
        try:
            importlib.import_module("ensemble_async.ray")
        except ImportError as exc:
            assert "ensemble-async[ray]" in str(exc), exc
        else:
            raise SystemExit("ensemble_async.ray imported without Ray")
        print(len(core))
        """
    )
    proc = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=120, check=False
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert int(proc.stdout.split()[-1]) > 30  # every core module was imported


async def test_cluster_hosted_model_is_one_member_and_matches_the_local_model(
    cluster: None, doubles: tuple[str, str]
) -> None:
    from ensemble_async.backends.transformers import TransformersBackend
    from ensemble_async.models import MissingModelError, embedded_backend_options

    try:
        options = embedded_backend_options("smollm2-135m-instruct")
    except MissingModelError as exc:
        pytest.skip(f"embedded SmolLM2 not available: {exc}")
    options.pop("name", None)
    prompts = [f"Name {k} fruits:" for k in range(2, 6)]
    requests = [GenerationRequest(prompt=p, max_new_tokens=8) for p in prompts]
    async with TransformersBackend(**options, threads=1) as local:
        expected = [(await local.generate(r))[0].text for r in requests]

    hosted = RayBackend(replicas=2, name="smol-on-ray", threads=1, **options)
    _, oai = doubles
    from ensemble_async.backends.openai import OpenAIBackend

    members = [Member(hosted, concurrency=8), Member(OpenAIBackend(oai, name="double"))]
    async with Ensemble(members) as ensemble:
        results = [r async for r in ensemble.map(requests, ordered=True)]
        info = await hosted.info()
        served = hosted.served()
    assert [r.candidates[0].source for r in results] == ["smol-on-ray"] * len(prompts)
    got = [r.candidates[0].completion for r in results]
    assert [c.text if c else None for c in got] == expected  # greedy: same text as local
    assert all(c is not None and c.backend == "smol-on-ray" for c in got)
    assert all(r.candidates[1].status == "ok" for r in results)
    assert info.kind == "transformers" and info.extra["replicas"] == 2
    assert info.extra["hosted_kind"] == "transformers"
    assert sum(served) == len(prompts) and min(served) >= 1  # both actors worked


async def test_a_killed_actor_is_restarted_and_its_requests_are_retried(
    cluster: None, doubles: tuple[str, str]
) -> None:
    _, oai = doubles
    backend = RayBackend(hosted_kind="openai", url=oai, replicas=2, num_cpus=0.5, name="proxied")
    member = Member(
        backend,
        concurrency=16,
        retry=RetryPolicy(max_attempts=6, initial_backoff_s=0.1, max_backoff_s=1.0),
    )
    async with member:
        pids = await backend.actor_pids()
        requests = [GenerationRequest(prompt=f"item {i}", max_new_tokens=4) for i in range(60)]
        tasks = [asyncio.create_task(member.generate(r)) for r in requests]
        _done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
        os.kill(pids[0], signal.SIGKILL)  # mid-run: other requests are in flight
        results = await asyncio.gather(*tasks)
        after = await backend.actor_pids()
    assert len(results) == 60 and all(len(r) == 1 and r[0].text for r in results)
    assert after[0] != pids[0]  # Ray restarted the actor in a new process
    assert member.stats.snapshot()["retried"] >= 1  # in-flight requests were sent again


class _Actor:
    """Stands in for an actor behind a Coalescer: answers ``f"<payload>!"``, fails the
    payloads named ``bad`` alone, ends a call carrying ``down`` before answering the
    rest (as a dead actor does), and holds the answer to ``slow`` until released while
    the rest of its call streams back."""

    def __init__(self) -> None:
        self.calls: list[list[tuple[int, Any]]] = []
        self.cancelled: list[int] = []
        self.release = asyncio.Event()
        self.called = asyncio.Event()

    async def send(self, batch: list[tuple[int, Any]]) -> AsyncIterator[tuple[int, Any]]:
        self.calls.append(batch)
        self.called.set()
        for key, payload in sorted(batch, key=lambda e: e[1] == "slow"):
            if payload == "down":
                return
            if payload == "slow":
                await self.release.wait()
            yield key, BadRequestError("no") if payload == "bad" else f"{payload}!"

    def cancel(self, keys: list[int]) -> None:
        self.cancelled.extend(keys)


def _queue(actor: _Actor, **options: Any) -> Coalescer:
    return Coalescer(actor.send, actor.cancel, lost=lambda: ConnectError("lost"), **options)


async def test_requests_of_one_tick_travel_as_one_call_each_with_its_own_outcome() -> None:
    actor = _Actor()
    queue = _queue(actor, max_batch=4)
    got = await asyncio.gather(
        *(queue.submit(p) for p in ["a", "bad", "c", "d", "e", "f"]), return_exceptions=True
    )
    assert [len(call) for call in actor.calls] == [4, 2]  # one tick, split at max_batch
    assert got[0] == "a!" and got[2:] == ["c!", "d!", "e!", "f!"]
    assert isinstance(got[1], BadRequestError)  # only that request failed
    down = await asyncio.gather(queue.submit("down"), queue.submit("x"), return_exceptions=True)
    assert all(isinstance(e, ConnectError) for e in down)  # what the dead call held
    assert await queue.submit("y") == "y!"  # and nothing else
    assert queue.batches == 4


async def test_a_slow_request_holds_back_no_other_of_its_call() -> None:
    actor = _Actor()
    queue = _queue(actor)
    slow = asyncio.create_task(queue.submit("slow"))
    quick = asyncio.create_task(queue.submit("quick"))
    assert await quick == "quick!"
    assert not slow.done() and len(actor.calls) == 1  # same call, answered apart
    actor.release.set()
    assert await slow == "slow!"


async def test_a_cancelled_request_leaves_its_batch_and_is_stopped_at_the_actor() -> None:
    actor = _Actor()
    queue = _queue(actor, window_s=60.0)
    early = asyncio.create_task(queue.submit("early"))
    await asyncio.sleep(0)  # let it queue
    early.cancel()
    with pytest.raises(asyncio.CancelledError):
        await early
    assert actor.calls == []  # not sent yet: taken out of the queue
    queue.window_s = 0.0
    held = [asyncio.create_task(queue.submit(p)) for p in ("slow", "other")]
    await actor.called.wait()
    key = actor.calls[0][0][0]
    held[0].cancel()
    with pytest.raises(asyncio.CancelledError):
        await held[0]
    assert actor.cancelled == [key]  # the actor is told to stop that request alone
    assert await held[1] == "other!"


async def test_close_fails_queued_and_in_flight_requests() -> None:
    actor = _Actor()
    queue = _queue(actor)
    held = asyncio.create_task(queue.submit("slow"))
    await actor.called.wait()
    await queue.aclose()
    with pytest.raises(ConnectError):
        await held


async def test_concurrent_requests_share_actor_calls_and_keep_their_order(
    cluster: None, doubles: tuple[str, str]
) -> None:
    _, oai = doubles
    backend = RayBackend(hosted_kind="openai", url=oai, replicas=2, num_cpus=0.5, name="batched")
    async with Member(backend, concurrency=64) as member:
        prompts = [f"item {i}" for i in range(48)]
        got = await asyncio.gather(
            *(member.generate(GenerationRequest(prompt=p, max_new_tokens=4)) for p in prompts)
        )
        loads = await backend.actor_loads()
        calls = backend.batches()
    from ensemble_async.backends.openai import OpenAIBackend

    async with OpenAIBackend(oai, name="direct") as direct:
        alone = [
            (await direct.generate(GenerationRequest(prompt=p, max_new_tokens=4)))[0].text
            for p in prompts
        ]
    assert [c[0].text for c in got] == alone  # each caller got its own answer
    assert sum(n for _, n in loads) == 48 and all(n > 0 for _, n in loads)  # both actors
    assert 2 <= calls < 48  # fewer actor calls than requests
    assert sum(b for b, _ in loads) == calls


async def test_consensus_decided_by_actors_is_the_decision_made_here(
    cluster: None, doubles: tuple[str, str]
) -> None:
    from ensemble_async.backends.openai import OpenAIBackend
    from ensemble_async.backends.tgi import TGIBackend

    tgi, oai = doubles
    items = [f"Write a sentence about topic {i}." for i in range(24)]
    # Two equal given candidates (a shortcut), an empty one, one that disagrees.
    texts = [("Same answer.", "same answer"), ("", "x"), ("a sentence", "about a topic")]
    given = [[("g1", texts[i % 3][0]), ("g2", texts[i % 3][1])] for i in range(24)]

    async def decisions(decide: RayConsensus | None) -> list[dict[str, Any]]:
        members = [TGIBackend(tgi, name="tgi"), OpenAIBackend(oai, name="vllm")]
        async with Ensemble(members, decide=decide) as ensemble:
            results = await asyncio.gather(
                *(ensemble.run(p, given=g) for p, g in zip(items, given, strict=True))
            )
        return [r.decision.to_dict() for r in results]

    expected = await decisions(None)
    consensus = RayConsensus(actors=2, num_cpus=0.5, max_in_flight=8)
    try:
        got = await decisions(consensus)
        stats = await consensus.stats()
    finally:
        await consensus.aclose()
    assert got == expected
    assert len({r["rule"] for r in expected}) > 1  # more than one kind of decision
    assert sum(n for _, n in stats) == len(items) and consensus.in_driver == 0
    assert all(pid != os.getpid() for pid, _ in stats)  # decided in the actors


async def test_items_of_a_dead_consensus_actor_are_decided_in_the_driver_the_same_way(
    cluster: None,
) -> None:
    from ensemble_async.consensus import IncrementalSelector

    texts = [["The cat sat.", "A cat sat", "Dogs bark"], ["x y", "x y z", ""], ["a", "A!"]]

    def selector(candidates: list[str]) -> IncrementalSelector:
        chosen = IncrementalSelector(len(candidates), finalize_complete=True)
        for i, text in enumerate(candidates):
            chosen.add(i, text)
        return chosen

    consensus = RayConsensus(actors=1, max_in_flight=2)
    try:
        await consensus.start()
        for decider in consensus._pool:  # the actor dies for good
            ray.kill(decider.actor, no_restart=True)
        got = [await consensus(selector(t)) for t in texts]
    finally:
        await consensus.aclose()
    assert got == [selector(t).finalize() for t in texts]
    assert consensus.in_driver == len(texts)


def test_ray_data_mapper_adds_the_decision_columns(cluster: None, doubles: tuple[str, str]) -> None:
    tgi, oai = doubles
    members: list[dict[str, Any]] = [
        {"kind": "tgi", "url": tgi, "name": "tgi"},
        {"kind": "openai", "url": oai, "name": "vllm", "concurrency": 4},
    ]
    prompts = [f"Question number {i}?" for i in range(10)]
    ds = ray.data.from_items([{"prompt": p, "id": i} for i, p in enumerate(prompts)])
    labelled = ds.map_batches(
        EnsembleMapper,
        fn_constructor_kwargs={"members": members, "max_new_tokens": 8},
        batch_size=4,
        concurrency=1,
        num_cpus=0.5,
    )
    rows = sorted(labelled.take_all(), key=lambda r: int(r["id"]))
    assert [r["prompt"] for r in rows] == prompts

    # The same items through an Ensemble in this process decide the same way.
    mapper = EnsembleMapper(members, max_new_tokens=8)
    try:
        direct = mapper({"prompt": prompts})
    finally:
        mapper.close()
    for i, row in enumerate(rows):
        assert bool(row["kept"]) == bool(direct["kept"][i])
        assert row["text"] == direct["text"][i] and row["rule"] == direct["rule"][i]
        candidates = json.loads(row["candidates"])
        assert [c["source"] for c in candidates] == ["tgi", "vllm"]
        assert all(c["status"] == "ok" for c in candidates)


def test_the_ray_data_example_runs_as_documented() -> None:
    example = Path(__file__).resolve().parent.parent / "examples" / "ray_label.py"
    proc = subprocess.run(
        [sys.executable, str(example)], capture_output=True, text=True, timeout=300, check=False
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = proc.stdout.strip().splitlines()
    assert lines[-1].endswith("of 6 kept")
    assert sum(1 for line in lines if line.split(":")[0].isdigit()) == 6
