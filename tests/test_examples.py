"""The examples run as documented, and a third-party backend registers through the
entry-point group exactly like the built-ins."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from ensemble_async import Completion, GenerationRequest, cli, registry
from ensemble_async.config import load_config

REPO = Path(__file__).resolve().parents[1]


def test_embed_example_runs_against_the_doubles() -> None:
    proc = subprocess.run(
        [sys.executable, str(REPO / "examples" / "embed_ensemble.py")],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    lines = [json.loads(line) for line in proc.stdout.splitlines()]
    results, stats = lines[:-1], lines[-1]["stats"]
    assert sorted(r["index"] for r in results) == [0, 1, 2, 3]
    assert all(len(r["candidates"]) == 2 for r in results)
    assert set(stats) == {"tgi", "vllm"}


def test_third_party_backend_registers_through_entry_points(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    # What `pip install ./examples/custom_backend` leaves in site-packages, made by hand:
    # the module and a dist-info with the entry point.
    src = REPO / "examples" / "custom_backend"
    (tmp_path / "ensemble_async_echo.py").write_text((src / "ensemble_async_echo.py").read_text())
    info = tmp_path / "ensemble_async_echo-0.1.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(
        "Metadata-Version: 2.1\nName: ensemble-async-echo\nVersion: 0.1.0\n"
    )
    (info / "entry_points.txt").write_text(
        "[ensemble_async.backends]\necho = ensemble_async_echo:EchoBackend\n"
    )
    installed_already = "echo" in registry.backend_kinds()  # pip install ./examples/...
    monkeypatch.syspath_prepend(str(tmp_path))
    registry.refresh()
    try:
        assert "echo" in registry.backend_kinds()
        backend = registry.create_backend("echo", name="e")
        assert backend.name == "e"
        assert {"openai", "tgi", "transformers"} <= set(registry.backend_kinds())
        # it declares what it needs (nothing): no fake URL in a config or on --member
        assert registry.backend_requires("echo") == ()
        cfg = tmp_path / "echo.toml"
        cfg.write_text(
            '[backends.w]\nkind = "echo"\n[backends.a]\nkind = "echo"\n'
            '[roles]\nwriter = "w"\nanswerers = ["a"]\n'
        )
        assert load_config(cfg).backends["a"].factory_options() == {"name": "a"}
        code = cli.main(["ask", "one two three", "--no-chat", "--member", "echo,name=e1"])
        assert code == cli.EXIT_OK
        assert "three two one" in capsys.readouterr().out
    finally:
        monkeypatch.undo()
        registry.refresh()
    # Gone with its folder, unless the example package is really installed here too.
    assert ("echo" in registry.backend_kinds()) == installed_already


async def test_echo_backend_behaves() -> None:
    sys.path.insert(0, str(REPO / "examples" / "custom_backend"))
    try:
        from ensemble_async_echo import EchoBackend
    finally:
        sys.path.pop(0)
    async with EchoBackend(name="e") as echo:
        out = await echo.generate(GenerationRequest(prompt="one two three", n=2))
        assert [c.text for c in out] == ["three two one"] * 2
        events = [e async for e in echo.stream(GenerationRequest(prompt="a b"))]
        assert [e.text for e in events] == ["b", "a", "b a"]
        assert isinstance(events[-1], Completion) and events[-1].completion_tokens == 2
