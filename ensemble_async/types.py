"""Value types shared by every backend: requests, completions, stream events, server facts."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal, TypeAlias

__all__ = [
    "BackendInfo",
    "ChatMessage",
    "Completion",
    "FinishReason",
    "GenerationRequest",
    "Health",
    "StreamEvent",
    "TextDelta",
]

Role: TypeAlias = Literal["system", "user", "assistant"]
FinishReason: TypeAlias = Literal["stop", "length", "unknown"]
"""Normalised finish reasons: ``stop`` (end of sequence or a stop string), ``length``
(max_new_tokens reached), ``unknown`` (the server did not say, e.g. a cut-off stream)."""


@dataclass(frozen=True, slots=True)
class ChatMessage:
    role: Role
    content: str

    def to_dict(self) -> dict[str, str]:
        return {"role": self.role, "content": self.content}


@dataclass(frozen=True, slots=True)
class GenerationRequest:
    """One generation: a plain ``prompt`` or chat ``messages`` (exactly one of them).

    ``temperature == 0`` means greedy decoding.  ``extra`` carries backend-specific
    fields that are passed through untouched (e.g. vLLM's ``repetition_penalty``).
    """

    prompt: str | None = None
    messages: tuple[ChatMessage, ...] | None = None
    max_new_tokens: int = 256
    min_new_tokens: int | None = None
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int | None = None
    stop: tuple[str, ...] = ()
    seed: int | None = None
    n: int = 1
    extra: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if (self.prompt is None) == (self.messages is None):
            raise ValueError("GenerationRequest needs exactly one of prompt or messages")
        if self.messages is not None:
            if not isinstance(self.messages, tuple):
                object.__setattr__(self, "messages", tuple(self.messages))
            if not self.messages:
                raise ValueError("GenerationRequest.messages must not be empty")
        if not isinstance(self.stop, tuple):
            object.__setattr__(self, "stop", tuple(self.stop))
        if any(not s for s in self.stop):
            raise ValueError("GenerationRequest.stop must not contain empty strings")
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if self.min_new_tokens is not None and not 0 <= self.min_new_tokens <= self.max_new_tokens:
            raise ValueError(
                f"min_new_tokens must be in [0, max_new_tokens], got {self.min_new_tokens}"
            )
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k is not None and self.top_k < 1:
            raise ValueError(f"top_k must be >= 1 or None, got {self.top_k}")
        if self.n < 1:
            raise ValueError(f"n must be >= 1, got {self.n}")

    @property
    def is_chat(self) -> bool:
        return self.messages is not None

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    def replace(self, **changes: Any) -> GenerationRequest:
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready, canonical form (used for cache keys and logs)."""
        return {
            "prompt": self.prompt,
            "messages": None if self.messages is None else [m.to_dict() for m in self.messages],
            "max_new_tokens": self.max_new_tokens,
            "min_new_tokens": self.min_new_tokens,
            "temperature": self.temperature,
            "top_p": self.top_p,
            "top_k": self.top_k,
            "stop": list(self.stop),
            "seed": self.seed,
            "n": self.n,
            "extra": dict(sorted(self.extra.items())),
        }


@dataclass(frozen=True, slots=True)
class Completion:
    """One finished candidate text and what the server said about it."""

    text: str
    finish_reason: FinishReason
    backend: str
    latency_s: float
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    model: str | None = None
    index: int = 0
    replica: str | None = None
    """Which server of a replica set wrote it (``host:port``); None for a single server."""

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass(frozen=True, slots=True)
class TextDelta:
    """A piece of streamed text."""

    text: str


StreamEvent: TypeAlias = TextDelta | Completion
"""``Backend.stream`` yields text deltas and ends with exactly one ``Completion``."""


@dataclass(frozen=True, slots=True)
class BackendInfo:
    """What a backend knows about itself and its server (concurrency hints included)."""

    name: str
    kind: str
    model: str | None = None
    max_concurrency: int | None = None
    """How many requests the server runs at once (TGI's max_concurrent_requests, ...)."""
    max_batch_size: int | None = None
    max_best_of: int | None = None
    max_stop_sequences: int | None = None
    max_input_tokens: int | None = None
    max_total_tokens: int | None = None
    supports_n: bool | None = False
    """True when the server honours ``n`` itself (vLLM); False when we fan out; None
    while unknown (not yet learnt from an answer)."""
    extra: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class Health:
    ok: bool
    latency_s: float
    detail: str = ""
