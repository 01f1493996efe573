"""`--fail-on`: quality gates over the audit's figures.

Grammar (comma-separated rules):

    rule   := [source "."] [variant "."] metric ["." stat] op number
    op     := "<" | "<=" | ">" | ">=" | "==" | "!="

A rule states what must hold *to fail*: `refusals.rate > 0.01` fails every group whose refusal rate is above
1%. An unqualified rule applies to every group; a qualifier that names a known source or variant narrows it
("long.words.median < 100", "laion.original.empty.rate > 0.2"). Source names may contain dots. A rule that
matches no group, or names a figure that could not be computed (tokens without --text-encoder), fails too,
and says why: a gate never passes silently. Rates are fractions (0.05 = 5%).
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from contract.config import ConfigError

# metric -> (default stat, allowed stats); paths into a group's figures
METRICS: dict[str, tuple[str, tuple[str, ...]]] = {
    "count": ("value", ("value",)),
    "nonempty": ("value", ("value",)),
    "empty": ("rate", ("rate", "count")),
    "words": ("mean", ("mean", "median", "p5", "p95", "min", "max")),
    "tokens": ("mean", ("mean", "median", "p5", "p95", "min", "max")),
    "over_limit": ("rate", ("rate", "count")),
    "vocabulary": ("size", ("size", "distinct_1", "distinct_2", "distinct_3", "ttr")),
    "distinct_1": ("value", ("value",)),
    "distinct_2": ("value", ("value",)),
    "distinct_3": ("value", ("value",)),
    "ttr": ("value", ("value",)),
    "exact_dup": ("rate", ("rate", "count")),
    "near_dup": ("rate", ("rate", "count")),
    "loops": ("rate", ("rate", "count")),
    "refusals": ("rate", ("rate", "count")),
    "wrong_language": ("rate", ("rate", "count")),
    "clip": ("mean", ("mean", "median", "p5", "p95", "min", "max")),
    "unreadable": ("samples", ("samples", "shards")),   # the group's folder: what the reader could not read
}
OPS = {"<": lambda a, b: a < b, "<=": lambda a, b: a <= b, ">": lambda a, b: a > b, ">=": lambda a, b: a >= b,
       "==": lambda a, b: a == b, "!=": lambda a, b: a != b}
RULE_RE = re.compile(r"^\s*(?P<lhs>[^<>=!]+?)\s*(?P<op><=|>=|==|!=|<|>)\s*(?P<num>[-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?)\s*$")


class GateError(ConfigError):
    """A rule that does not parse."""


@dataclass
class Rule:
    text: str
    qualifier: str
    metric: str
    stat: str
    op: str
    number: float


def parse_rules(text: str | None) -> list[Rule]:
    rules = []
    for part in (text or "").split(","):
        if not part.strip():
            continue
        m = RULE_RE.match(part)
        if not m:
            raise GateError(f"cannot parse rule {part.strip()!r}: expected [source.][variant.]metric[.stat] OP number")
        parts = [x.strip() for x in m.group("lhs").split(".")]
        if not all(parts):
            raise GateError(f"rule {part.strip()!r}: empty name between dots; expected "
                            "[source.][variant.]metric[.stat] OP number")
        metric = stat = None
        if len(parts) >= 2 and parts[-2] in METRICS and parts[-1] in METRICS[parts[-2]][1]:
            metric, stat, qual = parts[-2], parts[-1], parts[:-2]
        elif parts[-1] in METRICS:
            metric, stat, qual = parts[-1], METRICS[parts[-1]][0], parts[:-1]
        else:
            raise GateError(f"rule {part.strip()!r}: unknown metric or stat; metrics: "
                            + ", ".join(f"{k}[.{'|'.join(v[1])}]" for k, v in METRICS.items()))
        rules.append(Rule(part.strip(), ".".join(qual), metric, stat, m.group("op"), float(m.group("num"))))
    return rules


def _matches(qualifier: str, source: str, variant: str) -> bool:
    if not qualifier:
        return True
    if qualifier == source or qualifier == variant:
        return True
    # "source.variant" (a source name may itself contain dots)
    head, _, tail = qualifier.rpartition(".")
    return bool(head) and head == source and tail == variant


def value_of(figures: dict[str, Any], metric: str, stat: str) -> list[tuple[str, float | None, str]]:
    """[(label, value or None, why not)] for one metric of one group (clip: one per score name)."""
    if metric in ("count", "nonempty"):
        return [("", figures[metric], "")]
    if metric in ("distinct_1", "distinct_2", "distinct_3", "ttr"):
        v = figures["vocabulary"].get(metric)
        return [("", v, "" if v is not None else "no non-empty captions")]
    if metric == "clip":
        if not figures["clip"]:
            return [("", None, "no CLIP scores stored (json.scores clip:*)")]
        return [(name, d.get(stat), "" if d.get(stat) is not None else "no scores")
                for name, d in figures["clip"].items()]
    d = figures[metric]
    if "unavailable" in d:
        return [("", None, d["unavailable"])]
    v = d.get(stat)
    return [("", v, "" if v is not None else "no non-empty captions")]


def evaluate(rules: list[Rule], groups: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """groups: [{"name", "source", "variant", "figures"}]. Returns one result per rule:
    {rule, passed, failures: [{group, value, why}]}."""
    sources = {g["source"] for g in groups}
    variants = {g["variant"] for g in groups}
    results = []
    for rule in rules:
        matched = [g for g in groups if _matches(rule.qualifier, g["source"], g["variant"])]
        failures = []
        if not matched:
            failures.append({"group": rule.qualifier or "*", "value": None,
                             "why": f"no group matches {rule.qualifier!r} (sources: {', '.join(sorted(sources))}; "
                                    f"variants: {', '.join(sorted(variants))})"})
        for g in matched:
            for label, value, why in value_of(g["figures"], rule.metric, rule.stat):
                name = g["name"] + (f" [{label}]" if label else "")
                if value is None:
                    failures.append({"group": name, "value": None, "why": f"not computed: {why}"})
                elif OPS[rule.op](float(value), rule.number):
                    failures.append({"group": name, "value": value, "why": ""})
        results.append({"rule": rule.text, "passed": not failures, "failures": failures})
    return results


def format_results(results: list[dict[str, Any]]) -> str:
    lines = []
    for r in results:
        if r["passed"]:
            continue
        lines.append(f"FAIL {r['rule']}")
        for f in r["failures"]:
            detail = f["why"] if f["value"] is None else f"{f['value']:.6g}"
            lines.append(f"  {f['group']}: {detail}")
    return "\n".join(lines)
