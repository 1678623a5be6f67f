"""The run report: figures checked against the run's own files and log, hand-made cases,
escaping, errors, and bounded memory on a large synthetic file."""

from __future__ import annotations

import json
import random
import re
import textwrap
import tracemalloc
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from served import Server

from ensemble_async import cli
from ensemble_async import report as report_module
from ensemble_async import rouge as rouge_module
from ensemble_async.consensus import normalize, reference_similarity
from ensemble_async.reasons import REASONS, RULES, anchor, describe
from ensemble_async.report import (
    ReportBuilder,
    RunFiles,
    build_report,
    find_run_files,
    verb_and_object,
)
from ensemble_async.testing.synthetic import synthetic_record, synthetic_reject


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """A real run: the pipeline against three doubles (one of them failing 10% of calls)."""
    folder = tmp_path_factory.mktemp("run")
    servers = [
        Server("tgi", "--ei", "writer-lm", "--latency", "0.001"),
        Server("openai", "--ei", "answer-lm", "--latency", "0.001"),
        Server("openai", "--ei", "third-lm", "--latency", "0.001", "--fault-rate", "0.1"),
    ]
    try:
        cfg = folder / "cfg.toml"
        cfg.write_text(
            textwrap.dedent(
                f"""
                [run]
                seed = 5
                output = "{folder / "records.jsonl"}"
                targets = {{ input_output = 40, output = 25 }}

                [backends.writer]
                kind = "tgi"
                url = "{servers[0].url}"

                [backends.answerer]
                kind = "openai"
                url = "{servers[1].url}"

                [backends.third]
                kind = "openai"
                url = "{servers[2].url}"
                max_attempts = 1

                [roles]
                writer = "writer"
                answerers = ["answerer", "third"]
                min_candidates = 2  # a failing third answer does not hold an item back
                """
            )
        )
        log = folder / "run.log.jsonl"
        assert cli.main(["generate", "--config", str(cfg), "--log-jsonl", str(log)]) == 0
        yield folder
    finally:
        for server in servers:
            server.stop()


@pytest.fixture(scope="module")
def report(run_dir: Path) -> dict[str, Any]:
    assert cli.main(["report", str(run_dir)]) == 0
    value: dict[str, Any] = json.loads((run_dir / "report.json").read_text())
    return value


def test_funnel_and_reasons_match_the_files_and_the_log(
    run_dir: Path, report: dict[str, Any]
) -> None:
    records = read_jsonl(run_dir / "records.jsonl")
    rejects = read_jsonl(run_dir / "records.rejects.jsonl")
    by_reason = Counter((r["stage"], r["reason"]) for r in rejects)
    assert {(r["stage"], r["reason"]): r["count"] for r in report["rejects"]} == by_reason
    assert all(r["meaning"] for r in report["rejects"])  # every reason is catalogued
    # The log's own summary counted the same run independently.
    summary = read_jsonl(run_dir / "run.log.jsonl")[-1]["pipeline"]["counts"]
    funnel = {f["stage"]: f["count"] for f in report["funnel"]}
    assert funnel["instructions kept"] == summary["instructions"]["accepted"]
    assert funnel["instructions attempted"] == (
        summary["instructions"]["accepted"] + summary["instructions"]["rejected"]
    )
    assert funnel["instances (valid)"] == summary["instances"]["accepted"]
    assert funnel["consensus kept (records)"] == len(records) == summary["consensus"]["accepted"]
    rules = Counter(r["provenance"]["decision"]["rule"] for r in records)
    kept_rules = {
        r["rule"]: r["count"] for r in report["consensus"]["rules"] if r["outcome"] == "kept"
    }
    assert kept_rules == rules
    assert report["throughput"]["source"] == "log"
    assert sum(report["throughput"]["counts"]) == len(records)


def test_member_figures_match_the_candidates(run_dir: Path, report: dict[str, Any]) -> None:
    records = read_jsonl(run_dir / "records.jsonl")
    consensus_rejects = [
        r for r in read_jsonl(run_dir / "records.rejects.jsonl") if r["stage"] == "consensus"
    ]
    rows = {r["member"]: r for r in report["members"]["rows"]}
    assert list(rows) == ["writer (step 2)", "answerer", "third"]
    third = [
        c
        for r in records + consensus_rejects
        for c in r["provenance"]["candidates"]
        if c["source"] == "third"
    ]
    failed = sum(c["status"] in ("failed", "unavailable", "circuit_open") for c in third)
    assert rows["third"]["failures"] == failed > 0
    assert sum(r["wins"] for r in rows.values()) == len(records)
    wins0 = sum(r["provenance"]["decision"]["index"] == 0 for r in records)
    assert rows["writer (step 2)"]["win_rate"] == pytest.approx(wins0 / len(records))
    assert report["members"]["backends"], "token totals from the log"


def test_html_is_self_contained_and_links_every_reason(
    run_dir: Path, report: dict[str, Any]
) -> None:
    page = (run_dir / "report.html").read_text()
    assert page.count("<svg") >= 8
    assert not re.search(r"(src|href)=\"(https?:)?//", page), "nothing fetched from a network"
    ids = set(re.findall(r'id="([^"]+)"', page))
    for r in report["rejects"] + report["consensus"]["rules"]:
        name = r.get("reason") or r["rule"]
        assert f'href="#{anchor(name)}"' in page
        assert anchor(name) in ids


def test_hand_made_decisions(tmp_path: Path) -> None:
    def cand(i: int, source: str, text: str | None, status: str = "ok") -> dict[str, Any]:
        style = "instance" if i == 0 else "zero_shot"
        return {"index": i, "source": source, "status": status, "text": text, "prompt_style": style}

    def rec(
        n: int, texts: list[str | None], winner: int | None, low: float | None = None
    ) -> dict[str, Any]:
        cands = [cand(0, "w", texts[0], "given")]
        cands += [
            cand(i, s, t, "ok" if t is not None else "failed")
            for i, (s, t) in enumerate(zip(("a", "b"), texts[1:], strict=True), 1)
        ]
        prov = {
            "candidates": cands,
            "decision": {"index": winner, "rule": "x", "min_pairwise": low, "threshold": 0.01},
            "novelty_max_rouge": 0.1,
        }
        return {
            "id": f"ei-{n}",
            "type": "output",
            "instruction": "Write a short poem about cats.",
            "input": "",
            "output": "o",
            "provenance": prov,
        }

    builder = ReportBuilder(seeds=["Write a poem about dogs."])
    builder.add_record(rec(1, ["Red fox.", "red fox", "blue whale"], 0))
    builder.add_record(rec(2, ["green tea", "black tea", "green tea!"], 0))
    builder.add_record(rec(3, ["one two", None, "one two three"], 2))
    for k in range(12):
        reject = rec(10 + k, ["p q", "r s", "t u"], None, low=k / 1000)
        builder.add_reject({**reject, "stage": "consensus", "reason": "below-threshold"})
    result = builder.result()
    m = result["members"]
    assert m["labels"] == ["w (step 2)", "a", "b"]
    pos = {label: i for i, label in enumerate(m["labels"])}
    # w-a equal in record 1 only, out of 2 records where both answered, + 12 rejects
    assert m["exact_agreement"][pos["w (step 2)"]][pos["a"]] == pytest.approx(1 / 14)
    assert m["exact_agreement"][pos["w (step 2)"]][pos["b"]] == pytest.approx(1 / 15)
    rows = {r["member"]: r for r in m["rows"]}
    assert rows["w (step 2)"]["win_rate"] == pytest.approx(2 / 3)
    assert rows["b"]["win_rate"] == pytest.approx(1 / 3)
    assert rows["a"]["failures"] == 1 and rows["a"]["win_rate"] == 0
    expected = [
        reference_similarity(normalize(x), normalize(y))
        for x, y in (
            ("Red fox.", "blue whale"),
            ("green tea", "green tea!"),
            ("one two", "one two three"),
        )
    ]
    expected[1] = 1.0  # equal after normalising
    expected += [reference_similarity("p q", "t u")] * 12
    assert m["mean_rouge_l"][pos["w (step 2)"]][pos["b"]] == pytest.approx(sum(expected) / 15)
    near = [n["decision"]["min_pairwise"] for n in result["near_misses"]]
    assert near == [k / 1000 for k in range(11, 1, -1)]
    verbs = result["diversity"]["verbs"]
    assert verbs[0]["verb"] == "write" and verbs[0]["objects"][0]["object"] == "poem"
    assert result["diversity"]["vs_seeds"]["n"] == 3


def test_verb_heuristic() -> None:
    assert verb_and_object("Generate a list of the 5 largest cities.") == ("generate", "list")
    assert verb_and_object("Rewrite this sentence politely: hi") == ("rewrite", "sentence")
    assert verb_and_object("Stop.") == ("stop", None)
    assert verb_and_object("123 !!") is None


def test_reasons_catalogue_covers_what_the_code_writes() -> None:
    from ensemble_async import consensus, filters

    for word in filters.BLACKLIST:
        assert describe(f"blacklisted:{word}") is not None
    for rule in consensus.RULES:
        assert describe(rule) is not None, rule
    assert describe("backend_error:ServerError") is not None
    source = Path(filters.__file__).read_text()
    for reason in set(re.findall(r'Rejection\("([a-z_]+)"', source)):
        assert reason in REASONS, reason
    for reason in (
        "too_short",
        "too_long",
        "starts_with_write_a_program",
        "bad_first_char",
        "not_novel",
    ):
        assert reason in REASONS
    page = (Path(__file__).resolve().parents[1] / "docs" / "reasons.md").read_text()
    for meaning in (*REASONS.values(), *RULES.values()):
        assert f'<a id="{anchor(meaning.name)}"></a>' in page, meaning.name


def test_record_text_is_escaped(tmp_path: Path) -> None:
    rng = random.Random(1)
    record = synthetic_record(rng, 0)
    record["instruction"] = "Explain <script>alert(1)</script> & <b>this</b> please."
    record["provenance"]["candidates"][1]["text"] = "</pre><img src=x onerror=alert(2)>"
    (tmp_path / "records.jsonl").write_text(json.dumps(record) + "\n")
    assert cli.main(["report", str(tmp_path / "records.jsonl")]) == 0
    page = (tmp_path / "report.html").read_text()
    assert "<script>" not in page and "<img" not in page
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in page


def test_bad_input_and_unwritable_output(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert cli.main(["report", str(tmp_path / "missing")]) == 2
    assert "missing: no such file or directory" in capsys.readouterr().err
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "records.jsonl").write_text('{"id": "a"}\nnot json\n{"id": "b"}\n')
    assert cli.main(["report", str(bad)]) == 2
    assert "records.jsonl:2" in capsys.readouterr().err
    two = tmp_path / "two"
    two.mkdir()
    (two / "a.jsonl").write_text("")
    (two / "b.jsonl").write_text("")
    assert cli.main(["report", str(two)]) == 2
    assert "several records files" in capsys.readouterr().err
    good = tmp_path / "good"
    good.mkdir()
    (good / "records.jsonl").write_text(json.dumps(synthetic_record(random.Random(2), 0)) + "\n")
    blocker = tmp_path / "blocker"
    blocker.write_text("a file, not a folder")
    assert cli.main(["report", str(good), "--out", str(blocker / "x")]) == 4
    assert "blocker" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exited:  # argparse: a usage error
        cli.main(["report", str(good), "--price", "writer=abc"])
    assert exited.value.code == 2


def _synthetic_file(folder: Path, n: int) -> RunFiles:
    rng = random.Random(3)
    folder.mkdir()
    with (
        (folder / "records.jsonl").open("w") as f,
        (folder / "records.rejects.jsonl").open("w") as r,
    ):
        for i in range(n):
            record = synthetic_record(rng, i)
            if i % 8 == 1:  # some without the recorded score: the sliding-window path
                del record["provenance"]["novelty_max_rouge"]
            f.write(json.dumps(record) + "\n")
            if i % 4 == 0:
                r.write(json.dumps(synthetic_reject(rng, i)) + "\n")
    return find_run_files(folder)


def test_memory_is_bounded_on_a_large_file(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Reading a 12k-record run peaks at the memory a 3k-record run needs: once its samples
    are full, nothing is kept per record.  The 1M-record run is in bench/report.py."""
    # Small windows and samples fill early: growth after that would be per-record state.
    monkeypatch.setattr(report_module, "WINDOW", 100)
    monkeypatch.setattr(report_module, "AGREEMENT_SAMPLE", 500)
    monkeypatch.setattr(report_module, "DIVERSITY_SAMPLE", 500)
    # The process-wide stem cache (bounded, cleared when full) starts empty as in a fresh
    # process: what earlier tests stemmed must not decide when it next clears.
    monkeypatch.setattr(rouge_module, "_stemmer", None)
    peaks = []
    for n in (3_000, 12_000):
        files = _synthetic_file(tmp_path / str(n), n)
        tracemalloc.start()
        try:
            result = build_report(files, seeds=["Summarize the text."])
            peaks.append(tracemalloc.get_traced_memory()[1])
        finally:
            tracemalloc.stop()
        assert result["funnel"][-1]["count"] == n
    # Keeping as little as each record's id would add ~70 bytes per record (630 kB here);
    # what grows is bounded by the vocabulary (verb/object pairs, stems), not the records.
    assert peaks[1] - peaks[0] < 150_000, peaks  # < 17 bytes per extra record
    assert len(result["samples"]["records"]) == 12
    assert result["diversity"]["vs_seeds_sample"] == 500
    assert result["members"]["rouge_sample"] == 500


def test_find_run_files(tmp_path: Path, run_dir: Path) -> None:
    files = find_run_files(run_dir)
    assert files.records.name == "records.jsonl"
    assert files.rejects is not None and files.rejects.name == "records.rejects.jsonl"
    assert files.log is not None and files.log.name == "run.log.jsonl"
    summary = run_dir / "records.summary.json"  # written by the run itself
    original = summary.read_text()
    priced = {**json.loads(original), "prices": {"answerer": {"prompt": 1.0, "completion": 2.0}}}
    summary.write_text(json.dumps(priced))
    try:
        result = build_report(find_run_files(run_dir), seeds=[])
    finally:
        summary.write_text(original)
    entry = {b["backend"]: b for b in result["members"]["backends"]}["answerer"]
    assert entry["cost_usd"] == pytest.approx(
        (entry["prompt_tokens"] * 1.0 + entry["completion_tokens"] * 2.0) / 1e6
    )
    assert entry["cost_usd"] > 0


CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
SCREENSHOT = Path(__file__).resolve().parents[1] / "docs" / "img" / "report.png"


def _chromium() -> str:
    import shutil

    for name in ("chromium", "chromium-browser"):
        found = shutil.which(name)
        if found:
            return found
    pytest.skip("no chromium executable on PATH (Debian: apt-get install -y chromium)")


def test_report_renders_in_a_real_browser(
    run_dir: Path, report: dict[str, Any], tmp_path: Path
) -> None:
    """Headless Chromium opens report.html from a file:// URL: every chart has a size and
    drawn marks, nothing is fetched, no console error.  The screenshot goes to tmp_path, and
    to docs/img/report.png when ENSEMBLE_ASYNC_UPDATE_SCREENSHOT=1."""
    import os

    executable = _chromium()
    sync_api = pytest.importorskip("playwright.sync_api", reason="pip install playwright")
    page_url = (run_dir / "report.html").as_uri()
    errors: list[str] = []
    fetched: list[str] = []
    with sync_api.sync_playwright() as pw:
        browser = pw.chromium.launch(
            executable_path=executable,
            args=CHROMIUM_FLAGS,  # playwright gives each launch a fresh, empty profile
        )
        try:
            page = browser.new_page(viewport={"width": 1000, "height": 1300})
            page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
            page.on("pageerror", lambda e: errors.append(str(e)))

            def route(r: Any) -> None:
                if not r.request.url.startswith("file://"):
                    fetched.append(r.request.url)
                    r.abort()
                else:
                    r.continue_()

            page.route("**/*", route)
            page.goto(page_url)
            charts = page.evaluate(
                """() => [...document.querySelectorAll('svg.chart')].map(s => {
                    const box = s.getBoundingClientRect();
                    const marks = [...s.querySelectorAll('rect')].filter(r => {
                        const b = r.getBoundingClientRect(); return b.width > 0 && b.height > 0;
                    }).length;
                    return {w: box.width, h: box.height, marks: marks,
                            title: s.querySelector('title')?.textContent};
                })"""
            )
            shot = tmp_path / "report.png"
            page.screenshot(path=str(shot))
        finally:
            browser.close()
    assert errors == [] and fetched == []
    assert len(charts) >= 8
    for chart in charts:
        assert chart["w"] > 100 and chart["h"] > 20, chart
    titles = {c["title"]: c["marks"] for c in charts}
    assert titles["funnel"] == len(report["funnel"])
    assert titles["exact agreement rate"] == len(report["members"]["labels"]) ** 2
    assert titles["reject reasons"] == len(report["rejects"])
    assert titles["records per second"] > 0
    data = shot.read_bytes()
    assert data.startswith(b"\x89PNG") and len(data) > 10_000
    if os.environ.get("ENSEMBLE_ASYNC_UPDATE_SCREENSHOT") == "1":
        SCREENSHOT.parent.mkdir(parents=True, exist_ok=True)
        SCREENSHOT.write_bytes(data)


def test_reservoir_sample_is_uniform() -> None:
    from ensemble_async.sketches import Reservoir

    counts = [0] * 10
    for seed in range(1000):
        sample = Reservoir(5, random.Random(seed))
        for i in range(1000):
            sample.offer(i)
        assert len(sample.items) == 5 == len(set(sample.items))
        for x in sample.items:
            counts[x // 100] += 1
    assert sample.seen == 1000
    assert all(400 < c < 600 for c in counts), counts  # 500 expected per tenth


def test_an_empty_run_gives_an_empty_report(tmp_path: Path) -> None:
    (tmp_path / "records.jsonl").write_text("")
    assert cli.main(["report", str(tmp_path)]) == 0
    data = json.loads((tmp_path / "report.json").read_text())
    assert [f["count"] for f in data["funnel"]] == [0, 0, 0, 0, 0]
    assert data["rejects"] == [] and data["members"]["rows"] == []
    assert "0 records kept of 0" in (tmp_path / "report.html").read_text()
