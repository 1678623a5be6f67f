"""A TGI server double: TGI's native protocol, quirks included, with made-up text.

    async with TGIDouble(latency=0.01) as double:
        backend = TGIBackend(double.url)
        double.faults.push(Fault.status(429, retry_after=2))
        ...
        assert double.stats.requests == 3
        assert double.last_body["parameters"]["do_sample"] is False

Text is deterministic: a token is a word from a small vocabulary, drawn from a generator
seeded by the prompt (greedy) or the prompt and the seed (sampling), so different seeds
give different text.  Each prompt has a "natural" length after which the EOS token comes.
Stop strings end the text when it ends with one (TGI leaves the stop string in), and
``max_new_tokens`` ends it with finish_reason ``length``.  A prompt token is a
whitespace-led word (trailing whitespace joins the last one).  Log-probs come from the
doubles' made-up model (``_lm``): the same text gets the same values whether generated
(``details.tokens``) or read back as prompt (``details.prefill``).

``responder(inputs, parameters) -> str``, when given, writes the text instead (e.g.
Ensemble-Instruct-shaped completions for pipeline tests); the double still applies
``max_new_tokens`` (a token is a whitespace-led word) and the stop strings (left in, as
TGI does).

What it speaks, as TGI 3.3 does:

* ``POST /generate``, ``/generate_stream`` and ``/`` (a list of one answer; the full
  text by default when ``pipeline_tag`` is ``text-generation``); ``details`` (also given
  by ``decoder_input_details`` alone), ``prefill`` with log-probs (the first is null),
  ``top_n_tokens`` (``top_tokens``), ``best_of``; a request without ``parameters`` samples
  (TGI's default ``do_sample: true``); the ``x-*`` timing and token-count headers
  (``x-prompt-tokens``, ``x-generated-tokens``, ...).
* ``POST /v1/chat/completions`` and ``/v1/completions`` the TGI way: one choice whatever
  ``n`` says, temperature 0 is greedy, ``echo`` and completion ``logprobs`` ignored,
  chat ``logprobs`` + ``top_logprobs``, ``eos_token`` read as ``stop`` and
  ``stop_sequence`` kept; errors in streams as ``{"error": {"message",
  "http_status_code"}}`` events, streams end with ``[DONE]``.
* ``POST /tokenize`` (tokens with character spans), ``GET /info``, ``/health``,
  ``/v1/models``, ``/metrics`` (``tgi_`` names).

Validation, error bodies and statuses follow TGI: 422 ``validation`` errors (in streams:
an error event under HTTP 200), 429 ``overloaded`` beyond ``max_concurrent_requests``,
424 for a failed generation (``Fault.generation_error``), plain-text 400/422/415 for
bodies that are not the expected JSON; a truncated stream (``Fault.truncate``) ends with
an ``incomplete_generation_stream`` error event.  ``prefill_logprobs=False`` plays a
backend whose prefill is always empty (it cannot score given text).
"""

from __future__ import annotations

import asyncio
import json
import random
import re
import time
from collections import Counter, deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

from . import _lm
from ._server import LoopbackServer
from .faults import Fault, FaultKind, FaultPlan
from .openai_double import render_chat

__all__ = ["VOCAB", "DoubleStats", "TGIDouble"]

_WORDS = (
    "alpha bravo charlie delta echo foxtrot golf hotel india juliet kilo lima mike november "
    "oscar papa quebec romeo sierra tango uniform victor whiskey xray yankee zulu"
)
VOCAB: tuple[str, ...] = (*(" " + w for w in _WORDS.split(" ")), ".", "\n")
EOS_ID = len(VOCAB)
EOS_TEXT = "</s>"
_IDS = range(EOS_ID)
_TEXT_JSON = (*(json.dumps(t) for t in VOCAB), json.dumps(EOS_TEXT))

_WORD_RE = re.compile(r"\s*\S+|\s+")

_INCOMPLETE_STREAM = "incomplete_generation_stream"
_EVENT_FAULTS = (FaultKind.TRUNCATE, FaultKind.STREAM_ERROR, FaultKind.MALFORMED)
_STATUS_OF_ERROR = {
    "overloaded": 429,
    "validation": 422,
    "generation": 424,
    "incomplete_generation": 500,
    _INCOMPLETE_STREAM: 500,
}
_FLOATS = ("temperature", "repetition_penalty", "frequency_penalty", "top_p", "typical_p")
_UINTS = ("best_of", "max_new_tokens", "seed", "truncate", "top_n_tokens")
_BOOLS = ("do_sample", "return_full_text", "watermark", "details", "decoder_input_details")
_JSON = "application/json"
_VERSION = "3.3.4-double"
_COMPUTE_TYPE = "gpu+optimized"


@dataclass
class DoubleStats:
    """What the double has seen.  ``requests`` counts generation requests only;
    ``by_path`` counts every request by path (``/info`` and ``/health`` included)."""

    requests: int = 0
    by_path: Counter[str] = field(default_factory=Counter)
    prompt_tokens: int = 0
    generated_tokens: int = 0
    faults: int = 0
    rejected: int = 0
    """Requests answered with a validation or overload error."""
    completed: int = 0
    active: int = 0
    max_active: int = 0


class _Invalid(Exception):
    def __init__(self, message: str, error_type: str = "validation") -> None:
        if error_type == "validation":
            message = f"Input validation error: {message}"
        super().__init__(message)
        self.message = message
        self.error_type = error_type


@dataclass(slots=True)
class _Generation:
    text: str
    ids: list[int]
    finish_reason: str
    seed: int | None
    input_length: int
    pieces: list[str] = field(default_factory=list)
    """Each generated token's text (``</s>`` for the EOS token), aligned with ``ids``."""
    logprobs: list[float] = field(default_factory=list)
    inputs: str = ""

    def context(self, i: int) -> str:
        """The text before generated token ``i`` (the prompt, then what came so far)."""
        return self.inputs + "".join(
            p for p, t in zip(self.pieces[:i], self.ids, strict=False) if t != EOS_ID
        )

    def token(self, i: int, top_n: int = 0) -> str:
        """Token ``i`` as TGI's JSON ``{id, text, logprob, special}``."""
        tid = self.ids[i]
        text = _TEXT_JSON[tid] if tid <= EOS_ID else json.dumps(self.pieces[i])
        special = "true" if tid == EOS_ID else "false"
        return (
            f'{{"id": {tid}, "text": {text}, "logprob": {self.logprobs[i]}, "special": {special}}}'
        )

    def top_tokens(self, i: int, n: int) -> list[dict[str, Any]]:
        """The ``n`` most likely tokens at step ``i`` (the chosen one first)."""
        context = self.context(i)
        alts = _lm.alternatives(context, self.pieces[i], VOCAB, n - 1)
        out = [json.loads(self.token(i))]
        for alt in alts:
            out.append(
                {
                    "id": VOCAB.index(alt),
                    "text": alt,
                    "logprob": _lm.logprob(context, alt),
                    "special": False,
                }
            )
        return out[:n]


class TGIDouble(LoopbackServer):
    """An aiohttp server that answers like TGI.  ``start()`` returns its base URL."""

    shutdown_timeout = 0.5

    def __init__(
        self,
        *,
        model_id: str = "double/tgi-model",
        latency: float = 0.0,
        token_latency: float = 0.0,
        max_concurrent_requests: int = 128,
        max_best_of: int = 2,
        max_stop_sequences: int = 4,
        max_input_tokens: int = 4095,
        max_total_tokens: int = 4096,
        natural_tokens: tuple[int, int] = (8, 40),
        sse_space: bool = False,
        keepalive: bool = False,
        faults: FaultPlan | None = None,
        record: int = 256,
        seed: int = 0,
        host: str = "127.0.0.1",
        responder: Callable[[str, dict[str, Any]], str] | None = None,
        max_top_n_tokens: int = 5,
        max_client_batch_size: int = 4,
        pipeline_tag: str | None = "text-generation",
        prefill_logprobs: bool = True,
    ) -> None:
        super().__init__(host=host)
        self.model_id = model_id
        self.max_top_n_tokens = max_top_n_tokens
        self.max_client_batch_size = max_client_batch_size
        self.pipeline_tag = pipeline_tag
        """``text-generation`` makes ``POST /`` return the full text by default."""
        self.prefill_logprobs = prefill_logprobs
        """False plays a server whose ``decoder_input_details`` gives an empty prefill
        (some TGI backends), so it cannot score given text."""
        self.responder = responder
        """Writes the generated text from (inputs, parameters) instead of random words."""
        self.latency = latency
        """Service time of each generation request, in seconds."""
        self.token_latency = token_latency
        """Delay between streamed tokens, in seconds."""
        self.max_concurrent_requests = max_concurrent_requests
        self.max_best_of = max_best_of
        self.max_stop_sequences = max_stop_sequences
        self.max_input_tokens = max_input_tokens
        self.max_total_tokens = max_total_tokens
        self.natural_tokens = natural_tokens
        self.sse_space = sse_space
        """Write ``data: `` with a space (TGI writes none)."""
        self.keepalive = keepalive
        """Write a ``:`` keep-alive comment before each stream event."""
        self.faults = faults or FaultPlan()
        self.healthy = True
        self.last_authorization: str | None = None
        """The Authorization header of the latest generation request."""
        self.stats = DoubleStats()
        self.received: deque[dict[str, Any]] = deque(maxlen=record)
        """The latest generation request bodies (parsed JSON), oldest first."""
        self._rng = random.Random(seed)
        self._active_waiters: list[tuple[int, asyncio.Future[None]]] = []

    # -- lifecycle --------------------------------------------------------------------

    def routes(self, app: web.Application) -> None:
        app.router.add_post("/generate", self._generate)
        app.router.add_post("/generate_stream", self._generate_stream)
        app.router.add_post("/", self._compat)
        app.router.add_post("/v1/chat/completions", self._chat_completions)
        app.router.add_post("/v1/completions", self._completions)
        app.router.add_post("/tokenize", self._tokenize)
        app.router.add_get("/info", self._info)
        app.router.add_get("/health", self._health)
        app.router.add_get("/v1/models", self._models)
        app.router.add_get("/metrics", self._metrics)

    async def wait_active(self, count: int = 1) -> None:
        """Return once at least ``count`` generation requests are being served at once
        (past validation, inside their service time)."""
        if self.stats.active >= count:
            return
        future = asyncio.get_running_loop().create_future()
        self._active_waiters.append((count, future))
        await future

    def _wake_active(self) -> None:
        waiting = []
        for count, future in self._active_waiters:
            if self.stats.active >= count:
                if not future.done():
                    future.set_result(None)
            else:
                waiting.append((count, future))
        self._active_waiters = waiting

    @property
    def last_body(self) -> dict[str, Any]:
        """The body of the latest generation request."""
        return self.received[-1]

    # -- text -------------------------------------------------------------------------

    def complete(self, inputs: str, parameters: dict[str, Any] | None = None) -> tuple[str, str]:
        """(generated_text, finish_reason) the double gives for a valid request."""
        gen = self._produce(inputs, parameters or {}, _is_sampling(parameters or {}))
        return gen.text, gen.finish_reason

    def _produce(
        self, inputs: str, params: dict[str, Any], sampling: bool, seed: int | None = None
    ) -> _Generation:
        input_length = len(inputs.split())
        if params.get("truncate"):
            input_length = min(input_length, params["truncate"])
        max_new = params.get("max_new_tokens")
        if max_new is None:
            max_new = max(1, self.max_total_tokens - input_length)
        if sampling:
            seed = params.get("seed") if seed is None else seed
            if seed is None:
                seed = self._rng.getrandbits(63)
            rng = random.Random(f"{seed}\x00{inputs}")
        else:
            seed = None
            rng = random.Random(inputs)
        if self.responder is not None:
            return self._respond(inputs, params, max_new, seed, input_length)
        natural = rng.randint(*self.natural_tokens)
        ids = rng.choices(_IDS, k=min(natural, max_new))
        stops = params.get("stop")
        finish = "length"
        if stops:
            text = ""
            for i, tid in enumerate(ids):
                text += VOCAB[tid]
                if any(text.endswith(s) for s in stops):
                    del ids[i + 1 :]
                    finish = "stop_sequence"
                    break
        else:
            text = "".join([VOCAB[t] for t in ids])
        if finish == "length" and natural < max_new:
            ids.append(EOS_ID)
            finish = "eos_token"
        pieces = [VOCAB[t] if t != EOS_ID else EOS_TEXT for t in ids]
        return self._finish(inputs, params, text, ids, pieces, finish, seed, input_length)

    def _finish(
        self,
        inputs: str,
        params: dict[str, Any],
        text: str,
        ids: list[int],
        pieces: list[str],
        finish: str,
        seed: int | None,
        input_length: int,
    ) -> _Generation:
        """Log-probs from the made-up model (the context is the prompt as it stands, then
        the text so far), and the prompt in front when ``return_full_text``."""
        logprobs: list[float] = []
        tail = inputs[-_lm.CONTEXT_CHARS :]  # all the made-up model looks at
        for tid, piece in zip(ids, pieces, strict=True):
            logprobs.append(_lm.logprob(tail, piece))
            if tid != EOS_ID:
                tail = (tail + piece)[-_lm.CONTEXT_CHARS :]
        if params.get("return_full_text"):
            text = inputs + text
        return _Generation(text, ids, finish, seed, input_length, pieces, logprobs, inputs)

    def _respond(
        self,
        inputs: str,
        params: dict[str, Any],
        max_new: int,
        seed: int | None,
        input_length: int,
    ) -> _Generation:
        assert self.responder is not None
        tokens = _WORD_RE.findall(self.responder(inputs, params))
        finish = "eos_token"
        if len(tokens) > max_new:
            tokens, finish = tokens[:max_new], "length"
        text = "".join(tokens)
        hits = [(pos + len(s), s) for s in params.get("stop") or () if (pos := text.find(s)) >= 0]
        if hits:
            end = min(hits)[0]
            kept: list[str] = []
            used = 0
            for token in tokens:
                if used >= end:
                    break
                kept.append(token)
                used += len(token)
            tokens, text, finish = kept, text[:end], "stop_sequence"
        ids = [_lm.token_id(t) for t in tokens]
        pieces = list(tokens)
        if finish == "eos_token":
            ids.append(EOS_ID)
            pieces.append(EOS_TEXT)
        return self._finish(inputs, params, text, ids, pieces, finish, seed, input_length)

    def _details(self, gen: _Generation, params: dict[str, Any]) -> dict[str, Any]:
        prefill: list[dict[str, Any]] = []
        if params.get("decoder_input_details") and self.prefill_logprobs:
            prefill = prefill_tokens(self._last_inputs(gen, params))
        details: dict[str, Any] = {
            "finish_reason": gen.finish_reason,
            "generated_tokens": len(gen.ids),
            "seed": gen.seed,
            "prefill": prefill,
            "tokens": [json.loads(gen.token(i)) for i in range(len(gen.ids))],
        }
        top_n = params.get("top_n_tokens") or 0
        if top_n:
            details["top_tokens"] = [gen.top_tokens(i, top_n) for i in range(len(gen.ids))]
        return details

    @staticmethod
    def _last_inputs(gen: _Generation, params: dict[str, Any]) -> str:
        """The prompt as the model sees it: its last ``truncate`` tokens, if set."""
        words = _lm.split_words(gen.inputs)
        return "".join(words[len(words) - gen.input_length :])

    # -- validation -------------------------------------------------------------------

    def _validate(self, body: dict[str, Any], *, stream: bool) -> tuple[str, dict[str, Any]]:
        """TGI's checks, in its order; a request without ``parameters`` gets TGI's
        defaults for that case (``do_sample: true``)."""
        inputs = body["inputs"]
        params: dict[str, Any] = body.get("parameters", {"do_sample": True})
        if stream and (params.get("best_of") or 1) != 1:  # checked first, in the stream
            raise _Invalid("`best_of` != 1 is not supported when streaming tokens")
        if stream and params.get("decoder_input_details"):
            raise _Invalid("`decoder_input_details` == true is not supported when streaming tokens")
        # TGI's best_of check counts any temperature/top_k/top_p/typical_p as sampling
        # (even temperature 1.0, which then decodes greedily)
        sampling = bool(params.get("do_sample")) or any(
            params.get(k) is not None for k in ("temperature", "top_k", "top_p", "typical_p")
        )
        best_of = params.get("best_of")
        best_of = 1 if best_of is None else best_of
        if best_of > 1 and not sampling:
            raise _Invalid("you must use sampling when `best_of` is > 1")
        temperature = params.get("temperature")
        if temperature is not None and temperature <= 0:
            raise _Invalid("`temperature` must be strictly positive")
        penalty = params.get("repetition_penalty")
        if penalty is not None and penalty <= 0:
            raise _Invalid("`repetition_penalty` must be strictly positive")
        frequency = params.get("frequency_penalty")
        if frequency is not None and not -2.0 <= frequency <= 2.0:
            raise _Invalid("`frequency_penalty` must be >= -2.0 and <= 2.0")
        for name in ("top_p", "typical_p"):
            value = params.get(name)
            if value is not None and not 0 < value < 1:
                raise _Invalid(f"`{name}` must be > 0.0 and < 1.0")
        top_k = params.get("top_k")
        if top_k is not None and top_k <= 0:
            raise _Invalid("`top_k` must be strictly positive")
        if params.get("max_new_tokens") == 0:
            raise _Invalid("`max_new_tokens` must be strictly positive")
        stops: list[str] = params.get("stop") or []
        if len(stops) > self.max_stop_sequences:
            raise _Invalid(
                f"`stop` supports up to {self.max_stop_sequences} stop sequences. "
                f"Given: {len(stops)}"
            )
        if best_of > 1 and params.get("seed") is not None:
            raise _Invalid("`seed` must not be set when `best_of` > 1")
        top_n = params.get("top_n_tokens")
        if top_n is not None and top_n > self.max_top_n_tokens:
            raise _Invalid(
                f"`top_n_tokens` must be >= 0 and <= {self.max_top_n_tokens}. Given: {top_n}"
            )
        if not inputs:
            raise _Invalid("`inputs` cannot be empty")
        truncate = params.get("truncate")
        if truncate is not None and (truncate == 0 or truncate > self.max_input_tokens):
            raise _Invalid(
                f"`truncate` must be strictly positive and less than {self.max_input_tokens}. "
                f"Given: {truncate}"
            )
        n_in = len(inputs.split())
        if truncate:
            n_in = min(n_in, truncate)
        max_new = params.get("max_new_tokens")
        if max_new is not None and n_in + max_new > self.max_total_tokens:
            raise _Invalid(
                f"`inputs` tokens + `max_new_tokens` must be <= {self.max_total_tokens}. "
                f"Given: {n_in} `inputs` tokens and {max_new} `max_new_tokens`"
            )
        if n_in > self.max_input_tokens:
            raise _Invalid(
                f"`inputs` must have less than {self.max_input_tokens} tokens. Given: {n_in}"
            )
        if not 0 < best_of <= self.max_best_of:
            raise _Invalid(f"`best_of` must be > 0 and <= {self.max_best_of}. Given: {best_of}")
        return inputs, params

    # -- handlers ---------------------------------------------------------------------

    async def _generate(self, request: web.Request) -> web.StreamResponse:
        return await self._serve(request, stream=False, compat=False)

    async def _generate_stream(self, request: web.Request) -> web.StreamResponse:
        return await self._serve(request, stream=True, compat=False)

    async def _compat(self, request: web.Request) -> web.StreamResponse:
        return await self._serve(request, stream=None, compat=True)

    async def _chat_completions(self, request: web.Request) -> web.StreamResponse:
        return await self._serve(request, stream=None, compat=False, openai="chat")

    async def _completions(self, request: web.Request) -> web.StreamResponse:
        return await self._serve(request, stream=None, compat=False, openai="completions")

    def _info_body(self) -> dict[str, Any]:
        return {
            "model_id": self.model_id,
            "model_sha": None,
            "model_pipeline_tag": self.pipeline_tag,
            "max_concurrent_requests": self.max_concurrent_requests,
            "max_best_of": self.max_best_of,
            "max_stop_sequences": self.max_stop_sequences,
            "max_input_tokens": self.max_input_tokens,
            "max_total_tokens": self.max_total_tokens,
            "validation_workers": 2,
            "max_client_batch_size": self.max_client_batch_size,
            "router": "text-generation-router",
            "version": _VERSION,
            "sha": None,
            "docker_label": None,
        }

    async def _info(self, request: web.Request) -> web.Response:
        self.stats.by_path[request.path] += 1
        return web.Response(body=json.dumps(self._info_body()).encode(), content_type=_JSON)

    async def _models(self, request: web.Request) -> web.Response:
        self.stats.by_path[request.path] += 1
        entry = {"id": self.model_id, "object": "model", "created": 0, "owned_by": self.model_id}
        return web.json_response({"object": "list", "data": [entry]})

    async def _tokenize(self, request: web.Request) -> web.Response:
        self.stats.by_path[request.path] += 1
        try:
            body = json.loads(await request.read())
        except ValueError as exc:
            return _plain(400, f"Failed to parse the request body as JSON: {exc}")
        problem = _schema_problem(body, False)
        if problem:
            return _plain(
                422, f"Failed to deserialize the JSON body into the target type: {problem}"
            )
        return web.json_response(tokenize(body["inputs"]))

    async def _metrics(self, request: web.Request) -> web.Response:
        self.stats.by_path[request.path] += 1
        st = self.stats
        lines = [
            "# TYPE tgi_request_count counter",
            f"tgi_request_count {st.requests}",
            "# TYPE tgi_request_success counter",
            f"tgi_request_success {st.completed}",
            "# TYPE tgi_request_failure counter",
            f'tgi_request_failure{{err="validation"}} {st.rejected}',
            "# TYPE tgi_batch_current_size gauge",
            f"tgi_batch_current_size {st.active}",
            "# TYPE tgi_queue_size gauge",
            "tgi_queue_size 0",
            "# TYPE tgi_request_input_count counter",
            f"tgi_request_input_count {st.prompt_tokens}",
            "# TYPE tgi_request_generated_tokens_sum counter",
            f"tgi_request_generated_tokens_sum {st.generated_tokens}",
        ]
        return web.Response(text="\n".join(lines) + "\n", content_type="text/plain")

    async def _health(self, request: web.Request) -> web.Response:
        self.stats.by_path[request.path] += 1
        if self.healthy:
            return web.Response(status=200)
        body = json.dumps({"error": "unhealthy", "error_type": "healthcheck"})
        return web.Response(status=503, body=body.encode(), content_type=_JSON)

    async def _serve(
        self,
        request: web.Request,
        *,
        stream: bool | None,
        compat: bool,
        openai: str | None = None,
    ) -> web.StreamResponse:
        started = time.perf_counter()
        stats = self.stats
        stats.requests += 1
        stats.by_path[request.path] += 1
        self.last_authorization = request.headers.get("Authorization")
        if request.content_type != _JSON:
            return _plain(415, "Expected request with `Content-Type: application/json`")
        raw = await request.read()
        try:
            body = json.loads(raw)
        except ValueError as exc:
            return _plain(400, f"Failed to parse the request body as JSON: {exc}")
        if openai is not None:
            converted = _from_openai(body, openai == "chat", self.max_client_batch_size)
            if isinstance(converted, web.Response):
                return converted
            bodies, stream = converted
        else:
            problem = _schema_problem(body, compat)
            if problem:
                problem = f"Failed to deserialize the JSON body into the target type: {problem}"
                return _plain(422, problem)
            effective = body
            if compat:  # POST / defaults return_full_text from the model's pipeline tag
                params = dict(body["parameters"]) if "parameters" in body else {"do_sample": True}
                if params.get("return_full_text") is None:
                    params["return_full_text"] = self.pipeline_tag == "text-generation"
                effective = {**body, "parameters": params}
            bodies = [effective]
        self.received.append(body)
        if stream is None:
            stream = body.get("stream") is True
        fault = self.faults.next()
        if fault is not None:
            stats.faults += 1
            if openai is not None and stream and fault.kind in _EVENT_FAULTS:
                return await self._act_openai_stream(fault, request)
            return await self._act(fault, request, stream=stream)
        if stats.active >= self.max_concurrent_requests:
            stats.rejected += 1
            return await self._error(
                request, _Invalid("Model is overloaded", "overloaded"), stream=stream, openai=openai
            )
        try:
            valid = [self._validate(b, stream=stream) for b in bodies]
        except _Invalid as exc:
            stats.rejected += 1
            return await self._error(request, exc, stream=stream, openai=openai)
        stats.active += 1
        stats.max_active = max(stats.max_active, stats.active)
        if self._active_waiters:
            self._wake_active()
        try:
            if self.latency > 0:
                await asyncio.sleep(self.latency)
            if openai is not None:
                return await self._openai_answer(request, body, valid, openai == "chat", stream)
            inputs, params = valid[0]
            if stream:
                return await self._stream(request, inputs, params)
            return self._answer(inputs, params, compat, started)
        finally:
            stats.active -= 1
            stats.completed += 1

    def _count(self, gen: _Generation) -> None:
        self.stats.prompt_tokens += gen.input_length
        self.stats.generated_tokens += len(gen.ids)

    def _answer(
        self, inputs: str, params: dict[str, Any], compat: bool, started: float
    ) -> web.Response:
        sampling = _is_sampling(params)
        gen = self._produce(inputs, params, sampling)
        self._count(gen)
        headers = _timing_headers(gen, inputs, started)
        best_of = params.get("best_of") or 1
        simple = best_of == 1 and not params.get("top_n_tokens")
        if simple and not params.get("decoder_input_details"):  # the fast, common case
            text = _fast_answer(gen, bool(params.get("details")))
            return web.Response(
                body=(f"[{text}]" if compat else text).encode(),
                content_type=_JSON,
                headers=headers,
            )
        out: dict[str, Any] = {"generated_text": gen.text}
        if params.get("details") or params.get("decoder_input_details"):
            details = self._details(gen, params)
            if best_of > 1:
                details["best_of_sequences"] = [
                    {
                        "generated_text": other.text,
                        "finish_reason": other.finish_reason,
                        "generated_tokens": len(other.ids),
                        "seed": other.seed,
                        "prefill": details["prefill"],
                        "tokens": [json.loads(other.token(i)) for i in range(len(other.ids))],
                    }
                    for other in (
                        self._produce(inputs, params, sampling, self._rng.getrandbits(63))
                        for _ in range(best_of - 1)
                    )
                ]
            out["details"] = details
        payload = [out] if compat else out
        return web.Response(body=json.dumps(payload).encode(), content_type=_JSON, headers=headers)

    def _events(self, inputs: str, params: dict[str, Any], *, count: bool = True) -> list[bytes]:
        gen = self._produce(inputs, params, _is_sampling(params))
        if count:
            self._count(gen)
        head = self._sse_head()
        top_n = params.get("top_n_tokens") or 0
        events = []
        for i in range(len(gen.ids) - 1):
            top = f'"top_tokens": {json.dumps(gen.top_tokens(i, top_n))}, ' if top_n else ""
            events.append(
                f'{head}{{"index": {i + 1}, "token": {gen.token(i)}, {top}'
                f'"generated_text": null, "details": null}}\n\n'.encode()
            )
        last = len(gen.ids) - 1
        final: dict[str, Any] = {"index": len(gen.ids), "token": json.loads(gen.token(last))}
        if top_n:
            final["top_tokens"] = gen.top_tokens(last, top_n)
        final["generated_text"] = gen.text
        final["details"] = None
        if params.get("details"):
            final["details"] = {
                "finish_reason": gen.finish_reason,
                "generated_tokens": len(gen.ids),
                "seed": gen.seed,
                "input_length": gen.input_length,
            }
        events.append(self._sse(final))
        return events

    def _sse_head(self) -> str:
        return (":\n\n" if self.keepalive else "") + ("data: " if self.sse_space else "data:")

    def _sse(self, event: dict[str, Any]) -> bytes:
        return f"{self._sse_head()}{json.dumps(event)}\n\n".encode()

    async def _open_stream(self, request: web.Request, inputs: str = "") -> web.StreamResponse:
        resp = web.StreamResponse(
            headers={
                "Content-Type": "text/event-stream",
                "Cache-Control": "no-cache",
                "x-compute-type": _COMPUTE_TYPE,
                "x-compute-characters": str(len(inputs)),
                "X-Accel-Buffering": "no",
            }
        )
        await resp.prepare(request)
        return resp

    async def _write_events(self, resp: web.StreamResponse, events: list[bytes]) -> None:
        if self.token_latency > 0:
            for i, event in enumerate(events):
                if i:
                    await asyncio.sleep(self.token_latency)
                await resp.write(event)
        else:
            await resp.write(b"".join(events))

    async def _stream(
        self, request: web.Request, inputs: str, params: dict[str, Any]
    ) -> web.StreamResponse:
        events = self._events(inputs, params)
        resp = await self._open_stream(request, inputs)
        await self._write_events(resp, events)
        await resp.write_eof()
        return resp

    async def _error(
        self, request: web.Request, exc: _Invalid, *, stream: bool, openai: str | None = None
    ) -> web.StreamResponse:
        if stream:  # TGI reports these inside the stream, under HTTP 200
            resp = await self._open_stream(request)
            if openai is not None:
                error = {"error": {"message": exc.message, "http_status_code": 422}}
                await resp.write(self._sse(error) + self._sse_done())
            else:
                await resp.write(self._sse({"error": exc.message, "error_type": exc.error_type}))
            await resp.write_eof()
            return resp
        return _tgi_error(_STATUS_OF_ERROR[exc.error_type], exc.message, exc.error_type)

    def _sse_done(self) -> bytes:
        return f"{self._sse_head()}[DONE]\n\n".encode()

    # -- TGI's OpenAI-style routes -------------------------------------------------------

    async def _openai_answer(
        self,
        request: web.Request,
        body: dict[str, Any],
        valid: list[tuple[str, dict[str, Any]]],
        chat: bool,
        stream: bool,
    ) -> web.StreamResponse:
        gens = []
        for inputs, params in valid:
            gens.append(self._produce(inputs, params, _is_sampling(params)))
            self._count(gens[-1])
        model = body.get("model")
        model_id = self.model_id if model in (None, "tgi") or not chat else str(model)
        head = {
            "id": "",
            "created": int(time.time()),
            "model": model_id,
            "system_fingerprint": f"{_VERSION}-native",
        }
        top_n = valid[0][1].get("top_n_tokens") or 0
        want_logprobs = chat and bool(body.get("logprobs"))
        if not stream:
            choices: list[dict[str, Any]] = []
            for index, gen in enumerate(gens):
                reason = _openai_finish(gen.finish_reason)
                if chat:
                    choice: dict[str, Any] = {
                        "index": 0,
                        "message": {"role": "assistant", "content": gen.text},
                        "logprobs": None,
                        "finish_reason": reason,
                    }
                    if want_logprobs:
                        choice["logprobs"] = {
                            "content": [_chat_logprob(gen, i, top_n) for i in range(len(gen.ids))]
                        }
                else:
                    choice = {
                        "finish_reason": reason,
                        "index": index,
                        "logprobs": None,
                        "text": gen.text,
                    }
                choices.append(choice)
            prompt = sum(g.input_length for g in gens)
            done = sum(len(g.ids) for g in gens)
            out = {
                "object": "chat.completion" if chat else "text_completion",
                **head,
                "choices": choices,
                "usage": {
                    "prompt_tokens": prompt,
                    "completion_tokens": done,
                    "total_tokens": prompt + done,
                },
            }
            return web.json_response(out, headers=_timing_headers(gens[0], valid[0][0], None))
        include_usage = bool((body.get("stream_options") or {}).get("include_usage"))
        events: list[bytes] = []
        for index, gen in enumerate(gens):
            for i in range(len(gen.ids)):
                last = i == len(gen.ids) - 1
                special = gen.ids[i] == EOS_ID
                if chat:
                    chunk: dict[str, Any] = {
                        "object": "chat.completion.chunk",
                        **head,
                        "choices": [
                            {
                                "index": 0,
                                "delta": {
                                    "role": "assistant",
                                    "content": "" if special else gen.pieces[i],
                                },
                                "logprobs": (
                                    {"content": [_chat_logprob(gen, i, top_n)]}
                                    if want_logprobs
                                    else None
                                ),
                                "finish_reason": _openai_finish(gen.finish_reason)
                                if last
                                else None,
                            }
                        ],
                        "usage": None,
                    }
                else:  # TGI writes every token's text here, the EOS token's included
                    chunk = {
                        "object": "text_completion",
                        **head,
                        "choices": [
                            {
                                "finish_reason": gen.finish_reason if last else "",
                                "index": index,
                                "logprobs": None,
                                "text": gen.pieces[i],
                            }
                        ],
                    }
                    if last:
                        chunk["usage"] = _usage(gen)
                events.append(self._sse(chunk))
            if chat and include_usage:
                events.append(
                    self._sse(
                        {
                            "object": "chat.completion.chunk",
                            **head,
                            "choices": [],
                            "usage": _usage(gen),
                        }
                    )
                )
        events.append(self._sse_done())
        resp = await self._open_stream(request, valid[0][0])
        await self._write_events(resp, events)
        await resp.write_eof()
        return resp

    # -- faults -----------------------------------------------------------------------

    async def _act_openai_stream(self, fault: Fault, request: web.Request) -> web.StreamResponse:
        """Stream faults on the /v1 routes, in their shape: TGI turns every error into
        ``{"error": {"message", "http_status_code": 422}}`` and still ends with [DONE]."""
        chunk = {
            "object": "chat.completion.chunk",
            "id": "",
            "created": int(time.time()),
            "model": self.model_id,
            "system_fingerprint": f"{_VERSION}-native",
            "choices": [
                {
                    "index": 0,
                    "delta": {"role": "assistant", "content": " fault"},
                    "logprobs": None,
                    "finish_reason": None,
                }
            ],
            "usage": None,
        }
        resp = await self._open_stream(request)
        if fault.kind is FaultKind.MALFORMED:
            await resp.write(self._sse(chunk) + f"{self._sse_head()}{{oops\n\n".encode())
        else:
            message = (
                "Incomplete generation stream"
                if fault.kind is FaultKind.TRUNCATE
                else fault.message
            )
            error = {"error": {"message": message, "http_status_code": 422}}
            await resp.write(self._sse(chunk) + self._sse(error) + self._sse_done())
        await resp.write_eof()
        return resp

    async def _act(self, fault: Fault, request: web.Request, *, stream: bool) -> web.StreamResponse:
        kind = fault.kind
        if kind is FaultKind.STATUS:
            headers = {}
            if fault.retry_after is not None:
                headers["Retry-After"] = _header(fault.retry_after)
            if fault.body is None:
                answer = _tgi_error(fault.code, fault.message, fault.error_type)
                answer.headers.update(headers)
                return answer
            ctype = _JSON if fault.body.lstrip().startswith(("{", "[")) else "text/plain"
            return web.Response(
                status=fault.code, body=fault.body.encode(), content_type=ctype, headers=headers
            )
        if kind is FaultKind.HANG:
            await self._stopping.wait()
            kind = FaultKind.RESET
        if kind is FaultKind.RESET:
            if request.transport is not None:
                request.transport.abort()
            return web.Response(status=500)  # never reaches the client
        sample = self._events(
            _sample_inputs(request), {"max_new_tokens": 6, "details": True}, count=False
        )
        if kind is FaultKind.STREAM_ERROR:
            if not stream:
                return _tgi_error(
                    _STATUS_OF_ERROR.get(fault.error_type, 424), fault.message, fault.error_type
                )
            resp = await self._open_stream(request)
            error = {"error": fault.message, "error_type": fault.error_type}
            await resp.write(sample[0] + self._sse(error))
            await resp.write_eof()
            return resp
        if kind is FaultKind.EMPTY:
            if not stream:
                return web.Response(status=200, body=b"", content_type=_JSON)
            resp = await self._open_stream(request)
            await resp.write_eof()
            return resp
        if kind is FaultKind.MALFORMED:
            if not stream:
                return web.Response(status=200, body=b'{"generated_text": "un', content_type=_JSON)
            resp = await self._open_stream(request)
            await resp.write(sample[0] + b'data:{"index": 2, "token": {"id"\n\n')
            await resp.write_eof()
            return resp
        # TRUNCATE
        if stream:  # the generation stops early: TGI closes the stream with an error event
            resp = await self._open_stream(request)
            error = {"error": "Incomplete generation stream", "error_type": _INCOMPLETE_STREAM}
            await resp.write(b"".join(sample[: len(sample) // 2]) + self._sse(error))
            await resp.write_eof()
            return resp
        full = json.dumps({"generated_text": " cut short", "details": None}).encode()
        resp = web.StreamResponse(headers={"Content-Type": _JSON})
        resp.content_length = len(full)
        await resp.prepare(request)
        await resp.write(full[: len(full) // 2])
        if request.transport is not None:
            request.transport.abort()
        return resp


def _fast_answer(gen: _Generation, details: bool) -> str:
    """The /generate answer, encoded by hand (the common case: no prefill, no top tokens)."""
    text = json.dumps(gen.text)
    if not details:
        return f'{{"generated_text": {text}}}'
    tokens = ", ".join(
        [
            f'{{"id": {t}, "text": {_TEXT_JSON[t] if t <= EOS_ID else json.dumps(piece)}, '
            f'"logprob": {lp}, "special": {"true" if t == EOS_ID else "false"}}}'
            for t, piece, lp in zip(gen.ids, gen.pieces, gen.logprobs, strict=True)
        ]
    )
    seed = "null" if gen.seed is None else gen.seed
    return (
        f'{{"generated_text": {text}, "details": {{"finish_reason": "{gen.finish_reason}", '
        f'"generated_tokens": {len(gen.ids)}, "seed": {seed}, "prefill": [], '
        f'"tokens": [{tokens}]}}}}'
    )


def prefill_tokens(inputs: str) -> list[dict[str, Any]]:
    """``details.prefill``: the prompt's tokens with their log-probs (the first has none:
    TGI's NaN, written as null)."""
    out: list[dict[str, Any]] = []
    seen = ""
    for i, word in enumerate(_lm.split_words(inputs)):
        lp = None if i == 0 else _lm.logprob(seen, word)
        out.append({"id": _lm.token_id(word), "text": word, "logprob": lp})
        seen += word
    return out


def tokenize(inputs: str) -> list[dict[str, Any]]:
    """``/tokenize``: the prompt's tokens with their character offsets."""
    out: list[dict[str, Any]] = []
    start = 0
    for word in _lm.split_words(inputs):
        out.append(
            {"id": _lm.token_id(word), "text": word, "start": start, "stop": start + len(word)}
        )
        start += len(word)
    return out


def _is_sampling(params: dict[str, Any]) -> bool:
    """TGI samples when asked to, or when any sampling warper is present."""
    temperature = params.get("temperature")
    return bool(
        params.get("do_sample")
        or (temperature is not None and temperature != 1.0)
        or params.get("top_k") is not None
        or params.get("top_p") is not None
        or params.get("typical_p") is not None
    )


def _schema_problem(body: Any, compat: bool) -> str | None:
    """What keeps ``body`` from deserializing as TGI's request type, or None."""
    if not isinstance(body, dict):
        return "expected a JSON object"
    if not isinstance(body.get("inputs"), str):
        return "inputs: missing field or not a string"
    if "parameters" not in body:
        return None
    params = body["parameters"]
    if params is None:
        return "parameters: invalid type: null, expected struct GenerateParameters"
    if not isinstance(params, dict):
        return "parameters: expected a JSON object"
    for key, value in params.items():
        if value is None:
            continue
        if key in _FLOATS and (isinstance(value, bool) or not isinstance(value, int | float)):
            return f"parameters.{key}: expected a number"
        if key in _UINTS and (isinstance(value, bool) or not isinstance(value, int) or value < 0):
            return f"parameters.{key}: expected an unsigned integer"
        if key == "top_k" and (isinstance(value, bool) or not isinstance(value, int)):
            return "parameters.top_k: expected an integer"
        if key in _BOOLS and not isinstance(value, bool):
            return f"parameters.{key}: expected a boolean"
        if key == "stop" and (
            not isinstance(value, list) or not all(isinstance(s, str) for s in value)
        ):
            return "parameters.stop: expected a list of strings"
    if compat and not isinstance(body.get("stream", False), bool):
        return "stream: expected a boolean"
    return None


def _timing_headers(gen: _Generation, inputs: str, started: float | None) -> dict[str, str]:
    """The ``x-*`` headers TGI puts on a generation answer (times in ms, compute time in s)."""
    total = 0.0 if started is None else time.perf_counter() - started
    ms = int(total * 1000)
    return {
        "x-compute-type": _COMPUTE_TYPE,
        "x-compute-time": repr(total),
        "x-compute-characters": str(len(inputs)),
        "x-total-time": str(ms),
        "x-validation-time": "0",
        "x-queue-time": "0",
        "x-inference-time": str(ms),
        "x-time-per-token": str(ms // max(len(gen.ids), 1)),
        "x-prompt-tokens": str(gen.input_length),
        "x-generated-tokens": str(len(gen.ids)),
    }


def _openai_finish(reason: str) -> str:
    """TGI's OpenAI routes: ``eos_token`` reads ``stop``; the others keep TGI's names."""
    return "stop" if reason == "eos_token" else reason


def _usage(gen: _Generation) -> dict[str, int]:
    done = len(gen.ids)
    return {
        "prompt_tokens": gen.input_length,
        "completion_tokens": done,
        "total_tokens": gen.input_length + done,
    }


def _chat_logprob(gen: _Generation, i: int, top_n: int) -> dict[str, Any]:
    tops = gen.top_tokens(i, top_n) if top_n else []
    return {
        "token": gen.pieces[i],
        "logprob": gen.logprobs[i],
        "top_logprobs": [{"token": t["text"], "logprob": t["logprob"]} for t in tops],
    }


def _from_openai(
    body: Any, chat: bool, max_batch: int
) -> tuple[list[dict[str, Any]], bool] | web.Response:
    """TGI's translation of an OpenAI-style request into native ones (one per prompt):
    temperature 0 means greedy, anything else samples; ``n``, ``echo`` and (for
    completions) ``logprobs`` are ignored; chat ``top_logprobs`` becomes ``top_n_tokens``
    and ``presence_penalty`` + 2 the repetition penalty."""
    if not isinstance(body, dict):
        return _plain(422, "Failed to deserialize the JSON body into the target type")
    if chat:
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages:
            return _plain(422, "Failed to deserialize the JSON body: messages: missing field")
        try:
            prompts = [render_chat(messages)]
        except ValueError:
            return _plain(422, "Failed to deserialize the JSON body: messages: bad message")
    else:
        prompt = body.get("prompt")
        if isinstance(prompt, str):
            prompt = [prompt]
        if not isinstance(prompt, list) or not all(isinstance(x, str) for x in prompt):
            return _plain(422, "Failed to deserialize the JSON body: prompt: invalid type")
        prompts = prompt
        if body.get("suffix") is not None:
            message = "Suffix is not supported and can be achieved by preprocessing the prompt."
            return _tgi_error(422, message, "suffix not supported")
        if len(prompts) > max_batch:
            return _tgi_error(
                422,
                f"Number of prompts exceeds the maximum allowed batch size of {max_batch}",
                "batch size exceeded",
            )
    stream = body.get("stream") is True
    temperature = body.get("temperature")
    params: dict[str, Any] = {"details": True}
    if temperature == 0:
        params["do_sample"] = False
    else:
        params["do_sample"] = True
        params["temperature"] = temperature
    for ours, theirs in (
        ("max_new_tokens", "max_tokens"),
        ("top_p", "top_p"),
        ("seed", "seed"),
        ("frequency_penalty", "frequency_penalty"),
        ("stop", "stop"),
    ):
        if body.get(theirs) is not None:
            params[ours] = body[theirs]
    if chat:
        if body.get("presence_penalty") is not None:
            params["repetition_penalty"] = body["presence_penalty"] + 2.0
        if body.get("top_logprobs") is not None:
            params["top_n_tokens"] = body["top_logprobs"]
    elif body.get("repetition_penalty") is not None:
        params["repetition_penalty"] = body["repetition_penalty"]
    problem = _schema_problem({"inputs": "", "parameters": params}, False)
    if problem:
        return _plain(422, f"Failed to deserialize the JSON body into the target type: {problem}")
    return [{"inputs": p, "parameters": dict(params)} for p in prompts], stream


def _sample_inputs(request: web.Request) -> str:
    return f"fault {request.path}"


def _header(value: float | str) -> str:
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value)


def _plain(status: int, text: str) -> web.Response:
    return web.Response(status=status, text=text, content_type="text/plain")


def _tgi_error(status: int, message: str, error_type: str) -> web.Response:
    body = json.dumps({"error": message, "error_type": error_type}).encode()
    return web.Response(status=status, body=body, content_type=_JSON)
