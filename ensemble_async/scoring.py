"""Scoring: how likely a model finds each candidate completion of one prompt.

This is the layer boundary for log-likelihood selection (target-fit, after GRAPE): a
backend that can score implements :class:`Scorer`; the selection policies above it only
see :class:`CompletionScore` values.  A score is conditioned on the prompt exactly as the
model would see it when generating: a chat request is rendered with the model's chat
template and the completion is the assistant's turn; a plain prompt is followed by the
completion text directly.  Only the completion's tokens are scored, never the prompt's.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

from .errors import FatalError
from .types import ChatMessage

__all__ = [
    "CompletionScore",
    "ScoreRequest",
    "Scorer",
    "ScoringUnsupportedError",
    "can_score",
]


@dataclass(frozen=True, slots=True)
class ScoreRequest:
    """One prompt (plain ``prompt`` or chat ``messages``, exactly one) and the candidate
    completions to score under it."""

    completions: tuple[str, ...]
    prompt: str | None = None
    messages: tuple[ChatMessage, ...] | None = None

    def __post_init__(self) -> None:
        if (self.prompt is None) == (self.messages is None):
            raise ValueError("ScoreRequest needs exactly one of prompt or messages")
        if not isinstance(self.completions, tuple):
            object.__setattr__(self, "completions", tuple(self.completions))
        if self.messages is not None and not isinstance(self.messages, tuple):
            object.__setattr__(self, "messages", tuple(self.messages))
        if not self.completions:
            raise ValueError("ScoreRequest.completions must not be empty")

    @property
    def is_chat(self) -> bool:
        return self.messages is not None


@dataclass(frozen=True, slots=True)
class CompletionScore:
    """A completion's log-probability under a model, token by token (natural log)."""

    text: str
    token_logprobs: tuple[float, ...]
    tokens: tuple[str, ...] | None = None
    backend: str = ""
    model: str | None = None

    @property
    def total(self) -> float:
        """Sum of the token log-probabilities (0.0 for an empty completion)."""
        return math.fsum(self.token_logprobs)

    @property
    def num_tokens(self) -> int:
        return len(self.token_logprobs)

    @property
    def mean(self) -> float:
        """Length-normalised log-likelihood: the mean per token (-inf when empty)."""
        return self.total / self.num_tokens if self.token_logprobs else -math.inf


class ScoringUnsupportedError(FatalError):
    """This backend (or its server) cannot return log-probabilities of given text."""


@runtime_checkable
class Scorer(Protocol):
    """A backend that can score completions.

    ``score`` returns one :class:`CompletionScore` per completion, in order.
    ``check_scoring`` raises :class:`ScoringUnsupportedError` (with a message naming the
    backend and what is missing) when scoring cannot work, so that a run fails when it
    starts rather than midway; it may send one tiny request.
    """

    async def score(self, request: ScoreRequest) -> list[CompletionScore]: ...

    async def check_scoring(self) -> None: ...


def can_score(backend: object) -> bool:
    """Whether ``backend`` implements the :class:`Scorer` protocol at all."""
    return isinstance(backend, Scorer)
