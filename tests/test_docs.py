"""The docs stay true: every command written in README.md and docs/*.md is accepted by its parser, the generated
pages (docs/reference.md, docs/reasons.md) match the code, every link and section pointer between pages names
an existing file and heading, and nothing in the repository points outside it."""
from __future__ import annotations

import contextlib
import io
import os
import re
import shlex
from pathlib import Path

import pytest

from testing.docs import DOCS, GENERATED, PROGRAMS, REPO, parser_for

PAGES = [REPO / "README.md", REPO / "ARCHITECTURE.md", REPO / "BENCHMARKS.md", *sorted(DOCS.glob("*.md"))]
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


@pytest.mark.slow  # a parser built for each of the docs' commands: ~10 s
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


SKIPPED_DIRS = ("__pycache__", "demo-out", "bench-out", "build")
LINK = re.compile(r"!?\[[^\]\n]*\]\(([^)\s]+)\)")                     # [text](target) and ![alt](target)
QUOTED_POINTER = re.compile(r'(?:\]\()?([\w./-]+\.md)\)?,\s+"([^"]{1,200})"')  # (docs/x.md, "Heading")
BARE_POINTER = re.compile(r"\(([\w./-]+\.md), ([A-Z][^()\"`\n]*)\)")     # (docs/x.md, Heading)


def _markdown_files() -> list[Path]:
    out = []
    for folder, dirs, files in os.walk(REPO):   # hidden folders (.venv, .git) and outputs are not walked
        dirs[:] = [d for d in dirs if not (d.startswith(".") or d in SKIPPED_DIRS or d.endswith(".egg-info"))]
        out += [Path(folder) / f for f in files if f.endswith(".md")]
    return sorted(out)


def _prose(text: str) -> str:
    """The text without fenced blocks and inline code (a `[x](y)` inside code is no link)."""
    return INLINE.sub("", FENCE.sub("", text))


def _slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation (backticks too) dropped, spaces -> hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def _headings(path: Path) -> list[str]:
    return [m.group(1).strip() for m in re.finditer(r"^#{1,6}[ \t]+(.+?)[ \t#]*$", FENCE.sub("", path.read_text()),
                                                   re.M)]


def _anchors(path: Path) -> set[str]:
    seen: dict[str, int] = {}
    out = set()
    for heading in _headings(path):
        slug = _slug(heading)
        out.add(slug if slug not in seen else f"{slug}-{seen[slug]}")
        seen[slug] = seen.get(slug, 0) + 1
    return out


def _resolve(page: Path, target: str) -> Path | None:
    """A file a page names: relative to the page, or (for `docs/x.md`-style pointers) to the repository."""
    for base in (page.parent, REPO):
        if (base / target).exists():
            return (base / target).resolve()
    return None


def broken_references(page: Path, text: str) -> list[str]:
    """Every relative link `[..](path#anchor)` and every section pointer `(docs/x.md, "Heading")` in `text`
    (the content of `page`) that names no existing file, or no heading in it."""
    bad = []
    prose = _prose(text)
    for target in LINK.findall(prose):
        if "://" in target or target.startswith("mailto:"):
            continue
        path, _, anchor = target.partition("#")
        if path and not (page.parent / path).exists():
            bad.append(f"{page.name}: [..]({target}): no file {path}")
        elif anchor and (path or page.name).endswith(".md") \
                and anchor not in _anchors(page.parent / path if path else page):
            bad.append(f"{page.name}: [..]({target}): no heading with the anchor #{anchor}")
    for target, heading in QUOTED_POINTER.findall(prose) + BARE_POINTER.findall(prose):
        heading = " ".join(heading.split())   # a pointer may wrap inside its quotes
        found = _resolve(page, target)
        if found is None:
            bad.append(f"{page.name}: ({target}, {heading}): no file {target}")
        elif heading.casefold() not in {h.replace("`", "").casefold() for h in _headings(found)} \
                | {h.casefold() for h in _headings(found)}:
            bad.append(f"{page.name}: ({target}, {heading}): {target} has no such heading")
    return bad


def test_links_and_section_pointers_name_existing_files_and_headings():
    pages = _markdown_files()
    assert {REPO / "README.md", REPO / "ARCHITECTURE.md", REPO / "BENCHMARKS.md", DOCS / "training.md"} <= set(pages)
    bad = [b for page in pages for b in broken_references(page, page.read_text())]
    assert not bad, "links or pointers to missing files or headings:\n" + "\n".join(bad)


def test_the_check_sees_a_bad_link_or_pointer():
    page = REPO / "ARCHITECTURE.md"
    assert broken_references(page, '(docs/failures.md, "One process per folder") [x](docs/stages.md#'
                                   'prx-data-run-a-whole-pipeline-from-a-manifest) [y](#module-map)') == []
    assert len(broken_references(page, "[x](docs/nowhere.md)")) == 1
    assert len(broken_references(page, "[x](docs/stages.md#no-such-section)")) == 1
    assert len(broken_references(page, "[x](#no-such-section)")) == 1
    assert len(broken_references(page, '(docs/failures.md, "No such section")')) == 1
    assert len(broken_references(page, "(docs/failures.md, No such section)")) == 1
    assert len(broken_references(page, '[failures.md](docs/failures.md), "No such section"')) == 1
    assert broken_references(page, '(docs/failures.md, "One process\nper folder")') == []
    assert broken_references(page, "```\n[x](nowhere.md)\n``` `[y](nowhere.md)`") == []
    assert _slug("`prx-data run`: a whole pipeline from a manifest") == "prx-data-run-a-whole-pipeline-from-a-manifest"


def test_nothing_in_the_repository_refers_outside_it():
    hits = []
    for folder, dirs, files in os.walk(REPO):   # hidden folders (.venv, .git) and outputs are not walked
        dirs[:] = [d for d in dirs if not (d.startswith(".") or d in ("__pycache__", "demo-out", "study-demo", "build")
                                           or d.endswith(".egg-info"))]
        for path in (Path(folder) / f for f in files):
            if path.suffix not in (".py", ".md", ".yaml", ".toml", ".txt") or path.name == "test_docs.py":
                continue
            text = path.read_text(errors="ignore")
            if "../" + "shared" in text or "/work/" in text or "DESIGN.md" in text:  # spelled so this file passes
                hits.append(str(path.relative_to(REPO)))
    assert not hits, f"files referring outside the repository: {hits}"
