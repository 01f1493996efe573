"""prx-study: the study file's refusals, the verdict rule, and a tiny study end to end: driven through submitit's
local executor and through the local one with its driver SIGKILLed mid-way and rerun, both giving the same
report numbers, no finished run trained twice."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import yaml

from study import report
from study.spec import StudyError, load

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ABLATIONS = os.path.join(REPO, "manifests", "ablations")


def study_file(tmp_path, eval_runs, tiny_model, **changes) -> str:
    doc = {"name": "tiny", "shards": eval_runs["enc"],
           "train": {"model": "tiny", "steps": 2, "batch_size": 2, "warmup_steps": 0, "caption": {"original": 1.0},
                     "vae": eval_runs["vae"], "text_encoder": eval_runs["te"], "log_every": 1, "loader_workers": 0,
                     "tensorboard": False, "device": "cpu"},
           "eval": {"real": eval_runs["enc"], "n": 2, "steps": 2, "cfg": [2.0], "caption": "original",
                    "metrics": ["cmmd"], "clip_model": tiny_model("tiny-clip"),
                    "real_cache": str(tmp_path / "cache"), "device": "cpu"},
           "baseline": {"overlay": os.path.join(REPO, "manifests", "train", "base.yaml"), "seeds": [0, 1]},
           "arms": [{"name": "contrastive", "overlay": os.path.join(ABLATIONS, "contrastive-fm.yaml")}]}
    doc.update(changes)
    path = tmp_path / "study.yaml"
    path.write_text(yaml.safe_dump(doc))
    return str(path)


def test_verdict_rule_on_synthetic_metrics():
    base = report.spread([10.0, 10.4, 9.6])  # mean 10, std 0.4: band [9.2, 10.8]
    assert report.verdict("fid", 10.7, base) == "within noise"
    assert report.verdict("fid", 9.0, base) == "better" and report.verdict("fid", 11.0, base) == "worse"
    assert report.verdict("clip_score", 11.0, base) == "better"  # higher is better
    assert report.verdict("fid", 12.0, report.spread([10.0])) == "no noise estimate"
    wide = report.spread([10.0, 10.0, 10.0, 14.0])  # the band is never narrower than the seeds' min..max
    assert report.verdict("fid", 13.9, wide) == "within noise"


def test_bad_study_files_are_refused_before_any_training(tmp_path, eval_runs, tiny_model):
    from study.cli import main

    def refused(capsys_free_changes, match):
        path = study_file(tmp_path, eval_runs, tiny_model, **capsys_free_changes)
        with pytest.raises(StudyError, match=match):
            from study.plan import check_runs, plan

            study = load(path)
            check_runs(study, plan(study, str(tmp_path / "out")))

    refused({"arms": [{"name": "x", "overlay": "../ablations/nope.yaml"}]}, "overlay ../ablations/nope.yaml not found")
    arm = {"name": "muon", "overlay": os.path.join(ABLATIONS, "muon.yaml")}
    refused({"arms": [arm, arm]}, r"arm name\(s\) \['muon'\] used twice")
    refused({"arms": [{**arm, "real": "elsewhere"}]}, "cannot set its own real set")
    refused({"arms": [{"name": "repa", "overlay": os.path.join(ABLATIONS, "repa-dinov2.yaml")}]},
            "arm repa: .*prx-data encode --repa")
    assert main(["run", str(tmp_path / "missing.yaml"), "--out", str(tmp_path / "o")]) == 2
    assert not (tmp_path / "out" / "runs" / "baseline-seed0").exists()


def _numbers(out) -> list:
    doc = json.loads((out / "report.json").read_text())
    return [(r["arm"], r["metric"], r["value"], r.get("delta"), r["verdict"]) for r in doc["rows"]]


@pytest.mark.slow
def test_study_end_to_end_submitit_and_killed_driver_give_the_same_report(tmp_path, eval_runs, tiny_model):
    from study.cli import main

    path = study_file(tmp_path, eval_runs, tiny_model, arms=[])  # two baseline seeds: the smallest study
    one = tmp_path / "submitit"
    assert main(["run", path, "--out", str(one), "--executor", "slurm", "--slurm-cluster", "local"]) == 0
    rows = json.loads((one / "report.json").read_text())["rows"]
    values = [json.loads((one / "runs" / f"baseline-seed{s}" / "eval" / "step-00000002" / "metrics.json")
                         .read_text())["results"][0]["metrics"]["cmmd"] for s in (0, 1)]
    base = next(r for r in rows if r["arm"] == "baseline" and r["metric"] == "cmmd")
    assert base["value"] == pytest.approx(sum(values) / 2)  # the report's numbers are the runs' own
    assert base["baseline"]["min"] == min(values) and base["baseline"]["max"] == max(values)
    assert "<img" in (one / "report.html").read_text() and "Verdict rule" in (one / "report.md").read_text()

    two = tmp_path / "local"
    driver = subprocess.Popen([sys.executable, "-m", "study.cli", "run", path, "--out", str(two)], cwd=REPO,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    first = two / "runs" / "baseline-seed0" / "eval" / "step-00000002" / "metrics.json"
    deadline = time.time() + 300
    while not first.exists() and driver.poll() is None and time.time() < deadline:
        time.sleep(0.2)
    os.killpg(driver.pid, signal.SIGKILL)  # the driver and the run it is working on
    driver.wait()
    assert first.exists() and not (two / "report.json").exists()
    assert main(["run", path, "--out", str(two)]) == 0
    assert _numbers(two) == _numbers(one)
    log = (two / "runs" / "baseline-seed0.log").read_text()
    assert log.count("trainer.cli") == 1  # the finished run was not trained again
    assert main(["status", str(two)]) == 0


TEMPLATES = {"finetune"}  # overlays that need a parent run: not an arm of a table


def test_shipped_studies_load_and_prx_part2_has_every_overlay_as_an_arm():
    part2 = load(os.path.join(REPO, "manifests", "studies", "prx-part2.yaml"))
    overlays = {f[:-5] for f in os.listdir(ABLATIONS) if f.endswith(".yaml")} - TEMPLATES
    assert {os.path.basename(a.overlay)[:-5] for a in part2.arms[1:]} == overlays
    assert part2.baseline.seeds == [0, 1, 2] and part2.steps == 100000 and part2.eval_steps()[0] == 10000
    demo = load(os.path.join(REPO, "manifests", "studies", "demo.yaml"))
    assert len(demo.arms) == 4 and demo.baseline.seeds == [0, 1] and demo.train["model"] == "tiny"


def test_fid_bootstrap_interval_covers_the_closed_form_between_two_gaussians():
    from study.bootstrap import fid_interval
    rng = np.random.default_rng(3)
    d, n = 4, 2000
    mu = np.array([1.0, 0.5, 0.0, 0.0])
    scale = np.array([1.0, 1.0, 2.0, 1.0])  # generated: N(mu, diag(scale^2)); real: N(0, I)
    real = rng.standard_normal((n, d))
    gen = mu + scale * rng.standard_normal((n, d))
    closed = float(mu @ mu + ((scale - 1.0) ** 2).sum())  # |mu|^2 + tr(I + S - 2 S^1/2) for diagonal S
    low, high = fid_interval(real, gen, resamples=200)
    assert low < closed < high and high - low < 0.5 * closed


def test_report_fid_rows_carry_the_bootstrap_interval_of_the_kept_features(tmp_path):
    """prx-eval --keep-features names its Inception features per result; the report resamples them."""
    import numpy as np
    from safetensors.numpy import save_file

    from study.bootstrap import fid_interval
    from study.plan import plan

    path = tmp_path / "s.yaml"
    path.write_text(yaml.safe_dump({"shards": "x", "train": {"steps": 2}, "eval": {"real": "r", "metrics": ["fid"]},
                                    "baseline": {"overlay": os.path.join(REPO, "manifests", "train", "base.yaml"),
                                                 "seeds": [0, 1]}}))
    study = load(str(path))
    rng = np.random.default_rng(0)
    for i, run in enumerate(plan(study, str(tmp_path / "out"))):
        folder = os.path.join(run.dir, "eval", "step-00000002")
        os.makedirs(folder)
        feats = {"real": rng.normal(size=(40, 4)).astype(np.float32),
                 "generated": rng.normal(0.5 * i, 1, size=(40, 4)).astype(np.float32)}
        save_file(feats, os.path.join(folder, "inception-x-cfg3.5.safetensors"))
        with open(os.path.join(folder, "metrics.json"), "w") as fh:
            json.dump({"results": [{"cfg": 3.5, "metrics": {"fid": 1.0 + i},
                                    "features": "inception-x-cfg3.5.safetensors"}]}, fh)
        if i == 0:
            expected = list(fid_interval(feats["real"], feats["generated"]))
    row = next(r for r in report.table(study, plan(study, str(tmp_path / "out")))["rows"] if r["metric"] == "fid")
    assert row["bootstrap_first_seed"] == expected and row["value"] == 1.5
