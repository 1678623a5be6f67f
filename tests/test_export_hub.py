"""The Hub-ready exports: TRL's formats, Parquet, a saved DatasetDict with its card, and
the push to a local stand-in of the Hub's HTTP API; datasets reads every format."""

from __future__ import annotations

import json
import random
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from hub_standin import HubStandIn

from ensemble_async import cli
from ensemble_async.export import ExportError, export_hf, record_from_row
from ensemble_async.records import RecordWriter
from ensemble_async.testing.synthetic import synthetic_record, synthetic_reject

datasets = pytest.importorskip("datasets")

TOKEN = "hf_standin_secret_4f1c9b"


def _records() -> list[dict[str, Any]]:
    rng = random.Random(11)
    records = [synthetic_record(rng, i) for i in range(6)]
    records[1]["provenance"]["candidates"][2]["model"] = "served/model-id"  # added fields
    records[1]["provenance"]["timestamps"] = {"finished_at": 1700000000.5}
    records[2]["fingerprint"] = "abc123"
    records[3]["input"] = None  # written by an older version
    records[4]["provenance"]["novelty_max_rouge"] = 0  # an int score stays an int
    records.append({"id": "ei-bare", "instruction": "Name a colour.", "output": "Blue"})
    return records


@pytest.fixture
def hf_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.delenv("HF_TOKEN", raising=False)
    return tmp_path / "hf" / "cache"


@pytest.fixture
def run(tmp_path: Path) -> Iterator[Path]:
    path = tmp_path / "run" / "records.jsonl"
    rng = random.Random(12)
    with RecordWriter(path) as w:
        for r in _records():
            w.write(r)
        for i in range(5):
            w.reject(synthetic_reject(rng, i))
    yield path


def test_trl_formats_keep_ids_and_load(run: Path, tmp_path: Path, hf_env: Path) -> None:
    msgs, pc = tmp_path / "m.jsonl", tmp_path / "pc.jsonl"
    args = ["export", "--format", "messages", str(run), str(msgs), "--system-prompt", "Be brief."]
    assert cli.main(args) == 0
    assert cli.main(["export", "--format", "prompt-completion", str(run), str(pc)]) == 0
    m = datasets.load_dataset("json", data_files=str(msgs), split="train", cache_dir=str(hf_env))
    p = datasets.load_dataset("json", data_files=str(pc), split="train", cache_dir=str(hf_env))
    records = _records()
    assert m["id"] == p["id"] == [r["id"] for r in records]
    first = m[0]["messages"]
    assert [t["role"] for t in first] == ["system", "user", "assistant"]
    assert first[0]["content"] == "Be brief."
    assert first[1]["content"] == records[0]["instruction"] + (
        "\n\n" + records[0]["input"] if records[0]["input"] else ""
    )
    assert p.column_names == ["id", "prompt", "completion"]
    assert p["completion"] == [r["output"] for r in records]
    assert p[3]["prompt"] == records[3]["instruction"]  # a null input adds nothing


def test_parquet_and_hf_round_trip_every_record(run: Path, tmp_path: Path, hf_env: Path) -> None:
    pq_out, hf_out = tmp_path / "out" / "data.parquet", tmp_path / "ds"
    assert cli.main(["export", "--format", "parquet", str(run), str(pq_out), "--with-rejects"]) == 0
    assert cli.main(["export", "--format", "hf", str(run), str(hf_out), "--with-rejects"]) == 0
    records = _records()
    rejects = [json.loads(line) for line in run.with_name("records.rejects.jsonl").open()]
    table = datasets.load_dataset(
        "parquet", data_files=str(pq_out), split="train", cache_dir=str(hf_env)
    )
    dd = datasets.load_from_disk(str(hf_out))
    assert sorted(dd) == ["rejects", "train"]
    for rows in (table, dd["train"]):
        assert [record_from_row(row) for row in rows] == records  # nothing lost
    train = dd["train"]
    assert train["id"] == [r["id"] for r in records]
    assert train[0]["decision_rule"] == records[0]["provenance"]["decision"]["rule"]
    assert json.loads(train[1]["candidates"])[2]["model"] == "served/model-id"
    assert json.loads(train[1]["provenance_extra"]) == {"timestamps": {"finished_at": 1700000000.5}}
    assert train[3]["input"] == "" and json.loads(train[3]["extra"]) == {"input": None}
    assert train[6]["writer"] is None and train[6]["candidates"] is None
    rj = datasets.load_dataset(
        "parquet",
        data_files=str(pq_out.with_name("data.rejects.parquet")),
        split="train",
        cache_dir=str(hf_env),
    )
    for split in (rj, dd["rejects"]):
        assert split["id"] == [r["id"] for r in rejects]
        assert split["reason"] == [r["reason"] for r in rejects]
        for row, reject in zip(split, rejects, strict=True):
            back = {k: v for k, v in row.items() if k != "detail" and v is not None}
            back.update(json.loads(row["detail"]) if row["detail"] else {})
            assert back == reject
    card = (hf_out / "README.md").read_text()
    assert card.startswith("---\nlicense:")
    assert "`train` (7 rows), `rejects` (5 rows)" in card
    assert "preset: `default`; run seed: `7`" in card
    assert "| consensus kept (records) | 7 |" in card
    assert 'load_from_disk("path/to/this/folder")' in card


def test_hf_export_replaces_only_a_dataset_and_fails_cleanly(
    run: Path, tmp_path: Path, hf_env: Path
) -> None:
    out = tmp_path / "ds"
    assert export_hf(run, out) == {"train": 7}
    assert export_hf(run, out, rejects_path=run.with_name("records.rejects.jsonl")) == {
        "train": 7,
        "rejects": 5,
    }
    assert sorted(datasets.load_from_disk(str(out))) == ["rejects", "train"]
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"id": "a", "instruction": "i", "output": "o"}\n{"id": "b"}\n')
    with pytest.raises(ExportError, match=r"bad\.jsonl: record b"):
        export_hf(bad, out)
    assert sorted(datasets.load_from_disk(str(out))) == ["rejects", "train"]  # untouched
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []
    other = tmp_path / "mine"
    other.mkdir()
    (other / "notes.txt").write_text("keep me")
    with pytest.raises(ExportError, match="not a dataset export"):
        export_hf(run, other)
    assert (other / "notes.txt").read_text() == "keep me"


def test_card_licences(run: Path, tmp_path: Path, hf_env: Path) -> None:
    out = tmp_path / "ds"
    args = ["export", "--format", "hf", str(run), str(out), "--license", "apache-2.0"]
    assert cli.main([*args, "--model-license", "answerer=Apache-2.0"]) == 0
    card = (out / "README.md").read_text()
    assert card.startswith('---\nlicense: "apache-2.0"')
    assert "| answerer | - | served/model-id | Apache-2.0 |" in card  # model from provenance
    assert "| third | - | - | not given: check the model card |" in card


def test_licences_of_the_embedded_models_and_of_the_log() -> None:
    from ensemble_async.card import member_licenses

    rows: list[dict[str, Any]] = [
        {"member": m, "models": []}
        for m in ("smollm2-135m-instruct (step 2)", "gemma3-270m", "remote")
    ]
    report = {
        "members": {"rows": rows},
        "run_backends": [{"name": "remote", "kind": "openai", "model": "x/y", "license": "MIT"}],
    }
    got = member_licenses(report)
    assert got["smollm2-135m-instruct"]["license"] == "Apache-2.0"
    assert got["gemma3-270m"]["license"] == "Gemma Terms of Use"
    assert got["remote"] == {"model": "x/y", "kind": "openai", "license": "MIT"}


def test_export_option_errors(
    run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = str(tmp_path / "x")
    assert cli.main(["export", "--format", "chat", str(run), out, "--push-to-hub", "u/r"]) == 2
    assert "--push-to-hub goes with --format hf" in capsys.readouterr().err
    assert cli.main(["export", "--format", "alpaca", str(run), out, "--system-prompt", "s"]) == 2
    assert cli.main(["export", "--format", "chat", str(run), out, "--with-rejects"]) == 2
    assert cli.main(["export", "--format", "hf", str(run), out, "--push-to-hub", "u/r"]) == 2
    assert "HF_TOKEN" in capsys.readouterr().err
    assert not Path(out).exists()  # checked before anything is written


def test_push_to_a_local_hub(
    run: Path,
    tmp_path: Path,
    hf_env: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """``datasets``' own push_to_hub against the stand-in: the card goes up first, then
    the records (config default) and the rejects (config rejects); load_dataset reads
    them back from the stand-in; the token is sent, never shown."""
    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.delenv("HF_DATASETS_OFFLINE")
    monkeypatch.setenv("HF_HUB_DISABLE_XET", "1")  # the stand-in speaks LFS, not Xet
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    with HubStandIn(TOKEN) as hub:
        monkeypatch.setenv("HF_ENDPOINT", hub.url)
        # Both libraries read these variables when first imported; this process has.
        import huggingface_hub.constants as hub_constants

        monkeypatch.setattr(datasets.config, "HF_ENDPOINT", hub.url)
        monkeypatch.setattr(hub_constants, "ENDPOINT", hub.url)
        monkeypatch.setattr(hub_constants, "HF_HUB_DISABLE_XET", True)
        monkeypatch.setattr(
            hub_constants,
            "HUGGINGFACE_CO_URL_TEMPLATE",
            hub.url + "/{repo_id}/resolve/{revision}/{filename}",
        )
        out = tmp_path / "ds"
        args = ["export", "--format", "hf", str(run), str(out), "--with-rejects"]
        assert cli.main([*args, "--push-to-hub", "me/instructions"]) == 0
        assert hub.unknown == []
        files = hub.repos["me/instructions"]
        assert sorted(files) == [
            "README.md",
            "data/train-00000-of-00001.parquet",
            "rejects/train-00000-of-00001.parquet",
        ]
        assert f"Bearer {TOKEN}" in hub.auth_seen
        card = files["README.md"].decode()
        assert "dataset_info:" in card and "# Synthetic instruction data" in card
        assert 'load_dataset("me/instructions", "rejects", split="train")' in card
        train = datasets.load_dataset(
            "me/instructions", split="train", cache_dir=str(tmp_path / "dl")
        )
        rejects = datasets.load_dataset(
            "me/instructions", "rejects", split="train", cache_dir=str(tmp_path / "dl")
        )
        assert [record_from_row(r) for r in train] == _records()
        assert rejects.num_rows == 5
        captured = capsys.readouterr()
        assert "pushed to me/instructions" in captured.out
        assert TOKEN not in captured.out + captured.err
    # The Hub is gone now: the push fails with exit 4, and the token stays hidden.
    assert cli.main([*args, "--push-to-hub", "me/instructions"]) == 4
    captured = capsys.readouterr()
    assert "push to me/instructions failed" in captured.err
    assert TOKEN not in captured.out + captured.err
