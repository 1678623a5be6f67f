"""Progress of a pipeline run: an ``EventSink`` with three display modes.

* ``rich``: a live display on the terminal, one row per stage (done/target, kept,
  rejected with the reasons) and one per backend (in flight, req/s, tok/s, p50/p95
  latency, errors, breaker state), with the elapsed time and an ETA;
* ``quiet``: nothing until the summary;
* ``jsonl``: one JSON object a line, for non-interactive runs: what the run is
  (``{"type": "start", ...}``), every event as it happens (``{"type": "event", "t":
  seconds, "stage", "kind", "fields": {...}}``), periodic stage and backend stats
  (``{"type": "stats", ...}``) and the summary (``{"type": "summary", ...}``).  Lines are flushed as written,
  so another process can follow the file.  Field values that look like secrets are never
  written.

``event()`` is synchronous and cheap (counters, plus one write in jsonl mode); the
display is refreshed by a periodic task started by ``async with progress:`` and
cancelled on exit, so the event loop is never blocked by drawing.

ETA: the target is the number of instructions to keep (``targets=``, or the
``targets``/``target`` field of a stage's events); an instruction is finished end to
end when its record is written or it is rejected after step 1.  The elapsed time is
extrapolated linearly from the fraction finished.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import time
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any, Literal, Protocol, Self, TextIO

from rich.console import Console, Group, RenderableType
from rich.live import Live
from rich.table import Table
from rich.text import Text

from .pipeline import STAGES
from .scrub import is_secret_field

__all__ = ["MODES", "Mode", "Progress", "StageCounts"]

Mode = Literal["rich", "quiet", "jsonl"]
MODES: tuple[Mode, ...] = ("rich", "quiet", "jsonl")


class _Snapshotting(Protocol):
    name: str

    def snapshot(self) -> dict[str, Any]: ...


@dataclass
class StageCounts:
    """What one stage has reported."""

    started: int = 0
    accepted: int = 0
    rejected: int = 0
    skipped: int = 0
    reasons: Counter[str] = field(default_factory=Counter)
    other: Counter[str] = field(default_factory=Counter)
    target: int | None = None
    done: bool = False

    @property
    def finished(self) -> int:
        """Items decided either way (or found already done)."""
        return self.accepted + self.rejected + self.skipped

    def to_dict(self) -> dict[str, Any]:
        return {
            "started": self.started,
            "accepted": self.accepted,
            "rejected": self.rejected,
            "skipped": self.skipped,
            "reasons": dict(self.reasons),
            "target": self.target,
            "done": self.done,
        }


def _jsonable(value: Any) -> Any:
    if value is None or isinstance(value, bool | int | float | str):
        return value
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items() if not is_secret_field(str(k))}
    if isinstance(value, list | tuple | set | frozenset):
        return [_jsonable(v) for v in value]
    to_dict = getattr(value, "to_dict", None)
    if callable(to_dict) and not isinstance(value, type):
        return _jsonable(to_dict())
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return _jsonable({f.name: getattr(value, f.name) for f in dataclasses.fields(value)})
    return str(value)


class Progress:
    """The pipeline's ``EventSink``, plus a periodic display and a summary table.

    ``members``: objects with ``name`` and ``snapshot()`` (``Member``), polled for the
    backend rows.  ``targets``: per-stage targets (e.g. ``{"instructions": 5}``); a stage
    event may also carry ``target=N``.  ``console``: where ``rich`` mode draws and the
    summary is printed (default: stderr).  ``log``: the jsonl stream (default: stderr).
    """

    def __init__(
        self,
        mode: Mode = "rich",
        *,
        members: Sequence[_Snapshotting] = (),
        targets: Mapping[str, int] | None = None,
        console: Console | None = None,
        log: TextIO | None = None,
        interval_s: float = 0.5,
        stats_interval_s: float = 5.0,
        clock: Callable[[], float] = time.monotonic,
        prices: Mapping[str, tuple[float, float]] | None = None,
    ) -> None:
        if mode not in MODES:
            raise ValueError(f"mode must be one of {', '.join(MODES)}, got {mode!r}")
        if interval_s <= 0 or stats_interval_s <= 0:
            raise ValueError("intervals must be > 0")
        self.mode: Mode = mode
        self.members = list(members)
        self.console = console or Console(stderr=True)
        self._log = log
        self.interval_s = interval_s
        self.stats_interval_s = stats_interval_s
        self._clock = clock
        self.started_at = clock()
        self.stages: dict[str, StageCounts] = {name: StageCounts() for name in STAGES}
        for stage, target in (targets or {}).items():
            self.stage(stage).target = target
        self.events = 0
        self.prices = dict(prices or {})
        """USD per million (input, output) tokens, by member name: the cost line."""
        self._task: asyncio.Task[None] | None = None
        self._live: Live | None = None

    # -- EventSink -----------------------------------------------------------------------

    def stage(self, name: str) -> StageCounts:
        counts = self.stages.get(name)
        if counts is None:
            counts = self.stages[name] = StageCounts()
        return counts

    def event(self, stage: str, kind: str, **fields: Any) -> None:
        """Count one pipeline event (and write it in jsonl mode)."""
        self.events += 1
        counts = self.stage(stage)
        target = fields.get("target")
        targets = fields.get("targets")
        if isinstance(target, int) and not isinstance(target, bool):
            counts.target = target
        elif kind == "started" and isinstance(targets, Mapping):
            # per-kind instruction targets: every stage handles at most that many items
            counts.target = sum(v for v in targets.values() if isinstance(v, int))
        if kind == "started":
            counts.started += 1
        elif kind == "accepted":
            counts.accepted += 1
        elif kind == "rejected":
            counts.rejected += 1
            counts.reasons[str(fields.get("reason", "unspecified"))] += 1
        elif kind == "skipped":  # already in the output (a resumed run)
            counts.skipped += 1
        elif kind == "done":
            counts.done = True
        else:
            counts.other[kind] += 1
        if self.mode == "jsonl":
            self._write(
                {
                    "type": "event",
                    "t": round(self.elapsed_s, 3),
                    "stage": stage,
                    "kind": kind,
                    "fields": fields,
                }
            )

    # -- derived figures -----------------------------------------------------------------

    @property
    def elapsed_s(self) -> float:
        return self._clock() - self.started_at

    def items_finished(self) -> int:
        """Instructions whose fate is sealed: a record written (or already there), or a
        reject after step 1 (invalid instance, failed answers, no consensus)."""
        later = [c for name, c in self.stages.items() if name != "instructions"]
        final = self.stages.get("consensus")
        kept = (final.accepted + final.skipped) if final is not None else 0
        return kept + sum(c.rejected for c in later)

    def eta_s(self) -> float | None:
        """Seconds left: the elapsed time extrapolated from the fraction of the target
        (instructions to keep) that is finished end to end; None before anything is."""
        target = self.stages["instructions"].target if "instructions" in self.stages else None
        done = self.items_finished()
        if not target or done <= 0:
            return None
        if done >= target or self.stages.get("consensus", StageCounts()).done:
            return 0.0
        fraction = done / target
        return self.elapsed_s * (1 - fraction) / fraction

    def backend_rows(self) -> list[dict[str, Any]]:
        rows = [m.snapshot() for m in self.members]
        for row in rows:
            price = self.prices.get(str(row.get("name")))
            if price is not None:
                row["price_per_million"] = {"input": price[0], "output": price[1]}
                row["cost_usd"] = cost_usd(row, price)
        return rows

    def cost(self) -> float | None:
        """The run's cost so far over the priced members (None when none is priced)."""
        costs = [r["cost_usd"] for r in self.backend_rows() if "cost_usd" in r]
        return round(sum(costs), 6) if costs else None

    def stats_record(self) -> dict[str, Any]:
        return {
            "type": "stats",
            "elapsed_s": round(self.elapsed_s, 3),
            "eta_s": self.eta_s(),
            "stages": {name: c.to_dict() for name, c in self.stages.items()},
            "backends": self.backend_rows(),
        }

    # -- rendering -----------------------------------------------------------------------

    def stage_table(self, *, title: str | None = "stages") -> Table:
        table = Table(title=title, expand=False)
        for column in ("stage", "done/target", "kept", "rejected", "reasons"):
            table.add_column(column)
        for name, c in self.stages.items():
            if not (c.started or c.finished or c.target or c.done):
                continue
            target = "?" if c.target is None else str(c.target)
            mark = " ✓" if c.done else ""
            # step 1 counts accepted instructions towards its target; later stages count
            # every item they have decided
            done = c.accepted if name == "instructions" else c.finished
            reasons = ", ".join(f"{r}: {n}" for r, n in c.reasons.most_common())
            table.add_row(
                name + mark, f"{done}/{target}", str(c.accepted), str(c.rejected), reasons
            )
        return table

    def backend_table(self, *, title: str | None = "backends") -> Table:
        table = Table(title=title, expand=False)
        for column in (
            "backend",
            "in flight",
            "done",
            "req/s",
            "tok/s",
            "p50",
            "p95",
            "errors",
            "breaker",
        ):
            table.add_column(column)
        for snap in self.backend_rows():
            latency = snap.get("latency_s") or {}
            errors = snap.get("errors") or {}
            error_text = ", ".join(f"{k}: {v}" for k, v in sorted(errors.items())) or "0"
            breaker = str(snap.get("breaker") or "-")
            style = {"open": "red", "half_open": "yellow"}.get(breaker, "green")
            table.add_row(
                str(snap.get("name", "?")),
                str(snap.get("in_flight", 0)),
                str(snap.get("done", 0)),
                f"{snap.get('requests_per_s', 0.0):.2f}",
                f"{snap.get('tokens_per_s', 0.0):.1f}",
                _seconds(latency.get("p50")),
                _seconds(latency.get("p95")),
                error_text,
                Text(breaker, style=style),
            )
        return table

    def render(self) -> RenderableType:
        eta = self.eta_s()
        head = Text(
            f"elapsed {_duration(self.elapsed_s)}"
            + (f"  ETA {_duration(eta)}" if eta is not None else "  ETA ?")
        )
        parts: list[RenderableType] = [head, self.stage_table()]
        if self.members:
            parts.append(self.backend_table())
        return Group(*parts)

    def refresh(self) -> None:
        """Redraw the live display now (rich mode)."""
        if self._live is not None:
            self._live.update(self.render(), refresh=True)

    # -- lifecycle -----------------------------------------------------------------------

    async def __aenter__(self) -> Self:
        self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.stop()

    def start(self) -> None:
        """Start the display and its periodic refresh task (needs a running loop)."""
        if self._task is not None:
            return
        if self.mode == "rich":
            self._live = Live(
                self.render(), console=self.console, auto_refresh=False, transient=True
            )
            self._live.start()
            self._task = asyncio.create_task(self._tick(self.interval_s, self.refresh))
        elif self.mode == "jsonl":
            self._task = asyncio.create_task(self._tick(self.stats_interval_s, self.write_stats))

    async def stop(self) -> None:
        """Cancel the refresh task and take the live display down."""
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        live, self._live = self._live, None
        if live is not None:
            live.stop()

    async def _tick(self, interval: float, action: Callable[[], None]) -> None:
        while True:
            await asyncio.sleep(interval)
            action()

    # -- jsonl and summary ---------------------------------------------------------------

    def log_start(self, **fields: Any) -> None:
        """A ``{"type": "start", ...}`` line (jsonl mode only): what this run is."""
        if self.mode == "jsonl":
            self._write({"type": "start", **fields})

    def write_stats(self) -> None:
        self._write(self.stats_record())

    def _write(self, record: Mapping[str, Any]) -> None:
        stream = self._log
        line = json.dumps(_jsonable(record), ensure_ascii=False, allow_nan=False, default=str)
        if stream is None:
            self.console.file.write(line + "\n")
            self.console.file.flush()
            return
        stream.write(line + "\n")
        stream.flush()

    def summary(self, summary: Any = None, *, status: str = "finished") -> dict[str, Any]:
        """Print the summary (every mode) and return it as a JSON-ready dict.

        ``summary``: the pipeline's ``PipelineSummary`` (or anything with ``to_dict()``
        or a dataclass), shown beside the counters.
        """
        record: dict[str, Any] = {
            **self.stats_record(),
            "type": "summary",
            "status": status,
            "events": self.events,
        }
        if summary is not None:
            record["pipeline"] = _jsonable(summary)
        cost = self.cost()
        if cost is not None:
            record["cost_usd"] = cost
        if self.mode == "jsonl":
            self._write(record)
            if self._log is not None:  # the log went to a file: a short note on the console
                self.console.print(f"{status} in {_duration(self.elapsed_s)}")
            return record
        self.console.print(self.summary_renderable(record))
        return record

    def summary_renderable(self, record: Mapping[str, Any]) -> RenderableType:
        parts: list[RenderableType] = [
            Text(f"{record['status']} in {_duration(self.elapsed_s)}", style="bold"),
            self.stage_table(title="summary"),
        ]
        if self.members:
            parts.append(self.backend_table(title=None))
        if record.get("cost_usd") is not None:
            priced = ", ".join(
                f"{r['name']} ${r['cost_usd']:.4f}" for r in record["backends"] if "cost_usd" in r
            )
            parts.append(Text(f"cost ${record['cost_usd']:.4f} ({priced})"))
        pipeline = record.get("pipeline")
        if isinstance(pipeline, Mapping) and pipeline:
            table = Table(title=None, show_header=False)
            table.add_column("key")
            table.add_column("value")
            for key, value in pipeline.items():
                if key in ("counts", "reasons"):  # the stage table shows them
                    continue
                if isinstance(value, Mapping | list):
                    shown = json.dumps(value, ensure_ascii=False)
                elif isinstance(value, float):
                    shown = f"{value:.2f}"
                else:
                    shown = str(value)
                table.add_row(str(key), shown)
            parts.append(table)
        return Group(*parts)


def cost_usd(snapshot: Mapping[str, Any], price: tuple[float, float]) -> float:
    """A member's cost from its token counts: USD per million (input, output) tokens."""
    prompt = float(snapshot.get("prompt_tokens") or 0)
    completion = float(snapshot.get("completion_tokens") or 0)
    return round((prompt * price[0] + completion * price[1]) / 1e6, 6)


def _seconds(value: Any) -> str:
    return "-" if value is None else f"{float(value):.2f}s"


def _duration(seconds: float) -> str:
    whole = max(0, round(seconds))
    h, rest = divmod(whole, 3600)
    m, s = divmod(rest, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"
