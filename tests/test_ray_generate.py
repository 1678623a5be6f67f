"""``generate --ray`` on a two-node cluster (``ray.cluster_utils.Cluster`` on this
machine): the members' calls and the consensus decisions are made by Ray actors spread
over the nodes, while step 1, the novelty pool, the records and the cache stay in the
driver.

Against deterministic doubles it writes the same records as the single-process run, and
a worker process killed mid-run loses nothing and duplicates nothing (the member retries
the calls the dead actor held; Ray restarts the actor).  Skipped without Ray."""

from __future__ import annotations

import importlib.util
import json
import os
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from served import Server
from test_cli_generate import config_text, write_config

from ensemble_async import cli

if importlib.util.find_spec("ray") is None:
    pytest.skip("ray is not installed (the 'ray' extra)", allow_module_level=True)

import ray
from ray.cluster_utils import Cluster

from ensemble_async.ray.consensus import RayConsensus

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def cluster() -> Iterator[str]:
    nodes = Cluster(initialize_head=True, head_node_args={"num_cpus": 4})
    nodes.add_node(num_cpus=4)
    ray.init(address=nodes.address, log_to_driver=False, configure_logging=False)
    try:
        yield str(nodes.address)
    finally:
        ray.shutdown()
        nodes.shutdown()  # type: ignore[no-untyped-call]


@pytest.fixture(scope="module")
def servers() -> Iterator[tuple[str, str]]:
    tgi = Server("tgi", "--ei", "writer-lm", "--latency", "0.01")
    oai = Server("openai", "--ei", "answer-lm", "--latency", "0.01")
    try:
        yield tgi.url, oai.url
    finally:
        tgi.stop()
        oai.stop()


def host_pids() -> set[int]:
    """The processes of live ``BackendHost`` actors (Ray titles them ``ray::BackendHost``)."""
    pids = set()
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                title = (entry / "cmdline").read_bytes()
            except OSError:
                continue
            if title.startswith(b"ray::BackendHost"):
                pids.add(int(entry.name))
    return pids


def records(path: Path) -> list[tuple[str, str, str, str]]:
    lines = [json.loads(line) for line in path.read_text().splitlines()]
    return sorted((r["id"], r["instruction"], r["input"], r["output"]) for r in lines)


def _config(servers: tuple[str, str], out: Path, *, io_n: int = 8, o_n: int = 4) -> str:
    return config_text(servers[0], servers[1], out, io_n=io_n, o_n=o_n).replace(
        "concurrency = 8", "concurrency = 8\nmax_attempts = 6"
    )


def test_generate_on_a_cluster_writes_what_one_process_writes(
    cluster: str, servers: tuple[str, str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    here = write_config(tmp_path / "here.toml", _config(servers, tmp_path / "here" / "r.jsonl"))
    there = write_config(tmp_path / "there.toml", _config(servers, tmp_path / "there" / "r.jsonl"))
    assert cli.main(["generate", "--config", str(here), "--quiet"]) == cli.EXIT_OK
    deciders: list[tuple[int, int]] = []
    close = RayConsensus.aclose

    async def read_then_close(self: RayConsensus) -> None:  # what the actors decided
        deciders.extend(await self.stats())
        await close(self)

    monkeypatch.setattr(RayConsensus, "aclose", read_then_close)
    assert cli.main(["generate", "--config", str(there), "--quiet", "--ray", cluster]) == 0
    expected = records(tmp_path / "here" / "r.jsonl")
    assert expected and records(tmp_path / "there" / "r.jsonl") == expected
    rejects = [json.loads(line) for line in (tmp_path / "there" / "r.rejects.jsonl").open()]
    decided = len(expected) + sum(r["stage"] == "consensus" for r in rejects)
    assert sum(n for _, n in deciders) == decided  # every consensus decision ...
    assert all(pid != os.getpid() for pid, _ in deciders)  # ... made off the driver


def test_a_killed_worker_loses_and_duplicates_nothing(
    cluster: str, servers: tuple[str, str], tmp_path: Path
) -> None:
    # Big enough that the run is still going when its first records are on disk (a
    # faster client once let a smaller run end before the kill).
    size = {"io_n": 48, "o_n": 24}
    plain = write_config(
        tmp_path / "plain.toml", _config(servers, tmp_path / "plain" / "r.jsonl", **size)
    )
    assert cli.main(["generate", "--config", str(plain), "--quiet"]) == cli.EXIT_OK
    out = tmp_path / "killed" / "r.jsonl"
    cfg = write_config(tmp_path / "killed.toml", _config(servers, out, **size))
    result: dict[str, Any] = {}

    def run() -> None:
        result["code"] = cli.main(["generate", "--config", str(cfg), "--quiet", "--ray", cluster])

    before = host_pids()
    worker = threading.Thread(target=run)
    worker.start()
    victim = None
    deadline = time.monotonic() + 60
    while victim is None and worker.is_alive() and time.monotonic() < deadline:
        fresh = sorted(host_pids() - before)
        if fresh and out.exists() and out.stat().st_size > 0:  # mid-run: records written
            victim = fresh[0]
            os.kill(victim, signal.SIGKILL)
        time.sleep(0.01)  # polling another process's state: there is no event to await
    worker.join(180)
    assert victim is not None, "the run ended before a worker could be killed"
    assert result.get("code") == cli.EXIT_OK
    got = records(out)
    assert len({r[0] for r in got}) == len(got)  # no duplicates
    assert got == records(tmp_path / "plain" / "r.jsonl")  # nothing lost
