"""The ledger funnel of a shard folder: in -> kept at each stage, by reason, walking back through the
`inputs` of every `_stage.json` (the same walk as `prx-data ledger`). Memory: O(stages x reasons); ledgers
are read one parquet at a time, two columns each.
"""
from __future__ import annotations

from collections import Counter
from typing import Any

from contract import fs, ledger
from contract.ledger import read_stage_json


def _folder_counts(folder: str) -> dict[str, Any]:
    pairs: Counter = Counter()   # (outcome, reason) -> rows: counted in C
    for path in fs.glob(fs.join(folder, "*.parquet")):
        table = fs.read_parquet(path, columns=["outcome", "reason"])
        pairs.update(zip(table.column("outcome").to_pylist(), table.column("reason").to_pylist()))
    outcomes: Counter = Counter()
    reasons: Counter = Counter()
    for (outcome, reason), n in pairs.items():
        outcomes[outcome] += n
        if outcome != ledger.KEPT:
            reasons[f"{outcome}:{reason}"] += n
    return {"in": sum(outcomes.values()), "kept": outcomes.get(ledger.KEPT, 0),
            "rejected": outcomes.get(ledger.REJECTED, 0), "failed": outcomes.get(ledger.FAILED, 0),
            "reasons": dict(sorted(reasons.items(), key=lambda kv: (-kv[1], kv[0])))}


def funnel(folder: str) -> list[dict[str, Any]]:
    """One entry per stage folder, upstream first: {folder, stage, in, kept, rejected, failed, reasons}.
    A folder with several inputs lists each input's chain before it (depth first, each folder once)."""
    out: list[dict[str, Any]] = []
    seen: set[str] = set()

    def walk(f: str) -> None:
        if f in seen or not fs.exists(f):
            return
        seen.add(f)
        info = read_stage_json(f) or {}
        for upstream in info.get("inputs", []) or []:
            if upstream and not str(upstream).startswith("hf:"):
                walk(upstream)
        counts = _folder_counts(f)
        if counts["in"] or info:
            out.append({"folder": f, "stage": info.get("stage") or "(no _stage.json)", **counts})

    walk(folder)
    return out
