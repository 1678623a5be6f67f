"""An ensemble as a Ray Data batch mapper.

    ds = ray.data.from_items([{"prompt": p} for p in prompts])
    labelled = ds.map_batches(
        EnsembleMapper,
        fn_constructor_kwargs={"members": [
            {"kind": "tgi", "url": "http://gpu1:8080"},
            {"kind": "openai", "url": "http://gpu2:8000", "concurrency": 32},
        ]},
        batch_size=64,
        concurrency=4,
    )

Each mapper instance (one per Ray Data actor) runs its own event loop in a thread and
keeps one :class:`~ensemble_async.ensemble.Ensemble` open across batches, so connection
pools and breakers live as long as the actor.  A batch's prompts go through
``Ensemble.map`` together; the mapper adds the decision columns ``kept``, ``text``,
``rule``, ``winner`` and ``candidates`` (a JSON list of each member's candidate).

A member is a mapping: ``kind`` plus the backend's options (``url``, ``model``, ``name``,
``api_key_env``, ...) and optionally the member's own limits (``concurrency``,
``max_concurrency``, ``rpm``, ``tpm``, ``max_attempts``, ``timeout_s``).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import threading
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from ..ensemble import Ensemble, EnsembleResult
from ..member import Member
from ..registry import create_backend
from ..retry import RetryPolicy
from ..types import GenerationRequest

__all__ = ["MEMBER_KEYS", "EnsembleMapper", "build_member"]

MEMBER_KEYS = frozenset(
    {"concurrency", "max_concurrency", "rpm", "tpm", "max_attempts", "timeout_s"}
)
"""Keys of a member mapping that configure the member; every other key but ``kind`` is
an option of the backend."""


def build_member(spec: Mapping[str, Any], index: int) -> Member:
    """One ``Member`` from a plain mapping (see the module docstring)."""
    if "kind" not in spec:
        raise ValueError(f"member {index}: 'kind' is missing")
    options = {k: v for k, v in spec.items() if k != "kind" and k not in MEMBER_KEYS}
    options.setdefault("name", f"{spec['kind']}-{index}")
    backend = create_backend(str(spec["kind"]), **options)
    attempts = int(spec.get("max_attempts", 3))
    return Member(
        backend,
        concurrency=int(spec.get("concurrency", 8)),
        max_concurrency=spec.get("max_concurrency"),
        rpm=spec.get("rpm"),
        tpm=spec.get("tpm"),
        retry=RetryPolicy(max_attempts=attempts),
        timeout_s=spec.get("timeout_s"),
    )


class EnsembleMapper:
    """A callable class for ``ray.data.Dataset.map_batches`` (see the module docstring)."""

    def __init__(
        self,
        members: Sequence[Mapping[str, Any]],
        *,
        prompt_column: str = "prompt",
        policy: str = "exact",
        threshold: float = 0.01,
        max_new_tokens: int = 128,
        temperature: float = 0.0,
        seed: int | None = None,
        max_items_in_flight: int = 64,
    ) -> None:
        if not members:
            raise ValueError("EnsembleMapper needs at least one member")
        self.prompt_column = prompt_column
        self._request = GenerationRequest(
            prompt="-", max_new_tokens=max_new_tokens, temperature=temperature, seed=seed
        )
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(
            target=self._loop.run_forever, name="ensemble-mapper", daemon=True
        )
        self._thread.start()
        built = [build_member(spec, i) for i, spec in enumerate(members)]
        self._ensemble = Ensemble(
            built,
            policy=policy,  # type: ignore[arg-type]
            threshold=threshold,
            max_items_in_flight=max_items_in_flight,
        )
        self._call(self._ensemble.__aenter__())
        self._closed = False

    def _call(self, coro: Any) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result()

    async def _label(self, prompts: list[str]) -> list[EnsembleResult]:
        items = [self._request.replace(prompt=p) for p in prompts]
        results = [r async for r in self._ensemble.map(items, ordered=True)]
        return results

    def __call__(self, batch: Mapping[str, Any]) -> dict[str, Any]:
        if self.prompt_column not in batch:
            raise KeyError(f"batch has no column {self.prompt_column!r} (columns: {sorted(batch)})")
        prompts = [str(p) for p in batch[self.prompt_column]]
        results: list[EnsembleResult] = self._call(self._label(prompts))
        out = {key: np.asarray(value) for key, value in batch.items()}
        out["kept"] = np.array([r.kept for r in results], dtype=bool)
        out["text"] = np.array([r.text or "" for r in results], dtype=object)
        out["rule"] = np.array([r.decision.selection.rule for r in results], dtype=object)
        out["winner"] = np.array(
            [r.winner.source if r.winner is not None else "" for r in results], dtype=object
        )
        out["candidates"] = np.array(
            [json.dumps([c.to_dict() for c in r.candidates]) for r in results], dtype=object
        )
        return out

    def close(self) -> None:
        """Close the ensemble and stop the loop thread (also done when collected)."""
        if self._closed:
            return
        self._closed = True
        try:
            self._call(self._ensemble.aclose())
        finally:
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(timeout=10)

    def __del__(self) -> None:
        with contextlib.suppress(Exception):
            self.close()
