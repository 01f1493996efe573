"""`prx-data download-report DIR`: failures by reason and by domain, and the failed URLs as a list to retry."""
from __future__ import annotations

import io
import urllib.parse
from collections import Counter
from typing import Any

import pyarrow as pa

from contract import fs, ledger
from contract.errors import PrxError
from contract.ledger import read_stage_json


def _write_table(table: pa.Table, path: str) -> None:
    buf = io.BytesIO()
    if path.endswith(".csv"):
        import pyarrow.csv as pacsv

        pacsv.write_csv(table, buf)
    elif path.endswith((".jsonl", ".json")):
        import json

        for row in table.to_pylist():
            buf.write((json.dumps(row, ensure_ascii=False, default=str) + "\n").encode("utf-8"))
    else:
        import pyarrow.parquet as pq

        pq.write_table(table, buf, compression="zstd")
    fs.write_bytes_atomic(path, buf.getvalue())


def domain_of(url: str) -> str:
    try:
        return (urllib.parse.urlsplit(url).hostname or "(none)").lower()
    except ValueError:
        return "(invalid)"


def failure_counts(table) -> tuple[Counter, dict[str, Counter]]:
    """Rows not kept, by `outcome:reason` and by domain then `outcome:reason`."""
    by_reason: Counter = Counter()
    by_domain: dict[str, Counter] = {}
    for outcome, reason, url in zip(table.column("outcome").to_pylist(), table.column("reason").to_pylist(),
                                    table.column("input_id").to_pylist()):
        if outcome == ledger.KEPT:
            continue
        by_reason[f"{outcome}:{reason}"] += 1
        by_domain.setdefault(domain_of(url), Counter())[f"{outcome}:{reason}"] += 1
    return by_reason, by_domain


def failed_rows(folder: str, chunks: list | None) -> list[dict[str, Any]]:
    """Failed URLs with their caption and extra columns (from `chunks`, the original list as the run cut it,
    when the caller still has it)."""
    out = []
    for path in fs.glob(fs.join(folder, "*.parquet")):
        table = ledger.read(path)
        cols = table.to_pydict()
        for pos in range(table.num_rows):
            if cols["outcome"][pos] != ledger.FAILED:
                continue
            shard = int(cols["shard"][pos])
            row: dict[str, Any] = {"url": cols["input_id"][pos], "caption": None}
            if chunks is not None and shard < len(chunks) and pos < len(chunks[shard]) \
                    and chunks[shard][pos].url == row["url"]:
                src = chunks[shard][pos]
                row["caption"] = src.caption
                row.update({k: (v if isinstance(v, (str, int, float, bool, type(None))) else str(v))
                            for k, v in src.extra.items()})
            row.update({"reason": cols["reason"][pos], "detail": cols["detail"][pos], "shard": shard})
            out.append(row)
    return out


def report(folder: str, write: str | None = None, top: int = 20, chunks: list | None = None) -> dict[str, Any]:
    """The report of a download folder; `chunks` (the URL list as cut into shards) adds captions and columns."""
    stage = read_stage_json(folder)
    if stage is None or stage.get("stage") != "download":
        raise PrxError(f"{folder} is not a prx-data download folder (no _stage.json of stage download)")
    table = ledger.read_folder(folder)
    by_reason, by_domain = failure_counts(table)
    outcomes = table.column("outcome").to_pylist()
    failed = failed_rows(folder, chunks)
    path = write or fs.join(folder, "_report", "failed_urls.parquet")
    if failed:
        _write_table(pa.Table.from_pylist(failed), path)
    domains = sorted(by_domain.items(), key=lambda kv: (-sum(kv[1].values()), kv[0]))
    return {
        "folder": folder,
        "urls": len(outcomes),
        "kept": outcomes.count(ledger.KEPT),
        "rejected": outcomes.count(ledger.REJECTED),
        "failed": outcomes.count(ledger.FAILED),
        "by_reason": dict(by_reason.most_common()),
        "by_domain": {d: dict(c.most_common()) for d, c in domains[:top]},
        "domains_with_failures": len(by_domain),
        "failed_list": path if failed else None,
        "retry": (f"rerun the same download command with --retry-failed, or: prx-data download --urls {path} "
                  f"--out NEW_DIR") if failed else None,
    }


def format_report(rep: dict[str, Any]) -> str:
    lines = [f"{rep['folder']}: {rep['urls']} URLs, {rep['kept']} kept, {rep['rejected']} rejected, "
             f"{rep['failed']} failed"]
    if rep["by_reason"]:
        lines.append("not kept, by reason:")
        lines += [f"  {reason:<36} {n}" for reason, n in rep["by_reason"].items()]
        lines.append(f"not kept, by domain (top {len(rep['by_domain'])} of {rep['domains_with_failures']}):")
        for domain, reasons in rep["by_domain"].items():
            total = sum(reasons.values())
            lines.append(f"  {domain:<36} {total:>6}  " + ", ".join(f"{r} {n}" for r, n in reasons.items()))
    if rep["failed_list"]:
        lines.append(f"failed URLs (ready to retry): {rep['failed_list']}")
        lines.append(f"  {rep['retry']}")
    return "\n".join(lines)
