"""Run configuration: a TOML file (or ``--member`` specs) -> frozen dataclasses, validated
with clear errors.  This module parses and validates; it constructs no backend, member,
cache or file (``ensemble_async.assemble`` does that from what is parsed here).

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
    url = "http://gpu1:8080"        # or urls = [...] (replicas), or model = ... for local
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
    answerers = ["gpu2", "gpu3"]    # the writer is not an answerer (one model, one vote)
    # writer_answers = "provenance" # opt in: the writer also answers, recorded only

    [overrides]                     # PipelineSettings.preset(preset, **overrides)
    novelty_threshold = 0.7

Relative paths are resolved against the current working directory.

Every problem raises :class:`ConfigError`, whose message names the file, the key path
(e.g. ``backends.gpu1.url``) and what is wrong.  :func:`load_config` checks everything
that can be checked without side effects, the pipeline overrides included (so a bad
override stops the run before any file is created); :func:`check_environment` checks
the API key variables and :func:`check_output_writable` the output paths (an
:class:`OutputError`).  What a backend kind needs (``url`` or ``model``) is read from
the kind's class through the registry (``BaseBackend.requires``), never from a list of
built-in kinds.
"""

from __future__ import annotations

import dataclasses
import math
import os
import tomllib
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any, Literal
from urllib.parse import urlsplit

from .errors import UnknownBackendError
from .presets import PRESETS, Decoding, PipelineSettings
from .records import default_rejects_path
from .registry import backend_kinds, backend_requires, resolve_kind
from .seedtasks import KINDS
from .selection import NORMALISATIONS, POLICIES, SelectionConfig

__all__ = [
    "BackendConfig",
    "Config",
    "ConfigError",
    "OutputError",
    "RolesConfig",
    "RunConfig",
    "Targets",
    "WriterAnswers",
    "check_environment",
    "check_output_writable",
    "load_config",
    "member_configs",
    "output_path",
    "parse_config",
    "parse_member",
    "used_backends",
]

DEFAULT_OUTPUT = Path("ensemble_out") / "records.jsonl"

MAX_TARGET = 1_000_000
"""Upper bound of ``run.targets.*`` (instructions to keep per task kind)."""
MAX_CONCURRENCY = 10_000
MAX_ATTEMPTS = 100
MIN_RPM = 0.1
"""Slowest accepted request rate: one request per ten minutes."""
MIN_TPM = 1.0
MAX_RATE = 1e9
MAX_TIMEOUT_S = 7 * 24 * 3600.0
MAX_NEW_TOKENS = 1_000_000
MAX_SETTING = 1_000_000
"""Upper bound of the integer pipeline settings (windows, queue sizes, demo counts)."""

WriterAnswers = Literal["provenance"]
"""``roles.writer_answers``: how a writer listed among the answerers is used."""

_BACKEND_KEYS = (
    "kind",
    "url",
    "urls",
    "model",
    "gguf_file",
    "concurrency",
    "max_concurrency",
    "rpm",
    "tpm",
    "timeout_s",
    "max_attempts",
    "api_key_env",
    "instruction_tuned",
    "options",
)
_SECRET_NAMES = frozenset(
    {
        "api_key",
        "apikey",
        "key",
        "token",
        "access_token",
        "auth_token",
        "bearer",
        "password",
        "passwd",
        "secret",
        "client_secret",
        "authorization",
        "proxy_authorization",
        "x_api_key",
        "cookie",
    }
)


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

    def capped(self, limit: int) -> Targets:
        """At most ``limit`` instructions in all (``generate --limit``), shared between
        the two types as evenly as their targets allow (type A gets the odd one)."""
        io_n = min(self.input_output, limit - min(self.output, limit // 2))
        return Targets(input_output=io_n, output=min(self.output, limit - io_n))


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
        """``rejects``, else the records module's rule (``<stem>.rejects.jsonl`` beside)."""
        return self.rejects or default_rejects_path(self.output)

    @property
    def cache_file(self) -> Path:
        """``cache_path``, else ``<output stem>.cache.sqlite`` beside the output."""
        return self.cache_path or self.output.with_name(f"{self.output.stem}.cache.sqlite")


@dataclass(frozen=True)
class BackendConfig:
    name: str
    kind: str
    url: str | None = None
    urls: tuple[str, ...] = ()
    """Replicas of one server (``urls = [...]``); empty when ``url`` (or nothing) is given."""
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
    price: tuple[float, float] | None = None
    """USD per million ``(input, output)`` tokens (``price = { input = .., output = .. }``),
    for the cost line of the run's summary; None: no cost shown."""

    @property
    def is_server(self) -> bool:
        """True when the backend talks to a server (a ``url`` or ``urls`` is set)."""
        return self.url is not None or bool(self.urls)

    @property
    def target(self) -> str:
        """Where it runs, for people: the URL(s), else the model."""
        if self.urls:
            return ", ".join(self.urls)
        return self.url or self.model or ""

    def factory_options(self) -> dict[str, Any]:
        """Keyword options for ``registry.create_backend(kind, **options)``.

        One replica in ``urls`` is passed as ``url``; several as ``urls``."""
        options: dict[str, Any] = {"name": self.name}
        if len(self.urls) == 1:
            options["url"] = self.urls[0]
        elif self.urls:
            options["urls"] = list(self.urls)
        for key in ("url", "model", "gguf_file", "api_key_env"):
            value = getattr(self, key)
            if value is not None:
                options[key] = value
        options.update(self.options)
        return options

    def describe(self) -> dict[str, Any]:
        """A JSON-ready description without secrets (the key's variable name only)."""
        out: dict[str, Any] = {
            "name": self.name,
            "kind": self.kind,
            "url": self.url,
            "model": self.model,
            "api_key_env": self.api_key_env,
        }
        if self.urls:
            out["urls"] = list(self.urls)
        return out


@dataclass(frozen=True)
class RolesConfig:
    writer: str
    answerers: tuple[str, ...]
    writer_answers: WriterAnswers | None = None
    """``"provenance"``: the writer is listed among the answerers on purpose; its answer
    is recorded as provenance only and does not vote (its instance output already is a
    candidate).  ``None``: the writer may not be an answerer."""
    min_candidates: int | None = None
    """Candidates a decision needs (the writer's output counts); ``None``: every voice.
    Items short of it because a member is unavailable are deferred, never decided."""

    @property
    def voting_answerers(self) -> tuple[str, ...]:
        """The answerers whose answers are consensus candidates (the writer excluded)."""
        return tuple(a for a in self.answerers if a != self.writer)


@dataclass(frozen=True)
class Config:
    run: RunConfig
    backends: Mapping[str, BackendConfig]
    roles: RolesConfig
    overrides: Mapping[str, Any] = field(default_factory=lambda: MappingProxyType({}))
    source: str = "<config>"
    selection: SelectionConfig = field(default_factory=SelectionConfig)
    """Which candidate a decision keeps (``[selection]``; default: plain consensus)."""
    ray: str | None = None
    """``generate --ray``: the Ray cluster the members' calls run on (``"local"`` starts
    one, ``"auto"`` joins the running one, else its address); None: this process."""

    def with_output(self, output: str | Path) -> Config:
        """The same config writing to another records path (derived paths follow it
        unless they were given explicitly)."""
        return dataclasses.replace(self, run=dataclasses.replace(self.run, output=Path(output)))

    def with_ray(self, address: str) -> Config:
        """The same run with every member's calls made from Ray actors on a cluster."""
        return dataclasses.replace(self, ray=address)

    def with_limit(self, limit: int) -> Config:
        """The same config keeping at most ``limit`` instructions in all (a preview)."""
        targets = self.run.targets.capped(limit)
        return dataclasses.replace(self, run=dataclasses.replace(self.run, targets=targets))

    def used_backends(self) -> list[str]:
        """The backends that some role uses, writer first, each once (the selection's
        target model last, when it has no other role)."""
        target = [self.selection.target] if self.selection.target else []
        return list(dict.fromkeys([self.roles.writer, *self.roles.answerers, *target]))

    def settings(self) -> PipelineSettings:
        """``PipelineSettings.preset(preset, seed=..., targets=..., **overrides)``.

        An override for a nested setting (a decoding table, the demo counts) changes
        only the keys it names; arrays become tuples.  :func:`load_config` has already
        checked every override, so this raises only for a config built by hand."""
        return _settings(self.source, self.run, self.overrides)


def used_backends(config: Config) -> list[str]:
    """The backends that some role uses, writer first, each once."""
    return config.used_backends()


def _settings(source: str, run: RunConfig, overrides: Mapping[str, Any]) -> PipelineSettings:
    try:
        base = PipelineSettings.preset(run.preset)
        values: dict[str, Any] = {"seed": run.seed, "targets": run.targets.to_dict()}
        for key, value in overrides.items():
            values[key] = _merge(getattr(base, key, None), value)
        return PipelineSettings.preset(run.preset, **values)
    except (TypeError, ValueError) as exc:
        raise ConfigError(source, "overrides", str(exc)) from None


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

    def integer(
        self, name: str, *, minimum: int | None = None, maximum: int | None = None
    ) -> int | None:
        value = self.get(name, (int,), "an integer")
        if value is not None and minimum is not None and value < minimum:
            raise self.fail(name, f"must be >= {minimum}, got {value}")
        if value is not None and maximum is not None and value > maximum:
            raise self.fail(name, f"must be <= {maximum}, got {value}")
        return value  # type: ignore[no-any-return]

    def number(
        self,
        name: str,
        *,
        positive: bool = True,
        minimum: float | None = None,
        maximum: float | None = None,
    ) -> float | None:
        value = self.get(name, (int, float), "a number")
        if value is None:
            return None
        number = float(value)
        if not math.isfinite(number):
            raise self.fail(name, f"must be a finite number, got {value}")
        if positive and not number > 0:
            raise self.fail(name, f"must be > 0, got {value}")
        if minimum is not None and number < minimum:
            raise self.fail(name, f"must be >= {minimum:g}, got {value}")
        if maximum is not None and number > maximum:
            raise self.fail(name, f"must be <= {maximum:g}, got {value}")
        return number

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
    """Read and validate a TOML config file (a UTF-8 byte-order mark is accepted)."""
    source = str(path)
    try:
        raw = Path(path).read_bytes()
    except FileNotFoundError:
        raise ConfigError(source, None, "file not found") from None
    except IsADirectoryError:
        raise ConfigError(source, None, "is a directory, not a config file") from None
    except OSError as exc:
        raise ConfigError(source, None, f"cannot read: {exc.strerror or exc}") from None
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = raw[: exc.start].count(b"\n") + 1
        raise ConfigError(source, None, f"line {line}: not UTF-8 text") from None
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(source, None, f"invalid TOML: {exc}") from None
    return parse_config(data, source=source)


def parse_config(data: Mapping[str, Any], *, source: str = "<config>") -> Config:
    """Validate an already parsed TOML document (the pipeline overrides included)."""
    top = _Reader(source, data, "")
    run_table = top.table_("run") or {}
    backends_table = top.table_("backends")
    roles_table = top.table_("roles")
    overrides = top.table_("overrides") or {}
    selection_table = top.table_("selection")
    top.finish()
    if not backends_table:
        raise ConfigError(source, "backends", "at least one backend is required")
    if roles_table is None:
        raise ConfigError(source, "roles", "missing required table")

    run = _parse_run(_Reader(source, run_table, "run"))
    backends: dict[str, BackendConfig] = {}
    for name, table in backends_table.items():
        key = f"backends.{name}"
        if not isinstance(table, dict):
            raise ConfigError(source, key, f"expected a table, got {_toml_type(table)}")
        backends[name] = _parse_backend(_Reader(source, table, key), name)
    roles = _parse_roles(_Reader(source, roles_table, "roles"), backends)
    _check_overrides(source, run, overrides)
    selection = SelectionConfig()
    if selection_table is not None:
        selection = _parse_selection(_Reader(source, selection_table, "selection"), backends)
    return Config(
        run=run,
        backends=MappingProxyType(backends),
        roles=roles,
        overrides=MappingProxyType(dict(overrides)),
        source=source,
        selection=selection,
    )


def _parse_selection(r: _Reader, backends: Mapping[str, BackendConfig]) -> SelectionConfig:
    policy = r.string("policy") or "consensus"
    target = r.string("target")
    normalise = r.string("normalise") or "mean"
    r.finish()
    if policy not in POLICIES:
        raise r.fail("policy", f"unknown policy {policy!r} (known: {', '.join(POLICIES)})")
    if normalise not in NORMALISATIONS:
        raise r.fail(
            "normalise", f"unknown normalisation {normalise!r} (known: {', '.join(NORMALISATIONS)})"
        )
    if policy == "consensus":
        if target is not None:
            raise r.fail("target", "a target model is only used by the target-fit policies")
        return SelectionConfig()
    if target is None:
        raise r.fail("target", f"policy {policy!r} needs a target backend (the model to fine-tune)")
    if target not in backends:
        raise r.fail("target", f"names undefined backend {target!r} (defined: {_names(backends)})")
    return SelectionConfig(policy=policy, target=target, normalise=normalise)  # type: ignore[arg-type]


def output_path(text: str, *, source: str, key: str | None) -> Path:
    """A records path from the user (``run.output`` or ``--output``): not empty, not a
    folder (a trailing ``/``); ``~`` is expanded."""
    if not text.strip():
        raise ConfigError(source, key, "must not be empty (name the records file)")
    if text.endswith(("/", os.sep)) or Path(text).name in ("", ".", ".."):
        raise ConfigError(source, key, f"{text!r} names a folder; name the records file in it")
    return Path(text).expanduser()


def _path(reader: _Reader, name: str) -> Path | None:
    text = reader.string(name)
    if text is None:
        return None
    return output_path(text, source=reader.source, key=reader.key(name))


def _parse_run(r: _Reader) -> RunConfig:
    preset = r.string("preset") or "default"
    if preset not in PRESETS:
        raise r.fail("preset", f"unknown preset {preset!r} (known: {', '.join(PRESETS)})")
    seed = r.integer("seed", minimum=0)
    output = _path(r, "output")
    rejects = _path(r, "rejects")
    cache = r.boolean("cache")
    cache_path = _path(r, "cache_path")
    seeds_text = r.string("seeds")
    targets_table = r.table_("targets")
    r.finish()
    targets = Targets()
    if targets_table is not None:
        t = _Reader(r.source, targets_table, "run.targets")
        io_n = t.integer("input_output", minimum=0, maximum=MAX_TARGET)
        o_n = t.integer("output", minimum=0, maximum=MAX_TARGET)
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
        seeds=None if seeds_text is None else Path(seeds_text).expanduser(),
        targets=targets,
    )


def _is_secret_name(name: str) -> bool:
    norm = name.strip().lower().replace("-", "_")
    return (
        norm in _SECRET_NAMES
        or norm.endswith(("_key", "_token", "_secret", "_password"))
        or "api_key" in norm
        or "apikey" in norm
    )


_NO_SECRETS = (
    "secrets may not be written in the config; put the key in an environment variable "
    "and name that variable with api_key_env"
)


def _check_url(r: _Reader, key: str, url: str) -> None:
    """http(s), a host, a valid port, no credentials; the URL is echoed only without
    its credentials."""
    try:
        parts = urlsplit(url)
        _ = parts.port  # raises for a port that is not a number in range
        credentials = parts.username is not None or parts.password is not None
        hostname = parts.hostname
    except ValueError as exc:
        raise r.fail(key, f"not a valid URL ({exc})") from None
    if credentials:
        raise r.fail(key, "URL carries credentials (user:password@); " + _NO_SECRETS)
    if parts.scheme not in ("http", "https"):
        raise r.fail(key, f"URL scheme must be http or https, got {url!r}")
    if not parts.netloc or not hostname:
        raise r.fail(key, f"URL has no host: {url!r}")


def _parse_backend(r: _Reader, name: str) -> BackendConfig:
    for key in r.table:
        if key != "api_key_env" and _is_secret_name(key):
            raise r.fail(key, "an API key may not be written in the config: " + _NO_SECRETS)
    kind = r.string("kind", required=True)
    assert kind is not None
    if resolve_kind(kind) not in backend_kinds():
        known = ", ".join(backend_kinds()) or "none"
        raise r.fail("kind", f"unknown backend kind {kind!r} (registered: {known})")
    try:
        requires = backend_requires(kind)
    except UnknownBackendError as exc:
        raise r.fail("kind", str(exc)) from None
    url = r.string("url")
    urls_value = r.get("urls", (list,), "an array of URLs")
    model = r.string("model")
    gguf_file = r.string("gguf_file")
    concurrency = r.integer("concurrency", minimum=1, maximum=MAX_CONCURRENCY)
    max_concurrency = r.integer("max_concurrency", minimum=1, maximum=MAX_CONCURRENCY)
    rpm = r.number("rpm", minimum=MIN_RPM, maximum=MAX_RATE)
    tpm = r.number("tpm", minimum=MIN_TPM, maximum=MAX_RATE)
    timeout_s = r.number("timeout_s", maximum=MAX_TIMEOUT_S)
    max_attempts = r.integer("max_attempts", minimum=1, maximum=MAX_ATTEMPTS)
    api_key_env = r.string("api_key_env")
    instruction_tuned = r.boolean("instruction_tuned")
    options = r.table_("options") or {}
    price_table = r.table_("price")
    r.finish()
    price = None
    if price_table is not None:
        pr = _Reader(r.source, price_table, r.key("price"))
        per_input = pr.number("input", minimum=0.0, maximum=1e6)
        per_output = pr.number("output", minimum=0.0, maximum=1e6)
        pr.finish()
        if per_input is None or per_output is None:
            raise r.fail("price", "needs input and output (USD per million tokens)")
        price = (per_input, per_output)

    if url is not None:
        _check_url(r, "url", url)
    urls: tuple[str, ...] = ()
    if urls_value is not None:
        if url is not None:
            raise r.fail("urls", "give url or urls, not both")
        if not urls_value:
            raise r.fail("urls", "needs at least one URL")
        seen: set[str] = set()
        for i, item in enumerate(urls_value):
            ikey = f"urls[{i}]"
            if not isinstance(item, str) or not item.strip():
                raise r.fail(ikey, f"expected a URL string, got {_toml_type(item)}")
            _check_url(r, ikey, item)
            if item.rstrip("/") in seen:
                raise r.fail(ikey, "listed twice")
            seen.add(item.rstrip("/"))
        urls = tuple(urls_value)
    given = {"url": url if url is not None else (urls or None), "model": model}
    for needed in requires:
        if given.get(needed) is None and needed not in options:
            what = "talks to a server" if needed == "url" else f"needs {needed}"
            if needed == "model":
                what = "loads a local model"
            raise r.fail(needed, f"missing required key (a {kind} backend {what})")
    if "model" in requires and "url" not in requires and given["url"] is not None:
        raise r.fail(
            "urls" if urls else "url", f"a {kind} backend loads a local model: give model, not url"
        )
    if gguf_file is not None and model is None:
        raise r.fail("gguf_file", "needs model (the folder holding the file)")
    if api_key_env is not None and not api_key_env.replace("_", "").isalnum():
        raise r.fail("api_key_env", f"not an environment variable name: {api_key_env!r}")
    if concurrency is not None and max_concurrency is not None and max_concurrency < concurrency:
        raise r.fail("max_concurrency", f"must be >= concurrency ({concurrency})")
    _check_options(r, options)
    return BackendConfig(
        name=name,
        kind=kind,
        url=url,
        urls=urls,
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
        price=price,
    )


def _check_options(r: _Reader, options: Mapping[str, Any]) -> None:
    """No secret in the pass-through options: no key-like option, no credential header,
    no URL with credentials; no option that has its own key in the backend table."""
    for key, value in options.items():
        okey = f"options.{key}"
        if key in ("name", "url", "urls", "model", "gguf_file", "api_key_env"):
            raise r.fail(okey, f"set {key} directly in the backend table, not in options")
        if _is_secret_name(key):
            raise r.fail(okey, _NO_SECRETS)
        if key.lower() in ("headers", "extra_headers", "default_headers") and isinstance(
            value, dict
        ):
            for header, hvalue in value.items():
                hkey = f"{okey}.{header}"
                lowered = header.lower()
                if _is_secret_name(header) or "auth" in lowered or "token" in lowered:
                    raise r.fail(hkey, "a credential header; " + _NO_SECRETS)
                if isinstance(hvalue, str) and hvalue.strip().lower().startswith(
                    ("bearer ", "basic ", "token ")
                ):
                    raise r.fail(hkey, "carries a credential; " + _NO_SECRETS)
        if isinstance(value, str) and value.startswith(("http://", "https://")):
            _check_url(r, okey, value)


def _parse_roles(r: _Reader, backends: Mapping[str, BackendConfig]) -> RolesConfig:
    writer = r.string("writer", required=True)
    answerers = r.get("answerers", (list,), "an array of backend names", required=True)
    writer_answers = r.string("writer_answers")
    min_candidates = r.integer("min_candidates", minimum=1)
    r.finish()
    assert writer is not None
    if writer not in backends:
        raise r.fail("writer", f"names undefined backend {writer!r} (defined: {_names(backends)})")
    if writer_answers is not None and writer_answers != "provenance":
        raise r.fail(
            "writer_answers",
            f'the only value is "provenance" (the writer answers too, recorded without a '
            f"vote), got {writer_answers!r}",
        )
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
    if writer in seen and writer_answers is None:
        raise r.fail(
            "answerers",
            f"lists the writer {writer!r}: its instance output is already a candidate, so "
            "a second answer would give one model two votes. Remove it, or set "
            'roles.writer_answers = "provenance" to record its answer without a vote',
        )
    if writer_answers is not None and writer not in seen:
        raise r.fail("writer_answers", f"the writer {writer!r} is not in roles.answerers")
    if not seen - {writer}:
        raise r.fail("answerers", "needs at least one backend besides the writer")
    voices = 1 + len(seen - {writer})
    if min_candidates is not None and min_candidates > voices:
        raise r.fail(
            "min_candidates",
            f"{min_candidates} is more than the {voices} voices (the writer's output and "
            "each answerer's answer)",
        )
    return RolesConfig(
        writer=writer,
        answerers=tuple(answerers),
        writer_answers="provenance" if writer_answers is not None else None,
        min_candidates=min_candidates,
    )


def _names(backends: Iterable[str]) -> str:
    return ", ".join(sorted(backends)) or "none"


# ------------------------------------------------------------------ pipeline overrides

_INT_SETTINGS: dict[str, int] = {
    # name -> minimum (the maximum is MAX_SETTING)
    "max_attempts_factor": 1,
    "max_generated_demos": 0,
    "instruction_window": 1,
    "instance_concurrency": 1,
    "answer_concurrency": 1,
    "queue_size": 1,
}
_FRACTION_SETTINGS = ("novelty_threshold", "consensus_threshold")
_POLICIES = ("exact", "quorum", "deadline")


def _check_overrides(source: str, run: RunConfig, overrides: Mapping[str, Any]) -> None:
    """Every override is checked here, when the config loads: its type, its range, and
    that the pipeline settings accept it; errors name ``overrides.<key>[.<subkey>]``."""
    fields = {f.name for f in dataclasses.fields(PipelineSettings)}
    base = PipelineSettings.preset(run.preset)
    r = _Reader(source, overrides, "overrides")
    for key in overrides:
        if key in ("seed", "targets", "preset", "name"):
            raise r.fail(key, "set it in [run] (preset, seed, targets)")
        if key not in fields:
            raise r.fail(key, f"unknown pipeline setting (known: {_names(fields)})")
        current = getattr(base, key)
        if isinstance(current, Decoding):
            table = r.table_(key)
            assert table is not None
            _check_decoding(_Reader(source, table, r.key(key)), current)
        elif key == "demos":
            table = r.table_(key)
            assert table is not None
            d = _Reader(source, table, r.key(key))
            for kind in KINDS:
                d.integer(kind, minimum=0, maximum=MAX_SETTING)
            d.finish()
        elif key in _INT_SETTINGS:
            r.integer(key, minimum=_INT_SETTINGS[key], maximum=MAX_SETTING)
        elif key in _FRACTION_SETTINGS:
            r.number(key, positive=False, minimum=0.0, maximum=1.0)
        elif key == "consensus_deadline_s":
            r.number(key, maximum=MAX_TIMEOUT_S)
        elif key == "consensus_policy":
            policy = r.string(key)
            if policy not in _POLICIES:
                raise r.fail(key, f"unknown policy {policy!r} (known: {', '.join(_POLICIES)})")
        elif isinstance(current, bool):
            r.boolean(key)
        elif isinstance(current, int):
            r.integer(key, minimum=0, maximum=MAX_SETTING)
        elif isinstance(current, float):
            r.number(key, positive=False, minimum=0.0)
        elif isinstance(current, str):
            r.string(key)
        # whatever the type, the settings must accept it (attributed to this key)
        try:
            PipelineSettings.preset(run.preset, **{key: _merge(current, overrides[key])})
        except (TypeError, ValueError) as exc:
            raise r.fail(key, str(exc)) from None
    _settings(source, run, overrides)


def _check_decoding(d: _Reader, current: Decoding) -> None:
    d.number("temperature", positive=False, minimum=0.0, maximum=100.0)
    d.integer("top_k", minimum=1, maximum=MAX_SETTING)
    d.number("top_p", maximum=1.0)
    d.integer("max_new_tokens", minimum=1, maximum=MAX_NEW_TOKENS)
    d.integer("min_new_tokens", minimum=0, maximum=MAX_NEW_TOKENS)
    stop = d.get("stop", (list,), "an array of strings")
    if stop is not None:
        for i, item in enumerate(stop):
            if not isinstance(item, str) or not item:
                raise d.fail(f"stop[{i}]", f"expected a non-empty string, got {item!r}")
    d.finish()
    try:
        merged = _merge(current, dict(d.table))
        merged.request("x", seed=0)  # the request builder's own checks (min <= max ...)
    except (TypeError, ValueError) as exc:
        raise d.fail(None, str(exc)) from None


# ------------------------------------------------------------------------- --member


def parse_member(text: str, index: int = 0) -> BackendConfig:
    """One ``--member`` option, ``KIND[=TARGET][,key=value...]``, validated like a
    ``[backends.*]`` table (errors name ``--member <name>`` and the key).

    ``TARGET`` is the kind's first required option (``url`` for a server kind,
    ``model`` for a local one; a kind that requires nothing takes no target).
    ``name=...`` names the member (default ``<kind>-<index>``); the backend-table keys
    (``model``, ``concurrency``, ``api_key_env``...) set those; other pairs are options
    passed to the backend.  The raw text is never echoed (it may hold a URL with
    credentials)."""
    head, *pairs = text.split(",")
    kind, sep, target = head.partition("=")
    kind = kind.strip()
    source = f"--member #{index + 1}"
    if not kind:
        raise ConfigError(source, None, "expected KIND=URL_OR_MODEL[,key=value...]")
    table: dict[str, Any] = {"kind": kind}
    options: dict[str, Any] = {}
    name = f"{kind}-{index}"
    for pair in pairs:
        key, psep, value = pair.partition("=")
        key = key.strip()
        if not psep or not key:
            raise ConfigError(source, None, f"option #{pairs.index(pair) + 1} is not key=value")
        if key == "name":
            name = value
        elif key in ("url", "model", "gguf_file", "api_key_env"):
            table[key] = value
        elif key in _BACKEND_KEYS and key not in ("kind", "options", "urls"):
            table[key] = _coerce(value)
        else:
            options[key] = _coerce(value)
    source = f"--member {name}"
    if resolve_kind(kind) in backend_kinds():
        requires = backend_requires(kind)
        if sep:
            if not requires:
                raise ConfigError(
                    source, None, f"kind {kind} takes no target; give options as key=value"
                )
            table.setdefault(requires[0], target)
        elif requires and requires[0] not in table:
            raise ConfigError(
                source,
                requires[0],
                f"kind {kind} needs a {requires[0]}: expected KIND=URL_OR_MODEL[,key=value...]",
            )
    if options:
        table["options"] = options
    return _parse_backend(_Reader(source, table, ""), name)


def member_configs(texts: Sequence[str]) -> list[BackendConfig]:
    """Every ``--member`` option parsed; a repeated name gets its index appended."""
    out: list[BackendConfig] = []
    names: set[str] = set()
    for i, text in enumerate(texts):
        spec = parse_member(text, i)
        if spec.name in names:
            spec = dataclasses.replace(spec, name=f"{spec.name}-{i}")
        names.add(spec.name)
        out.append(spec)
    return out


def _coerce(value: str) -> Any:
    for cast in (int, float):
        try:
            number = cast(value)
        except ValueError:
            continue
        return number
    if value.lower() in ("true", "false"):
        return value.lower() == "true"
    return value


# --------------------------------------------------------------------------- checks


def check_output_writable(config: Config) -> None:
    """Raise :class:`OutputError` unless every output file can be created or appended."""
    paths = [("run.output", config.run.output), ("run.rejects", config.run.rejects_path)]
    if config.run.cache:
        paths.append(("run.cache_path", config.run.cache_file))
    for key, path in paths:
        if key != "run.cache_path" and path.exists() and not path.is_dir() and not path.is_file():
            continue  # a device or FIFO: the record writer refuses it (not a records file)
        problem = _unwritable(path)
        if problem:
            raise OutputError(config.source, key, f"{path}: {problem}")


def check_distinct_files(config: Config, *, log: Path | None = None) -> None:
    """Refuse (``ConfigError`` naming both keys) a run whose files collide: no two of the
    records, rejects, cache, log, manifest, deferred list, summary, seed tasks and the
    config file itself may be one file (symbolic and hard links resolved).  Checked
    before anything is created."""
    from .manifest import manifest_path
    from .sink import deferred_path, summary_path

    output = config.run.output
    files: list[tuple[str, Path]] = [
        ("run.output", output),
        ("run.rejects", config.run.rejects_path),
        ("the manifest", manifest_path(output)),
        ("the deferred list", deferred_path(output)),
        ("the summary", summary_path(output)),
    ]
    if config.run.cache:
        files.append(("run.cache_path", config.run.cache_file))
    if log is not None:
        files.append(("--log-jsonl", log))
    if config.run.seeds is not None:
        files.append(("run.seeds", Path(config.run.seeds)))
    if not config.source.startswith("<"):
        files.append(("the config file", Path(config.source)))
    seen: list[tuple[str, Path]] = []
    for key, path in files:
        for other_key, other in seen:
            if _same_file(path, other):
                raise ConfigError(
                    config.source, key, f"{path} is the same file as {other_key} ({other})"
                )
        seen.append((key, path))


def _same_file(a: Path, b: Path) -> bool:
    try:
        if a.exists() and b.exists():
            return os.path.samefile(a, b)
        return a.expanduser().resolve() == b.expanduser().resolve()
    except OSError:
        return False


def _unwritable(path: Path) -> str | None:
    if path.exists():
        if path.is_dir():
            return "is a directory"
        if not path.is_file():
            return "not a regular file"
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
    for name in config.used_backends() if names is None else names:
        variable = config.backends[name].api_key_env
        if variable is not None and not os.environ.get(variable):
            raise ConfigError(
                config.source,
                f"backends.{name}.api_key_env",
                f"environment variable {variable} is not set",
            )
