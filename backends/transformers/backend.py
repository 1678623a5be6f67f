"""``TransformersBackend``: the asyncio face of a local model (kind ``transformers``).

It turns requests into :class:`~.batcher.Job` objects, hands them to the
:class:`~.batcher.Batcher` (queue + worker thread) and awaits the results; the
:class:`~.runner.ModelRunner` does the model work in the worker thread.  Process-wide
settings (torch's thread count, the HF hub's offline switch) are made here, on the
thread that builds or first uses the backend, never from a worker thread.
"""

from __future__ import annotations

import asyncio
import importlib
import math
import time
from collections.abc import AsyncGenerator, Hashable, Sequence
from pathlib import Path
from typing import Any, Self

from ensemble_async.backend import BaseBackend
from ensemble_async.errors import BadRequestError
from ensemble_async.models import check_source, set_offline_environment, set_torch_threads
from ensemble_async.scoring import CompletionScore, ScoreRequest, ScoringUnsupportedError
from ensemble_async.types import (
    BackendInfo,
    Completion,
    GenerationRequest,
    Health,
    StreamEvent,
)

from .batcher import Batcher, BatchStats, Job
from .runner import EXTRA_GENERATE_FIELDS, ModelRunner, RunnerOptions

__all__ = ["TransformersBackend"]


class TransformersBackend(BaseBackend):
    """A local causal LM (a transformers directory, a GGUF file or a cached hub id).

    ``model`` is a local directory or ``.gguf`` path (``gguf_file`` names the file
    inside ``model``), or a hub id already in the local Hugging Face cache; GGUF files
    are converted once and cached (see ``ensemble_async.models``).  Finding the model
    (the HF cache lookup) happens in the worker thread; only cheap checks of a local path
    happen here.  ``device`` is ``"cpu"`` (the default), ``"cuda"``, ``"cuda:N"`` or
    ``"auto"`` (CUDA when torch sees a GPU, else CPU).  ``dtype="auto"`` is float32 on
    CPU and bfloat16 on a GPU that supports it.  ``threads`` sets torch's intra-op
    threads (process-wide, set from the calling thread on first use); on a small shared
    CPU, 1 is often fastest.  ``chat_template``: True uses the tokenizer's template (or
    the model family's when the tokenizer has none), a string is a Jinja template, False
    renders messages as plain ``Role: text`` lines.  ``max_queue`` bounds waiting
    requests (beyond it ``OverloadedError``).  ``max_batch_size`` counts rows (a prompt
    times ``n``, or one scored completion).  The model loads in the worker thread on
    first use, or in ``start()`` / ``async with``.

    Batching rules: requests batch when they decode the same way (same
    ``max_new_tokens``, ``min_new_tokens``, ``stop``, whitelisted ``extra``; for sampling
    also ``temperature``, ``top_p``, ``top_k``).  A *seeded* sampling request runs as its
    own batch with its own random generator, so the same seed gives the same text
    whatever else is queued or runs in other backends.  Scoring requests batch with each
    other.  Only ``repetition_penalty``, ``no_repeat_ngram_size``, ``min_p`` and
    ``typical_p`` of ``extra`` are used.
    """

    kind = "transformers"
    requires = ("model",)

    def __init__(
        self,
        model: str,
        *,
        gguf_file: str | None = None,
        name: str | None = None,
        device: str = "cpu",
        dtype: str = "auto",
        max_batch_size: int = 8,
        batch_window_s: float = 0.005,
        threads: int | None = None,
        chat_template: bool | str = True,
        max_queue: int = 4096,
        cache_dir: str | None = None,
    ) -> None:
        if threads is not None and threads < 1:
            raise ValueError(f"threads must be >= 1 or None, got {threads}")
        if not (device in ("cpu", "cuda", "auto") or device.startswith(("cuda:", "mps"))):
            raise ValueError(f"device must be cpu, cuda, cuda:N or auto, got {device!r}")
        label = check_source(model, gguf_file)  # MissingModelError early for a local path
        super().__init__(name=name or label)
        set_offline_environment()  # before huggingface_hub is imported, on this thread
        self._label = label
        self._device = device
        self._dtype = dtype
        self._threads = threads
        self._prepared = False
        self._runner = ModelRunner(
            self.name,
            label,
            RunnerOptions(
                model=str(model),
                gguf_file=gguf_file,
                device=device,
                dtype=dtype,
                chat_template=chat_template,
                cache_root=Path(cache_dir).expanduser() if cache_dir else None,
                max_batch=max_batch_size,
            ),
        )
        self._batcher = Batcher(
            self.name,
            self._runner,
            max_batch=max_batch_size,
            window_s=batch_window_s,
            max_queue=max_queue,
        )
        self._solo = 0

    # ------------------------------------------------------------------ lifecycle

    async def _prepare(self) -> None:
        """Process-wide settings, made once from this (the loop's) thread, then the worker."""
        if not self._prepared:
            if self._threads is not None:
                await asyncio.to_thread(importlib.import_module, "torch")  # slow: off the loop
                set_torch_threads(self._threads)
            self._prepared = True
        self._batcher.start()

    async def start(self) -> None:
        """Start the worker and wait until the model is loaded (without blocking the loop)."""
        await self._prepare()
        await asyncio.wrap_future(self._batcher.loaded)

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def aclose(self) -> None:
        """Stop the worker: waiting and running requests fail with ``FatalError``."""
        await self._batcher.aclose()

    @property
    def loaded(self) -> bool:
        return self._runner.model is not None

    @property
    def model(self) -> Any:
        """The loaded transformers model (None before loading and after closing)."""
        return self._runner.model

    @property
    def tokenizer(self) -> Any:
        """The loaded tokenizer (None before loading).

        The worker thread uses it while requests run; fast tokenizers are not safe to
        call from two threads at once, so use it only while the backend is idle.
        """
        return self._runner.tok

    @property
    def eos_token_ids(self) -> frozenset[int]:
        """Token ids that end a completion: the model's EOS and the end-of-turn tokens."""
        return self._runner.eos_ids

    @property
    def chat_template(self) -> str | None:
        """The Jinja chat template in use (None: messages are rendered as plain text)."""
        return self._runner.template

    @property
    def device(self) -> str:
        """Where the model runs: the option before loading, the model's device after."""
        model = self._runner.model
        return str(model.device) if model is not None else self._device

    @property
    def load_seconds(self) -> float | None:
        """How long loading took (conversion included when it happened), once loaded."""
        return self._runner.load_s

    @property
    def stats(self) -> BatchStats:
        return self._batcher.stats

    @property
    def queued(self) -> int:
        """Requests waiting for a batch (not counting the one running)."""
        return self._batcher.queued

    # ------------------------------------------------------------------ generation

    async def generate(self, request: GenerationRequest) -> list[Completion]:
        (result,) = await self.generate_many([request])
        return result

    async def generate_many(self, requests: Sequence[GenerationRequest]) -> list[list[Completion]]:
        """Queue several requests at once (so they can share batches); results in order."""
        if not requests:
            return []
        await self._prepare()
        jobs = [self._generation_job(r, stream=False) for r in requests]
        self._batcher.submit(jobs)
        futures = [j.future for j in jobs if j.future is not None]
        try:
            return list(await asyncio.gather(*futures))
        except BaseException:
            self._batcher.cancel(jobs)
            raise

    async def stream(self, request: GenerationRequest) -> AsyncGenerator[StreamEvent, None]:
        """Text deltas as they are generated, then one ``Completion`` (``n`` must be 1).

        The deltas concatenate to the completion's text.
        """
        if request.n != 1:
            raise BadRequestError("streaming needs n == 1", backend=self.name)
        await self._prepare()
        job = self._generation_job(request, stream=True)
        self._batcher.submit([job])
        assert job.events is not None
        try:
            while True:
                item = await job.events.get()
                if isinstance(item, BaseException):
                    raise item
                yield item
                if isinstance(item, Completion):
                    return
        finally:
            if not job.done:
                self._batcher.cancel([job])

    def _generation_job(self, request: GenerationRequest, *, stream: bool) -> Job:
        sampling = request.temperature > 0
        seeded = sampling and request.seed is not None
        key: Hashable
        if seeded:
            self._solo += 1
            key = ("solo", self._solo)
        else:
            extras = tuple(
                (k, repr(request.extra[k])) for k in EXTRA_GENERATE_FIELDS if k in request.extra
            )
            key = (
                "generate",
                sampling,
                request.temperature if sampling else 0.0,
                request.top_p if sampling else 1.0,
                request.top_k if sampling else None,
                request.max_new_tokens,
                request.min_new_tokens or 0,
                request.stop,
                extras,
            )
        return Job.create(
            "generate",
            request,
            key=key,
            rows=request.n if sampling else 1,
            solo=seeded,
            stream_capacity=request.max_new_tokens + 2 if stream else None,
        )

    # ------------------------------------------------------------------ scoring

    async def score(self, request: ScoreRequest) -> list[CompletionScore]:
        """Each completion's per-token log-probabilities (natural log) given the prompt.

        A chat request is rendered with the model's chat template (the completion is the
        assistant's turn, its end-of-turn token not included); a plain prompt is followed
        by the completion text directly.  Runs in the worker thread, batched with other
        scoring requests (right-padded, one forward pass per micro-batch).
        """
        await self._prepare()
        job = Job.create("score", request, key=("score",), rows=len(request.completions))
        self._batcher.submit([job])
        assert job.future is not None
        try:
            result: list[CompletionScore] = await job.future
        except BaseException:
            self._batcher.cancel([job])
            raise
        return result

    async def check_scoring(self) -> None:
        """Loads the model and scores one tiny completion (a local model can always score)."""
        await self.start()
        (probe,) = await self.score(ScoreRequest(prompt="Hello", completions=(" world",)))
        if not probe.token_logprobs or not all(
            math.isfinite(x) and x <= 0 for x in probe.token_logprobs
        ):
            raise ScoringUnsupportedError(
                f"scoring gave no usable log-probabilities: {probe.token_logprobs!r}",
                backend=self.name,
            )

    # ------------------------------------------------------------------ facts

    async def health(self) -> Health:
        started = time.perf_counter()
        b = self._batcher
        if b.load_error is not None:
            ok, detail = False, f"load failed: {b.load_error.message}"
        elif b.closing:
            ok, detail = False, "closed"
        elif not b.started:
            ok, detail = False, "not started (the model loads on first use or start())"
        elif not self.loaded:
            ok, detail = False, "loading"
        else:
            ok, detail = b.alive, "ready" if b.alive else "worker thread died"
        return Health(ok=ok, latency_s=time.perf_counter() - started, detail=detail)

    async def info(self) -> BackendInfo:
        """Server facts; loads the model first (to read its context size)."""
        await self.start()
        b = self._batcher
        return BackendInfo(
            name=self.name,
            kind=self.kind,
            model=self._label,
            # Twice a batch: the next batch can queue up while one runs.
            max_concurrency=2 * b.max_batch,
            max_batch_size=b.max_batch,
            max_total_tokens=self._runner.max_positions,
            supports_n=True,
            extra={
                "device": self.device,
                "dtype": str(getattr(self._runner.model, "dtype", self._dtype)),
                "batch_window_s": b.window_s,
                "max_queue": b.max_queue,
                "load_s": self._runner.load_s,
                "scoring": True,
            },
        )

    def __repr__(self) -> str:
        return f"<TransformersBackend name={self.name!r} model={self._label!r}>"
