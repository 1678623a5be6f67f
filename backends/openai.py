"""Adapter for OpenAI-compatible servers: vLLM, llama.cpp's server, TGI's /v1, Ollama, ...

Two transports speak the same protocol: ``"aiohttp"`` (default) over the shared pooled
``HTTPTransport``, and ``"sdk"`` through ``openai.AsyncOpenAI`` (see ``openai_sdk``).
Both use the one payload builder and the one response parser of ``openai_protocol``, and
both map every failure to an ``ensemble_async.errors`` class; neither retries.

Choices made here, on purpose:

- ``max_tokens`` is sent for chat too: vLLM still accepts it beside
  ``max_completion_tokens``, while llama.cpp's server and TGI know only ``max_tokens``.
- Fields that are not OpenAI's (``top_k``, ``min_tokens``, everything in
  ``request.extra``) go at the top level of the JSON; the SDK sends them as
  ``extra_body``, which ends up in the same place.  ``extensions=False`` never sends
  ``top_k``/``min_tokens``.
- Servers differ in what they accept (``transformers serve`` and the hosted API refuse
  ``top_k``).  A 400/422 (or a validation 500) that names fields of ours as unknown
  teaches the backend to leave them out from then on; the request is sent once more
  without them (protocol negotiation, not a retry: each learnt set allows one resend,
  and it is logged once).
- Stop strings are applied here too, to every completion and stream (some servers
  ignore ``stop``): text from the first stop string on is cut, finish reason ``stop``.
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
- The API key goes out as a bearer token only; it is never in a repr, and every text
  that could echo it (error messages, completions, stream deltas) is scrubbed
  (``ensemble_async.scrub``), whole or in part, plain or escaped.
- Limits: an answer body (or stream event) over ``max_response_bytes`` and a completion
  over ``max_completion_chars`` are ``ResponseTooLargeError``, raised while reading.
- ``info().supports_n`` is ``None`` until a request with ``n > 1`` has shown whether the
  server honours ``n``; ``info().extra["models"]`` lists the ids ``/v1/models`` serves.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable, Iterator, Mapping
from contextlib import aclosing, contextmanager
from functools import partial
from typing import Any, Literal, TypeVar

import aiohttp

from ensemble_async.backend import BaseBackend, gather_n
from ensemble_async.errors import (
    BackendError,
    BadRequestError,
    MalformedResponseError,
    error_from_status,
)
from ensemble_async.http import DEFAULT_MAX_RESPONSE_BYTES, HTTPTransport, error_message
from ensemble_async.scoring import CompletionScore, ScoreRequest, ScoringUnsupportedError
from ensemble_async.scrub import scrub_exception, scrubbed_errors
from ensemble_async.secret import Secret, resolve_key
from ensemble_async.types import (
    BackendInfo,
    Completion,
    GenerationRequest,
    Health,
    StreamEvent,
)

from .openai_protocol import (
    DEFAULT_MAX_COMPLETION_CHARS,
    HTTPWire,
    Wire,
    build_payload,
    finish_reason,
    parse_chunk,
    parse_response,
    rejected_fields,
    stream_completion,
)

__all__ = [
    "OpenAIBackend",
    "build_payload",
    "finish_reason",
    "parse_chunk",
    "parse_response",
    "server_root",
]

log = logging.getLogger(__name__)

Mode = Literal["completions", "chat", "auto"]
TransportName = Literal["aiohttp", "sdk"]
_T = TypeVar("_T")

_HEALTH_TIMEOUT = 10.0
_END = object()  # a stream that ended before its first event
_MAX_NEGOTIATION_ROUNDS = 3


def _count(value: object) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def _malformed(what: str, backend: str) -> MalformedResponseError:
    return MalformedResponseError(f"unexpected answer: {what}", backend=backend)


def server_root(url: str) -> str:
    """``http://host:8000`` from ``http://host:8000``, ``.../`` or ``.../v1``."""
    root = url.strip().rstrip("/")
    return root.removesuffix("/v1")


class OpenAIBackend(BaseBackend):
    """An OpenAI-compatible server.  ``mode="auto"`` uses chat for requests with
    messages and completions otherwise; ``model=None`` takes the first entry of
    ``GET /v1/models`` on first use.

    ``extensions``: send vLLM's extension fields (``top_k``, ``min_tokens``) when a
    request sets them (default; learnt away if the server refuses them).
    ``max_response_bytes`` (16 MiB) and ``max_completion_chars`` (1 Mi characters)
    bound what one answer may bring.
    """

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
        extensions: bool = True,
        max_response_bytes: int = DEFAULT_MAX_RESPONSE_BYTES,
        max_completion_chars: int = DEFAULT_MAX_COMPLETION_CHARS,
    ) -> None:
        super().__init__(name=name)
        if mode not in ("completions", "chat", "auto"):
            raise ValueError(f"mode must be completions, chat or auto, got {mode!r}")
        if max_completion_chars < 1:
            raise ValueError("max_completion_chars must be >= 1")
        key = resolve_key(api_key, api_key_env)
        self.url = server_root(url)
        self.mode: Mode = mode
        self.transport: TransportName = transport
        self.extensions = bool(extensions)
        self.max_completion_chars = max_completion_chars
        self._model = model
        self._models: list[str] = []
        self._max_model_len: int | None = None
        self._model_lock = asyncio.Lock()
        self._n_support: bool | None = None
        self._refused: frozenset[str] = frozenset()
        self._http = HTTPTransport(
            self.url,
            backend=self.name,
            session=session,
            api_key=key,
            headers=headers,
            timeout=timeout,
            read_timeout=read_timeout,
            max_response_bytes=max_response_bytes,
        )
        self._scrubber = self._http.scrubber
        self._wire: Wire
        if transport == "aiohttp":
            self._wire = HTTPWire(self._http)
        elif transport == "sdk":
            from .openai_sdk import SDKWire

            self._wire = SDKWire(
                self.url + "/v1",
                backend=self.name,
                api_key=key,
                timeout=timeout,
                read_timeout=read_timeout,
                headers=headers,
                max_response_bytes=max_response_bytes,
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
        with scrubbed_errors(self._scrubber):
            yield

    def _chat(self, request: GenerationRequest) -> bool:
        return self.mode == "chat" or (self.mode == "auto" and request.is_chat)

    async def _model_id(self) -> str:
        if self._model is None:
            async with self._model_lock:
                if self._model is None:
                    await self._read_models()
        return self._model or ""

    async def _read_models(self) -> None:
        """Learn the served model ids, the model id (unless given) and its context size
        from /v1/models."""
        with self._scrubbed():
            status, body = await self._http.get("/v1/models")
            if status >= 400:
                raise error_from_status(status, error_message(body), backend=self.name)
        try:
            data = json.loads(body)
        except ValueError:
            data = None
        entries = data.get("data") if isinstance(data, Mapping) else None
        if not isinstance(entries, list) or not all(
            isinstance(e, Mapping) and isinstance(e.get("id"), str) for e in entries
        ):
            raise _malformed("/v1/models is not a list of models with string ids", self.name)
        if self._model is None and not entries:
            raise _malformed("/v1/models lists no model", self.name)
        self._models = [str(e["id"]) for e in entries]
        if self._model is None:
            self._model = self._models[0]
        entry: Mapping[str, Any] = next((e for e in entries if e["id"] == self._model), {})
        self._max_model_len = _count(entry.get("max_model_len"))

    def _payload(
        self, request: GenerationRequest, model: str, chat: bool, stream: bool = False
    ) -> tuple[dict[str, Any], dict[str, Any]]:
        return build_payload(
            request,
            model,
            chat=chat,
            stream=stream,
            extensions=self.extensions,
            drop=self._refused,
        )

    def _learn(self, exc: BadRequestError, sent: set[str]) -> bool:
        """Whether ``exc`` names fields of ``sent`` that this server refuses (they are
        then left out from now on)."""
        refused = rejected_fields(exc.message, sent) - self._refused
        if not refused:
            return False
        self._refused |= refused
        log.warning(
            "backend %s: the server refuses %s; leaving them out from now on",
            self.name,
            ", ".join(sorted(refused)),
        )
        return True

    async def _negotiated(
        self,
        call: Callable[[dict[str, Any], dict[str, Any]], Awaitable[_T]],
        request: GenerationRequest,
        model: str,
        chat: bool,
        stream: bool = False,
    ) -> _T:
        """``call(body, vendor)``, sent again (once per newly learnt set of refused
        fields) when the server names fields it does not accept."""
        for _ in range(_MAX_NEGOTIATION_ROUNDS):
            body, vendor = self._payload(request, model, chat, stream)
            try:
                return await call(body, vendor)
            except BadRequestError as exc:
                if not self._learn(exc, set(body) | set(vendor)):
                    raise
        body, vendor = self._payload(request, model, chat, stream)
        return await call(body, vendor)

    async def _once(self, request: GenerationRequest, chat: bool, model: str) -> list[Completion]:
        start = time.perf_counter()
        # Once per request: the scrubbing of ``_scrubbed`` as a plain ``except``.
        try:
            data = await self._negotiated(partial(self._wire.create, chat), request, model, chat)
            return parse_response(
                data,
                chat=chat,
                backend=self.name,
                model=model,
                latency_s=time.perf_counter() - start,
                request=request,
                scrubber=self._scrubber,
                max_completion_chars=self.max_completion_chars,
            )
        except Exception as exc:
            if self._scrubber:
                scrub_exception(exc, self._scrubber)
            raise

    async def generate(self, request: GenerationRequest) -> list[Completion]:
        chat = self._chat(request)
        model = self._model if self._model is not None else await self._model_id()

        def nth(i: int) -> GenerationRequest:
            seed = None if request.seed is None else request.seed + i
            return request.replace(n=1, seed=seed)

        if request.n > 1 and self._n_support is False:
            return await gather_n(request.n, [], lambda k: self._once(nth(k), chat, model))
        got = await self._once(request, chat, model)
        if len(got) >= request.n:
            if request.n > 1:
                self._n_support = True
            return got[: request.n]
        self._n_support = False
        have = len(got)
        return await gather_n(request.n, got, lambda k: self._once(nth(have + k), chat, model))

    async def stream(self, request: GenerationRequest) -> AsyncIterator[StreamEvent]:
        if request.n != 1:
            raise BadRequestError(f"stream() needs n == 1, got n={request.n}", backend=self.name)
        chat = self._chat(request)
        model = await self._model_id()
        start = time.perf_counter()
        with self._scrubbed():

            async def opened(body: dict[str, Any], vendor: dict[str, Any]) -> Any:
                """The stream with its first event read (a refusal comes before it)."""
                events = self._wire.stream(chat, body, vendor)
                try:
                    first = await anext(events, _END)
                except BaseException:
                    await events.aclose()
                    raise
                return first, events

            first, events = await self._negotiated(opened, request, model, chat, stream=True)

            async def all_events() -> AsyncGenerator[Any, None]:
                if first is _END:
                    return
                yield first
                if first is not None:
                    async for event in events:
                        yield event

            async with aclosing(events), aclosing(all_events()) as chunks:
                async for event in stream_completion(
                    chunks,
                    request,
                    chat=chat,
                    backend=self.name,
                    model=model,
                    scrubber=self._scrubber,
                    max_completion_chars=self.max_completion_chars,
                    started=start,
                ):
                    yield event

    async def info(self) -> BackendInfo:
        await self._read_models()
        return BackendInfo(
            name=self.name,
            kind=self.kind,
            model=self._model,
            max_total_tokens=self._max_model_len,
            supports_n=self._n_support,
            extra={
                "url": self.url,
                "mode": self.mode,
                "transport": self.transport,
                "models": list(self._models),
                "refused_fields": sorted(self._refused),
            },
        )

    async def health(self) -> Health:
        start = time.perf_counter()
        try:
            with self._scrubbed():
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
