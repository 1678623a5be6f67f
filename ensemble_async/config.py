"""Run configuration: a TOML file -> frozen dataclasses, validated with clear errors.

Schema (documented with a full example in ``docs/config.md``)::

    [run]
    preset = "default"              # "paper" or "default"
    seed = 42                       # demo sampling and request seeds
    output = "out/records.jsonl"    # rejects and cache paths are derived beside it
    rejects = "out/rejects.jsonl"   # optional
    cache = true                    # content-addressed response cache (sqlite)
    cache_path = "out/cache.sqlite" # optional
    seeds = "my_seeds.jsonl"        # optional; default: the project's own seed tasks
    targets = { input_output = 100, output = 50 }

    [backends.gpu1]
    kind = "tgi"                    # a registered backend kind (registry.backend_kinds())
    url = "http://gpu1:8080"        # http(s) URL, or model = ... (+ gguf_file) for local
    concurrency = 16
    max_concurrency = 64
    rpm = 600
    tpm = 200000
    timeout_s = 120
    max_attempts = 5
    api_key_env = "GPU1_KEY"        # the NAME of an environment variable; never the key
    instruction_tuned = true        # false: a base model, answers need in-context demos
    options = { endpoint = "generate" }   # passed through to the backend factory

    [roles]
    writer = "gpu1"
    answerers = ["gpu1", "gpu2"]

    [overrides]                     # PipelineSettings.preset(preset, **overrides)
    novelty_threshold = 0.7

Relative paths are resolved against the current working directory.

Every problem raises :class:`ConfigError`, whose message names the file, the key path
(e.g. ``backends.gpu1.url``) and what is wrong.  ``load_config`` checks everything that
can be checked without side effects; ``build_members`` checks the environment (API key
variables) before it creates anything; ``check_output_writable`` checks the output
paths (an :class:`OutputError`).
"""

from __future__ import annotations

import dataclasses
import importlib
import os
import tomllib
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from .errors import UnknownBackendError
from .member import Member
from .registry import backend_kinds, create_backend
from .retry import RetryPolicy
from .secret import MissingSecretError

if TYPE_CHECKING:
    from .backend import Backend
    from .cache import ResponseCache

__all__ = [
    "PRESETS",
    "BackendConfig",
    "Config",
    "ConfigError",
    "OutputError",
    "RolesConfig",
    "RunConfig",
    "Targets",
    "build_members",
    "check_environment",
    "check_output_writable",
    "default_config",
    "load_config",
    "parse_config",
]

PRESETS = ("paper", "default")
HTTP_KINDS = frozenset({"tgi", "openai"})
"""Kinds that talk to a server and need a ``url``."""
LOCAL_KINDS = frozenset({"transformers"})
"""Kinds that load a local model and need a ``model``."""

DEFAULT_OUTPUT = Path("ensemble_out") / "records.jsonl"


class ConfigError(ValueError):
    """A configuration problem; ``str()`` names the file, the key path and the problem."""

    def __init__(self, source: str, key: str | None, problem: str) -> None:
        self.source = source
        self.key = key
        self.problem = problem
        where = f"{source}: {key}" if key else source
        super().__init__(f"{where}: {problem}")


class OutputError(ConfigError):
    """The output location cannot be written."""


# --------------------------------------------------------------------------- dataclasses


@dataclass(frozen=True)
class Targets:
    """How many instructions to keep per task type."""

    input_output: int = 3
    output: int = 2

    def to_dict(self) -> dict[str, int]:
        return {"input_output": self.input_output, "output": self.output}


@dataclass(frozen=True)
class RunConfig:
    preset: str = "default"
    seed: int = 42
    output: Path = DEFAULT_OUTPUT
    rejects: Path | None = None
    cache: bool = True
    cache_path: Path | None = None
    seeds: Path | None = None
    targets: Targets = field(default_factory=Targets)

    @property
    def rejects_path(self) -> Path:
        """``rejects``, else ``<output stem>.rejects.jsonl`` beside the output."""
        return self.rejects or self.output.with_name(f"{self.output.stem}.rejects.jsonl")

    @property
    def cache_file(self) -> Path:
        """``cache_path``, else ``<output stem>.cache.sqlite`` beside the output."""
        return self.cache_path or self.output.with_name(f"{self.output.stem}.cache.sqlite")


@dataclass(frozen=True)
class BackendConfig:
    name: str
    kind: str
    url: str | None = None
    model: str | None = None
    gguf_file: str | None = None
    concurrency: int = 8
    max_concurrency: int | None = None
    rpm: float | None = None
    tpm: float | None = None
    timeout_s: float | None = None
    max_attempts: int = 5
    api_key_env: str | None = None
    instruction_tuned: bool = True
    options: Mapping[str, Any] = field(default_factory=lambda: MappingProxyType({}))

    def factory_options(self) -> dict[str, Any]:
        """Keyword options for ``registry.create_backend(kind, **options)``."""
        options: dict[str, Any] = {"name": self.name}
        for key in ("url", "model", "gguf_file", "api_key_env"):
            value = getattr(self, key)
            if value is not None:
                options[key] = value
        options.update(self.options)
        return options

    def describe(self) -> dict[str, Any]:
        """A JSON-ready description without secrets (the key's variable name only)."""
        return {
            "name": self.name,
            "kind": self.kind,
            "url": self.url,
            "model": self.model,
            "api_key_env": self.api_key_env,
        }


@dataclass(frozen=True)
class RolesConfig:
    writer: str
    answerers: tuple[str, ...]


@dataclass(frozen=True)
class Config:
    run: RunConfig
    backends: Mapping[str, BackendConfig]
    roles: RolesConfig
    overrides: Mapping[str, Any] = field(default_factory=lambda: MappingProxyType({}))
    source: str = "<config>"

    def with_output(self, output: str | Path) -> Config:
        """The same config writing to another records path (derived paths follow it
        unless they were given explicitly)."""
        return dataclasses.replace(self, run=dataclasses.replace(self.run, output=Path(output)))

    def settings(self) -> Any:
        """``PipelineSettings.preset(preset, seed=..., targets=..., **overrides)``.

        An override for a nested setting (a decoding table, the demo counts) changes
        only the keys it names; arrays become tuples."""
        settings_cls = _pipeline_settings()
        if settings_cls is None:
            raise ConfigError(self.source, None, "the pipeline module is not installed")
        try:
            base = settings_cls.preset(self.run.preset)
            overrides: dict[str, Any] = {
                "seed": self.run.seed,
                "targets": self.run.targets.to_dict(),
            }
            for key, value in self.overrides.items():
                overrides[key] = _merge(getattr(base, key, None), value)
            return settings_cls.preset(self.run.preset, **overrides)
        except (TypeError, ValueError) as exc:
            raise ConfigError(self.source, "overrides", str(exc)) from None


def _merge(current: Any, value: Any) -> Any:
    """``value`` applied over ``current``: tables update dataclasses and dicts key by key."""
    if isinstance(value, list):
        return tuple(_merge(None, v) for v in value)
    if isinstance(value, dict):
        if dataclasses.is_dataclass(current) and not isinstance(current, type):
            return dataclasses.replace(
                current, **{k: _merge(getattr(current, k, None), v) for k, v in value.items()}
            )
        if isinstance(current, dict):
            return {**current, **value}
    return value


def _pipeline_settings() -> Any:
    """``ensemble_async.pipeline.PipelineSettings``, or None when that module is absent."""
    try:
        module = importlib.import_module("ensemble_async.pipeline")
    except ModuleNotFoundError:
        return None
    return getattr(module, "PipelineSettings", None)


def _settings_fields(cls: Any) -> set[str]:
    if dataclasses.is_dataclass(cls):
        return {f.name for f in dataclasses.fields(cls)}
    return set()


# --------------------------------------------------------------------------- parsing


class _Reader:
    """Typed access to one TOML table with key paths in every error."""

    def __init__(self, source: str, table: Mapping[str, Any], path: str) -> None:
        self.source = source
        self.table = table
        self.path = path
        self.used: set[str] = set()

    def key(self, name: str) -> str:
        return f"{self.path}.{name}" if self.path else name

    def fail(self, name: str | None, problem: str) -> ConfigError:
        return ConfigError(self.source, self.key(name) if name else self.path or None, problem)

    def get(self, name: str, types: tuple[type, ...], what: str, *, required: bool = False) -> Any:
        self.used.add(name)
        if name not in self.table:
            if required:
                raise self.fail(name, "missing required key")
            return None
        value = self.table[name]
        # bool is an int in Python; a TOML boolean is never a number here.
        if isinstance(value, bool) and bool not in types:
            raise self.fail(name, f"expected {what}, got a boolean")
        if not isinstance(value, types):
            raise self.fail(name, f"expected {what}, got {_toml_type(value)}")
        return value

    def string(self, name: str, *, required: bool = False) -> str | None:
        value = self.get(name, (str,), "a string", required=required)
        if value is not None and not value.strip():
            raise self.fail(name, "must not be empty")
        return value  # type: ignore[no-any-return]

    def integer(self, name: str, *, minimum: int | None = None) -> int | None:
        value = self.get(name, (int,), "an integer")
        if value is not None and minimum is not None and value < minimum:
            raise self.fail(name, f"must be >= {minimum}, got {value}")
        return value  # type: ignore[no-any-return]

    def number(self, name: str, *, positive: bool = True) -> float | None:
        value = self.get(name, (int, float), "a number")
        if value is not None and positive and not value > 0:
            raise self.fail(name, f"must be > 0, got {value}")
        return None if value is None else float(value)

    def boolean(self, name: str) -> bool | None:
        return self.get(name, (bool,), "true or false")  # type: ignore[no-any-return]

    def table_(self, name: str) -> Mapping[str, Any] | None:
        return self.get(name, (dict,), "a table")  # type: ignore[no-any-return]

    def finish(self) -> None:
        unknown = sorted(set(self.table) - self.used)
        if unknown:
            raise self.fail(unknown[0], "unknown key")


def _toml_type(value: object) -> str:
    names = {
        bool: "a boolean",
        int: "an integer",
        float: "a float",
        str: "a string",
        list: "an array",
        dict: "a table",
    }
    return names.get(type(value), type(value).__name__)


def load_config(path: str | Path) -> Config:
    """Read and validate a TOML config file."""
    source = str(path)
    try:
        text = Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(source, None, "file not found") from None
    except OSError as exc:
        raise ConfigError(source, None, f"cannot read: {exc.strerror or exc}") from None
    except UnicodeDecodeError:
        raise ConfigError(source, None, "not UTF-8 text") from None
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(source, None, f"invalid TOML: {exc}") from None
    return parse_config(data, source=source)


def parse_config(data: Mapping[str, Any], *, source: str = "<config>") -> Config:
    """Validate an already parsed TOML document."""
    top = _Reader(source, data, "")
    run_table = top.table_("run") or {}
    backends_table = top.table_("backends")
    roles_table = top.table_("roles")
    overrides = top.table_("overrides") or {}
    top.finish()
    if not backends_table:
        raise ConfigError(source, "backends", "at least one backend is required")
    if roles_table is None:
        raise ConfigError(source, "roles", "missing required table")

    run = _parse_run(_Reader(source, run_table, "run"))
    backends: dict[str, BackendConfig] = {}
    kinds = backend_kinds()
    for name, table in backends_table.items():
        key = f"backends.{name}"
        if not isinstance(table, dict):
            raise ConfigError(source, key, f"expected a table, got {_toml_type(table)}")
        backends[name] = _parse_backend(_Reader(source, table, key), name, kinds)
    roles = _parse_roles(_Reader(source, roles_table, "roles"), backends)
    _check_overrides(source, overrides)
    return Config(
        run=run,
        backends=MappingProxyType(backends),
        roles=roles,
        overrides=MappingProxyType(dict(overrides)),
        source=source,
    )


def _path(reader: _Reader, name: str) -> Path | None:
    text = reader.string(name)
    return None if text is None else Path(text).expanduser()


def _parse_run(r: _Reader) -> RunConfig:
    preset = r.string("preset") or "default"
    if preset not in PRESETS:
        raise r.fail("preset", f"unknown preset {preset!r} (known: {', '.join(PRESETS)})")
    seed = r.integer("seed", minimum=0)
    output = _path(r, "output")
    rejects = _path(r, "rejects")
    cache = r.boolean("cache")
    cache_path = _path(r, "cache_path")
    seeds = _path(r, "seeds")
    targets_table = r.table_("targets")
    r.finish()
    targets = Targets()
    if targets_table is not None:
        t = _Reader(r.source, targets_table, "run.targets")
        io_n = t.integer("input_output", minimum=0)
        o_n = t.integer("output", minimum=0)
        t.finish()
        targets = Targets(
            input_output=targets.input_output if io_n is None else io_n,
            output=targets.output if o_n is None else o_n,
        )
    out = output or DEFAULT_OUTPUT
    derived = {"rejects": rejects, "cache_path": cache_path}
    for key, value in derived.items():
        if value is not None and value == out:
            raise r.fail(key, "must differ from run.output")
    return RunConfig(
        preset=preset,
        seed=42 if seed is None else seed,
        output=out,
        rejects=rejects,
        cache=True if cache is None else cache,
        cache_path=cache_path,
        seeds=seeds,
        targets=targets,
    )


def _parse_backend(r: _Reader, name: str, kinds: Sequence[str]) -> BackendConfig:
    if "api_key" in r.table:
        raise r.fail(
            "api_key",
            "an API key may not be written in the config; put it in an environment "
            "variable and name that variable with api_key_env",
        )
    kind = r.string("kind", required=True)
    assert kind is not None
    if kind not in kinds:
        raise r.fail("kind", f"unknown backend kind {kind!r} (registered: {', '.join(kinds)})")
    url = r.string("url")
    model = r.string("model")
    gguf_file = r.string("gguf_file")
    concurrency = r.integer("concurrency", minimum=1)
    max_concurrency = r.integer("max_concurrency", minimum=1)
    rpm = r.number("rpm")
    tpm = r.number("tpm")
    timeout_s = r.number("timeout_s")
    max_attempts = r.integer("max_attempts", minimum=1)
    api_key_env = r.string("api_key_env")
    instruction_tuned = r.boolean("instruction_tuned")
    options = r.table_("options") or {}
    r.finish()

    if url is not None:
        scheme = urlsplit(url).scheme
        if scheme not in ("http", "https"):
            raise r.fail("url", f"URL scheme must be http or https, got {url!r}")
        if not urlsplit(url).netloc:
            raise r.fail("url", f"URL has no host: {url!r}")
    if kind in HTTP_KINDS and url is None:
        raise r.fail("url", f"missing required key (a {kind} backend talks to a server)")
    if kind in LOCAL_KINDS and model is None:
        raise r.fail("model", f"missing required key (a {kind} backend loads a local model)")
    if kind in LOCAL_KINDS and url is not None:
        raise r.fail("url", f"a {kind} backend loads a local model: give model, not url")
    if gguf_file is not None and model is None:
        raise r.fail("gguf_file", "needs model (the folder holding the file)")
    if api_key_env is not None and not api_key_env.replace("_", "").isalnum():
        raise r.fail("api_key_env", f"not an environment variable name: {api_key_env!r}")
    if concurrency is not None and max_concurrency is not None and max_concurrency < concurrency:
        raise r.fail("max_concurrency", f"must be >= concurrency ({concurrency})")
    for key in options:
        okey = f"options.{key}"
        if key in ("api_key", "key", "token", "password"):
            raise r.fail(okey, "secrets may not be written in the config; use api_key_env")
        if key in ("name", "url", "model", "gguf_file", "api_key_env"):
            raise r.fail(okey, f"set {key} directly in the backend table, not in options")
    return BackendConfig(
        name=name,
        kind=kind,
        url=url,
        model=model,
        gguf_file=gguf_file,
        concurrency=8 if concurrency is None else concurrency,
        max_concurrency=max_concurrency,
        rpm=rpm,
        tpm=tpm,
        timeout_s=timeout_s,
        max_attempts=5 if max_attempts is None else max_attempts,
        api_key_env=api_key_env,
        instruction_tuned=True if instruction_tuned is None else instruction_tuned,
        options=MappingProxyType(dict(options)),
    )


def _parse_roles(r: _Reader, backends: Mapping[str, BackendConfig]) -> RolesConfig:
    writer = r.string("writer", required=True)
    answerers = r.get("answerers", (list,), "an array of backend names", required=True)
    r.finish()
    assert writer is not None
    if writer not in backends:
        raise r.fail("writer", f"names undefined backend {writer!r} (defined: {_names(backends)})")
    if not answerers:
        raise r.fail("answerers", "needs at least one backend")
    seen: set[str] = set()
    for i, name in enumerate(answerers):
        key = f"answerers[{i}]"
        if not isinstance(name, str):
            raise r.fail(key, f"expected a backend name, got {_toml_type(name)}")
        if name not in backends:
            raise r.fail(key, f"names undefined backend {name!r} (defined: {_names(backends)})")
        if name in seen:
            raise r.fail(key, f"backend {name!r} is listed twice")
        seen.add(name)
    return RolesConfig(writer=writer, answerers=tuple(answerers))


def _names(backends: Iterable[str]) -> str:
    return ", ".join(sorted(backends)) or "none"


def _check_overrides(source: str, overrides: Mapping[str, Any]) -> None:
    """Unknown override keys are caught here when the pipeline module is installed."""
    settings_cls = _pipeline_settings()
    if settings_cls is None:  # pragma: no cover - the pipeline module ships with the package
        return
    fields = _settings_fields(settings_cls)
    if not fields:
        return
    for key in overrides:
        if key in ("seed", "targets", "preset", "name"):
            raise ConfigError(source, f"overrides.{key}", "set it in [run] (preset, seed, targets)")
        if key not in fields:
            raise ConfigError(
                source, f"overrides.{key}", f"unknown pipeline setting (known: {_names(fields)})"
            )


# --------------------------------------------------------------------------- default


def default_config(*, output: str | Path | None = None) -> Config:
    """The embedded default: the two small local models, sized for a CPU.

    SmolLM2-135M-Instruct writes instructions and instances (step 1-2) and answers
    (step 4); Gemma-3-270M answers too.  Both answer, so every item gets three
    candidates (the writer's instance output, then each answer), as in the paper's
    three-way consensus.  Gemma here is a *base* model (not instruction-tuned): it is
    marked ``instruction_tuned = false`` so its answer prompts carry in-context demos
    (SPEC step 4) instead of a bare question.

    Resolving the model files may assemble a GGUF file (blocking, once): call this
    before the event loop starts.
    """
    from .models import GEMMA3, SMOLLM2, embedded_backend_options

    backends: dict[str, BackendConfig] = {}
    for model in (SMOLLM2, GEMMA3):
        opts = embedded_backend_options(model.key)
        backends[model.key] = BackendConfig(
            name=model.key,
            kind="transformers",
            model=opts["model"],
            gguf_file=opts.get("gguf_file"),
            concurrency=4,
            max_attempts=2,
            instruction_tuned=model.instruction_tuned,
        )
    run = RunConfig(
        preset="default",
        seed=42,
        output=Path(output) if output is not None else DEFAULT_OUTPUT,
        targets=Targets(input_output=3, output=2),
    )
    return Config(
        run=run,
        backends=MappingProxyType(backends),
        roles=RolesConfig(writer=SMOLLM2.key, answerers=(SMOLLM2.key, GEMMA3.key)),
        source="<embedded default>",
    )


# --------------------------------------------------------------------------- building


def check_output_writable(config: Config) -> None:
    """Raise :class:`OutputError` unless every output file can be created or appended."""
    paths = [("run.output", config.run.output), ("run.rejects", config.run.rejects_path)]
    if config.run.cache:
        paths.append(("run.cache_path", config.run.cache_file))
    for key, path in paths:
        problem = _unwritable(path)
        if problem:
            raise OutputError(config.source, key, f"{path}: {problem}")


def _unwritable(path: Path) -> str | None:
    if path.exists():
        if path.is_dir():
            return "is a directory"
        if not os.access(path, os.W_OK):
            return "file is not writable"
        return None
    parent = path.parent
    while not parent.exists():
        if parent.parent == parent:
            return "no existing parent directory"
        parent = parent.parent
    if not parent.is_dir():
        return f"{parent} is not a directory"
    if not os.access(parent, os.W_OK | os.X_OK):
        return f"directory {parent} is not writable"
    return None


def check_environment(config: Config, names: Sequence[str] | None = None) -> None:
    """Raise :class:`ConfigError` when a used backend's ``api_key_env`` variable is unset."""
    _check_env(config, used_backends(config) if names is None else names)


def _check_env(config: Config, names: Sequence[str]) -> None:
    for name in names:
        variable = config.backends[name].api_key_env
        if variable is not None and not os.environ.get(variable):
            raise ConfigError(
                config.source,
                f"backends.{name}.api_key_env",
                f"environment variable {variable} is not set",
            )


def used_backends(config: Config) -> list[str]:
    """The backends that some role uses, writer first, each once."""
    names = [config.roles.writer, *config.roles.answerers]
    return list(dict.fromkeys(names))


def create_backends(config: Config, names: Sequence[str] | None = None) -> dict[str, Backend]:
    """Create the named backends (default: every backend a role uses)."""
    names = list(names) if names is not None else used_backends(config)
    _check_env(config, names)
    created: dict[str, Backend] = {}
    for name in names:
        spec = config.backends[name]
        key = f"backends.{name}"
        try:
            created[name] = create_backend(spec.kind, **spec.factory_options())
        except UnknownBackendError as exc:
            raise ConfigError(config.source, f"{key}.kind", str(exc)) from None
        except MissingSecretError as exc:
            raise ConfigError(config.source, f"{key}.api_key_env", str(exc)) from None
        except FileNotFoundError as exc:  # a local model that is not there
            raise ConfigError(config.source, f"{key}.model", str(exc)) from None
        except (TypeError, ValueError) as exc:
            raise ConfigError(config.source, f"{key}.options", f"bad option: {exc}") from None
    return created


def make_member(
    spec: BackendConfig,
    backend: Backend,
    *,
    cache: ResponseCache | None = None,
    cache_identity: str | None = None,
) -> Member:
    """A Member with the backend's limits from the config (and the response cache)."""
    return Member(
        backend,
        name=spec.name,
        concurrency=spec.concurrency,
        max_concurrency=spec.max_concurrency,
        rpm=spec.rpm,
        tpm=spec.tpm,
        retry=RetryPolicy(max_attempts=spec.max_attempts),
        timeout_s=spec.timeout_s,
        instruction_tuned=spec.instruction_tuned,
        cache=cache,
        cache_identity=cache_identity,
    )


def build_members(
    config: Config, *, cache: ResponseCache | None = None
) -> tuple[Member, list[Member]]:
    """``(writer, answerers)``: one Member per used backend (a backend in both roles is
    one Member).  With a ``ResponseCache`` given (the caller opens it when
    ``config.run.cache`` is on, and closes it), every member looks its requests up
    there before any admission, keyed by its kind, name and model (a local model's
    path, or the model the server reports)."""
    backends = create_backends(config)
    members: dict[str, Member] = {}
    for name, backend in backends.items():
        spec = config.backends[name]
        # A configured local model stands for itself in the keys (no costly info());
        # a server's model is read from it once.
        identity = None
        if cache is not None and spec.model is not None and spec.url is None:
            identity = spec.model + (f"/{spec.gguf_file}" if spec.gguf_file else "")
        members[name] = make_member(spec, backend, cache=cache, cache_identity=identity)
    return members[config.roles.writer], [members[n] for n in config.roles.answerers]
