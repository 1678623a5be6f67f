"""Target-fit selection in a ``generate`` run: configured in TOML, the target model
scores every item's candidates, records keep its pick with every score in provenance;
a target that cannot score stops the run before anything is written."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from served import Server
from test_cli_generate import config_text, read_jsonl, servers, write_config

from ensemble_async import cli
from ensemble_async.config import ConfigError, load_config

__all__ = ["servers"]  # the module-scoped fixture of the doubles, shared

SELECTION = """
[backends.student]
kind = "tgi"
url = "{url}"

[selection]
policy = "{policy}"
target = "student"
normalise = "mean"
"""


def _config(servers: tuple[str, str], tmp_path: Path, policy: str, url: str | None = None) -> Path:
    out = tmp_path / "out" / "records.jsonl"
    extra = SELECTION.format(url=url or servers[0], policy=policy)
    return write_config(
        tmp_path / "cfg.toml", config_text(*servers, out, io_n=4, o_n=2, extra=extra)
    )


@pytest.mark.parametrize("policy", ["target-fit", "consensus+target-fit"])
def test_records_keep_the_targets_pick_with_every_score(
    servers: tuple[str, str], tmp_path: Path, policy: str
) -> None:
    cfg = _config(servers, tmp_path, policy)
    assert cli.main(["generate", "--config", str(cfg), "--quiet"]) == cli.EXIT_OK
    records = read_jsonl(tmp_path / "out" / "records.jsonl")
    assert records
    for record in records:
        decision = record["provenance"]["decision"]
        chosen = decision["selection"]
        assert chosen["policy"] == policy and chosen["rule"] == policy
        scores = {int(i): s for i, s in chosen["scores"]}
        assert chosen["index"] in chosen["eligible"]
        best = max(scores[i] for i in chosen["eligible"] if math.isfinite(scores[i]))
        assert scores[chosen["index"]] == best  # the winner is the target's favourite
        candidates = record["provenance"]["candidates"]
        assert record["output"] == candidates[chosen["index"]]["text"].strip()
        if policy == "consensus+target-fit":
            assert decision["index"] is not None  # consensus kept it first
    manifest = json.loads((tmp_path / "out" / "records.manifest.json").read_text())
    assert policy in json.dumps(manifest)


def test_a_target_that_cannot_score_stops_the_run_before_anything_is_written(
    servers: tuple[str, str], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # A TGI server that generates but returns no prefill log-probabilities: it passes
    # the probe, then fails the scoring check before any item.
    mute = Server("tgi", "--ei", "writer-lm", "--no-logprobs")
    try:
        cfg = _config(servers, tmp_path, "target-fit", url=mute.url)
        code = cli.main(["generate", "--config", str(cfg), "--quiet"])
    finally:
        mute.stop()
    err = " ".join(capsys.readouterr().err.split())
    assert code == cli.EXIT_BACKENDS_FAILED
    assert "member student" in err and "cannot score" in err and "Traceback" not in err
    assert not (tmp_path / "out").exists()  # nothing was written


def test_selection_is_checked_when_the_config_loads(tmp_path: Path) -> None:
    base = config_text("http://127.0.0.1:1", "http://127.0.0.1:2", tmp_path / "r.jsonl")
    bad = {
        'policy = "best"': "selection.policy",
        'policy = "target-fit"': "selection.target",
        'policy = "target-fit"\ntarget = "nobody"': "selection.target",
        'policy = "consensus"\ntarget = "writer"': "selection.target",
        'policy = "target-fit"\ntarget = "writer"\nnormalise = "max"': "selection.normalise",
    }
    for body, key in bad.items():
        cfg = write_config(tmp_path / "c.toml", base + "\n[selection]\n" + body + "\n")
        with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
            load_config(cfg)
