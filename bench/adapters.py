"""Adapter throughput, side by side with a named baseline, in one run.

HTTP part: requests/s of each HTTP adapter against its test double (zero service time,
run in a separate process so client and server do not share a core), at concurrency 1,
64 and 256, next to a **raw aiohttp loop** sending the same JSON over one pooled session
(the baseline).  The openai SDK transport is measured too.  Target: each default
transport >= 0.8x raw aiohttp at concurrency 256.

Local part: tokens/s of the transformers adapter on SmolLM2-135M-Instruct with 8
concurrent requests, dynamically micro-batched vs one at a time (max_batch_size=1, the
baseline).  Target: >= 3x.

    python bench/adapters.py                 # both parts
    python bench/adapters.py --only http     # or: --only local
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing as mp
import os
import platform
import statistics
import sys
import time
from collections.abc import Awaitable, Callable
from multiprocessing.connection import Connection
from typing import Any

import aiohttp

from ensemble_async import GenerationRequest
from ensemble_async.backends.openai import OpenAIBackend
from ensemble_async.backends.tgi import TGIBackend

PROMPT = "Write one sentence about rivers."
MAX_NEW_TOKENS = 16
CONCURRENCY = (1, 64, 256)


# -- the double runs in its own process ------------------------------------------------


def _serve(kind: str, conn: Connection) -> None:
    async def main() -> None:
        if kind == "tgi":
            from ensemble_async.testing.tgi_double import TGIDouble

            double: Any = TGIDouble(max_concurrent_requests=1024)
        else:
            from ensemble_async.testing.openai_double import OpenAIDouble

            double = OpenAIDouble()
        url = await double.start()
        conn.send(url)
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(None, conn.recv)  # wait for "stop"
        await double.stop()

    asyncio.run(main())


class DoubleProcess:
    def __init__(self, kind: str) -> None:
        ctx = mp.get_context("spawn")
        self._conn, child = ctx.Pipe()
        self._proc = ctx.Process(target=_serve, args=(kind, child), daemon=True)

    def __enter__(self) -> str:
        self._proc.start()
        if not self._conn.poll(60):
            raise RuntimeError("test double did not start")
        url: str = self._conn.recv()
        return url

    def __exit__(self, *exc: object) -> None:
        self._conn.send("stop")
        self._proc.join(10)
        if self._proc.is_alive():
            self._proc.kill()


# -- load generator ---------------------------------------------------------------------


async def drive(call: Callable[[], Awaitable[object]], total: int, concurrency: int) -> float:
    """Run ``total`` calls with ``concurrency`` workers; return requests/s."""
    left = total

    async def worker() -> None:
        nonlocal left
        while left > 0:
            left -= 1
            await call()

    started = time.perf_counter()
    async with asyncio.TaskGroup() as tg:
        for _ in range(concurrency):
            tg.create_task(worker())
    return total / (time.perf_counter() - started)


def raw_call(
    session: aiohttp.ClientSession, url: str, payload: dict[str, Any], kind: str
) -> Callable[[], Awaitable[object]]:
    async def call() -> object:
        async with session.post(url, json=payload) as resp:
            body = await resp.read()
            if resp.status != 200:
                raise RuntimeError(f"raw request failed: {resp.status}")
        data = json.loads(body)
        return data["generated_text"] if kind == "tgi" else data["choices"][0]["text"]

    return call


async def measure_http(kind: str, base: str, repeats: int) -> list[dict[str, Any]]:
    request = GenerationRequest(prompt=PROMPT, max_new_tokens=MAX_NEW_TOKENS)
    if kind == "tgi":
        url = f"{base}/generate"
        payload: dict[str, Any] = {
            "inputs": PROMPT,
            "parameters": {"max_new_tokens": MAX_NEW_TOKENS, "do_sample": False, "details": True},
        }
    else:
        url = f"{base}/v1/completions"
        payload = {
            "model": "double-model",
            "prompt": PROMPT,
            "max_tokens": MAX_NEW_TOKENS,
            "temperature": 0.0,
        }
    rows: list[dict[str, Any]] = []
    connector = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(connector=connector) as session:
        contenders: dict[str, Callable[[], Awaitable[object]]] = {
            "raw aiohttp": raw_call(session, url, payload, kind)
        }
        backends: list[Any] = []
        if kind == "tgi":
            tgi = TGIBackend(base, session=session)
            backends.append(tgi)
            contenders["TGIBackend"] = lambda: tgi.generate(request)
        else:
            oa = OpenAIBackend(base, model="double-model", session=session)
            sdk = OpenAIBackend(base, model="double-model", transport="sdk")
            backends += [oa, sdk]
            contenders["OpenAIBackend (aiohttp)"] = lambda: oa.generate(request)
            contenders["OpenAIBackend (openai SDK)"] = lambda: sdk.generate(request)
        try:
            for call in contenders.values():  # warm-up: connections, imports
                await drive(call, 200, 16)
            for c in CONCURRENCY:
                total = 400 if c == 1 else 4000
                best: dict[str, float] = {}
                for _ in range(repeats):  # interleaved, best of N
                    for name, call in contenders.items():
                        rps = await drive(call, total, c)
                        best[name] = max(best.get(name, 0.0), rps)
                raw = best["raw aiohttp"]
                for name, rps in best.items():
                    rows.append(
                        {
                            "double": kind,
                            "concurrency": c,
                            "client": name,
                            "rps": rps,
                            "ratio": rps / raw,
                        }
                    )
        finally:
            for b in backends:
                await b.aclose()
    return rows


async def run_http(repeats: int) -> None:
    print("== HTTP adapters vs raw aiohttp (double in a separate process, zero service time)")
    print(f"{'double':<7} {'conc':>5}  {'client':<28} {'req/s':>9} {'vs raw':>7}")
    for kind in ("tgi", "openai"):
        with DoubleProcess(kind) as base:
            rows = await measure_http(kind, base, repeats)
        for r in rows:
            print(
                f"{r['double']:<7} {r['concurrency']:>5}  {r['client']:<28} "
                f"{r['rps']:>9.0f} {r['ratio']:>6.2f}x"
            )


# -- local transformers -----------------------------------------------------------------


async def run_local(max_new_tokens: int, rounds: int) -> None:
    from ensemble_async.backends.transformers import TransformersBackend
    from ensemble_async.models import embedded_backend_options

    prompts = [
        "Describe a quiet morning in a small town.",
        "Explain why the sky looks blue.",
        "Give advice to someone learning to cook.",
        "Write a short note thanking a neighbour.",
        "Summarise the plot of a detective story.",
        "List some uses of a paper clip.",
        "Explain how a bicycle stays upright.",
        "Describe the sound of rain on a roof.",
    ]
    options = embedded_backend_options("smollm2-135m-instruct")
    print(
        f"\n== transformers adapter, SmolLM2-135M-Instruct, {len(prompts)} concurrent requests, "
        f"max_new_tokens={max_new_tokens}, greedy, {os.cpu_count()} CPUs"
    )
    results: dict[str, float] = {}
    for label, batch in (
        ("one at a time (max_batch_size=1)", 1),
        ("micro-batched (max_batch_size=8)", 8),
    ):
        async with TransformersBackend(**{**options, "max_batch_size": batch}) as backend:
            warm = GenerationRequest(prompt="Hello", max_new_tokens=4)
            await backend.generate(warm)
            rates = []
            for _ in range(rounds):
                reqs = [
                    GenerationRequest(
                        prompt=p, max_new_tokens=max_new_tokens, min_new_tokens=max_new_tokens
                    )
                    for p in prompts
                ]
                started = time.perf_counter()
                outs = await asyncio.gather(*(backend.generate(r) for r in reqs))
                wall = time.perf_counter() - started
                tokens = sum(c.completion_tokens or 0 for out in outs for c in out)
                rates.append(tokens / wall)
            results[label] = statistics.median(rates)
            print(f"{label:<36} {results[label]:>8.1f} tokens/s (median of {rounds})")
    base, batched = results.values()
    print(f"{'ratio batched / one at a time':<36} {batched / base:>8.2f}x   (target >= 3x)")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--only", choices=("http", "local"))
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    print(
        f"# {time.strftime('%Y-%m-%d %H:%M')}  {platform.node()}  {platform.machine()}  "
        f"python {sys.version.split()[0]}  aiohttp {aiohttp.__version__}"
    )
    if args.only in (None, "http"):
        asyncio.run(run_http(args.repeats))
    if args.only in (None, "local"):
        asyncio.run(run_local(args.max_new_tokens, args.rounds))


if __name__ == "__main__":
    main()
