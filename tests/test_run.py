"""`prx-data run`: a whole pipeline from a manifest (loopback server, tiny models, local executor).

Counts per stage and a funnel that adds up; a rerun rewrites nothing; a run killed inside a stage and rerun
ends byte-identical to an uninterrupted one; a changed middle stage is refused, and redone with the later
stages only under --overwrite; bad manifests exit 2 before any work, naming the stage and the key.
"""
from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import yaml

from contract import ledger
from contract.shards import list_shards, read_shard
from pipeline.cli import build_parser
from pipeline.cli import main as prx_data
from contract.config import build_config

REPO = Path(__file__).resolve().parent.parent
N_PHOTOS = 7


@pytest.fixture(scope="module")
def served(tmp_path_factory, photos):
    """The photos on a loopback server; a URL list of every photo, one 404 and the first photo's bytes again
    under another URL (9 URLs)."""
    import pyarrow as pa
    from http_server import encode, loopback_server

    folder = tmp_path_factory.mktemp("served")
    with loopback_server() as srv:
        urls, captions, bodies = [], [], []
        for name, arr in sorted(photos.items()):
            bodies.append(encode(arr[::2, ::2], "JPEG", quality=85))
            urls.append(srv.add(f"/{name}.jpg", _jpeg_route(bodies[-1])))
            captions.append(f"a photo of {name}")
        urls += [srv.url("/missing.jpg"), srv.add("/again.jpg", _jpeg_route(bodies[0]))]
        captions += ["gone", "the first photo again"]
        pq.write_table(pa.table({"url": urls, "caption": captions}), folder / "urls.parquet")
        yield folder


def _jpeg_route(body: bytes):
    from http_server import Route

    return Route(body=body, headers={"Content-Type": "image/jpeg"})


def _manifest(folder: Path, tiny_model, **filter_options) -> Path:
    stages = [
        {"download": {"urls": str(folder / "urls.parquet"), "source": "loop", "shard-size": 2,
                      "allow-private-network": True}},
        {"filter": {"clip-model": tiny_model("tiny-clip"), "min-side": 64, "dedup": ["exact"], **filter_options}},
        {"recaption": {"backend": "fake", "model": "fake", "relax-checks": ["language"], "batch-size": 4}},
        {"encode": {"vae": tiny_model("tiny-flux-vae"), "text-encoder": tiny_model("tiny-t5gemma"),
                    "resolution": 64, "variants": ["original", "long"]}},
        {"audit": {"dirs": ["download", "recaption"], "language-sample": 1, "fail-on": "empty.rate > 0.5"}},
    ]
    path = folder / f"manifest-{len(filter_options)}.yaml"
    path.write_text(yaml.safe_dump({"name": "loop", "stages": stages}, sort_keys=False))
    return path


def _run(manifest: Path, root: Path, *extra: str) -> int:
    return prx_data(["run", str(manifest), "--root", str(root), "--executor", "local", "--no-progress", *extra])


def _run_process(manifest: Path, root: Path) -> int:
    """`prx-data run` in a fresh process, as a user runs it (the encode stage's float work then never depends on
    what earlier tests left in this process)."""
    cmd = [sys.executable, "-m", "pipeline.cli", "run", str(manifest), "--root", str(root), "--executor", "local",
           "--no-progress"]
    return subprocess.run(cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL).returncode


def _snapshot(root: Path) -> dict[str, tuple[int, str]]:
    return {str(p.relative_to(root)): (p.stat().st_mtime_ns, hashlib.sha256(p.read_bytes()).hexdigest())
            for p in sorted(root.rglob("*")) if p.is_file()}


def _shard_outputs(root: Path) -> dict[str, object]:
    """Every tar's bytes and every ledger without its timing column, by path under root."""
    out: dict[str, object] = {}
    for p in sorted(root.glob("0*/*")):
        if p.suffix == ".tar":
            out[str(p.relative_to(root))] = hashlib.sha256(p.read_bytes()).hexdigest()
        elif p.suffix == ".parquet" and p.name[0].isdigit():
            out[str(p.relative_to(root))] = ledger.read(str(p)).drop_columns(list(ledger.TIMING_COLUMNS)).to_pylist()
    return out


@pytest.fixture(scope="module")
def whole(served, tiny_model, tmp_path_factory):
    """One uninterrupted run: (manifest, root)."""
    manifest = _manifest(served, tiny_model)
    root = tmp_path_factory.mktemp("whole") / "run"
    assert _run_process(manifest, root) == 0
    return manifest, root


@pytest.mark.slow  # the whole pipeline in a fresh process
def test_counts_funnel_and_a_rerun_rewrites_nothing(whole, capsys):
    manifest, root = whole
    assert sorted(p.name for p in root.iterdir() if p.is_dir()) == [
        "01-download", "02-filter", "03-recaption", "04-encode", "05-audit"]
    doc = json.loads((root / "_run.json").read_text())
    rows = {r["stage"]: r for r in doc["stages"]}
    assert rows["01-download"]["in"] == N_PHOTOS + 2
    assert rows["01-download"]["reasons"] == {"failed:http_404": 1}
    assert rows["02-filter"]["in"] == rows["01-download"]["kept"] == N_PHOTOS + 1
    assert rows["02-filter"]["reasons"] == {"rejected:duplicate_exact": 1}  # the repeat, in another shard
    assert rows["04-encode"]["kept"] == N_PHOTOS and rows["05-audit"]["action"] == "ran"
    assert all(r["seconds"] > 0 and r["samples_per_s"] > 0 for r in doc["stages"])
    f = doc["funnel"]
    assert f["balanced"] and f["inputs"] == N_PHOTOS + 2 and f["kept"] + f["not_kept"] == f["inputs"]
    assert doc["gates"][0]["passed"] and doc["status"] == "complete"
    # every URL has exactly one final outcome: not kept at some stage, or kept at the last one
    finals: dict[str, str] = {}
    for stage in ("01-download", "02-filter", "03-recaption", "04-encode"):
        table = ledger.read_folder(str(root / stage)).to_pylist()
        for r in table:
            if r["outcome"] != ledger.KEPT or stage == "04-encode":
                assert r["input_id"] not in finals, f"{r['input_id']} has two final outcomes"
                finals[r["input_id"]] = r["outcome"]
    assert len(finals) == N_PHOTOS + 2

    before = _snapshot(root)
    capsys.readouterr()
    assert _run(manifest, root) == 0
    assert "nothing to do" in capsys.readouterr().out
    assert _snapshot(root) == before, "a rerun of a complete run rewrote files"


@pytest.mark.slow  # the whole pipeline, killed and run again
def test_killed_inside_a_stage_then_rerun_is_byte_identical(whole, tmp_path):
    manifest, whole_root = whole
    root = tmp_path / "run"
    cmd = [sys.executable, "-m", "pipeline.cli", "run", str(manifest), "--root", str(root), "--executor",
           "local", "--no-progress"]
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while time.time() < deadline and not (root / "04-encode" / "000000.tar").exists() and proc.poll() is None:
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    stage = json.loads((root / "04-encode" / "_stage.json").read_text())
    assert stage["status"] == "running", "the kill should land inside the encode stage"
    assert not (root / "05-audit").exists()

    assert _run_process(manifest, root) == 0
    doc = json.loads((root / "_run.json").read_text())
    assert [r["action"] for r in doc["stages"]] == ["done", "done", "done", "resumed", "ran"]
    assert _shard_outputs(root) == _shard_outputs(whole_root)
    # the figures those bytes hold: the same counts per stage as the uninterrupted run, every photo encoded once
    whole_doc = json.loads((whole_root / "_run.json").read_text())
    counts = {r["stage"]: (r["in"], r["kept"], r["reasons"]) for r in doc["stages"]}
    assert counts == {r["stage"]: (r["in"], r["kept"], r["reasons"]) for r in whole_doc["stages"]}
    assert counts["04-encode"][1] == N_PHOTOS and doc["funnel"] == whole_doc["funnel"]
    encoded_keys = [s.key for p in list_shards(str(root / "04-encode")) for s in read_shard(p)]
    assert len(encoded_keys) == len(set(encoded_keys)) == N_PHOTOS

    # a middle stage's option changes: refused, nothing touched
    changed = _manifest(manifest.parent, _tiny_from(manifest), **{"min-side": 65})
    before = _snapshot(root)
    assert _run(changed, root) == 2
    assert _snapshot(root) == before
    # --overwrite redoes it and the later stages only
    assert _run(changed, root, "--overwrite") == 0
    after = _snapshot(root)
    assert {k: v for k, v in after.items() if k.startswith("01-")} == \
        {k: v for k, v in before.items() if k.startswith("01-")}
    for stage in ("02-filter", "03-recaption", "04-encode", "05-audit"):
        old = before[f"{stage}/_stage.json"][0]
        assert after[f"{stage}/_stage.json"][0] > old, f"{stage} was not redone"
    doc = json.loads((root / "_run.json").read_text())
    assert [r["action"] for r in doc["stages"]] == ["done", "redone", "redone", "redone", "redone"]
    assert json.loads((root / "02-filter" / "_stage.json").read_text())["config"]["min_side"] == 65


def _tiny_from(manifest: Path):
    """tiny_model() for a manifest written by _manifest: the folders it already names."""
    data = yaml.safe_load(manifest.read_text())
    paths = {}
    for entry in data["stages"]:
        for value in entry[next(iter(entry))].values():
            if isinstance(value, str) and "tiny-" in value:
                paths[os.path.basename(value)] = value
    return lambda name: paths[name]


@pytest.mark.slow  # needs the whole pipeline's run
def test_dry_run_prints_commands_the_stage_parsers_accept(whole, capsys):
    manifest, root = whole
    capsys.readouterr()
    assert prx_data(["run", str(manifest), "--root", str(root), "--dry-run", "--executor", "local"]) == 0
    out = capsys.readouterr().out
    states = [line for line in out.splitlines() if line.startswith("# ")]
    assert [s.split(":")[1].strip() for s in states] == ["done"] * 5
    commands = [line for line in out.splitlines() if line.startswith("prx-data ")]
    assert len(commands) == 5
    import shlex

    from pipeline.stages.filter import FilterConfig

    args = build_parser().parse_args(shlex.split(commands[1])[1:])
    values = {k: v for k, v in vars(args).items() if not k.startswith("_") and k != "command"}
    stage = json.loads((root / "02-filter" / "_stage.json").read_text())
    assert build_config(FilterConfig, values).min_side == stage["config"]["min_side"] == 64
    assert values["input"] == str(root / "01-download") and values["out"] == str(root / "02-filter")


BAD = [
    ("unknown stage", [{"download": {}}, {"fliter": {}}], [], "stage 2: unknown stage 'fliter'; valid stages: "
                                                              "ingest, download, filter"),
    ("unknown option", [{"download": {}}, {"filter": {"min-sid": 3}}], [],
     "stage 2 (filter): unknown option 'min-sid'; valid: "),
    ("bad value", [{"download": {}}, {"filter": {"min-side": "big"}}], [], "stage 2 (filter): "),
    ("out of order", [{"download": {}}, {"recaption": {}}, {"filter": {}}], [], "stage 3 (filter) is out of order"),
    ("no ingest or download first", [{"filter": {}}, {"encode": {}}], [], "stage 1 is 'filter'; a pipeline "
                                                                          "starts with ingest or download"),
    ("missing input folder", [{"ingest": {"in": "/nonexistent/photos"}}], [],
     "stage 1 (ingest): input /nonexistent/photos does not exist"),
    ("folder set by the run", [{"download": {}}, {"filter": {"out": "x"}}], [], "stage 2 (filter): option(s) out "
                                                                                "are set by prx-data run"),
    ("--from not in it", [{"download": {}}, {"filter": {}}], ["--from", "encode"],
     "--from 'encode' is not a stage of this manifest; give one of: 01-download, 02-filter"),
    ("--until not in it", [{"download": {}}], ["--until", "audit"], "--until 'audit' is not a stage"),
    ("bad gate", [{"download": {}}, {"audit": {"fail-on": "words.median <"}}], [], "stage 2 (audit): fail-on: "),
]


@pytest.mark.parametrize("stages,flags,message", [b[1:] for b in BAD], ids=[b[0] for b in BAD])
def test_bad_manifest_exits_2_before_any_work(tmp_path, served, capsys, stages, flags, message):
    for entry in stages:
        if "download" in entry:
            entry["download"] = {"urls": str(served / "urls.parquet"), **entry["download"]}
    manifest = tmp_path / "bad.yaml"
    manifest.write_text(yaml.safe_dump({"name": "bad", "stages": stages}, sort_keys=False))
    root = tmp_path / "root"
    capsys.readouterr()
    assert prx_data(["run", str(manifest), "--root", str(root), "--executor", "local", *flags]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("prx-data run: error: ") and len(err.splitlines()) == 1, err
    assert message in err, err
    assert not root.exists(), "a bad manifest must stop before any work"


def test_encode_fans_out_into_several_latent_spaces_from_one_input(tmp_path, monkeypatch):
    """manifests/pipelines/example-latent-spaces.yaml: the encodes side by side all read 03-recaption; any other
    stage repeated, or a stage after the fan-out, is out of order."""
    import pandas as pd

    from pipeline.run import ManifestError, RunConfig, build_steps

    monkeypatch.chdir(tmp_path)
    pd.DataFrame({"url": ["http://127.0.0.1:1/a.jpg"], "TEXT": ["a cat"]}).to_parquet("laion-part.parquet")
    manifest = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "manifests", "pipelines",
                            "example-latent-spaces.yaml")
    steps = build_steps(manifest, str(tmp_path / "root"), RunConfig(executor="local"))
    encodes = [s for s in steps if s.name == "encode"]
    assert [s.label for s in encodes] == ["04-encode", "05-encode", "06-encode", "07-encode"]
    assert {s.cfg.input for s in encodes} == {str(tmp_path / "root" / "03-recaption")}
    assert [s.cfg.vae for s in encodes] == ["flux1", "flux2", "dc-ae", "none"]
    for stages in ([{"download": {}}, {"filter": {}}, {"filter": {}}], [{"download": {}}, {"encode": {}}, {"filter": {}}]):
        path = tmp_path / "bad.yaml"
        stages[0]["download"] = {"urls": "laion-part.parquet"}
        path.write_text(yaml.safe_dump({"name": "bad", "stages": stages}))
        with pytest.raises(ManifestError, match=r"stage 3 \(filter\) is out of order"):
            build_steps(str(path), str(tmp_path / "r2"), RunConfig(executor="local"))


@pytest.mark.parametrize("processes, daemon", [(0, True), (2, False)])
def test_the_runs_cluster_has_non_daemonic_workers_when_a_stage_asks_for_prepare_processes(tmp_path, monkeypatch,
                                                                                         processes, daemon):
    """A daemonic Dask worker cannot start processes: the run's one local cluster is started without the daemon
    flag when any stage sets prepare-processes, and with it (Dask's default) otherwise."""
    import pipeline.runner
    from pipeline.run import RunConfig, _start_cluster, build_steps

    (tmp_path / "photos").mkdir()
    path = tmp_path / "m.yaml"
    path.write_text(yaml.safe_dump({"name": "m", "stages": [
        {"ingest": {"in": str(tmp_path / "photos")}},
        {"encode": {"vae": "none", "prepare-processes": processes}}]}))
    started = {}

    class Cluster:
        scheduler_address = "tcp://here"

    def start(workers, uses_gpus, daemon=True):
        started["daemon"] = daemon
        return Cluster()

    monkeypatch.setattr(pipeline.runner, "start_local_cluster", start)
    steps = build_steps(str(path), str(tmp_path / "root"), RunConfig())
    assert _start_cluster(RunConfig(), steps)[0] == "tcp://here"
    assert started == {"daemon": daemon}
