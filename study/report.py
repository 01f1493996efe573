"""The study's table, rebuilt at any time from the runs' files (`prx-study report DIR`).

Per arm and metric, at the last shared step (the study's last step) and each guidance scale: the arm's value
(the mean over its seeds), the delta to the baseline's mean, and the baseline's seed spread (mean +- std,
min..max). The verdict rule (RULE): the noise band is the baseline's mean +- 2 std, widened to its min..max;
an arm outside it is better or worse (lower is better for fid, cmmd and dino_mmd, higher for clip_score),
inside it "within noise"; with one baseline seed there is no band ("no noise estimate"). Throughput from each
run's summary.json: batches/s, its ratio to the baseline's (PRX's column), samples/s and peak memory.
"""
from __future__ import annotations

import base64
import html
import io
import json
import os
import statistics
from typing import Any

from study.execute import metrics_path, samples_dir
from study.plan import Run
from study.spec import BASELINE, Study

LOWER_IS_BETTER = {"fid": True, "fid_prx": True, "cmmd": True, "dino_mmd": True, "clip_score": False}
RULE = ("noise band = baseline mean +- 2 x std over its seeds, widened to the seeds' min..max; an arm's mean "
        "outside the band is better/worse (lower is better for fid, cmmd, dino_mmd; higher for clip_score), "
        "inside it is within noise; one baseline seed gives no band")


def _load(path: str) -> dict | None:
    if not os.path.isfile(path):
        return None
    with open(path) as fh:
        return json.load(fh)


def run_values(study: Study, run: Run) -> dict[str, Any]:
    """{'metrics': {step: {cfg: {metric: value}}}, 'features': {step: {cfg: file}}, 'summary': summary.json or
    None} of one run (`features`: prx-eval --keep-features's Inception features, for FID's bootstrap interval)."""
    out: dict[str, Any] = {"metrics": {}, "features": {}, "summary": _load(os.path.join(run.dir, "summary.json"))}
    for step in study.eval_steps():
        doc = _load(metrics_path(run, step))
        if doc:
            out["metrics"][step] = {float(r["cfg"]): r["metrics"] for r in doc["results"]}
            out["features"][step] = {float(r["cfg"]): os.path.join(os.path.dirname(metrics_path(run, step)),
                                                                   r["features"])
                                     for r in doc["results"] if r.get("features")}
    return out


def fid_interval(values: dict[str, Any], step: int, cfg: float) -> list[float] | None:
    """FID's bootstrap interval (study/bootstrap.py) from the run's kept Inception features, when it has them."""
    path = values["features"].get(step, {}).get(cfg)
    if not path or not os.path.isfile(path):
        return None
    from safetensors.numpy import load_file

    from study.bootstrap import fid_interval as interval

    feats = load_file(path)
    return list(interval(feats["real"], feats["generated"]))


def spread(values: list[float]) -> dict[str, float | None]:
    return {"mean": statistics.fmean(values), "std": statistics.stdev(values) if len(values) > 1 else None,
            "min": min(values), "max": max(values), "seeds": len(values)}


def verdict(metric: str, value: float, base: dict[str, Any]) -> str:
    """RULE, on the arm's mean `value` and the baseline's `spread`."""
    if base["std"] is None:
        return "no noise estimate"
    low = min(base["mean"] - 2 * base["std"], base["min"])
    high = max(base["mean"] + 2 * base["std"], base["max"])
    if low <= value <= high:
        return "within noise"
    lower = value < low
    return "better" if lower == LOWER_IS_BETTER.get(metric, True) else "worse"


def table(study: Study, runs: list[Run]) -> dict[str, Any]:
    values = {r.name: run_values(study, r) for r in runs}
    step = study.steps
    by_arm: dict[str, list[Run]] = {}
    for r in runs:
        by_arm.setdefault(r.arm.name, []).append(r)
    rows = []
    base_runs = by_arm[BASELINE]
    cfgs = sorted({c for r in base_runs for c in values[r.name]["metrics"].get(step, {})})
    for cfg in cfgs:
        metrics = sorted({m for r in base_runs for m in values[r.name]["metrics"].get(step, {}).get(cfg, {})})
        for metric in metrics:
            base_vals = [values[r.name]["metrics"][step][cfg][metric] for r in base_runs
                         if metric in values[r.name]["metrics"].get(step, {}).get(cfg, {})]
            if not base_vals:
                continue
            base = spread(base_vals)
            for arm, arm_runs in by_arm.items():
                vals = [values[r.name]["metrics"][step][cfg][metric] for r in arm_runs
                        if metric in values[r.name]["metrics"].get(step, {}).get(cfg, {})]
                if not vals:
                    rows.append({"arm": arm, "cfg": cfg, "metric": metric, "value": None, "verdict": "missing"})
                    continue
                mean = statistics.fmean(vals)
                rows.append({"arm": arm, "cfg": cfg, "metric": metric, "value": mean, "seeds": len(vals),
                             "delta": mean - base["mean"], "baseline": base,
                             "verdict": "baseline" if arm == BASELINE else verdict(metric, mean, base),
                             "bootstrap_first_seed": fid_interval(values[arm_runs[0].name], step, cfg)
                             if metric == "fid" else None})
    return {"study": study.name, "step": step, "rule": RULE, "rows": rows,
            "throughput": throughput(by_arm, values), "runs": values}


def throughput(by_arm: dict[str, list[Run]], values: dict[str, Any]) -> list[dict[str, Any]]:
    def mean_of(runs: list[Run], key: str) -> float | None:
        got = [values[r.name]["summary"][key] for r in runs
               if values[r.name]["summary"] and values[r.name]["summary"].get(key) is not None]
        return statistics.fmean(got) if got else None

    base = mean_of(by_arm[BASELINE], "batches_per_s")
    out = []
    for arm, runs in by_arm.items():
        bps = mean_of(runs, "batches_per_s")
        out.append({"arm": arm, "batches_per_s": bps, "ratio": bps / base if bps and base else None,
                    "samples_per_s": mean_of(runs, "samples_per_s"), "mfu": mean_of(runs, "mfu"),
                    "peak_memory_gib": (mean_of(runs, "peak_memory_bytes") or 0) / 2 ** 30 or None})
    return out


# ------------------------------------------------------------------------------------------- writing
def _fmt(v: Any) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


def _mfu(t: dict[str, Any]) -> str:
    return "n/a" if t.get("mfu") is None else f"{100 * t['mfu']:.1f}%"


def _interval(row: dict[str, Any]) -> str:
    got = row.get("bootstrap_first_seed")
    return "-" if not got else f"{got[0]:.4g}..{got[1]:.4g}"


def markdown(doc: dict[str, Any]) -> str:
    lines = [f"# Study {doc['study']}: step {doc['step']}", "", f"Verdict rule: {doc['rule']}.", "",
             "| arm | cfg | metric | value | seeds | delta | baseline mean +- std | baseline min..max | verdict | "
             "FID bootstrap 95% (first seed) |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in doc["rows"]:
        b = r.get("baseline") or {}
        std = "-" if b.get("std") is None else f"{b['std']:.4g}"
        lines.append(f"| {r['arm']} | {r['cfg']} | {r['metric']} | {_fmt(r['value'])} | {r.get('seeds', '-')} | "
                     f"{_fmt(r.get('delta'))} | {_fmt(b.get('mean'))} +- {std} | {_fmt(b.get('min'))}.."
                     f"{_fmt(b.get('max'))} | {r['verdict']} | {_interval(r)} |")
    lines += ["", "| arm | batches/s | ratio to baseline | samples/s | MFU | peak memory GiB |",
              "|---|---|---|---|---|---|"]
    for t in doc["throughput"]:
        lines.append(f"| {t['arm']} | {_fmt(t['batches_per_s'])} | {_fmt(t['ratio'])} | {_fmt(t['samples_per_s'])} "
                     f"| {_mfu(t)} | {_fmt(t['peak_memory_gib'])} |")
    return "\n".join(lines) + "\n"


def _png(fig) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90, bbox_inches="tight")
    return base64.b64encode(buf.getvalue()).decode()


def plots(study: Study, runs: list[Run], doc: dict[str, Any]) -> list[str]:
    """Each metric over the shared steps: the baseline's seed band (min..max) and mean, every arm's mean."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = []
    metrics = sorted({r["metric"] for r in doc["rows"]})
    cfg = min((r["cfg"] for r in doc["rows"]), default=None)
    for metric in metrics:
        fig, ax = plt.subplots(figsize=(5, 3.2))
        by_arm: dict[str, dict[int, list[float]]] = {}
        for r in runs:
            for step, per_cfg in doc["runs"][r.name]["metrics"].items():
                v = per_cfg.get(cfg, {}).get(metric)
                if v is not None:
                    by_arm.setdefault(r.arm.name, {}).setdefault(int(step), []).append(v)
        for arm, pts in by_arm.items():
            steps = sorted(pts)
            means = [statistics.fmean(pts[s]) for s in steps]
            if arm == BASELINE:
                ax.fill_between(steps, [min(pts[s]) for s in steps], [max(pts[s]) for s in steps], alpha=0.25,
                                label="baseline seeds")
            ax.plot(steps, means, marker="o", label=arm)
        ax.set_xlabel("step")
        ax.set_ylabel(f"{metric} (cfg {cfg})")
        ax.legend(fontsize=7)
        out.append(_png(fig))
        plt.close(fig)
    return out


def grids(runs: list[Run]) -> list[tuple[str, str]]:
    out = []
    for r in runs:
        path = os.path.join(samples_dir(r), "grid.png")
        if os.path.isfile(path):
            with open(path, "rb") as fh:
                out.append((r.arm.name, base64.b64encode(fh.read()).decode()))
    return out


def html_page(study: Study, runs: list[Run], doc: dict[str, Any]) -> str:
    e = html.escape
    head = ("<th>arm</th><th>cfg</th><th>metric</th><th>value</th><th>seeds</th><th>delta</th>"
            "<th>baseline mean &plusmn; std</th><th>baseline min..max</th><th>verdict</th>"
            "<th>FID bootstrap 95% (first seed)</th>")
    cells = []
    for r in doc["rows"]:
        b = r.get("baseline") or {}
        std = "-" if b.get("std") is None else f"{b['std']:.4g}"
        cells.append(f"<tr class='{e(r['verdict'].replace(' ', '-'))}'><td>{e(r['arm'])}</td><td>{r['cfg']}</td>"
                     f"<td>{e(r['metric'])}</td><td>{_fmt(r['value'])}</td><td>{r.get('seeds', '-')}</td>"
                     f"<td>{_fmt(r.get('delta'))}</td><td>{_fmt(b.get('mean'))} &plusmn; {std}</td>"
                     f"<td>{_fmt(b.get('min'))}..{_fmt(b.get('max'))}</td><td>{e(r['verdict'])}</td>"
                     f"<td>{_interval(r)}</td></tr>")
    tput = "".join(f"<tr><td>{e(t['arm'])}</td><td>{_fmt(t['batches_per_s'])}</td><td>{_fmt(t['ratio'])}</td>"
                   f"<td>{_fmt(t['samples_per_s'])}</td><td>{_mfu(t)}</td><td>{_fmt(t['peak_memory_gib'])}</td></tr>"
                   for t in doc["throughput"])
    figs = "".join(f"<img alt='metric over steps' src='data:image/png;base64,{p}'>" for p in plots(study, runs, doc))
    grid = "".join(f"<figure><img alt='{e(a)}' src='data:image/png;base64,{p}'><figcaption>{e(a)}</figcaption>"
                   "</figure>" for a, p in grids(runs))
    style = ("body{font-family:sans-serif;margin:2em;max-width:1200px}table{border-collapse:collapse;margin:1em 0}"
             "td,th{border:1px solid #ccc;padding:4px 8px;text-align:right}td:first-child{text-align:left}"
             ".better{background:#e3f6e3}.worse{background:#fbe3e3}.baseline{color:#666}"
             "figure{display:inline-block;margin:4px}figure img{max-width:360px}img{margin:4px}")
    return (f"<!doctype html><html><head><meta charset='utf-8'><title>prx-study {e(doc['study'])}</title>"
            f"<style>{style}</style></head><body><h1>Study {e(doc['study'])}</h1>"
            f"<p>Values at step {doc['step']} (the last shared step), mean over each arm's seeds.</p>"
            f"<p><b>Verdict rule:</b> {e(doc['rule'])}.</p><table><tr>{head}</tr>{''.join(cells)}</table>"
            f"<h2>Throughput</h2><table><tr><th>arm</th><th>batches/s</th><th>ratio to baseline</th>"
            f"<th>samples/s</th><th>MFU</th><th>peak memory GiB</th></tr>{tput}</table>"
            f"<h2>Metrics over steps</h2>{figs}<h2>Fixed prompts, last step</h2>{grid}</body></html>")


def write(study: Study, runs: list[Run], out: str) -> dict[str, Any]:
    doc = table(study, runs)
    for name, text in (("report.json", json.dumps(doc, indent=2, default=str)), ("report.md", markdown(doc)),
                       ("report.html", html_page(study, runs, doc))):
        tmp = os.path.join(out, name + ".tmp")
        with open(tmp, "w") as fh:
            fh.write(text)
        os.replace(tmp, os.path.join(out, name))
    return doc
