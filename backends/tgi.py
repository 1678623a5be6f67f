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
  the end of ``generated_text``; it is cut off here, as other servers do.
* ``details: true`` is always sent, for the finish reason and the token counts.
* ``/generate_stream`` sends ``data:{json}`` events without ``[DONE]``; the last event
  carries ``generated_text`` and ``details``.  Errors, validation included, arrive as an
  event ``{"error", "error_type"}`` under HTTP 200.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import time
from collections.abc import AsyncIterator, Mapping
from typing import Any, Literal

import aiohttp

from ensemble_async.backend import BaseBackend, gather_n
from ensemble_async.errors import (
    BackendError,
    BadRequestError,
    ContextLengthError,
    FatalError,
    MalformedResponseError,
    OverloadedError,
    ServerError,
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

__all__ = ["TGIBackend"]

_FINISH: dict[str, FinishReason] = {
    "eos_token": "stop",
    "stop_sequence": "stop",
    "length": "length",
}
# TGI's validation messages for prompts that do not fit the model.
_CONTEXT_MESSAGES = ("`inputs` tokens + `max_new_tokens`", "`inputs` must have less than")


class TGIBackend(BaseBackend):
    """A TGI server at ``url`` (e.g. ``http://host:8080``), through ``/generate``.

    ``endpoint="compat"`` uses ``POST /`` instead (same body plus ``stream``).  The
    aiohttp ``session`` is shared when given (and then left open by ``aclose``).
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
    ) -> None:
        super().__init__(name=name)
        if endpoint not in ("generate", "compat"):
            raise ValueError(f"endpoint must be 'generate' or 'compat', got {endpoint!r}")
        self._http = HTTPTransport(
            url,
            backend=self.name,
            session=session,
            api_key=resolve_key(api_key, api_key_env),
            headers=headers,
            timeout=timeout,
            read_timeout=read_timeout,
        )
        self._endpoint = endpoint
        self._info: BackendInfo | None = None
        self._info_lock = asyncio.Lock()
        self._no_info = False

    def __repr__(self) -> str:
        return f"<TGIBackend name={self.name!r} url={self._http.base_url!r}>"

    async def aclose(self) -> None:
        await self._http.aclose()

    # -- requests ---------------------------------------------------------------------

    def _payload(self, request: GenerationRequest, seed: int | None) -> dict[str, Any]:
        if request.prompt is None:
            raise BadRequestError(
                "TGI's native API takes a prompt, not chat messages "
                "(use the openai backend on TGI's /v1 for chat)",
                backend=self.name,
            )
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
        self, text: Any, details: Any, request: GenerationRequest, started: float
    ) -> Completion:
        if not isinstance(text, str) or not isinstance(details, dict):
            raise MalformedResponseError(
                "TGI answer lacks generated_text or details", backend=self.name
            )
        reason = details.get("finish_reason")
        if reason == "stop_sequence":
            text = _cut_stop(text, request.stop)
        prefill = details.get("prefill")
        prompt_tokens = details.get("input_length")
        if prompt_tokens is None and prefill:
            prompt_tokens = len(prefill)
        return Completion(
            text=text,
            finish_reason=_FINISH.get(str(reason), "unknown"),
            backend=self.name,
            latency_s=time.perf_counter() - started,
            prompt_tokens=prompt_tokens,
            completion_tokens=details.get("generated_tokens"),
            model=self._info.model if self._info else None,
        )

    async def _generate_one(self, request: GenerationRequest, seed: int | None) -> Completion:
        payload = self._payload(request, seed)
        started = time.perf_counter()
        if self._endpoint == "compat":
            payload["stream"] = False
            # POST / returns the prompt too unless told otherwise (text-generation models)
            payload["parameters"].setdefault("return_full_text", False)
        headers: dict[str, str] = {}
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
        done = self._completion(data.get("generated_text"), data.get("details"), request, started)
        return _with_prompt_tokens(done, headers)

    async def generate(self, request: GenerationRequest) -> list[Completion]:
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

    async def stream(self, request: GenerationRequest) -> AsyncIterator[StreamEvent]:
        if request.n != 1:
            raise BadRequestError("streaming needs n == 1", backend=self.name)
        await self._check_stops(request)
        payload = self._payload(request, request.seed)
        if self._endpoint == "compat":
            payload["stream"] = True
            payload["parameters"].setdefault("return_full_text", False)
        path = "/" if self._endpoint == "compat" else "/generate_stream"
        held = _StopHoldback(request.stop)
        started = time.perf_counter()
        try:
            async for data in self._http.post_sse(path, payload):
                event = self._http.decode_event(data)
                if not isinstance(event, dict):
                    raise MalformedResponseError("stream event is not an object", backend=self.name)
                if "error" in event:
                    raise self._stream_error(event)
                token = event.get("token") or {}
                if not token.get("special") and isinstance(token.get("text"), str):
                    piece = held.feed(token["text"])
                    if piece:
                        yield TextDelta(piece)
                if event.get("generated_text") is not None:
                    done = self._completion(
                        event["generated_text"], event.get("details"), request, started
                    )
                    rest = held.finish(done.text)
                    if rest:
                        yield TextDelta(rest)
                    yield done
                    return
        except BadRequestError as exc:
            raise _refine(exc) from exc
        raise MalformedResponseError(
            "stream ended before its final event (truncated)", backend=self.name
        )

    def _stream_error(self, event: Mapping[str, Any]) -> BackendError:
        message = f"{event.get('error')} ({event.get('error_type')})"
        kind = event.get("error_type")
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
        status, body = await self._http.get("/info", timeout=self.health_timeout)
        if status != 200:
            raise error_from_status(
                status, error_message(self._http.scrub(body)), backend=self.name
            )
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
        return BackendInfo(
            name=self.name,
            kind=self.kind,
            model=data.get("model_id"),
            max_concurrency=data.get("max_concurrent_requests"),
            max_batch_size=data.get("max_batch_size"),
            max_best_of=data.get("max_best_of"),
            max_stop_sequences=data.get("max_stop_sequences"),
            max_input_tokens=data.get("max_input_tokens"),
            max_total_tokens=data.get("max_total_tokens"),
            supports_n=False,
            extra={k: v for k, v in data.items() if k not in known},
        )

    async def health(self) -> Health:
        started = time.perf_counter()
        try:
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


def _cut_stop(text: str, stops: tuple[str, ...]) -> str:
    """The text before the first stop string (TGI leaves the matched one in)."""
    cuts = [i for s in stops if (i := text.find(s)) >= 0]
    return text[: min(cuts)] if cuts else text


class _StopHoldback:
    """Streams text while holding back what could still turn into a stop string, so that
    the deltas add up to the final text with the stop string cut off."""

    def __init__(self, stops: tuple[str, ...]) -> None:
        self._stops = stops
        self._text = ""
        self._sent = 0

    def feed(self, piece: str) -> str:
        self._text += piece
        if not self._stops:
            self._sent = len(self._text)
            return piece
        text, start = self._text, self._sent
        cuts = [i for s in self._stops if (i := text.find(s, start)) >= 0]
        if cuts:
            end = min(cuts)
        else:
            hold = max(
                (k for s in self._stops for k in range(1, len(s)) if text.endswith(s[:k])),
                default=0,
            )
            end = len(text) - hold
        out = text[start:end]
        self._sent = max(start, end)
        return out

    def finish(self, final: str) -> str:
        sent = self._text[: self._sent]
        return final[len(sent) :] if final.startswith(sent) else ""


def _with_prompt_tokens(done: Completion, headers: Mapping[str, str]) -> Completion:
    """``done`` with the prompt's token count from TGI's ``x-prompt-tokens`` header when
    the answer itself did not say (plain /generate reports it only there)."""
    if done.prompt_tokens is not None:
        return done
    value = headers.get("x-prompt-tokens", "")
    return dataclasses.replace(done, prompt_tokens=int(value)) if value.isdigit() else done


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
