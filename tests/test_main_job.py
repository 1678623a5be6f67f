"""README's main job, for real: ``python -m ensemble_async`` on the embedded default
(two local models from PyPI, loaded at the same time in one fresh process)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("transformers")
pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]


def test_main_job_answers_with_both_embedded_models(tmp_path: Path) -> None:
    env = {**os.environ, "COLUMNS": "200"}
    proc = subprocess.run(
        [sys.executable, "-m", "ensemble_async", "ask", "Name a fruit.", "--max-new-tokens", "8"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
        check=False,
    )
    out = proc.stdout
    assert proc.returncode == 0, out + proc.stderr
    assert "smollm2-135m-instruct" in out and "gemma3-270m" in out
    assert "failed" not in out and "Error" not in out
    assert "consensus:" in out
