"""Prompt templates for Ensemble-Instruct steps 1 (instructions) and 2 (instances)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from ensemble_async.seedtasks import KINDS, TaskKind, load_seed_tasks
from ensemble_async.templates import (
    EOS,
    INPUT_OUTPUT_DEMOS,
    INPUT_OUTPUT_HEADER,
    INSTRUCTION_HEADER,
    OUTPUT_DEMOS,
    OUTPUT_HEADER,
    InstanceDemo,
    build_instance_prompt,
    build_instruction_prompt,
    clean_demo_instruction,
    instance_template,
    strip_eos,
)

LABELS = ("instruction:", "input:", "output:")

# ----------------------------------------------------------------------------- step 1


def test_instruction_prompt_layout() -> None:
    demos = ["Add the two numbers.", "Name a fruit that is yellow.", "Explain how tides work."]
    prompt = build_instruction_prompt(demos)
    lines = prompt.split("\n")
    assert lines[0] == INSTRUCTION_HEADER
    assert lines[1:-1] == [f"{k}. {d} {EOS}" for k, d in enumerate(demos, start=1)]
    assert lines[-1] == "4."
    assert prompt.endswith("\n4.")  # no trailing space or newline: the LM writes " <text>"


def test_instruction_prompt_numbers_every_demo_with_one_marker() -> None:
    demos = [f"Task number {i} asks for something." for i in range(24)]
    prompt = build_instruction_prompt(demos)
    body = prompt.split("\n")[1:]
    assert len(body) == 25
    for k, line in enumerate(body[:-1], start=1):
        assert re.fullmatch(rf"{k}\. Task number {k - 1} asks for something\. \|EoS\|", line)
        assert line.count(EOS) == 1
    assert body[-1] == "25."


def test_instruction_prompt_without_demos() -> None:
    assert build_instruction_prompt([]) == f"{INSTRUCTION_HEADER}\n1."


def test_demo_cleaning_keeps_one_demo_per_line() -> None:
    prompt = build_instruction_prompt(
        ["Question: in which year\n did it end?\nAnswer:", "Summarize the email below:  "]
    )
    assert prompt.split("\n")[1:] == [
        f"1. Question: in which year did it end? Answer {EOS}",
        f"2. Summarize the email below {EOS}",
        "3.",
    ]


def test_stored_eos_markers_are_dropped_by_default_and_kept_on_request() -> None:
    demos = ["Give me a word. |EoS|", "Name a city.|EoS| |EoS|  ", "Plain one here."]
    default = build_instruction_prompt(demos)
    assert default.split("\n")[1:4] == [
        f"1. Give me a word. {EOS}",
        f"2. Name a city. {EOS}",
        f"3. Plain one here. {EOS}",
    ]
    exact = build_instruction_prompt(demos, drop_eos=False)
    assert exact.split("\n")[1] == f"1. Give me a word. {EOS} {EOS}"
    assert exact.split("\n")[3] == f"3. Plain one here. {EOS}"


def test_strip_eos_and_clean_demo_instruction() -> None:
    assert strip_eos("Do it. |EoS|") == "Do it."
    assert strip_eos("Do it.|EoS|\n|EoS| ") == "Do it."
    assert strip_eos("|EoS| in the middle |EoS| stays?") == "|EoS| in the middle |EoS| stays?"
    assert clean_demo_instruction("  a\tb\n\nc:: ") == "a b c"
    assert clean_demo_instruction("x: |EoS|", drop_eos=False) == "x: |EoS|"


def test_custom_header_and_empty_demo() -> None:
    assert build_instruction_prompt(["One two three four."], header="H").startswith("H\n1. ")
    with pytest.raises(ValueError, match="demo 2 is empty"):
        build_instruction_prompt(["Fine demo here.", " \n |EoS| "])


def test_instruction_prompt_is_deterministic() -> None:
    demos = [t.instruction for t in load_seed_tasks()[:24]]
    assert build_instruction_prompt(demos) == build_instruction_prompt(list(demos))
    assert build_instruction_prompt(demos) != build_instruction_prompt(demos[::-1])


def test_shipped_seeds_make_a_clean_prompt() -> None:
    demos = [t.instruction for t in load_seed_tasks()]
    lines = build_instruction_prompt(demos).split("\n")
    assert len(lines) == len(demos) + 2
    assert all(line.endswith(f" {EOS}") and line.count(EOS) == 1 for line in lines[1:-1])


def _reference_instruction_files(shared_dir: Path) -> list[Path]:
    files = sorted((shared_dir / "reference" / "ensemble-instruct").glob("*_instructions.jsonl"))
    if not files:
        pytest.skip("reference instruction files not present")
    return files


def test_reference_step1_prompts_are_reproduced_exactly(shared_dir: Path) -> None:
    """With the reference header and ``drop_eos=False`` the builder rebuilds every stored
    reference prompt byte for byte from the raw seed / generated instructions."""
    seeds = [
        t.instruction
        for t in load_seed_tasks(shared_dir / "reference/self-instruct/seed_tasks.jsonl")
    ]
    checked = 0
    for path in _reference_instruction_files(shared_dir):
        records = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]
        raw_by_clean: dict[str, str] = {}
        for raw in seeds + [r["instruction"] for r in records]:
            raw_by_clean.setdefault(clean_demo_instruction(raw, drop_eos=False), raw)
        for record in records:
            prompt: str = record["metadata"]["prompt"]
            header, *demo_lines, last = prompt.split("\n")
            demos = []
            for line in demo_lines:
                shown = re.sub(r"^\d+\. ", "", line).removesuffix(f" {EOS}")
                demos.append(raw_by_clean[shown])
            assert last == f"{len(demos) + 1}."
            assert build_instruction_prompt(demos, header=header, drop_eos=False) == prompt
            # The default drops the stored markers: one per line.
            default = build_instruction_prompt(demos, header=header)
            assert all(line.count(EOS) == 1 for line in default.split("\n")[1:-1])
            checked += 1
    assert checked > 100


# ----------------------------------------------------------------------------- step 2


def test_demo_counts() -> None:
    assert len(OUTPUT_DEMOS) == 15
    assert len(INPUT_OUTPUT_DEMOS) == 19
    assert all(d.input is None for d in OUTPUT_DEMOS)
    assert all(d.input for d in INPUT_OUTPUT_DEMOS)


@pytest.mark.parametrize(
    ("kind", "header", "n_demos", "labels"),
    [
        ("output", OUTPUT_HEADER, 15, ("instruction", "output")),
        ("input_output", INPUT_OUTPUT_HEADER, 19, ("instruction", "input", "output")),
    ],
)
def test_instance_template_structure(
    kind: TaskKind, header: str, n_demos: int, labels: tuple[str, ...]
) -> None:
    template = instance_template(kind)
    blocks = template.split("\n\n")
    assert blocks[0] == header
    assert blocks[-1] == ""  # the template ends with a blank line
    demos = blocks[1:-1]
    assert len(demos) == n_demos
    assert template.count(EOS) == n_demos
    for block in demos:
        assert block.endswith(f"\n{EOS}")
        starts = [line.split(":", 1)[0] for line in block.split("\n") if line.startswith(LABELS)]
        assert tuple(starts) == labels, block


@pytest.mark.parametrize(
    "demo", OUTPUT_DEMOS + INPUT_OUTPUT_DEMOS, ids=lambda d: d.instruction[:30]
)
def test_demo_fields_cannot_confuse_the_parser(demo: InstanceDemo) -> None:
    fields = [demo.instruction, demo.output] + ([demo.input] if demo.input is not None else [])
    for text in fields:
        assert text == text.strip() and text
        assert "\n\n" not in text  # step 2 stops on a blank line
        assert EOS not in text
        assert not any(line.startswith(LABELS) for line in text.split("\n"))
    assert "\n" not in demo.instruction


@pytest.mark.parametrize("kind", KINDS)
def test_instance_prompt_ends_with_the_instruction(kind: TaskKind) -> None:
    prompt = build_instance_prompt(kind, "  Name three rivers in Africa.  ")
    assert prompt == instance_template(kind) + "instruction: Name three rivers in Africa.\n"
    assert prompt.endswith("\n\ninstruction: Name three rivers in Africa.\n")
    assert build_instance_prompt(kind, "Name three rivers in Africa.") == prompt


@pytest.mark.parametrize("kind", KINDS)
def test_instance_prompt_eos_handling(kind: TaskKind) -> None:
    assert build_instance_prompt(kind, "Do the task. |EoS|").endswith(
        "\ninstruction: Do the task.\n"
    )
    kept = build_instance_prompt(kind, "Do the task. |EoS|", drop_eos=False)
    assert kept.endswith("\ninstruction: Do the task. |EoS|\n")
    with pytest.raises(ValueError, match="empty"):
        build_instance_prompt(kind, " |EoS| ")


def test_instance_prompts_differ_by_kind_and_are_deterministic() -> None:
    a = build_instance_prompt("input_output", "Sort the words.")
    b = build_instance_prompt("output", "Sort the words.")
    assert a != b
    assert a == build_instance_prompt("input_output", "Sort the words.")
    assert "\ninput: " in a and "\ninput: " not in b
    with pytest.raises(ValueError, match="unknown task kind"):
        build_instance_prompt("neither", "Sort the words.")  # type: ignore[arg-type]


@pytest.mark.parametrize(("stem", "kind"), [("io", "input_output"), ("o", "output")])
def test_demo_blocks_match_what_reference_completions_look_like(
    shared_dir: Path, stem: str, kind: TaskKind
) -> None:
    """The reference LM continued ``instruction: <text>\\n`` with ``input:`` (type A) or
    ``output:`` (type B); our demos teach the same continuation."""
    path = shared_dir / "reference" / "ensemble-instruct" / f"{stem}_instances.raw.jsonl"
    if not path.is_file():
        pytest.skip("reference raw completions not present")
    label = "input:" if kind == "input_output" else "output:"
    raws = [
        json.loads(line)["raw_instances"] for line in path.read_text(encoding="utf-8").splitlines()
    ]
    share = sum(r.startswith(label) for r in raws) / len(raws)
    assert share > 0.8
    for block in instance_template(kind).split("\n\n")[1:-1]:
        assert block.split("\n", 1)[1].startswith(label + " ")
