"""The stage runner: kill/resume gives byte-identical output, the config-hash rule, Dask = local, S3 paths."""
from __future__ import annotations

import filecmp
import json
import os
import signal
import subprocess
import sys
import time
from types import SimpleNamespace

import numpy as np
import pytest
from PIL import Image

from contract import ledger
from pipeline.cli import main as prx_data
from contract.shards import list_shards, read_shard
from pipeline.stage import Task


def _generated_images(folder, n: int, seed: int = 0):
    """n distinct small PNGs with captions (fast to write and decode)."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i in range(n):
        arr = rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)
        Image.fromarray(arr).save(folder / f"{i:05d}.png", compress_level=1)
        (folder / f"{i:05d}.txt").write_text(f"generated image {i}")
    return folder


def _ledger_without_timing(folder):
    table = ledger.read_folder(str(folder))
    return table.drop_columns(list(ledger.TIMING_COLUMNS)).to_pylist()


def _ingest_cmd(src, out, *extra):
    return [sys.executable, "-m", "pipeline.cli", "ingest", "--in", str(src), "--out", str(out),
            "--executor", "local", "--shard-size", "50", "--no-progress", *extra]


@pytest.mark.slow  # two ingest processes of 1,000 images, one killed
def test_sigkill_and_resume_is_byte_identical(tmp_path):
    """1,000 images in 20 shards of 50, killed with SIGKILL part-way (whatever shard it is writing then), rerun:
    the finished shards are resumed, the rest written, and every tar and ledger equals an uninterrupted run's."""
    src = _generated_images(tmp_path / "gen", 1_000)
    whole, resumed = tmp_path / "whole", tmp_path / "resumed"
    subprocess.run(_ingest_cmd(src, whole), check=True, capture_output=True)

    proc = subprocess.Popen(_ingest_cmd(src, resumed), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while time.time() < deadline and len(list(resumed.glob("*.tar"))) < 2 and proc.poll() is None:
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    n_before = len(list(resumed.glob("*.tar")))
    assert 2 <= n_before < 20, "the kill should land part-way through the 20 shards"
    assert json.loads((resumed / "_stage.json").read_text())["status"] == "running"

    done = subprocess.run(_ingest_cmd(src, resumed), check=True, capture_output=True, text=True)
    resumed_count = json.loads((resumed / "_stage.json").read_text())["counts"]["shards_resumed"]
    assert resumed_count == n_before, done.stdout

    tars_whole = sorted(p.name for p in whole.glob("*.tar"))
    assert tars_whole == sorted(p.name for p in resumed.glob("*.tar")) and len(tars_whole) == 20
    for name in tars_whole:
        assert filecmp.cmp(whole / name, resumed / name, shallow=False), name
    assert _ledger_without_timing(whole) == _ledger_without_timing(resumed)
    assert not [p for p in resumed.iterdir() if ".tmp" in p.name], "no half-written files left"

    keys = [s.key for p in list_shards(str(resumed)) for s in read_shard(p)]
    assert len(keys) == 1_000 and len(set(keys)) == 1_000
    stage = json.loads((resumed / "_stage.json").read_text())
    assert stage["status"] == "complete" and stage["counts"]["kept"] == 1_000


def test_config_hash_rule(tmp_path, photo_folder):
    out = tmp_path / "raw"
    base = ["ingest", "--in", str(photo_folder), "--out", str(out), "--executor", "local", "--no-progress"]
    assert prx_data(base) == 0
    first = json.loads((out / "_stage.json").read_text())
    # same config (runtime flags may differ): resumes, nothing redone
    assert prx_data(base + ["--workers", "3"]) == 0
    assert json.loads((out / "_stage.json").read_text())["counts"]["shards_resumed"] == 1
    # another config: refused, folder untouched
    assert prx_data(base + ["--shard-size", "2"]) == 2
    assert json.loads((out / "_stage.json").read_text())["config_hash"] == first["config_hash"]
    # --overwrite replaces it
    assert prx_data(base + ["--shard-size", "2", "--overwrite"]) == 0
    n = len(list(photo_folder.glob("*.jpg")))
    assert len(list(out.glob("*.tar"))) == (n + 1) // 2


def test_yaml_config_and_cli_override(tmp_path, photo_folder):
    cfg = tmp_path / "ingest.yaml"
    cfg.write_text(f"in: {photo_folder}\nshard-size: 3\nsource: from-yaml\nexecutor: local\nprogress: false\n")
    out = tmp_path / "raw"
    assert prx_data(["ingest", "--config", str(cfg), "--out", str(out), "--source", "from-cli"]) == 0
    stage = json.loads((out / "_stage.json").read_text())
    assert stage["config"]["shard_size"] == 3 and stage["config"]["source"] == "from-cli"
    assert {s.meta()["source"] for p in list_shards(str(out)) for s in read_shard(p)} == {"from-cli"}
    bad = tmp_path / "bad.yaml"
    bad.write_text("shard_sise: 3\n")
    assert prx_data(["ingest", "--config", str(bad), "--in", str(photo_folder), "--out", str(tmp_path / "x")]) == 2


def test_limit(tmp_path, photo_folder):
    out = tmp_path / "raw"
    assert prx_data(["ingest", "--in", str(photo_folder), "--out", str(out), "--executor", "local",
                     "--limit", "3", "--no-progress"]) == 0
    assert ledger.read_folder(str(out)).num_rows == 3


@pytest.mark.slow  # a Dask cluster of worker processes
def test_dask_executor_matches_local(tmp_path, photo_folder):
    local, dask = tmp_path / "local", tmp_path / "dask"
    common = ["--in", str(photo_folder), "--shard-size", "3", "--no-progress"]
    assert prx_data(["ingest", *common, "--out", str(local), "--executor", "local"]) == 0
    assert prx_data(["ingest", *common, "--out", str(dask), "--executor", "dask", "--workers", "2"]) == 0
    names = sorted(p.name for p in local.glob("*.tar"))
    assert len(names) >= 3
    for name in names:
        assert filecmp.cmp(local / name, dask / name, shallow=False)


def test_ledger_trace_and_inspect(tmp_path, photo_folder, capsys):
    out = tmp_path / "raw"
    assert prx_data(["ingest", "--in", str(photo_folder), "--out", str(out), "--executor", "local",
                     "--no-progress"]) == 0
    key = next(read_shard(list_shards(str(out))[0])).key
    capsys.readouterr()
    assert prx_data(["ledger", str(out), "--key", key, "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [(r["stage"], r["outcome"]) for r in rows] == [("ingest", "kept")]
    assert prx_data(["ledger", str(out), "--key", "0" * 32]) == 1
    assert "no ledger rows" in capsys.readouterr().out
    html = tmp_path / "grid.html"
    assert prx_data(["inspect", str(out), "--json", "--html", str(html)]) == 0
    report = json.loads(capsys.readouterr().out.split("\nwrote")[0])
    n = len(list(photo_folder.glob("*.jpg")))
    assert report["samples"] == n and report["outcomes"] == {"kept": n}
    page = html.read_text()
    assert page.count("<img src=\"data:image/jpeg;base64,") == n and "a photo of astronaut" in page


@pytest.fixture
def s3_server():
    """A moto S3 server on loopback."""
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0)
    server.start()
    host, port = server.get_host_and_port()
    env = {"AWS_ACCESS_KEY_ID": "test", "AWS_SECRET_ACCESS_KEY": "test", "AWS_DEFAULT_REGION": "us-east-1",
           "AWS_ENDPOINT_URL": f"http://{host}:{port}"}
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    import boto3
    import fsspec.config

    fsspec.config.conf["s3"] = {"endpoint_url": env["AWS_ENDPOINT_URL"]}
    boto3.client("s3", endpoint_url=env["AWS_ENDPOINT_URL"]).create_bucket(Bucket="prx")
    yield env["AWS_ENDPOINT_URL"]
    fsspec.config.conf.pop("s3", None)
    for k, v in old.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v
    server.stop()


@pytest.mark.slow  # a moto S3 server, three ingests
def test_s3_input_and_output(tmp_path, photo_folder, s3_server):
    import fsspec

    fs = fsspec.filesystem("s3", skip_instance_cache=True)
    for p in sorted(photo_folder.iterdir()):
        fs.put_file(str(p), f"prx/photos/{p.name}")
    out = "s3://prx/raw"
    args = ["ingest", "--in", "s3://prx/photos", "--out", out, "--executor", "local", "--shard-size", "4",
            "--no-progress"]
    assert prx_data(args) == 0
    n = len(list(photo_folder.glob("*.jpg")))
    shards = list_shards(out)
    assert shards and all(p.startswith("s3://") for p in shards)
    assert sum(1 for p in shards for _ in read_shard(p)) == n
    assert ledger.read_folder(out).num_rows == n
    # rerun resumes from S3 state; output equals a local run's bytes
    assert prx_data(args) == 0
    local = tmp_path / "local"
    assert prx_data(["ingest", "--in", str(photo_folder), "--out", str(local), "--executor", "local",
                     "--shard-size", "4", "--no-progress", "--source", "photos"]) == 0
    for p in shards:  # the same samples, input ids and source name: the same bytes
        assert fs.cat_file(p) == (local / os.path.basename(p)).read_bytes()
    assert json.loads(fs.cat_file("prx/raw/_stage.json"))["status"] == "complete"


def _echo(stage_cls, cfg, task, arg):
    return task.index, task.inputs[0], arg, cfg


def test_existing_cluster_by_address_and_gpu_resource(tmp_path, photo_folder):
    """--scheduler uses a running cluster; model tasks ask for GPU only where workers advertise it."""
    from distributed import LocalCluster

    from pipeline.runner import DaskExecutor

    loopback = {"n_workers": 1, "threads_per_worker": 1, "processes": False, "dashboard_address": None,
                "host": "127.0.0.1", "protocol": "tcp"}
    with LocalCluster(**loopback, resources={"GPU": 1}) as gpu_cluster:
        ex = DaskExecutor(gpu_cluster.scheduler_address, None, uses_model=True)
        assert ex.resources == {"GPU": 1}
        ex.close()
        ex = DaskExecutor(gpu_cluster.scheduler_address, None, uses_model=False)
        assert ex.resources == {}
        ex.close()
    with LocalCluster(**loopback) as cpu_cluster:
        ex = DaskExecutor(cpu_cluster.scheduler_address, None, uses_model=True)
        assert ex.resources == {}, "asking for GPU on a cluster without it would hang forever"
        stage = SimpleNamespace(name="t", cfg={"k": 1})
        for batch in (1, 3, 20):   # several tasks per Dask task; each map its own keys (not the last run's results)
            got = list(ex.map(_echo, stage, [Task(i, [f"s{i}"]) for i in range(10)], "x", batch=batch))
            assert sorted(got) == [(i, f"s{i}", "x", {"k": 1}) for i in range(10)], batch
        ex.close()
        out = tmp_path / "raw"
        assert prx_data(["ingest", "--in", str(photo_folder), "--out", str(out), "--scheduler",
                         cpu_cluster.scheduler_address, "--no-progress"]) == 0
        assert json.loads((out / "_stage.json").read_text())["counts"]["kept"] == len(list(photo_folder.glob("*.jpg")))


def test_local_cluster_starts_with_quiet_diagnostics_unless_the_user_set_them():
    """A local cluster's workers run without Dask's statistical profiler and with a slow event-loop tick
    (they cost ~9% of a 2-core machine); a value the user set in Dask's config is kept."""
    import dask
    from distributed import Client

    from pipeline.runner import start_local_cluster

    def settings():
        return (dask.config.get("distributed.worker.profile.enabled"),
                dask.config.get("distributed.admin.tick.interval"),
                dask.config.get("distributed.admin.system-monitor.interval"))

    with dask.config.set({"distributed.admin.tick.interval": "40ms"}):   # as DASK_DISTRIBUTED__ADMIN__TICK__...
        cluster = start_local_cluster(1, uses_gpus=False)
        try:
            with Client(cluster) as client:
                got = list(client.run(settings).values())
        finally:
            cluster.close()
    assert got == [(False, "40ms", "2s")]


def test_reading_ledgers_starts_no_arrow_thread_pool(tmp_path):
    """pyarrow 26's thread pools, once started, abort the process at exit about half the time ("terminate called
    without an active exception", exit 134, after the work is done). Every parquet read of the pipeline
    (ledger.read / read_folder, the funnel, fs.read_parquet of a path or of bytes) starts none: in a fresh
    process the thread count is the same before and after them, and a pooled read (pq.read_table) moves it, so
    the count can tell."""
    for i in range(20):
        ledger.write(str(tmp_path / f"{i:06d}.parquet"), [ledger.row(f"k{j}", f"i{j}") for j in range(50)], i, "ingest")
    code = """
import json, os, sys
import pyarrow.parquet as pq
from contract import fs, ledger
from pipeline.audit.funnel import funnel

def threads():
    return len(os.listdir("/proc/self/task"))

d = sys.argv[1]
paths = fs.glob(fs.join(d, "*.parquet"))
before = threads()
rows = len(ledger.read_folder(d)) + len(ledger.read(paths[0]))
rows += sum(r["in"] for r in funnel(d))
for p in paths:
    rows += len(fs.read_parquet(fs.read_bytes(p))) + len(fs.read_parquet(p, columns=["outcome"]))
after = threads()
pq.read_table(paths[0])
pooled = threads()
print(json.dumps({"rows": rows, "before": before, "after": after, "pooled": pooled}), flush=True)
os._exit(0)   # the pooled read above may abort a normal exit
"""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    run = subprocess.run([sys.executable, "-c", code, str(tmp_path)], cwd=root, capture_output=True, text=True,
                         timeout=120)
    assert run.returncode == 0, run.stderr[-2000:]
    got = json.loads(run.stdout.strip().splitlines()[-1])
    assert got["rows"] == 1000 + 50 + 1000 + 2 * 1000, got   # every read saw its rows
    assert got["after"] == got["before"], f"reading ledgers started {got['after'] - got['before']} thread(s)"
    assert got["pooled"] > got["after"], "a pooled read starts threads: the count tells"
