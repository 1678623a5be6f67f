"""The OpenAI-compatible protocol itself, for every adapter that speaks it.

``OpenAIBackend`` (both of its transports) and ``TGIBackend`` in chat mode (TGI's
``/v1/chat/completions``) use this one payload builder, this one response and stream
parser and this one stream loop; the transports (``HTTPWire`` here, ``SDKWire`` in
``openai_sdk``) only move the JSON.  Nothing here retries.

What every completion parsed here guarantees:

* every field read from the server has the type the protocol says, or the answer is a
  ``MalformedResponseError`` (optional counts of the wrong type are ignored);
* the text is cut at the first of the request's stop strings (finish reason ``stop``),
  whatever the server did with ``stop`` (some ignore it);
* the API key, should the server echo it, is masked (``Scrubber``), in deltas as in the
  final text;
* a text longer than ``max_completion_chars`` is a ``ResponseTooLargeError``, raised
  while a stream is read, not after.
"""

from __future__ import annotations

import re
import time
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Mapping
from contextlib import aclosing
from typing import Any, Protocol, cast

from ensemble_async.errors import (
    BadRequestError,
    MalformedResponseError,
    ResponseTooLargeError,
    error_from_event,
)
from ensemble_async.http import HTTPTransport
from ensemble_async.scrub import Scrubber, ScrubHoldback
from ensemble_async.stops import StopHoldback, cut_at_stop
from ensemble_async.types import (
    Completion,
    FinishReason,
    GenerationRequest,
    StreamEvent,
    TextDelta,
)

__all__ = [
    "DEFAULT_MAX_COMPLETION_CHARS",
    "HTTPWire",
    "Wire",
    "build_payload",
    "finish_reason",
    "parse_chunk",
    "parse_response",
    "rejected_fields",
    "stream_completion",
]

DEFAULT_MAX_COMPLETION_CHARS = 1024 * 1024
"""The longest completion text accepted (characters)."""

_FINISH: dict[str, FinishReason] = {
    "stop": "stop",
    "eos_token": "stop",
    "stop_sequence": "stop",  # TGI's /v1 routes
    "length": "length",
}

# Fields a negotiation may never drop: without them the request means something else.
_ESSENTIAL = frozenset({"model", "messages", "prompt", "max_tokens", "stream"})
# How servers say a request carries fields they do not know.
_UNKNOWN_FIELD_MARKERS = (
    "unexpected field",
    "unexpected keyword",
    "unrecognized request argument",
    "unrecognized field",
    "unknown field",
    "unknown parameter",
    "unsupported parameter",
    "extra inputs are not permitted",
    "extra_forbidden",
    "extra fields not permitted",
)


def finish_reason(value: object) -> FinishReason:
    """Normalise a server's finish_reason; null or anything unknown is ``unknown``."""
    return _FINISH.get(value, "unknown") if isinstance(value, str) else "unknown"


def build_payload(
    request: GenerationRequest,
    model: str,
    *,
    chat: bool,
    stream: bool = False,
    extensions: bool = True,
    drop: frozenset[str] = frozenset(),
) -> tuple[dict[str, Any], dict[str, Any]]:
    """The request as (OpenAI fields, non-OpenAI fields); the aiohttp transport merges
    them into one JSON object, the SDK passes the second as ``extra_body``.

    ``extensions=False`` leaves out the fields that are not OpenAI's (vLLM's ``top_k``
    and ``min_tokens``); ``request.extra`` is sent as given.  ``drop`` names fields this
    server has refused (learnt by the backend); they are left out.
    """
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
    if extensions:
        if request.top_k is not None:
            vendor["top_k"] = request.top_k
        if request.min_new_tokens:
            vendor["min_tokens"] = request.min_new_tokens
    vendor.update(request.extra)
    if drop:
        body = {k: v for k, v in body.items() if k not in drop}
        vendor = {k: v for k, v in vendor.items() if k not in drop}
    return body, vendor


def rejected_fields(message: str, sent: set[str]) -> frozenset[str]:
    """The fields of ``sent`` that an error ``message`` says the server does not accept
    (empty when the message is about something else).  Essential fields never count."""
    lowered = message.lower()
    if not any(marker in lowered for marker in _UNKNOWN_FIELD_MARKERS):
        return frozenset()
    found = set()
    for name in sent - _ESSENTIAL:
        quoted = rf"""['"`]{re.escape(name)}['"`]"""
        bare = rf"(?<![\w.]){re.escape(name)}(?![\w])"
        if re.search(quoted, message) or (len(name) > 2 and re.search(bare, message)):
            found.add(name)
    return frozenset(found)


def _count(value: object) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def _malformed(what: str, backend: str) -> MalformedResponseError:
    return MalformedResponseError(f"unexpected answer: {what}", backend=backend)


def _text_of(choice: object, chat: bool, backend: str) -> str:
    if not isinstance(choice, Mapping):
        raise _malformed("a choice is not an object", backend)
    if chat:
        message = choice.get("message")
        if not isinstance(message, Mapping):
            raise _malformed("a chat choice has no message object", backend)
        text = message.get("content")
    else:
        if "text" not in choice:
            raise _malformed("a choice has no text", backend)
        text = choice.get("text")
    if not isinstance(text, str | None):
        raise _malformed(f"the text is {type(text).__name__}, not a string", backend)
    return text or ""


def _reason_of(choice: Mapping[str, Any], backend: str) -> str | None:
    reason = choice.get("finish_reason")
    if not isinstance(reason, str | None):
        raise _malformed(f"finish_reason is {type(reason).__name__}", backend)
    return reason


def _final_text(
    raw: str,
    reason: str | None,
    request: GenerationRequest,
    *,
    scrubber: Scrubber,
    max_chars: int,
    backend: str,
) -> tuple[str, FinishReason]:
    """The text cut at the first stop string and scrubbed, and its finish reason."""
    if len(raw) > max_chars:
        raise ResponseTooLargeError(
            f"completion of {len(raw)} characters is over the limit of {max_chars}",
            backend=backend,
        )
    text, stopped = cut_at_stop(raw, request.stop)
    return scrubber.scrub(text), "stop" if stopped else finish_reason(reason)


def parse_response(
    data: object,
    *,
    chat: bool,
    backend: str,
    model: str | None,
    latency_s: float,
    request: GenerationRequest | None = None,
    scrubber: Scrubber | None = None,
    max_completion_chars: int = DEFAULT_MAX_COMPLETION_CHARS,
) -> list[Completion]:
    """Completions from a (non-streamed) answer, in choice order, indexed from 0."""
    request = request or GenerationRequest(prompt="")
    scrubber = scrubber or Scrubber(None)
    if not isinstance(data, Mapping):
        raise _malformed(f"JSON {type(data).__name__}, not an object", backend)
    if "error" in data and "choices" not in data:
        raise error_from_event(data["error"], backend=backend)
    choices = data.get("choices")
    if not isinstance(choices, list) or not choices:
        raise _malformed("no choices", backend)
    if not all(isinstance(c, Mapping) for c in choices):
        raise _malformed("a choice is not an object", backend)
    usage = data.get("usage")
    usage = usage if isinstance(usage, Mapping) else {}
    prompt_tokens = _count(usage.get("prompt_tokens"))
    completion_tokens = _count(usage.get("completion_tokens")) if len(choices) == 1 else None
    raw_model = data.get("model")
    model_id = scrubber.scrub(raw_model) if isinstance(raw_model, str) else model
    out: list[Completion] = []
    ordered = choices if len(choices) == 1 else sorted(choices, key=_choice_index)
    for i, choice in enumerate(ordered):
        text, reason = _final_text(
            _text_of(choice, chat, backend),
            _reason_of(choice, backend),
            request,
            scrubber=scrubber,
            max_chars=max_completion_chars,
            backend=backend,
        )
        out.append(
            Completion(
                text=text,
                finish_reason=reason,
                backend=backend,
                latency_s=latency_s,
                prompt_tokens=prompt_tokens,
                completion_tokens=completion_tokens,
                model=model_id,
                index=i,
            )
        )
    return out


def _choice_index(choice: Mapping[str, Any]) -> int:
    return _count(choice.get("index")) or 0


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
    choices = event.get("choices")
    if choices is None:
        choices = []
    if not isinstance(choices, list):
        raise _malformed("stream chunk choices is not a list", backend)
    piece, reason = "", None
    for choice in choices:
        if not isinstance(choice, Mapping):
            raise _malformed("a stream choice is not an object", backend)
        if chat:
            delta = choice.get("delta")
            if delta is None:
                delta = {}
            if not isinstance(delta, Mapping):
                raise _malformed("a stream delta is not an object", backend)
            part = delta.get("content")
        else:
            part = choice.get("text")
        if not isinstance(part, str | None):
            raise _malformed(f"a stream piece is {type(part).__name__}", backend)
        piece += part or ""
        reason = _reason_of(choice, backend) or reason
    return piece, reason, usage


class Wire(Protocol):
    """What a transport does: one call, one stream (``None`` marks ``[DONE]``)."""

    def create(self, chat: bool, body: dict[str, Any], vendor: dict[str, Any]) -> Awaitable[Any]:
        """One call (an awaitable: a coroutine function or a function returning one)."""
        ...

    def stream(
        self, chat: bool, body: dict[str, Any], vendor: dict[str, Any]
    ) -> AsyncGenerator[Any, None]: ...

    async def aclose(self) -> None: ...


class HTTPWire:
    """The OpenAI routes over our own ``HTTPTransport`` (``/v1/completions`` and
    ``/v1/chat/completions`` under the transport's base URL)."""

    def __init__(self, http: HTTPTransport) -> None:
        self._http = http

    def create(self, chat: bool, body: dict[str, Any], vendor: dict[str, Any]) -> Awaitable[Any]:
        # A plain function returning the transport's coroutine: one frame less per request.
        path = "/v1/chat/completions" if chat else "/v1/completions"
        return self._http.post_json(path, {**body, **vendor} if vendor else body)

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


async def stream_completion(
    events: AsyncIterator[Any],
    request: GenerationRequest,
    *,
    chat: bool,
    backend: str,
    model: str | None,
    scrubber: Scrubber,
    max_completion_chars: int = DEFAULT_MAX_COMPLETION_CHARS,
    started: float | None = None,
) -> AsyncIterator[StreamEvent]:
    """Text deltas, then one ``Completion``, from decoded stream chunks (``None`` marks
    ``[DONE]``).  The deltas add up to the final text: cut at the first stop string
    (reading stops there), scrubbed, never longer than ``max_completion_chars``.

    A stream that ends with neither a finish_reason nor ``[DONE]`` is malformed; one
    that ends with ``[DONE]`` but no finish_reason finishes ``unknown``.
    """
    started = time.perf_counter() if started is None else started
    stops = StopHoldback(request.stop)
    masked = ScrubHoldback(scrubber)
    raw_len = 0
    parts: list[str] = []
    reason: str | None = None
    usage: Mapping[str, Any] = {}
    done = False
    async for event in events:
        if event is None:
            done = True
            break
        piece, why, got_usage = parse_chunk(event, chat=chat, backend=backend)
        reason = why or reason
        usage = got_usage or usage
        if piece:
            raw_len += len(piece)
            if raw_len > max_completion_chars:
                raise ResponseTooLargeError(
                    f"streamed completion is over the limit of {max_completion_chars} characters",
                    backend=backend,
                )
            parts.append(piece)
            out = masked.feed(stops.feed(piece))
            if out:
                yield TextDelta(out)
            if stops.stopped:
                break
    if reason is None and not done and not stops.stopped:
        raise MalformedResponseError(
            "stream ended without a finish_reason or [DONE]", backend=backend
        )
    text, final_reason = _final_text(
        "".join(parts),
        reason,
        request,
        scrubber=scrubber,
        max_chars=max_completion_chars,
        backend=backend,
    )
    rest = masked.finish(text)
    if rest:
        yield TextDelta(rest)
    yield Completion(
        text=text,
        finish_reason=final_reason,
        backend=backend,
        latency_s=time.perf_counter() - started,
        prompt_tokens=_count(usage.get("prompt_tokens")),
        completion_tokens=_count(usage.get("completion_tokens")),
        model=model,
    )
