"""TOML run configuration: parsing, validation messages, building members."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest

from ensemble_async.assemble import build_members, embedded_config
from ensemble_async.config import (
    Config,
    ConfigError,
    OutputError,
    check_output_writable,
    load_config,
)

REPO = Path(__file__).resolve().parents[1]

FULL = """
[run]
preset = "paper"
seed = 7
output = "{out}/records.jsonl"
cache = true
targets = {{ input_output = 4, output = 2 }}

[backends.gpu1]
kind = "tgi"
url = "http://gpu1:8080"
concurrency = 4
max_concurrency = 16
rpm = 600
tpm = 100000
timeout_s = 30
max_attempts = 3
options = {{ endpoint = "compat" }}

[backends.gpu2]
kind = "openai"
url = "https://gpu2.example:8000/v1"
model = "mistral-7b"
api_key_env = "EA_TEST_GPU2_KEY"

[roles]
writer = "gpu1"
answerers = ["gpu1", "gpu2"]
writer_answers = "provenance"

[overrides]
novelty_threshold = 0.6
answer_decoding = {{ max_new_tokens = 64, stop = ["\\n\\n"] }}
"""


def write(tmp_path: Path, text: str, name: str = "cfg.toml") -> Path:
    path = tmp_path / name
    path.write_text(textwrap.dedent(text))
    return path


def full(tmp_path: Path) -> Config:
    return load_config(write(tmp_path, FULL.format(out=tmp_path / "out")))


def test_full_config_parses_into_typed_values(tmp_path: Path) -> None:
    cfg = full(tmp_path)
    assert cfg.run.preset == "paper" and cfg.run.seed == 7
    assert cfg.run.targets.input_output == 4 and cfg.run.targets.output == 2
    assert cfg.run.output == tmp_path / "out" / "records.jsonl"
    # rejects and cache are derived beside the records
    assert cfg.run.rejects_path == tmp_path / "out" / "records.rejects.jsonl"
    assert cfg.run.cache_file == tmp_path / "out" / "records.cache.sqlite"
    gpu1 = cfg.backends["gpu1"]
    assert (gpu1.kind, gpu1.url, gpu1.concurrency, gpu1.max_concurrency) == (
        "tgi",
        "http://gpu1:8080",
        4,
        16,
    )
    assert gpu1.rpm == 600.0 and gpu1.timeout_s == 30.0 and gpu1.max_attempts == 3
    assert gpu1.factory_options() == {
        "name": "gpu1",
        "url": "http://gpu1:8080",
        "endpoint": "compat",
    }
    assert cfg.backends["gpu2"].api_key_env == "EA_TEST_GPU2_KEY"
    assert cfg.roles.writer == "gpu1" and cfg.roles.answerers == ("gpu1", "gpu2")
    assert cfg.roles.writer_answers == "provenance"
    assert cfg.roles.voting_answerers == ("gpu2",)
    with pytest.raises(AttributeError):
        cfg.run.seed = 1  # type: ignore[misc]


def test_settings_apply_run_values_and_nested_overrides(tmp_path: Path) -> None:
    pytest.importorskip("ensemble_async.pipeline")
    settings = full(tmp_path).settings()
    assert settings.identity()["preset"] == "paper" and settings.seed == 7
    assert settings.targets == {"input_output": 4, "output": 2}
    assert settings.novelty_threshold == 0.6
    assert settings.answer_decoding.max_new_tokens == 64
    assert settings.answer_decoding.stop == ("\n\n",)
    # keys the override does not name keep the preset's value
    assert settings.answer_decoding.temperature == 0.0
    assert settings.first_line_only is True  # the paper preset's quirk


BASE_BACKENDS = """
[backends.a]
kind = "tgi"
url = "http://a:1"
[backends.b]
kind = "openai"
url = "http://b:2"
"""
ROLES = """
[roles]
writer = "a"
answerers = ["b"]
"""


@pytest.mark.parametrize(
    ("text", "key", "problem"),
    [
        ("[run]\nbogus = 1\n" + BASE_BACKENDS + ROLES, "run.bogus", "unknown key"),
        ("[extra]\n" + BASE_BACKENDS + ROLES, "extra", "unknown key"),
        ('[run]\nseed = "x"\n' + BASE_BACKENDS + ROLES, "run.seed", "expected an integer"),
        ("[run]\ncache = 1\n" + BASE_BACKENDS + ROLES, "run.cache", "expected true or false"),
        ('[run]\npreset = "fast"\n' + BASE_BACKENDS + ROLES, "run.preset", "unknown preset"),
        (
            "[run]\ntargets = { output = -1 }\n" + BASE_BACKENDS + ROLES,
            "run.targets.output",
            "must be >= 0",
        ),
        (
            "[run]\ntargets = { other = 1 }\n" + BASE_BACKENDS + ROLES,
            "run.targets.other",
            "unknown key",
        ),
        ('[backends.a]\nurl = "http://a"\n' + ROLES, "backends.a.kind", "missing required key"),
        (
            '[backends.a]\nkind = "nosuch"\nurl = "http://a"\n' + ROLES,
            "backends.a.kind",
            "unknown backend kind 'nosuch'",
        ),
        ('[backends.a]\nkind = "tgi"\n' + ROLES, "backends.a.url", "missing required key"),
        (
            '[backends.a]\nkind = "tgi"\nurl = "ftp://a"\n' + ROLES,
            "backends.a.url",
            "scheme must be http or https",
        ),
        (
            '[backends.a]\nkind = "tgi"\nurl = "http://a"\nconcurrency = 0\n' + ROLES,
            "backends.a.concurrency",
            "must be >= 1",
        ),
        (
            '[backends.a]\nkind = "tgi"\nurl = "http://a"\nrpm = -5\n' + ROLES,
            "backends.a.rpm",
            "must be > 0",
        ),
        (
            '[backends.a]\nkind = "tgi"\nurl = "http://a"\ntimeout_s = true\n' + ROLES,
            "backends.a.timeout_s",
            "got a boolean",
        ),
        (
            '[backends.a]\nkind = "tgi"\nurl = "http://a"\napi_key = "sk-123"\n' + ROLES,
            "backends.a.api_key",
            "api_key_env",
        ),
        (
            '[backends.a]\nkind = "tgi"\nurl = "http://a"\noptions = { token = "x" }\n' + ROLES,
            "backends.a.options.token",
            "api_key_env",
        ),
        (
            '[backends.a]\nkind = "transformers"\nurl = "http://a"\n' + ROLES,
            "backends.a.model",
            "missing required key",
        ),
        (BASE_BACKENDS + '[roles]\nwriter = "zz"\nanswerers = ["a"]\n', "roles.writer", "'zz'"),
        (
            BASE_BACKENDS + '[roles]\nwriter = "a"\nanswerers = ["b", "nope"]\n',
            "roles.answerers[1]",
            "undefined backend 'nope'",
        ),
        (BASE_BACKENDS + '[roles]\nwriter = "a"\nanswerers = []\n', "roles.answerers", "at least"),
        (BASE_BACKENDS + '[roles]\nwriter = "a"\n', "roles.answerers", "missing required key"),
        (BASE_BACKENDS, "roles", "missing"),
        (ROLES, "backends", "at least one backend"),
        (BASE_BACKENDS + ROLES + "[overrides]\nseed = 3\n", "overrides.seed", "in [run]"),
        (BASE_BACKENDS + ROLES + "[overrides]\nnosuch = 3\n", "overrides.nosuch", "unknown"),
        ("[run\n", None, "invalid TOML"),
    ],
)
def test_bad_configs_name_file_key_and_problem(
    tmp_path: Path, text: str, key: str | None, problem: str
) -> None:
    if key is not None and key.startswith("overrides"):
        pytest.importorskip("ensemble_async.pipeline")
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as info:
        load_config(path)
    message = str(info.value)
    assert str(path) in message
    if key is not None:
        assert f": {key}: " in message
    assert problem in message


def test_missing_file_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="file not found"):
        load_config(tmp_path / "absent.toml")


def test_build_members_checks_api_key_env_before_creating_anything(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cfg = full(tmp_path)
    monkeypatch.delenv("EA_TEST_GPU2_KEY", raising=False)
    with pytest.raises(ConfigError) as info:
        build_members(cfg)
    assert "backends.gpu2.api_key_env" in str(info.value)
    assert "EA_TEST_GPU2_KEY is not set" in str(info.value)


async def test_build_members_shares_a_member_between_roles(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("EA_TEST_GPU2_KEY", "sk-very-secret")
    cfg = full(tmp_path)
    writer, answerers = build_members(cfg)
    try:
        assert writer.name == "gpu1"
        assert [m.name for m in answerers] == ["gpu1", "gpu2"]
        assert answerers[0] is writer
        assert writer.limiter.limit == 4 and writer.limiter.maximum == 16
        assert writer.retry.max_attempts == 3 and writer.timeout_s == 30.0
        assert "sk-very-secret" not in repr(answerers[1].backend.__dict__)
    finally:
        for m in answerers:
            await m.aclose()


async def test_build_members_gives_every_member_the_cache(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from ensemble_async.cache import ResponseCache

    monkeypatch.setenv("EA_TEST_GPU2_KEY", "k")
    cfg = full(tmp_path)
    async with ResponseCache(tmp_path / "c.sqlite") as cache:
        writer, answerers = build_members(cfg, cache=cache)
        try:
            assert all(m.cache is cache for m in answerers)
            assert writer.cache is cache
        finally:
            for m in answerers:
                await m.aclose()


def test_output_checks(tmp_path: Path) -> None:
    cfg = full(tmp_path)
    check_output_writable(cfg)  # a folder that does not exist yet is fine
    (tmp_path / "dir.jsonl").mkdir()
    with pytest.raises(OutputError, match="is a directory"):
        check_output_writable(cfg.with_output(tmp_path / "dir.jsonl"))
    (tmp_path / "afile").write_text("x")
    with pytest.raises(OutputError) as info:
        check_output_writable(cfg.with_output(tmp_path / "afile" / "records.jsonl"))
    assert "run.output" in str(info.value) and "not a directory" in str(info.value)


def test_with_output_moves_the_derived_paths(tmp_path: Path) -> None:
    cfg = full(tmp_path).with_output(tmp_path / "other" / "data.jsonl")
    assert cfg.run.rejects_path == tmp_path / "other" / "data.rejects.jsonl"
    assert cfg.run.cache_file == tmp_path / "other" / "data.cache.sqlite"


@pytest.mark.parametrize("name", ["remote.toml", "local.toml"])
def test_examples_load(name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = load_config(REPO / "examples" / name)
    assert cfg.roles.writer in cfg.backends
    assert all(a in cfg.backends for a in cfg.roles.answerers)
    if name == "remote.toml":
        assert {b.kind for b in cfg.backends.values()} >= {"tgi", "openai"}
        assert any(b.api_key_env for b in cfg.backends.values())


def test_embedded_config_uses_both_embedded_models() -> None:
    try:
        cfg = embedded_config()
    except FileNotFoundError as exc:
        pytest.skip(f"embedded models not installed: {exc}")
    # one model, one vote: SmolLM2 writes, Gemma answers
    assert cfg.roles.writer == "smollm2-135m-instruct"
    assert cfg.roles.answerers == ("gemma3-270m",)
    assert cfg.backends["gemma3-270m"].instruction_tuned is False
    assert cfg.backends["smollm2-135m-instruct"].instruction_tuned is True
    assert all(b.kind == "transformers" and b.model for b in cfg.backends.values())
    assert cfg.run.targets.input_output + cfg.run.targets.output <= 10
