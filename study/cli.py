"""`prx-study`: a whole ablation table from one study file.

    prx-study run STUDY --out DIR [--executor local|slurm] [--gpus-per-run G] [--overwrite]
                  [--slurm-partition P --slurm-gpus-per-node G --slurm-time MIN]
    prx-study status DIR
    prx-study report DIR

`run` plans DIR/runs/ARM-seedS for every arm and seed, checks every arm's config and data before any run
starts, trains, evaluates and samples each (skipping what is done, resuming what was killed), then writes
DIR/report.html, report.md and report.json. The study file is copied to DIR/study.yaml with each arm's digest
(DIR/study.json): a changed study is refused unless --overwrite, which redoes only the changed arms (their old
runs are moved to DIR/replaced/, not deleted). docs/study.md.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time

from contract.errors import PrxError
from study import execute, report
from study.plan import Run, check_runs, plan
from study.spec import Study, StudyError, load

RECORD = "study.json"


def _record(out: str) -> dict | None:
    path = os.path.join(out, RECORD)
    if not os.path.isfile(path):
        return None
    with open(path) as fh:
        return json.load(fh)


def _changed_arms(study: Study, out: str, overwrite: bool) -> list[str]:
    """Arms whose digest differs from DIR/study.json's; refused unless --overwrite."""
    old = _record(out)
    if old is None:
        return []
    digests = {a.name: a.digest(study) for a in study.arms}
    changed = sorted(n for n, d in digests.items() if n in old["arms"] and old["arms"][n] != d)
    if changed and not overwrite:
        raise StudyError(f"{out} holds a study whose arm(s) {changed} were set up differently (overlay, shards, "
                         "train or eval options): pass --overwrite to redo those arms (their runs move to "
                         f"{out}/replaced/), or choose another --out")
    return changed


def _set_aside(out: str, runs: list[Run], arms: list[str]) -> None:
    dest = os.path.join(out, "replaced", time.strftime("%Y%m%d-%H%M%S"))
    for r in runs:
        if r.arm.name in arms:
            for path in (r.dir, r.dir + ".log", execute.samples_dir(r)):
                if os.path.exists(path):
                    os.makedirs(dest, exist_ok=True)
                    shutil.move(path, os.path.join(dest, os.path.basename(path)))


def _write_record(study: Study, out: str) -> None:
    shutil.copyfile(study.path, os.path.join(out, "study.yaml.tmp"))
    os.replace(os.path.join(out, "study.yaml.tmp"), os.path.join(out, "study.yaml"))
    doc = {"study": study.path, "arms": {a.name: a.digest(study) for a in study.arms}}
    with open(os.path.join(out, RECORD + ".tmp"), "w") as fh:
        json.dump(doc, fh, indent=2)
    os.replace(os.path.join(out, RECORD + ".tmp"), os.path.join(out, RECORD))


def cmd_run(args) -> int:
    from contract.lock import exclusive

    study = load(args.study)
    out = os.path.abspath(args.out)
    with exclusive(out, "prx-study run"):
        runs = plan(study, out)
        changed = _changed_arms(study, out, args.overwrite)
        check_runs(study, runs)
        _set_aside(out, runs, changed)
        _write_record(study, out)
        todo = [r for r in runs if not execute.done(study, r)]
        print(f"prx-study: {len(runs)} runs, {len(runs) - len(todo)} done, {len(todo)} to do", flush=True)
        if todo:
            executor = execute.Local(args.gpus_per_run) if args.executor == "local" else \
                execute.Slurm(args.slurm_partition, args.slurm_gpus_per_node, args.slurm_time, args.slurm_cluster)
            executor.run(study, todo, progress=lambda m: print(f"prx-study: {m}", flush=True))
        report.write(study, runs, out)
    print(f"prx-study: report {os.path.join(out, 'report.html')}")
    return 0


def _study_of(out: str) -> tuple[Study, list[Run]]:
    record = _record(out)
    if record is None:
        raise StudyError(f"{out}: not a study folder (no {RECORD}); run `prx-study run STUDY --out {out}` first")
    study = load(os.path.join(out, "study.yaml")) if not os.path.isfile(record["study"]) else load(record["study"])
    return study, plan(study, out)


def cmd_status(args) -> int:
    study, runs = _study_of(os.path.abspath(args.dir))
    for r in runs:
        values = report.run_values(study, r)
        last = max(values["metrics"], default=None)
        ckpts = os.path.join(r.dir, "checkpoints")
        step = max((int(n.split("-")[1]) for n in os.listdir(ckpts) if n.startswith("step-")), default=0) \
            if os.path.isdir(ckpts) else 0
        shown = "" if last is None else " ".join(f"{k}={v:.4g}" for v in [values["metrics"][last]]
                                                 for c in v for k, v in v[c].items())
        print(f"{r.name:28s} {execute.state(study, r):22s} step {step}/{study.steps}  "
              f"{('eval@' + str(last) + ' ' + shown) if last else ''}  log {r.dir}.log")
    return 0


def cmd_report(args) -> int:
    out = os.path.abspath(args.dir)
    study, runs = _study_of(out)
    report.write(study, runs, out)
    print(report.markdown(report.table(study, runs)))
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="prx-study", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__.split("\n\n", 1)[1])
    sub = p.add_subparsers(dest="command", required=True)
    r = sub.add_parser("run", help="plan, train, evaluate and report (resumable)")
    r.add_argument("study", help="study file, e.g. manifests/studies/demo.yaml")
    r.add_argument("--out", required=True, help="study folder: runs/, logs, report.*")
    r.add_argument("--executor", choices=["local", "slurm"], default="local")
    r.add_argument("--gpus-per-run", type=int, default=1, help="GPUs per run (several runs at once if fewer than "
                                                               "the GPUs present; torchrun when > 1)")
    r.add_argument("--overwrite", action="store_true", help="redo the arms whose setup changed")
    r.add_argument("--slurm-partition", help="Slurm partition")
    r.add_argument("--slurm-gpus-per-node", type=int, default=1, help="GPUs per job")
    r.add_argument("--slurm-time", type=int, default=24 * 60, help="job time limit, minutes")
    r.add_argument("--slurm-cluster", default=None, help=argparse.SUPPRESS)  # "local": submitit's local executor
    s = sub.add_parser("status", help="each run's state, step, last metrics and log")
    s.add_argument("dir")
    rep = sub.add_parser("report", help="rebuild DIR/report.html, report.md, report.json from the runs' files")
    rep.add_argument("dir")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return {"run": cmd_run, "status": cmd_status, "report": cmd_report}[args.command](args)
    except PrxError as exc:
        print(f"prx-study: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted; rerun the same command to resume", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
