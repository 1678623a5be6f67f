"""The one atomic-replace helper: all or nothing, no temporary file left on any exit,
and never a device node or folder replaced."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from ensemble_async.atomicfile import AtomicWriteError, replacing, write_bytes, write_text


def leftovers(folder: Path, keep: str) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name != keep)


def test_writes_text_and_bytes(tmp_path: Path) -> None:
    target = tmp_path / "sub" / "out.txt"
    write_text(target, "héllo\n")
    assert target.read_text(encoding="utf-8") == "héllo\n"
    write_bytes(target, b"\x00\x01")
    assert target.read_bytes() == b"\x00\x01"
    assert oct(target.stat().st_mode & 0o777) == oct(0o644)
    assert leftovers(target.parent, "out.txt") == []


def test_keeps_the_permissions_of_the_file_it_replaces(tmp_path: Path) -> None:
    target = tmp_path / "out.txt"
    target.write_text("old")
    target.chmod(0o600)
    write_text(target, "new")
    assert target.read_text() == "new" and target.stat().st_mode & 0o777 == 0o600


@pytest.mark.parametrize("error", [ValueError("boom"), KeyboardInterrupt()])
def test_an_interrupted_write_leaves_the_old_file_and_no_temporary(
    tmp_path: Path, error: BaseException
) -> None:
    target = tmp_path / "out.txt"
    target.write_text("old")
    with pytest.raises(type(error)), replacing(target) as f:
        f.write("half of the new")
        raise error
    assert target.read_text() == "old"
    assert leftovers(tmp_path, "out.txt") == []


def test_refuses_a_device_node_and_a_folder(tmp_path: Path) -> None:
    if os.path.exists("/dev/null"):
        with pytest.raises(AtomicWriteError, match="not a regular file"):
            write_text("/dev/null", "x")
        assert Path("/dev/null").is_char_device()
    (tmp_path / "d").mkdir()
    with pytest.raises(AtomicWriteError, match="is a directory"):
        write_text(tmp_path / "d", "x")
    assert leftovers(tmp_path, "d") == []


def test_a_folder_that_cannot_be_written_is_an_oserror(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    with pytest.raises(OSError):
        write_text(blocker / "out.txt", "x")
