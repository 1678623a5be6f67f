"""Step-1 instruction filters and the step-3 validity parser."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ensemble_async import filters
from ensemble_async.filters import (
    BLACKLIST,
    ParsedInstance,
    Rejection,
    clean_instruction,
    extract_instruction,
    instruction_reject_reason,
    parse_instance,
    split_completion,
)
from ensemble_async.seedtasks import TaskKind

REFERENCE = (
    Path(__file__).resolve().parents[1].parent / "shared" / "reference" / "ensemble-instruct"
)


def _jsonl(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line]


# -- step 1 ---------------------------------------------------------------------------


def test_split_on_numbered_lines_and_collapse_whitespace() -> None:
    text = " Sort  the\tnumbers in the list.\n5. Name a  color please now\n6 . Third one here ok"
    assert split_completion(text) == [
        "Sort the numbers in the list.",
        "Name a color please now",
        "Third one here ok",
    ]


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        ("Sort three numbers", "too_short"),
        ("Sort these four numbers", None),
        (" ".join(["word"] * 150), None),
        (" ".join(["word"] * 151), "too_long"),
        ("Describe the IMAGE in detail please", "blacklisted:image"),
        ("Describe the images in detail please", "blacklisted:images"),
        ("Plot the data points for me", "blacklisted:plot"),
        ("Tell me how to Go To the station", "blacklisted:go to"),
        ("Explain how a mapping function works", None),  # whole words only
        ("Write a program that adds two numbers", "starts_with_write_a_program"),
        ("write a program that adds two numbers", None),  # the reference is case-sensitive
        ('"Quote" this sentence back to me', "bad_first_char"),
        ("¿Qué hora es ahora mismo amigo?", "bad_first_char"),
        ("Éclair recipes for a small party", "bad_first_char"),
        ("Summarize the article in two sentences.", None),
    ],
)
def test_instruction_rules(text: str, reason: str | None) -> None:
    assert instruction_reject_reason(text) == reason


def test_every_blacklisted_word_is_caught_as_a_whole_word() -> None:
    for word in BLACKLIST:
        assert instruction_reject_reason(f"Please use the {word} for this task") == (
            f"blacklisted:{word}"
        )
        assert instruction_reject_reason(f"Please use the x{word}x for this task") is None


def test_extract_takes_only_the_first_instruction_and_strips_eos_by_default() -> None:
    got = extract_instruction(" Sort the list of numbers. |EoS|\n7. Another task entirely here")
    assert got == "Sort the list of numbers."


def test_extract_paper_mode_keeps_eos_whatever_the_server_did() -> None:
    with_stop = extract_instruction(" Sort the list of numbers. |EoS|", keep_eos=True)
    without = extract_instruction(" Sort the list of numbers.", keep_eos=True, stopped=True)
    assert with_stop == without == "Sort the list of numbers. |EoS|"
    truncated = extract_instruction(" Sort the list of numbers", keep_eos=True, stopped=False)
    assert truncated == "Sort the list of numbers"


def test_paper_mode_eos_counts_as_a_word() -> None:
    # 3 real words: rejected by default, accepted in paper mode as in the reference.
    assert extract_instruction(" Design a logo. |EoS|") == Rejection("too_short", "Design a logo.")
    assert extract_instruction(" Design a logo. |EoS|", keep_eos=True) == "Design a logo. |EoS|"


def test_extract_reports_reasons() -> None:
    assert extract_instruction("   |EoS|") == Rejection("empty")
    got = extract_instruction(" Draw a cat on the screen |EoS|")
    assert isinstance(got, Rejection)
    assert got.reason == "blacklisted:draw"


@pytest.mark.skipif(not REFERENCE.is_dir(), reason="../shared reference data absent")
@pytest.mark.parametrize("prefix", ["io", "o"])
def test_reference_instructions_pass_paper_extraction_unchanged(prefix: str) -> None:
    """Every stored reference instruction is what paper-mode extraction keeps."""
    for entry in _jsonl(REFERENCE / f"{prefix}_instructions.jsonl"):
        stored = entry["instruction"]
        assert stored.endswith(" |EoS|")
        assert extract_instruction(" " + stored, keep_eos=True) == stored


# -- step 3 ---------------------------------------------------------------------------


@pytest.mark.skipif(not REFERENCE.is_dir(), reason="../shared reference data absent")
@pytest.mark.parametrize(("prefix", "kind"), [("io", "input_output"), ("o", "output")])
def test_paper_parser_reproduces_reference_samples(prefix: str, kind: TaskKind) -> None:
    raw = _jsonl(REFERENCE / f"{prefix}_instances.raw.jsonl")
    expected = _jsonl(REFERENCE / f"{prefix}_samples.parsed.jsonl")
    got = []
    for entry in raw:
        parsed = parse_instance(kind, entry["raw_instances"], first_line_only=True)
        if isinstance(parsed, ParsedInstance):
            got.append(
                {
                    "instruction": clean_instruction(entry["instruction"]),
                    "input": parsed.input,
                    "output": parsed.output,
                }
            )
    assert got == expected
    assert len(got) < len(raw)  # the reference really drops some


@pytest.mark.parametrize(
    ("kind", "text", "first_line", "expected"),
    [
        ("input_output", "input: 2, 3\noutput: 5\n|EoS|", True, ParsedInstance("2, 3", "5")),
        ("input_output", "input: 2, 3\noutput: 5\n|EoS|", False, ParsedInstance("2, 3", "5")),
        ("output", "output: Tokyo |EoS|", True, ParsedInstance("", "Tokyo")),
        ("output", "output: Tokyo\n|EoS|", False, ParsedInstance("", "Tokyo")),
        # multi-line fields: paper keeps the first line, the default keeps them all
        (
            "input_output",
            "input: line one\nline two\noutput: a\nb\n|EoS|",
            True,
            Rejection("no_output_label"),
        ),
        (
            "input_output",
            "input: line one\nline two\noutput: a\nb\n|EoS|",
            False,
            ParsedInstance("line one\nline two", "a\nb"),
        ),
        ("output", "output: a\nb\n|EoS|", True, ParsedInstance("", "a")),
        ("output", "output: a\nb\n|EoS|", False, ParsedInstance("", "a\nb")),
        # the default stops at a blank line or at the start of another demo
        ("output", "output: a\n\nnot this", False, ParsedInstance("", "a")),
        ("output", "output: a\ninstruction: next\noutput: b", False, ParsedInstance("", "a")),
        # missing or unexpected labels
        ("input_output", "output: 5\n|EoS|", True, Rejection("no_input_label")),
        ("input_output", "output: 5\n|EoS|", False, Rejection("no_input_label")),
        ("input_output", "input: 2\nthe answer is 5", False, Rejection("no_output_label")),
        ("output", "input: x\noutput: y", True, Rejection("unexpected_input")),
        ("output", "input: x\noutput: y", False, Rejection("unexpected_input")),
        ("output", "Tokyo", False, Rejection("no_output_label")),
        ("output", "output: |EoS|", True, Rejection("empty_output")),
        ("output", "output:   \n|EoS|", False, Rejection("empty_output")),
        ("output", "", False, Rejection("empty")),
        ("output", "\n\n", True, Rejection("empty")),
    ],
)
def test_parse_instance(
    kind: TaskKind, text: str, first_line: bool, expected: ParsedInstance | Rejection
) -> None:
    got = parse_instance(kind, text, first_line_only=first_line)
    if isinstance(expected, Rejection):
        assert isinstance(got, Rejection)
        assert got.reason == expected.reason
    else:
        assert got == expected


def test_empty_input_is_rejected_only_when_asked() -> None:
    text = "input:\noutput: 5"
    assert parse_instance("input_output", text) == ParsedInstance("", "5")
    got = parse_instance("input_output", text, reject_empty_input=True)
    assert isinstance(got, Rejection)
    assert got.reason == "empty_input"


def test_clean_instruction_removes_every_eos() -> None:
    assert clean_instruction("Write a letter. |EoS| |EoS|") == "Write a letter."


def test_unknown_kind_is_an_error() -> None:
    with pytest.raises(ValueError, match="unknown task kind"):
        parse_instance("other", "output: x")  # type: ignore[arg-type]


@settings(max_examples=500, deadline=None)
@given(
    words=st.lists(
        st.sampled_from([*filters.BLACKLIST, "Imagine", "graphic", "flowchart", "a", "x", "Files"]),
        min_size=4,
        max_size=12,
    )
)
def test_the_blacklist_prefilter_changes_no_decision(words: list[str]) -> None:
    """One combined search decides whether any word is there; the word reported is the
    first in BLACKLIST's order that matches, as one search per word finds."""
    text = "Describe " + " ".join(words)
    expected = next(
        (f"blacklisted:{w}" for w, pattern in filters._BLACKLIST_RE if pattern.search(text)),
        None,
    )
    reason = filters.instruction_reject_reason(text)
    if expected is not None:
        assert reason == expected
    else:
        assert reason is None or not reason.startswith("blacklisted:")
