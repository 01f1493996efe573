"""Running a study's runs, and knowing which are done (from the runs' own files, so a killed driver resumes).

One run's work (`work`): train with prx-train (resumed with `--resume` when it has a checkpoint), evaluate every
shared step not yet evaluated with prx-eval, and, for the first seed of each arm, sample the study's fixed
prompts with prx-sample at the last step. Each is a subprocess whose output goes to DIR/runs/ARM-seedS.log.

Executors:
- `local`: one run after another; with --gpus-per-run G smaller than the GPUs present, several at once, each on
  its own GPUs (CUDA_VISIBLE_DEVICES), and torchrun when G > 1.
- `slurm`: one submitit job per run (`--slurm-partition`, `--slurm-gpus-per-node`, `--slurm-time`); a
  preempted job is requeued and resumes with prx-train --resume. `cluster="local"` runs the same jobs as
  local subprocesses through submitit's local executor (how the tests drive it).
"""
from __future__ import annotations

import os
import queue
import subprocess
import sys
import threading
from dataclasses import dataclass

from study.plan import Run, eval_argv, write_train_config
from study.spec import Study, StudyError

SAMPLES = "samples"          # DIR/runs/ARM-seedS-samples/: the fixed prompts at the last step (grid.png)


# ------------------------------------------------------------------------------------------- state
def checkpoint_dir(run: Run, step: int) -> str:
    return os.path.join(run.dir, "checkpoints", f"step-{step:08d}")


def metrics_path(run: Run, step: int) -> str:
    return os.path.join(run.dir, "eval", f"step-{step:08d}", "metrics.json")


def samples_dir(run: Run) -> str:
    return f"{run.dir}-{SAMPLES}"


def trained(study: Study, run: Run) -> bool:
    return os.path.isfile(os.path.join(checkpoint_dir(run, study.steps), "state.json")) and \
        os.path.isfile(os.path.join(run.dir, "summary.json"))


def evaluated(study: Study, run: Run, step: int) -> bool:
    import json

    path = metrics_path(run, step)
    if not os.path.isfile(path):
        return False
    with open(path) as fh:
        doc = json.load(fh)
    wanted = {float(c) for c in _as_list(study.eval.get("cfg", [3.5]))}
    return wanted <= {float(r["cfg"]) for r in doc.get("results", [])}


def sampled(study: Study, run: Run) -> bool:
    return not wants_samples(study, run) or os.path.isfile(os.path.join(samples_dir(run), "grid.png"))


def wants_samples(study: Study, run: Run) -> bool:
    return bool(study.prompts) and run.seed == run.arm.seeds[0]


def done(study: Study, run: Run) -> bool:
    return trained(study, run) and all(evaluated(study, run, s) for s in study.eval_steps()) and sampled(study, run)


def state(study: Study, run: Run) -> str:
    if done(study, run):
        return "done"
    if trained(study, run):
        return "evaluating"
    if os.path.isdir(os.path.join(run.dir, "checkpoints")) and os.listdir(os.path.join(run.dir, "checkpoints")):
        return "training (resumable)"
    return "started" if os.path.isdir(run.dir) else "planned"


def _as_list(value) -> list:
    return value if isinstance(value, (list, tuple)) else [value]


# ------------------------------------------------------------------------------------------- one run's work
def _call(argv: list[str], log: str, env: dict | None = None) -> None:
    with open(log, "a") as fh:
        fh.write("$ " + " ".join(argv) + "\n")
        fh.flush()
        rc = subprocess.call(argv, stdout=fh, stderr=subprocess.STDOUT, env=env)
    if rc != 0:
        raise StudyError(f"{' '.join(argv[:3])} ... exited {rc}; its output is in {log}")


def train_argv(study: Study, run: Run, gpus: int = 1) -> list[str]:
    head = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={gpus}", "-m", "trainer.cli"] \
        if gpus > 1 else [sys.executable, "-m", "trainer.cli"]
    if os.path.isdir(os.path.join(run.dir, "checkpoints")) and os.listdir(os.path.join(run.dir, "checkpoints")):
        return head + ["--resume", run.dir]
    return head + ["--config", write_train_config(study, run), "--out", run.dir]


def work(study: Study, run: Run, gpus: int = 1, env: dict | None = None) -> None:
    """Bring one run to done: train (or resume), evaluate the missing steps, sample the prompts."""
    log = run.dir + ".log"
    os.makedirs(os.path.dirname(log), exist_ok=True)
    if not trained(study, run):
        _call(train_argv(study, run, gpus), log, env)
    for step in study.eval_steps():
        if not evaluated(study, run, step):
            _call([sys.executable, "-m", "trainer.evaluate", *eval_argv(study, run, step)], log, env)
    if not sampled(study, run):
        prompts = os.path.join(os.path.dirname(run.dir), "prompts.txt")
        with open(prompts, "w") as fh:
            fh.write("\n".join(study.prompts) + "\n")
        steps = str(study.eval.get("steps", 50))
        cfg = str(_as_list(study.eval.get("cfg", [3.5]))[0])
        _call([sys.executable, "-m", "trainer.sample", "--run", run.dir, "--prompts", prompts, "--steps", steps,
               "--cfg", cfg, "--out", samples_dir(run)], log, env)


# ------------------------------------------------------------------------------------------- executors
@dataclass
class Local:
    gpus_per_run: int = 1

    def groups(self) -> list[str | None]:
        """CUDA_VISIBLE_DEVICES per concurrent slot (None: one slot, the environment as it is)."""
        try:
            import torch

            count = torch.cuda.device_count()
        except ImportError:
            count = 0
        if count <= self.gpus_per_run:
            return [None]
        ids = list(range(count))
        return [",".join(map(str, ids[i:i + self.gpus_per_run]))
                for i in range(0, count - self.gpus_per_run + 1, self.gpus_per_run)]

    def run(self, study: Study, runs: list[Run], progress=print) -> None:
        todo: queue.Queue = queue.Queue()
        for r in runs:
            todo.put(r)
        errors: list[Exception] = []

        def slot(devices: str | None) -> None:
            env = None if devices is None else {**os.environ, "CUDA_VISIBLE_DEVICES": devices}
            while not errors:
                try:
                    r = todo.get_nowait()
                except queue.Empty:
                    return
                progress(f"{r.name}: {state(study, r)} -> working" + (f" on GPUs {devices}" if devices else ""))
                try:
                    work(study, r, self.gpus_per_run, env)
                except Exception as exc:  # noqa: BLE001 - reported once below, the other slots stop
                    errors.append(exc)
                    return
                progress(f"{r.name}: done")

        threads = [threading.Thread(target=slot, args=(g,)) for g in self.groups()]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        if errors:
            raise errors[0]


class Job:
    """A submitit job: one run's `work`; requeued on preemption (submitit's Checkpointable), resuming."""

    def __init__(self, study_path: str, out: str, name: str, gpus: int):
        self.study_path, self.out, self.name, self.gpus = study_path, out, name, gpus

    def __call__(self) -> str:
        from study.plan import plan
        from study.spec import load

        study = load(self.study_path)
        run = next(r for r in plan(study, self.out) if r.name == self.name)
        work(study, run, self.gpus)
        return self.name

    def checkpoint(self, *args, **kwargs):
        import submitit

        return submitit.helpers.DelayedSubmission(Job(self.study_path, self.out, self.name, self.gpus))


@dataclass
class Slurm:
    partition: str | None = None
    gpus_per_node: int = 1
    time_min: int = 24 * 60
    cluster: str | None = None           # None: submitit picks (slurm); "local": its local executor

    def run(self, study: Study, runs: list[Run], progress=print) -> None:
        try:
            import submitit
        except ImportError as exc:
            raise StudyError(f"--executor slurm needs submitit ({exc}): pip install -e '.[study]'") from None
        folder = os.path.join(os.path.dirname(os.path.dirname(runs[0].dir)), "slurm", "%j")
        ex = submitit.AutoExecutor(folder=folder, cluster=self.cluster)
        params = {"timeout_min": self.time_min}
        if self.cluster != "local":
            params.update(slurm_partition=self.partition, gpus_per_node=self.gpus_per_node,
                          tasks_per_node=1, slurm_additional_parameters={"requeue": True})
        ex.update_parameters(**{k: v for k, v in params.items() if v is not None})
        out = os.path.dirname(os.path.dirname(runs[0].dir))
        jobs = [(r, ex.submit(Job(study.path, out, r.name, self.gpus_per_node))) for r in runs]
        for r, job in jobs:
            progress(f"{r.name}: job {job.job_id} submitted")
        for r, job in jobs:
            try:
                job.result()
            except Exception as exc:  # noqa: BLE001 - submitit wraps the job's error
                raise StudyError(f"{r.name}: job {job.job_id} failed: {str(exc).strip().splitlines()[-1]}; "
                                 f"log {r.dir}.log") from None
            progress(f"{r.name}: done (job {job.job_id})")
