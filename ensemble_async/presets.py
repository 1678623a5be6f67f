"""Pipeline settings and the two presets, ``paper`` and ``default``.

``paper`` reproduces the reference code (IBM/ensemble-instruct) as SPEC.md describes it:
24 / 10 demos per step-1 prompt (type A / B) with up to 4 generated ones, rng seed 42;
step 1 samples (temperature 0.7, top_k 50, top_p 1, 256 new tokens, at least 15, stop
``|EoS|``); step 2 samples (0.7, 50, 1, 512 new tokens, at least 50, stops ``"\\n\\n"``
and ``|EoS|``); step 4 is greedy (256 new tokens, stops ``"\\n\\n"`` and ``|EoS|``);
novelty threshold 0.7; consensus tau 0.01; only the first line of input and output is
kept; generated instructions keep their trailing ``|EoS|`` until step 3.

``default`` differs where the reference behaviour is a defect rather than a choice:

* ``keep_eos=False``: the ``|EoS|`` marker is stripped from generated instructions.
  Kept, it is a fake word in every instruction: the length rule lets 3-word instructions
  through, the novelty check compares texts that share a token by construction, and
  demos built from generated instructions show ``|EoS| |EoS|``.
* ``first_line_only=False``: input and output keep every line. The reference drops
  everything after the first line, which truncates lists, code, poems and multi-line
  inputs (emails, dialogues) -- and silently keeps the truncated text.
* ``min_new_tokens=None`` for steps 1 and 2: a minimum length makes servers ignore the
  stop strings until it is reached, so a short instruction or a short answer ("12",
  "positive") runs on into made-up extra demos (much of the reference's raw step-2
  output is such run-on text). Without it the completion ends where the LM ends it.
* type-A instances with an empty input are rejected (``empty_input``), see ``filters``.

Everything else (demo counts, decoding, thresholds, consensus rule) is the same in both.
``PipelineSettings.preset(name, **overrides)`` builds either and applies overrides; see
docs/presets.md.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Literal

from .consensus import Policy
from .seedtasks import KINDS, TaskKind
from .templates import EOS
from .types import GenerationRequest

__all__ = ["PRESETS", "Decoding", "PipelineSettings", "PresetName"]

PresetName = Literal["paper", "default"]
PRESETS: tuple[PresetName, ...] = ("default", "paper")


@dataclass(frozen=True)
class Decoding:
    """Decoding parameters of one step (``temperature == 0`` means greedy)."""

    temperature: float = 0.0
    top_k: int | None = None
    top_p: float = 1.0
    max_new_tokens: int = 256
    min_new_tokens: int | None = None
    stop: tuple[str, ...] = ()

    def request(self, prompt: str, *, seed: int | None = None) -> GenerationRequest:
        """A request for ``prompt`` with these parameters (``seed`` only when sampling)."""
        return GenerationRequest(
            prompt=prompt,
            max_new_tokens=self.max_new_tokens,
            min_new_tokens=self.min_new_tokens,
            temperature=self.temperature,
            top_p=self.top_p,
            top_k=self.top_k,
            stop=self.stop,
            seed=seed if self.temperature > 0 else None,
        )

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["stop"] = list(self.stop)
        return d


def _paper_instruction() -> Decoding:
    return Decoding(0.7, 50, 1.0, 256, 15, (EOS,))


def _paper_instance() -> Decoding:
    return Decoding(0.7, 50, 1.0, 512, 50, ("\n\n", EOS))


def _paper_answer() -> Decoding:
    return Decoding(0.0, None, 1.0, 256, None, ("\n\n", EOS))


def _default_targets() -> dict[TaskKind, int]:
    return {"input_output": 100, "output": 100}


@dataclass(frozen=True)
class PipelineSettings:
    """Everything that decides what a pipeline run generates (and how hard it pushes).

    The generation settings (demos, decoding, thresholds, quirks, seed) decide the output;
    the concurrency knobs only decide speed, except ``instruction_window``, which bounds
    how stale the pool of generated instructions seen by a step-1 prompt may be and is
    therefore part of the output's identity (attempt ``k`` sees the instructions accepted
    by attempts ``< k - instruction_window + 1``; 1 reproduces the reference's sequential
    loop).
    """

    name: PresetName = "default"
    """Which preset these settings started from (recorded in provenance)."""
    seed: int = 42
    targets: dict[TaskKind, int] = field(default_factory=_default_targets)
    """Accepted step-1 instructions to reach per task kind."""
    max_attempts_factor: int = 20
    """Give up on a kind after ``factor * target`` step-1 attempts."""
    demos: dict[TaskKind, int] = field(default_factory=lambda: {"input_output": 24, "output": 10})
    max_generated_demos: int = 4
    instruction_decoding: Decoding = field(default_factory=_paper_instruction)
    instance_decoding: Decoding = field(default_factory=_paper_instance)
    answer_decoding: Decoding = field(default_factory=_paper_answer)
    novelty_threshold: float = 0.7
    consensus_threshold: float = 0.01
    consensus_policy: Policy = "exact"
    consensus_complete: bool = True
    """Wait for every answer before deciding: the decision is the one ``exact`` makes,
    provenance lists every candidate and does not depend on arrival order. ``False``
    lets the policy decide early and cancel stragglers (less server work)."""
    consensus_deadline_s: float = 3600.0
    """Upper bound on one item's answers (and the ``deadline`` policy's deadline)."""
    first_line_only: bool = False
    keep_eos: bool = False
    reject_empty_input: bool = True
    instruction_window: int = 8
    """Step-1 attempts in flight per kind (see the class doc)."""
    instance_concurrency: int = 16
    """Step-2 requests in flight."""
    answer_concurrency: int = 16
    """Items being answered by the ensemble at once."""
    queue_size: int = 32
    """Capacity of each queue between stages."""

    def __post_init__(self) -> None:
        if self.name not in PRESETS:
            raise ValueError(f"unknown preset {self.name!r}; expected one of {PRESETS}")
        for kind in self.targets:
            if kind not in KINDS:
                raise ValueError(f"unknown task kind {kind!r} in targets")
        if any(t < 0 for t in self.targets.values()):
            raise ValueError("targets must be >= 0")
        for name in (
            "max_attempts_factor",
            "instruction_window",
            "instance_concurrency",
            "answer_concurrency",
            "queue_size",
        ):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1")
        if self.consensus_policy not in ("exact", "quorum", "deadline"):
            raise ValueError(f"unknown consensus policy {self.consensus_policy!r}")

    @classmethod
    def preset(cls, name: str = "default", **overrides: Any) -> PipelineSettings:
        """The ``paper`` or ``default`` settings with ``overrides`` applied."""
        if name == "paper":
            base = cls(name="paper", first_line_only=True, keep_eos=True, reject_empty_input=False)
        elif name == "default":
            base = cls(
                name="default",
                instruction_decoding=dataclasses.replace(_paper_instruction(), min_new_tokens=None),
                instance_decoding=dataclasses.replace(_paper_instance(), min_new_tokens=None),
            )
        else:
            raise ValueError(f"unknown preset {name!r}; expected one of {PRESETS}")
        return dataclasses.replace(base, **overrides) if overrides else base

    def target(self, kind: TaskKind) -> int:
        return self.targets.get(kind, 0)

    def identity(self) -> dict[str, Any]:
        """The settings that decide the output (recorded in provenance), JSON-ready."""
        return {
            "preset": self.name,
            "seed": self.seed,
            "demos": dict(self.demos),
            "max_generated_demos": self.max_generated_demos,
            "instruction_decoding": self.instruction_decoding.to_dict(),
            "instance_decoding": self.instance_decoding.to_dict(),
            "answer_decoding": self.answer_decoding.to_dict(),
            "novelty_threshold": self.novelty_threshold,
            "consensus_threshold": self.consensus_threshold,
            "consensus_policy": self.consensus_policy,
            "first_line_only": self.first_line_only,
            "keep_eos": self.keep_eos,
            "reject_empty_input": self.reject_empty_input,
            "instruction_window": self.instruction_window,
        }

    def to_dict(self) -> dict[str, Any]:
        d = self.identity()
        d.update(
            targets=dict(self.targets),
            max_attempts_factor=self.max_attempts_factor,
            consensus_complete=self.consensus_complete,
            consensus_deadline_s=self.consensus_deadline_s,
            instance_concurrency=self.instance_concurrency,
            answer_concurrency=self.answer_concurrency,
            queue_size=self.queue_size,
        )
        return d
