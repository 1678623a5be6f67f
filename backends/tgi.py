"""Hugging Face text-generation-inference (TGI), spoken in its native protocol.

Facts this adapter relies on (see PROTOCOLS.md):

* TGI rejects ``temperature == 0`` and ``top_p == 1.0``; it samples as soon as any of
  temperature / top_k / top_p is present.  Greedy requests therefore send
  ``do_sample: false`` and none of those three; sampled requests send ``do_sample: true``,
  the temperature, ``top_p`` only below 1 and ``top_k`` when set.
* TGI ignores ``n``: ``n`` completions are ``n`` concurrent requests (seed, seed+1, ...).
* ``min_new_tokens`` has no TGI parameter and is dropped.
* Stop strings are limited (``max_stop_sequences`` in ``/info``, 4 by default); a request
  with more is refused here, before it is sent.  TGI leaves the matched stop string at
  the end of ``generated_text``; every text is cut at its first stop string here
  (``ensemble_async.stops``), streams included.
* ``details: true`` is always sent, for the finish reason and the token counts.
* ``/generate_stream`` sends ``data:{json}`` events without ``[DONE]``; the last event
  carries ``generated_text`` and ``details``.  Errors, validation included, arrive as an
  event ``{"error", "error_type"}`` under HTTP 200.
* Chat requests (``messages``) go to TGI's OpenAI-style ``/v1/chat/completions``,
  through the shared OpenAI protocol code (``openai_protocol``); TGI takes no ``top_k``
  or ``min_tokens`` there, rejects ``top_p == 1.0`` as on ``/generate`` (it is left out)
  and ignores ``n`` (we fan out as for prompts).
* Every field read from an answer is type-checked: a wrong type is a
  ``MalformedResponseError`` for that request; a wrong type in ``/info`` leaves that
  (optional) fact unknown.
* The key, if the server echoes it, is masked in errors and texts (``ensemble_async.scrub``);
  ``max_response_bytes`` and ``max_completion_chars`` bound an answer while it is read.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncGenerator, AsyncIterator, Iterator, Mapping
from contextlib import aclosing, contextmanager
from typing import Any, Literal, cast

import aiohttp

from ensemble_async.backend import BaseBackend, gather_n
from ensemble_async.errors import (
    BackendError,
    BadRequestError,
    ContextLengthError,
    FatalError,
    MalformedResponseError,
    OverloadedError,
    ResponseTooLargeError,
    ServerError,
    error_from_status,
)
from ensemble_async.http import DEFAULT_MAX_RESPONSE_BYTES, HTTPTransport, error_message
from ensemble_async.scoring import CompletionScore, ScoreRequest, ScoringUnsupportedError
from ensemble_async.scrub import ScrubHoldback, scrub_exception, scrubbed_errors
from ensemble_async.secret import Secret, resolve_key
from ensemble_async.stops import StopHoldback, cut_at_stop
from ensemble_async.types import (
    BackendInfo,
    Completion,
    FinishReason,
    GenerationRequest,
    Health,
    StreamEvent,
    TextDelta,
)

from .openai_protocol import (
    DEFAULT_MAX_COMPLETION_CHARS,
    HTTPWire,
    build_payload,
    parse_response,
    stream_completion,
)

__all__ = ["TGIBackend"]

_FINISH: dict[str, FinishReason] = {
    "eos_token": "stop",
    "stop_sequence": "stop",
    "length": "length",
}
_INFO_INTS = (
    "max_concurrent_requests",
    "max_batch_size",
    "max_best_of",
    "max_stop_sequences",
    "max_input_tokens",
    "max_total_tokens",
)
# TGI's validation messages for prompts that do not fit the model.
_CONTEXT_MESSAGES = ("`inputs` tokens + `max_new_tokens`", "`inputs` must have less than")


class TGIBackend(BaseBackend):
    """A TGI server at ``url`` (e.g. ``http://host:8080``), through ``/generate`` for
    prompts and ``/v1/chat/completions`` for chat messages.

    ``endpoint="compat"`` uses ``POST /`` instead of ``/generate`` (same body plus
    ``stream``).  The aiohttp ``session`` is shared when given (and then left open by
    ``aclose``).  ``max_response_bytes`` (16 MiB) and ``max_completion_chars`` (1 Mi
    characters) bound what one answer may bring.
    """

    kind = "tgi"
    requires = ("url",)
    health_timeout: float = 10.0
    """Time limit of /health and /info requests."""

    def __init__(
        self,
        url: str,
        *,
        name: str | None = None,
        session: aiohttp.ClientSession | None = None,
        api_key: Secret | str | None = None,
        api_key_env: str | None = None,
        timeout: float | None = 600,
        read_timeout: float | None = None,
        headers: Mapping[str, str] | None = None,
        endpoint: Literal["generate", "compat"] = "generate",
        max_response_bytes: int = DEFAULT_MAX_RESPONSE_BYTES,
        max_completion_chars: int = DEFAULT_MAX_COMPLETION_CHARS,
    ) -> None:
        super().__init__(name=name)
        if endpoint not in ("generate", "compat"):
            raise ValueError(f"endpoint must be 'generate' or 'compat', got {endpoint!r}")
        if max_completion_chars < 1:
            raise ValueError("max_completion_chars must be >= 1")
        self._http = HTTPTransport(
            url,
            backend=self.name,
            session=session,
            api_key=resolve_key(api_key, api_key_env),
            headers=headers,
            timeout=timeout,
            read_timeout=read_timeout,
            max_response_bytes=max_response_bytes,
        )
        self._scrubber = self._http.scrubber
        self._chat_wire = HTTPWire(self._http)
        self.max_completion_chars = max_completion_chars
        self._endpoint = endpoint
        self._info: BackendInfo | None = None
        self._info_lock = asyncio.Lock()
        self._no_info = False

    def __repr__(self) -> str:
        return f"<TGIBackend name={self.name!r} url={self._http.base_url!r}>"

    async def aclose(self) -> None:
        await self._http.aclose()

    @contextmanager
    def _scrubbed(self) -> Iterator[None]:
        """Some servers echo the key they rejected; keep it out of our messages."""
        with scrubbed_errors(self._scrubber):
            yield

    # -- requests ---------------------------------------------------------------------

    def _payload(self, request: GenerationRequest, seed: int | None) -> dict[str, Any]:
        if request.prompt is None:
            raise BadRequestError("TGI's native API takes a prompt", backend=self.name)
        params: dict[str, Any] = {"max_new_tokens": request.max_new_tokens, "details": True}
        if request.greedy:
            params["do_sample"] = False
        else:
            params["do_sample"] = True
            params["temperature"] = request.temperature
            if request.top_p < 1.0:
                params["top_p"] = request.top_p
            if request.top_k is not None:
                params["top_k"] = request.top_k
        if request.stop:
            params["stop"] = list(request.stop)
        if seed is not None:
            params["seed"] = seed
        params.update(request.extra)
        return {"inputs": request.prompt, "parameters": params}

    async def _check_stops(self, request: GenerationRequest) -> None:
        if not request.stop or self._no_info:
            return
        try:
            info = await self.info()
        except FatalError:
            self._no_info = True  # no /info here (a proxy?): let the server judge the stops
            return
        except BackendError:
            return  # the request itself will meet the same trouble
        limit = info.max_stop_sequences
        if limit is not None and len(request.stop) > limit:
            raise BadRequestError(
                f"request has {len(request.stop)} stop strings but this TGI server accepts "
                f"at most {limit} (its max_stop_sequences)",
                backend=self.name,
            )

    def _completion(
        self,
        text: Any,
        details: Any,
        request: GenerationRequest,
        started: float,
        headers: Mapping[str, str] | None = None,
    ) -> Completion:
        """The final completion from ``generated_text`` and ``details``, every field
        type-checked, the text cut at its first stop string and scrubbed.  The prompt's
        token count comes from ``details`` or else from TGI's ``x-prompt-tokens`` answer
        header (plain /generate reports it only there)."""
        if not isinstance(text, str) or not isinstance(details, dict):
            raise MalformedResponseError(
                "TGI answer lacks generated_text or details", backend=self.name
            )
        if len(text) > self.max_completion_chars:
            raise ResponseTooLargeError(
                f"completion of {len(text)} characters is over the limit of "
                f"{self.max_completion_chars}",
                backend=self.name,
            )
        reason = details.get("finish_reason")
        generated = details.get("generated_tokens")
        prompt_tokens = details.get("input_length")
        prefill = details.get("prefill")
        if not isinstance(reason, str | None):
            raise self._malformed("details.finish_reason", reason)
        if not _is_count(generated, optional=True):
            raise self._malformed("details.generated_tokens", generated)
        if not _is_count(prompt_tokens, optional=True):
            raise self._malformed("details.input_length", prompt_tokens)
        if not isinstance(prefill, list | None):
            raise self._malformed("details.prefill", prefill)
        if prompt_tokens is None and prefill:
            prompt_tokens = len(prefill)
        if prompt_tokens is None and headers:
            value = headers.get("x-prompt-tokens", "")
            prompt_tokens = int(value) if value.isdigit() else None
        text, stopped = cut_at_stop(text, request.stop)
        return Completion(
            text=self._scrubber.scrub(text),
            finish_reason="stop" if stopped else _FINISH.get(str(reason), "unknown"),
            backend=self.name,
            latency_s=time.perf_counter() - started,
            prompt_tokens=prompt_tokens,
            completion_tokens=generated,
            model=self._info.model if self._info else None,
        )

    def _malformed(self, field: str, value: object) -> MalformedResponseError:
        return MalformedResponseError(
            f"TGI answer has {field} of type {type(value).__name__}", backend=self.name
        )

    async def _generate_one(self, request: GenerationRequest, seed: int | None) -> Completion:
        if request.is_chat:
            return await self._chat_one(request, seed)
        payload = self._payload(request, seed)
        started = time.perf_counter()
        if self._endpoint == "compat":
            payload["stream"] = False
            # POST / returns the prompt too unless told otherwise (text-generation models)
            payload["parameters"].setdefault("return_full_text", False)
        headers = {"x-prompt-tokens": ""}
        try:
            data = await self._http.post_json(
                "/" if self._endpoint == "compat" else "/generate",
                payload,
                response_headers=headers,
            )
        except BadRequestError as exc:
            raise _refine(exc) from exc
        if self._endpoint == "compat" and isinstance(data, list) and len(data) == 1:
            data = data[0]
        if not isinstance(data, dict):
            raise MalformedResponseError("TGI answer is not a JSON object", backend=self.name)
        return self._completion(
            data.get("generated_text"), data.get("details"), request, started, headers
        )

    def _chat_payload(
        self, request: GenerationRequest, seed: int | None, stream: bool
    ) -> tuple[dict[str, Any], dict[str, Any]]:
        drop = {"n"} | ({"top_p"} if request.top_p >= 1.0 else set())
        model = self._info.model if self._info and self._info.model else "tgi"
        body, extra = build_payload(
            request.replace(seed=seed, n=1),
            model,
            chat=True,
            stream=stream,
            extensions=False,
            drop=frozenset(drop),
        )
        return body, extra

    async def _chat_one(self, request: GenerationRequest, seed: int | None) -> Completion:
        """One chat completion through TGI's ``/v1/chat/completions``."""
        body, extra = self._chat_payload(request, seed, stream=False)
        started = time.perf_counter()
        try:
            data = await self._chat_wire.create(True, body, extra)
        except BadRequestError as exc:
            raise _refine(exc) from exc
        [completion] = parse_response(
            data,
            chat=True,
            backend=self.name,
            model=self._info.model if self._info else None,
            latency_s=time.perf_counter() - started,
            request=request,
            scrubber=self._scrubber,
            max_completion_chars=self.max_completion_chars,
        )[:1]
        return completion

    async def _chat_stream(self, request: GenerationRequest) -> AsyncGenerator[StreamEvent, None]:
        body, extra = self._chat_payload(request, request.seed, stream=True)
        started = time.perf_counter()
        try:
            async with aclosing(self._chat_wire.stream(True, body, extra)) as events:
                async for event in stream_completion(
                    events,
                    request,
                    chat=True,
                    backend=self.name,
                    model=self._info.model if self._info else None,
                    scrubber=self._scrubber,
                    max_completion_chars=self.max_completion_chars,
                    started=started,
                ):
                    yield event
        except BadRequestError as exc:
            raise _refine(exc) from exc

    async def generate(self, request: GenerationRequest) -> list[Completion]:
        # Once per request: the scrubbing of ``_scrubbed`` as a plain ``except``.
        try:
            if request.stop:
                await self._check_stops(request)
            if request.n == 1:
                return [await self._generate_one(request, request.seed)]

            async def one_more(k: int) -> list[Completion]:
                seed = None if request.seed is None else request.seed + k
                return [await self._generate_one(request, seed)]

            try:
                return await gather_n(request.n, [], one_more)
            except BaseExceptionGroup as group:
                raise _first_leaf(group) from None
        except Exception as exc:
            if self._scrubber:
                scrub_exception(exc, self._scrubber)
            raise

    async def stream(self, request: GenerationRequest) -> AsyncIterator[StreamEvent]:
        if request.n != 1:
            raise BadRequestError("streaming needs n == 1", backend=self.name)
        with self._scrubbed():
            await self._check_stops(request)
            events = self._chat_stream(request) if request.is_chat else self._native(request)
            async with aclosing(events):
                async for event in events:
                    yield event

    async def _native(self, request: GenerationRequest) -> AsyncGenerator[StreamEvent, None]:
        """A stream from ``/generate_stream`` (or ``POST /``)."""
        payload = self._payload(request, request.seed)
        if self._endpoint == "compat":
            payload["stream"] = True
            payload["parameters"].setdefault("return_full_text", False)
        path = "/" if self._endpoint == "compat" else "/generate_stream"
        stops = StopHoldback(request.stop)
        masked = ScrubHoldback(self._scrubber)
        streamed = 0
        started = time.perf_counter()
        try:
            sse_events = cast(AsyncGenerator[str, None], self._http.post_sse(path, payload))
            async with aclosing(sse_events) as sse:
                async for data in sse:
                    event = self._http.decode_event(data)
                    if not isinstance(event, dict):
                        raise MalformedResponseError(
                            "stream event is not an object", backend=self.name
                        )
                    if "error" in event:
                        raise self._stream_error(event)
                    piece = self._token_text(event.get("token"))
                    if piece and not stops.stopped:
                        streamed += len(piece)
                        if streamed > self.max_completion_chars:
                            raise ResponseTooLargeError(
                                "streamed completion is over the limit of "
                                f"{self.max_completion_chars} characters",
                                backend=self.name,
                            )
                        out = masked.feed(stops.feed(piece))
                        if out:
                            yield TextDelta(out)
                    if event.get("generated_text") is not None:
                        done = self._completion(
                            event["generated_text"], event.get("details"), request, started
                        )
                        rest = masked.finish(done.text)
                        if rest:
                            yield TextDelta(rest)
                        yield done
                        return
        except BadRequestError as exc:
            raise _refine(exc) from exc
        raise MalformedResponseError(
            "stream ended before its final event (truncated)", backend=self.name
        )

    def _token_text(self, token: object) -> str:
        """The text of a stream event's ``token`` ("" for special tokens and none)."""
        if token is None:
            return ""
        if not isinstance(token, dict):
            raise self._malformed("token", token)
        text, special = token.get("text"), token.get("special", False)
        if not isinstance(text, str | None):
            raise self._malformed("token.text", text)
        if not isinstance(special, bool | None):
            raise self._malformed("token.special", special)
        return "" if special or text is None else text

    def _stream_error(self, event: Mapping[str, Any]) -> BackendError:
        error, kind = event.get("error"), event.get("error_type")
        text = error if isinstance(error, str) else json.dumps(error, default=str)
        text = self._scrubber.scrub(text)  # before it is cut short
        message = f"{text[:500]} ({kind})" if isinstance(kind, str) else text[:500]
        if kind == "overloaded":
            return OverloadedError(message, backend=self.name, status=None)
        if kind == "validation":
            return _refine(BadRequestError(message, backend=self.name))
        return ServerError(message, backend=self.name)

    # -- server facts -----------------------------------------------------------------

    async def info(self) -> BackendInfo:
        if self._info is not None:
            return self._info
        async with self._info_lock:
            if self._info is None:
                self._info = await self._fetch_info()
        return self._info

    async def _fetch_info(self) -> BackendInfo:
        with self._scrubbed():
            status, body = await self._http.get("/info", timeout=self.health_timeout)
            if status != 200:
                raise error_from_status(status, error_message(body), backend=self.name)
        try:
            data = json.loads(body)
        except ValueError:
            data = None
        if not isinstance(data, dict):
            raise MalformedResponseError("/info is not a JSON object", backend=self.name)
        known = (
            "model_id",
            "max_concurrent_requests",
            "max_batch_size",
            "max_best_of",
            "max_stop_sequences",
            "max_input_tokens",
            "max_total_tokens",
        )
        # optional facts of the wrong type stay unknown (None), they never break a run
        facts = {k: v if _is_count(v := data.get(k)) else None for k in _INFO_INTS}
        model_id = data.get("model_id")
        return BackendInfo(
            name=self.name,
            kind=self.kind,
            model=model_id if isinstance(model_id, str) else None,
            max_concurrency=facts["max_concurrent_requests"],
            max_batch_size=facts["max_batch_size"],
            max_best_of=facts["max_best_of"],
            max_stop_sequences=facts["max_stop_sequences"],
            max_input_tokens=facts["max_input_tokens"],
            max_total_tokens=facts["max_total_tokens"],
            supports_n=False,
            extra={k: v for k, v in data.items() if k not in known},
        )

    async def health(self) -> Health:
        started = time.perf_counter()
        try:
            with self._scrubbed():
                status, body = await self._http.get("/health", timeout=self.health_timeout)
        except BackendError as exc:
            return Health(ok=False, latency_s=time.perf_counter() - started, detail=str(exc))
        elapsed = time.perf_counter() - started
        if status == 200:
            return Health(ok=True, latency_s=elapsed)
        return Health(
            ok=False,
            latency_s=elapsed,
            detail=f"HTTP {status}: {error_message(self._http.scrub(body))}",
        )

    # -- scoring ------------------------------------------------------------------------
    #
    # A completion is scored by sending prompt + completion to /generate with
    # ``decoder_input_details`` (the prompt tokens' log-probs, "prefill") and one new
    # token.  Which prefill tokens are the completion's: /tokenize gives each token's
    # character span in the same text; a token belongs to the completion when it ends
    # after the prompt's last character, so a token that straddles the boundary counts
    # for the completion.  Without /tokenize (404, no fast tokenizer), the tokens are
    # taken from the end until their texts cover the completion's length (same rule).

    async def score(self, request: ScoreRequest) -> list[CompletionScore]:
        """One score per completion (natural-log probabilities of its tokens)."""
        if request.prompt is None:
            raise ScoringUnsupportedError(
                f"backend {self.name!r}: TGI's native API scores a plain prompt, not chat "
                "messages (render the conversation into a prompt first)",
                backend=self.name,
            )
        prompt = request.prompt
        model = self._info.model if self._info else None
        return await _all(self._score_one(prompt, c, model) for c in request.completions)

    async def check_scoring(self) -> None:
        """Send one tiny scoring request; ScoringUnsupportedError when it cannot work."""
        try:
            [got] = await self.score(ScoreRequest(prompt="Scoring check:", completions=(" ok",)))
        except ScoringUnsupportedError:
            raise
        except FatalError as exc:
            raise ScoringUnsupportedError(
                f"backend {self.name!r} ({self._http.base_url}) cannot score completions: "
                f"/generate with decoder_input_details failed: {exc.message}",
                backend=self.name,
            ) from exc
        if not got.token_logprobs:
            raise ScoringUnsupportedError(
                f"backend {self.name!r}: the server returned no log-probabilities",
                backend=self.name,
            )

    async def _score_one(self, prompt: str, completion: str, model: str | None) -> CompletionScore:
        text = prompt + completion
        payload = {
            "inputs": text,
            "parameters": {
                "max_new_tokens": 1,
                "do_sample": False,
                "details": True,
                "decoder_input_details": True,
            },
        }
        try:
            data, spans = await _all(
                [self._http.post_json("/generate", payload), self._token_spans(text)]
            )
        except BadRequestError as exc:
            raise _refine(exc) from exc
        details = data.get("details") if isinstance(data, dict) else None
        prefill = details.get("prefill") if isinstance(details, dict) else None
        if not isinstance(prefill, list):
            raise MalformedResponseError("TGI answer lacks details.prefill", backend=self.name)
        if not prefill:
            raise ScoringUnsupportedError(
                f"backend {self.name!r} ({self._http.base_url}) returned no prefill tokens for "
                "decoder_input_details: this server cannot score given text",
                backend=self.name,
            )
        try:
            texts = [str(t["text"]) for t in prefill]
            logprobs = [t.get("logprob") for t in prefill]
        except (TypeError, KeyError, AttributeError) as exc:
            raise MalformedResponseError("bad prefill token", backend=self.name) from exc
        if spans is not None and len(spans) == len(prefill):
            first = next((i for i, end in enumerate(spans) if end > len(prompt)), len(spans))
        else:
            first = _first_covering(texts, len(completion))
        picked = logprobs[first:]
        if not all(isinstance(lp, int | float) and not isinstance(lp, bool) for lp in picked):
            raise BadRequestError(
                "a completion token has no log-probability (an empty prompt leaves the first "
                "token without context)",
                backend=self.name,
            )
        return CompletionScore(
            text=completion,
            token_logprobs=tuple(float(lp) for lp in picked),
            tokens=tuple(texts[first:]),
            backend=self.name,
            model=model,
        )

    async def _token_spans(self, text: str) -> list[int] | None:
        """The end offset of each token of ``text`` from /tokenize, or None without it."""
        try:
            tokens = await self._http.post_json("/tokenize", {"inputs": text})
        except (FatalError, ServerError):
            return None
        try:
            return [int(t["stop"]) for t in tokens]
        except (TypeError, KeyError, ValueError):
            return None


def _refine(exc: BadRequestError) -> BadRequestError:
    """TGI's 'prompt does not fit' validation errors as ContextLengthError."""
    if not isinstance(exc, ContextLengthError) and any(m in exc.message for m in _CONTEXT_MESSAGES):
        return ContextLengthError(exc.message, backend=exc.backend, status=exc.status)
    return exc


def _first_leaf(group: BaseExceptionGroup[BaseException]) -> BaseException:
    first = group.exceptions[0]
    return _first_leaf(first) if isinstance(first, BaseExceptionGroup) else first


def _first_covering(texts: list[str], length: int) -> int:
    """Index of the first of the last tokens whose texts together cover ``length``
    characters (the completion's tokens, a straddling one included)."""
    covered = 0
    for i in range(len(texts) - 1, -1, -1):
        covered += len(texts[i])
        if covered >= length:
            return i
    return 0


async def _all(coros: Any) -> list[Any]:
    """Await the coroutines together, results in order; the first failure cancels the
    rest and is raised as itself."""
    try:
        async with asyncio.TaskGroup() as group:
            tasks = [group.create_task(c) for c in coros]
    except BaseExceptionGroup as failed:
        raise _first_leaf(failed) from None
    return [t.result() for t in tasks]


def _is_count(value: object, *, optional: bool = False) -> bool:
    """Whether ``value`` is a count (a non-negative int, not a bool), or None if allowed."""
    if value is None:
        return optional
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0
