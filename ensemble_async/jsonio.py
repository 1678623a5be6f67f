"""JSON on the wire: orjson when it is installed (the ``fast`` extra), else the standard
library, behind one pair of functions.

Only request bodies and server answers go through here, where JSON is on every
request's path (orjson encodes and decodes them several times faster).  Files the
project writes (records, manifests, the cache) keep the standard library's exact
formatting, so their bytes do not depend on what is installed.

``loads`` accepts what ``json.loads`` accepts: a body orjson refuses (``NaN``,
``-Infinity``, which some servers send in log-probabilities) is parsed again by the
standard library.  Its text is always valid Unicode: a lone surrogate (an escape such as
``"\\ud83d"`` for half an emoji, or raw surrogate bytes), which the standard library
would keep and nothing downstream could encode, is read as U+FFFD.  One difference
remains: orjson reads an integer past 64 bits as a float; no field an adapter reads
(counts, indices, seeds) can hold one.
``dumps`` returns compact UTF-8 bytes; a value orjson cannot encode (an integer past
64 bits, a non-string key) is encoded by the standard library instead.
``ENSEMBLE_ASYNC_JSON=json`` makes the standard library do all of it.
"""

from __future__ import annotations

import importlib
import json
import os
from types import ModuleType
from typing import Any

__all__ = ["JSON_LIBRARY", "dumps", "loads"]


def _find_orjson() -> ModuleType | None:
    if os.environ.get("ENSEMBLE_ASYNC_JSON", "").strip().lower() == "json":
        return None  # forced, e.g. to measure what orjson buys
    try:
        return importlib.import_module("orjson")
    except ImportError:  # exercised by a test that hides orjson
        return None


_orjson = _find_orjson()

JSON_LIBRARY = "json" if _orjson is None else "orjson"
"""Which library encodes and decodes: ``"orjson"`` or ``"json"``."""


def _std_dumps(value: Any) -> bytes:
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False, allow_nan=False).encode()


def _valid(value: Any) -> Any:
    """``value`` with each lone surrogate in its strings replaced by U+FFFD."""
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            return "".join("\ufffd" if "\ud800" <= c <= "\udfff" else c for c in value)
        return value
    if isinstance(value, list):
        return [_valid(v) for v in value]
    if isinstance(value, dict):
        return {_valid(k): _valid(v) for k, v in value.items()}
    return value


def _std_loads(data: bytes | str) -> Any:
    value = json.loads(data)
    raw = data if isinstance(data, bytes) else data.encode("utf-8", "surrogatepass")
    # only a \uD800-\uDFFF escape or a raw 0xED lead byte can give a lone surrogate
    if b"\\ud" in raw or b"\\uD" in raw or b"\xed" in raw:
        value = _valid(value)
    return value


if _orjson is not None:
    _orjson_loads = _orjson.loads
    _orjson_dumps = _orjson.dumps
    _OrjsonDecodeError = _orjson.JSONDecodeError
    _OrjsonEncodeError = _orjson.JSONEncodeError

    def loads(data: bytes | str) -> Any:
        """Parse a JSON document (raises ``ValueError`` when it is not one)."""
        try:
            return _orjson_loads(data)
        except _OrjsonDecodeError:  # its text is valid Unicode; the fallback's is made so
            return _std_loads(data)

    def dumps(value: Any) -> bytes:
        """Compact JSON as UTF-8 bytes (orjson writes NaN and infinities as ``null``;
        request bodies never hold them: requests are validated)."""
        try:
            encoded: bytes = _orjson_dumps(value)
        except _OrjsonEncodeError:
            return _std_dumps(value)
        return encoded

else:  # pragma: no cover - exercised by a test that hides orjson

    def loads(data: bytes | str) -> Any:
        """Parse a JSON document (raises ``ValueError`` when it is not one)."""
        return _std_loads(data)

    def dumps(value: Any) -> bytes:
        """Compact JSON as UTF-8 bytes (``ValueError`` for NaN or infinities)."""
        return _std_dumps(value)
