"""`prx-data`: one subcommand per stage of the registry (pipeline/stages/__init__.py), plus tools to look at what
stages wrote.

Every stage subcommand is generated from its config dataclass, so `--help`, the YAML file (`--config`)
and the saved `_stage.json` always agree.
"""
from __future__ import annotations

import argparse
import errno
import json
import os
import sys

from pipeline.stages import STAGES

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")  # img2dataset imports albumentations, which calls out


def _stage_command(args: argparse.Namespace) -> int:
    from contract.config import build_config
    from pipeline.runner import format_summary, run_stage

    stage_cls = args._stage
    values = {k: v for k, v in vars(args).items() if not k.startswith("_") and k != "command"}
    cfg = build_config(stage_cls.config_cls, values)
    summary = run_stage(stage_cls(cfg))
    print(format_summary(stage_cls.name, cfg.out, summary))
    return 0


def _inspect_command(args: argparse.Namespace) -> int:
    from pipeline.inspect import folder_report, format_report, write_html

    if args.html:  # the page lands neither on nor inside an inspected folder, nor over a file prx did not write
        from pipeline.runner import check_no_overlap, check_report_path

        check_no_overlap([args.html], list(args.dirs))
        check_report_path(args.html)
    reports = [folder_report(folder) for folder in args.dirs]   # a folder that is none: exit 2 before any output
    for folder, report in zip(args.dirs, reports):
        print(json.dumps(report, indent=2) if args.json else format_report(report))
        if args.html:
            n = write_html(folder, args.html, args.max_images)
            print(f"wrote {args.html} ({n} samples)")
    return 0


def _ledger_command(args: argparse.Namespace) -> int:
    from pipeline.inspect import format_trace, trace_key

    rows = trace_key(args.dir, args.key)
    print(json.dumps(rows, indent=2, default=str) if args.json else format_trace(rows))
    return 0 if rows else 1


def _reasons_command(args: argparse.Namespace) -> int:
    from contract import ledger

    _load_stage_modules()  # stages register their own codes on import
    print(ledger.reason_table_markdown())
    return 0


def _load_stage_modules():
    """Every registered stage's module (pipeline/stages/__init__.py), in registry order."""
    return [entry.load() for entry in STAGES]


def build_parser() -> argparse.ArgumentParser:
    from contract.config import add_arguments

    parser = argparse.ArgumentParser(
        prog="prx-data",
        description="Turn images into training shards: ingest/download -> filter -> recaption -> encode, "
                    "with a ledger row for every input and `audit` at any point.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for module in _load_stage_modules():
        stage = getattr(module, "STAGE", None)
        if stage is not None:
            p = sub.add_parser(stage.name, help=stage.help, description=(stage.__doc__ or stage.help),
                               formatter_class=argparse.ArgumentDefaultsHelpFormatter)
            add_arguments(p, stage.config_cls)
            p.set_defaults(_func=_stage_command, _stage=stage)
        if hasattr(module, "add_commands"):
            module.add_commands(sub)

    from pipeline.run import add_command as add_run_command

    add_run_command(sub)

    p = sub.add_parser("inspect", help="counts, members and sizes of shard folders; --html renders a grid")
    p.add_argument("dirs", nargs="+", metavar="DIR")
    p.add_argument("--html", metavar="FILE", help="write a page with images and their captions")
    p.add_argument("--max-images", type=int, default=100, help="samples shown in --html (default 100)")
    p.add_argument("--json", action="store_true", help="print JSON instead of text")
    p.set_defaults(_func=_inspect_command)

    p = sub.add_parser("ledger", help="a sample's ledger rows across every stage folder it passed")
    p.add_argument("dir", metavar="DIR")
    p.add_argument("--key", required=True, help="the sample key (32 hex digits)")
    p.add_argument("--json", action="store_true", help="print JSON instead of text")
    p.set_defaults(_func=_ledger_command)

    p = sub.add_parser("reasons", help="the ledger's reason codes, as a markdown table")
    p.set_defaults(_func=_reasons_command)
    return parser


def main(argv: list[str] | None = None) -> int:
    try:
        try:
            return _main(argv)
        finally:
            sys.stdout.flush()   # here (after --help too), so a reader that left is met below, not at exit
    except BrokenPipeError:
        return stdout_gone()


def _main(argv: list[str] | None) -> int:
    from contract.config import ConfigError
    from contract.errors import PrxError

    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args._func(args)
    except (ConfigError, PrxError, FileNotFoundError, KeyError) as exc:
        print(f"prx-data {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted; rerun the same command to resume", file=sys.stderr)
        return 130
    except OSError as exc:
        if exc.errno != errno.ENOSPC:
            raise
        from contract.shards import disk_full

        out = getattr(args, "out", None) or getattr(args, "root", None)
        print(f"prx-data {args.command}: error: {disk_full(exc, out)}", file=sys.stderr)
        return 1


def stdout_gone() -> int:
    """The reader of stdout left (`prx-data reasons | head -1`): exit quietly with 141, the status of a tool
    that SIGPIPE ended, as `head`'s other writers do; stdout goes to /dev/null first, so Python's own flush at
    exit finds nothing to complain about."""
    try:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    except (OSError, ValueError, AttributeError):   # no real stdout (a caller's replacement)
        pass
    return 128 + 13   # SIGPIPE


if __name__ == "__main__":
    sys.exit(main())
