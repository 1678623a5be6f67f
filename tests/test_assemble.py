"""One place assembles a run: the layering holds, the embedded default has one home,
and a member that cannot serve stops ``generate`` (exit 3) before anything is written."""

from __future__ import annotations

import ast
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from test_cli_generate import config_text, servers, write_config

from ensemble_async import cli
from ensemble_async.assemble import (
    MemberCannotServe,
    Probe,
    cache_identity,
    load_seeds,
    open_run,
    probe_backend,
    probe_request,
)
from ensemble_async.backend import BaseBackend
from ensemble_async.config import BackendConfig, load_config
from ensemble_async.types import BackendInfo, Completion, GenerationRequest, Health

__all__ = ["servers"]  # the module-scoped fixture, shared with test_cli_generate

PACKAGE = Path(__file__).resolve().parents[1] / "ensemble_async"


def imported_modules(name: str) -> set[str]:
    """The package modules ``ensemble_async/<name>.py`` imports (at any depth)."""
    tree = ast.parse((PACKAGE / f"{name}.py").read_text())
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.level == 1:
            if node.module:
                found.add(node.module.split(".")[0])
            else:
                found.update(alias.name for alias in node.names)
    return found


def test_data_flows_down_cli_assemble_config() -> None:
    config_imports = imported_modules("config")
    assert not config_imports & {"member", "cache", "ensemble", "pipeline", "assemble", "cli"}
    assert "presets" in config_imports  # PipelineSettings from its own home
    assert "cli" not in imported_modules("assemble")
    assert not imported_modules("cli") & {"retry", "member_factory", "ensemble"}
    source = (PACKAGE / "cli.py").read_text()
    assert "create_backend(" not in source and "Member(" not in source
    # the embedded default is defined once
    for name in ("cli", "config"):
        text = (PACKAGE / f"{name}.py").read_text()
        assert "SMOLLM2" not in text and "embedded_backend_options" not in text


def test_cache_identity_is_the_local_model_path() -> None:
    local = BackendConfig(name="m", kind="transformers", model="/models/x", gguf_file="q.gguf")
    assert cache_identity(local) == "/models/x/q.gguf"
    server = BackendConfig(name="s", kind="openai", url="http://h", model="served")
    assert cache_identity(server) is None


def test_ray_hosted_http_backends_reserve_a_fraction_of_a_core() -> None:
    """Under --ray an actor that only waits on a server reserves RAY_HTTP_ACTOR_CPUS
    (a small cluster can place many), unless the options say otherwise; a local model's
    actor keeps a whole core. Nothing starts Ray here: actors spawn on first use."""
    pytest.importorskip("ray")
    from types import MappingProxyType

    from ensemble_async.assemble import RAY_HTTP_ACTOR_CPUS, _create

    server = BackendConfig(name="s", kind="tgi", url="http://127.0.0.1:9")
    hosted = _create(server, "cfg.toml", "backends.s", ray="local")
    assert getattr(hosted, "num_cpus", None) == RAY_HTTP_ACTOR_CPUS < 1
    pinned = BackendConfig(
        name="p", kind="openai", url="http://127.0.0.1:9", options=MappingProxyType({"num_cpus": 2})
    )
    assert getattr(_create(pinned, "cfg.toml", "backends.p", ray="local"), "num_cpus", None) == 2
    local = BackendConfig(name="m", kind="transformers", model="/models/x")
    assert getattr(_create(local, "cfg.toml", "backends.m", ray="local"), "num_cpus", None) == 1


class Lister(BaseBackend):
    """Healthy, lists ``models``, answers one token."""

    kind = "lister"

    def __init__(self, models: list[str]) -> None:
        super().__init__(name="lister")
        self.models = models
        self.requests: list[GenerationRequest] = []

    async def health(self) -> Health:
        return Health(ok=True, latency_s=0.0)

    async def info(self) -> BackendInfo:
        return BackendInfo(name=self.name, kind=self.kind, extra={"models": self.models})

    async def generate(self, request: GenerationRequest) -> list[Completion]:
        self.requests.append(request)
        return [Completion(text="x", finish_reason="length", backend=self.name, latency_s=0.0)]

    async def stream(self, request: GenerationRequest) -> AsyncIterator[Any]:  # pragma: no cover
        raise NotImplementedError
        yield


async def test_probe_names_the_model_asked_for_and_the_models_served() -> None:
    spec = BackendConfig(name="gpu2", kind="openai", url="http://h", model="wanted")
    backend = Lister(["served-a", "served-b"])
    probe = await probe_backend(spec, backend, timeout=5)
    assert not probe.ok and backend.requests == []  # refused before any request
    line = probe.problem()
    assert "member gpu2" in line and "wanted" in line and "served-a, served-b" in line

    ok = await probe_backend(
        BackendConfig(name="g", kind="openai", url="http://h", model="served-a"),
        backend,
        timeout=5,
    )
    assert ok.ok and ok.latency_s is not None
    assert backend.requests[-1].max_new_tokens == 1


async def test_probe_tolerates_a_server_that_lists_nothing_usable() -> None:
    spec = BackendConfig(name="g", kind="openai", url="http://h", model="m")
    backend = Lister([3, None])  # type: ignore[list-item]
    probe = await probe_backend(spec, backend, timeout=5)
    assert probe.ok and probe.served_models == ()


def test_probe_request_uses_the_run_request_builder(tmp_path: Path) -> None:
    cfg = tmp_path / "c.toml"
    cfg.write_text(
        '[backends.a]\nkind = "tgi"\nurl = "http://h"\n[backends.b]\nkind = "tgi"\n'
        'url = "http://g"\n[roles]\nwriter = "a"\nanswerers = ["b"]\n'
        '[overrides]\nanswer_decoding = { stop = ["END"] }\n'
    )
    request = probe_request(load_config(cfg))
    assert request.max_new_tokens == 1 and request.stop == ("END",)


def wrong_model_config(urls: tuple[str, str], out: Path) -> str:
    return config_text(*urls, out).replace(
        '[backends.answerer]\nkind = "openai"',
        '[backends.answerer]\nkind = "openai"\nmodel = "no-such-model"',
    )


def test_generate_stops_with_exit_3_naming_the_member_and_model(
    servers: tuple[str, str], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "out" / "records.jsonl"
    cfg = write_config(tmp_path / "cfg.toml", wrong_model_config(servers, out))
    log = tmp_path / "logs" / "log.jsonl"
    code = cli.main(["generate", "--config", str(cfg), "--log-jsonl", str(log)])
    assert code == cli.EXIT_BACKENDS_FAILED
    assert not (tmp_path / "logs").exists()  # not even the progress log
    err = " ".join(capsys.readouterr().err.split())
    assert "member answerer" in err and "no-such-model" in err and "Traceback" not in err
    assert "member writer" not in err  # the healthy one is not blamed
    assert not (tmp_path / "out").exists()  # no records, rejects or cache file


def test_check_names_the_missing_model(
    servers: tuple[str, str],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("COLUMNS", "250")
    cfg = write_config(tmp_path / "cfg.toml", wrong_model_config(servers, tmp_path / "r.jsonl"))
    assert cli.main(["check", "--config", str(cfg), "--timeout", "10"]) == 3
    out = " ".join(capsys.readouterr().out.split())
    assert "member answerer" in out and "model asked for: no-such-model" in out


async def test_open_run_raises_before_any_file_exists(
    servers: tuple[str, str], tmp_path: Path
) -> None:
    out = tmp_path / "out" / "records.jsonl"
    cfg = load_config(write_config(tmp_path / "cfg.toml", wrong_model_config(servers, out)))
    with pytest.raises(MemberCannotServe) as info:
        async with open_run(cfg, probe_timeout=10):
            pytest.fail("the run opened")  # pragma: no cover
    assert [p.name for p in info.value.probes] == ["answerer"]
    assert isinstance(info.value.probes[0], Probe)
    assert not (tmp_path / "out").exists()


async def test_open_run_opens_members_cache_and_records(
    servers: tuple[str, str], tmp_path: Path
) -> None:
    out = tmp_path / "out" / "records.jsonl"
    cfg = load_config(write_config(tmp_path / "cfg.toml", config_text(*servers, out)))
    async with open_run(cfg, probe_timeout=10) as run:
        assert run.writer.name == "writer" and [m.name for m in run.answerers] == ["answerer"]
        assert run.members == [run.writer, *run.answerers]
        assert run.cache is not None and out.exists()
        assert run.pipeline(load_seeds(cfg), events=None).writer is run.writer


class LoadsOnFirstCall(Lister):
    """Like a local model: unhealthy until its first call loads it."""

    async def health(self) -> Health:
        return Health(ok=bool(self.requests), latency_s=0.0, detail="not started")


async def test_a_local_model_is_loaded_by_the_probe_before_its_health_is_asked() -> None:
    spec = BackendConfig(name="local", kind="transformers", model="/models/m")
    backend = LoadsOnFirstCall([])
    probe = await probe_backend(spec, backend, timeout=None)
    assert probe.ok, probe.problem()
    assert len(backend.requests) == 1  # one request, not one more after the health check
    # a server is asked for its health first, and an unhealthy one gets no request
    server = BackendConfig(name="srv", kind="openai", url="http://h")
    cold = LoadsOnFirstCall([])
    probe = await probe_backend(server, cold, timeout=5)
    assert not probe.ok and cold.requests == [] and "not started" in probe.problem()
