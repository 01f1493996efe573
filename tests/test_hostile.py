"""Hostile folder inputs and members, a full disk, a non-model folder as a model, a reader that leaves stdout:
each ends as a ledger row or one line, never a hang, a memory blow-up or a traceback (docs/failures.md)."""
from __future__ import annotations

import errno
import filecmp
import io
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from contract import ledger
from pipeline.cli import main as prx_data
from contract.shards import BadMember, ShardWriter, list_shards, parse_json

REPO = Path(__file__).resolve().parent.parent
LOCAL = ["--executor", "local", "--no-progress"]
MEMORY = 2 << 30   # address space for an ingest subprocess: ~5x what it needs, less than what reading 3 GB takes


def _png(seed: int) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, (16, 16, 3), dtype=np.uint8)).save(buf, "PNG")
    return buf.getvalue()


def _folder(tmp_path: Path) -> Path:
    """A folder with two good images (one with a caption) to put hostile files beside."""
    d = tmp_path / "in"
    d.mkdir()
    (d / "good.png").write_bytes(_png(0))
    (d / "good.txt").write_text("a good image")
    (d / "other.png").write_bytes(_png(1))
    return d


def _limit_memory():
    resource.setrlimit(resource.RLIMIT_AS, (MEMORY, MEMORY))


def _ingest(src: Path, out: Path) -> dict[str, dict]:
    """`prx-data ingest` in a subprocess with bounded memory and time; the ledger rows by input id."""
    cmd = [sys.executable, "-m", "pipeline.cli", "ingest", "--in", str(src), "--out", str(out), *LOCAL]
    start = time.monotonic()
    done = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=60, preexec_fn=_limit_memory)
    assert done.returncode == 0, done.stderr[-2000:]
    assert time.monotonic() - start < 60
    rows = {r["input_id"]: r for r in ledger.read_folder(str(out)).to_pylist()}
    assert rows["good.png"]["outcome"] == "kept" and rows["other.png"]["outcome"] == "kept"
    return rows


# ------------------------------------------------------------------------------------------ folder inputs
LONE = b'{"caption": "\\ud800 half a pair"}'
NOT_UTF8 = b"caf\xe9.png"


@pytest.fixture(scope="module")
def hostile_folder(tmp_path_factory):
    """One folder holding every hostile entry beside the two good images, ingested once by `prx-data ingest` in a
    subprocess with bounded memory and time: (ledger rows by input id, seconds the ingest took)."""
    base = tmp_path_factory.mktemp("hostile")
    src = _folder(base)
    os.mkfifo(src / "pipe.png")                                  # a FIFO as an image
    (src / "fifo-side.png").write_bytes(_png(2))
    os.mkfifo(src / "fifo-side.txt")                             # a FIFO as a caption sidecar
    os.symlink("/dev/zero", src / "zero.png")                    # a link to a device
    outside = base / "elsewhere.png"
    outside.write_bytes(_png(3))
    os.symlink(outside, src / "linked.png")                      # a link to a regular file is read like one
    with open(src / "sparse.png", "wb") as f:                    # 3 GB of nothing: over the image cap
        f.truncate(3 << 30)
    (src / "sparse-side.png").write_bytes(_png(9))
    with open(src / "sparse-side.json", "wb") as f:              # a sidecar over its cap is bad_member, unread
        f.truncate(3 << 30)
    with open(os.path.join(os.fsencode(src), NOT_UTF8), "wb") as f:
        f.write(_png(5))
    (src / "lone.png").write_bytes(_png(8))
    (src / "lone.json").write_bytes(LONE)
    start = time.monotonic()
    rows = _ingest(src, base / "out")
    return rows, time.monotonic() - start


def test_every_hostile_folder_entry_is_one_row(hostile_folder):
    rows, _ = hostile_folder
    assert sorted(rows) == sorted(["good.png", "other.png", "pipe.png", "fifo-side.png", "zero.png", "linked.png",
                                   "sparse.png", "sparse-side.png", "caf\\xe9.png", "lone.png"])


def test_fifo_in_an_input_folder_is_a_row_not_a_hang(hostile_folder):
    rows, _ = hostile_folder
    assert rows["pipe.png"]["reason"] == "not_a_regular_file" and "pipe.png is a FIFO" in rows["pipe.png"]["detail"]


def test_fifo_sidecar_refuses_its_sample(hostile_folder):
    rows, _ = hostile_folder
    assert rows["fifo-side.png"]["reason"] == "not_a_regular_file"
    assert "fifo-side.txt is a FIFO" in rows["fifo-side.png"]["detail"] and rows["fifo-side.png"]["key"]


def test_symlink_to_dev_zero_is_a_row_and_memory_stays_bounded(hostile_folder):
    rows, _ = hostile_folder
    assert rows["zero.png"]["reason"] == "not_a_regular_file"
    assert "a character device" in rows["zero.png"]["detail"]
    assert rows["linked.png"]["outcome"] == "kept"


def test_big_sparse_file_is_refused_by_its_cap_without_reading(hostile_folder):
    rows, seconds = hostile_folder
    assert seconds < 30
    row = rows["sparse.png"]
    assert (row["outcome"], row["reason"]) == ("rejected", "member_too_large")
    assert "3,221,225,472 bytes" in row["detail"] and "--max-member-bytes-image" in row["detail"]
    row = rows["sparse-side.png"]
    assert row["reason"] == "bad_member" and "sparse-side.json: 3,221,225,472 bytes" in row["detail"]


def test_file_name_that_is_not_utf8_is_kept_with_an_escaped_input_id(hostile_folder):
    rows, _ = hostile_folder
    assert rows["caf\\xe9.png"]["outcome"] == "kept"


def test_folder_file_over_its_cap_is_refused(tmp_path):
    src = _folder(tmp_path)
    (src / "big.png").write_bytes(_png(4))
    (src / "big.txt").write_bytes(b"x" * 2000)
    out = tmp_path / "out"
    assert prx_data(["ingest", "--in", str(src), "--out", str(out), *LOCAL, "--max-member-bytes-text", "1000"]) == 0
    rows = {r["input_id"]: r for r in ledger.read_folder(str(out)).to_pylist()}
    assert rows["big.png"]["reason"] == "member_too_large" and "big.txt: 2,000 bytes" in rows["big.png"]["detail"]
    assert rows["good.png"]["outcome"] == "kept"


# ------------------------------------------------------------------------------------------ lone surrogates
def test_parse_json_refuses_a_lone_surrogate_and_keeps_a_pair():
    with pytest.raises(BadMember, match="lone UTF-16 surrogate"):
        parse_json(LONE)
    with pytest.raises(BadMember, match="lone UTF-16 surrogate"):
        parse_json(b'{"\\udc00": 1}')   # in a key too
    assert parse_json(b'{"smile": "\\ud83d\\ude00", "path": "C:\\\\ud800"}') == {"smile": "\U0001F600",
                                                                                   "path": "C:\\ud800"}


def test_lone_surrogate_sidecar_and_member_are_rows_in_ingest_and_filter(hostile_folder, tmp_path):
    rows, _ = hostile_folder
    assert rows["lone.png"]["reason"] == "bad_member" and "surrogate" in rows["lone.png"]["detail"]

    shards = tmp_path / "shards"
    w = ShardWriter(str(shards), 0, "ingest")
    w.write("a" * 32, {"png": _png(6), "json": LONE, "txt": b"x"})
    w.write("b" * 32, {"png": _png(7), "json": b'{"caption": "fine"}', "txt": b"y"})
    w.close()
    out = tmp_path / "out-tar"
    assert prx_data(["ingest", "--in", str(shards), "--out", str(out), *LOCAL]) == 0
    reasons = {r["input_id"]: r["reason"] for r in ledger.read_folder(str(out)).to_pylist()}
    assert reasons == {f"000000.tar:{'a' * 32}": "bad_member", f"000000.tar:{'b' * 32}": ""}

    filtered = tmp_path / "filtered"
    for _ in range(2):   # the rerun resumes into the same folder: no traceback either time
        assert prx_data(["filter", "--in", str(shards), "--out", str(filtered), *LOCAL]) == 0
    reasons = {r["key"]: r["reason"] for r in ledger.read_folder(str(filtered)).to_pylist()}
    assert reasons["a" * 32] == "bad_member" and reasons["b" * 32] != "bad_member" and len(reasons) == 2


# ------------------------------------------------------------------------------------------ full disk
class _FillingFile:
    """A shard temporary on a disk with `disk["left"]` bytes free: a bigger write fails with ENOSPC."""

    def __init__(self, fh, disk: dict):
        self._fh, self._disk = fh, disk

    def write(self, data) -> int:
        if len(data) > self._disk["left"]:
            raise OSError(errno.ENOSPC, "No space left on device")
        self._disk["left"] -= len(data)
        return self._fh.write(data)

    def __getattr__(self, name):
        return getattr(self._fh, name)


def _images(folder: Path, n: int) -> Path:
    folder.mkdir()
    for i in range(n):
        (folder / f"{i:03d}.png").write_bytes(_png(100 + i))
    return folder


def test_disk_full_is_one_line_exit_1_and_the_rerun_resumes_byte_identical(tmp_path, monkeypatch, capsys):
    src = _images(tmp_path / "src", 8)
    whole, out = tmp_path / "whole", tmp_path / "out"
    argv = ["ingest", "--in", str(src), *LOCAL, "--shard-size", "2"]
    assert prx_data(argv + ["--out", str(whole)]) == 0
    sizes = [os.path.getsize(p) for p in list_shards(str(whole))]
    disk = {"left": sizes[0] + sizes[1] + sizes[2] // 2}   # room for two shards and half the third
    real_fdopen = os.fdopen
    monkeypatch.setattr(os, "fdopen", lambda fd, mode="r", *a, **k: (
        _FillingFile(real_fdopen(fd, mode, *a, **k), disk) if "w" in mode else real_fdopen(fd, mode, *a, **k)))
    capsys.readouterr()
    assert prx_data(argv + ["--out", str(out)]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err, err
    assert err.startswith(f"prx-data ingest: error: no space left on device writing {out} (2 shard(s) to go, about ")
    assert "more needed) and rerun the same command to resume" in err
    assert sorted(p.name for p in out.iterdir() if p.suffix == ".tar") == ["000000.tar", "000001.tar"]
    assert not [p for p in out.iterdir() if p.name.endswith(".tmp")]

    monkeypatch.undo()
    assert prx_data(argv + ["--out", str(out)]) == 0
    assert json.loads((out / "_stage.json").read_text())["counts"]["shards_resumed"] == 2
    _assert_same_run(whole, out)


def _assert_same_run(a: Path, b: Path):
    """What a rerun promises (docs/failures.md, Kill and rerun): the same tars byte for byte, and ledgers equal
    in every column but `seconds`."""
    names = sorted(p.name for p in a.glob("*.tar"))
    assert names == sorted(p.name for p in b.glob("*.tar")) and names
    for name in names:
        assert filecmp.cmp(a / name, b / name, shallow=False), name
    assert ledger.TIMING_COLUMNS == ("seconds",)
    ta, tb = ledger.read_folder(str(a)), ledger.read_folder(str(b))
    assert ta.column_names == tb.column_names
    assert ta.drop_columns(["seconds"]).to_pylist() == tb.drop_columns(["seconds"]).to_pylist()


@pytest.mark.slow  # a Dask cluster on a real tmpfs
@pytest.mark.skipif(os.geteuid() != 0, reason="mounting a small tmpfs needs root")
def test_disk_full_under_dask_on_a_real_small_disk(tmp_path):
    src = _images(tmp_path / "src", 8)
    for i, p in enumerate(sorted(src.iterdir())):   # ~0.2 MB each: a 1 MB disk holds two shards of two
        Image.fromarray(np.random.default_rng(i).integers(0, 256, (256, 256, 3), dtype=np.uint8)).save(
            p, "PNG", compress_level=0)
    disk = tmp_path / "disk"
    disk.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(disk)], capture_output=True).returncode:
        pytest.skip("cannot mount a tmpfs here")
    try:
        cmd = [sys.executable, "-m", "pipeline.cli", "ingest", "--in", str(src), "--out", str(disk / "out"),
               "--executor", "dask", "--workers", "1", "--no-progress", "--shard-size", "2"]
        done = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)
        assert done.returncode == 1, done.stderr[-3000:]
        last = done.stderr.strip().splitlines()[-1]   # Dask's worker log may come before it
        assert last.startswith(f"prx-data ingest: error: no space left on device writing {disk / 'out'} ("), last
        assert "shard(s) to go" in last and "more needed" in last   # the OutOfSpace came back through the future
        assert "Traceback (most recent call last)" not in done.stderr
        subprocess.run(["mount", "-o", "remount,size=8m", str(disk)], check=True)
        assert subprocess.run(cmd, cwd=REPO, capture_output=True, timeout=300).returncode == 0
        stage = json.loads((disk / "out" / "_stage.json").read_text())
        assert stage["status"] == "complete" and stage["counts"]["shards_resumed"] >= 1
    finally:
        subprocess.run(["umount", str(disk)], capture_output=True)


# ------------------------------------------------------------------------------------------ operator errors
def test_non_model_folder_as_model_is_one_line_exit_2(tmp_path, capsys):
    src = _images(tmp_path / "src", 2)
    raw = tmp_path / "raw"
    assert prx_data(["ingest", "--in", str(src), "--out", str(raw), *LOCAL]) == 0
    folder = tmp_path / "not-a-model"
    folder.mkdir()
    (folder / "notes.txt").write_text("my notes")
    capsys.readouterr()
    assert prx_data(["recaption", "--in", str(raw), "--out", str(tmp_path / "cap"), *LOCAL,
                     "--model", str(folder)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1, err
    assert err.startswith(f"prx-data recaption: error: --model {folder}: cannot load the model folder {folder}: "
                          "it has no config.json (only notes.txt)"), err


def _closed_stdout(cmd: list[str]) -> subprocess.CompletedProcess:
    """`cmd | head -1` without the race: stdout is a pipe whose reader has already left."""
    r, w = os.pipe()
    os.close(r)
    try:
        return subprocess.run(cmd, cwd=REPO, stdout=w, stderr=subprocess.PIPE, text=True, timeout=120)
    finally:
        os.close(w)


def test_prx_data_into_a_closed_pipe_exits_quietly():
    done = _closed_stdout([sys.executable, "-m", "pipeline.cli", "reasons"])
    assert (done.returncode, done.stderr) == (141, "")


def test_prx_train_into_a_closed_pipe_exits_quietly(monkeypatch):
    import trainer.cli
    import trainer.train

    def printing(cfg):
        raise BrokenPipeError(errno.EPIPE, "Broken pipe")   # what print() raises once the reader left

    monkeypatch.setattr(trainer.cli, "load_config", lambda values: None)
    monkeypatch.setattr(trainer.train, "run", printing)
    assert trainer.cli.main([]) == 141
