"""Injectable faults for the test-double servers.

A ``Fault`` says what should go wrong with one request; a ``FaultPlan`` decides which
request gets which fault: first from a queue the test fills (``push``), then at random
with a seeded generator (``rate``).  The doubles consult ``plan.next()`` once per
generation request and act the fault out in their own protocol.

    double.faults.push(Fault.status(429, retry_after=2), Fault.reset())
    double.faults.set_rate(0.1, [Fault.status(503), Fault.truncate()], seed=7)
"""

from __future__ import annotations

import enum
import random
from collections import Counter, deque
from collections.abc import Iterable
from dataclasses import dataclass

__all__ = ["Fault", "FaultKind", "FaultPlan"]


class FaultKind(enum.Enum):
    STATUS = "status"
    """Answer with an HTTP error status, a body and optionally a Retry-After header."""
    RESET = "reset"
    """Close the connection abruptly, without an answer."""
    TRUNCATE = "truncate"
    """Start a normal answer and stop half-way (a stream without its final event)."""
    MALFORMED = "malformed"
    """Answer 200 with a body that is not valid JSON (or a stream event that is not)."""
    HANG = "hang"
    """Never answer (until the server stops)."""
    EMPTY = "empty"
    """Answer 200 with an empty body."""
    STREAM_ERROR = "stream_error"
    """For streams: an error event under HTTP 200; for plain requests: the error body
    with the status the protocol uses for ``error_type``."""


@dataclass(frozen=True, slots=True)
class Fault:
    """One fault.  Build it with the class methods, e.g. ``Fault.status(503)``."""

    kind: FaultKind
    code: int = 500
    """HTTP status for STATUS faults."""
    body: str | None = None
    """Body for STATUS faults; None lets the double write its protocol's error body."""
    retry_after: float | str | None = None
    """Retry-After header value for STATUS faults (seconds or an HTTP date)."""
    message: str = "injected fault"
    error_type: str = "generation"
    """Protocol error type, e.g. TGI's overloaded / validation / generation."""

    @property
    def label(self) -> str:
        """A short name for counting: the status code for STATUS faults, else the kind."""
        return str(self.code) if self.kind is FaultKind.STATUS else self.kind.value

    @classmethod
    def status(
        cls,
        code: int,
        body: str | None = None,
        *,
        retry_after: float | str | None = None,
        message: str = "injected fault",
        error_type: str | None = None,
    ) -> Fault:
        return cls(
            FaultKind.STATUS,
            code=code,
            body=body,
            retry_after=retry_after,
            message=message,
            error_type=error_type or _default_error_type(code),
        )

    @classmethod
    def generation_error(cls, message: str = "injected fault") -> Fault:
        """TGI's failed generation: HTTP 424, ``error_type: generation``."""
        return cls.status(
            424, message=f"Request failed during generation: {message}", error_type="generation"
        )

    @classmethod
    def reset(cls) -> Fault:
        return cls(FaultKind.RESET)

    @classmethod
    def truncate(cls) -> Fault:
        return cls(FaultKind.TRUNCATE)

    @classmethod
    def malformed(cls) -> Fault:
        return cls(FaultKind.MALFORMED)

    @classmethod
    def hang(cls) -> Fault:
        return cls(FaultKind.HANG)

    @classmethod
    def empty(cls) -> Fault:
        return cls(FaultKind.EMPTY)

    @classmethod
    def stream_error(cls, message: str = "injected fault", error_type: str = "generation") -> Fault:
        return cls(FaultKind.STREAM_ERROR, message=message, error_type=error_type)


def _default_error_type(code: int) -> str:
    if code == 429:
        return "overloaded"
    if code in (400, 422):
        return "validation"
    if code == 500:
        return "incomplete_generation"
    return "generation"


class FaultPlan:
    """Which request gets which fault: queued faults first, then seeded random ones.

    Not thread-safe; the doubles call it from their event loop only.
    """

    def __init__(
        self,
        rate: float = 0.0,
        choices: Iterable[Fault] = (),
        *,
        seed: int | None = 0,
        grace: int = 0,
    ) -> None:
        if grace < 0:
            raise ValueError(f"grace must be >= 0, got {grace}")
        self.grace = grace
        """Requests still to answer normally before any fault (queued or random)."""
        self._queue: deque[Fault] = deque()
        self.injected = 0
        """How many faults have been handed out so far."""
        self.by_kind: Counter[str] = Counter()
        """The faults handed out so far, by ``Fault.label``."""
        self.set_rate(rate, choices, seed=seed)

    def push(self, *faults: Fault) -> None:
        """Queue faults for the next requests, one each, in order."""
        self._queue.extend(faults)

    def set_rate(self, rate: float, choices: Iterable[Fault] = (), *, seed: int | None = 0) -> None:
        """From now on each request (once the queue is empty) fails with probability
        ``rate``, with a fault drawn uniformly from ``choices`` (default: a 503)."""
        if not 0.0 <= rate <= 1.0:
            raise ValueError(f"rate must be in [0, 1], got {rate}")
        self.rate = rate
        self.choices: tuple[Fault, ...] = tuple(choices) or (Fault.status(503),)
        self._rng = random.Random(seed)

    def clear(self) -> None:
        """Drop queued faults and stop random ones."""
        self._queue.clear()
        self.rate = 0.0

    @property
    def pending(self) -> int:
        """Queued faults not yet handed out."""
        return len(self._queue)

    def next(self) -> Fault | None:
        """The fault for the request at hand, or None for a normal answer."""
        if self.grace > 0:
            self.grace -= 1
            return None
        if self._queue:
            fault = self._queue.popleft()
        elif self.rate > 0.0 and self._rng.random() < self.rate:
            fault = self._rng.choice(self.choices)
        else:
            return None
        self.injected += 1
        self.by_kind[fault.label] += 1
        return fault
