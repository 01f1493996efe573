"""`--fail-on` grammar and exit codes."""
from __future__ import annotations

import json

import pytest

from pipeline.audit.gate import GateError, evaluate, parse_rules
from pipeline.stages.audit import main as audit
from test_audit import WEB, write_folder


def fig(words_mean, refusal_rate, tokens=True):
    return {"count": 10, "nonempty": 10, "empty": {"count": 0, "rate": 0.0},
            "words": {"mean": words_mean, "median": words_mean, "p5": 1, "p95": 9, "min": 1, "max": 9},
            "tokens": {"mean": 5.0} if tokens else {"unavailable": "needs --text-encoder"},
            "refusals": {"count": int(refusal_rate * 10), "rate": refusal_rate},
            "vocabulary": {"size": 10, "distinct_1": 0.5, "distinct_2": 0.7, "distinct_3": 0.9, "ttr": 0.8},
            "clip": {}}


GROUPS = [
    {"name": "laion.v2/long", "source": "laion.v2", "variant": "long", "figures": fig(150, 0.0)},
    {"name": "laion.v2/short", "source": "laion.v2", "variant": "short", "figures": fig(20, 0.02)},
    {"name": "coco/long", "source": "coco", "variant": "long", "figures": fig(90, 0.0, tokens=False)},
]


def failing(rules):
    return {r["rule"]: [f["group"] for f in r["failures"]] for r in evaluate(parse_rules(rules), GROUPS)
            if not r["passed"]}


def test_parse():
    r = parse_rules("words.mean < 100, laion.v2.long.words.p95>=3e1 ,long.refusals>0.01,count==10")
    assert [(x.qualifier, x.metric, x.stat, x.op, x.number) for x in r] == [
        ("", "words", "mean", "<", 100), ("laion.v2.long", "words", "p95", ">=", 30.0),
        ("long", "refusals", "rate", ">", 0.01), ("", "count", "value", "==", 10)]
    for bad in ("words.mean", "wordz.mean < 3", "words.mean < x", "words.avg < 3"):
        with pytest.raises(GateError):
            parse_rules(bad)


def test_unqualified_applies_to_every_group():
    assert failing("words.mean < 100") == {"words.mean < 100": ["laion.v2/short", "coco/long"]}
    assert failing("refusals.rate > 0.01") == {"refusals.rate > 0.01": ["laion.v2/short"]}
    assert failing("distinct_2 < 0.5, vocabulary.ttr < 0.5") == {}


def test_qualifiers_narrow():
    assert failing("long.words.mean < 100") == {"long.words.mean < 100": ["coco/long"]}
    assert failing("laion.v2.words.mean < 100") == {"laion.v2.words.mean < 100": ["laion.v2/short"]}
    assert failing("laion.v2.short.words.mean < 100") == {"laion.v2.short.words.mean < 100": ["laion.v2/short"]}
    assert failing("coco.short.words.mean < 100") == {"coco.short.words.mean < 100": ["coco.short"]}


def test_uncomputable_fails_and_says_why():
    res = evaluate(parse_rules("tokens.mean > 100"), GROUPS)[0]
    assert not res["passed"]
    assert res["failures"] == [{"group": "coco/long", "value": None, "why": "not computed: needs --text-encoder"}]
    assert "no CLIP scores" in evaluate(parse_rules("clip.mean < 0.2"), GROUPS)[0]["failures"][0]["why"]


def test_exit_codes(tmp_path, capsys):
    write_folder(tmp_path / "web", WEB, "web")
    base = [str(tmp_path / "web"), "--executor", "local", "--no-progress", "--language-sample", "1"]
    assert audit(base + ["--fail-on", "refusals.rate > 0.5,original.words.mean < 4"]) == 0
    assert "all 2 --fail-on rule(s) passed" in capsys.readouterr().out
    out = tmp_path / "r.json"
    assert audit(base + ["--fail-on", "long.refusals.rate >= 0.2, web.original.words.mean<5, short.empty>0.5",
                         "--json", str(out)]) == 1
    err = capsys.readouterr().err
    assert "FAIL long.refusals.rate >= 0.2\n  web/long: 0.2" in err
    assert "FAIL web.original.words.mean<5\n  web/original: 4.2" in err
    assert "short.empty" not in err and "2 of 3 --fail-on rule(s) failed" in err
    gate = json.loads(out.read_text())["gate"]
    assert [g["passed"] for g in gate] == [False, False, True]
    assert audit(base + ["--fail-on", "nosuch.words.mean > 1"]) == 1
    assert "no group matches 'nosuch'" in capsys.readouterr().err
    assert audit(base + ["--fail-on", "words.mean >> 1"]) == 2


def test_empty_names_are_refused_and_spaces_stripped():
    for bad in (".words.mean < 3", "long..words.mean < 3", "long.words. < 3"):
        with pytest.raises(GateError):
            parse_rules(bad)
    assert parse_rules("long . words.mean<100")[0].qualifier == "long"
    assert failing("long . words.mean<100") == {"long . words.mean<100": ["coco/long"]}
