"""Scoring through a member: the same cache, breaker, retries and admission as
generation; a member whose backend cannot score says so before a run starts."""

from __future__ import annotations

from pathlib import Path

import pytest

from ensemble_async.backend import BaseBackend
from ensemble_async.backends.tgi import TGIBackend
from ensemble_async.cache import ResponseCache
from ensemble_async.member import Member
from ensemble_async.retry import RetryPolicy
from ensemble_async.scoring import ScoreRequest, ScoringUnsupportedError
from ensemble_async.testing.faults import Fault, FaultPlan
from ensemble_async.testing.tgi_double import TGIDouble
from ensemble_async.types import Completion, GenerationRequest

REQUEST = ScoreRequest(
    prompt="Question: what grows in the garden?\nAnswer:",
    completions=(" Carrots and beans.", " Roses."),
)


class Plain(BaseBackend):
    kind = "plain"

    async def generate(self, request: GenerationRequest) -> list[Completion]:
        return [Completion("x", "stop", self.name, 0.0)]


async def test_scores_come_from_the_backend_then_from_the_cache(tmp_path: Path) -> None:
    async with (
        TGIDouble() as tgi,
        TGIBackend(tgi.url, name="t") as backend,
        ResponseCache(tmp_path / "c.sqlite") as cache,
    ):
        member = Member(backend, rpm=600, cache=cache, cache_identity="made-up")
        first = await member.score(REQUEST)
        served = tgi.stats.requests
        tokens_before = member.rpm.available if member.rpm is not None else None
        again = await member.score(REQUEST)
        assert tgi.stats.requests == served  # the second answer did not reach the server
        assert tokens_before is not None and member.rpm is not None
        assert member.rpm.available > tokens_before - 0.5  # the hit took no rate token
    assert [s.token_logprobs for s in again] == [s.token_logprobs for s in first]
    assert all(s.num_tokens > 0 and s.total < 0 for s in first)
    snap = member.snapshot()
    assert snap["cache_hits"] == 1 and snap["cache_misses"] == 1 and snap["done"] == 1


async def test_scoring_is_retried_like_generation() -> None:
    plan = FaultPlan()
    plan.push(Fault.status(503), Fault.status(503))
    async with TGIDouble(faults=plan) as tgi, TGIBackend(tgi.url, name="t") as backend:
        member = Member(backend, retry=RetryPolicy(max_attempts=4, initial_backoff_s=0.0))
        scores = await member.score(REQUEST)
    assert len(scores) == 2
    assert member.snapshot()["retried"] >= 1


async def test_a_member_that_cannot_score_says_so_up_front() -> None:
    member = Member(Plain(name="p"))
    assert not member.can_score
    with pytest.raises(ScoringUnsupportedError, match="'p'"):
        await member.check_scoring()
    with pytest.raises(ScoringUnsupportedError):
        await member.score(REQUEST)
