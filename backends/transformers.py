"""A local model through transformers, micro-batched in one worker thread.

One worker thread per backend owns the model.  Requests wait in a bounded queue; the
worker takes the oldest one and, in the same ``generate()`` call, every other queued
request that decodes the same way (dynamic micro-batching): requests that arrive while
a batch runs form the next batch.  The event loop never runs model code; results come
back through ``loop.call_soon_threadsafe``.

Batching rules (what "decodes the same way" means):

- Same ``max_new_tokens``, ``min_new_tokens``, ``stop`` and whitelisted ``extra``
  fields; for sampling also the same ``temperature``, ``top_p`` and ``top_k``.
  Greedy requests ignore the sampling fields and the seed.
- A *seeded* sampling request runs as its own batch, after ``torch.manual_seed(seed)``,
  so the same seed gives the same text whatever else is queued (one ``generate()`` call
  has one random stream, so per-request seeds cannot share a batch).  Unseeded sampling
  requests batch freely.
- ``n`` > 1 with sampling adds ``n`` rows for the prompt (what ``num_return_sequences``
  does).  Greedy with ``n`` > 1 runs one row and returns ``n`` identical copies.
- ``max_batch_size`` counts rows (prompts x n); a single request with more rows than
  that runs alone.  Prompts are left-padded; the prompt is sliced off the output.

Token counts are exact: ``prompt_tokens`` is the prompt's own token count (no
padding), ``completion_tokens`` the generated tokens up to and including the end of
sequence token or the token that completed a stop string.  Stop strings are matched
on the decoded generated text (never on the prompt) both while generating (a stopping
criterion) and after; the text is cut before the first stop string.

Only these ``extra`` fields reach ``generate()``: ``repetition_penalty``,
``no_repeat_ngram_size``, ``min_p``, ``typical_p``; others (meant for other servers
in the same ensemble) are ignored.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import contextlib
import copy
import itertools
import logging
import threading
import time
from collections.abc import AsyncGenerator, Callable, Hashable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any, Self

from ensemble_async.backend import BaseBackend
from ensemble_async.errors import (
    BackendError,
    BadRequestError,
    ContextLengthError,
    FatalError,
    NotFoundError,
    OverloadedError,
    ServerError,
)
from ensemble_async.models import MissingModelError, resolve_source
from ensemble_async.types import (
    BackendInfo,
    ChatMessage,
    Completion,
    FinishReason,
    GenerationRequest,
    Health,
    StreamEvent,
    TextDelta,
)

__all__ = ["BatchStats", "TransformersBackend"]

log = logging.getLogger(__name__)

EXTRA_GENERATE_FIELDS = ("repetition_penalty", "no_repeat_ngram_size", "min_p", "typical_p")

_END_OF_TURN_TOKENS = (
    "<|im_end|>",
    "<end_of_turn>",
    "<|eot_id|>",
    "<|end|>",
    "<|endoftext|>",
    "<eos>",
    "</s>",
)

# Gemma's turn format (used when a Gemma tokenizer carries no chat template, as the
# GGUF of the Gemma-3 base model does).  System text is folded into the next user turn.
_GEMMA_TEMPLATE = (
    "{{- bos_token -}}"
    "{%- set ns = namespace(system='') -%}"
    "{%- for m in messages -%}"
    "{%- if m['role'] == 'system' -%}"
    "{%- set ns.system = ns.system + m['content'] + '\n\n' -%}"
    "{%- else -%}"
    "{{- '<start_of_turn>' + ('model' if m['role'] == 'assistant' else 'user') + '\n' -}}"
    "{%- if m['role'] == 'user' -%}{{- ns.system -}}{%- set ns.system = '' -%}{%- endif -%}"
    "{{- m['content'] | trim + '<end_of_turn>\n' -}}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<start_of_turn>model\n' -}}{%- endif -%}"
)
_CHATML_TEMPLATE = (
    "{%- for m in messages -%}"
    "{{- '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>\n' -}}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\n' -}}{%- endif -%}"
)


def plain_chat_text(messages: Sequence[ChatMessage]) -> str:
    """Messages as plain text, for models without a chat format (``chat_template=False``)."""
    parts = [f"{m.role.capitalize()}: {m.content}" for m in messages]
    return "\n\n".join(parts) + "\n\nAssistant:"


@dataclass(frozen=True)
class BatchStats:
    """What the worker has done so far (a snapshot)."""

    batches: int = 0
    requests: int = 0
    rows: int = 0
    generated_tokens: int = 0
    """Tokens generated over all rows (what ``completion_tokens`` counts)."""
    max_batch_requests: int = 0
    max_batch_rows: int = 0
    busy_s: float = 0.0
    """Seconds spent inside ``generate()`` and its post-processing."""
    batch_sizes: dict[int, int] = field(default_factory=dict)
    """Requests per batch -> how many batches had that many."""


@dataclass(eq=False)
class _Job:
    request: GenerationRequest
    loop: asyncio.AbstractEventLoop
    key: Hashable
    rows: int
    submitted: float
    future: asyncio.Future[list[Completion]] | None = None
    events: asyncio.Queue[StreamEvent | BaseException] | None = None
    solo: bool = False
    cancelled: bool = False
    done: bool = False
    emitted: str = ""

    def _call(self, fn: Callable[..., Any], *args: Any) -> None:
        with contextlib.suppress(RuntimeError):  # the loop is closed: nobody is waiting
            self.loop.call_soon_threadsafe(fn, *args)

    def deliver(self, completions: list[Completion]) -> None:
        self.done = True
        if self.events is not None:
            self._call(self.events.put_nowait, completions[0])
        elif self.future is not None:
            self._call(_set_result, self.future, completions)

    def fail(self, exc: BaseException) -> None:
        self.done = True
        if self.events is not None:
            self._call(self.events.put_nowait, exc)
        elif self.future is not None:
            self._call(_set_exception, self.future, exc)

    def delta(self, text: str) -> None:
        if text and self.events is not None:
            self._call(self.events.put_nowait, TextDelta(text))


def _set_result(fut: asyncio.Future[list[Completion]], value: list[Completion]) -> None:
    if not fut.done():
        fut.set_result(value)


def _set_exception(fut: asyncio.Future[list[Completion]], exc: BaseException) -> None:
    if not fut.done():
        fut.set_exception(exc)


class _Closed(Exception):
    pass


class TransformersBackend(BaseBackend):
    """A local causal LM (a transformers directory or a GGUF file), kind ``transformers``.

    ``model`` is a local directory or ``.gguf`` path (``gguf_file`` names the file
    inside ``model``); GGUF files are converted once and cached (see
    ``ensemble_async.models``).  ``dtype="auto"`` is float32 on CPU.  ``threads`` sets
    torch's intra-op threads (process-wide); on a small shared CPU, 1 is often fastest.
    ``chat_template``: True uses the tokenizer's template (or the model family's when the
    tokenizer has none), a string is a Jinja template, False renders messages as plain
    ``Role: text`` lines.  ``max_queue`` bounds waiting requests (beyond it
    ``OverloadedError``).  The model loads in the worker thread on first use, or in
    ``start()`` / ``async with``.
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
        if max_batch_size < 1:
            raise ValueError(f"max_batch_size must be >= 1, got {max_batch_size}")
        if batch_window_s < 0:
            raise ValueError(f"batch_window_s must be >= 0, got {batch_window_s}")
        if threads is not None and threads < 1:
            raise ValueError(f"threads must be >= 1 or None, got {threads}")
        if max_queue < 1:
            raise ValueError(f"max_queue must be >= 1, got {max_queue}")
        folder, gguf = resolve_source(model, gguf_file)  # MissingModelError, early
        self._folder = folder
        self._gguf = gguf
        self._label = gguf.stem if gguf is not None else folder.name
        super().__init__(name=name or self._label)
        self._device = device
        self._dtype = dtype
        self._max_batch = max_batch_size
        self._window = batch_window_s
        self._threads = threads
        self._chat_template_option = chat_template
        self._max_queue = max_queue
        self._cache_root = Path(cache_dir).expanduser() if cache_dir else None

        self._cond = threading.Condition()
        self._pending: collections.deque[_Job] = collections.deque()
        self._closing = False
        self._thread: threading.Thread | None = None
        self._loaded: concurrent.futures.Future[None] = concurrent.futures.Future()
        self._loaded.set_running_or_notify_cancel()  # nobody can cancel it from outside
        self._load_error: BackendError | None = None
        self._solo = itertools.count()
        self._stats = BatchStats()
        self._stats_lock = threading.Lock()

        # Set by the worker once the model is loaded.
        self._model: Any = None
        self._tok: Any = None
        self._eos_ids: frozenset[int] = frozenset()
        self._pad_id = 0
        self._template: str | None = None
        self._max_positions: int | None = None
        self._load_s: float | None = None

    # ------------------------------------------------------------------ lifecycle

    async def start(self) -> None:
        """Start the worker and wait until the model is loaded (without blocking the loop)."""
        self._ensure_thread()
        await asyncio.wrap_future(self._loaded)

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        """Stop the worker: waiting and running requests fail with ``FatalError``."""
        with self._cond:
            self._closing = True
            pending = list(self._pending)
            self._pending.clear()
            self._cond.notify_all()
        for job in pending:
            job.fail(self._closed_error())
        thread = self._thread
        # A running generate() stops at its next step.  A load in progress cannot be
        # interrupted: the worker then exits on its own once loading ends.
        if thread is not None and thread.is_alive() and self._loaded.done():
            await asyncio.to_thread(thread.join)

    def _closed_error(self) -> FatalError:
        return FatalError("backend is closed", backend=self.name)

    def _ensure_thread(self) -> None:
        with self._cond:
            if self._closing:
                raise self._closed_error()
            if self._thread is None:
                self._thread = threading.Thread(
                    target=self._worker, name=f"transformers-{self.name}", daemon=True
                )
                self._thread.start()

    @property
    def loaded(self) -> bool:
        return self._model is not None

    @property
    def model(self) -> Any:
        """The loaded transformers model (None before loading and after closing)."""
        return self._model

    @property
    def tokenizer(self) -> Any:
        """The loaded tokenizer (None before loading).

        The worker thread uses it while requests run; fast tokenizers are not safe to
        call from two threads at once, so use it only while the backend is idle.
        """
        return self._tok

    @property
    def eos_token_ids(self) -> frozenset[int]:
        """Token ids that end a completion: the model's EOS and the end-of-turn tokens."""
        return self._eos_ids

    @property
    def chat_template(self) -> str | None:
        """The Jinja chat template in use (None: messages are rendered as plain text)."""
        return self._template

    @property
    def load_seconds(self) -> float | None:
        """How long loading took (conversion included when it happened), once loaded."""
        return self._load_s

    @property
    def stats(self) -> BatchStats:
        with self._stats_lock:
            s = self._stats
            return BatchStats(
                s.batches,
                s.requests,
                s.rows,
                s.generated_tokens,
                s.max_batch_requests,
                s.max_batch_rows,
                s.busy_s,
                dict(s.batch_sizes),
            )

    @property
    def queued(self) -> int:
        """Requests waiting for a batch (not counting the one running)."""
        with self._cond:
            return len(self._pending)

    # ------------------------------------------------------------------ public API

    async def generate(self, request: GenerationRequest) -> list[Completion]:
        (result,) = await self.generate_many([request])
        return result

    async def generate_many(self, requests: Sequence[GenerationRequest]) -> list[list[Completion]]:
        """Queue several requests at once (so they can share batches); results in order."""
        if not requests:
            return []
        loop = asyncio.get_running_loop()
        jobs = [self._new_job(r, loop, stream=False) for r in requests]
        self._submit(jobs)
        futures = [j.future for j in jobs if j.future is not None]
        try:
            return list(await asyncio.gather(*futures))
        except BaseException:
            self._cancel(jobs)
            raise

    async def stream(self, request: GenerationRequest) -> AsyncGenerator[StreamEvent, None]:
        """Text deltas as they are generated, then one ``Completion`` (``n`` must be 1).

        The deltas concatenate to the completion's text.
        """
        if request.n != 1:
            raise BadRequestError("streaming needs n == 1", backend=self.name)
        job = self._new_job(request, asyncio.get_running_loop(), stream=True)
        self._submit([job])
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
                self._cancel([job])

    async def health(self) -> Health:
        started = time.perf_counter()
        thread = self._thread
        alive = thread is not None and thread.is_alive()
        if self._load_error is not None:
            ok, detail = False, f"load failed: {self._load_error.message}"
        elif self._closing:
            ok, detail = False, "closed"
        elif thread is None:
            ok, detail = False, "not started (the model loads on first use or start())"
        elif not self.loaded:
            ok, detail = False, "loading"
        else:
            ok, detail = alive, "ready" if alive else "worker thread died"
        return Health(ok=ok, latency_s=time.perf_counter() - started, detail=detail)

    async def info(self) -> BackendInfo:
        """Server facts; loads the model first (to read its context size)."""
        await self.start()
        return BackendInfo(
            name=self.name,
            kind=self.kind,
            model=self._label,
            # Twice a batch: the next batch can queue up while one runs.
            max_concurrency=2 * self._max_batch,
            max_batch_size=self._max_batch,
            max_total_tokens=self._max_positions,
            supports_n=True,
            extra={
                "device": self._device,
                "dtype": str(getattr(self._model, "dtype", self._dtype)),
                "batch_window_s": self._window,
                "max_queue": self._max_queue,
                "load_s": self._load_s,
            },
        )

    def __repr__(self) -> str:
        return f"<TransformersBackend name={self.name!r} model={self._label!r}>"

    # ------------------------------------------------------------------ submission

    def _new_job(
        self, request: GenerationRequest, loop: asyncio.AbstractEventLoop, *, stream: bool
    ) -> _Job:
        sampling = request.temperature > 0
        extras = tuple(
            (k, repr(request.extra[k])) for k in EXTRA_GENERATE_FIELDS if k in request.extra
        )
        key: Hashable
        if sampling and request.seed is not None:
            key = ("solo", next(self._solo))
        else:
            key = (
                sampling,
                request.temperature if sampling else 0.0,
                request.top_p if sampling else 1.0,
                request.top_k if sampling else None,
                request.max_new_tokens,
                request.min_new_tokens or 0,
                request.stop,
                extras,
            )
        job = _Job(
            request=request,
            loop=loop,
            key=key,
            rows=request.n if sampling else 1,
            submitted=time.perf_counter(),
            solo=sampling and request.seed is not None,
        )
        if stream:
            job.events = asyncio.Queue(maxsize=request.max_new_tokens + 2)
        else:
            job.future = loop.create_future()
        return job

    def _submit(self, jobs: list[_Job]) -> None:
        if self._load_error is not None:  # a fresh copy: tracebacks must not pile up
            raise copy.copy(self._load_error).with_traceback(None)
        self._ensure_thread()
        with self._cond:
            if self._closing:
                raise self._closed_error()
            if len(self._pending) + len(jobs) > self._max_queue:
                raise OverloadedError(
                    f"queue full ({self._max_queue} requests waiting)", backend=self.name
                )
            self._pending.extend(jobs)
            self._cond.notify_all()

    def _cancel(self, jobs: Iterable[_Job]) -> None:
        with self._cond:
            for job in jobs:
                if job.done:
                    continue
                job.cancelled = True
                with contextlib.suppress(ValueError):
                    self._pending.remove(job)
                if job.future is not None:
                    job.future.cancel()

    # ------------------------------------------------------------------ worker

    def _worker(self) -> None:
        try:
            self._load()
        except BaseException as exc:
            err = self._load_failure(exc)
            self._load_error = err
            self._loaded.set_exception(err)
            with self._cond:
                pending = list(self._pending)
                self._pending.clear()
            for job in pending:
                job.fail(err)
            return
        self._loaded.set_result(None)
        while True:
            try:
                batch = self._next_batch()
            except _Closed:
                break
            try:
                self._run_batch(batch)
            except BaseException as exc:  # a bug: fail the batch, keep serving
                log.exception("%s: batch failed", self.name)
                for job in batch:
                    if not job.done:
                        job.fail(ServerError(f"internal error: {exc!r}", backend=self.name))
        with self._cond:
            pending = list(self._pending)
            self._pending.clear()
        for job in pending:
            job.fail(self._closed_error())
        self._model = None  # free the weights once closed

    def _load_failure(self, exc: BaseException) -> BackendError:
        if isinstance(exc, BackendError):
            return exc
        if isinstance(exc, MissingModelError):
            err: BackendError = NotFoundError(str(exc), backend=self.name)
        else:
            err = FatalError(f"could not load model: {exc!r}", backend=self.name)
        err.__cause__ = exc
        return err

    def _load(self) -> None:
        from ensemble_async.models import load_model_and_tokenizer

        started = time.perf_counter()
        if self._closing:
            raise self._closed_error()
        if self._threads is not None:
            import torch

            torch.set_num_threads(self._threads)
        model, tok = load_model_and_tokenizer(
            str(self._folder),
            str(self._gguf) if self._gguf is not None else None,
            device=self._device,
            dtype=self._dtype,
            root=self._cache_root,
        )
        tok.padding_side = "left"
        vocab: dict[str, int] = tok.get_vocab()
        special = set(tok.all_special_ids) | {
            i for i, t in getattr(tok, "added_tokens_decoder", {}).items() if t.special
        }
        eos: set[int] = set()
        gen_eos = model.generation_config.eos_token_id
        if isinstance(gen_eos, int):
            eos.add(gen_eos)
        elif gen_eos is not None:
            eos.update(int(i) for i in gen_eos)
        if tok.eos_token_id is not None:
            eos.add(int(tok.eos_token_id))
        for token in _END_OF_TURN_TOKENS:
            tid = vocab.get(token)
            if tid is not None and tid in special:
                eos.add(tid)
        if not eos:
            raise FatalError("the tokenizer has no end-of-sequence token", backend=self.name)
        self._eos_ids = frozenset(eos)
        pad = tok.pad_token_id
        self._pad_id = int(pad) if pad is not None else min(eos)
        self._template = self._resolve_template(tok, vocab)
        config = model.config
        text_config = config.get_text_config() if hasattr(config, "get_text_config") else config
        positions = getattr(text_config, "max_position_embeddings", None)
        self._max_positions = int(positions) if positions else None
        self._tok = tok
        self._model = model
        self._load_s = time.perf_counter() - started
        log.info("%s: loaded %s in %.1f s", self.name, self._label, self._load_s)

    def _resolve_template(self, tok: Any, vocab: dict[str, int]) -> str | None:
        option = self._chat_template_option
        if option is False:
            return None
        if isinstance(option, str):
            return option
        if getattr(tok, "chat_template", None):
            return str(tok.chat_template)
        if "<start_of_turn>" in vocab and "<end_of_turn>" in vocab:
            return _GEMMA_TEMPLATE
        if "<|im_start|>" in vocab and "<|im_end|>" in vocab:
            return _CHATML_TEMPLATE
        return None

    def _next_batch(self) -> list[_Job]:
        """Wait for work; return the oldest job and the compatible jobs queued behind it."""
        with self._cond:
            while True:
                if self._closing:
                    raise _Closed
                if not self._pending:
                    self._cond.wait()
                    continue
                head = self._pending[0]
                deadline = head.submitted + self._window
                while (
                    not head.solo
                    and not self._closing
                    and self._pending
                    and self._pending[0] is head
                    and self._compatible_rows(head) < self._max_batch
                ):
                    remaining = deadline - time.perf_counter()
                    if remaining <= 0:
                        break
                    self._cond.wait(remaining)
                if self._closing:
                    raise _Closed
                if not self._pending or self._pending[0] is not head:
                    continue  # the head was cancelled while we waited
                batch: list[_Job] = []
                rows = 0
                for job in self._pending:
                    if job.key != head.key:
                        continue
                    if batch and rows + job.rows > self._max_batch:
                        continue
                    batch.append(job)
                    rows += job.rows
                    if rows >= self._max_batch:
                        break
                for job in batch:
                    self._pending.remove(job)
                return batch

    def _compatible_rows(self, head: _Job) -> int:
        return sum(j.rows for j in self._pending if j.key == head.key)

    def _run_batch(self, batch: list[_Job]) -> None:
        started = time.perf_counter()
        jobs: list[tuple[_Job, list[int]]] = []
        for job in batch:
            if job.cancelled:
                continue
            try:
                jobs.append((job, self._encode(job.request)))
            except BackendError as exc:
                job.fail(exc)
            except Exception as exc:
                job.fail(
                    BadRequestError(f"could not encode the prompt: {exc!r}", backend=self.name)
                )
        if not jobs:
            return
        try:
            results = self._generate([r for _, r in jobs], [j for j, _ in jobs])
        except BackendError as exc:
            for job, _ in jobs:
                job.fail(exc)
            return
        except Exception as exc:
            log.exception("%s: generate() failed", self.name)
            err = ServerError(f"generation failed: {exc!r}", backend=self.name)
            for job, _ in jobs:
                job.fail(err)
            return
        # Count first, then deliver: a caller that wakes up sees this batch in the stats.
        generated = sum(
            sum(c.completion_tokens or 0 for c in completions[: job.rows])
            for job, completions in results
        )
        rows = sum(j.rows for j, _ in jobs)
        with self._stats_lock:
            s = self._stats
            sizes = dict(s.batch_sizes)
            sizes[len(jobs)] = sizes.get(len(jobs), 0) + 1
            self._stats = BatchStats(
                batches=s.batches + 1,
                requests=s.requests + len(jobs),
                rows=s.rows + rows,
                generated_tokens=s.generated_tokens + generated,
                max_batch_requests=max(s.max_batch_requests, len(jobs)),
                max_batch_rows=max(s.max_batch_rows, rows),
                busy_s=s.busy_s + time.perf_counter() - started,
                batch_sizes=sizes,
            )
        for job, completions in results:
            if job.cancelled:
                continue
            if self._closing:
                job.fail(self._closed_error())
                continue
            if job.events is not None:
                final = completions[0].text
                if final.startswith(job.emitted):
                    job.delta(final[len(job.emitted) :])
                else:  # cannot happen with prefix-stable decoding; keep the final text
                    log.warning("%s: streamed text is not a prefix of the final text", self.name)
            job.deliver(completions)

    def _encode(self, request: GenerationRequest) -> list[int]:
        tok = self._tok
        if request.messages is not None and self._template is not None:
            messages = [m.to_dict() for m in request.messages]
            try:
                text = tok.apply_chat_template(
                    messages,
                    chat_template=self._template,
                    add_generation_prompt=True,
                    tokenize=False,
                )
            except Exception as exc:
                raise BadRequestError(f"chat template failed: {exc}", backend=self.name) from exc
            ids = list(tok(text, add_special_tokens=False)["input_ids"])
        else:
            text = request.prompt if request.prompt is not None else ""
            if request.messages is not None:
                text = plain_chat_text(request.messages)
            ids = list(tok(text, add_special_tokens=True)["input_ids"])
        if not ids:
            raise BadRequestError("the prompt is empty", backend=self.name)
        limit = self._max_positions
        if limit is not None and len(ids) + request.max_new_tokens > limit:
            raise ContextLengthError(
                f"prompt ({len(ids)} tokens) + max_new_tokens ({request.max_new_tokens}) "
                f"exceeds the context length ({limit})",
                backend=self.name,
            )
        return ids

    def _decode(self, ids: Sequence[int]) -> str:
        return str(
            self._tok.decode(
                list(ids), skip_special_tokens=True, clean_up_tokenization_spaces=False
            )
        )

    def _generate(
        self, prompts: list[list[int]], jobs: list[_Job]
    ) -> list[tuple[_Job, list[Completion]]]:
        import torch
        import transformers

        req = jobs[0].request  # every job in a batch decodes the same way
        sampling = req.temperature > 0
        row_jobs: list[int] = []  # row -> index into jobs
        for i, job in enumerate(jobs):
            row_jobs.extend([i] * job.rows)
        width = max(len(p) for p in prompts)
        input_ids = torch.full((len(row_jobs), width), self._pad_id, dtype=torch.long)
        mask = torch.zeros((len(row_jobs), width), dtype=torch.long)
        for row, i in enumerate(row_jobs):
            ids = prompts[i]
            input_ids[row, width - len(ids) :] = torch.tensor(ids, dtype=torch.long)
            mask[row, width - len(ids) :] = 1

        stop = _StopOnText(self._decode, req.stop, width, lambda: self._abort(jobs))
        streaming = {row: jobs[i] for row, i in enumerate(row_jobs) if jobs[i].events is not None}
        kwargs: dict[str, Any] = {
            "max_new_tokens": req.max_new_tokens,
            "do_sample": sampling,
            "num_beams": 1,
            "num_return_sequences": 1,
            "eos_token_id": sorted(self._eos_ids),
            "pad_token_id": self._pad_id,
            "stopping_criteria": transformers.StoppingCriteriaList([stop]),
        }
        if req.min_new_tokens:
            kwargs["min_new_tokens"] = req.min_new_tokens
        if sampling:
            kwargs.update(temperature=req.temperature, top_p=req.top_p, top_k=req.top_k or 0)
            if req.seed is not None:
                torch.manual_seed(req.seed)
        for name in EXTRA_GENERATE_FIELDS:
            if name in req.extra:
                kwargs[name] = req.extra[name]
        if streaming:
            kwargs["streamer"] = _RowStreamer(self, streaming, req.stop)
        device = self._model.device
        try:
            with torch.inference_mode():
                out = self._model.generate(
                    input_ids=input_ids.to(device), attention_mask=mask.to(device), **kwargs
                )
        except (ValueError, TypeError) as exc:
            raise BadRequestError(f"invalid generation options: {exc}", backend=self.name) from exc
        generated = out[:, width:].tolist()
        per_job: list[list[Completion]] = [[] for _ in jobs]
        for row, i in enumerate(row_jobs):
            job = jobs[i]
            text, reason, count = self._finish_row(generated[row], job.request.stop)
            completion = Completion(
                text=text,
                finish_reason=reason,
                backend=self.name,
                latency_s=time.perf_counter() - job.submitted,
                prompt_tokens=len(prompts[i]),
                completion_tokens=count,
                model=self._label,
                index=len(per_job[i]),
            )
            per_job[i].append(completion)
        for i, job in enumerate(jobs):
            if not sampling and job.request.n > 1:
                first = per_job[i][0]
                per_job[i] = [_with_index(first, k) for k in range(job.request.n)]
        return list(zip(jobs, per_job, strict=True))

    def _abort(self, jobs: list[_Job]) -> bool:
        return self._closing or all(j.cancelled for j in jobs)

    def _finish_row(self, ids: list[int], stops: tuple[str, ...]) -> tuple[str, FinishReason, int]:
        """Text, finish reason and completion token count of one generated row."""
        reason: FinishReason = "length"
        count = len(ids)
        end = len(ids)
        for pos, tid in enumerate(ids):
            if tid in self._eos_ids:
                reason, count, end = "stop", pos + 1, pos
                break
        content = ids[:end]
        text = self._decode(content)
        cut = _first_stop(text, stops)
        if cut is not None:
            # The fewest tokens whose text holds a stop string: the one completing it counts.
            lo, hi = 1, len(content)
            while lo < hi:
                mid = (lo + hi) // 2
                if _first_stop(self._decode(content[:mid]), stops) is None:
                    lo = mid + 1
                else:
                    hi = mid
            reason, count, text = "stop", lo, text[:cut]
        return text, reason, count


def _with_index(c: Completion, index: int) -> Completion:
    return Completion(
        text=c.text,
        finish_reason=c.finish_reason,
        backend=c.backend,
        latency_s=c.latency_s,
        prompt_tokens=c.prompt_tokens,
        completion_tokens=c.completion_tokens,
        model=c.model,
        index=index,
    )


def _first_stop(text: str, stops: Sequence[str]) -> int | None:
    """Where the earliest stop string starts in ``text`` (None if none occurs)."""
    found = [p for p in (text.find(s) for s in stops) if p >= 0]
    return min(found) if found else None


def _held_back(text: str, stops: Sequence[str]) -> int:
    """How many trailing characters of ``text`` could still become a stop string."""
    hold = 0
    for s in stops:
        for k in range(min(len(s) - 1, len(text)), hold, -1):
            if text.endswith(s[:k]):
                hold = k
                break
    return hold


class _StopOnText:
    """A stopping criterion: a row is done once its generated text holds a stop string.

    It also stops every row at once when ``abort()`` says so (backend closing, or every
    request of the batch cancelled).
    """

    def __init__(
        self,
        decode: Callable[[Sequence[int]], str],
        stops: tuple[str, ...],
        prompt_width: int,
        abort: Callable[[], bool],
    ) -> None:
        self._decode = decode
        self._stops = stops
        self._width = prompt_width
        self._abort = abort
        self._done: set[int] = set()

    def __call__(self, input_ids: Any, scores: Any, **kwargs: Any) -> Any:
        import torch

        rows = int(input_ids.shape[0])
        if self._abort():
            return torch.ones(rows, dtype=torch.bool, device=input_ids.device)
        if self._stops:
            generated = input_ids[:, self._width :].tolist()
            for row in range(rows):
                if (
                    row not in self._done
                    and _first_stop(self._decode(generated[row]), self._stops) is not None
                ):
                    self._done.add(row)
        flags = [row in self._done for row in range(rows)]
        return torch.tensor(flags, dtype=torch.bool, device=input_ids.device)


class _RowStreamer:
    """A ``generate()`` streamer for a batch: sends deltas of the streaming rows.

    Text that could still turn into a stop string, and a trailing partial character, is
    held back, so the deltas always concatenate to a prefix of the final text.
    """

    def __init__(
        self, backend: TransformersBackend, rows: dict[int, _Job], stops: tuple[str, ...]
    ) -> None:
        self._backend = backend
        self._rows = rows
        self._stops = stops
        self._ids: dict[int, list[int]] = {row: [] for row in rows}
        self._finished: set[int] = set()
        self._prompt_seen = False

    def put(self, value: Any) -> None:
        if not self._prompt_seen:  # the first call carries the prompts
            self._prompt_seen = True
            return
        tokens = value.reshape(-1).tolist()
        for row, job in self._rows.items():
            if row in self._finished or job.cancelled:
                continue
            tid = int(tokens[row])
            if tid in self._backend._eos_ids:
                self._finished.add(row)
                continue
            self._ids[row].append(tid)
            text = self._backend._decode(self._ids[row])
            cut = _first_stop(text, self._stops)
            if cut is not None:
                self._finished.add(row)
                safe = text[:cut]
            else:
                safe = text[: len(text) - _held_back(text, self._stops)]
                safe = safe.rstrip("\ufffd")
            if len(safe) > len(job.emitted) and safe.startswith(job.emitted):
                job.delta(safe[len(job.emitted) :])
                job.emitted = safe

    def end(self) -> None:
        return None
