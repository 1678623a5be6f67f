"""Ensemble-Instruct text filters: step 1 (instruction extraction and filtering) and
step 3 (validity of a step-2 instance completion).

Step 1. :func:`extract_instruction` takes one step-1 completion and returns at most one
new instruction, or the reason it has none:

* the completion is cut at its first ``|EoS|`` (the stop string; some servers leave it in
  the text, others remove it), then split on ``\\n<number>. `` and only the first piece is
  kept (at most one instruction per completion), white space runs collapse to one space;
* :func:`instruction_reject_reason` applies Self-Instruct's rules: ``too_short`` (<= 3
  words), ``too_long`` (> 150 words), ``blacklisted:<word>`` (whole-word, case-insensitive
  image(s), graph(s), picture(s), file(s), map(s), draw, plot, "go to"),
  ``starts_with_write_a_program``, ``bad_first_char`` (punctuation or non-ASCII).
* ``keep_eos=True`` (the paper preset) reproduces the reference code, which stored the
  completion *with* its trailing ``|EoS|``: the marker then counts as a word in the length
  rule and takes part in the novelty check, exactly as in the reference's
  ``*_instructions.jsonl``. When the server removed the stop string, `` |EoS|`` is put
  back so the stored text is the same whatever the server.

Step 3. :func:`parse_instance` checks one step-2 completion for a task kind and returns
a :class:`ParsedInstance` or a :class:`Rejection` with a reason (``no_input_label``,
``no_output_label``, ``unexpected_input``, ``empty_output``, ``empty_input``, ``empty``).

* ``first_line_only=True`` (paper preset) reproduces the reference parser: the completion
  is stripped, cut at its first blank line (and, a quirk kept on purpose, at any ``^``
  character), the first line must carry ``input:`` (type A) and the second ``output:``;
  for type B the first line must carry ``output:`` and no ``input:``. Only those lines
  are kept, labels and ``|EoS|`` removed. On the reference data this turns
  ``*_instances.raw.jsonl`` into exactly ``*_samples.parsed.jsonl``. (The reference also
  harvests extra instances from later blank-line separated chunks whose *first* line
  carries a label next to ``instruction:``; that never happens in its own data and would
  let instructions bypass the novelty filter, so it is not reproduced.)
* ``first_line_only=False`` (default preset) keeps multi-line fields: the completion is
  cut at the first ``|EoS|``, blank line or line starting with ``instruction:`` (the LM
  starting another demo), then ``input:``/``output:`` labels at the start of a line
  (any case) delimit the fields.
* ``reject_empty_input=True`` (default preset) rejects a type-A instance whose input is
  empty (``empty_input``): the task needs an input and has none.
"""

from __future__ import annotations

import re
import string
from dataclasses import dataclass

from .seedtasks import TaskKind
from .templates import EOS

__all__ = [
    "BLACKLIST",
    "ParsedInstance",
    "Rejection",
    "clean_instruction",
    "extract_instruction",
    "instruction_reject_reason",
    "parse_instance",
    "record_instruction",
    "split_completion",
]

BLACKLIST: tuple[str, ...] = (
    "image",
    "images",
    "graph",
    "graphs",
    "picture",
    "pictures",
    "file",
    "files",
    "map",
    "maps",
    "draw",
    "plot",
    "go to",
)
"""Words an LM cannot act on; an instruction containing one (whole word, any case) is dropped."""

MIN_WORDS = 3
"""An instruction needs more than this many words."""
MAX_WORDS = 150
"""An instruction may have at most this many words."""

_NUMBERED = re.compile(r"\n\d+\s?\. ")
_WS = re.compile(r"\s+")
_BLACKLIST_RE = tuple(
    (word, re.compile(r"\b(" + re.escape(word) + r")\b", re.IGNORECASE)) for word in BLACKLIST
)
_ANY_BLACKLISTED = re.compile(
    r"\b(?:" + "|".join(re.escape(word) for word in BLACKLIST) + r")\b", re.IGNORECASE
)
"""Whether any blacklisted word occurs: one search instead of one per word, for the
common case of none (which word is reported still follows ``BLACKLIST``'s order)."""
_PUNCT = frozenset(string.punctuation)


@dataclass(frozen=True, slots=True)
class Rejection:
    """Why a text was dropped (``reason``), with an optional human-readable detail."""

    reason: str
    detail: str = ""


@dataclass(frozen=True, slots=True)
class ParsedInstance:
    """A valid step-2 instance: ``input`` is ``""`` for type B."""

    input: str
    output: str


# -- step 1 ---------------------------------------------------------------------------


def split_completion(text: str) -> list[str]:
    """The pieces of a step-1 completion, as the reference splits it (whitespace-collapsed,
    empty pieces dropped)."""
    pieces = (_WS.sub(" ", p).strip() for p in _NUMBERED.split(text))
    return [p for p in pieces if p]


def instruction_reject_reason(instruction: str) -> str | None:
    """The Self-Instruct filter rule ``instruction`` breaks, or ``None`` when it passes.

    ``instruction`` is expected whitespace-collapsed (see :func:`split_completion`).
    """
    words = instruction.split()
    if len(words) <= MIN_WORDS:
        return "too_short"
    if len(words) > MAX_WORDS:
        return "too_long"
    if _ANY_BLACKLISTED.search(instruction) is not None:
        for word, pattern in _BLACKLIST_RE:
            if pattern.search(instruction):
                return f"blacklisted:{word}"
    if instruction.startswith("Write a program"):
        return "starts_with_write_a_program"
    first = instruction[0]
    if first in _PUNCT or not first.isascii():
        return "bad_first_char"
    return None


def extract_instruction(
    completion: str, *, keep_eos: bool = False, stopped: bool = True
) -> str | Rejection:
    """At most one new instruction from one step-1 completion, or why there is none.

    ``stopped``: the server ended the completion on the stop string (finish reason
    ``stop``); with ``keep_eos`` and a completion that does not end with ``|EoS|`` (the
    server removed it), the marker is put back.
    """
    if keep_eos:
        text = completion
        if stopped and not text.rstrip().endswith(EOS):
            text = text.rstrip() + " " + EOS
    else:
        cut = completion.find(EOS)
        text = completion if cut < 0 else completion[:cut]
    pieces = split_completion(text)
    if not pieces:
        return Rejection("empty")
    if keep_eos:
        first = pieces[0]
        # Keep the text up to and including the last |EoS| of the first piece, as the
        # reference (whose server stopped on the first |EoS| after min_new_tokens) did.
        end = first.rfind(EOS)
        candidate = first[: end + len(EOS)] if end >= 0 else first
    else:
        candidate = pieces[0]
    reason = instruction_reject_reason(candidate)
    if reason is not None:
        return Rejection(reason, candidate)
    return candidate


def clean_instruction(instruction: str) -> str:
    """An instruction as stored in a record: every ``|EoS|`` removed, ends stripped (what
    the reference parser does to the instruction field)."""
    return instruction.replace(EOS, "").strip()


record_instruction = clean_instruction


# -- step 3 ---------------------------------------------------------------------------


def _strip_label(line: str, label: str) -> str:
    return line.strip().replace(label, "").strip().replace(EOS, "").strip()


def _parse_first_line(kind: TaskKind, completion: str) -> ParsedInstance | Rejection:
    chunk = completion.strip().replace("\n\n", "^").split("^")[0]
    lines = chunk.splitlines()
    if not lines:
        return Rejection("empty")
    first = lines[0]
    if "input:" in first:
        if kind == "output":
            return Rejection("unexpected_input", first)
        if len(lines) < 2 or "output:" not in lines[1]:
            return Rejection("no_output_label", chunk[:200])
        output = _strip_label(lines[1], "output:")
        if not output.split():
            return Rejection("empty_output")
        return ParsedInstance(_strip_label(first, "input:"), output)
    if "output:" in first:
        if kind == "input_output":
            return Rejection("no_input_label", first)
        output = _strip_label(first, "output:")
        if not output.split():
            return Rejection("empty_output")
        return ParsedInstance("", output)
    reason = "no_input_label" if kind == "input_output" else "no_output_label"
    return Rejection(reason, first[:200])


_BLANK_LINE = re.compile(r"\n[ \t]*\n")
_NEXT_DEMO = re.compile(r"^[ \t]*instruction:", re.IGNORECASE | re.MULTILINE)
_INPUT = re.compile(r"^[ \t]*input:", re.IGNORECASE | re.MULTILINE)
_OUTPUT = re.compile(r"^[ \t]*output:", re.IGNORECASE | re.MULTILINE)


def _parse_multiline(kind: TaskKind, completion: str) -> ParsedInstance | Rejection:
    text = completion
    cut = text.find(EOS)
    if cut >= 0:
        text = text[:cut]
    text = text.strip("\n")
    for pattern in (_BLANK_LINE, _NEXT_DEMO):
        m = pattern.search(text)
        if m is not None:
            text = text[: m.start()]
    if not text.strip():
        return Rejection("empty")
    out = _OUTPUT.search(text)
    inp = _INPUT.search(text)
    if kind == "output":
        if inp is not None and (out is None or inp.start() < out.start()):
            return Rejection("unexpected_input", text[:200])
        if out is None:
            return Rejection("no_output_label", text[:200])
        output = text[out.end() :].strip()
        if not output:
            return Rejection("empty_output")
        return ParsedInstance("", output)
    if inp is None:
        return Rejection("no_input_label", text[:200])
    out = _OUTPUT.search(text, inp.end())
    if out is None:
        return Rejection("no_output_label", text[:200])
    input_ = text[inp.end() : out.start()].strip()
    output = text[out.end() :].strip()
    if not output:
        return Rejection("empty_output")
    return ParsedInstance(input_, output)


def parse_instance(
    kind: TaskKind,
    completion: str,
    *,
    first_line_only: bool = False,
    reject_empty_input: bool = False,
) -> ParsedInstance | Rejection:
    """Step 3: the instance in a step-2 ``completion`` for a task of ``kind``, or why not.

    See the module doc for the two modes. ``reject_empty_input``: a type-A instance whose
    input is empty is rejected (``empty_input``); the reference keeps it.
    """
    if kind not in ("input_output", "output"):
        raise ValueError(f"unknown task kind {kind!r}")
    if first_line_only:
        result = _parse_first_line(kind, completion)
    else:
        result = _parse_multiline(kind, completion)
    if (
        reject_empty_input
        and kind == "input_output"
        and isinstance(result, ParsedInstance)
        and not result.input
    ):
        return Rejection("empty_input")
    return result
