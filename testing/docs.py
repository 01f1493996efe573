"""Generated docs, kept true by tests/test_docs.py: `python -m testing.docs` (or `make docs`) rewrites

- docs/reference.md: every command's `--help`, from the argparse parsers of PROGRAMS;
- docs/reasons.md:   the ledger's reason codes, from `contract.ledger.REASONS` (as `prx-data reasons` prints).

PROGRAMS is the one registry of the project's command-line programs (name -> "module:parser builder"); the
docs test checks every command written in README.md and docs/*.md against these parsers.
"""
from __future__ import annotations

import argparse
import importlib
import os
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
DOCS = REPO / "docs"
WIDTH = "100"  # help text wraps at this many columns, whatever the terminal

PROGRAMS: dict[str, str] = {
    "prx-data": "pipeline.cli:build_parser",
    "prx-train": "trainer.cli:build_parser",
    "prx-sample": "trainer.sample:build_parser",
    "prx-eval": "trainer.evaluate:build_parser",
    "prx-eval compare": "trainer.evaluate:compare_parser",   # prx-eval's one subcommand, dispatched by hand
    "prx-export": "trainer.export:build_parser",
}


def parser_for(program: str) -> argparse.ArgumentParser:
    module, func = PROGRAMS[program].split(":")
    return getattr(importlib.import_module(module), func)()


def subcommands(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    """name -> parser of each subcommand (argparse has no public accessor for them)."""
    out: dict[str, argparse.ArgumentParser] = {}
    for action in parser._actions:  # noqa: SLF001
        if isinstance(action, argparse._SubParsersAction):  # noqa: SLF001
            out.update(action.choices)
    return out


def _help_sections(title: str, parser: argparse.ArgumentParser, level: int) -> list[str]:
    parts = [f"{'#' * level} `{title}`", "", "```text", parser.format_help().rstrip(), "```", ""]
    for name, sub in subcommands(parser).items():
        parts += _help_sections(f"{title} {name}", sub, level + 1)
    return parts


def reference_markdown() -> str:
    old = os.environ.get("COLUMNS")
    os.environ["COLUMNS"] = WIDTH
    try:
        lines = ["# Command reference", "",
                 "Generated from the argparse parsers by `python -m testing.docs` (`make docs`); "
                 "tests/test_docs.py fails when it is out of date. The prose is in [stages.md](stages.md) "
                 "and [training.md](training.md).", ""]
        for program in PROGRAMS:
            lines += _help_sections(program, parser_for(program), 2)
        return "\n".join(lines).rstrip() + "\n"
    finally:
        if old is None:
            os.environ.pop("COLUMNS", None)
        else:
            os.environ["COLUMNS"] = old


def reasons_markdown() -> str:
    from contract import ledger
    from pipeline.cli import _load_stage_modules

    _load_stage_modules()  # stages register their codes on import
    return ("# Ledger reason codes\n\n"
            "Every ledger row has an outcome (`kept`, `rejected`, `failed`) and a stable reason code. Generated "
            "from `contract.ledger.REASONS` and the codes stages register (`prx-data reasons` prints the same "
            "table) by `python -m testing.docs`; tests/test_docs.py fails when it is out of date.\n\n"
            + ledger.reason_table_markdown() + "\n")


GENERATED = {"reference.md": reference_markdown, "reasons.md": reasons_markdown}


def main() -> int:
    DOCS.mkdir(exist_ok=True)
    for name, make in GENERATED.items():
        (DOCS / name).write_text(make())
        print(f"wrote {DOCS / name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
