"""Target-fit selection in the ensemble: the target model scores every candidate, the
policy picks, provenance records every score and why."""

from __future__ import annotations

import asyncio

import pytest

from ensemble_async.backend import BaseBackend
from ensemble_async.backends.tgi import TGIBackend
from ensemble_async.ensemble import Ensemble
from ensemble_async.member import Member
from ensemble_async.retry import RetryPolicy
from ensemble_async.scoring import CompletionScore, ScoreRequest, ScoringUnsupportedError
from ensemble_async.selection import SelectionConfig, fit_score
from ensemble_async.testing.faults import Fault
from ensemble_async.testing.tgi_double import TGIDouble
from ensemble_async.types import Completion, GenerationRequest

PROMPTS = [f"Question {i}: what grows in the garden?\nAnswer:" for i in range(6)]


class Plain(BaseBackend):
    kind = "plain"

    async def generate(self, request: GenerationRequest) -> list[Completion]:
        return [Completion("plain answer", "stop", self.name, 0.0)]


async def test_target_fit_keeps_the_candidate_the_target_likes_best() -> None:
    async with TGIDouble() as a, TGIDouble() as b, TGIDouble() as judge:
        members = [
            Member(TGIBackend(a.url, name="a")),
            Member(TGIBackend(b.url, name="b")),
            Member(Plain(name="plain")),
        ]
        target = Member(TGIBackend(judge.url, name="judge"))
        config = SelectionConfig(policy="target-fit", target="judge")
        requests = [
            GenerationRequest(prompt=p, max_new_tokens=6, temperature=0.9, seed=i)
            for i, p in enumerate(PROMPTS)
        ]
        async with Ensemble(members, selection=config, target=target) as ensemble:
            results = [r async for r in ensemble.map(requests, ordered=True)]
            # Independently: score each item's candidates and take the best mean.
            for request, result in zip(requests, results, strict=True):
                texts = [c.text or "" for c in result.candidates]
                scores = await target.score(
                    ScoreRequest(completions=tuple(texts), prompt=request.prompt)
                )
                means = [fit_score(s, "mean") for s in scores]
                best = max(range(len(means)), key=lambda i: (means[i], -i))
                assert result.choice is not None and result.winner is not None
                assert result.winner.index == best and result.rule == "target-fit"
                assert result.text == texts[best].strip()
                assert result.choice.scores == pytest.approx(dict(enumerate(means)))
                record = result.to_dict()
                assert record["selection"]["policy"] == "target-fit"
                assert "judge" in record["selection"]["why"]
    assert target.snapshot()["done"] >= 2 * len(PROMPTS)  # scoring went through the member


async def test_a_target_that_cannot_score_stops_the_ensemble_when_it_starts() -> None:
    async with TGIDouble() as a:
        members = [Member(TGIBackend(a.url, name="a")), Member(Plain(name="p"))]
        config = SelectionConfig(policy="consensus+target-fit", target="p")
        with pytest.raises(ScoringUnsupportedError, match="'p'"):
            async with Ensemble(members, selection=config):
                pass


async def test_an_unreachable_target_defers_the_item() -> None:
    async with TGIDouble() as a, TGIDouble() as judge:
        target = Member(TGIBackend(judge.url, name="judge"), retry=RetryPolicy.never())
        members = [Member(TGIBackend(a.url, name="a")), Member(Plain(name="p"))]
        config = SelectionConfig(policy="target-fit", target="judge")
        async with Ensemble(members, selection=config, target=target) as ensemble:
            judge.faults.push(*[Fault.status(503)] * 4)  # after the start-up check
            result = await ensemble.run(GenerationRequest(prompt=PROMPTS[0], max_new_tokens=4))
    assert not result.kept and result.deferred and result.rule == "target-unavailable"


def test_selection_options_are_checked() -> None:
    with pytest.raises(ValueError, match="'x' is not a member"):
        Ensemble([Plain(name="p")], selection=SelectionConfig("target-fit", "x"))
    with pytest.raises(ValueError, match="only used by the target-fit"):
        Ensemble([Plain(name="p")], target="p")


def test_members_named_after_their_backend_are_told_apart() -> None:
    a, b, c = Plain(name="openai"), Plain(name="openai"), Plain(name="openai")
    ensemble = Ensemble([a, b, Member(c, name="mine")])
    assert [m.name for m in ensemble.members] == ["openai", "openai-2", "mine"]
    assert ensemble.members[1].stats.name == "openai-2"
    with pytest.raises(ValueError, match="unique"):
        Ensemble([Member(a, name="x"), Member(b, name="x")])


class Gated(BaseBackend):
    """Answers ``text`` once ``gate`` is set (a straggler the test releases)."""

    kind = "gated"

    def __init__(self, text: str, gate: asyncio.Event, *, name: str) -> None:
        super().__init__(name=name)
        self.text, self.gate = text, gate

    async def generate(self, request: GenerationRequest) -> list[Completion]:
        await self.gate.wait()
        return [Completion(self.text, "stop", self.name, 0.0)]


class LongerIsLikelier(BaseBackend):
    """A target that scores a completion by its length: the longest is the likeliest."""

    kind = "likes-long"

    async def generate(self, request: GenerationRequest) -> list[Completion]:
        return [Completion("", "stop", self.name, 0.0)]

    async def check_scoring(self) -> None:
        return None

    async def score(self, request: ScoreRequest) -> list[CompletionScore]:
        return [
            CompletionScore(text, (-1.0 / (1 + len(text)),), backend=self.name)
            for text in request.completions
        ]


@pytest.mark.parametrize("policy", ["target-fit", "consensus+target-fit"])
async def test_an_exact_early_decision_still_lets_the_target_see_every_candidate(
    policy: str,
) -> None:
    """``exact`` promises what waiting for everyone gives: a consensus decided early must
    not cancel a straggler that the target model would have picked."""
    gate = asyncio.Event()
    members = [
        Member(Plain(name="p1")),
        Member(Plain(name="p2")),
        Member(Gated("plain answer, with more detail", gate, name="late")),
    ]
    target = Member(LongerIsLikelier(name="judge"))
    config = SelectionConfig(policy=policy, target="judge")  # type: ignore[arg-type]
    async with Ensemble(members, min_candidates=2, selection=config, target=target) as ens:
        item = asyncio.create_task(ens.run(GenerationRequest(prompt="q", max_new_tokens=8)))
        # The two fast members answer first; only then is the straggler let go.
        while members[0].snapshot()["done"] + members[1].snapshot()["done"] < 2:  # noqa: ASYNC110
            await asyncio.sleep(0)
        gate.set()
        result = await item
    assert result.decision.selection.rule == "shortcut-first" and result.decision.early
    assert [c.status for c in result.candidates] == ["ok", "ok", "ok"]
    assert result.winner is not None and result.winner.source == "late"
