"""ensemble-async: drive many LLM inference servers as one ensemble.

The public API lives here; adapters are in ``ensemble_async.backends`` and are found by
kind name through the ``ensemble_async.backends`` entry-point group.
"""

from __future__ import annotations

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

__all__ = [
    "AuthenticationError",
    "Backend",
    "BackendError",
    "BackendInfo",
    "BadRequestError",
    "BaseBackend",
    "ChatMessage",
    "Completion",
    "ConnectError",
    "ContextLengthError",
    "FatalError",
    "GenerationRequest",
    "Health",
    "MalformedResponseError",
    "NotFoundError",
    "OverloadedError",
    "RateLimitedError",
    "RequestTimeoutError",
    "RetryableError",
    "Secret",
    "ServerError",
    "StreamEvent",
    "TextDelta",
    "UnknownBackendError",
    "__version__",
    "backend_kinds",
    "create_backend",
]
