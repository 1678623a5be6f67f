"""The project's own prompt templates for Ensemble-Instruct steps 1 and 2.

Step 1 (instruction generation) shows the LM a numbered list of task instructions, each
closed by :data:`EOS`, and leaves the next number open::

    List a series of diverse tasks, one per line:
    1. <instruction> |EoS|
    2. <instruction> |EoS|
    3.

The LM continues after ``"3."`` with one new instruction and stops at ``|EoS|``.

Step 2 (instance generation) is a fixed template per task kind -- a header and fixed
demos separated by blank lines -- followed by ``"instruction: <text>\\n"``. The LM
continues with ``"input: ...\\noutput: ...\\n|EoS|"`` for kind ``"input_output"`` (type A)
or ``"output: ...\\n|EoS|"`` for kind ``"output"`` (type B). No demo field contains a
blank line, because step 2 stops generation at ``"\\n\\n"``.

Step 4 (answering) sends an instruction-tuned LM the zero-shot prompt
``instruction + "\n" + input`` (:func:`build_answer_prompt`). An LM that is not
instruction-tuned gets a few-shot prompt instead (:func:`build_fewshot_answer_prompt`):
a header, a handful of fixed demos of the item's kind rendered like step-2 demos, then
the item's ``instruction:`` (and ``input:``) lines and an open ``output:``, so that the
LM continues with just the answer and stops at ``|EoS|`` (or ``"\n\n"``).

The wording of the headers and every demo were written for this project.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal, TypeAlias

from .seedtasks import TaskKind

PromptStyle: TypeAlias = Literal["zero_shot", "few_shot"]
"""How a step-4 answer prompt is built: bare (instruction-tuned LM) or with demos."""

__all__ = [
    "ANSWER_DEMOS",
    "ANSWER_HEADER",
    "EOS",
    "INPUT_OUTPUT_DEMOS",
    "INPUT_OUTPUT_HEADER",
    "INSTRUCTION_HEADER",
    "OUTPUT_DEMOS",
    "OUTPUT_HEADER",
    "InstanceDemo",
    "PromptStyle",
    "build_answer_prompt",
    "build_fewshot_answer_prompt",
    "build_instance_prompt",
    "build_instruction_prompt",
    "build_step4_prompt",
    "clean_demo_instruction",
    "instance_template",
    "strip_eos",
]

EOS = "|EoS|"
"""End-of-sample marker closing every demo; generation stops on it."""

INSTRUCTION_HEADER = "List a series of diverse tasks, one per line:"
"""First line of the step-1 prompt."""

OUTPUT_HEADER = (
    "Each instruction below can be carried out without any extra input. "
    "For each one, write only the output that fulfils it."
)
"""Header of the step-2 template for kind ``"output"`` (type B)."""

INPUT_OUTPUT_HEADER = (
    "Each instruction below needs an input to work on. "
    "For each one, first write a suitable input, then the correct output for that input."
)
"""Header of the step-2 template for kind ``"input_output"`` (type A)."""

_WS = re.compile(r"\s+")
_TRAILING_EOS = re.compile(r"(?:\s*" + re.escape(EOS) + r")+\s*$")


def strip_eos(text: str) -> str:
    """``text`` without any trailing :data:`EOS` markers (and the white space around them)."""
    return _TRAILING_EOS.sub("", text).strip()


def clean_demo_instruction(instruction: str, *, drop_eos: bool = True) -> str:
    """Normalise an instruction for one line of the step-1 prompt.

    White space runs (newlines included) become one space, the ends are stripped and a
    trailing colon is removed, so that every demo fits on its own line. With ``drop_eos``
    (the default) a trailing ``|EoS|`` left on a stored instruction is removed first, so
    the marker appears once per line; ``drop_eos=False`` keeps it, which reproduces the
    reference code's doubled ``|EoS| |EoS|`` on demos taken from generated instructions.
    """
    text = strip_eos(instruction) if drop_eos else instruction
    return _WS.sub(" ", text).strip().rstrip(":")


@functools.lru_cache(maxsize=8192)
def _cleaned(demo: str, drop_eos: bool) -> str:
    """``clean_demo_instruction``, remembered: the seed demos recur in every prompt."""
    return clean_demo_instruction(demo, drop_eos=drop_eos)


def build_instruction_prompt(
    demos: Sequence[str],
    *,
    header: str = INSTRUCTION_HEADER,
    drop_eos: bool = True,
) -> str:
    """The step-1 prompt: ``header``, then ``k. <demo> |EoS|`` per demo, then ``"N."``.

    Demos are numbered from 1 in the order given (shuffle them before calling); each is
    cleaned with :func:`clean_demo_instruction`. The prompt ends with the next number and
    a dot, without a trailing space or newline.
    """
    lines = [header]
    for k, demo in enumerate(demos, start=1):
        text = _cleaned(demo, drop_eos)
        if not text:
            raise ValueError(f"demo {k} is empty")
        lines.append(f"{k}. {text} {EOS}")
    lines.append(f"{len(demos) + 1}.")
    return "\n".join(lines)


@dataclass(frozen=True, slots=True)
class InstanceDemo:
    """One fixed step-2 demo; ``input`` is ``None`` for kind ``"output"``."""

    instruction: str
    output: str
    input: str | None = None

    def render(self) -> str:
        lines = [f"instruction: {self.instruction}"]
        if self.input is not None:
            lines.append(f"input: {self.input}")
        lines.append(f"output: {self.output}")
        lines.append(EOS)
        return "\n".join(lines)


OUTPUT_DEMOS: tuple[InstanceDemo, ...] = (
    InstanceDemo(
        "Give three tips for staying focused while studying.",
        "1. Put your phone in another room.\n2. Work in 25-minute blocks with short breaks."
        "\n3. Write down one clear goal before you start.",
    ),
    InstanceDemo("What is the capital of Japan?", "Tokyo"),
    InstanceDemo(
        "Compose a short poem about autumn rain.",
        "Soft rain on amber leaves,\nthe gutters hum a low tune,\nthe year exhales and slows.",
    ),
    InstanceDemo(
        "Why does the sky look blue on a clear day?",
        "Air molecules scatter short blue wavelengths of sunlight much more than long red "
        "ones, so blue light reaches our eyes from every part of the sky.",
    ),
    InstanceDemo("How many minutes are there in a week?", "10,080 minutes (7 * 24 * 60)."),
    InstanceDemo(
        "Suggest a name for a coffee shop that is also a secondhand bookstore.",
        "Chapter & Bean",
    ),
    InstanceDemo(
        "Implement a Python function that returns the factorial of a non-negative integer.",
        "def factorial(n: int) -> int:\n    result = 1\n    for k in range(2, n + 1):\n"
        "        result *= k\n    return result",
    ),
    InstanceDemo(
        "What are two benefits of regular exercise?",
        "It strengthens the heart and lungs, and it improves mood and sleep.",
    ),
    InstanceDemo("Who wrote the play Romeo and Juliet?", "William Shakespeare"),
    InstanceDemo(
        "Tell a short joke about computers.",
        "Why was the computer cold? It left its Windows open.",
    ),
    InstanceDemo(
        "Give an example of a renewable resource and explain why it is renewable.",
        "Wind is renewable because it is driven by the sun heating the Earth unevenly, "
        "so it keeps blowing no matter how much of it we use.",
    ),
    InstanceDemo(
        "Plan a simple dinner menu for a family of four.",
        "Starter: tomato soup\nMain: roast chicken with potatoes and green beans\n"
        "Dessert: apple crumble",
    ),
    InstanceDemo("What is 15% of 80?", "12"),
    InstanceDemo(
        "Write a short message congratulating a friend on graduating.",
        "Congratulations on graduating, Maya! All those late nights paid off. "
        "I'm so proud of you, and I can't wait to celebrate.",
    ),
    InstanceDemo(
        "Describe how a rainbow forms in two sentences.",
        "Sunlight enters raindrops, bends, reflects off the back of each drop and bends "
        "again on the way out. Each color bends by a slightly different amount, so the "
        "light spreads into a band of colors.",
    ),
)
"""The 15 fixed demos of the step-2 template for kind ``"output"``."""

INPUT_OUTPUT_DEMOS: tuple[InstanceDemo, ...] = (
    InstanceDemo(
        instruction="Label the customer review as positive, negative, or neutral.",
        input="The room was spotless and the staff went out of their way to help us.",
        output="positive",
    ),
    InstanceDemo(
        instruction="Find the greatest common divisor of the two integers.",
        input="36 and 60",
        output="12",
    ),
    InstanceDemo(
        instruction="Rewrite the sentence in the active voice.",
        input="The cake was eaten by the children.",
        output="The children ate the cake.",
    ),
    InstanceDemo(
        instruction="Convert the CSV rows into a JSON array of objects.",
        input="city,temp\nOslo,4\nRome,18",
        output='[{"city": "Oslo", "temp": 4}, {"city": "Rome", "temp": 18}]',
    ),
    InstanceDemo(
        instruction="Explain in one sentence what the Python function does.",
        input="def g(s):\n    return s[::-1]",
        output="It returns the string s with its characters in reverse order.",
    ),
    InstanceDemo(
        instruction="Give the capital city of each country.",
        input="Peru, Egypt",
        output="Peru: Lima\nEgypt: Cairo",
    ),
    InstanceDemo(
        instruction="Summarize the paragraph in one sentence.",
        input="Starting in May, the town library will open on Sundays. The change follows a volunteer drive that found enough helpers to staff the extra day.",
        output="A town library will open on Sundays from May after a volunteer drive to staff it.",
    ),
    InstanceDemo(
        instruction="Translate the sentence into Spanish.",
        input="Where is the nearest pharmacy?",
        output="¿Dónde está la farmacia más cercana?",
    ),
    InstanceDemo(
        instruction="Decide whether the two words are synonyms, antonyms, or unrelated.",
        input="rapid, quick",
        output="synonyms",
    ),
    InstanceDemo(
        instruction="Suggest a title for the blog post described below.",
        input="A guide to growing basil, mint, and parsley in pots on a small apartment balcony.",
        output="Green Thumb, Small Space: Growing Herbs on Your Balcony",
    ),
    InstanceDemo(
        instruction="Solve the word problem and show the calculation.",
        input="A train ticket costs $12 and a bus ticket costs $3. How much do 2 train tickets and 4 bus tickets cost?",
        output="2 * $12 + 4 * $3 = $24 + $12 = $36",
    ),
    InstanceDemo(
        instruction="List every email address that appears in the text.",
        input="Questions about orders go to sales@acme.example; for technical issues, write to support@acme.example.",
        output="sales@acme.example\nsupport@acme.example",
    ),
    InstanceDemo(
        instruction="Write a polite reply declining the invitation.",
        input="Hi! We're having a small party at our place on Saturday. Would you like to come? - Leo",
        output="Thank you so much for the invitation, Leo. Unfortunately I'm away that weekend, but I hope the party is a great success.",
    ),
    InstanceDemo(
        instruction="Sort the numbers from smallest to largest.",
        input="42, 7, 19, 3, 25",
        output="3, 7, 19, 25, 42",
    ),
    InstanceDemo(
        instruction="Correct the grammar of the sentence.",
        input="He don't like apples.",
        output="He doesn't like apples.",
    ),
    InstanceDemo(
        instruction="Is the statement true or false?",
        input="Sound travels faster in water than in air.",
        output="true",
    ),
    InstanceDemo(
        instruction="Answer the question using the passage.",
        input="Passage: The council kept the old trees along the river because their roots hold the bank together and prevent floods from washing it away.\nQuestion: Why did the council keep the old trees?",
        output="Because the roots of old trees hold the riverbank together.",
    ),
    InstanceDemo(
        instruction="Extract the name and age of each person and return them as JSON.",
        input="Omar, who is 34, met his colleague Hana, 29, at the conference.",
        output='[{"name": "Omar", "age": 34}, {"name": "Hana", "age": 29}]',
    ),
    InstanceDemo(
        instruction="Which programming language is this code written in?",
        input='#include <stdio.h>\nint main(void) { printf("hi\\n"); return 0; }',
        output="C",
    ),
)
"""The 19 fixed demos of the step-2 template for kind ``"input_output"``."""


@functools.cache
def instance_template(kind: TaskKind) -> str:
    """The fixed part of the step-2 prompt for ``kind``: header and demos, blank-line
    separated, ending with a blank line (built once per kind)."""
    if kind == "output":
        header, demos = OUTPUT_HEADER, OUTPUT_DEMOS
    elif kind == "input_output":
        header, demos = INPUT_OUTPUT_HEADER, INPUT_OUTPUT_DEMOS
    else:
        raise ValueError(f"unknown task kind {kind!r}; expected 'input_output' or 'output'")
    return "\n\n".join([header, *(d.render() for d in demos)]) + "\n\n"


def build_instance_prompt(kind: TaskKind, instruction: str, *, drop_eos: bool = True) -> str:
    """The step-2 prompt for one instruction: :func:`instance_template` then
    ``"instruction: <text>\\n"``.

    ``<text>`` is the instruction stripped of surrounding white space and, with
    ``drop_eos`` (the default), of a trailing ``|EoS|`` (the reference code leaves it in;
    pass ``drop_eos=False`` to do the same).
    """
    text = strip_eos(instruction) if drop_eos else instruction.strip()
    if not text:
        raise ValueError("instruction is empty")
    return f"{instance_template(kind)}instruction: {text}\n"


ANSWER_HEADER = (
    "Carry out each instruction below, using its input when one is given. "
    "Write only the output, then the end marker."
)
"""Header of the few-shot step-4 prompt for LMs that are not instruction-tuned."""

ANSWER_DEMOS: dict[TaskKind, tuple[InstanceDemo, ...]] = {
    "input_output": (
        INPUT_OUTPUT_DEMOS[0],  # label a review
        INPUT_OUTPUT_DEMOS[2],  # active voice
        INPUT_OUTPUT_DEMOS[5],  # capitals (two-line output)
        INPUT_OUTPUT_DEMOS[13],  # sort numbers
    ),
    "output": (
        OUTPUT_DEMOS[1],  # capital of Japan
        OUTPUT_DEMOS[7],  # benefits of exercise
        OUTPUT_DEMOS[0],  # three tips (three-line output)
        OUTPUT_DEMOS[12],  # a percentage
    ),
}
"""The fixed demos of the few-shot step-4 prompt, per kind (a handful of the step-2
demos: short, and with no blank line, as answering stops at ``"\n\n"``)."""


def build_answer_prompt(instruction: str, input: str) -> str:
    """The zero-shot step-4 prompt: ``instruction + "\n" + input`` (SPEC step 4)."""
    return instruction + "\n" + input


def build_fewshot_answer_prompt(kind: TaskKind, instruction: str, input: str) -> str:
    """The few-shot step-4 prompt for an LM that is not instruction-tuned.

    :data:`ANSWER_HEADER`, the :data:`ANSWER_DEMOS` of ``kind`` (each closed by
    :data:`EOS`), blank-line separated, then ``"instruction: <text>"``, an ``"input: "``
    line when ``input`` is not empty, and ``"output:"`` with nothing after it: the LM
    writes the answer and then ``|EoS|``.
    """
    if kind not in ANSWER_DEMOS:
        raise ValueError(f"unknown task kind {kind!r}; expected 'input_output' or 'output'")
    text = instruction.strip()
    if not text:
        raise ValueError("instruction is empty")
    lines = [f"instruction: {text}"]
    if input.strip():
        lines.append(f"input: {input.strip()}")
    lines.append("output:")
    parts = [ANSWER_HEADER, *(d.render() for d in ANSWER_DEMOS[kind]), "\n".join(lines)]
    return "\n\n".join(parts)


def build_step4_prompt(style: PromptStyle, kind: TaskKind, instruction: str, input: str) -> str:
    """The step-4 prompt in ``style`` (see :func:`build_answer_prompt` and
    :func:`build_fewshot_answer_prompt`)."""
    if style == "zero_shot":
        return build_answer_prompt(instruction, input)
    if style == "few_shot":
        return build_fewshot_answer_prompt(kind, instruction, input)
    raise ValueError(f"unknown prompt style {style!r}")
