"""``report.html``: the report's figures drawn as inline SVG in one self-contained page.

Input is the dict :func:`ensemble_async.report.build_report` returns; output is a string.
No script, no external file, no network: every chart is an ``<svg>`` element written
here, every text from the records is HTML-escaped.
"""

from __future__ import annotations

import html
import math
from collections.abc import Sequence
from typing import Any

from .reasons import REASONS, RULES, anchor

__all__ = ["bar_chart", "heatmap", "histogram", "render_html", "time_chart"]

_COLORS = ("#3b6fb6", "#d9822b", "#3a9d5d", "#b8433b", "#7d5ba6", "#8c6d46")
_FONT = 'font-family="sans-serif" font-size="11"'


def _e(value: Any) -> str:
    return html.escape("" if value is None else str(value), quote=True)


def _fmt(value: Any, digits: int = 3) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        if math.isnan(value):
            return "-"
        return f"{value:.{digits}f}"
    return str(value)


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.1f}%"


def bar_chart(
    items: Sequence[tuple[str, float]], *, width: int = 640, title: str = "", color: str = ""
) -> str:
    """Horizontal bars, one per (label, value), with the value printed at the bar's end."""
    row, label_w = 20, 230
    height = max(1, len(items)) * row + 10
    top = max((v for _, v in items), default=0) or 1
    span = width - label_w - 70
    parts = [
        f'<svg class="chart" role="img" width="{width}" height="{height}" '
        f'viewBox="0 0 {width} {height}" {_FONT}><title>{_e(title)}</title>'
    ]
    for i, (label, value) in enumerate(items):
        y = 5 + i * row
        w = max(1.0, span * value / top) if value else 0.0
        fill = color or _COLORS[0]
        parts.append(
            f'<text x="{label_w - 6}" y="{y + 13}" text-anchor="end">{_e(label[:40])}</text>'
            f'<rect x="{label_w}" y="{y + 2}" width="{w:.1f}" height="{row - 6}" fill="{fill}">'
            f"<title>{_e(label)}: {_e(_fmt(value))}</title></rect>"
            f'<text x="{label_w + w + 4:.1f}" y="{y + 13}">{_e(_fmt(value, 2))}</text>'
        )
    parts.append("</svg>")
    return "".join(parts)


def histogram(
    series: Sequence[tuple[str, Sequence[float]]],
    *,
    lo: float,
    hi: float,
    marker: float | None = None,
    marker_label: str = "",
    width: int = 640,
    height: int = 180,
    title: str = "",
    x_label: str = "",
) -> str:
    """Bars of equal-width bins over [lo, hi]; several series are stacked; an optional
    vertical marker line (e.g. the threshold)."""
    left, bottom, top_pad = 40, 30, 14
    bins = max((len(c) for _, c in series), default=0)
    totals = [sum(c[i] for _, c in series if i < len(c)) for i in range(bins)]
    peak = max(totals, default=0) or 1
    plot_w, plot_h = width - left - 10, height - bottom - top_pad
    bw = plot_w / bins if bins else plot_w
    parts = [
        f'<svg class="chart" role="img" width="{width}" height="{height}" '
        f'viewBox="0 0 {width} {height}" {_FONT}><title>{_e(title)}</title>',
        f'<line x1="{left}" y1="{top_pad + plot_h}" x2="{left + plot_w}" '
        f'y2="{top_pad + plot_h}" stroke="#888"/>',
        f'<text x="{left - 4}" y="{top_pad + 8}" text-anchor="end">{peak:.4g}</text>',
        f'<text x="{left - 4}" y="{top_pad + plot_h}" text-anchor="end">0</text>',
    ]
    base = [0.0] * bins
    width_bin = (hi - lo) / bins if bins else 1
    for s, (name, counts) in enumerate(series):
        for i, c in enumerate(counts):
            if not c:
                continue
            h = plot_h * c / peak
            y = top_pad + plot_h - base[i] - h
            a = lo + i * width_bin
            parts.append(
                f'<rect x="{left + i * bw:.2f}" y="{y:.2f}" width="{max(bw - 1, 0.5):.2f}" '
                f'height="{h:.2f}" fill="{_COLORS[s % len(_COLORS)]}">'
                f"<title>{_e(name)} [{a:.3g}, {a + width_bin:.3g}): {c:.4g}</title></rect>"
            )
            base[i] += h
    for frac in (0, 0.25, 0.5, 0.75, 1):
        x = left + frac * plot_w
        parts.append(
            f'<text x="{x:.1f}" y="{top_pad + plot_h + 13}" text-anchor="middle">'
            f"{lo + frac * (hi - lo):.3g}</text>"
        )
    if x_label:
        parts.append(
            f'<text x="{left + plot_w / 2:.1f}" y="{height - 3}" text-anchor="middle">'
            f"{_e(x_label)}</text>"
        )
    if marker is not None and hi > lo:
        x = left + plot_w * (min(max(marker, lo), hi) - lo) / (hi - lo)
        parts.append(
            f'<line class="marker" x1="{x:.2f}" y1="{top_pad - 4}" x2="{x:.2f}" '
            f'y2="{top_pad + plot_h}" stroke="#c00" stroke-dasharray="4 2" stroke-width="2"/>'
            f'<text x="{x + 4:.2f}" y="{top_pad + 6}" fill="#c00">{_e(marker_label)}</text>'
        )
    if len(series) > 1:
        for s, (name, _) in enumerate(series):
            x = left + plot_w - 150
            y = top_pad + 4 + 14 * s
            parts.append(
                f'<rect x="{x}" y="{y}" width="10" height="10" '
                f'fill="{_COLORS[s % len(_COLORS)]}"/><text x="{x + 14}" y="{y + 9}">'
                f"{_e(name)}</text>"
            )
    parts.append("</svg>")
    return "".join(parts)


def heatmap(labels: Sequence[str], matrix: Sequence[Sequence[float | None]], *, title: str) -> str:
    """A square matrix of values in [0, 1], darker is higher, the value in each cell."""
    n = len(labels)
    cell, left, top = 54, 150, 110
    size_w, size_h = left + n * cell + 10, top + n * cell + 10
    parts = [
        f'<svg class="chart" role="img" width="{size_w}" height="{size_h}" '
        f'viewBox="0 0 {size_w} {size_h}" {_FONT}><title>{_e(title)}</title>'
    ]
    for i, label in enumerate(labels):
        y = top + i * cell + cell / 2 + 4
        parts.append(f'<text x="{left - 6}" y="{y}" text-anchor="end">{_e(label[:24])}</text>')
        x = left + i * cell + cell / 2
        parts.append(
            f'<text x="{x}" y="{top - 6}" transform="rotate(-40 {x} {top - 6})">'
            f"{_e(label[:24])}</text>"
        )
        for j in range(n):
            value = matrix[i][j]
            shade = "#eee" if value is None else _blue(value)
            ink = "#000" if value is None or value < 0.55 else "#fff"
            parts.append(
                f'<rect x="{left + j * cell}" y="{top + i * cell}" width="{cell - 2}" '
                f'height="{cell - 2}" fill="{shade}"><title>{_e(label)} x '
                f"{_e(labels[j])}: {_fmt(value)}</title></rect>"
                f'<text x="{left + j * cell + cell / 2 - 1}" y="{top + i * cell + cell / 2 + 3}" '
                f'text-anchor="middle" fill="{ink}">{_fmt(value, 2)}</text>'
            )
    parts.append("</svg>")
    return "".join(parts)


def _blue(value: float) -> str:
    v = min(max(value, 0.0), 1.0)
    r, g, b = (int(235 - v * (235 - c)) for c in (31, 78, 140))
    return f"rgb({r},{g},{b})"


def time_chart(counts: Sequence[int], bin_s: float, *, title: str, width: int = 640) -> str:
    """Records per second over the run, one bar per time bin."""
    rates = [c / bin_s for c in counts]
    return histogram(
        [("records/s", rates)],
        lo=0.0,
        hi=bin_s * len(counts),
        width=width,
        title=title,
        x_label="seconds since the start",
    )


# -- the page -------------------------------------------------------------------------

_CSS = """
body{font-family:sans-serif;margin:1.5em auto;max-width:1100px;color:#222;padding:0 1em}
h1{font-size:1.5em}h2{font-size:1.2em;border-bottom:1px solid #ddd;margin-top:1.6em}
table{border-collapse:collapse;margin:.5em 0;font-size:.9em}
td,th{border:1px solid #ddd;padding:3px 7px;text-align:left;vertical-align:top}
th{background:#f4f4f4}td.n{text-align:right}.note{color:#666;font-size:.85em}
.sample{border:1px solid #ddd;padding:.5em;margin:.6em 0;font-size:.88em}
.kept{color:#1a7f37;font-weight:bold}pre{white-space:pre-wrap;margin:0}
.grid{display:flex;flex-wrap:wrap;gap:1.5em}
"""


def _table(head: Sequence[str], rows: Sequence[Sequence[str]], numeric: set[int]) -> str:
    out = ["<table><tr>", *(f"<th>{_e(h)}</th>" for h in head), "</tr>"]
    for row in rows:
        out.append("<tr>")
        for i, cell in enumerate(row):
            out.append(f'<td class="n">{cell}</td>' if i in numeric else f"<td>{cell}</td>")
        out.append("</tr>")
    out.append("</table>")
    return "".join(out)


def _reason_link(name: str) -> str:
    return f'<a href="#{_e(anchor(name))}">{_e(name)}</a>'


def _funnel(report: dict[str, Any]) -> str:
    funnel = report["funnel"]
    chart = bar_chart([(f["stage"], f["count"]) for f in funnel], title="funnel")
    rows = [
        [_e(r["stage"]), _reason_link(r["reason"]), str(r["count"]), _e(r["meaning"] or "?")]
        for r in report["rejects"]
    ]
    table = _table(["stage", "reason", "count", "meaning"], rows, {2})
    reasons = bar_chart(
        [(f"{r['stage']}: {r['reason']}", r["count"]) for r in report["rejects"]],
        title="reject reasons",
        color=_COLORS[3],
    )
    return (
        "<h2>Funnel</h2>"
        '<p class="note">Each step keeps fewer items; every drop has a reason below. '
        "Counts come from the records and rejects files.</p>"
        f"{chart}<h3>Reject reasons</h3>{reasons if rows else ''}{table}"
    )


def _members(report: dict[str, Any]) -> str:
    m = report["members"]
    rows = [
        [
            _e(r["member"]),
            str(r["given"]),
            str(r["failures"]),
            _e(", ".join(f"{k}: {v}" for k, v in sorted(r["statuses"].items()))),
            _pct(r["win_rate"]),
            str(r["completion_tokens_in_records"]),
            _e(", ".join(r["models"]) or "-"),
        ]
        for r in m["rows"]
    ]
    out = [
        "<h2>Members</h2>",
        _table(
            ["member", "candidates given", "failures", "statuses", "win rate", "tokens", "model"],
            rows,
            {1, 2, 4, 5},
        ),
        '<p class="note">Win rate: records whose kept candidate is this member&#39;s, over '
        "records where it gave a candidate. Tokens: completion tokens of its candidates "
        "in the records.</p>",
    ]
    if len(m["labels"]) > 1:
        out.append('<div class="grid">')
        out.append("<div><h3>Exact agreement rate</h3>")
        out.append(heatmap(m["labels"], m["exact_agreement"], title="exact agreement rate"))
        out.append("</div><div><h3>Mean pairwise ROUGE-L</h3>")
        out.append(heatmap(m["labels"], m["mean_rouge_l"], title="mean pairwise ROUGE-L"))
        out.append("</div>")
        out.append("</div>")
        out.append(
            f'<p class="note">Left: share of decisions where both gave the same text after '
            f"normalising ({m['decisions']} decisions). Right: mean ROUGE-L (the consensus "
            f"similarity) over a sample of {m['rouge_sample']} decisions.</p>"
        )
    if m["backends"]:
        rows = [
            [
                _e(b["backend"]),
                str(b["prompt_tokens"]),
                str(b["completion_tokens"]),
                "-" if b["cost_usd"] is None else f"${b['cost_usd']:.4f}",
            ]
            for b in m["backends"]
        ]
        out.append("<h3>Tokens and cost (whole run)</h3>")
        out.append(_table(["backend", "prompt tokens", "completion tokens", "cost"], rows, {1, 2}))
        out.append(
            '<p class="note">From the run&#39;s log or summary. Cost needs prices '
            "(<code>--price BACKEND=IN,OUT</code> in USD per million tokens, or prices in "
            "summary.json).</p>"
        )
    return "".join(out)


def _consensus(report: dict[str, Any]) -> str:
    c = report["consensus"]
    rows = [
        [
            _e(r["outcome"]),
            _reason_link(r["rule"]),
            str(r["count"]),
            _e(r["meaning"] or "?"),
        ]
        for r in c["rules"]
    ]
    mp = c["min_pairwise"]
    threshold = c["threshold"]
    chart = histogram(
        [("kept", mp["kept"]["counts"]), ("rejected", mp["rejected"]["counts"])],
        lo=0.0,
        hi=1.0,
        marker=threshold,
        marker_label="" if threshold is None else f"threshold {threshold:g}",
        title="lowest pairwise ROUGE-L per medoid decision",
        x_label="lowest pairwise ROUGE-L",
    )
    return (
        "<h2>Consensus</h2>"
        + _table(["outcome", "rule", "count", "meaning"], rows, {2})
        + f"<h3>Lowest pairwise score of each medoid decision</h3>{chart}"
        + '<p class="note">Only decisions that reached the medoid step have pairwise scores '
        "(a shortcut decides without them). The dashed line is the threshold: a decision is "
        "kept only when its lowest pairwise score is above it.</p>"
    )


def _diversity(report: dict[str, Any]) -> str:
    d = report["diversity"]
    acc = histogram(
        [("instructions", d["at_acceptance"]["counts"])],
        lo=0.0,
        hi=1.0,
        width=500,
        title="highest ROUGE-L at acceptance",
        x_label="highest ROUGE-L against seeds + earlier instructions",
    )
    seeds = histogram(
        [("instructions", d["vs_seeds"]["counts"])],
        lo=0.0,
        hi=1.0,
        width=500,
        title="highest ROUGE-L against the seed tasks",
        x_label="highest ROUGE-L against the seed tasks",
    )
    verbs = [
        [
            _e(v["verb"]),
            str(v["count"]),
            _e(", ".join(f"{o['object']} ({o['count']})" for o in v["objects"])),
        ]
        for v in d["verbs"]
    ]
    share = d["nearest_was_earlier_instruction"]
    return (
        "<h2>Diversity</h2>"
        '<div class="grid"><div><h3>Against seeds and earlier instructions</h3>'
        f"{acc}</div><div><h3>Against the seed tasks</h3>{seeds}</div></div>"
        f'<p class="note">Left: {_e(report["methods"]["at_acceptance"])}. Right: '
        f"{_e(report['methods']['vs_seeds'])} ({d['vs_seeds_sample']} sampled). In the "
        f"sample, the nearest text at acceptance was an earlier generated instruction (not "
        f"a seed) for {_pct(share)}.</p>"
        "<h3>Opening verbs and their most common objects</h3>"
        + bar_chart([(v["verb"], v["count"]) for v in d["verbs"]], title="opening verbs")
        + _table(["verb", "instructions", "most common objects"], verbs, {1})
        + f'<p class="note">Heuristic: {_e(report["methods"]["verbs"])}'
        + (" (counts approximate: too many distinct words)" if d["verbs_approximate"] else "")
        + ".</p>"
    )


def _lengths(report: dict[str, Any]) -> str:
    rows = []
    charts = []
    for kind, parts in report["lengths"].items():
        for part, h in parts.items():
            rows.append(
                [
                    _e(kind),
                    _e(part),
                    str(h["n"]),
                    _fmt(h["mean"], 1),
                    _fmt(h["p50"], 0),
                    _fmt(h["p95"], 0),
                    _fmt(h["max"], 0),
                ]
            )
        top = max((h["max"] or 0 for h in parts.values()), default=0)
        hi = int(min(max(top + 1, 8), len(next(iter(parts.values()))["counts"])))
        charts.append(
            f"<div><h3>{_e(kind)}</h3>"
            + histogram(
                [(part, h["counts"][:hi]) for part, h in parts.items()],
                lo=0.0,
                hi=float(hi),
                width=520,
                title=f"lengths, {kind}",
                x_label="whitespace tokens",
            )
            + "</div>"
        )
    return (
        "<h2>Lengths</h2>"
        + _table(["type", "field", "records", "mean", "p50", "p95", "max"], rows, {2, 3, 4, 5, 6})
        + f'<div class="grid">{"".join(charts)}</div>'
        + f'<p class="note">{_e(report["methods"]["lengths"])}.</p>'
    )


def _throughput(report: dict[str, Any]) -> str:
    t = report["throughput"]
    if not t["counts"]:
        return (
            '<h2>Throughput</h2><p class="note">No timing: pass the run\'s '
            "<code>--log-jsonl</code> log (<code>--log</code>) or records with timestamps.</p>"
        )
    total = sum(t["counts"])
    span = t["bin_s"] * len(t["counts"])
    return (
        "<h2>Throughput</h2>"
        + time_chart(t["counts"], t["bin_s"], title="records per second")
        + f'<p class="note">{total} records in {span:.1f} s ({total / span:.1f}/s), '
        f"from the {_e(t['source'])}; bins of {t['bin_s']:g} s.</p>"
    )


def _sample(item: dict[str, Any], *, near: bool = False) -> str:
    d = item["decision"]
    head = (
        f"<b>{_e(item['id'])}</b> ({_e(item['type'])}) rule "
        f"{_reason_link(str(d.get('rule') or item.get('reason') or '?'))}"
        f", lowest pairwise {_fmt(d.get('min_pairwise'))}"
    )
    if near:
        head += f", threshold {_fmt(d.get('threshold'))}"
    body = [f"<div class='sample'>{head}<table>"]
    body.append(f"<tr><th>instruction</th><td><pre>{_e(item['instruction'])}</pre></td></tr>")
    if item.get("input"):
        body.append(f"<tr><th>input</th><td><pre>{_e(item['input'])}</pre></td></tr>")
    for c in item["candidates"]:
        mark = ' <span class="kept">kept</span>' if c["index"] == d.get("index") else ""
        body.append(
            f"<tr><th>#{_e(c['index'])} {_e(c['source'])} ({_e(c['status'])}){mark}</th>"
            f"<td><pre>{_e(c['text'])}</pre></td></tr>"
        )
    body.append("</table></div>")
    return "".join(body)


def _samples(report: dict[str, Any]) -> str:
    s = report["samples"]
    out = ["<h2>Sample of records</h2>"]
    out.extend(_sample(item) for item in s["records"])
    if s["consensus_rejects"]:
        out.append("<h3>Sample of consensus rejects</h3>")
        out.extend(_sample(item) for item in s["consensus_rejects"])
    out.append("<h2>Near misses</h2>")
    if report["near_misses"]:
        out.append(
            f'<p class="note">{_e(report["methods"]["near_misses"])}: the models almost agreed.</p>'
        )
        out.extend(_sample(item, near=True) for item in report["near_misses"])
    else:
        out.append('<p class="note">No consensus reject with a pairwise score.</p>')
    return "".join(out)


def _glossary(report: dict[str, Any]) -> str:
    used = {r["reason"] for r in report["rejects"]} | {
        r["rule"] for r in report["consensus"]["rules"]
    }
    rows = []
    for meaning in (*REASONS.values(), *RULES.values()):
        rows.append(
            f'<tr id="{_e(anchor(meaning.name))}"><td><code>{_e(meaning.name)}</code></td>'
            f"<td>{_e(', '.join(meaning.stages))}</td><td>{_e(meaning.text)}</td></tr>"
        )
    unknown = sorted(u for u in used if not any(anchor(u) == anchor(m) for m in (*REASONS, *RULES)))
    for name in unknown:
        rows.append(
            f'<tr id="{_e(anchor(name))}"><td><code>{_e(name)}</code></td><td>-</td>'
            "<td>not catalogued (written by a newer or a foreign tool)</td></tr>"
        )
    return (
        '<h2>Reasons and rules</h2><p class="note">The same list as docs/reasons.md.</p>'
        "<table><tr><th>name</th><th>stage</th><th>meaning</th></tr>" + "".join(rows) + "</table>"
    )


def render_html(report: dict[str, Any]) -> str:
    """The whole page."""
    files = report.get("files") or {}
    funnel = report["funnel"]
    kept = funnel[-1]["count"]
    attempted = funnel[0]["count"]
    head = (
        f"<h1>ensemble-async run report</h1><p>{kept} records kept of {attempted} "
        f"instructions attempted"
        + (f" ({_pct(kept / attempted)})" if attempted else "")
        + f". Records: <code>{_e(files.get('records'))}</code>"
        + f"; preset {_e(', '.join(report['preset']) or '-')}"
        + f"; seed {_e(', '.join(str(s) for s in report['run_seed']) or '-')}.</p>"
    )
    body = "".join(
        (
            head,
            _funnel(report),
            _members(report),
            _consensus(report),
            _diversity(report),
            _lengths(report),
            _throughput(report),
            _samples(report),
            _glossary(report),
        )
    )
    return (
        '<!DOCTYPE html><html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>ensemble-async report</title><style>{_CSS}</style></head>"
        f"<body>{body}</body></html>\n"
    )
