"""Everything a config can get wrong is refused when it loads, naming the key: pipeline
overrides, bounds, URLs, credentials, roles; and what it may say (BOM, ``urls``, the
``vllm`` alias, ``roles.writer_answers``).  The same cases through ``generate`` exit 2
with no traceback and no file created."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from ensemble_async import cli
from ensemble_async.config import ConfigError, load_config, parse_member

BACKENDS = """
[backends.a]
kind = "tgi"
url = "http://127.0.0.1:9"
[backends.b]
kind = "openai"
url = "http://127.0.0.1:9"
"""
ROLES = '[roles]\nwriter = "a"\nanswerers = ["b"]\n'
GOOD = BACKENDS + ROLES


def backend(extra: str, kind: str = "openai") -> str:
    """A config whose answerer ``b`` carries ``extra``."""
    return (
        '[backends.a]\nkind = "tgi"\nurl = "http://127.0.0.1:9"\n'
        f'[backends.b]\nkind = "{kind}"\n{extra}\n' + ROLES
    )


BAD: list[tuple[str, str, str]] = [
    # pipeline overrides, checked when the config loads
    (GOOD + "[overrides]\ninstruction_decoding = { top_k = 0 }\n",
     "overrides.instruction_decoding.top_k", "must be >= 1"),
    (GOOD + '[overrides]\nnovelty_threshold = "high"\n',
     "overrides.novelty_threshold", "expected a number"),
    (GOOD + "[overrides]\nnovelty_threshold = 1.5\n", "overrides.novelty_threshold", "<= 1"),
    (GOOD + "[overrides]\nanswer_decoding = { max_new_tokens = -3 }\n",
     "overrides.answer_decoding.max_new_tokens", "must be >= 1"),
    (GOOD + "[overrides]\nanswer_decoding = { top_p = 0 }\n",
     "overrides.answer_decoding.top_p", "must be > 0"),
    (GOOD + "[overrides]\nanswer_decoding = { temperature = nan }\n",
     "overrides.answer_decoding.temperature", "finite"),
    (GOOD + "[overrides]\nanswer_decoding = { stop = [1] }\n",
     "overrides.answer_decoding.stop[0]", "non-empty string"),
    (GOOD + "[overrides]\nanswer_decoding = { bogus = 1 }\n",
     "overrides.answer_decoding.bogus", "unknown key"),
    (GOOD + "[overrides]\ninstance_decoding = { min_new_tokens = 90, max_new_tokens = 10 }\n",
     "overrides.instance_decoding", "min_new_tokens"),
    (GOOD + '[overrides]\ndemos = "abc"\n', "overrides.demos", "expected a table"),
    (GOOD + "[overrides]\ndemos = { output = -1 }\n", "overrides.demos.output", ">= 0"),
    (GOOD + "[overrides]\nqueue_size = 0\n", "overrides.queue_size", "must be >= 1"),
    (GOOD + '[overrides]\nconsensus_policy = "vote"\n',
     "overrides.consensus_policy", "unknown policy"),
    (GOOD + "[overrides]\nkeep_eos = 1\n", "overrides.keep_eos", "true or false"),
    # bounds
    ("[run]\ntargets = { input_output = 9223372036854775807 }\n" + GOOD,
     "run.targets.input_output", "must be <="),
    (backend('url = "http://h"\nrpm = 1e-300'), "backends.b.rpm", "must be >="),
    (backend('url = "http://h"\ntpm = inf'), "backends.b.tpm", "finite"),
    (backend('url = "http://h"\nconcurrency = 100000000'), "backends.b.concurrency", "<="),
    (backend('url = "http://h"\ntimeout_s = nan'), "backends.b.timeout_s", "finite"),
    # URLs
    (backend('url = "http://[::1"'), "backends.b.url", "not a valid URL"),
    (backend('url = "http://h:99999"'), "backends.b.url", "not a valid URL"),
    (backend('url = "http://user:hunter2@h:8000"'), "backends.b.url", "credentials"),
    (backend('urls = ["http://h:1", "http://[::1"]'), "backends.b.urls[1]", "not a valid URL"),
    (backend("urls = []"), "backends.b.urls", "at least one URL"),
    (backend('urls = ["http://h:1", "http://h:1/"]'), "backends.b.urls[1]", "listed twice"),
    (backend("urls = [3]"), "backends.b.urls[0]", "expected a URL string"),
    (backend('url = "http://h"\nurls = ["http://g"]'), "backends.b.urls", "not both"),
    (backend('urls = ["http://h"]', kind="transformers").replace('kind = "transformers"',
     'kind = "transformers"\nmodel = "/m"'), "backends.b.urls", "give model, not url"),
    # secrets in options / headers
    (backend('url = "http://h"\noptions = { headers = { Authorization = "Bearer hunter2" } }'),
     "backends.b.options.headers.Authorization", "api_key_env"),
    (backend('url = "http://h"\noptions = { headers = { x-api-key = "hunter2" } }'),
     "backends.b.options.headers.x-api-key", "api_key_env"),
    (backend('url = "http://h"\noptions = { headers = { X-Custom = "Bearer hunter2" } }'),
     "backends.b.options.headers.X-Custom", "credential"),
    (backend('url = "http://h"\noptions = { api-key = "hunter2" }'),
     "backends.b.options.api-key", "api_key_env"),
    (backend('url = "http://h"\nopenai_api_key = "hunter2"'),
     "backends.b.openai_api_key", "api_key_env"),
    # roles: one model, one vote
    (BACKENDS + '[roles]\nwriter = "a"\nanswerers = ["a", "b"]\n',
     "roles.answerers", "two votes"),
    (BACKENDS + '[roles]\nwriter = "a"\nanswerers = ["b"]\nwriter_answers = "yes"\n',
     "roles.writer_answers", "provenance"),
    (BACKENDS + '[roles]\nwriter = "a"\nanswerers = ["b"]\nwriter_answers = "provenance"\n',
     "roles.writer_answers", "not in roles.answerers"),
    (BACKENDS + '[roles]\nwriter = "a"\nanswerers = ["a"]\nwriter_answers = "provenance"\n',
     "roles.answerers", "besides the writer"),
    # paths
    ('[run]\noutput = ""\n' + GOOD, "run.output", "must not be empty"),
    ('[run]\noutput = "somedir/"\n' + GOOD, "run.output", "names a folder"),
]  # fmt: skip


@pytest.mark.parametrize(("text", "key", "problem"), BAD)
def test_bad_config_is_refused_at_load_naming_the_key(
    tmp_path: Path, text: str, key: str, problem: str
) -> None:
    path = tmp_path / "bad.toml"
    path.write_text(text)
    with pytest.raises(ConfigError) as info:
        load_config(path)
    message = str(info.value)
    assert f"{path}: {key}: " in message, message
    assert problem in message
    assert "hunter2" not in message  # a credential is never echoed


@pytest.mark.parametrize(("text", "key", "problem"), BAD)
def test_generate_with_a_bad_config_exits_2_before_creating_anything(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    text: str,
    key: str,
    problem: str,
) -> None:
    work = tmp_path / "cwd"
    work.mkdir()
    monkeypatch.chdir(work)  # relative outputs (and the default one) would land here
    path = tmp_path / "bad.toml"
    path.write_text(text.replace('"somedir/"', '"out/"'))
    assert cli.main(["generate", "--config", str(path)]) == cli.EXIT_USAGE
    err = " ".join(capsys.readouterr().err.split())
    assert key in err and "Traceback" not in err and "hunter2" not in err
    assert list(work.iterdir()) == []


def test_a_utf8_bom_is_accepted(tmp_path: Path) -> None:
    path = tmp_path / "bom.toml"
    path.write_bytes(b"\xef\xbb\xbf" + GOOD.encode())
    assert load_config(path).roles.writer == "a"


def test_invalid_utf8_names_the_line(tmp_path: Path) -> None:
    path = tmp_path / "bad.toml"
    path.write_bytes(GOOD.encode() + b"# \xff\n")
    with pytest.raises(ConfigError, match="line 11: not UTF-8"):
        load_config(path)


def test_urls_vllm_alias_and_writer_answers_parse(tmp_path: Path) -> None:
    path = tmp_path / "ok.toml"
    path.write_text(
        '[backends.a]\nkind = "tgi"\nurls = ["http://g:1"]\n'
        '[backends.b]\nkind = "vllm"\nurls = ["http://h:1", "http://h:2"]\nmodel = "m"\n'
        '[roles]\nwriter = "a"\nanswerers = ["a", "b"]\nwriter_answers = "provenance"\n'
    )
    cfg = load_config(path)
    a, b = cfg.backends["a"], cfg.backends["b"]
    assert a.urls == ("http://g:1",) and a.url is None
    assert a.factory_options() == {"name": "a", "url": "http://g:1"}  # one replica: url
    assert b.kind == "vllm"
    assert b.factory_options()["urls"] == ["http://h:1", "http://h:2"]
    assert b.describe()["urls"] == ["http://h:1", "http://h:2"]
    assert cfg.roles.writer_answers == "provenance"
    assert cfg.roles.voting_answerers == ("b",)


async def test_the_vllm_alias_builds_the_openai_adapter() -> None:
    from ensemble_async.backends.openai import OpenAIBackend
    from ensemble_async.registry import backend_requires, create_backend

    assert backend_requires("vllm") == ("url",)
    backend = create_backend("vllm", url="http://127.0.0.1:9", name="v")
    try:
        assert isinstance(backend, OpenAIBackend)
    finally:
        await backend.aclose()


def test_settings_are_typed_pipeline_settings(tmp_path: Path) -> None:
    from ensemble_async.presets import PipelineSettings

    path = tmp_path / "ok.toml"
    path.write_text(GOOD + "[overrides]\ndemos = { output = 3 }\n")
    settings = load_config(path).settings()
    assert isinstance(settings, PipelineSettings)
    assert settings.demos == {"input_output": 24, "output": 3}


@pytest.mark.parametrize(
    ("text", "needle"),
    [
        ("tgi", "needs a url"),
        ("tgi=http://u:hunter2@h", "credentials"),
        ("openai=http://h,api_key=hunter2", "api_key_env"),
        ("tgi=http://h,concurrency=0", "must be >= 1"),
    ],
)
def test_member_specs_are_validated_like_backend_tables(text: str, needle: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_member(text)
    assert needle in str(info.value) and "hunter2" not in str(info.value)


def test_member_spec_fields_and_options() -> None:
    spec = parse_member("openai=http://h:1,model=m,name=x,concurrency=3,mode=chat", 2)
    assert (spec.name, spec.url, spec.model, spec.concurrency) == ("x", "http://h:1", "m", 3)
    assert dict(spec.options) == {"mode": "chat"}
    local = parse_member("transformers=/models/m", 0)
    assert local.model == "/models/m" and local.url is None and local.name == "transformers-0"


def _seed(i: int, given: str) -> str:
    task = {
        "id": f"s{i}",
        "name": "n",
        "instruction": "Do the thing with what is given.",
        "instances": [{"input": given, "output": "done"}],
        "is_classification": False,
    }
    return json.dumps(task) + "\n"


def _seed_config(tmp_path: Path, seeds: Path) -> Path:
    cfg = tmp_path / "cfg.toml"
    cfg.write_text(f'[run]\nseeds = "{seeds}"\noutput = "{tmp_path / "out" / "r.jsonl"}"\n' + GOOD)
    return cfg


def test_a_seed_file_with_one_kind_only_is_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    seeds = tmp_path / "seeds.jsonl"
    seeds.write_text(_seed(1, "some input") + _seed(2, "more input"))
    cfg = _seed_config(tmp_path, seeds)
    assert cli.main(["generate", "--config", str(cfg)]) == cli.EXIT_USAGE
    err = " ".join(capsys.readouterr().err.split())
    assert "run.seeds" in err and "no seed task of kind 'output'" in err
    assert not (tmp_path / "out").exists()


def test_an_overlong_seed_line_is_refused_with_file_and_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from ensemble_async.seedtasks import MAX_LINE_BYTES

    seeds = tmp_path / "seeds.jsonl"
    with seeds.open("w") as f:
        f.write(_seed(1, "x") + _seed(2, ""))
        f.write('{"id": "' + "a" * (MAX_LINE_BYTES + 10) + '"}\n')
    cfg = _seed_config(tmp_path, seeds)
    assert cli.main(["generate", "--config", str(cfg)]) == cli.EXIT_USAGE
    err = " ".join(capsys.readouterr().err.split())
    assert "seeds.jsonl:3" in err and "longer than" in err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    ("io_n", "o_n", "limit", "expected"),
    [
        (8, 4, 2, (1, 1)),
        (8, 4, 3, (2, 1)),
        (1, 10, 5, (1, 4)),
        (8, 4, 100, (8, 4)),
        (0, 3, 2, (0, 2)),
    ],
)
def test_limit_shares_the_cap_between_the_types(
    io_n: int, o_n: int, limit: int, expected: tuple[int, int]
) -> None:
    from ensemble_async.config import Targets

    capped = Targets(io_n, o_n).capped(limit)
    assert (capped.input_output, capped.output) == expected
