"""Ray integration (the optional ``ray`` extra): models hosted on a Ray cluster as ensemble
members, consensus decisions made on the cluster, and an ensemble as a Ray Data batch
mapper.

This package is the only place that imports Ray; the rest of ensemble-async works without
it.  Importing it without Ray installed raises an ``ImportError`` that says which extra to
install.
"""

from __future__ import annotations

import importlib.util

try:
    _found = importlib.util.find_spec("ray") is not None
except ImportError:
    _found = False
if not _found:  # exercised by a subprocess test
    raise ImportError("ensemble_async.ray needs Ray: pip install 'ensemble-async[ray]'")

from .backend import RayBackend
from .consensus import RayConsensus
from .host import BackendHost
from .mapper import EnsembleMapper

__all__ = ["BackendHost", "EnsembleMapper", "RayBackend", "RayConsensus"]
