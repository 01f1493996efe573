"""The audit's self-contained HTML report: matplotlib figures embedded as base64 PNG, tables of every figure.

Each plot is a `<figure class="plot" data-figure=NAME data-values=JSON>`: the JSON is exactly the numbers
drawn, taken from the report (the `--json` document), so a test (or a reader) can check one against the other.
"""
from __future__ import annotations

import base64
import html
import io
import json
from typing import Any

from contract import fs

RATE_METRICS = ["empty", "exact_dup", "near_dup", "loops", "refusals", "wrong_language", "over_limit", "missing"]
DIVERSITY = ["distinct_1", "distinct_2", "distinct_3", "ttr"]


def _png(fig) -> str:
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90, bbox_inches="tight")
    plt.close(fig)
    return base64.b64encode(buf.getvalue()).decode("ascii")


def _figure(name: str, title: str, values: Any, fig) -> str:
    data = html.escape(json.dumps(values, allow_nan=False), quote=True)
    return (f'<figure class="plot" id="plot-{html.escape(name)}" data-figure="{html.escape(name)}" '
            f'data-values="{data}"><img alt="{html.escape(title)}" src="data:image/png;base64,{_png(fig)}">'
            f"<figcaption>{html.escape(title)}</figcaption></figure>")


def _hist_plot(name: str, title: str, xlabel: str, groups: list[dict], key, limit: float | None = None) -> str | None:
    import matplotlib.pyplot as plt

    values = {}
    for g in groups:
        d = key(g["figures"])
        if d and "histogram" in d and d.get("n"):
            values[g["name"]] = {"edges": d["histogram"]["edges"], "shares": d["histogram"]["shares"]}
    if not values:
        return None
    fig, ax = plt.subplots(figsize=(8, 3.6))
    for label, v in values.items():
        ax.stairs(v["shares"], v["edges"], label=label, linewidth=1.6)
    if limit is not None:
        ax.axvline(limit, color="k", linestyle="--", linewidth=1, label=f"limit {limit:g}")
    ax.set_xlabel(xlabel)
    ax.set_ylabel("share of captions")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    return _figure(name, title, values, fig)


def _bars_plot(name: str, title: str, groups: list[dict], metrics: list[str], get) -> str | None:
    import matplotlib.pyplot as plt
    import numpy as np

    values = {g["name"]: {m: get(g["figures"], m) for m in metrics} for g in groups}
    if not values:
        return None
    fig, ax = plt.subplots(figsize=(max(6, 1.1 * len(metrics) * max(1, len(values)) ** 0.5 + 3), 3.6))
    width = 0.8 / len(values)
    x = np.arange(len(metrics))
    for i, (label, v) in enumerate(values.items()):
        ax.bar(x + i * width - 0.4 + width / 2, [v[m] if v[m] is not None else 0.0 for m in metrics], width,
               label=label)
    ax.set_xticks(x, metrics, rotation=20)
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3, axis="y")
    return _figure(name, title, values, fig)


def _rate(f: dict, m: str):
    d = f.get(m)
    if not isinstance(d, dict) or "unavailable" in d:
        return None
    return d.get("rate")


def _openings_plot(groups: list[dict]) -> str | None:
    import matplotlib.pyplot as plt

    values = {g["name"]: [[o["phrase"], o["share"]] for o in g["figures"]["openings"]["top"]] for g in groups}
    values = {k: v for k, v in values.items() if v}
    if not values:
        return None
    n = len(values)
    fig, axes = plt.subplots(n, 1, figsize=(8, 0.28 * sum(len(v) for v in values.values()) + 0.9 * n),
                             squeeze=False)
    for ax, (label, v) in zip(axes[:, 0], values.items()):
        ax.barh([p or "(empty)" for p, _ in v][::-1], [s for _, s in v][::-1], color="#4c72b0")
        ax.set_title(label, fontsize=9)
        ax.tick_params(labelsize=8)
        ax.set_xlabel("share of non-empty captions", fontsize=8)
    fig.tight_layout()
    return _figure("openings", "Top opening phrases", values, fig)


def _funnel_plot(report: dict) -> str | None:
    import matplotlib.pyplot as plt
    import numpy as np

    values = {lab: [{"stage": s["stage"], "in": s["in"], "kept": s["kept"]} for s in stages]
              for lab, stages in report["funnel"].items() if stages}
    if not values:
        return None
    fig, axes = plt.subplots(1, len(values), figsize=(4.5 * len(values), 3.4), squeeze=False)
    for ax, (lab, stages) in zip(axes[0], values.items()):
        x = np.arange(len(stages))
        ax.bar(x - 0.2, [s["in"] for s in stages], 0.4, label="in")
        ax.bar(x + 0.2, [s["kept"] for s in stages], 0.4, label="kept")
        ax.set_xticks(x, [s["stage"] for s in stages])
        ax.set_title(lab, fontsize=9)
        ax.legend(fontsize=8)
    return _figure("funnel", "Ledger funnel: in -> kept at each stage", values, fig)


def build_plots(report: dict) -> list[str]:
    import matplotlib

    matplotlib.use("Agg", force=True)
    groups = report["groups"]
    plots = [_hist_plot("words", "Words per caption", "words", groups, lambda f: f["words"])]
    if report.get("text_encoder"):
        limit = next((g["figures"]["tokens"].get("limit") for g in groups if "unavailable" not in g["figures"]["tokens"]),
                     None)
        plots.append(_hist_plot("tokens", f"Tokens per caption ({report['text_encoder']['name']})", "tokens", groups,
                                lambda f: f["tokens"], limit))
    plots.append(_bars_plot("rates", "Rates (share of non-empty captions; empty and missing: of all)", groups,
                            [m for m in RATE_METRICS if any(m in g["figures"] for g in groups)], _rate))
    plots.append(_bars_plot("diversity", "Diversity: distinct-n and mean per-caption type-token ratio", groups,
                            DIVERSITY, lambda f, m: f["vocabulary"].get(m)))
    plots.append(_openings_plot(groups))
    names = sorted({n for g in groups for n in g["figures"]["clip"]})
    for n in names:
        plots.append(_hist_plot(f"clip-{n}", f"CLIP score {n}", "score", groups,
                                lambda f, n=n: f["clip"].get(n)))
    plots.append(_funnel_plot(report))
    return [p for p in plots if p]


def _fmt(v, digits=4) -> str:
    if v is None:
        return "–"
    if isinstance(v, float):
        return f"{v:.{digits}g}"
    return html.escape(str(v))


def _table(headers: list[str], rows: list[list[str]]) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in headers)
    body = "".join("<tr>" + "".join(f"<td>{c}</td>" for c in r) + "</tr>" for r in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _summary_rows(groups: list[dict]) -> tuple[list[str], list[list[str]]]:
    headers = ["figure"] + [g["name"] for g in groups]
    rows = []

    def row(label, get):
        rows.append([html.escape(label)] + [_fmt(get(g["figures"])) for g in groups])

    row("count", lambda f: f["count"])
    for m in ("mean", "median", "p5", "p95", "min", "max"):
        row(f"words {m}", lambda f, m=m: f["words"][m])
    for m in ("mean", "median", "p5", "p95", "min", "max"):
        row(f"tokens {m}", lambda f, m=m: f["tokens"].get(m) if "unavailable" not in f["tokens"] else None)
    row("vocabulary size", lambda f: f["vocabulary"]["size"])
    for m in DIVERSITY:
        row(m, lambda f, m=m: f["vocabulary"][m])
    for m in RATE_METRICS:
        row(f"{m} rate", lambda f, m=m: _rate(f, m))
        row(f"{m} count", lambda f, m=m: f[m].get("count") if isinstance(f.get(m), dict) else None)
    return headers, rows


CSS = """body{font-family:system-ui,sans-serif;margin:1.5em;max-width:1200px;color:#222}
table{border-collapse:collapse;margin:0.6em 0 1.2em;font-size:13px}td,th{border:1px solid #ccc;padding:3px 7px}
th{background:#f2f2f2}td{text-align:right}td:first-child{text-align:left}figure.plot{margin:1em 0}
figure.plot img{max-width:100%}figcaption{font-size:13px;color:#555}.fail{color:#b00}.pass{color:#070}
.note{color:#777;font-size:13px}code{background:#f4f4f4;padding:0 3px}"""


def render(report: dict) -> str:
    groups = report["groups"]
    parts = [f"<!doctype html><html><head><meta charset='utf-8'><meta name=\"generator\" content=\"prx\"><title>prx audit</title><style>{CSS}</style>"
             "</head><body><h1>Caption audit</h1>",
             f"<p class='note'>{report['captions']} captions in {len(groups)} group(s), by "
             f"{html.escape(', '.join(report['by']) or 'nothing')}; created {html.escape(report['created'])}; "
             f"{report['seconds']:.1f}s</p>"]
    parts.append(_table(["dataset", "folder", "shards", "samples", "unreadable"],
                        [[html.escape(i["dataset"]), html.escape(i["dir"]), str(i["shards"]), str(i["samples"]),
                          html.escape(", ".join(f"{k} {v}" for k, v in i["unreadable"].items()) or "0")]
                         for i in report["inputs"]]))
    if report.get("gate"):
        items = []
        for r in report["gate"]:
            cls = "pass" if r["passed"] else "fail"
            fails = "; ".join(f"{html.escape(f['group'])}: {_fmt(f['value']) if f['value'] is not None else html.escape(f['why'])}"
                              for f in r["failures"])
            items.append(f"<li class='{cls}'><code>{html.escape(r['rule'])}</code> "
                         f"{'passed' if r['passed'] else 'FAILED: ' + fails}</li>")
        parts.append("<h2>--fail-on</h2><ul>" + "".join(items) + "</ul>")
    parts.append("<h2>Summary</h2>")
    parts.append(_table(*_summary_rows(groups)))
    if report["unavailable"]:
        parts.append("<h2>Not computed</h2><ul>" + "".join(f"<li>{html.escape(u)}</li>" for u in report["unavailable"])
                     + "</ul>")
    parts.append("<h2>Plots</h2>")
    parts.extend(build_plots(report))
    parts.append("<h2>Top opening phrases</h2>")
    for g in groups:
        o = g["figures"]["openings"]
        parts.append(f"<h3>{html.escape(g['name'])}</h3>" + _table(
            ["phrase", "count", "share"],
            [[html.escape(x["phrase"]), str(x["count"]), _fmt(x["share"])] for x in o["top"]]))
    parts.append("<h2>Examples: loops and refusals</h2>")
    parts.append(_table(["group", "loop n-grams", "refusal matches"],
                        [[html.escape(g["name"]), html.escape(" | ".join(g["figures"]["loops"]["examples"])),
                          html.escape(" | ".join(g["figures"]["refusals"]["examples"]))] for g in groups]))
    parts.append("<h2>Languages</h2>")
    parts.append(_table(["group", "languages detected"],
                        [[html.escape(g["name"]), html.escape(", ".join(
                            f"{k} {v}" for k, v in g["figures"]["wrong_language"].get("languages", {}).items())
                            or g["figures"]["wrong_language"].get("unavailable", ""))] for g in groups]))
    parts.append("<h2>Caption provenance</h2>")
    parts.append(_table(["group", "models", "prompts"],
                        [[html.escape(g["name"]),
                          html.escape("; ".join(f"{k} ({v})" for k, v in g["figures"]["provenance"]["models"].items())),
                          html.escape("; ".join(f"{k} ({v})" for k, v in g["figures"]["provenance"]["prompts"].items()))]
                         for g in groups]))
    parts.append("<h2>Ledger funnel</h2>")
    for lab, stages in report["funnel"].items():
        parts.append(f"<h3>{html.escape(lab)}</h3>" + (_table(
            ["stage", "folder", "in", "kept", "rejected", "failed", "reasons"],
            [[html.escape(s["stage"]), html.escape(s["folder"]), str(s["in"]), str(s["kept"]), str(s["rejected"]),
              str(s["failed"]), html.escape(", ".join(f"{k} {v}" for k, v in s["reasons"].items()))]
             for s in stages]) if stages else "<p class='note'>no ledgers</p>"))
    parts.append("<h2>Parameters</h2><pre>" + html.escape(json.dumps(
        {"params": report["params"], "text_encoder": report.get("text_encoder")}, indent=1)) + "</pre>")
    parts.append("</body></html>")
    return "\n".join(parts)


def write_html(report: dict, path: str) -> None:
    with fs.open_file(path, "wb") as fh:
        fh.write(render(report).encode("utf-8"))
