"""ensemble-async: drive many LLM inference servers as one ensemble.

The public API lives here; adapters are in ``ensemble_async.backends`` and are found by
kind name through the ``ensemble_async.backends`` entry-point group.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from .backend import Backend, BaseBackend
from .errors import (
    AuthenticationError,
    BackendError,
    BadRequestError,
    ConnectError,
    ContextLengthError,
    FatalError,
    MalformedResponseError,
    NotFoundError,
    OverloadedError,
    RateLimitedError,
    RequestTimeoutError,
    RetryableError,
    ServerError,
    UnknownBackendError,
)
from .registry import backend_kinds, create_backend
from .secret import Secret
from .types import (
    BackendInfo,
    ChatMessage,
    Completion,
    GenerationRequest,
    Health,
    StreamEvent,
    TextDelta,
)

__version__ = "0.1.0"

# Heavier parts (ROUGE-L pulls in nltk) load on first use: ``import ensemble_async`` stays
# cheap for code that only needs a backend.
_LAZY = {
    "AdaptiveLimiter": "admission",
    "GlobalLimit": "admission",
    "TokenBucket": "admission",
    "CircuitBreaker": "breaker",
    "CircuitOpenError": "breaker",
    "Decision": "consensus",
    "IncrementalSelector": "consensus",
    "Selection": "consensus",
    "select": "consensus",
    "Candidate": "ensemble",
    "Ensemble": "ensemble",
    "EnsembleResult": "ensemble",
    "Member": "member",
    "RetryPolicy": "retry",
    "NoveltyFilter": "rouge",
    "rouge_l": "rouge",
    "BackendStats": "stats",
}

if TYPE_CHECKING:
    from .admission import AdaptiveLimiter, GlobalLimit, TokenBucket
    from .breaker import CircuitBreaker, CircuitOpenError
    from .consensus import Decision, IncrementalSelector, Selection, select
    from .ensemble import Candidate, Ensemble, EnsembleResult
    from .member import Member
    from .retry import RetryPolicy
    from .rouge import NoveltyFilter, rouge_l
    from .stats import BackendStats


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'ensemble_async' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(__all__)


__all__ = [
    "AdaptiveLimiter",
    "AuthenticationError",
    "Backend",
    "BackendError",
    "BackendInfo",
    "BackendStats",
    "BadRequestError",
    "BaseBackend",
    "Candidate",
    "ChatMessage",
    "CircuitBreaker",
    "CircuitOpenError",
    "Completion",
    "ConnectError",
    "ContextLengthError",
    "Decision",
    "Ensemble",
    "EnsembleResult",
    "FatalError",
    "GenerationRequest",
    "GlobalLimit",
    "Health",
    "IncrementalSelector",
    "MalformedResponseError",
    "Member",
    "NotFoundError",
    "NoveltyFilter",
    "OverloadedError",
    "RateLimitedError",
    "RequestTimeoutError",
    "RetryPolicy",
    "RetryableError",
    "Secret",
    "Selection",
    "ServerError",
    "StreamEvent",
    "TextDelta",
    "TokenBucket",
    "UnknownBackendError",
    "__version__",
    "backend_kinds",
    "create_backend",
    "rouge_l",
    "select",
]
