"""Assembling a run: the one place where parsed configuration becomes runtime objects.

Layer: called by the command line (and by programs embedding a run); calls down into
``config`` (what to build), ``registry`` (backend classes by kind), ``member``,
``cache``, ``records``, ``seedtasks`` and ``pipeline``.  Nothing below calls back up
here, and nothing here prints.

* :func:`embedded_config` -- the embedded default (two small local models), defined
  only here; ``ask`` without ``--member`` and ``generate``/``check`` without
  ``--config`` both use it;
* :func:`create_backends` / :func:`build_members` -- backends from a ``Config`` (or a
  list of ``BackendConfig`` from ``--member``), each wrapped in a ``Member`` with its
  limits; a response cache is given to the member (above admission), never wrapped
  around the backend;
* :func:`ask_ensemble` -- the ``ask`` command's ensemble;
* :func:`probe_backend` / :func:`check` -- health, the model served and one tiny request
  built by the run's own request builder, per backend;
* :func:`open_run` -- everything ``generate`` needs, in order: backends, the probe
  (a member that cannot serve stops the run before any file exists), the cache, the
  members, the record files; all closed on the way out.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import TYPE_CHECKING, Any, Literal, TypeVar

from .backend import Backend, health_of, info_of
from .config import (
    DEFAULT_OUTPUT,
    BackendConfig,
    Config,
    ConfigError,
    OutputError,
    RolesConfig,
    RunConfig,
    Targets,
    check_environment,
)
from .ensemble import Decide, Ensemble
from .errors import BackendError, RetryableError, UnknownBackendError
from .member import Member
from .registry import create_backend
from .retry import RetryPolicy
from .scoring import Scorer
from .secret import MissingSecretError
from .seedtasks import KINDS, SeedFormatError, SeedTask, load_seed_tasks, split_by_kind
from .types import BackendInfo, GenerationRequest, Health

if TYPE_CHECKING:
    from .cache import ResponseCache
    from .pipeline import EventSink, Pipeline, ServedBy
    from .presets import PipelineSettings
    from .sink import AsyncRecordWriter

__all__ = [
    "EMBEDDED_SOURCE",
    "MemberCannotServe",
    "Probe",
    "Run",
    "ask_ensemble",
    "build_members",
    "cache_identity",
    "check",
    "create_backends",
    "embedded_config",
    "load_seeds",
    "make_member",
    "members_by_name",
    "open_run",
    "probe_backend",
    "probe_request",
    "run_manifest_for",
    "served_by",
    "writer_answers",
]

EMBEDDED_SOURCE = "<embedded default>"
PROBE_ATTEMPTS = 3
"""Tries of each probe step on an error a retry may cure (503, reset, timeout...)."""
PROBE_BACKOFF_S = 0.2
_T = TypeVar("_T")


# ------------------------------------------------------------------ embedded default


def embedded_config(*, output: str | Path | None = None) -> Config:
    """The embedded default: the two small local models, sized for a CPU.

    SmolLM2-135M-Instruct writes instructions and instances (steps 1-2); Gemma-3-270M
    answers (step 4).  Every item gets two candidates: the writer's instance output and
    Gemma's answer -- one model, one vote.  Gemma here is a *base* model: it is marked
    ``instruction_tuned = false`` so its answer prompts carry in-context demos.

    Resolving the model files may assemble a GGUF file (blocking, once): call this
    before the event loop starts.  Raises ``FileNotFoundError`` (``MissingModelError``,
    naming the package to install) when a model package is absent.
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
        roles=RolesConfig(writer=SMOLLM2.key, answerers=(GEMMA3.key,)),
        source=EMBEDDED_SOURCE,
    )


# ------------------------------------------------------------------------ backends


RAY_HTTP_ACTOR_CPUS = 0.25
"""CPUs reserved by each Ray actor that hosts a remote (HTTP) backend under ``--ray``,
unless the backend's options say ``num_cpus``."""


def _create(spec: BackendConfig, source: str, prefix: str, *, ray: str | None = None) -> Backend:
    """One backend; construction errors become ConfigError naming the key.  With ``ray``
    (``generate --ray``) the backend is hosted by a Ray actor on that cluster (kind
    ``ray`` hosting ``spec.kind``): the run's logic stays here, its calls run there."""

    def key(name: str) -> str:
        return f"{prefix}.{name}" if prefix else name

    try:
        if ray is not None:
            options = dict(spec.factory_options())
            if spec.kind != "transformers":
                # an actor that only waits on a server needs a fraction of a core; a
                # whole one each would leave a small cluster unable to place them
                options.setdefault("num_cpus", RAY_HTTP_ACTOR_CPUS)
            return create_backend(
                "ray",
                hosted_kind=spec.kind,
                address=None if ray == "local" else ray,
                **options,
            )
        return create_backend(spec.kind, **spec.factory_options())
    except UnknownBackendError as exc:
        raise ConfigError(source, key("kind"), str(exc)) from None
    except MissingSecretError as exc:
        raise ConfigError(source, key("api_key_env"), str(exc)) from None
    except FileNotFoundError as exc:  # a local model that is not there
        raise ConfigError(source, key("model"), str(exc)) from None
    except (TypeError, ValueError) as exc:
        raise ConfigError(source, key("options"), f"bad option: {exc}") from None


def create_backends(config: Config, names: Sequence[str] | None = None) -> dict[str, Backend]:
    """Create the named backends (default: every backend a role uses), after checking
    their API key variables (nothing is created when one is unset)."""
    names = list(names) if names is not None else config.used_backends()
    check_environment(config, names)
    return {
        name: _create(config.backends[name], config.source, f"backends.{name}", ray=config.ray)
        for name in names
    }


def cache_identity(spec: BackendConfig) -> str | None:
    """What stands for the model in cache keys: a configured local model's path (and
    GGUF file); None for a server, whose model the cache reads from it once."""
    if spec.model is None or spec.is_server:
        return None
    return spec.model + (f"/{spec.gguf_file}" if spec.gguf_file else "")


def make_member(
    spec: BackendConfig,
    backend: Backend,
    *,
    cache: ResponseCache | None = None,
    max_attempts: int | None = None,
) -> Member:
    """A Member with the backend's limits from the config; with ``cache``, the member
    looks each request up there before any admission (``cache_identity`` stands for a
    local model in the keys)."""
    return Member(
        backend,
        name=spec.name,
        concurrency=spec.concurrency,
        max_concurrency=spec.max_concurrency,
        rpm=spec.rpm,
        tpm=spec.tpm,
        retry=RetryPolicy(max_attempts=max_attempts or spec.max_attempts),
        timeout_s=spec.timeout_s,
        instruction_tuned=spec.instruction_tuned,
        cache=cache,
        cache_identity=cache_identity(spec) if cache is not None else None,
    )


def build_members(
    config: Config,
    *,
    cache: ResponseCache | None = None,
    backends: Mapping[str, Backend] | None = None,
) -> tuple[Member, list[Member]]:
    """``(writer, answerers)``: one Member per used backend (a backend in both roles --
    only with ``roles.writer_answers`` -- is one Member).  ``backends``: already created
    ones (default: created here)."""
    members = members_by_name(config, cache=cache, backends=backends)
    return members[config.roles.writer], [members[n] for n in config.roles.answerers]


def members_by_name(
    config: Config,
    *,
    cache: ResponseCache | None = None,
    backends: Mapping[str, Backend] | None = None,
) -> dict[str, Member]:
    """One Member per used backend (the roles' and the selection's target), by name."""
    created = dict(backends) if backends is not None else create_backends(config)
    return {
        name: make_member(config.backends[name], created[name], cache=cache)
        for name in config.used_backends()
    }


def ask_ensemble(
    specs: Sequence[BackendConfig], *, attempts: int, deadline_s: float, source: str = "--member"
) -> Ensemble:
    """The ``ask`` ensemble: every spec answers; every candidate is waited for (up to
    ``deadline_s``) so each one can be shown."""
    members = [
        make_member(spec, _create(spec, f"{source} {spec.name}", ""), max_attempts=attempts)
        for spec in specs
    ]
    return Ensemble(members, policy="deadline", deadline_s=deadline_s)


# --------------------------------------------------------------------------- seeds


def load_seeds(config: Config) -> list[SeedTask]:
    """The seed tasks of ``run.seeds`` (default: the shipped ones), checked against the
    targets: a kind with a target needs at least one seed of that kind (its step-1
    prompts are built from them).  Errors are ConfigError naming ``run.seeds``."""
    try:
        seeds = load_seed_tasks(config.run.seeds)
    except SeedFormatError as exc:
        raise ConfigError(config.source, "run.seeds", str(exc)) from None
    except OSError as exc:
        raise ConfigError(
            config.source, "run.seeds", f"{config.run.seeds}: {exc.strerror or exc}"
        ) from None
    groups = split_by_kind(seeds)
    targets = config.run.targets.to_dict()
    where = config.run.seeds or "the shipped seed tasks"
    for kind in KINDS:
        if targets.get(kind, 0) > 0 and not groups[kind]:
            shape = "a non-empty input" if kind == "input_output" else "an empty input"
            raise ConfigError(
                config.source,
                "run.seeds",
                f"{where}: no seed task of kind {kind!r} (its first instance has {shape}); "
                f"step 1 needs some to write {kind} instructions (or set "
                f"run.targets.{kind} = 0)",
            )
    return seeds


# --------------------------------------------------------------------------- probes


@dataclass
class Probe:
    """What one probe found out about one backend."""

    name: str
    kind: str
    target: str
    wanted_model: str | None = None
    """The model the config asks a server for (None: whatever it serves)."""
    healthy: bool = False
    health_detail: str = ""
    model: str | None = None
    served_models: tuple[str, ...] = ()
    """The model ids the server lists (``BackendInfo.extra["models"]``), when it says."""
    latency_s: float | None = None
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.healthy and self.error is None

    @property
    def reachable(self) -> bool:  # the name ``check`` used first
        return self.ok

    def problem(self) -> str:
        """One line for people: the member, the model asked for, what the server lists."""
        what = self.error or f"not healthy: {self.health_detail or 'no detail'}"
        line = f"member {self.name} ({self.kind}, {self.target}) cannot serve: {what}"
        if self.wanted_model is not None:
            line += f"; model asked for: {self.wanted_model}"
        if self.served_models:
            line += f"; the server lists: {', '.join(self.served_models)}"
        return line


class MemberCannotServe(Exception):
    """A probe before the run found members that cannot serve; ``str()`` names each."""

    def __init__(self, probes: Sequence[Probe]) -> None:
        self.probes = list(probes)
        super().__init__("; ".join(p.problem() for p in self.probes))


def probe_request(config: Config | None = None) -> GenerationRequest:
    """A one-token request built by the run's own request builder (the answer step's
    decoding), so the probe sends what the run sends, only shorter."""
    if config is None:
        return GenerationRequest(prompt="Hello", max_new_tokens=1, temperature=0.0)
    request = config.settings().answer_decoding.request("Hello", seed=0)
    return request.replace(max_new_tokens=1, min_new_tokens=None)


def _served(extra: Mapping[str, Any]) -> tuple[str, ...]:
    models = extra.get("models") if isinstance(extra, Mapping) else None
    if isinstance(models, list | tuple):
        return tuple(m for m in models if isinstance(m, str))
    return ()


async def probe_backend(
    spec: BackendConfig,
    backend: Backend,
    *,
    timeout: float | None,
    request: GenerationRequest | None = None,
) -> Probe:
    """Health, the model served, and the latency of one tiny request for one backend.

    ``timeout`` bounds each step (None: no bound).  A server that lists its models and
    not the one asked for fails without a request.  A local model (no URL) gets the
    request first: that call loads it, and only then does it report healthy."""
    probe = Probe(spec.name, spec.kind, spec.target)
    probe.wanted_model = spec.model if spec.is_server else None
    request = request or probe_request()

    async def patiently(step: Callable[[], Awaitable[_T]]) -> _T:
        # A server that sheds one request (a 503, a reset) can still serve: a probe
        # step is tried up to PROBE_ATTEMPTS times on errors a retry may cure.
        for attempt in range(PROBE_ATTEMPTS):
            try:
                async with asyncio.timeout(timeout):
                    return await step()
            except RetryableError:
                if attempt == PROBE_ATTEMPTS - 1:
                    raise
                await asyncio.sleep(PROBE_BACKOFF_S * 2**attempt)  # a backoff, not a sync
        raise AssertionError("unreachable")

    try:
        if not spec.is_server:
            # A local model is loaded by its first call: make the tiny request first,
            # then it can say whether it is healthy.
            started = time.perf_counter()
            await patiently(lambda: backend.generate(request))
            probe.latency_s = time.perf_counter() - started
        health: Health = await patiently(lambda: health_of(backend))
        for attempt in range(1, PROBE_ATTEMPTS):
            if health.ok:
                break
            await asyncio.sleep(PROBE_BACKOFF_S * 2**attempt)
            health = await patiently(lambda: health_of(backend))
        probe.healthy = health.ok
        probe.health_detail = health.detail
        if not health.ok:
            return probe
        info: BackendInfo = await patiently(lambda: info_of(backend))
        probe.model = info.model
        probe.served_models = _served(info.extra)
        wanted = probe.wanted_model
        if wanted is not None and probe.served_models and wanted not in probe.served_models:
            probe.error = f"model {wanted!r} is not served"
            return probe
        if probe.latency_s is None:
            started = time.perf_counter()
            await patiently(lambda: backend.generate(request))
            probe.latency_s = time.perf_counter() - started
    except TimeoutError:
        probe.error = f"no answer within {timeout:g}s"
    except BackendError as exc:
        probe.error = f"{type(exc).__name__}: {exc}"
    return probe


async def _probe_all(
    specs: Iterable[BackendConfig],
    backends: Mapping[str, Backend],
    *,
    timeout: float | None,
    request: GenerationRequest,
) -> list[Probe]:
    specs = list(specs)
    return list(
        await asyncio.gather(
            *(
                probe_backend(
                    spec,
                    backends[spec.name],
                    timeout=timeout if spec.is_server else None,
                    request=request,
                )
                for spec in specs
            )
        )
    )


async def check(config: Config, *, timeout: float = 30.0) -> list[Probe]:
    """Probe every configured backend (used by a role or not), closing them after."""
    names = list(config.backends)
    backends = create_backends(config, names)
    try:
        return await _probe_all(
            (config.backends[n] for n in names),
            backends,
            timeout=timeout,
            request=probe_request(config),
        )
    finally:
        for backend in backends.values():
            await backend.aclose()


# ----------------------------------------------------------------------------- run


@dataclass
class Run:
    """Everything ``generate`` runs with: open, probed, closed by :func:`open_run`."""

    config: Config
    settings: PipelineSettings
    writer: Member
    answerers: list[Member]
    sink: AsyncRecordWriter
    cache: ResponseCache | None = None
    members: list[Member] = field(default_factory=list)
    """Each member once, the writer first."""
    fingerprint: str | None = None
    """The run manifest's fingerprint (None when no seeds were given to ``open_run``)."""
    target: Member | None = None
    """The selection's target model (scores the candidates), when a target-fit policy is
    configured; it may also be a voice."""
    decide: Decide | None = None
    """Where the answers' consensus is computed when not here (``generate --ray``: on
    the cluster)."""

    def pipeline(self, seeds: Sequence[SeedTask], *, events: EventSink | None = None) -> Pipeline:
        """The Ensemble-Instruct pipeline over this run's members and record files.

        A writer listed among the answerers (``roles.writer_answers = "provenance"``)
        answers too, but its answer is kept in provenance only, never a vote."""
        from .pipeline import Pipeline

        return Pipeline(
            writer=self.writer,
            answerers=self.answerers,
            seeds=seeds,
            settings=self.settings,
            sink=self.sink,
            events=events,
            writer_answers=writer_answers(self.config),
            min_candidates=self.config.roles.min_candidates,
            served_by=served_by(self.config),
            fingerprint=self.fingerprint,
            selection=self.config.selection,
            target=self.target,
            decide=self.decide,
        )


def writer_answers(config: Config) -> Literal["vote", "provenance"]:
    """``"provenance"`` when the config lists the writer among the answerers with
    ``roles.writer_answers = "provenance"`` (its answer is provenance only), else
    ``"vote"`` (the writer is not an answerer at all: config loading refuses it)."""
    return "provenance" if config.roles.writer_answers == "provenance" else "vote"


def served_by(config: Config) -> dict[str, ServedBy]:
    """Each backend's kind and host (no credentials, path or query) for provenance."""
    from .pipeline import ServedBy, host_of

    return {
        name: ServedBy(backend=b.kind, host=host_of(b.url if b.url else None))
        for name, b in config.backends.items()
    }


def run_manifest_for(
    config: Config, seeds: Sequence[SeedTask], served: Mapping[str, str | None]
) -> dict[str, Any]:
    """The manifest of what defines this run's dataset (see ``ensemble_async.manifest``):
    each used member's kind, served model and prompt style (``instruction_tuned``);
    ``served`` maps each used backend to the model id its server reported (None when
    unknown, which matches any id on a rerun)."""
    from . import __version__
    from .manifest import run_manifest, seed_tasks_digest, templates_digest

    settings = config.settings()
    names = config.used_backends()
    return run_manifest(
        preset=settings.name,
        seed=settings.seed,
        settings=settings.identity(),
        seed_tasks_sha256=seed_tasks_digest(seeds),
        templates_sha256=templates_digest(),
        members={
            name: {
                "kind": config.backends[name].kind,
                "model": served.get(name),
                # zero-shot or few-shot answer prompts: another prompt, another answer
                "instruction_tuned": config.backends[name].instruction_tuned,
            }
            for name in names
        },
        roles={"writer": config.roles.writer, "answerers": list(config.roles.answerers)},
        selection={
            "consensus_complete": settings.consensus_complete,
            "writer_answers": writer_answers(config),
            "min_candidates": config.roles.min_candidates,
            **config.selection.to_dict(),
        },
        library_version=__version__,
    )


@contextlib.asynccontextmanager
async def open_run(
    config: Config,
    *,
    seeds: Sequence[SeedTask] | None = None,
    probe_timeout: float = 30.0,
) -> AsyncIterator[Run]:
    """Open what a ``generate`` run needs, in this order: backends (after the API key
    variables are checked), a probe of each (raises :class:`MemberCannotServe` before
    any file is created), the run manifest beside the records when ``seeds`` are given
    (a rerun that would change the dataset's definition raises ``ManifestMismatchError``
    naming each change, before anything is written), the response cache, the members
    (started), the record files (opened, scanned and repaired off the event loop).
    Everything is closed on the way out, in reverse order.

    ``probe_timeout`` bounds each probe step of a server backend (a local model's first
    call loads it and is not bounded)."""
    settings = config.settings()
    async with contextlib.AsyncExitStack() as stack:
        backends = create_backends(config)
        for backend in backends.values():
            stack.push_async_callback(backend.aclose)
        probes = await _probe_all(
            (config.backends[n] for n in backends),
            backends,
            timeout=probe_timeout,
            request=probe_request(config),
        )
        failed = [p for p in probes if not p.ok]
        if failed:
            raise MemberCannotServe(failed)
        if config.selection.target is not None:
            await _check_target(config, backends[config.selection.target], probe_timeout)
        fingerprint = None
        manifest: dict[str, Any] | None = None
        if seeds is not None:
            from .manifest import check_manifest, manifest_path

            manifest = run_manifest_for(config, seeds, {p.name: p.model for p in probes})
            manifest_file = manifest_path(config.run.output)
            fingerprint = str(manifest["fingerprint"])
            if await asyncio.to_thread(manifest_file.exists):
                # Compared now, before anything is written; written below for a new run,
                # once the record files have opened (never beside a file we refuse).
                # The records keep the fingerprint the dataset was begun with.
                fingerprint = await asyncio.to_thread(check_manifest, manifest_file, manifest)
                manifest = None
        cache = None
        if config.run.cache:
            cache = await stack.enter_async_context(_open_cache(config))
        by_name = members_by_name(config, cache=cache, backends=backends)
        writer = by_name[config.roles.writer]
        answerers = [by_name[n] for n in config.roles.answerers]
        target = by_name[config.selection.target] if config.selection.target else None
        members = list(dict.fromkeys([writer, *answerers]))
        for member in dict.fromkeys([*members, *([target] if target else [])]):
            await member.start()
        decide = None
        if config.ray is not None:  # consensus on the cluster too (the optional extra)
            from .ray.consensus import RayConsensus

            decide = RayConsensus(address=None if config.ray == "local" else config.ray)
            stack.push_async_callback(decide.aclose)
            await decide.start()
        sink = await stack.enter_async_context(_open_records(config))
        if manifest is not None:
            from .manifest import manifest_path, write_manifest

            await asyncio.to_thread(write_manifest, manifest_path(config.run.output), manifest)
        yield Run(
            config=config,
            settings=settings,
            writer=writer,
            answerers=answerers,
            sink=sink,
            cache=cache,
            members=members,
            fingerprint=fingerprint,
            target=target,
            decide=decide,
        )


async def _check_target(config: Config, backend: Backend, timeout: float | None) -> None:
    """The selection's target must score: one that cannot stops the run here, before
    any file is written (``MemberCannotServe`` naming it)."""
    name = config.selection.target or backend.name
    spec = config.backends[name]
    problem = None
    if not isinstance(backend, Scorer):
        problem = f"cannot score (selection.target): kind {spec.kind!r} has no scorer"
    else:
        try:
            async with asyncio.timeout(timeout if spec.is_server else None):
                await backend.check_scoring()
        except TimeoutError:
            problem = f"cannot score (selection.target): no answer within {timeout:g}s"
        except BackendError as exc:
            problem = f"cannot score (selection.target): {type(exc).__name__}: {exc}"
    if problem is not None:
        refused = Probe(spec.name, spec.kind, spec.target, healthy=True)
        refused.error = problem
        raise MemberCannotServe([refused])


@contextlib.asynccontextmanager
async def _open_cache(config: Config) -> AsyncIterator[ResponseCache]:
    from .cache import CacheError, ResponseCache

    try:
        cache = await ResponseCache.open(config.run.cache_file)
    except CacheError as exc:
        raise OutputError(config.source, "run.cache_path", str(exc)) from None
    try:
        yield cache
    finally:
        await cache.aclose()


@contextlib.asynccontextmanager
async def _open_records(config: Config) -> AsyncIterator[AsyncRecordWriter]:
    """The async record sink; a storage failure (full disk, not writable) is an
    ``OutputError`` naming ``run.output``; the other record-file errors (locked by
    another run, not a records file, corrupt) propagate as themselves."""
    from .records import RecordStorageError
    from .sink import AsyncRecordWriter

    try:
        writer = await AsyncRecordWriter.open(
            config.run.output, rejects_path=config.run.rejects_path
        )
    except RecordStorageError as exc:
        raise OutputError(config.source, "run.output", str(exc)) from None
    async with writer:
        yield writer
