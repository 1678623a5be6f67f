"""Label a Ray Dataset with an ensemble: each Ray Data actor runs its own ensemble
(connection pools, breakers and retries live as long as the actor) and adds the
decision columns ``kept``, ``text``, ``rule``, ``winner`` and ``candidates``.

Runs anywhere as it is: it starts the project's TGI and vLLM-style test doubles on
loopback and a local Ray instance.  Give real servers with ``--tgi URL`` and
``--openai URL``, and a running cluster with ``--address auto``.

    python examples/ray_label.py
    python examples/ray_label.py --tgi http://gpu1:8080 --openai http://gpu2:8000 --address auto
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from typing import Any

import ray

from ensemble_async.ray import EnsembleMapper

QUESTIONS = [
    "What is the boiling point of water at sea level in Celsius?",
    "Name the largest planet in the solar system.",
    "How many legs does a spider have?",
    "What colour do you get by mixing blue and yellow?",
    "Which gas do plants take in from the air?",
    "How many days are there in a leap year?",
]


def start_double(kind: str) -> tuple[subprocess.Popen[str], str]:
    proc = subprocess.Popen(
        [sys.executable, "-m", "ensemble_async.testing.serve", kind, "--ei", "answer-lm"],
        stdout=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout is not None
    line = proc.stdout.readline()  # the double prints its URL once it listens
    if not line.startswith("URL "):
        raise SystemExit(f"the {kind} double did not start: {line!r}")
    return proc, line.split()[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--tgi", help="base URL of a TGI server")
    parser.add_argument("--openai", help="base URL of an OpenAI-compatible server")
    parser.add_argument("--address", help="Ray cluster address (default: start a local one)")
    args = parser.parse_args()

    doubles: list[subprocess.Popen[str]] = []
    tgi, oai = args.tgi, args.openai
    if tgi is None:
        proc, tgi = start_double("tgi")
        doubles.append(proc)
    if oai is None:
        proc, oai = start_double("openai")
        doubles.append(proc)
    members: list[dict[str, Any]] = [
        {"kind": "tgi", "url": tgi, "name": "tgi"},
        {"kind": "openai", "url": oai, "name": "vllm", "concurrency": 16},
    ]
    try:
        ray.init(address=args.address, include_dashboard=False, log_to_driver=False)
        ds = ray.data.from_items([{"id": i, "prompt": q} for i, q in enumerate(QUESTIONS)])
        labelled = ds.map_batches(
            EnsembleMapper,
            fn_constructor_kwargs={"members": members, "max_new_tokens": 32},
            batch_size=4,
            concurrency=1,
            num_cpus=0.5,
        )
        rows = sorted(labelled.take_all(), key=lambda r: int(r["id"]))
        for row in rows:
            verdict = "kept" if row["kept"] else f"dropped ({row['rule']})"
            print(f"{row['id']}: {verdict}: {str(row['text'])[:60]!r}")
        print(f"{sum(bool(r['kept']) for r in rows)} of {len(rows)} kept")
    finally:
        ray.shutdown()
        for proc in doubles:
            proc.terminate()
            proc.wait(10)


if __name__ == "__main__":
    main()
