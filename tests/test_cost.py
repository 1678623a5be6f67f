"""Prices per member give a cost line in the run's summary and in its summary file."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from test_cli_generate import config_text, servers, write_config

from ensemble_async import cli
from ensemble_async.config import ConfigError, load_config

__all__ = ["servers"]


def test_the_summary_prices_each_member_by_its_tokens(
    servers: tuple[str, str], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "out" / "records.jsonl"
    text = config_text(*servers, out, io_n=3, o_n=1).replace(
        '[backends.answerer]\nkind = "openai"',
        '[backends.answerer]\nkind = "openai"\nprice = { input = 2.0, output = 10.0 }',
    )
    assert "price =" in text
    cfg = write_config(tmp_path / "cfg.toml", text)
    assert cli.main(["generate", "--config", str(cfg), "--quiet"]) == cli.EXIT_OK
    err = " ".join(capsys.readouterr().err.split())
    summary = json.loads(out.with_name("records.summary.json").read_text())
    answerer = {b["name"]: b for b in summary["backends"]}["answerer"]
    expected = (answerer["prompt_tokens"] * 2.0 + answerer["completion_tokens"] * 10.0) / 1e6
    assert answerer["completion_tokens"] > 0
    assert answerer["cost_usd"] == pytest.approx(expected)
    assert summary["cost_usd"] == pytest.approx(expected)  # the only priced member
    assert summary["prices"] == {"answerer": {"prompt": 2.0, "completion": 10.0}}
    assert f"cost ${expected:.4f}" in err
    assert "url" not in json.dumps(summary["backends"])  # never a URL (credentials)


def test_a_price_is_checked_when_the_config_loads(tmp_path: Path) -> None:
    base = config_text("http://127.0.0.1:1", "http://127.0.0.1:2", tmp_path / "r.jsonl")
    for bad, key in (
        ("price = { input = 1.0 }", "backends.answerer.price"),
        ("price = { input = -1.0, output = 1.0 }", "backends.answerer.price.input"),
        ('price = { input = 1.0, output = "x" }', "backends.answerer.price.output"),
    ):
        cfg = write_config(
            tmp_path / "c.toml",
            base.replace(
                '[backends.answerer]\nkind = "openai"',
                f'[backends.answerer]\nkind = "openai"\n{bad}',
            ),
        )
        with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
            load_config(cfg)
