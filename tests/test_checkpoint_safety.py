"""Damaged checkpoints and misused `--resume`: `prx-train --resume RUN` checks the newest checkpoint against its
checksums.json (and that every file parses), falls back to the newest intact one saying which it skipped and why,
and refuses with one line when none is intact, when --steps is not beyond the run's step, or when another process
holds the run folder. A fine-tune from a damaged parent is one line naming the file.

Data: a synthetic encoded folder (testing/synthetic.py) and the tiny model, so each run takes about a second."""
from __future__ import annotations

import hashlib
import json
import os
import shutil

import pytest

from trainer import checkpoint
from testing.synthetic import write_encoded_folder

SMALL = dict(latent_shape=(4, 4, 4), text_dim=8, tokens={"long": 6, "short": 3})
WEIGHTS = "transformer/diffusion_pytorch_model.safetensors"


def _train(args: list[str]) -> int:
    from trainer.cli import main

    return main(args)


def _args(shards: str) -> list[str]:
    return ["--shards", shards, "--model", "tiny", "--steps", "4", "--batch-size", "4", "--lr", "1e-3",
            "--warmup-steps", "0", "--device", "cpu", "--no-tensorboard", "--loader-workers", "0",
            "--shuffle-buffer", "16", "--log-every", "1", "--checkpoint-every", "2"]


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """A 4-step run with checkpoints at steps 2 and 4 (the pristine copy: tests damage copies of it)."""
    root = tmp_path_factory.mktemp("ckpt-safety")
    shards = write_encoded_folder(str(root / "enc"), 2, 8, source="web", **SMALL)
    assert _train([*_args(shards), "--out", str(root / "run")]) == 0
    return {"run": str(root / "run"), "shards": shards}


@pytest.fixture
def run_dir(finished, tmp_path):
    dest = str(tmp_path / "run")
    shutil.copytree(finished["run"], dest)
    return dest


def step_dir(run: str, step: int) -> str:
    return checkpoint.ckpt_dir(run, step)


def snapshot(folder: str) -> dict[str, str]:
    """Every file under `folder` -> sha256 of its bytes and its mtime."""
    out = {}
    for root, _, names in os.walk(folder):
        for n in names:
            p = os.path.join(root, n)
            with open(p, "rb") as fh:
                out[os.path.relpath(p, folder)] = f"{hashlib.sha256(fh.read()).hexdigest()} {os.stat(p).st_mtime_ns}"
    return out


def truncate(path: str) -> None:
    with open(path, "r+b") as fh:
        fh.truncate(os.path.getsize(path) // 2)


def flip_byte(path: str) -> None:
    """Flip the last byte: tensor data, so the file still parses."""
    with open(path, "r+b") as fh:
        fh.seek(-1, os.SEEK_END)
        b = fh.read(1)
        fh.seek(-1, os.SEEK_END)
        fh.write(bytes([b[0] ^ 0x01]))


def garbage(path: str) -> None:
    with open(path, "wb") as fh:
        fh.write(b"\x00garbage{")


# ------------------------------------------------------------------------------------------- publishing
def test_published_checkpoint_records_every_file(finished):
    ckpt = step_dir(finished["run"], 4)
    doc = json.loads(open(os.path.join(ckpt, checkpoint.CHECKSUMS)).read())
    files = sorted(os.path.relpath(os.path.join(r, n), ckpt) for r, _, ns in os.walk(ckpt) for n in ns)
    assert sorted(doc["sha256"]) == [f for f in files if f != checkpoint.CHECKSUMS]
    assert {WEIGHTS, "optimizer.safetensors", "state.json", "rng-rank0.safetensors"} <= set(doc["sha256"])
    assert checkpoint.problem(ckpt) is None


# ------------------------------------------------------------------------------------------- fallback
@pytest.mark.parametrize("damage, file, why", [
    (truncate, WEIGHTS, "bytes, checksums.json records"),            # a half-written weights file
    (flip_byte, "optimizer.safetensors", "checksum mismatch"),        # parses, but one byte differs
    (garbage, "state.json", "is 9 bytes, checksums.json records"),
    (os.remove, "rng-rank0.safetensors", "is missing"),
    (garbage, "checksums.json", "does not parse"),
])
def test_resume_falls_back_past_a_damaged_checkpoint(finished, run_dir, capsys, damage, file, why):
    """The newest checkpoint damaged: resume says which it skipped and why, sets it aside, resumes from step 2,
    and rewrites step 4 bit-identical to the original."""
    damage(os.path.join(step_dir(run_dir, 4), file))
    capsys.readouterr()
    assert _train(["--resume", run_dir]) == 0
    err = capsys.readouterr().err
    assert f"prx-train: skipped checkpoint {step_dir(run_dir, 4)}: {file} " in err and why in err, err
    assert "damaged-step-00000004" in err
    assert os.path.isdir(os.path.join(run_dir, "checkpoints", "damaged-step-00000004"))
    assert f"resumed from {step_dir(run_dir, 2)} at step 2" in open(os.path.join(run_dir, "train.log")).read()
    original, redone = step_dir(finished["run"], 4), step_dir(run_dir, 4)
    for rel in (WEIGHTS, "optimizer.safetensors", "rng-rank0.safetensors", "loader-rank0.json"):
        assert open(os.path.join(original, rel), "rb").read() == open(os.path.join(redone, rel), "rb").read(), rel


def test_garbage_state_json_without_checksums_is_named(run_dir, capsys):
    """A checkpoint without checksums.json (written before they existed) is still checked by parsing."""
    os.remove(os.path.join(step_dir(run_dir, 4), checkpoint.CHECKSUMS))
    garbage(os.path.join(step_dir(run_dir, 4), "state.json"))
    capsys.readouterr()
    assert _train(["--resume", run_dir]) == 0
    err = capsys.readouterr().err
    assert f"skipped checkpoint {step_dir(run_dir, 4)}: state.json does not parse" in err, err


def test_checkpoint_without_checksums_resumes_with_a_note(run_dir, capsys):
    for step in (2, 4):
        os.remove(os.path.join(step_dir(run_dir, step), checkpoint.CHECKSUMS))
    capsys.readouterr()
    assert _train(["--resume", run_dir, "--steps", "5"]) == 0
    err = capsys.readouterr().err
    assert f"prx-train: note: {step_dir(run_dir, 4)} has no checksums.json" in err and "skipped" not in err, err
    assert checkpoint.has_checksums(step_dir(run_dir, 5))


def test_no_intact_checkpoint_is_one_line_exit_2(run_dir, capsys):
    flip_byte(os.path.join(step_dir(run_dir, 4), WEIGHTS))
    truncate(os.path.join(step_dir(run_dir, 2), "optimizer.safetensors"))
    before = snapshot(run_dir)
    capsys.readouterr()
    assert _train(["--resume", run_dir, "--steps", "6"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"prx-train: error: --resume {run_dir}: no intact checkpoint") and err.count("\n") == 1, err
    assert f"step-00000004: {WEIGHTS} checksum mismatch" in err
    assert "step-00000002: optimizer.safetensors is" in err
    assert snapshot(run_dir) == before  # nothing set aside, nothing written


# ------------------------------------------------------------------------------------------- refusals
@pytest.mark.parametrize("steps", ["2", "4"])
def test_steps_not_beyond_the_run_is_refused_before_writing(run_dir, capsys, steps):
    before = snapshot(run_dir)
    capsys.readouterr()
    assert _train(["--resume", run_dir, "--steps", steps]) == 2
    err = capsys.readouterr().err
    assert err.startswith("prx-train: error:") and err.count("\n") == 1, err
    assert "already at step 4" in err and f"--steps {steps} must be larger" in err
    assert snapshot(run_dir) == before


def test_second_trainer_on_a_held_run_folder_is_refused(finished, run_dir, capsys):
    from contract.lock import exclusive

    before = snapshot(run_dir)
    capsys.readouterr()
    with exclusive(run_dir, "prx-train on the first"):
        assert _train(["--resume", run_dir, "--steps", "6"]) == 2
        err = capsys.readouterr().err
        assert err.startswith(f"prx-train: error: {run_dir} is in use by prx-train on the first (pid {os.getpid()}")
        assert err.count("\n") == 1, err
        assert _train([*_args(finished["shards"]), "--out", os.path.join(os.path.dirname(run_dir), "fresh")]) == 0
    assert snapshot(run_dir) == before
    assert _train(["--resume", run_dir, "--steps", "5"]) == 0  # released: the next run goes ahead
    assert not os.path.exists(os.path.join(run_dir, ".prx.lock"))


def test_fine_tune_from_a_damaged_parent_names_the_file(finished, run_dir, tmp_path, capsys):
    flip_byte(os.path.join(step_dir(run_dir, 4), WEIGHTS))
    capsys.readouterr()
    assert _train([*_args(finished["shards"]), "--init-from", run_dir, "--out", str(tmp_path / "child")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("prx-train: error: --init-from") and err.count("\n") == 1, err
    assert f"{step_dir(run_dir, 4)} is damaged: {WEIGHTS} checksum mismatch" in err


def test_verify_checks_only_the_files_asked_for(run_dir):
    """What prx-sample / prx-export read of a checkpoint: its weights folder."""
    flip_byte(os.path.join(step_dir(run_dir, 4), "optimizer.safetensors"))
    checkpoint.verify(step_dir(run_dir, 4), only=("transformer",))
    truncate(os.path.join(step_dir(run_dir, 4), WEIGHTS))
    os.remove(os.path.join(step_dir(run_dir, 4), checkpoint.CHECKSUMS))
    with pytest.raises(checkpoint.DamagedCheckpoint, match=f"{WEIGHTS} does not parse"):
        checkpoint.verify(step_dir(run_dir, 4), only=("transformer",))


# ------------------------------------------------------------------------------------------- DDP
@pytest.mark.slow  # two torchrun launches: about a minute on two cores
def test_two_ranks_fall_back_together(finished, tmp_path):
    """torchrun, two CPU ranks: a flipped byte in rank 1's RNG file (a file rank 0 never reads) sends both ranks
    back to step 2; the skip is said once, and step 4 is rewritten as it was."""
    import subprocess
    import sys

    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, OMP_NUM_THREADS="1", MASTER_ADDR="127.0.0.1")
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                "-m", "trainer.cli"]
    run = str(tmp_path / "run")

    def launch(args):
        proc = subprocess.run([*torchrun, *args], cwd=repo, env=env, capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stdout + proc.stderr
        return proc.stderr

    launch([*_args(finished["shards"]), "--batch-size", "2", "--out", run])
    victim = os.path.join(step_dir(run, 4), "rng-rank1.safetensors")
    original = open(victim, "rb").read()
    flip_byte(victim)
    err = launch(["--resume", run])
    assert err.count("prx-train: skipped checkpoint") == 1, err
    assert f"{step_dir(run, 4)}: rng-rank1.safetensors checksum mismatch" in err, err
    assert f"resumed from {step_dir(run, 2)} at step 2" in open(os.path.join(run, "train.log")).read()
    assert open(victim, "rb").read() == original


@pytest.mark.parametrize("damage", [truncate, flip_byte])
def test_sample_eval_and_export_name_a_damaged_checkpoint(run_dir, damage):
    """prx-sample, prx-eval and prx-export open a checkpoint through `open_run`: damage is a PrxError naming
    the file (their CLIs print it as one line), never a diffusers traceback or silently loaded weights."""
    from contract.errors import PrxError
    from trainer.sample import open_run

    damage(os.path.join(step_dir(run_dir, 4), "transformer", "diffusion_pytorch_model.safetensors"))
    with pytest.raises(PrxError, match="diffusion_pytorch_model.safetensors"):
        open_run(run=run_dir, weights="raw")
    assert open_run(ckpt=step_dir(run_dir, 2), weights="raw").step == 2
