"""The model side of the transformers adapter: loading, encoding, generating, scoring.

Everything here runs in the batcher's worker thread (``batcher.py``); torch and
transformers are imported on first use, never when this module is imported.

Generation (``kind == "generate"`` jobs, payload a ``GenerationRequest``):

- Prompts are left-padded into one ``generate()`` call; the prompt is sliced off.
- Sampling never touches torch's process-wide random state: each batch draws from its
  own ``torch.Generator`` (seeded from the request's ``seed``; from fresh entropy when
  unseeded).  ``generate()`` runs in greedy mode and a final logits processor
  (:class:`_GeneratorSampler`) does the draw, after the sampling filters (temperature,
  top-k, top-p, min-p, typical-p) built here.  Two backends sampling at once therefore
  cannot disturb each other's seeded streams.
- Stop strings (``ensemble_async.stops``) are matched on the decoded generated text,
  while generating (a stopping criterion) and after; the text is cut before the first.
- ``completion_tokens`` counts generated tokens up to and including the end of
  sequence token or the token that completed a stop string.

Scoring (``kind == "score"`` jobs, payload a ``ScoreRequest``): see :meth:`ModelRunner.score`.
"""

from __future__ import annotations

import dataclasses
import inspect
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ensemble_async.errors import (
    BackendError,
    BadRequestError,
    ContextLengthError,
    FatalError,
    NotFoundError,
)
from ensemble_async.models import MissingModelError, resolve_device, resolve_source
from ensemble_async.scoring import CompletionScore, ScoreRequest
from ensemble_async.stops import first_stop, held_back
from ensemble_async.types import ChatMessage, Completion, FinishReason, GenerationRequest, TextDelta

from .batcher import BatchOutcome, Job

__all__ = ["EXTRA_GENERATE_FIELDS", "ModelRunner", "plain_chat_text"]

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
class RunnerOptions:
    model: str
    gguf_file: str | None
    device: str
    dtype: str
    chat_template: bool | str
    cache_root: Path | None
    max_batch: int


class ModelRunner:
    """Loads one model and runs batches of generation and scoring jobs (worker thread only)."""

    def __init__(self, name: str, label: str, options: RunnerOptions) -> None:
        self.name = name
        self.label = label
        self.options = options
        self.model: Any = None
        self.tok: Any = None
        self.eos_ids: frozenset[int] = frozenset()
        self.pad_id = 0
        self.template: str | None = None
        self.max_positions: int | None = None
        self.load_s: float | None = None
        self._logits_to_keep = False

    # ------------------------------------------------------------------ loading

    def load(self) -> None:
        from ensemble_async.models import load_model_and_tokenizer

        started = time.perf_counter()
        o = self.options
        try:
            # Finding the model (the HF cache, a GGUF file) is disk work: here, off the loop.
            folder, gguf = resolve_source(o.model, o.gguf_file)
            model, tok = load_model_and_tokenizer(
                str(folder),
                str(gguf) if gguf is not None else None,
                device=resolve_device(o.device),
                dtype=o.dtype,
                root=o.cache_root,
            )
        except BackendError:
            raise
        except MissingModelError as exc:
            raise NotFoundError(str(exc), backend=self.name) from exc
        except Exception as exc:
            raise FatalError(f"could not load model: {exc!r}", backend=self.name) from exc
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
        self.eos_ids = frozenset(eos)
        pad = tok.pad_token_id
        self.pad_id = int(pad) if pad is not None else min(eos)
        self.template = self._resolve_template(tok, vocab)
        config = model.config
        text_config = config.get_text_config() if hasattr(config, "get_text_config") else config
        positions = getattr(text_config, "max_position_embeddings", None)
        self.max_positions = int(positions) if positions else None
        self._logits_to_keep = "logits_to_keep" in inspect.signature(model.forward).parameters
        self.tok = tok
        self.model = model
        self.load_s = time.perf_counter() - started
        log.info("%s: loaded %s in %.1f s", self.name, self.label, self.load_s)

    def unload(self) -> None:
        self.model = None  # free the weights once closed

    def _resolve_template(self, tok: Any, vocab: dict[str, int]) -> str | None:
        option = self.options.chat_template
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

    # ------------------------------------------------------------------ batches

    def run(self, jobs: list[Job], abort: Callable[[], bool]) -> BatchOutcome:
        if jobs[0].kind == "score":
            return self._run_scoring(jobs)
        return self._run_generation(jobs, abort)

    # ------------------------------------------------------------------ text <-> ids

    def prompt_text(
        self, prompt: str | None, messages: Sequence[ChatMessage] | None
    ) -> tuple[str, bool]:
        """``(text, add_special_tokens)``: the prompt exactly as the model sees it."""
        if messages is not None and self.template is not None:
            try:
                text = self.tok.apply_chat_template(
                    [m.to_dict() for m in messages],
                    chat_template=self.template,
                    add_generation_prompt=True,
                    tokenize=False,
                )
            except Exception as exc:
                raise BadRequestError(f"chat template failed: {exc}", backend=self.name) from exc
            return str(text), False  # the template writes its own special tokens
        if messages is not None:
            return plain_chat_text(messages), True
        return prompt if prompt is not None else "", True

    def _ids(self, text: str, special: bool) -> list[int]:
        return [int(i) for i in self.tok(text, add_special_tokens=special)["input_ids"]]

    def encode(self, request: GenerationRequest) -> list[int]:
        text, special = self.prompt_text(request.prompt, request.messages)
        ids = self._ids(text, special)
        if not ids:
            raise BadRequestError("the prompt is empty", backend=self.name)
        limit = self.max_positions
        if limit is not None and len(ids) + request.max_new_tokens > limit:
            raise ContextLengthError(
                f"prompt ({len(ids)} tokens) + max_new_tokens ({request.max_new_tokens}) "
                f"exceeds the context length ({limit})",
                backend=self.name,
            )
        return ids

    def decode(self, ids: Sequence[int]) -> str:
        return str(
            self.tok.decode(list(ids), skip_special_tokens=True, clean_up_tokenization_spaces=False)
        )

    # ------------------------------------------------------------------ generation

    def _run_generation(self, batch: list[Job], abort: Callable[[], bool]) -> BatchOutcome:
        jobs: list[Job] = []
        prompts: list[list[int]] = []
        for job in batch:
            try:
                prompts.append(self.encode(job.payload))
            except BackendError as exc:
                job.fail(exc)
                continue
            except Exception as exc:
                job.fail(
                    BadRequestError(f"could not encode the prompt: {exc!r}", backend=self.name)
                )
                continue
            jobs.append(job)
        outcome = BatchOutcome()
        if not jobs:
            return outcome
        for job, completions in self._generate(prompts, jobs, abort):
            if job.events is not None and not job.cancelled:
                final = completions[0].text
                if final.startswith(job.emitted):
                    rest = final[len(job.emitted) :]
                    if rest:
                        job.delta(TextDelta(rest))
                else:  # cannot happen with prefix-stable decoding; keep the final text
                    log.warning("%s: streamed text is not a prefix of the final text", self.name)
            tokens = sum(c.completion_tokens or 0 for c in completions[: job.rows])
            outcome.results.append((job, completions[0] if job.events else completions, tokens))
        return outcome

    def _generate(
        self, prompts: list[list[int]], jobs: list[Job], abort: Callable[[], bool]
    ) -> list[tuple[Job, list[Completion]]]:
        import torch
        import transformers

        req: GenerationRequest = jobs[0].payload  # every job in a batch decodes the same way
        sampling = req.temperature > 0
        row_jobs: list[int] = []  # row -> index into jobs
        for i, job in enumerate(jobs):
            row_jobs.extend([i] * job.rows)
        width = max(len(p) for p in prompts)
        input_ids = torch.full((len(row_jobs), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(row_jobs), width), dtype=torch.long)
        for row, i in enumerate(row_jobs):
            ids = prompts[i]
            input_ids[row, width - len(ids) :] = torch.tensor(ids, dtype=torch.long)
            mask[row, width - len(ids) :] = 1

        stop = _StopOnText(self.decode, req.stop, width, abort)
        streaming = {row: jobs[i] for row, i in enumerate(row_jobs) if jobs[i].events is not None}
        device = self.model.device
        kwargs: dict[str, Any] = {
            "max_new_tokens": req.max_new_tokens,
            # Greedy in generate()'s eyes: when sampling, the draw is made by our last
            # logits processor with its own generator (no process-wide random state).
            "do_sample": False,
            "num_beams": 1,
            "num_return_sequences": 1,
            "eos_token_id": sorted(self.eos_ids),
            "pad_token_id": self.pad_id,
            "stopping_criteria": transformers.StoppingCriteriaList([stop]),
        }
        if req.min_new_tokens:
            kwargs["min_new_tokens"] = req.min_new_tokens
        for name in ("repetition_penalty", "no_repeat_ngram_size"):
            if name in req.extra:
                kwargs[name] = req.extra[name]
        if sampling:
            kwargs["logits_processor"] = _sampling_processors(req, device)
        if streaming:
            kwargs["streamer"] = _RowStreamer(self, streaming, req.stop)
        try:
            with torch.inference_mode():
                out = self.model.generate(
                    input_ids=input_ids.to(device), attention_mask=mask.to(device), **kwargs
                )
        except (ValueError, TypeError) as exc:
            raise BadRequestError(f"invalid generation options: {exc}", backend=self.name) from exc
        generated = out[:, width:].tolist()
        per_job: list[list[Completion]] = [[] for _ in jobs]
        for row, i in enumerate(row_jobs):
            job = jobs[i]
            text, reason, count = self.finish_row(generated[row], job.payload.stop)
            per_job[i].append(
                Completion(
                    text=text,
                    finish_reason=reason,
                    backend=self.name,
                    latency_s=time.perf_counter() - job.submitted,
                    prompt_tokens=len(prompts[i]),
                    completion_tokens=count,
                    model=self.label,
                    index=len(per_job[i]),
                )
            )
        for i, job in enumerate(jobs):
            if not sampling and job.payload.n > 1:
                first = per_job[i][0]
                per_job[i] = [_with_index(first, k) for k in range(job.payload.n)]
        return list(zip(jobs, per_job, strict=True))

    def finish_row(self, ids: list[int], stops: tuple[str, ...]) -> tuple[str, FinishReason, int]:
        """Text, finish reason and completion token count of one generated row."""
        reason: FinishReason = "length"
        count = len(ids)
        end = len(ids)
        for pos, tid in enumerate(ids):
            if tid in self.eos_ids:
                reason, count, end = "stop", pos + 1, pos
                break
        content = ids[:end]
        text = self.decode(content)
        cut = first_stop(text, stops)
        if cut is not None:
            # The fewest tokens whose text holds a stop string: the one completing it counts.
            lo, hi = 1, len(content)
            while lo < hi:
                mid = (lo + hi) // 2
                if first_stop(self.decode(content[:mid]), stops) is None:
                    lo = mid + 1
                else:
                    hi = mid
            reason, count, text = "stop", lo, text[:cut]
        return text, reason, count

    # ------------------------------------------------------------------ scoring

    def split_completion(
        self, prompt_text: str, special: bool, prompt_ids: list[int], completion: str
    ) -> list[int]:
        """The token ids of ``completion`` as it follows ``prompt_ids``.

        The prompt plus the completion is tokenized as one text, so the completion's
        first token is the one the tokenizer picks in context (a leading space joins the
        following word, as it would in a generated answer).  The completion is what
        follows the prompt's own tokens, provided the joint tokenization starts with
        exactly those tokens.  When it does not -- the tokenizer merged the end of the
        prompt with the start of the completion (e.g. a prompt ending in a space) -- the
        prompt's tokens are kept as they are (they are what the model conditions on when
        it generates) and the completion is tokenized on its own after them.
        """
        if not completion:
            return []
        joint = self._ids(prompt_text + completion, special)
        k = len(prompt_ids)
        if joint[:k] == prompt_ids and len(joint) > k:
            return joint[k:]
        return self._ids(completion, False)

    def _run_scoring(self, jobs: list[Job]) -> BatchOutcome:
        rows: list[tuple[int, int, list[int]]] = []  # (job index, prompt length, ids)
        ok: list[int] = []
        for j, job in enumerate(jobs):
            request: ScoreRequest = job.payload
            try:
                text, special = self.prompt_text(request.prompt, request.messages)
                prompt_ids = self._ids(text, special)
                if not prompt_ids:
                    raise BadRequestError(
                        "the prompt is empty (nothing to condition on)", backend=self.name
                    )
                job_rows = []
                for completion in request.completions:
                    ids = prompt_ids + self.split_completion(text, special, prompt_ids, completion)
                    limit = self.max_positions
                    if limit is not None and len(ids) > limit:
                        raise ContextLengthError(
                            f"prompt + completion ({len(ids)} tokens) exceeds the context "
                            f"length ({limit})",
                            backend=self.name,
                        )
                    job_rows.append((j, len(prompt_ids), ids))
            except BackendError as exc:
                job.fail(exc)
                continue
            except Exception as exc:
                job.fail(BadRequestError(f"could not encode: {exc!r}", backend=self.name))
                continue
            rows.extend(job_rows)
            ok.append(j)
        outcome = BatchOutcome()
        if not rows:
            return outcome
        logprobs = self.row_logprobs([(k, ids) for _, k, ids in rows])
        per_job: dict[int, list[CompletionScore]] = {j: [] for j in ok}
        for (j, k, ids), lps in zip(rows, logprobs, strict=True):
            request = jobs[j].payload
            text = request.completions[len(per_job[j])]
            per_job[j].append(
                CompletionScore(
                    text=text,
                    token_logprobs=tuple(lps),
                    tokens=tuple(str(t) for t in self.tok.convert_ids_to_tokens(ids[k:])),
                    backend=self.name,
                    model=self.label,
                )
            )
        for j in ok:
            scores = per_job[j]
            outcome.results.append((jobs[j], scores, sum(s.num_tokens for s in scores)))
        return outcome

    def row_logprobs(self, rows: list[tuple[int, list[int]]]) -> list[list[float]]:
        """Log-probabilities of ``ids[k:]`` given ``ids[:k]``, for each ``(k, ids)`` row.

        Rows are right-padded into forward passes of at most ``max_batch`` rows.  With
        right padding every real token keeps its position and, attention being causal,
        never sees a pad token, so padding cannot change a score.  Only the positions
        that predict completion tokens go through the output head (``logits_to_keep``).
        """
        import torch

        out: list[list[float]] = [[] for _ in rows]
        todo = [i for i, (k, ids) in enumerate(rows) if len(ids) > k]
        # Similar lengths together: less padding per forward pass.
        todo.sort(key=lambda i: len(rows[i][1]))
        step = self.options.max_batch
        device = self.model.device
        for start in range(0, len(todo), step):
            chunk = todo[start : start + step]
            width = max(len(rows[i][1]) for i in chunk)
            lo = min(rows[i][0] for i in chunk) - 1  # first position that predicts a token
            input_ids = torch.full((len(chunk), width), self.pad_id, dtype=torch.long)
            mask = torch.zeros((len(chunk), width), dtype=torch.long)
            for r, i in enumerate(chunk):
                ids = rows[i][1]
                input_ids[r, : len(ids)] = torch.tensor(ids, dtype=torch.long)
                mask[r, : len(ids)] = 1
            kwargs: dict[str, Any] = {}
            if self._logits_to_keep:
                kwargs["logits_to_keep"] = torch.arange(lo, width - 1, device=device)
            with torch.inference_mode():
                logits = self.model(
                    input_ids=input_ids.to(device), attention_mask=mask.to(device), **kwargs
                ).logits
                offset = lo if self._logits_to_keep else 0
                for r, i in enumerate(chunk):
                    k, ids = rows[i]
                    n = len(ids)
                    pred = logits[r, k - 1 - offset : n - 1 - offset].float()
                    target = torch.tensor(ids[k:], dtype=torch.long, device=pred.device)
                    lp = torch.log_softmax(pred, dim=-1).gather(1, target[:, None])[:, 0]
                    out[i] = [float(x) for x in lp.cpu().tolist()]
        return out


def _with_index(c: Completion, index: int) -> Completion:
    return dataclasses.replace(c, index=index)


def _sampling_processors(req: GenerationRequest, device: Any) -> Any:
    """The sampling filters, in ``generate()``'s own order, then the draw."""
    import transformers

    procs: list[Any] = []
    if req.temperature != 1.0:
        procs.append(transformers.TemperatureLogitsWarper(req.temperature))
    if req.top_k:
        procs.append(transformers.TopKLogitsWarper(top_k=req.top_k))
    if req.top_p < 1.0:
        procs.append(transformers.TopPLogitsWarper(top_p=req.top_p))
    if "min_p" in req.extra:
        procs.append(transformers.MinPLogitsWarper(min_p=float(req.extra["min_p"])))
    if "typical_p" in req.extra and float(req.extra["typical_p"]) < 1.0:
        procs.append(transformers.TypicalLogitsWarper(mass=float(req.extra["typical_p"])))
    procs.append(_GeneratorSampler(req.seed, device))
    return transformers.LogitsProcessorList(procs)


class _GeneratorSampler:
    """The last logits processor when sampling: draws each row's next token with this
    batch's own ``torch.Generator`` and leaves only that token possible, so greedy
    selection inside ``generate()`` picks it."""

    def __init__(self, seed: int | None, device: Any) -> None:
        import torch

        self._gen = torch.Generator(device=device)
        if seed is None:
            self._gen.seed()  # fresh entropy, still independent of torch's global stream
        else:
            self._gen.manual_seed(seed)

    def __call__(self, input_ids: Any, scores: Any) -> Any:
        import torch

        probs = torch.softmax(scores.float(), dim=-1)
        chosen = torch.multinomial(probs, num_samples=1, generator=self._gen)
        out = torch.full_like(scores, -float("inf"))
        out.scatter_(1, chosen, 0.0)
        return out


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
                    and first_stop(self._decode(generated[row]), self._stops) is not None
                ):
                    self._done.add(row)
        flags = [row in self._done for row in range(rows)]
        return torch.tensor(flags, dtype=torch.bool, device=input_ids.device)


class _RowStreamer:
    """A ``generate()`` streamer for a batch: sends deltas of the streaming rows.

    Text that could still turn into a stop string, and a trailing partial character, is
    held back, so the deltas always concatenate to a prefix of the final text.
    """

    def __init__(self, runner: ModelRunner, rows: dict[int, Job], stops: tuple[str, ...]) -> None:
        self._runner = runner
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
            if tid in self._runner.eos_ids:
                self._finished.add(row)
                continue
            self._ids[row].append(tid)
            text = self._runner.decode(self._ids[row])
            cut = first_stop(text, self._stops)
            if cut is not None:
                self._finished.add(row)
                safe = text[:cut]
            else:
                safe = text[: len(text) - held_back(text, self._stops)]
                safe = safe.rstrip("\ufffd")
            if len(safe) > len(job.emitted) and safe.startswith(job.emitted):
                job.delta(TextDelta(safe[len(job.emitted) :]))
                job.emitted = safe

    def end(self) -> None:
        return None
