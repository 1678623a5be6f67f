"""A vLLM-flavoured OpenAI-compatible test server (aiohttp), quirks included.

    async with OpenAIDouble(model="m", honour_n=False) as double:
        backend = OpenAIBackend(double.url)
        ...
        assert double.requests == 3
        assert double.last_payload["top_k"] == 50

Text is deterministic: greedy requests (temperature 0) depend on the prompt only, and
seeded sampling on prompt, seed and choice; a token is one whitespace-separated word.
Log-probabilities come from the doubles' made-up model (``_lm``): a pure function of
the text before a token and the token, so echoing a prompt plus a completion the double
wrote reports the same per-token values it reported while writing it.  Completions honour
``logprobs`` (an int: ``tokens``, ``token_logprobs``, ``top_logprobs``, ``text_offset``),
``echo`` (the prompt's tokens first, the very first with a null logprob; with
``max_tokens: 0`` the prompt alone) and vLLM's ``prompt_logprobs``; chat honours
``logprobs`` + ``top_logprobs`` (``logprobs.content``).  Chat content may be a string or
a list of text parts; ``tool`` and ``developer`` messages are accepted.  In streams each
choice's last text chunk carries its finish_reason, as vLLM's do.
``logprobs=False`` plays a server that ignores all of that (``logprobs: null``, no echo).

``honour_n=False`` answers one choice per prompt whatever ``n`` says (llama.cpp, TGI);
``health_endpoint=False`` removes ``/health`` (llama.cpp has none); ``api_key`` demands
a bearer token on ``/v1/*``.  Faults come from ``faults`` (a ``FaultPlan``), consulted
once per valid generation request.  Kept lean: it is also a benchmark target.
"""

from __future__ import annotations

import asyncio
import functools
import itertools
import json
import random
import re
import time
import zlib
from collections import Counter, deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

from . import _lm
from ._server import LoopbackServer
from .faults import Fault, FaultKind, FaultPlan

__all__ = ["OpenAIDouble", "render_chat"]

_VOCABULARY = (
    "the a an of to and in is it that for on with as was at by be this from or are river "
    "stone light cloud green quiet bright small ancient city garden music paper window "
    "morning answer number simple story water field winter friend market signal letter "
    "mountain harbor engine planet orange silver forest bridge lantern meadow runs grows "
    "sings opens moves turns holds finds makes keeps"
)
_WORDS = tuple(_VOCABULARY.split())
_SSE_HEADERS = {"Content-Type": "text/event-stream", "Cache-Control": "no-cache"}
_ERROR_TYPES = {400: "BadRequestError", 401: "Unauthorized", 404: "NotFoundError"}


class _Invalid(ValueError):
    def __init__(self, status: int, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.param = status, message, param


@dataclass(frozen=True, slots=True)
class _Choice:
    index: int
    pieces: tuple[str, ...]
    finish: str
    stop_reason: str | None

    @property
    def text(self) -> str:
        return "".join(self.pieces)


@dataclass(slots=True)
class _Job:
    chat: bool
    choices: list[_Choice]
    prompt_tokens: int
    stream: bool
    include_usage: bool
    prompts: list[str] = field(default_factory=list)
    """The prompt (chat: the rendered conversation) of each choice, by position."""
    logprobs: int | None = None
    """Completions: top alternatives per token; chat: ``top_logprobs`` (0 if unset)."""
    echo: bool = False
    prompt_logprobs: int | None = None
    echo_only: bool = False
    """``echo`` with ``max_tokens: 0``: the prompt alone comes back."""

    @property
    def completion_tokens(self) -> int:
        # vLLM generates one token for an echo-only request and counts it in usage
        return sum(max(len(c.pieces), 1 if self.echo_only else 0) for c in self.choices)


def _want(cond: bool, param: str, message: str) -> None:
    if not cond:
        raise _Invalid(400, message, param)


def _is_int(v: object) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_num(v: object) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool)


def _cut_at_stop(pieces: list[str], stops: tuple[str, ...]) -> tuple[list[str], str | None]:
    """Cut the pieces where the first stop string starts; return (pieces, matched stop)."""
    text = "".join(pieces)
    hits = [(pos, s) for s in stops if (pos := text.find(s)) >= 0]
    if not hits:
        return pieces, None
    pos, stop = min(hits)
    out: list[str] = []
    used = 0
    for piece in pieces:
        if used >= pos:
            break
        out.append(piece[: pos - used])
        used += len(piece)
    return out, stop


@functools.lru_cache(maxsize=4096)
def _sample(
    index: int, key: str, max_tokens: int, min_tokens: int, stop: tuple[str, ...], chat: bool
) -> _Choice:
    """One choice; a pure function of its arguments (cached: benchmarks repeat prompts)."""
    rng = random.Random(zlib.crc32(key.encode()))
    natural = max(rng.randint(3, 48), min_tokens)  # tokens before end of sequence
    count = min(natural, max_tokens)
    pieces = [" " + w for w in rng.choices(_WORDS, k=count)]
    if chat and pieces:
        pieces[0] = pieces[0][1:]
    finish = "length" if natural >= max_tokens else "stop"
    pieces, matched = _cut_at_stop(pieces, stop) if stop else (pieces, None)
    if matched is not None:
        finish = "stop"
    return _Choice(index, tuple(pieces), finish, matched)


_PIECE = re.compile(r"\s*\S+|\s+")


def _respond(index: int, text: str, max_tokens: int, stop: tuple[str, ...]) -> _Choice:
    """A choice with a responder's text, cut at ``max_tokens`` pieces and at a stop string."""
    pieces = _PIECE.findall(text)
    finish = "stop"
    if len(pieces) > max_tokens:
        pieces, finish = pieces[:max_tokens], "length"
    pieces, matched = _cut_at_stop(pieces, stop) if stop else (pieces, None)
    if matched is not None:
        finish = "stop"
    return _Choice(index, tuple(pieces), finish, matched)


class OpenAIDouble(LoopbackServer):
    """An in-process vLLM-style server on 127.0.0.1 with a free port."""

    def __init__(
        self,
        *,
        model: str = "double-model",
        max_model_len: int = 2048,
        honour_n: bool = True,
        api_key: str | None = None,
        latency: float = 0.0,
        token_delay: float = 0.0,
        faults: FaultPlan | None = None,
        health_endpoint: bool = True,
        flat_errors: bool = False,
        history: int = 64,
        responder: Callable[[str, dict[str, Any]], str] | None = None,
        logprobs: bool = True,
        max_logprobs: int = 20,
        echo_max_tokens_zero: bool = True,
    ) -> None:
        super().__init__()
        self.model = model
        self.logprobs = logprobs
        """Honour ``logprobs``, ``echo`` and ``prompt_logprobs``; False answers like a
        server that ignores them (TGI's /v1): ``logprobs: null`` and no echo."""
        self.max_logprobs = max_logprobs
        self.echo_max_tokens_zero = echo_max_tokens_zero
        """Accept ``max_tokens: 0`` with ``echo`` (vLLM does; older servers want >= 1)."""
        self.responder = responder
        """Writes a choice's text from (prompt, request body) instead of random words;
        ``max_tokens`` (a token is a whitespace-led word) and stop strings still apply."""
        self.max_model_len = max_model_len
        self.honour_n = honour_n
        self.latency = latency
        self.token_delay = token_delay
        self.faults = faults if faults is not None else FaultPlan()
        self.health_endpoint = health_endpoint
        self.flat_errors = flat_errors
        self.healthy = True
        self._bearer = None if api_key is None else f"Bearer {api_key}"
        self.requests = 0
        """Generation requests received (completions and chat, valid or not)."""
        self.counts: Counter[str] = Counter()
        """Requests received per path."""
        self.payloads: deque[Any] = deque(maxlen=history)
        self.last_payload: Any = None
        self.last_headers: dict[str, str] = {}
        self.in_flight = 0
        self.max_in_flight = 0
        self._tokens = [0, 0]  # prompt, generation (for /metrics)
        self._unseeded = itertools.count()
        self._ids = itertools.count()

    # -- lifecycle ----------------------------------------------------------------------

    def routes(self, app: web.Application) -> None:
        app.router.add_post("/v1/completions", self._completions)
        app.router.add_post("/v1/chat/completions", self._chat)
        app.router.add_get("/v1/models", self._models)
        app.router.add_get("/metrics", self._metrics)
        if self.health_endpoint:
            app.router.add_get("/health", self._health)

    # -- small helpers --------------------------------------------------------------------

    def _error(
        self, status: int, message: str, param: str | None = None, headers: Any = None
    ) -> web.Response:
        err = {
            "message": message,
            "type": _ERROR_TYPES.get(status, "InternalServerError"),
            "param": param,
            "code": status,
        }
        body = {"object": "error", **err} if self.flat_errors else {"error": err}
        return web.json_response(body, status=status, headers=headers)

    def _denied(self, request: web.Request) -> web.Response | None:
        if self._bearer is None or request.headers.get("Authorization") == self._bearer:
            return None
        return self._error(401, "Unauthorized")

    # -- plain endpoints ------------------------------------------------------------------

    async def _health(self, request: web.Request) -> web.Response:
        self.counts["/health"] += 1
        return web.Response(status=200 if self.healthy else 503)

    async def _models(self, request: web.Request) -> web.Response:
        self.counts["/v1/models"] += 1
        if denied := self._denied(request):
            return denied
        entry = {
            "id": self.model,
            "object": "model",
            "created": int(time.time()),
            "owned_by": "vllm",
            "root": self.model,
            "parent": None,
            "max_model_len": self.max_model_len,
            "permission": [],
        }
        return web.json_response({"object": "list", "data": [entry]})

    async def _metrics(self, request: web.Request) -> web.Response:
        self.counts["/metrics"] += 1
        name = f'model_name="{self.model}"'
        lines = [
            f"vllm:num_requests_running{{{name}}} {self.in_flight}.0",
            f"vllm:num_requests_waiting{{{name}}} 0.0",
            f"vllm:prompt_tokens_total{{{name}}} {self._tokens[0]}.0",
            f"vllm:generation_tokens_total{{{name}}} {self._tokens[1]}.0",
        ]
        return web.Response(text="\n".join(lines) + "\n", content_type="text/plain")

    # -- generation -----------------------------------------------------------------------

    async def _completions(self, request: web.Request) -> web.StreamResponse:
        return await self._generate(request, chat=False)

    async def _chat(self, request: web.Request) -> web.StreamResponse:
        return await self._generate(request, chat=True)

    async def _generate(self, request: web.Request, *, chat: bool) -> web.StreamResponse:
        self.requests += 1
        self.counts[request.path] += 1
        self.last_headers = dict(request.headers)
        if denied := self._denied(request):
            return denied
        try:
            payload = json.loads(await request.read())
        except ValueError:
            return self._error(400, "request body is not valid JSON")
        self.last_payload = payload
        self.payloads.append(payload)
        try:
            job = self._plan(payload, chat)
        except _Invalid as exc:
            return self._error(exc.status, exc.message, exc.param)
        self.in_flight += 1
        self.max_in_flight = max(self.max_in_flight, self.in_flight)
        try:
            fault = self.faults.next()
            if fault is not None:
                return await self._fault(request, fault, job)
            if self.latency:
                await asyncio.sleep(self.latency)
            self._tokens[0] += job.prompt_tokens
            self._tokens[1] += job.completion_tokens
            if job.stream:
                return await self._stream(request, job, self._events(job))
            return web.json_response(self._body(job))
        finally:
            self.in_flight -= 1

    def _plan(self, p: Any, chat: bool) -> _Job:
        """Validate a request the way vLLM does (400 for schema errors) and run it."""
        _want(isinstance(p, dict), "body", "request body must be a JSON object")
        model = p.get("model")
        if model is not None and model != self.model:
            raise _Invalid(404, f"The model `{model}` does not exist.", "model")
        if chat:
            msgs = p.get("messages")
            _want(isinstance(msgs, list) and bool(msgs), "messages", "messages: non-empty list")
            prompts = [render_chat(msgs)]
        else:
            prompt = p.get("prompt")
            prompts = [prompt] if isinstance(prompt, str) else prompt
            ok = isinstance(prompts, list) and bool(prompts)
            _want(ok and all(isinstance(x, str) for x in prompts), "prompt", "prompt: str or list")
        n = p.get("n", 1)
        _want(_is_int(n) and n >= 1, "n", "n must be an integer >= 1")
        temperature = p.get("temperature", 1.0)
        _want(_is_num(temperature) and temperature >= 0, "temperature", "temperature must be >= 0")
        top_p = p.get("top_p", 1.0)
        _want(_is_num(top_p) and 0 < top_p <= 1, "top_p", "top_p must be in (0, 1]")
        top_k = p.get("top_k", -1)
        _want(_is_int(top_k) and (top_k == -1 or top_k >= 0), "top_k", "top_k must be -1 or >= 0")
        seed = p.get("seed")
        _want(seed is None or _is_int(seed), "seed", "seed must be an integer")
        stop = p.get("stop") or []
        stop = [stop] if isinstance(stop, str) else stop
        _want(isinstance(stop, list) and all(isinstance(s, str) for s in stop), "stop", "bad stop")
        stream = p.get("stream", False)
        _want(isinstance(stream, bool), "stream", "stream must be a boolean")
        options = p.get("stream_options")
        _want(options is None or stream, "stream_options", "stream_options needs stream=true")
        prompt_tokens = [len(x.split()) for x in prompts]
        longest = max(prompt_tokens)
        max_tokens = p.get("max_completion_tokens", p.get("max_tokens")) if chat else None
        if not chat:
            max_tokens = p.get("max_tokens", 16)
            if max_tokens is None:  # vLLM reads an explicit null as the default
                max_tokens = 16
        if max_tokens is None:
            max_tokens = max(1, self.max_model_len - longest)
        logprobs, echo, prompt_logprobs = self._logprob_fields(p, chat, stream)
        echo_only = echo and max_tokens == 0 and self.echo_max_tokens_zero
        _want(
            _is_int(max_tokens) and (max_tokens >= 1 or echo_only),
            "max_tokens",
            "max_tokens must be at least 1 (0 only with echo)",
        )
        if longest + max_tokens > self.max_model_len:
            raise _Invalid(
                400,
                f"the prompt ({longest} tokens) plus max_tokens ({max_tokens}) exceeds this "
                f"model's maximum context length of {self.max_model_len} tokens",
                "max_tokens",
            )
        min_tokens = p.get("min_tokens", 0)
        ok = _is_int(min_tokens) and 0 <= min_tokens <= max_tokens
        _want(ok, "min_tokens", "min_tokens must be in [0, max_tokens]")
        choices: list[_Choice] = []
        per_prompt = n if self.honour_n else 1
        for k, prompt in enumerate(prompts):
            for i in range(per_prompt):
                if temperature == 0:
                    key = prompt
                elif seed is not None:
                    key = f"{seed}\x00{i}\x00{prompt}"
                else:
                    key = f"{next(self._unseeded)}\x00{prompt}"
                if self.responder is not None:
                    choices.append(
                        _respond(
                            k * per_prompt + i, self.responder(prompt, p), max_tokens, tuple(stop)
                        )
                    )
                    continue
                choices.append(
                    _sample(k * per_prompt + i, key, max_tokens, min_tokens, tuple(stop), chat)
                )
        include_usage = isinstance(options, dict) and bool(options.get("include_usage"))
        return _Job(
            chat,
            choices,
            sum(prompt_tokens),
            stream,
            include_usage,
            prompts=[prompts[c.index // per_prompt] for c in choices],
            logprobs=logprobs,
            echo=echo,
            prompt_logprobs=prompt_logprobs,
            echo_only=echo_only,
        )

    def _logprob_fields(
        self, p: dict[str, Any], chat: bool, stream: bool
    ) -> tuple[int | None, bool, int | None]:
        """(logprobs, echo, prompt_logprobs) as this server honours them, validated."""
        echo = p.get("echo", False) if not chat else False
        _want(echo is None or isinstance(echo, bool), "echo", "echo must be a boolean")
        prompt_logprobs = p.get("prompt_logprobs") if not chat else None
        if chat:
            wanted = p.get("logprobs", False)
            _want(wanted is None or isinstance(wanted, bool), "logprobs", "logprobs: boolean")
            top = p.get("top_logprobs")
            _want(
                top is None or (_is_int(top) and 0 <= top <= self.max_logprobs),
                "top_logprobs",
                f"top_logprobs must be an integer in [0, {self.max_logprobs}]",
            )
            _want(
                top is None or bool(wanted),
                "top_logprobs",
                "when using `top_logprobs`, `logprobs` must be set to true",
            )
            logprobs = (top or 0) if wanted else None
        else:
            logprobs = p.get("logprobs")
            _want(
                logprobs is None or (_is_int(logprobs) and logprobs >= 0),
                "logprobs",
                "`logprobs` must be a non-negative integer",
            )
            _want(
                logprobs is None or logprobs <= self.max_logprobs,
                "logprobs",
                f"requested {logprobs} logprobs per token, more than this server's "
                f"maximum of {self.max_logprobs}",
            )
            _want(
                prompt_logprobs is None or (_is_int(prompt_logprobs) and prompt_logprobs >= 0),
                "prompt_logprobs",
                "`prompt_logprobs` must be a non-negative integer",
            )
            _want(
                prompt_logprobs is None or not stream,
                "prompt_logprobs",
                "`prompt_logprobs` are not available when `stream=True`",
            )
        if not self.logprobs:  # a server that ignores all of them
            return None, False, None
        return logprobs, bool(echo), prompt_logprobs

    def _head(self, job: _Job, *, chunk: bool) -> dict[str, Any]:
        kind = "chat.completion" if job.chat else "text_completion"
        return {
            "id": f"{'chatcmpl' if job.chat else 'cmpl'}-{next(self._ids)}",
            "object": kind + ".chunk" if chunk and job.chat else kind,
            "created": int(time.time()),
            "model": self.model,
        }

    def _usage(self, job: _Job) -> dict[str, int]:
        done = job.completion_tokens
        return {
            "prompt_tokens": job.prompt_tokens,
            "completion_tokens": done,
            "total_tokens": job.prompt_tokens + done,
        }

    def _body(self, job: _Job) -> dict[str, Any]:
        choices = []
        for c in job.choices:
            prompt = job.prompts[c.index] if job.prompts else ""
            out: dict[str, Any] = {"index": c.index}
            logprobs: dict[str, Any] | None = None
            if job.chat:
                out["message"] = {"role": "assistant", "content": c.text}
                if job.logprobs is not None:
                    logprobs = {"content": _chat_logprobs(prompt, c.pieces, job.logprobs)}
            else:
                head = prompt if job.echo else ""
                out["text"] = head + ("" if job.echo_only else c.text)
                if job.logprobs is not None:
                    entries = _entries(prompt, () if job.echo_only else c.pieces, job.echo)
                    logprobs = _completion_logprobs(prompt, entries, job.logprobs, 0)
            out.update(logprobs=logprobs, finish_reason=c.finish, stop_reason=c.stop_reason)
            if job.prompt_logprobs is not None:
                out["prompt_logprobs"] = _prompt_logprobs(prompt, job.prompt_logprobs)
            choices.append(out)
        return {**self._head(job, chunk=False), "choices": choices, "usage": self._usage(job)}

    def _events(self, job: _Job) -> list[list[dict[str, Any]]]:
        """Stream chunks in rounds; each round has one chunk per still-running choice, so
        the choices interleave.  A choice's last text chunk carries its finish_reason (as
        vLLM's do); the usage chunk (if asked) is the last round."""
        head = self._head(job, chunk=True)
        rounds: list[list[dict[str, Any]]] = []
        if job.chat:
            start = [
                {
                    "index": c.index,
                    "delta": {"role": "assistant", "content": ""},
                    "logprobs": None,
                    "finish_reason": None,
                }
                for c in job.choices
            ]
            rounds.append([{**head, "choices": [ch]} for ch in start])
        steps = [1 if job.echo_only else max(len(c.pieces), 1) for c in job.choices]
        offsets = [0] * len(job.choices)
        for step in range(max(steps, default=0)):
            chunks = []
            for k, c in enumerate(job.choices):
                if step >= steps[k]:
                    continue
                last = step == steps[k] - 1
                prompt = job.prompts[c.index] if job.prompts else ""
                pieces = () if job.echo_only else c.pieces[step : step + 1]
                before = "".join(c.pieces[:step])
                logprobs: dict[str, Any] | None = None
                if job.chat:
                    ch: dict[str, Any] = {"index": c.index, "delta": {"content": "".join(pieces)}}
                    if job.logprobs is not None:
                        content = _chat_logprobs(prompt + before, pieces, job.logprobs)
                        logprobs = {"content": content}
                else:
                    echo = job.echo and step == 0
                    text = (prompt if echo else "") + "".join(pieces)
                    ch = {"index": c.index, "text": text}
                    if job.logprobs is not None:
                        entries = _entries(prompt, pieces, echo, before=before)
                        logprobs = _completion_logprobs(
                            prompt + before, entries, job.logprobs, offsets[k]
                        )
                    offsets[k] += len(text)
                ch.update(logprobs=logprobs, finish_reason=c.finish if last else None)
                if last:
                    ch["stop_reason"] = c.stop_reason
                chunks.append({**head, "choices": [ch]})
            rounds.append(chunks)
        if job.include_usage:
            rounds.append([{**head, "choices": [], "usage": self._usage(job)}])
        return rounds

    async def _stream(
        self,
        request: web.Request,
        job: _Job,
        rounds: list[list[dict[str, Any]]],
        *,
        tail: bytes = b"data: [DONE]\n\n",
        abort: bool = False,
    ) -> web.StreamResponse:
        resp = web.StreamResponse(headers=_SSE_HEADERS)
        await resp.prepare(request)
        if self.token_delay:
            for chunks in rounds:
                await resp.write(b"".join(_sse(c) for c in chunks))
                await asyncio.sleep(self.token_delay)
            await resp.write(tail)
        else:
            await resp.write(b"".join(_sse(c) for chunks in rounds for c in chunks) + tail)
        if abort:
            _abort(request)
        else:
            await resp.write_eof()
        return resp

    # -- faults ---------------------------------------------------------------------------

    async def _fault(self, request: web.Request, fault: Fault, job: _Job) -> web.StreamResponse:
        kind = fault.kind
        if kind is FaultKind.STATUS:
            headers = {} if fault.retry_after is None else {"Retry-After": str(fault.retry_after)}
            if fault.body is None:
                return self._error(fault.code, fault.message, headers=headers)
            return web.Response(status=fault.code, text=fault.body, headers=headers)
        if kind is FaultKind.HANG:
            await self._stopping.wait()
            return self._error(503, "server is shutting down")
        if kind is FaultKind.RESET:
            _abort(request)
            return web.Response()
        if kind is FaultKind.EMPTY:
            if job.stream:
                return await self._stream(request, job, [], tail=b"")
            return web.Response(status=200, body=b"", content_type="application/json")
        half = self._events(job)[: 1 + len(job.choices[0].pieces) // 2]
        if kind is FaultKind.TRUNCATE:
            if job.stream:
                return await self._stream(request, job, half, tail=b"", abort=True)
            body = json.dumps(self._body(job)).encode()
            resp = web.StreamResponse(headers={"Content-Type": "application/json"})
            resp.content_length = len(body)
            await resp.prepare(request)
            await resp.write(body[: len(body) // 2])
            _abort(request)
            return resp
        if kind is FaultKind.MALFORMED:
            if job.stream:
                return await self._stream(request, job, half, tail=b"data: {oops\n\n")
            return web.Response(body=b'{"choices": [', content_type="application/json")
        # STREAM_ERROR: an error event under HTTP 200, then [DONE]; plain requests get 500
        if not job.stream:
            return self._error(500, fault.message)
        error = {
            "error": {
                "message": fault.message,
                "type": "InternalServerError",
                "param": None,
                "code": 500,
            }
        }
        return await self._stream(request, job, [*half, [error]])


_ROLES = ("system", "developer", "user", "assistant", "tool")


def render_chat(messages: list[Any]) -> str:
    """The double's chat template: ``role: content`` lines, then ``assistant:``.

    Content is a string or a list of ``{"type": "text", "text": ...}`` parts (joined);
    an assistant message may have null content (tool calls); ``tool`` messages count.
    Raises ``_Invalid`` (400) for anything else, as vLLM's schema does.
    """
    lines = []
    for m in messages:
        _want(isinstance(m, dict) and m.get("role") in _ROLES, "messages", "bad message role")
        content = m.get("content")
        if isinstance(content, list):
            parts = []
            for part in content:
                ok = isinstance(part, dict) and part.get("type") == "text"
                _want(ok and isinstance(part.get("text"), str), "messages", "bad content part")
                parts.append(part["text"])
            content = "".join(parts)
        elif content is None:
            _want(m["role"] == "assistant", "messages", "message content is missing")
            content = ""
        _want(isinstance(content, str), "messages", "message content must be text")
        lines.append(f"{m['role']}: {content}\n")
    return "".join(lines) + "assistant:"


def _entries(
    prompt: str, pieces: tuple[str, ...], echo: bool, *, before: str = ""
) -> list[tuple[str, str, float | None]]:
    """(context, token, logprob) of each returned token: the prompt's first when echoed
    (its first token has no logprob, as in vLLM), then the generated pieces."""
    out: list[tuple[str, str, float | None]] = []
    if echo:
        seen = ""
        for i, token in enumerate(_lm.split_words(prompt)):
            out.append((seen, token, None if i == 0 else _lm.logprob(seen, token)))
            seen += token
    context = prompt + before
    for piece in pieces:
        out.append((context, piece, _lm.logprob(context, piece)))
        context += piece
    return out


def _completion_logprobs(
    prompt: str, entries: list[tuple[str, str, float | None]], top: int, offset: int
) -> dict[str, Any]:
    """The completions API's logprobs object; ``top`` alternatives beside each token."""
    tokens: list[str] = []
    token_logprobs: list[float | None] = []
    tops: list[dict[str, float] | None] = []
    offsets: list[int] = []
    for context, token, lp in entries:
        tokens.append(token)
        token_logprobs.append(lp)
        offsets.append(offset)
        offset += len(token)
        if lp is None:
            tops.append(None)
            continue
        best = {token: lp}
        for alt in _lm.alternatives(context, token, _ALTERNATIVES, top):
            best[alt] = _lm.logprob(context, alt)
        tops.append(best)
    return {
        "text_offset": offsets,
        "token_logprobs": token_logprobs,
        "tokens": tokens,
        "top_logprobs": tops,
    }


def _chat_logprobs(context: str, pieces: tuple[str, ...], top: int) -> list[dict[str, Any]]:
    """The chat API's ``logprobs.content`` entries for generated pieces."""
    out = []
    for piece in pieces:
        lp = _lm.logprob(context, piece)
        alts = [piece, *_lm.alternatives(context, piece, _ALTERNATIVES, top - 1)][:top]
        out.append(
            {
                "token": piece,
                "logprob": lp,
                "bytes": list(piece.encode()),
                "top_logprobs": [
                    {
                        "token": a,
                        "logprob": lp if a == piece else _lm.logprob(context, a),
                        "bytes": list(a.encode()),
                    }
                    for a in alts
                ],
            }
        )
        context += piece
    return out


def _prompt_logprobs(prompt: str, top: int) -> list[dict[str, Any] | None]:
    """vLLM's ``prompt_logprobs``: None for the first prompt token, then per token a map
    from token id to ``{logprob, rank, decoded_token}`` (the token and ``top`` others)."""
    out: list[dict[str, Any] | None] = []
    seen = ""
    for i, token in enumerate(_lm.split_words(prompt)):
        if i == 0:
            out.append(None)
        else:
            entry = {str(_lm.token_id(token)): _entry(seen, token, None)}
            for rank, alt in enumerate(_lm.alternatives(seen, token, _ALTERNATIVES, top), 2):
                entry.setdefault(str(_lm.token_id(alt)), _entry(seen, alt, rank))
            out.append(entry)
        seen += token
    return out


def _entry(context: str, token: str, rank: int | None) -> dict[str, Any]:
    lp = _lm.logprob(context, token)
    return {"logprob": lp, "rank": rank if rank is not None else 1, "decoded_token": token}


_ALTERNATIVES = tuple(" " + w for w in _WORDS)


def _sse(obj: dict[str, Any]) -> bytes:
    return b"data: " + json.dumps(obj).encode() + b"\n\n"


def _abort(request: web.Request) -> None:
    if request.transport is not None:
        request.transport.abort()
