"""`prx-data inspect DIR` and `prx-data ledger DIR --key K`: look at a shard folder and trace a sample."""
from __future__ import annotations

import base64
import html
import io
import json
import posixpath
from collections import Counter
from typing import Any

import pyarrow.compute as pc

from contract import fs, ledger
from contract.errors import PrxError
from contract.images import ImageRejected
from contract.shards import MemberCaps, Members, Problem, Sample, list_shards, read_shard
from contract.ledger import read_stage_json

UNCAPPED = MemberCaps(*(1 << 62,) * 5)   # every member counted, whatever its size (none is read)
DAMAGE = ("truncated_tar", "read_error")   # Problems that say the tar itself is damaged


def shard_counts(path: str) -> tuple[int, Counter, Counter, str | None]:
    """(samples, bytes by member, the reader's Problems by reason, what damages the tar or None) of one shard,
    through the project's reader (sizes from the headers; nothing parsed). Damage: the first `truncated_tar` or
    `read_error` row."""
    samples, by_member, problems, damage = 0, Counter(), Counter(), None
    for item in read_shard(path, UNCAPPED):
        if isinstance(item, Problem):
            problems[item.reason] += 1
            if damage is None and item.reason in DAMAGE:
                damage = item.detail
            continue
        samples += 1
        members = item.members
        by_member.update({m: members.size(m) if isinstance(members, Members) else len(members[m]) for m in members})
    return samples, by_member, problems, damage


def folder_report(folder: str) -> dict[str, Any]:
    """Counts, members and sizes of one shard folder; what the reader could not read, and the damaged shards."""
    if not fs.exists(folder):
        raise PrxError(f"{folder} does not exist: give a shard folder (a stage's --out)")
    shards = list_shards(folder)
    stage = read_stage_json(folder)
    if not shards and stage is None:
        raise PrxError(f"{folder} holds no NNNNNN.tar shards and no _stage.json: give a shard folder (a stage's "
                         "--out; for one shard, the folder holding it)")
    samples, member_bytes, unreadable, damaged = 0, Counter(), Counter(), {}
    for path in shards:
        n, by, problems, damage = shard_counts(path)
        samples += n
        member_bytes.update(by)
        unreadable.update(problems)
        if damage:
            damaged[posixpath.basename(path)] = damage
    table = ledger.read_folder(folder)
    outcomes = Counter(table.column("outcome").to_pylist()) if table.num_rows else Counter()
    reasons = Counter(f"{o}:{r}" for o, r in zip(table.column("outcome").to_pylist(),
                                                 table.column("reason").to_pylist()) if r)
    stage = stage or {}
    return {
        "folder": folder,
        "stage": stage.get("stage"),
        "status": stage.get("status"),
        "inputs": stage.get("inputs", []),
        "shards": len(shards),
        "samples": samples,
        "unreadable": dict(sorted(unreadable.items())),
        "damaged": damaged,
        "ledger_rows": table.num_rows,
        "outcomes": dict(outcomes),
        "reasons": dict(sorted(reasons.items())),
        "bytes_total": int(sum(member_bytes.values())),
        "bytes_per_sample": {m: round(b / samples, 1) for m, b in sorted(member_bytes.items())} if samples else {},
    }


def format_report(r: dict[str, Any]) -> str:
    lines = [f"{r['folder']}: stage {r['stage']} ({r['status']}), {r['shards']} shards, {r['samples']} samples, "
             f"{r['bytes_total'] / 1e6:.1f} MB",
             f"  ledger: {r['ledger_rows']} rows " + ", ".join(f"{k} {v}" for k, v in sorted(r["outcomes"].items()))]
    for reason, n in r["reasons"].items():
        lines.append(f"    {reason:<40} {n}")
    if r["unreadable"]:
        lines.append(f"  unreadable: {sum(r['unreadable'].values())} (" +
                     ", ".join(f"{k} {v}" for k, v in r["unreadable"].items()) + ") not counted in the samples")
    for shard, damage in r["damaged"].items():
        lines.append(f"  DAMAGED {shard}: {damage}; rerun the stage that wrote it (it redoes damaged shards)")
    for m, b in r["bytes_per_sample"].items():
        lines.append(f"  member {m:<28} {b:>12,.0f} bytes/sample")
    if r["inputs"]:
        lines.append("  inputs: " + ", ".join(r["inputs"]))
    return "\n".join(lines)


def _thumbnail(sample: Sample, size: int = 256) -> str | None:
    try:
        img, _ = sample.image()
    except ImageRejected:
        return None
    img.thumbnail((size, size))
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=85)
    return base64.b64encode(buf.getvalue()).decode("ascii")


def write_html(folder: str, path: str, max_images: int = 100) -> int:
    """A self-contained page: a grid of images with every caption variant. Returns samples shown."""
    cards = []
    for shard in list_shards(folder):
        for s in read_shard(shard):
            if not isinstance(s, Sample):
                continue
            thumb = _thumbnail(s)
            texts = [("original", s.text("txt") or "")] + [
                (m[len("caption_"):-4], s.text(m) or "") for m in sorted(s.members)
                if m.startswith("caption_") and m.endswith(".txt")]
            img_tag = (f'<img src="data:image/jpeg;base64,{thumb}">' if thumb
                       else '<div class="noimg">no image</div>')
            caps = "".join(f"<p><b>{html.escape(v)}</b> {html.escape(t)}</p>" for v, t in texts)
            cards.append(f'<div class="card">{img_tag}<p class="key">{html.escape(s.key)}</p>{caps}</div>')
            if len(cards) >= max_images:
                break
        if len(cards) >= max_images:
            break
    page = f"""<!doctype html><html><head><meta charset="utf-8"><meta name="generator" content="prx"><title>{html.escape(folder)}</title>
<style>body{{font-family:sans-serif;margin:1em}} .grid{{display:flex;flex-wrap:wrap;gap:12px}}
.card{{width:280px;border:1px solid #ddd;padding:8px;font-size:12px}} .card img{{max-width:256px}}
.key{{color:#888;font-family:monospace}} .noimg{{height:120px;background:#eee}}</style></head>
<body><h1>{html.escape(folder)}</h1><p>{len(cards)} samples</p><div class="grid">{''.join(cards)}</div></body></html>"""
    with fs.open_file(path, "wb") as fh:
        fh.write(page.encode("utf-8"))
    return len(cards)


def trace_key(folder: str, key: str, _seen: set | None = None) -> list[dict[str, Any]]:
    """Every ledger row of `key` in this folder and, through `_stage.json` inputs, the folders before it."""
    seen = _seen if _seen is not None else set()
    if folder in seen or not fs.exists(folder):
        return []
    seen.add(folder)
    rows: list[dict[str, Any]] = []
    stage = read_stage_json(folder) or {}
    for upstream in stage.get("inputs", []):
        rows.extend(trace_key(upstream, key, seen))
    table = ledger.read_folder(folder)
    if table.num_rows:
        match = table.filter(pc.equal(table.column("key"), key))
        for r in match.to_pylist():
            r["folder"] = folder
            r["scores"] = dict(r["scores"] or [])
            rows.append(r)
    return rows


def format_trace(rows: list[dict[str, Any]]) -> str:
    if not rows:
        return "no ledger rows for this key"
    lines = []
    for r in rows:
        lines.append(f"{r['stage']:<10} {r['outcome']:<9} {r['reason'] or '-':<22} shard {r['shard']:<6} "
                     f"{r['folder']}  input={r['input_id']}")
        if r["detail"]:
            lines.append(f"{'':<10} detail: {r['detail']}")
        if r["scores"]:
            lines.append(f"{'':<10} scores: {json.dumps(r['scores'])}")
    return "\n".join(lines)
