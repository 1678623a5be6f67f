"""The shipped seed tasks and the Self-Instruct seed-file loader."""

from __future__ import annotations

import json
import re
import string
from importlib import resources
from pathlib import Path
from typing import Any

import pytest
from rouge_score import rouge_scorer, tokenizers

from ensemble_async import templates
from ensemble_async.seedtasks import (
    KINDS,
    SeedFormatError,
    SeedTask,
    load_seed_tasks,
    parse_seed_tasks,
    split_by_kind,
)

REPO = Path(__file__).resolve().parents[1]
SHIPPED = REPO / "seeds" / "seed_tasks.jsonl"

# The numbers the project chose for its own seeds (same proportions as Self-Instruct's).
N_SEEDS = 175
N_INPUT_OUTPUT = 125
N_OUTPUT = 50
N_CLASSIFICATION = 25

# Self-Instruct's step-1 keyword filter, as SPEC.md states it.
_BLOCKED = (
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


def step1_rejection(instruction: str) -> str | None:
    """Why SPEC's step-1 filters would drop ``instruction`` (None when it passes)."""
    text = re.sub(r"\s+", " ", instruction).strip()
    words = len(text.split())
    if words <= 3 or words > 150:
        return f"{words} words"
    for word in _BLOCKED:
        if re.search(rf"\b{re.escape(word)}\b", text, flags=re.IGNORECASE):
            return f"keyword {word!r}"
    if text.startswith("Write a program"):
        return "starts with 'Write a program'"
    if text[0] in string.punctuation or not text[0].isascii():
        return f"first character {text[0]!r}"
    return None


class _CachingTokenizer(tokenizers.Tokenizer):  # type: ignore[misc]
    """rouge_score's default tokenizer (no stemming), memoised: each text is tokenized once."""

    def __init__(self) -> None:
        self._inner = tokenizers.DefaultTokenizer(use_stemmer=False)
        self._cache: dict[str, list[str]] = {}

    def tokenize(self, text: str) -> list[str]:
        if text not in self._cache:
            self._cache[text] = self._inner.tokenize(text)
        return self._cache[text]


def _max_rouge_l(queries: list[str], pool: list[str] | None = None) -> tuple[float, str, str]:
    """Highest ROUGE-L F-measure of any query against any pool text (``pool=None``: every
    pair of distinct queries, each pair once)."""
    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False, tokenizer=_CachingTokenizer())
    best = (-1.0, "", "")
    for i, q in enumerate(queries):
        for p in queries[i + 1 :] if pool is None else pool:
            f = float(scorer.score(p, q)["rougeL"].fmeasure)
            if f > best[0]:
                best = (f, q, p)
    return best


@pytest.fixture(scope="module")
def shipped() -> list[SeedTask]:
    return load_seed_tasks()


# --------------------------------------------------------------------------- shipped seeds


def test_shipped_counts(shipped: list[SeedTask]) -> None:
    assert len(shipped) == N_SEEDS
    groups = split_by_kind(shipped)
    assert len(groups["input_output"]) == N_INPUT_OUTPUT
    assert len(groups["output"]) == N_OUTPUT
    assert sum(t.is_classification for t in shipped) == N_CLASSIFICATION
    assert all(t.kind == "input_output" for t in shipped if t.is_classification)


def test_shipped_ids_names_and_instances_are_well_formed(shipped: list[SeedTask]) -> None:
    assert len({t.id for t in shipped}) == N_SEEDS
    assert len({t.name for t in shipped}) == N_SEEDS
    assert len({t.instruction for t in shipped}) == N_SEEDS
    for t in shipped:
        assert re.fullmatch(r"[a-z0-9]+(?:_[a-z0-9]+)*", t.name), t.name
        assert t.output.strip(), t.id
        assert t.input == t.input.strip() and t.output == t.output.strip(), t.id
        assert "|EoS|" not in t.instruction + t.input + t.output, t.id
    # Exactly one instance per line, as in Self-Instruct's file.
    for line in SHIPPED.read_text(encoding="utf-8").splitlines():
        assert len(json.loads(line)["instances"]) == 1


def test_classification_seeds_have_short_label_outputs(shipped: list[SeedTask]) -> None:
    for t in shipped:
        if t.is_classification:
            assert len(t.output.split()) <= 3, (t.id, t.output)


def test_every_shipped_instruction_passes_the_step1_filters(shipped: list[SeedTask]) -> None:
    rejected = {t.id: why for t in shipped if (why := step1_rejection(t.instruction))}
    assert rejected == {}


def test_step1_filter_helper_rejects_what_spec_says() -> None:
    # The helper above must itself be able to fail, or the previous test proves nothing.
    assert step1_rejection("Sort these numbers quickly.") is None
    assert step1_rejection("Sort three numbers") is not None  # 3 words
    assert step1_rejection("word " * 151) is not None
    assert step1_rejection("Describe the attached Picture in detail.") is not None
    assert step1_rejection("Tell me where to go to eat tonight.") is not None
    assert step1_rejection("Explain what the mapping function does.") is None  # not whole word
    assert step1_rejection("Write a program that adds two numbers.") is not None
    assert step1_rejection('"Quote" this sentence for me please.') is not None
    assert step1_rejection("¿Qué hora es ahora mismo?") is not None


def test_step2_demo_instructions_pass_the_step1_filters() -> None:
    demos = templates.OUTPUT_DEMOS + templates.INPUT_OUTPUT_DEMOS
    assert {d.instruction: why for d in demos if (why := step1_rejection(d.instruction))} == {}


def test_shipped_seeds_are_mutually_distinct(shipped: list[SeedTask]) -> None:
    # Each seed would pass the step-1 novelty filter (ROUGE-L <= 0.7) against the others.
    score, a, b = _max_rouge_l([t.instruction for t in shipped])
    assert score <= 0.7, (score, a, b)


def test_rouge_helper_detects_near_duplicates() -> None:
    score, _, _ = _max_rouge_l(["Sort the list of numbers."], ["Sort this list of numbers."])
    assert score == pytest.approx(0.8)
    assert _max_rouge_l(["Name a red fruit.", "Explain how tides work."])[0] == 0.0


def test_shipped_file_is_read_through_importlib_resources(shipped: list[SeedTask]) -> None:
    pkg = resources.files("ensemble_async.seeds")
    assert pkg.joinpath("seed_tasks.jsonl").is_file()
    assert pkg.joinpath("README.md").is_file()
    text = pkg.joinpath("seed_tasks.jsonl").read_text(encoding="utf-8")
    assert parse_seed_tasks(text) == shipped
    assert load_seed_tasks(SHIPPED) == shipped
    assert load_seed_tasks(str(SHIPPED)) == shipped


# --------------------------------------------------------------------------- reference


def _reference_seeds(shared_dir: Path) -> Path:
    path = shared_dir / "reference" / "self-instruct" / "seed_tasks.jsonl"
    if not path.is_file():
        pytest.skip("reference seed file not present")
    return path


def test_reference_seed_file_loads(shared_dir: Path) -> None:
    tasks = load_seed_tasks(_reference_seeds(shared_dir))
    groups = split_by_kind(tasks)
    assert len(tasks) == 175
    assert len(groups["input_output"]) == 125
    assert len(groups["output"]) == 50
    assert sum(t.is_classification for t in tasks) == 26
    assert all(t.kind == "input_output" for t in tasks if t.is_classification)


def test_shipped_seeds_are_not_close_to_the_reference_seeds(
    shipped: list[SeedTask], shared_dir: Path
) -> None:
    reference = [t.instruction for t in load_seed_tasks(_reference_seeds(shared_dir))]
    score, ours, theirs = _max_rouge_l([t.instruction for t in shipped], reference)
    # SPEC's novelty threshold is 0.7; the project keeps a wide margin below it.
    assert score <= 0.6, (score, ours, theirs)
    # Neither the instructions nor the outputs are copies.
    ref_tasks = load_seed_tasks(_reference_seeds(shared_dir))
    assert not {t.output for t in shipped} & {t.output for t in ref_tasks if len(t.output) > 20}
    assert not {t.name for t in shipped} & {t.name for t in ref_tasks}


# --------------------------------------------------------------------------- loader


def _line(**overrides: Any) -> str:
    record: dict[str, Any] = {
        "id": "t0",
        "name": "demo_task",
        "instruction": "Add the two numbers.",
        "instances": [{"input": "2 and 3", "output": "5"}],
        "is_classification": False,
    }
    for key, value in overrides.items():
        if value is _DELETE:
            del record[key]
        else:
            record[key] = value
    return json.dumps(record)


_DELETE = object()
GOOD_1 = _line(id="a")
GOOD_2 = _line(id="b", instances=[{"input": "", "output": "ok"}])


@pytest.mark.parametrize(
    ("lines", "bad_line", "needle"),
    [
        ([GOOD_1, '{"id": "x",'], 2, "invalid JSON"),
        ([GOOD_1, "[1, 2]"], 2, "expected a JSON object, got list"),
        (['"just a string"'], 1, "expected a JSON object, got str"),
        ([GOOD_1, GOOD_2, _line(id="c", instruction=_DELETE)], 3, "missing field 'instruction'"),
        ([_line(instances=_DELETE)], 1, "missing field 'instances'"),
        ([_line(is_classification=_DELETE)], 1, "missing field 'is_classification'"),
        ([GOOD_1, _line(id="c", instruction=5)], 2, "'instruction' must be a string, got int"),
        ([_line(id=7)], 1, "'id' must be a string"),
        ([_line(name=None)], 1, "'name' must be a string, got null"),
        ([_line(is_classification="yes")], 1, "must be a boolean, got str"),
        ([_line(is_classification=1)], 1, "must be a boolean, got int"),
        ([_line(instances={"input": "", "output": ""})], 1, "must be a list, got dict"),
        ([GOOD_1, _line(id="c", instances=[])], 2, "at least one instance"),
        ([_line(instances=["x"])], 1, "instances[0] must be an object"),
        ([_line(instances=[{"input": "q"}])], 1, "instances[0] is missing field 'output'"),
        (
            [_line(instances=[{"input": "", "output": "a"}, {"input": None, "output": "b"}])],
            1,
            "instances[1].input must be a string, got null",
        ),
        ([_line(instruction="  \n ")], 1, "'instruction' is empty"),
        ([_line(id="")], 1, "'id' is empty"),
        ([GOOD_1, _line(id="c", instruction="Say \ud83d hi")], 2, "not valid Unicode"),
        ([GOOD_1, GOOD_2, GOOD_1], 3, "duplicate id 'a' (first seen on line 1)"),
        # Blank lines are skipped but still counted.
        ([GOOD_1, "", "   ", "{bad"], 4, "invalid JSON"),
        ([GOOD_1, "", GOOD_2, "", GOOD_2], 5, "duplicate id 'b' (first seen on line 3)"),
    ],
)
def test_bad_seed_lines_name_file_and_line(
    tmp_path: Path, lines: list[str], bad_line: int, needle: str
) -> None:
    path = tmp_path / "seeds.jsonl"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    with pytest.raises(SeedFormatError) as info:
        load_seed_tasks(path)
    err = info.value
    assert err.line == bad_line
    assert err.source == str(path)
    assert needle in err.reason
    assert str(err).startswith(f"{path}:{bad_line}: ")
    assert isinstance(err, ValueError)


@pytest.mark.parametrize("content", [b"", b"\n\n  \n"])
def test_empty_seed_file_is_an_error(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "empty.jsonl"
    path.write_bytes(content)
    with pytest.raises(SeedFormatError, match="no seed tasks") as info:
        load_seed_tasks(path)
    assert info.value.line is None
    assert str(info.value).startswith(f"{path}: ")


def test_invalid_utf8_names_the_line(tmp_path: Path) -> None:
    path = tmp_path / "latin1.jsonl"
    bad = _line(id="z", name="cafXX").encode().replace(b"XX", b"\xe9")  # a Latin-1 byte
    path.write_bytes(GOOD_1.encode() + b"\n" + bad)
    with pytest.raises(SeedFormatError, match="not valid UTF-8") as info:
        load_seed_tasks(path)
    assert info.value.line == 2


def test_parse_labels_errors_with_the_given_source() -> None:
    with pytest.raises(SeedFormatError) as info:
        parse_seed_tasks(GOOD_1 + "\n[]", source="memory")
    assert str(info.value).startswith("memory:2: ")


def test_loader_accepts_the_format_variants(tmp_path: Path) -> None:
    lines = [
        # Several instances: the first one is used.
        _line(
            id="multi",
            instances=[{"input": "", "output": "first"}, {"input": "x", "output": "second"}],
        ),
        # Unknown fields are ignored.
        _line(id="extra", source="somewhere", instances=[{"input": "i", "output": "o", "k": 1}]),
        # A raw U+2028 inside a string must not split the line.
        json.dumps(
            json.loads(_line(id="ls", instruction="Join\u2028these words.")), ensure_ascii=False
        ),
    ]
    path = tmp_path / "variants.jsonl"
    # BOM and CRLF line endings, no final newline.
    path.write_bytes(b"\xef\xbb\xbf" + "\r\n".join(lines).encode("utf-8"))
    tasks = load_seed_tasks(path)
    assert [t.id for t in tasks] == ["multi", "extra", "ls"]
    assert (tasks[0].input, tasks[0].output, tasks[0].kind) == ("", "first", "output")
    assert (tasks[1].input, tasks[1].output, tasks[1].kind) == ("i", "o", "input_output")
    assert tasks[2].instruction == "Join\u2028these words."


def test_kind_follows_the_exact_empty_string_rule() -> None:
    def task(inp: str) -> SeedTask:
        return SeedTask("i", "n", "Do the thing now.", inp, "out", False)

    assert task("").kind == "output"
    assert task("x").kind == "input_output"
    assert task(" ").kind == "input_output"  # reference rule: only "" counts as no input


def test_split_by_kind_keeps_order_and_both_keys() -> None:
    tasks = parse_seed_tasks(
        "\n".join(
            [GOOD_1, GOOD_2, _line(id="c"), _line(id="d", instances=[{"input": "", "output": "y"}])]
        )
    )
    groups = split_by_kind(tasks)
    assert list(groups) == list(KINDS)
    assert [t.id for t in groups["input_output"]] == ["a", "c"]
    assert [t.id for t in groups["output"]] == ["b", "d"]
    assert split_by_kind([]) == {"input_output": [], "output": []}


def test_to_record_round_trips(tmp_path: Path, shipped: list[SeedTask]) -> None:
    path = tmp_path / "copy.jsonl"
    path.write_text(
        "".join(json.dumps(t.to_record(), ensure_ascii=False) + "\n" for t in shipped),
        encoding="utf-8",
    )
    assert load_seed_tasks(path) == shipped
    assert path.read_text(encoding="utf-8") == SHIPPED.read_text(encoding="utf-8")
