"""The design card's layout: backends/ installs as ensemble_async.backends, seeds ship in
the wheel, and no top-level ``backends`` lands in site-packages."""

from __future__ import annotations

import os
import site
import subprocess
import sys
import venv
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
ADAPTERS = ("openai", "tgi", "transformers")

pytestmark = pytest.mark.slow


def _run(*args: str | Path, cwd: Path, env: dict[str, str] | None = None) -> str:
    proc = subprocess.run(
        [str(a) for a in args],
        check=False,
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, f"{args} failed:\n{proc.stdout}\n{proc.stderr}"
    return proc.stdout


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("wheel")
    _run(
        sys.executable,
        "-m",
        "pip",
        "wheel",
        "--no-deps",
        "--no-build-isolation",
        "-w",
        out,
        REPO,
        cwd=out,
    )
    (found,) = out.glob("ensemble_async-*.whl")
    return found


def _fresh_venv(where: Path) -> Path:
    """A new venv whose only view of the dev environment is its third-party packages
    (so imports of aiohttp, torch, ... work), never this checkout or its editable hook."""
    venv.create(where, with_pip=False)
    python = where / "bin" / "python"
    purelib = subprocess.run(
        [python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    deps = [p for p in site.getsitepackages() if Path(p).is_dir()]
    Path(purelib, "zz_dev_deps.pth").write_text("\n".join(deps) + "\n")
    return python


def _import_check(python: Path, cwd: Path) -> str:
    code = (
        "import importlib, ensemble_async, ensemble_async.backends as b, ensemble_async.seeds as s\n"
        f"for name in {ADAPTERS!r}:\n"
        "    importlib.import_module('ensemble_async.backends.' + name)\n"
        "from ensemble_async.registry import backend_kinds\n"
        "print(ensemble_async.__file__); print(b.__file__); print(s.__file__); print(backend_kinds())\n"
        "try:\n"
        "    import backends\n"
        "except ImportError:\n"
        "    print('no top-level backends')\n"
        "else:\n"
        "    print('TOP-LEVEL backends at', backends.__file__)\n"
    )
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}
    return _run(python, "-c", code, cwd=cwd, env=env)


def test_wheel_file_list(wheel: Path) -> None:
    names = zipfile.ZipFile(wheel).namelist()
    top = {n.split("/", 1)[0] for n in names}
    assert "backends" not in top, "a top-level backends package would land in site-packages"
    assert top <= {"ensemble_async"} | {t for t in top if t.endswith(".dist-info")}
    for adapter in ADAPTERS:  # a module, or a package (transformers)
        assert {
            f"ensemble_async/backends/{adapter}.py",
            f"ensemble_async/backends/{adapter}/__init__.py",
        } & set(names), adapter
    for module in ("__init__", "backend", "batcher", "runner"):
        assert f"ensemble_async/backends/transformers/{module}.py" in names
    assert "ensemble_async/py.typed" in names
    assert "ensemble_async/backends/py.typed" in names
    assert "ensemble_async/seeds/__init__.py" in names
    shipped_seeds = sorted(
        p.name for p in (REPO / "seeds").iterdir() if p.suffix in (".jsonl", ".md")
    )
    for seed_file in shipped_seeds:
        assert f"ensemble_async/seeds/{seed_file}" in names
    (entry_points,) = [n for n in names if n.endswith(".dist-info/entry_points.txt")]
    text = zipfile.ZipFile(wheel).read(entry_points).decode()
    assert "[ensemble_async.backends]" in text
    for adapter in ADAPTERS:
        assert f"{adapter} = ensemble_async.backends.{adapter}:" in text


def test_wheel_installs_and_imports_from_outside(wheel: Path, tmp_path: Path) -> None:
    python = _fresh_venv(tmp_path / "venv")
    _run(
        sys.executable, "-m", "pip", "--python", python, "install", "--no-deps", wheel, cwd=tmp_path
    )
    out = _import_check(python, cwd=tmp_path)
    assert str(tmp_path / "venv") in out.splitlines()[0]
    assert "/ensemble_async/backends/__init__.py" in out.splitlines()[1]
    assert "'openai', " in out and "'tgi', " in out and "'transformers'" in out
    assert "no top-level backends" in out
    site_dir = Path(out.splitlines()[0]).parents[1]
    assert not (site_dir / "backends").exists()


@pytest.mark.parametrize("editable", [False, True], ids=["pip-install", "pip-install-e"])
def test_source_installs_give_backends_subpackage(editable: bool, tmp_path: Path) -> None:
    python = _fresh_venv(tmp_path / "venv")
    target = ["-e", str(REPO)] if editable else [str(REPO)]
    _run(
        sys.executable,
        "-m",
        "pip",
        "--python",
        python,
        "install",
        "--no-deps",
        "--no-build-isolation",
        *target,
        cwd=tmp_path,
    )
    out = _import_check(python, cwd=tmp_path)
    lines = out.splitlines()
    if editable:
        assert lines[1] == str(REPO / "backends" / "__init__.py")
    else:
        assert lines[1].startswith(str(tmp_path / "venv"))
    assert "no top-level backends" in out
