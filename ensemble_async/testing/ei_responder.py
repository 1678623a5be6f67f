"""A fake LM for the test doubles' ``responder`` hook that answers Ensemble-Instruct
prompts with plausible, deterministic completions.

* step 1 (a prompt starting with the instruction header): one new instruction made of
  random words, closed by `` |EoS|`` -- sometimes one that a filter rejects (too short,
  a blacklisted word, a leading punctuation mark) or a copy of one of the demos;
* step 2 (a prompt ending with ``instruction: ...\\n``): ``input: ...\\noutput: ...\\n|EoS|``
  for type A (the template's header says so), ``output: ...\\n|EoS|`` for type B --
  sometimes malformed (a missing label);
* anything else is a step-4 prompt ``instruction\\ninput``: the "true" answer of that
  (instruction, input) with probability ``agreement``, else words of its own.

The true answer is a pure function of (instruction, input), and the step-2 output is
the true answer most of the time, so candidates agree often but not always. Sampling
requests vary with their ``seed`` parameter; greedy ones depend only on the prompt.
"""

from __future__ import annotations

import random
from typing import Any

from ..templates import EOS, INPUT_OUTPUT_HEADER, INSTRUCTION_HEADER, strip_eos

__all__ = ["EIResponder", "true_answer"]

_VOCAB_TEXT = (
    "amber anchor apricot arch atlas badge bakery ballad bamboo banner barley basin "
    "beacon berry blossom bonnet border bottle boulder bracket breeze brick bucket "
    "cabin cactus candle canyon carpet castle cedar cellar chalk channel cherry "
    "chorus cider circuit citrus clover cobalt comet copper coral cotton crater "
    "crystal cymbal dagger daisy delta desert dolphin dragon drum dune eagle echo "
    "ember emerald engine falcon feather fern ferry fiddle flame flint forest fossil "
    "fountain galaxy garnet geyser ginger glacier globe granite gravel harbor "
    "harvest hazel helmet heron hollow honey horizon iceberg indigo island ivory "
    "jasmine jungle kettle kiwi ladder lagoon lantern lava lemon lilac linen lotus "
    "magnet maple marble meadow melon meteor mint mirror monsoon mosaic moss nectar "
    "nickel oasis olive onyx orbit orchid otter oyster paddle palace panther parrot "
    "pebble pepper pillow pine planet plaza pollen prairie prism pumpkin quartz "
    "quill rabbit radish raven reef ribbon river rocket saffron salmon sapphire "
    "satchel scarlet shadow shell silk spruce squash stable summit sunset swan "
    "tangerine temple thistle thunder tiger timber topaz tulip tundra valley velvet "
    "violet volcano walnut willow window winter yarrow zephyr "
)
_VOCAB = tuple(_VOCAB_TEXT.split())
_VERBS = (
    "Summarize",
    "Classify",
    "Compare",
    "Describe",
    "Explain",
    "Rank",
    "Translate",
    "Rewrite",
    "Evaluate",
    "Organize",
    "Estimate",
    "Identify",
    "Sort",
    "Critique",
    "Label",
    "Suggest",
)


def _words(rng: random.Random, low: int, high: int) -> str:
    return " ".join(rng.choices(_VOCAB, k=rng.randint(low, high)))


def true_answer(instruction: str, input: str) -> str:
    """The answer every honest model gives to (instruction, input)."""
    rng = random.Random(f"truth\x00{instruction.strip()}\x00{input.strip()}")
    return _words(rng, 2, 7)


class EIResponder:
    """``responder(prompt, params) -> text`` for ``TGIDouble`` / ``OpenAIDouble``.

    ``name`` makes this model's own (disagreeing) answers differ from other models';
    ``agreement``: probability that a step-4 answer is the true answer; ``honesty``:
    probability that a step-2 output is; ``bad_rate``: probability of a defective
    step-1 or step-2 completion.
    """

    def __init__(
        self,
        name: str,
        *,
        agreement: float = 0.7,
        honesty: float = 0.85,
        bad_rate: float = 0.1,
    ) -> None:
        self.name = name
        self.agreement = agreement
        self.honesty = honesty
        self.bad_rate = bad_rate

    def __call__(self, prompt: str, params: dict[str, Any]) -> str:
        seed = params.get("seed")
        rng = random.Random(f"{self.name}\x00{seed}\x00{prompt}")
        if prompt.startswith(INSTRUCTION_HEADER):
            if rng.random() < self.bad_rate / 2:  # repeat a demo: the novelty filter's job
                demo = rng.choice(prompt.splitlines()[1:-1]).split(". ", 1)[1]
                return " " + strip_eos(demo) + " " + EOS
            return self._instruction(rng)
        tail = prompt.rstrip("\n").rsplit("\n", 1)[-1]
        if tail.startswith("instruction: "):
            instruction = strip_eos(tail[len("instruction: ") :])
            return self._instance(rng, instruction, INPUT_OUTPUT_HEADER in prompt)
        instruction, _, input_ = prompt.partition("\n")
        if rng.random() < self.agreement:
            return " " + true_answer(instruction, input_) + "\n\nextra text"
        return " " + _words(rng, 2, 7)

    def _instruction(self, rng: random.Random) -> str:
        roll = rng.random()
        if roll < self.bad_rate / 3:
            text = "Do " + rng.choice(_VOCAB) + "."
        elif roll < 2 * self.bad_rate / 3:
            text = f"Describe the image of a {rng.choice(_VOCAB)} near the {rng.choice(_VOCAB)}."
        elif roll < self.bad_rate:
            text = f'"{rng.choice(_VOCAB)}" {_words(rng, 4, 8)}.'
        else:
            text = f"{rng.choice(_VERBS)} {_words(rng, 5, 10)}."
        return f" {text} {EOS}\n99. {_words(rng, 4, 6)} {EOS}"

    def _instance(self, rng: random.Random, instruction: str, needs_input: bool) -> str:
        input_ = _words(rng, 3, 9) if needs_input else ""
        if rng.random() < self.honesty:
            output = true_answer(instruction, input_)
        else:
            output = _words(rng, 2, 7)
        if rng.random() < self.bad_rate:  # a defective completion: a label is missing
            return f"{output}\n{EOS}" if needs_input else f"result {output}\n{EOS}"
        if needs_input:
            return f"input: {input_}\noutput: {output}\n{EOS}\n\ninstruction: more"
        return f"output: {output}\n{EOS}\n\ninstruction: more"
