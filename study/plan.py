"""A study as runs: DIR/runs/ARM-seedS, each with the prx-train config it trains with (written as
DIR/runs/ARM-seedS.yaml: `base:` the arm's overlay, then the shared and the arm's options, the seed, the shards)
and the steps it is evaluated at.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

from contract.errors import PrxError
from study.spec import Arm, Study, StudyError


@dataclass
class Run:
    arm: Arm
    seed: int
    dir: str                             # DIR/runs/ARM-seedS

    @property
    def name(self) -> str:
        return os.path.basename(self.dir)

    @property
    def config_path(self) -> str:
        return self.dir + ".yaml"


def plan(study: Study, out: str) -> list[Run]:
    return [Run(arm, seed, os.path.join(os.path.abspath(out), "runs", f"{arm.name}-seed{seed}"))
            for arm in study.arms for seed in arm.seeds]


def train_config(study: Study, run: Run) -> dict[str, Any]:
    """The run's prx-train config file: the overlay as base, then what the study sets."""
    cfg = {"base": run.arm.overlay, **study.train, **run.arm.train, "seed": run.seed, "shards": run.arm.shards,
           "mix": None, "checkpoint_every": study.eval_every or study.steps, "keep_checkpoints": 0}
    return cfg


def write_train_config(study: Study, run: Run) -> str:
    import yaml

    os.makedirs(os.path.dirname(run.config_path), exist_ok=True)
    tmp = run.config_path + ".tmp"
    with open(tmp, "w") as fh:
        yaml.safe_dump(train_config(study, run), fh, sort_keys=False)
    os.replace(tmp, run.config_path)
    return run.config_path


def eval_argv(study: Study, run: Run, step: int) -> list[str]:
    """prx-eval's command line for the run at `step` (the study's eval options, every run alike)."""
    from contract.config import flag_for

    argv = ["--run", run.dir, "--checkpoint", str(step), "--no-progress"]
    if "fid" in study.eval.get("metrics", ["fid"]) and "keep_features" not in study.eval:
        argv.append("--keep-features")  # the report's FID bootstrap interval resamples them
    for key, value in study.eval.items():
        if isinstance(value, bool):
            argv.append(flag_for(key) if value else "--no-" + key.replace("_", "-"))
        elif isinstance(value, (list, tuple)):
            argv += [flag_for(key), ",".join(str(v) for v in value)]
        else:
            argv += [flag_for(key), str(value)]
    return argv


def check_runs(study: Study, runs: list[Run]) -> None:
    """Every arm's config and data, checked as prx-train checks them (config values, encoders, captions, what its
    algorithms need), and the eval options as prx-eval checks them: before any run starts."""
    from contract.config import ConfigError, build_config
    from trainer.config import absolute_paths, load_config
    from trainer.evaluate import EvalConfig, build_parser, check_config
    from trainer.train import preflight

    checked = set()
    for run in runs:
        if run.arm.name in checked:
            continue
        checked.add(run.arm.name)
        path = write_train_config(study, run)
        try:
            preflight(absolute_paths(load_config({"config": path})))
        except (ConfigError, PrxError, ValueError, OSError, RuntimeError) as exc:
            raise StudyError(f"arm {run.arm.name}: {exc} (overlay {run.arm.overlay}, shards {run.arm.shards})") \
                from None
    try:
        args = build_parser().parse_args(eval_argv(study, runs[0], study.steps))
        check_config(build_config(EvalConfig, vars(args)))
    except SystemExit:
        raise StudyError(f"eval: an option prx-eval does not know in {sorted(study.eval)}; see prx-eval --help") \
            from None
    except (ConfigError, PrxError, ValueError) as exc:
        raise StudyError(f"eval: {exc}") from None
