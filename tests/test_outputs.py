"""Where a run writes: an output is compared with every input by what the filesystem says, not by spelling;
`--overwrite` removes only what a folder's `_stage.json` says its run wrote; every folder a run writes and
every report path gets those checks; one process writes a folder at a time."""
from __future__ import annotations

import json
import os
import random
import subprocess
import sys

import pytest
import yaml

from pipeline.cli import main as prx_data
from contract.lock import LOCK_NAME, exclusive
from test_safety import _snapshot

LOCAL = ["--executor", "local", "--no-progress"]
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _refused(argv, protected, capsys, *needles) -> str:
    before = _snapshot(protected)
    capsys.readouterr()
    assert prx_data(argv) == 2, argv
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and ": error: " in err, err
    for n in needles:
        assert n in err, err
    assert _snapshot(protected) == before, f"{argv}: the input was touched"
    return err


@pytest.fixture(scope="module")
def raw(tmp_path_factory, photos):
    """An ingested shard folder of real photos (2 shards)."""
    from conftest import write_photo_folder

    base = tmp_path_factory.mktemp("outputs")
    write_photo_folder(base / "photos", photos)
    assert prx_data(["ingest", "--in", str(base / "photos"), "--out", str(base / "raw"), *LOCAL,
                     "--shard-size", "4"]) == 0
    return base / "raw"


@pytest.fixture(scope="module")
def bind_mount(raw, tmp_path_factory):
    """raw bind-mounted at another path (None where this machine does not let the test mount)."""
    target = tmp_path_factory.mktemp("bind") / "mnt"
    target.mkdir()
    if subprocess.run(["mount", "--bind", str(raw), str(target)], capture_output=True).returncode != 0:
        yield None
        return
    yield target
    subprocess.run(["umount", str(target)], capture_output=True)


def _spellings(folder, tmp_path, bind) -> list[str]:
    """Ways to name `folder` (or a folder inside it) that are not its plain absolute path."""
    folder = str(folder)
    link = tmp_path / "link"
    if not link.exists():
        link.symlink_to(folder, target_is_directory=True)
    rel = os.path.relpath(folder)
    names = [rel, folder + "/", folder + "/.", f"{os.path.dirname(folder)}/x/../{os.path.basename(folder)}",
             f"file:{folder}", f"file://{folder}", f"local://{folder}", f"simplecache::file://{folder}",
             f"file:{rel}", str(link), f"file://{link}", f"{folder}/new-sub", f"file:{folder}/new-sub/deeper",
             f"{link}/new-sub", os.path.dirname(folder)]
    if bind is not None:
        names += [str(bind), f"file:{bind}", f"{bind}/new-sub"]
    return names


def _stage_argv(stage: str, inp: str, out: str, tiny_model) -> list[str]:
    if stage == "audit":
        return ["audit", inp, "--out", out, *LOCAL, "--language-sample", "1"]
    argv = [stage, "--in", inp, "--out", out, *LOCAL]
    extra = {"ingest": [], "filter": ["--clip-model", "", "--dedup", "exact"],
             "recaption": ["--backend", "fake", "--model", "fake"],
             "encode": ["--vae", tiny_model("tiny-flux-vae"), "--text-encoder", tiny_model("tiny-t5gemma"),
                        "--variants", "original"]}
    return argv + extra[stage]


# ingest's check in make test-fast; every stage's in make test (~3 s a stage)
@pytest.mark.parametrize("stage", ["ingest", *(pytest.param(s, marks=pytest.mark.slow)
                                               for s in ("filter", "recaption", "encode", "audit"))])
def test_no_spelling_of_the_input_as_out_changes_it(stage, raw, tmp_path, capsys, tiny_model, bind_mount):
    """Property: random spellings of the input (relative, `file:` forms, fsspec chains, links, `..`, bind
    mounts, and folders inside or around it) as --out, with --overwrite: exit 2, every input byte unchanged."""
    rng = random.Random(f"outputs-{stage}")
    cwd = os.getcwd()
    os.chdir(os.path.dirname(raw))
    try:
        spellings = _spellings(raw, tmp_path, bind_mount)
        rng.shuffle(spellings)
        for out in spellings:
            argv = _stage_argv(stage, str(raw), out, tiny_model) + ["--overwrite"]
            _refused(argv, raw, capsys)
    finally:
        os.chdir(cwd)


def test_download_out_around_its_url_list_is_refused(tmp_path, capsys):
    urls = tmp_path / "lists" / "urls.txt"
    urls.parent.mkdir()
    urls.write_text("http://127.0.0.1:9/a.jpg\n")
    for out in (f"file:{tmp_path}/lists", f"simplecache::file://{tmp_path}/lists", str(tmp_path)):
        _refused(["download", "--urls", str(urls), "--out", out, *LOCAL, "--overwrite"], urls.parent, capsys)


# ------------------------------------------------------------------------------ what --overwrite removes
def test_user_shards_without_stage_json_are_never_removed(raw, tmp_path, capsys):
    """A folder of the user's own webdataset shards: refused with and without --overwrite, and the refusal
    does not suggest --overwrite."""
    mine = tmp_path / "my-shards"
    mine.mkdir()
    for name in ("000000.tar", "000001.tar", "000000.parquet"):
        (mine / name).write_bytes(os.urandom(1024))
    for extra in ([], ["--overwrite"]):
        err = _refused(["ingest", "--in", str(raw), "--out", str(mine), *LOCAL, *extra], mine, capsys,
                       "no _stage.json", "never deleted")
        assert "--overwrite to" not in err


def test_write_rejected_gets_the_output_checks(raw, tmp_path, capsys):
    """--write-rejected pointed at another prx folder, at the user's tars, or at a folder of another filter
    run: refused, nothing replaced; the same command again resumes."""
    other = tmp_path / "other"
    assert prx_data(["ingest", "--in", str(raw), "--out", str(other), *LOCAL]) == 0
    users = tmp_path / "users"
    users.mkdir()
    (users / "000000.tar").write_bytes(b"mine")
    base = ["filter", "--in", str(raw), *LOCAL, "--clip-model", "", "--dedup", "exact", "--min-side", "400"]
    _refused(base + ["--out", str(tmp_path / "f1"), "--write-rejected", str(other)], other, capsys,
             "holds a run of stage 'ingest'")
    _refused(base + ["--out", str(tmp_path / "f1"), "--write-rejected", str(users)], users, capsys,
             "no _stage.json")
    assert prx_data(base + ["--out", str(tmp_path / "f1"), "--write-rejected", str(tmp_path / "rej")]) == 0
    assert json.loads((tmp_path / "rej" / "_stage.json").read_text())["role"] == "secondary"
    rejected = {k: v for k, v in _snapshot(tmp_path / "rej").items() if k != "_stage.json"}
    # another filter run (other thresholds) may not take over this run's rejected folder
    _refused(base[:-1] + ["300", "--out", str(tmp_path / "f2"), "--write-rejected", str(tmp_path / "rej")],
             tmp_path / "rej", capsys, "written beside")
    assert prx_data(base + ["--out", str(tmp_path / "f1"), "--write-rejected", str(tmp_path / "rej")]) == 0
    assert {k: v for k, v in _snapshot(tmp_path / "rej").items() if k != "_stage.json"} == rejected  # resumed


def test_overwrite_removes_only_the_shards_the_record_lists(raw, tmp_path, capsys):
    """A shard file the recorded run did not write (a user's 000099.tar dropped in) stops --overwrite."""
    out = tmp_path / "i"
    assert prx_data(["ingest", "--in", str(raw), "--out", str(out), *LOCAL]) == 0
    assert json.loads((out / "_stage.json").read_text())["writes"]["shards"] == [0, 1]
    (out / "000099.tar").write_bytes(b"user data")
    _refused(["ingest", "--in", str(raw), "--out", str(out), *LOCAL, "--shard-size", "2", "--overwrite"], out,
             capsys, "000099.tar", "did not write")
    (out / "000099.tar").unlink()
    assert prx_data(["ingest", "--in", str(raw), "--out", str(out), *LOCAL, "--shard-size", "2", "--overwrite"]) == 0


def test_a_failed_start_does_not_block_the_corrected_command(raw, tmp_path, capsys, monkeypatch):
    """A start that fails before any work (a model not in the cache, found out when the worker loads it)
    leaves no record that refuses the corrected command."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    out = tmp_path / "r"
    base = ["recaption", "--in", str(raw), "--out", str(out), *LOCAL]
    assert prx_data(base + ["--model", "Qwen/Qwen2-VL-2B-Instruct"]) == 2
    assert "not in the local Hugging Face cache" in capsys.readouterr().err
    assert prx_data(base + ["--backend", "fake", "--model", "fake"]) == 0


def test_a_model_stage_resumes_only_under_its_executor(raw, tmp_path, capsys, tiny_model):
    argv = _stage_argv("encode", str(raw), str(tmp_path / "e"), tiny_model)
    assert prx_data(argv) == 0
    assert json.loads((tmp_path / "e" / "_stage.json").read_text())["executor"] == "local"
    dask = [a if a != "local" else "dask" for a in argv]
    _refused(dask, tmp_path / "e", capsys, "started with --executor local")


# ------------------------------------------------------------------------------ reports
def test_audit_reports_never_land_on_inputs(raw, tmp_path, capsys):
    link = tmp_path / "raw-link"
    link.symlink_to(raw, target_is_directory=True)
    notes = tmp_path / "notes.json"
    notes.write_text('{"mine": 1}')
    targets = [f"{raw}/000000.parquet", f"{raw}/000000.tar", f"{raw}/_stage.json", f"{link}/000001.parquet",
               f"file:{raw}/new.json", str(raw)]
    for flag in ("--json", "--html"):
        for path in targets:
            _refused(["audit", str(raw), flag, path, *LOCAL], raw, capsys)
        _refused(["audit", str(raw), flag, str(notes), *LOCAL], tmp_path, capsys, "not a report prx wrote")
    # a report prx wrote is replaced by the next one
    for flag, name in (("--json", "a.json"), ("--html", "a.html")):
        for _ in range(2):
            assert prx_data(["audit", str(raw), flag, str(tmp_path / name), *LOCAL, "--language-sample", "1"]) == 0


def test_manifest_write_rejected_on_the_first_input_is_refused(raw, tmp_path, capsys):
    manifest = tmp_path / "m.yaml"
    manifest.write_text(yaml.safe_dump({"name": "m", "stages": [
        {"ingest": {"in": str(raw)}},
        {"filter": {"clip-model": "", "dedup": ["exact"], "write-rejected": f"file:{raw}"}}]}))
    _refused(["run", str(manifest), "--root", str(tmp_path / "run"), *LOCAL], raw, capsys, "stage 2")


# ------------------------------------------------------------------------------ one process per folder
def test_a_second_process_on_the_same_out_is_refused_naming_the_holder(raw, tmp_path, capsys):
    out = tmp_path / "busy"
    with exclusive(str(out), "prx-data ingest (the first)"):
        err = _refused(["ingest", "--in", str(raw), "--out", str(out), *LOCAL, "--overwrite"], out, capsys,
                       "is in use by prx-data ingest (the first)", f"pid {os.getpid()}")
        assert "started 20" in err
    assert not (out / LOCK_NAME).exists()
    assert prx_data(["ingest", "--in", str(raw), "--out", str(out), *LOCAL]) == 0


def test_a_lock_left_by_a_killed_process_is_taken_over(raw, tmp_path, capsys):
    """A process killed while it holds the lock: the kernel released it, the next run takes it and says so."""
    out = tmp_path / "killed"
    code = ("import os, sys, time; sys.path.insert(0, sys.argv[1]); from contract.lock import exclusive\n"
            "with exclusive(sys.argv[2], 'a run that gets killed'):\n"
            "    print('held', flush=True); time.sleep(60)")
    proc = subprocess.Popen([sys.executable, "-c", code, REPO, str(out)], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "held"
    _refused(["ingest", "--in", str(raw), "--out", str(out), *LOCAL], out, capsys, "a run that gets killed")
    proc.kill()
    proc.wait()
    assert prx_data(["ingest", "--in", str(raw), "--out", str(out), *LOCAL]) == 0
    assert "took over the lock" in capsys.readouterr().err


def test_a_full_disk_in_prx_data_run_is_one_line_exit_1(raw, tmp_path, capsys, monkeypatch):
    import errno

    import pipeline.run as run_mod

    def full(step, scheduler):
        raise OSError(errno.ENOSPC, "No space left on device", str(tmp_path / "run" / "01-ingest"))

    monkeypatch.setattr(run_mod, "run_step", full)
    manifest = tmp_path / "m.yaml"
    manifest.write_text(yaml.safe_dump({"name": "m", "stages": [{"ingest": {"in": str(raw)}}]}))
    assert prx_data(["run", str(manifest), "--root", str(tmp_path / "run"), *LOCAL]) == 1
    err = capsys.readouterr().err
    assert "Traceback" not in err and "no space left on device writing" in err, err


def test_inspect_html_never_lands_on_an_input_or_a_foreign_file(raw, tmp_path, capsys):
    notes = tmp_path / "notes.html"
    notes.write_text("<p>my notes</p>")
    for path in (f"{raw}/000000.tar", f"{raw}/grid.html"):
        _refused(["inspect", str(raw), "--html", path], raw, capsys, "input")
    _refused(["inspect", str(raw), "--html", str(notes)], tmp_path, capsys, "not a report prx wrote")
    for _ in range(2):  # its own page is replaced
        assert prx_data(["inspect", str(raw), "--html", str(tmp_path / "grid.html")]) == 0
