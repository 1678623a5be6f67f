"""Replace a file atomically: write a temporary file beside it, ``fsync`` it, ``os.replace``
it onto the target.

A reader (or a process killed half-way) sees the old file or the new one, never a mix.
The temporary file is removed on every way out of the write -- an error, Ctrl-C
(``KeyboardInterrupt``), or a SIGTERM that the command line turns into an exception --
so no ``.name.*`` leftovers pile up beside the target.  The target must be a regular file
or not exist yet: replacing a device node, a folder or a FIFO is refused with
:class:`AtomicWriteError` before anything is written (``os.replace`` onto
``/dev/null`` would otherwise swap the device for a plain file).

This module is a leaf: it imports nothing from the rest of the package.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import stat
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any, BinaryIO, Literal, TextIO, overload

__all__ = ["AtomicWriteError", "check_target", "replacing", "write_bytes", "write_text"]

_O_CLOEXEC = getattr(os, "O_CLOEXEC", 0)


class AtomicWriteError(OSError):
    """The target cannot be replaced (not a regular file, or the folder refuses writes).

    ``str()`` names the path and the problem."""


def check_target(path: Path) -> None:
    """Raise :class:`AtomicWriteError` unless ``path`` is absent or a regular file."""
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        return
    except OSError as exc:
        raise AtomicWriteError(f"{path}: {exc.strerror or exc}") from None
    if stat.S_ISDIR(mode):
        raise AtomicWriteError(f"{path}: is a directory")
    if not stat.S_ISREG(mode):
        raise AtomicWriteError(f"{path}: not a regular file (refusing to replace it)")


@overload
def replacing(
    path: str | Path,
    *,
    binary: Literal[False] = False,
    encoding: str = "utf-8",
    newline: str | None = "\n",
    prefix: str | None = None,
    mode: int | None = None,
) -> contextlib.AbstractContextManager[TextIO]: ...


@overload
def replacing(
    path: str | Path,
    *,
    binary: Literal[True],
    encoding: str = "utf-8",
    newline: str | None = "\n",
    prefix: str | None = None,
    mode: int | None = None,
) -> contextlib.AbstractContextManager[BinaryIO]: ...


def replacing(
    path: str | Path,
    *,
    binary: bool = False,
    encoding: str = "utf-8",
    newline: str | None = "\n",
    prefix: str | None = None,
    mode: int | None = None,
) -> contextlib.AbstractContextManager[Any]:
    """A context manager yielding a file open for writing; on a clean exit its content
    replaces ``path`` (flushed and fsynced first), on any exception the temporary file
    is removed and ``path`` is left as it was.

    ``prefix``: the temporary file's name prefix (default ``.<name>.``).  ``mode``: the
    permission bits of the result (default: the target's current ones, else 0o644).
    Raises :class:`AtomicWriteError` for a target that is not a regular file and
    ``OSError`` when the folder cannot be written.
    """
    return _replacing(Path(path), binary, encoding, newline, prefix, mode)


@contextlib.contextmanager
def _replacing(
    target: Path,
    binary: bool,
    encoding: str,
    newline: str | None,
    prefix: str | None,
    mode: int | None,
) -> Iterator[IO[Any]]:
    check_target(target)
    folder = target.parent
    folder.mkdir(parents=True, exist_ok=True)
    if mode is None:
        try:
            mode = stat.S_IMODE(os.stat(target).st_mode)
        except FileNotFoundError:
            mode = 0o644
    # The name is chosen before the file exists, so an interruption (Ctrl-C, SIGTERM
    # turned into an exception) at any point after the file is created still knows
    # what to remove.  A collision with someone else's file fails with FileExistsError,
    # and that file is left alone.
    tmp = folder / f"{prefix or f'.{target.name}.'}{secrets.token_hex(6)}"
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | _O_CLOEXEC, 0o600)
        f: IO[Any]
        if binary:
            f = os.fdopen(fd, "wb")
        else:
            f = os.fdopen(fd, "w", encoding=encoding, newline=newline)
        with f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, mode)
        check_target(target)  # it may have changed while we wrote
        os.replace(tmp, target)
    except BaseException as exc:
        if not isinstance(exc, FileExistsError):
            with contextlib.suppress(OSError):
                tmp.unlink()
        raise
    _fsync_dir(folder)


def _fsync_dir(folder: Path) -> None:
    """Make the rename durable (best effort: some systems cannot open a folder)."""
    with contextlib.suppress(OSError):
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def write_bytes(path: str | Path, data: bytes, *, prefix: str | None = None) -> None:
    """Replace ``path`` with ``data`` atomically (see :func:`replacing`)."""
    with replacing(path, binary=True, prefix=prefix) as f:
        f.write(data)


def write_text(
    path: str | Path, text: str, *, encoding: str = "utf-8", prefix: str | None = None
) -> None:
    """Replace ``path`` with ``text`` atomically (see :func:`replacing`)."""
    with replacing(path, encoding=encoding, prefix=prefix) as f:
        f.write(text)
