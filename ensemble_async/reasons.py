"""The meaning of every reject reason and consensus rule a run can write.

One catalogue, read by the report (its glossary) and mirrored by ``docs/reasons.md``
(a test checks that the page lists every entry and that every reason the filters and the
consensus step can produce has an entry).  The filters, the pipeline and the consensus
step decide; this module only explains their words.

A reason is looked up with :func:`describe`: exact names first, then the families
``blacklisted:<word>`` and ``backend_error:<ErrorClass>``.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["REASONS", "RULES", "Meaning", "anchor", "describe"]


@dataclass(frozen=True)
class Meaning:
    """What a reason or rule means: the stage that writes it and one sentence."""

    name: str
    stages: tuple[str, ...]
    text: str


def _m(name: str, stages: tuple[str, ...], text: str) -> Meaning:
    return Meaning(name, stages, text)


_I = ("instructions",)
_S = ("instances",)
_C = ("consensus",)

REASONS: dict[str, Meaning] = {
    m.name: m
    for m in (
        _m(
            "empty",
            ("instructions", "instances", "consensus"),
            "Nothing usable was left: an instruction completion with no text before "
            "|EoS|, an instance completion with nothing before its cut, or (consensus) "
            "the medoid winner is empty after normalising.",
        ),
        _m("too_short", _I, "The instruction has 3 words or fewer."),
        _m("too_long", _I, "The instruction has more than 150 words."),
        _m(
            "blacklisted:<word>",
            _I,
            "The instruction contains a word a text model cannot act on (image(s), "
            "graph(s), picture(s), file(s), map(s), draw, plot, go to; whole word, any case).",
        ),
        _m(
            "starts_with_write_a_program",
            _I,
            "The instruction starts with 'Write a program' (Self-Instruct drops these).",
        ),
        _m(
            "bad_first_char",
            _I,
            "The instruction starts with a punctuation mark or a non-ASCII character.",
        ),
        _m(
            "not_novel",
            _I,
            "The instruction's highest ROUGE-L against the seed tasks and the instructions "
            "already accepted for its type is above the novelty threshold (0.7 by default).",
        ),
        _m(
            "no_input_label",
            _S,
            "A type-A (input-output) instance completion has no 'input:' label where one "
            "is needed.",
        ),
        _m(
            "no_output_label",
            _S,
            "The instance completion has no 'output:' label (after its input, for type A).",
        ),
        _m(
            "unexpected_input",
            _S,
            "A type-B (output-only) instance completion carries an 'input:' label.",
        ),
        _m("empty_output", _S, "The instance's output is empty."),
        _m(
            "empty_input",
            _S,
            "A type-A instance has an empty input (default preset only; the paper preset keeps it).",
        ),
        _m(
            "backend_error:<ErrorClass>",
            ("instructions", "instances"),
            "The writer's request failed for good (after its retries); the class names "
            "the error, e.g. ServerError, RequestTimeoutError, ConnectError, "
            "RateLimitedError, OverloadedError, MalformedResponseError, BadRequestError, "
            "ContextLengthError, AuthenticationError, NotFoundError, CircuitOpenError.",
        ),
        _m(
            "below-threshold",
            _C,
            "No shortcut applied and the lowest pairwise ROUGE-L among the candidates is "
            "not above the consensus threshold (tau, 0.01 by default): the models disagree.",
        ),
        _m("none", _C, "No candidate arrived at all (every answerer failed)."),
        _m(
            "too-few-candidates",
            _C,
            "Not decided: fewer candidates answered than the decision needs "
            "(min_candidates, by default every voice) because a member was unavailable "
            "(retries spent, breaker open). The pipeline defers such items to the next run "
            "instead of rejecting them; the library reports it with deferred = true.",
        ),
        _m(
            "no-scores",
            _C,
            "Target fit: no candidate could be scored under the target model (all failed "
            "or empty), so none was kept.",
        ),
        _m(
            "target-unavailable",
            _C,
            "Target fit: the target model could not be reached to score the candidates "
            "(retries spent, breaker open); the item is deferred, never decided without it.",
        ),
        _m(
            "scoring-failed",
            _C,
            "Target fit: the target model refused the scoring request for this item (for "
            "example a prompt longer than its context).",
        ),
    )
}
"""Reject reasons, by name (families written with a ``<placeholder>``)."""

RULES: dict[str, Meaning] = {
    m.name: m
    for m in (
        _m(
            "shortcut-first",
            _C,
            "Kept: candidate 0 (the writer's own step-2 output) equals another candidate "
            "after normalising (lowercase, no punctuation, collapsed spaces).",
        ),
        _m(
            "shortcut-pair",
            _C,
            "Kept: the lowest-index candidate that equals a later one after normalising.",
        ),
        _m(
            "medoid",
            _C,
            "Kept: the candidate with the highest sum of ROUGE-L against the others, "
            "every pairwise score being above the threshold.",
        ),
        _m("single", _C, "Kept: only one candidate arrived and it is not empty."),
        _m(
            "quorum",
            _C,
            "Kept early (quorum policy): enough arrived candidates agreed with it.",
        ),
        _m(
            "target-fit",
            _C,
            "Kept (selection policy target-fit): the candidate with the highest "
            "length-normalised log-likelihood under the target model.",
        ),
        _m(
            "consensus+target-fit",
            _C,
            "Kept (selection policy consensus+target-fit): consensus kept the item, and of "
            "the candidates agreeing with its pick above the threshold the target model "
            "found this one most likely.",
        ),
    )
}
"""Consensus decision rules that keep a record (the discarding rules are in REASONS)."""


def _family(reason: str) -> str:
    for prefix in ("blacklisted:", "backend_error:"):
        if reason.startswith(prefix):
            return prefix + ("<word>" if prefix == "blacklisted:" else "<ErrorClass>")
    return reason


def describe(name: str) -> Meaning | None:
    """The meaning of a reject reason or rule, or None when it is not catalogued."""
    key = _family(name)
    return REASONS.get(key) or RULES.get(key)


def anchor(name: str) -> str:
    """The anchor of ``name`` in docs/reasons.md (and in the report's glossary)."""
    key = _family(name)
    return "".join(ch if ch.isalnum() else "-" for ch in key.lower()).strip("-")
