"""Local models through transformers: one worker thread per model, micro-batched.

The package splits along the thread boundary:

- ``batcher``: the bounded queue, dynamic micro-batching, cancellation and the worker
  loop.  It knows nothing about models and never imports torch.
- ``runner``: the model work, run only in the worker thread: loading, encoding and
  decoding, ``generate()`` with stop strings and per-batch random generators, scoring.
- ``backend``: :class:`TransformersBackend`, the asyncio face (the ``Backend`` and
  ``Scorer`` protocols), which makes the process-wide settings on the caller's thread.

Importing this package imports neither torch nor transformers; they load with the model.
"""

from .backend import TransformersBackend
from .batcher import BatchStats
from .runner import plain_chat_text

__all__ = ["BatchStats", "TransformersBackend", "plain_chat_text"]
