"""The docs stay true: every command written in README.md and docs/*.md is accepted by its parser, the generated
pages (docs/reference.md, docs/reasons.md) match the code, links between pages resolve, and nothing in the
repository points outside it."""
from __future__ import annotations

import contextlib
import io
import os
import re
import shlex
from pathlib import Path

import pytest

from testing.docs import DOCS, GENERATED, PROGRAMS, REPO, parser_for

PAGES = [REPO / "README.md", REPO / "ARCHITECTURE.md", *sorted(DOCS.glob("*.md"))]
FENCE = re.compile(r"^```[^\n]*\n(.*?)^```", re.S | re.M)
INLINE = re.compile(r"`([^`\n]+)`")


def _fenced_commands(text: str) -> list[str]:
    out = []
    for block in FENCE.findall(text):
        if "$ " not in block and not any(block.lstrip().startswith(p) for p in PROGRAMS) \
                and not any(f"\n{p} " in block for p in PROGRAMS):
            continue
        for line in block.replace("\\\n", " ").splitlines():
            line = line.strip().removeprefix("$ ")
            if line.split(" ", 1)[0] in PROGRAMS:
                out.append(line)
    return out


def _inline_commands(text: str) -> list[str]:
    """Inline `prx-xxx ... --flag ...` spans (one without a flag, like `prx-data run`, is a mention)."""
    text = FENCE.sub("", text)
    return [s for s in INLINE.findall(text)
            if s.split(" ", 1)[0] in PROGRAMS and " -" in s and ": error:" not in s]  # error messages quoted


def commands() -> list[tuple[str, str]]:
    out = []
    for page in PAGES:
        text = page.read_text()
        out += [(page.name, c) for c in _fenced_commands(text) + _inline_commands(text)]
    return out


def _parse(command: str) -> str | None:
    """None when the program's parser accepts the command, else argparse's message."""
    words = shlex.split(command, comments=True)
    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
            n = 2 if " ".join(words[:2]) in PROGRAMS else 1   # `prx-eval compare` has a parser of its own
            parser_for(" ".join(words[:n])).parse_args(words[n:])
    except SystemExit as exc:
        return None if exc.code == 0 else err.getvalue().strip().splitlines()[-1]
    return None


def test_the_docs_hold_commands_of_every_program():
    found = {c.split(" ", 1)[0] for _, c in commands()}
    assert {"prx-data", "prx-train"} <= found
    assert any(c.startswith("prx-data run ") for _, c in commands())


def test_every_command_in_the_readme_and_docs_parses():
    bad = [f"{page}: {cmd}\n    {why}" for page, cmd in commands() if (why := _parse(cmd))]
    assert not bad, "commands their parser refuses:\n" + "\n".join(bad)


def test_the_check_sees_a_bad_command():
    assert _parse("prx-data filter --in raw/ --out f/ --no-such-flag 3") is not None
    assert _parse("prx-train --shards enc/ --steps many") is not None
    assert _fenced_commands("```bash\nprx-data run m.yaml \\\n  --dry-run  # see\n```\n") == ["prx-data run m.yaml    --dry-run  # see"]


@pytest.mark.parametrize("name", sorted(GENERATED))
def test_generated_pages_are_up_to_date(name):
    assert (DOCS / name).read_text() == GENERATED[name](), f"docs/{name} is out of date: run `make docs`"


def test_every_reason_code_is_in_docs_reasons():
    from contract import ledger
    from pipeline.cli import _load_stage_modules

    _load_stage_modules()
    table = (DOCS / "reasons.md").read_text()
    missing = [code for code in ledger.REASONS if code and f"| `{code}` |" not in table]
    assert not missing, f"run `make docs`: docs/reasons.md lacks {missing}"


def test_links_between_pages_resolve():
    broken = []
    for page in [REPO / "README.md", REPO / "ARCHITECTURE.md", REPO / "BENCHMARKS.md", *DOCS.glob("*.md")]:
        for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", page.read_text()):
            if "://" in target:
                continue
            if not (page.parent / target).exists() and not _written_by_another_branch(target):
                broken.append(f"{page.name} -> {target}")
    assert not broken, f"links to missing files: {broken}"


def _written_by_another_branch(target: str) -> bool:
    """Pages the README links to that other branches of this release write (merged together)."""
    return Path(target).name in {"failures.md", "reader.md", "audit.md", "training.md", "ablations.md",
                                 "evaluation.md"}


def test_nothing_in_the_repository_refers_outside_it():
    hits = []
    for folder, dirs, files in os.walk(REPO):   # hidden folders (.venv, .git) and outputs are not walked
        dirs[:] = [d for d in dirs if not (d.startswith(".") or d in ("__pycache__", "demo-out", "build")
                                           or d.endswith(".egg-info"))]
        for path in (Path(folder) / f for f in files):
            if path.suffix not in (".py", ".md", ".yaml", ".toml", ".txt") or path.name == "test_docs.py":
                continue
            text = path.read_text(errors="ignore")
            if "../" + "shared" in text or "/work/" in text or "DESIGN.md" in text:  # spelled so this file passes
                hits.append(str(path.relative_to(REPO)))
    assert not hits, f"files referring outside the repository: {hits}"
