"""Adapter for OpenAI-compatible servers: vLLM, llama.cpp's server, TGI's /v1, Ollama, ...

Two transports speak the same protocol: ``"aiohttp"`` (default) over the shared pooled
``HTTPTransport``, and ``"sdk"`` through ``openai.AsyncOpenAI`` (see ``openai_sdk``).
Both use the one payload builder and the one response parser in this module, and both
map every failure to an ``ensemble_async.errors`` class; neither retries.

Choices made here, on purpose:

- ``max_tokens`` is sent for chat too: vLLM still accepts it beside
  ``max_completion_tokens``, while llama.cpp's server and TGI know only ``max_tokens``.
- Fields that are not OpenAI's (``top_k``, ``min_tokens``, everything in
  ``request.extra``) go at the top level of the JSON; the SDK sends them as
  ``extra_body``, which ends up in the same place.
- Usage: every completion carries the request's ``prompt_tokens``; ``completion_tokens``
  is set only when the answer has exactly one choice, because servers report one total
  for all choices and splitting it would be a guess.
- Servers that ignore ``n`` (llama.cpp, TGI) are topped up with concurrent ``n=1``
  requests; completion ``i`` uses ``seed + i`` when the request is seeded.  Once a
  server has ignored ``n`` the adapter fans out from the start.
- Health and model discovery (``GET /health``, ``GET /v1/models``) use the aiohttp
  transport in both modes: the SDK has no health call.  ``/health`` answering 404
  (llama.cpp has none) falls back to ``/v1/models``.
- Streams: a stream that ends without a finish_reason but with ``[DONE]`` (llama.cpp
  cuts a stream off when another request arrives) gives finish_reason ``unknown``; one
  that ends with neither is a ``MalformedResponseError``.
- The API key goes out as a bearer token only; it is never in a repr, and an error
  message that echoes it (some servers do) has it replaced by ``***``.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncGenerator, AsyncIterator, Iterator, Mapping
from contextlib import aclosing, contextmanager
from typing import Any, Literal, Protocol, cast

import aiohttp

from ensemble_async.backend import BaseBackend, gather_n
from ensemble_async.errors import (
    BackendError,
    BadRequestError,
    MalformedResponseError,
    error_from_status,
)
from ensemble_async.http import HTTPTransport, error_message
from ensemble_async.scoring import CompletionScore, ScoreRequest, ScoringUnsupportedError
from ensemble_async.secret import Secret, resolve_key
from ensemble_async.types import (
    BackendInfo,
    Completion,
    FinishReason,
    GenerationRequest,
    Health,
    StreamEvent,
    TextDelta,
)

__all__ = [
    "OpenAIBackend",
    "build_payload",
    "error_from_event",
    "finish_reason",
    "parse_chunk",
    "parse_response",
]

Mode = Literal["completions", "chat", "auto"]
TransportName = Literal["aiohttp", "sdk"]

_FINISH: dict[str, FinishReason] = {
    "stop": "stop",
    "eos_token": "stop",
    "stop_sequence": "stop",  # TGI's /v1 routes
    "length": "length",
}
_HEALTH_TIMEOUT = 10.0


def finish_reason(value: object) -> FinishReason:
    """Normalise a server's finish_reason; null or anything unknown is ``unknown``."""
    return _FINISH.get(value, "unknown") if isinstance(value, str) else "unknown"


def build_payload(
    request: GenerationRequest, model: str, *, chat: bool, stream: bool = False
) -> tuple[dict[str, Any], dict[str, Any]]:
    """The request as (OpenAI fields, non-OpenAI fields); the aiohttp transport merges
    them into one JSON object, the SDK passes the second as ``extra_body``."""
    body: dict[str, Any] = {"model": model}
    if chat:
        if request.messages is not None:
            body["messages"] = [m.to_dict() for m in request.messages]
        else:
            body["messages"] = [{"role": "user", "content": request.prompt}]
    else:
        if request.messages is not None:
            raise BadRequestError("completions mode cannot send chat messages")
        body["prompt"] = request.prompt
    body["max_tokens"] = request.max_new_tokens
    body["temperature"] = request.temperature
    body["top_p"] = request.top_p
    body["n"] = request.n
    if request.stop:
        body["stop"] = list(request.stop)
    if request.seed is not None:
        body["seed"] = request.seed
    if stream:
        body["stream"] = True
        body["stream_options"] = {"include_usage": True}
    vendor: dict[str, Any] = {}
    if request.top_k is not None:
        vendor["top_k"] = request.top_k
    if request.min_new_tokens:
        vendor["min_tokens"] = request.min_new_tokens
    vendor.update(request.extra)
    return body, vendor


def error_from_event(error: object, *, backend: str) -> BackendError:
    """Our error for an ``{"error": ...}`` object met in a 200 answer or a stream."""
    status = 500
    if isinstance(error, Mapping):
        message = str(error.get("message") or json.dumps(error)[:500])
        code = error.get("code")
        if isinstance(code, int) and 400 <= code < 600:
            status = code
    else:
        message = str(error)[:500]
    return error_from_status(status, message, backend=backend)


def _count(value: object) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def _malformed(what: str, backend: str) -> MalformedResponseError:
    return MalformedResponseError(f"unexpected answer: {what}", backend=backend)


def parse_response(
    data: object, *, chat: bool, backend: str, model: str | None, latency_s: float
) -> list[Completion]:
    """Completions from a (non-streamed) answer, in choice order, indexed from 0."""
    if not isinstance(data, Mapping):
        raise _malformed(f"JSON {type(data).__name__}, not an object", backend)
    if "error" in data and "choices" not in data:
        raise error_from_event(data["error"], backend=backend)
    choices = data.get("choices")
    if not isinstance(choices, list) or not choices:
        raise _malformed("no choices", backend)
    usage = data.get("usage")
    usage = usage if isinstance(usage, Mapping) else {}
    prompt_tokens = _count(usage.get("prompt_tokens"))
    completion_tokens = _count(usage.get("completion_tokens")) if len(choices) == 1 else None
    model_id = data.get("model") if isinstance(data.get("model"), str) else model
    out: list[Completion] = []
    try:
        ordered = sorted(choices, key=lambda c: _count(c.get("index")) or 0)
        for i, choice in enumerate(ordered):
            text = choice["message"]["content"] if chat else choice["text"]
            if not isinstance(text, str | None):
                raise TypeError("text is not a string")
            out.append(
                Completion(
                    text=text or "",
                    finish_reason=finish_reason(choice.get("finish_reason")),
                    backend=backend,
                    latency_s=latency_s,
                    prompt_tokens=prompt_tokens,
                    completion_tokens=completion_tokens,
                    model=model_id,
                    index=i,
                )
            )
    except (KeyError, TypeError, AttributeError) as exc:
        raise _malformed(f"bad choice ({type(exc).__name__}: {exc})", backend) from exc
    return out


def parse_chunk(
    event: object, *, chat: bool, backend: str
) -> tuple[str, str | None, Mapping[str, Any] | None]:
    """(text piece, raw finish_reason or None, usage or None) of one stream chunk."""
    if not isinstance(event, Mapping):
        raise _malformed(f"stream event is {type(event).__name__}, not an object", backend)
    if "error" in event:
        raise error_from_event(event["error"], backend=backend)
    usage = event.get("usage")
    usage = usage if isinstance(usage, Mapping) else None
    piece, reason = "", None
    try:
        for choice in event.get("choices") or ():
            part = (choice.get("delta") or {}).get("content") if chat else choice.get("text")
            piece += part or ""
            reason = choice.get("finish_reason") or reason
    except (TypeError, AttributeError) as exc:
        raise _malformed(f"bad stream chunk ({type(exc).__name__})", backend) from exc
    return piece, reason, usage


class Wire(Protocol):
    """What a transport does: one call, one stream (``None`` marks ``[DONE]``)."""

    async def create(self, chat: bool, body: dict[str, Any], vendor: dict[str, Any]) -> Any: ...

    def stream(
        self, chat: bool, body: dict[str, Any], vendor: dict[str, Any]
    ) -> AsyncGenerator[Any, None]: ...

    async def aclose(self) -> None: ...


class _HTTPWire:
    def __init__(self, http: HTTPTransport) -> None:
        self._http = http

    async def create(self, chat: bool, body: dict[str, Any], vendor: dict[str, Any]) -> Any:
        path = "/v1/chat/completions" if chat else "/v1/completions"
        return await self._http.post_json(path, {**body, **vendor})

    async def stream(
        self, chat: bool, body: dict[str, Any], vendor: dict[str, Any]
    ) -> AsyncGenerator[Any, None]:
        path = "/v1/chat/completions" if chat else "/v1/completions"
        sse = cast(AsyncGenerator[str, None], self._http.post_sse(path, {**body, **vendor}))
        async with aclosing(sse) as events:
            async for data in events:
                if data.strip() == "[DONE]":
                    yield None
                    return
                yield self._http.decode_event(data)

    async def aclose(self) -> None:
        await self._http.aclose()


def _chain_mentions(exc: BaseException, secret: str) -> bool:
    """Whether an exception chained to ``exc`` shows ``secret`` in its text."""
    seen: set[int] = set()
    link = exc.__cause__ or exc.__context__
    while link is not None and id(link) not in seen:
        seen.add(id(link))
        if secret in str(link) or secret in repr(link.args):
            return True
        link = link.__cause__ or link.__context__
    return False


def server_root(url: str) -> str:
    """``http://host:8000`` from ``http://host:8000``, ``.../`` or ``.../v1``."""
    root = url.strip().rstrip("/")
    return root.removesuffix("/v1")


class OpenAIBackend(BaseBackend):
    """An OpenAI-compatible server.  ``mode="auto"`` uses chat for requests with
    messages and completions otherwise; ``model=None`` takes the first entry of
    ``GET /v1/models`` on first use."""

    kind = "openai"
    requires = ("url",)

    def __init__(
        self,
        url: str,
        *,
        model: str | None = None,
        mode: Mode = "auto",
        transport: TransportName = "aiohttp",
        name: str | None = None,
        session: aiohttp.ClientSession | None = None,
        api_key: Secret | str | None = None,
        api_key_env: str | None = None,
        timeout: float | None = 600.0,
        read_timeout: float | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(name=name)
        if mode not in ("completions", "chat", "auto"):
            raise ValueError(f"mode must be completions, chat or auto, got {mode!r}")
        key = resolve_key(api_key, api_key_env)
        self.url = server_root(url)
        self.mode: Mode = mode
        self.transport: TransportName = transport
        self._model = model
        self._max_model_len: int | None = None
        self._model_lock = asyncio.Lock()
        self._key = key
        self._n_ignored = False
        self._http = HTTPTransport(
            self.url,
            backend=self.name,
            session=session,
            api_key=key,
            headers=headers,
            timeout=timeout,
            read_timeout=read_timeout,
        )
        self._wire: Wire
        if transport == "aiohttp":
            self._wire = _HTTPWire(self._http)
        elif transport == "sdk":
            from .openai_sdk import SDKWire

            self._wire = SDKWire(
                self.url + "/v1",
                backend=self.name,
                api_key=key,
                timeout=timeout,
                read_timeout=read_timeout,
                headers=headers,
            )
        else:
            raise ValueError(f"transport must be aiohttp or sdk, got {transport!r}")

    def __repr__(self) -> str:
        return (
            f"<OpenAIBackend name={self.name!r} url={self.url!r} model={self._model!r} "
            f"mode={self.mode} transport={self.transport}>"
        )

    async def aclose(self) -> None:
        await self._wire.aclose()
        await self._http.aclose()

    @contextmanager
    def _scrubbed(self) -> Iterator[None]:
        """Some servers echo the key they rejected; keep it out of our messages."""
        try:
            yield
        except BackendError as exc:
            secret = self._key.reveal() if self._key is not None else ""
            if secret and secret in exc.message:
                exc.message = exc.message.replace(secret, "***")
                exc.args = (exc.message,)
            if secret and _chain_mentions(exc, secret):
                # the cause (e.g. the SDK's own error) quotes it: drop the chain
                exc.__cause__ = exc.__context__ = None
                exc.__suppress_context__ = True
            raise

    def _chat(self, request: GenerationRequest) -> bool:
        return self.mode == "chat" or (self.mode == "auto" and request.is_chat)

    async def _model_id(self) -> str:
        if self._model is None:
            async with self._model_lock:
                if self._model is None:
                    await self._read_models()
        return self._model or ""

    async def _read_models(self) -> None:
        """Learn the model id (unless given) and its context size from /v1/models."""
        with self._scrubbed():
            status, body = await self._http.get("/v1/models")
            if status >= 400:
                raise error_from_status(
                    status, error_message(self._http.scrub(body)), backend=self.name
                )
        try:
            entries = json.loads(body)["data"]
            if self._model is None:
                entry = entries[0]
                if not isinstance(entry["id"], str):
                    raise TypeError("model id is not a string")
                self._model = entry["id"]
            else:
                entry = next((e for e in entries if e.get("id") == self._model), {})
            self._max_model_len = _count(entry.get("max_model_len"))
        except (ValueError, KeyError, TypeError, IndexError, AttributeError) as exc:
            raise _malformed(
                f"/v1/models lists no model ({type(exc).__name__})", self.name
            ) from exc

    async def _once(self, request: GenerationRequest, chat: bool, model: str) -> list[Completion]:
        body, vendor = build_payload(request, model, chat=chat)
        start = time.perf_counter()
        with self._scrubbed():
            data = await self._wire.create(chat, body, vendor)
        latency = time.perf_counter() - start
        return parse_response(data, chat=chat, backend=self.name, model=model, latency_s=latency)

    async def generate(self, request: GenerationRequest) -> list[Completion]:
        chat = self._chat(request)
        model = await self._model_id()

        def nth(i: int) -> GenerationRequest:
            seed = None if request.seed is None else request.seed + i
            return request.replace(n=1, seed=seed)

        if request.n > 1 and self._n_ignored:
            return await gather_n(request.n, [], lambda k: self._once(nth(k), chat, model))
        got = await self._once(request, chat, model)
        if len(got) >= request.n:
            return got[: request.n]
        self._n_ignored = True
        have = len(got)
        return await gather_n(request.n, got, lambda k: self._once(nth(have + k), chat, model))

    async def stream(self, request: GenerationRequest) -> AsyncIterator[StreamEvent]:
        if request.n != 1:
            raise BadRequestError(f"stream() needs n == 1, got n={request.n}", backend=self.name)
        chat = self._chat(request)
        model = await self._model_id()
        body, vendor = build_payload(request, model, chat=chat, stream=True)
        start = time.perf_counter()
        parts: list[str] = []
        reason: str | None = None
        usage: Mapping[str, Any] = {}
        done = False
        with self._scrubbed():
            async with aclosing(self._wire.stream(chat, body, vendor)) as events:
                async for event in events:
                    if event is None:
                        done = True
                        break
                    piece, why, got_usage = parse_chunk(event, chat=chat, backend=self.name)
                    reason = why or reason
                    usage = got_usage or usage
                    if piece:
                        parts.append(piece)
                        yield TextDelta(piece)
        if reason is None and not done:
            raise MalformedResponseError(
                "stream ended without a finish_reason or [DONE]", backend=self.name
            )
        yield Completion(
            text="".join(parts),
            finish_reason=finish_reason(reason),
            backend=self.name,
            latency_s=time.perf_counter() - start,
            prompt_tokens=_count(usage.get("prompt_tokens")),
            completion_tokens=_count(usage.get("completion_tokens")),
            model=model,
        )

    async def info(self) -> BackendInfo:
        await self._read_models()
        return BackendInfo(
            name=self.name,
            kind=self.kind,
            model=self._model,
            max_total_tokens=self._max_model_len,
            supports_n=not self._n_ignored,
            extra={"url": self.url, "mode": self.mode, "transport": self.transport},
        )

    async def health(self) -> Health:
        start = time.perf_counter()
        try:
            status, body = await self._http.get("/health", timeout=_HEALTH_TIMEOUT)
            if status == 404:  # llama.cpp's server has no /health
                status, body = await self._http.get("/v1/models", timeout=_HEALTH_TIMEOUT)
        except BackendError as exc:
            return Health(ok=False, latency_s=time.perf_counter() - start, detail=str(exc))
        latency = time.perf_counter() - start
        if status == 200:
            return Health(ok=True, latency_s=latency)
        return Health(
            ok=False,
            latency_s=latency,
            detail=f"HTTP {status}: {error_message(self._http.scrub(body))}",
        )

    # -- scoring ------------------------------------------------------------------------
    #
    # A completion is scored through /v1/completions with ``echo: true``, ``logprobs: 0``
    # and ``max_tokens: 0`` (vLLM returns the prompt alone); a server that refuses
    # max_tokens 0 is asked again with 1 and the generated token is dropped (the choice
    # is remembered).  The echoed tokens are split with their ``text_offset``s: a token
    # belongs to the completion when it ends after the prompt's last character, so a
    # token straddling the boundary counts for the completion.  Offsets count the token
    # strings, which may begin with text the prompt lacks (a BOS token such as ``<s>``);
    # that shift is measured at the end of the echo and taken off.  Chat requests are
    # not scored here: the chat endpoints do not echo the rendered conversation.  The
    # aiohttp transport is used whatever ``transport`` says.

    _score_max_tokens: int = 0

    async def score(self, request: ScoreRequest) -> list[CompletionScore]:
        """One score per completion (natural-log probabilities of its tokens)."""
        if request.prompt is None:
            raise ScoringUnsupportedError(
                f"backend {self.name!r}: chat requests cannot be scored over the OpenAI "
                "protocol (the chat endpoints do not echo the rendered conversation with "
                "log-probabilities); score a plain prompt",
                backend=self.name,
            )
        prompt = request.prompt
        model = await self._model_id()
        try:
            async with asyncio.TaskGroup() as group:
                tasks = [
                    group.create_task(self._score_one(prompt, c, model))
                    for c in request.completions
                ]
        except BaseExceptionGroup as failed:  # the first failure cancelled the others
            raise failed.exceptions[0] from None
        return [t.result() for t in tasks]

    async def check_scoring(self) -> None:
        """Send one tiny scoring request; ScoringUnsupportedError when it cannot work."""
        try:
            await self.score(ScoreRequest(prompt="Scoring check:", completions=(" ok",)))
        except ScoringUnsupportedError:
            raise
        except BackendError as exc:
            if exc.retryable:  # a passing failure says nothing about the server's abilities
                raise
            raise ScoringUnsupportedError(
                f"backend {self.name!r} ({self.url}) cannot score completions: an echo "
                f"request to /v1/completions failed: {exc.message}",
                backend=self.name,
            ) from exc

    async def _score_one(self, prompt: str, completion: str, model: str) -> CompletionScore:
        text = prompt + completion
        body: dict[str, Any] = {
            "model": model,
            "prompt": text,
            "echo": True,
            "logprobs": 0,
            "max_tokens": self._score_max_tokens,
            "temperature": 0,
        }
        with self._scrubbed():
            try:
                data = await self._http.post_json("/v1/completions", body)
            except BadRequestError:
                if self._score_max_tokens != 0:
                    raise
                body["max_tokens"] = 1  # a server that will not echo without generating
                data = await self._http.post_json("/v1/completions", body)
                self._score_max_tokens = 1
        tokens, logprobs = _echoed(data, text, self.name, self.url)
        start, end = _completion_span(tokens, len(prompt), len(text), data)
        picked = logprobs[start:end]
        if not all(isinstance(lp, int | float) and not isinstance(lp, bool) for lp in picked):
            raise BadRequestError(
                "a completion token has no log-probability (an empty prompt leaves the first "
                "token without context)",
                backend=self.name,
            )
        return CompletionScore(
            text=completion,
            token_logprobs=tuple(float(lp) for lp in picked),  # type: ignore[arg-type]
            tokens=tuple(tokens[start:end]),
            backend=self.name,
            model=model,
        )


def _echoed(data: object, text: str, backend: str, url: str) -> tuple[list[str], list[object]]:
    """(tokens, token_logprobs) of an echo answer whose text starts with ``text``."""
    try:
        choice = data["choices"][0]  # type: ignore[index]
        echoed = choice["text"]
        logprobs = choice.get("logprobs")
    except (TypeError, KeyError, IndexError, AttributeError) as exc:
        raise _malformed("echo answer has no choice", backend) from exc
    if not isinstance(echoed, str) or not echoed.startswith(text):
        raise ScoringUnsupportedError(
            f"backend {backend!r} ({url}) did not echo the prompt on /v1/completions "
            "(no `echo` support): it cannot score given text",
            backend=backend,
        )
    if not isinstance(logprobs, Mapping) or not isinstance(logprobs.get("tokens"), list):
        raise ScoringUnsupportedError(
            f"backend {backend!r} ({url}) returned no log-probabilities on /v1/completions "
            "(no `logprobs` support): it cannot score given text",
            backend=backend,
        )
    tokens = [str(t) for t in logprobs["tokens"]]
    values = logprobs.get("token_logprobs")
    if not isinstance(values, list) or len(values) != len(tokens):
        raise _malformed("token_logprobs do not match tokens", backend)
    return tokens, values


def _completion_span(
    tokens: list[str], prompt_len: int, text_len: int, data: Any
) -> tuple[int, int]:
    """[start, end) of the completion's tokens among the echoed ones, by text offsets
    (see ``OpenAIBackend.score`` for the rule)."""
    logprobs = data["choices"][0]["logprobs"]
    offsets = logprobs.get("text_offset")
    if not isinstance(offsets, list) or len(offsets) != len(tokens):
        offsets = [sum(len(t) for t in tokens[:i]) for i in range(len(tokens))]
    echoed_len = len(data["choices"][0]["text"])
    # token strings may spell more than the text (a BOS token): measure at the end
    shift = (int(offsets[-1]) + len(tokens[-1]) - echoed_len) if tokens else 0
    boundary, stop = prompt_len + shift, text_len + shift
    start = next(
        (i for i, t in enumerate(tokens) if int(offsets[i]) + len(t) > boundary), len(tokens)
    )
    end = next((i for i in range(start, len(tokens)) if int(offsets[i]) >= stop), len(tokens))
    return start, end
