"""Issue 14: operator mistakes and hostile data never lose input or stop a stage.

Each test builds the exact hostile input of the issue and asserts the stated outcome: input untouched and
exit 2 for every overwrite mistake, the neighbouring samples kept for every bad member, damaged outputs
redone or named, a slow server cut at the deadline, config and model errors as one-line messages.
"""
from __future__ import annotations

import hashlib
import io
import json
import os
import tarfile

import numpy as np
import pytest
from PIL import Image

from pipeline import ledger
from pipeline.cli import main as prx_data
from pipeline.shards import list_shards, read_shard

LOCAL = ["--executor", "local", "--no-progress"]


def _images(folder, n: int, seed: int = 0):
    """n distinct small PNGs with captions."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i in range(n):
        Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)).save(folder / f"{i:03d}.png")
        (folder / f"{i:03d}.txt").write_text(f"generated image {i}")
    return folder


def _snapshot(folder) -> dict[str, str]:
    """Every file below folder -> sha256 of its bytes (links followed)."""
    out = {}
    for root, _dirs, files in os.walk(folder):
        for name in files:
            path = os.path.join(root, name)
            with open(path, "rb") as fh:
                out[os.path.relpath(path, folder)] = hashlib.sha256(fh.read()).hexdigest()
    return out


def _ingest(src, out, *extra) -> int:
    return prx_data(["ingest", "--in", str(src), "--out", str(out), *LOCAL, "--shard-size", "4", *extra])


def _rows(folder) -> dict[str, dict]:
    return {r["input_id"]: r for r in ledger.read_folder(str(folder)).to_pylist()}


# ------------------------------------------------------------------------------------- --overwrite
@pytest.fixture
def raw(tmp_path):
    """An ingested shard folder (3 shards) and the image folder it came from."""
    src = _images(tmp_path / "src", 10)
    assert _ingest(src, tmp_path / "raw") == 0
    return tmp_path / "raw"


def _refused(argv, protected, capsys, *needles):
    before = _snapshot(protected)
    assert prx_data(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and ": error: " in err, err
    for n in needles:
        assert n in err, err
    assert _snapshot(protected) == before, "the input was touched"
    return err


@pytest.mark.parametrize("overwrite", [[], ["--overwrite"]])
def test_out_equal_to_input_is_refused_and_input_untouched(raw, capsys, overwrite):
    argv = ["filter", "--in", str(raw), "--out", str(raw), *LOCAL, "--clip-model", "", *overwrite]
    _refused(argv, raw, capsys, "the same as input", "Nothing was changed")
    # ingest of a folder into itself (it used to delete the shards, then ingest its own _stage.json)
    _refused(["ingest", "--in", str(raw), "--out", str(raw), *LOCAL, *overwrite], raw, capsys, "the same as input")


def test_out_holding_the_input_is_refused(tmp_path, capsys):
    parent = tmp_path / "p"
    src = _images(parent / "sub", 4)
    _refused(["ingest", "--in", str(src), "--out", str(parent), *LOCAL, "--overwrite"], parent, capsys,
             "a folder holding input")
    assert len(_snapshot(src)) == 8


def test_out_inside_the_input_is_refused(tmp_path, capsys):
    src = _images(tmp_path / "src", 4)
    _refused(["ingest", "--in", str(src), "--out", str(src / "shards"), *LOCAL, "--overwrite"], src, capsys,
             "inside input")
    assert not (src / "shards").exists()


def test_out_reaching_the_input_through_a_symlink_or_dotdot_is_refused(raw, tmp_path, capsys):
    link = tmp_path / "link"
    link.symlink_to(raw, target_is_directory=True)
    for out in (link, tmp_path / "x" / ".." / "raw"):
        _refused(["ingest", "--in", str(raw), "--out", str(out), *LOCAL, "--overwrite"], raw, capsys,
                 "the same as input")


def test_fsspec_urls_are_compared_too(tmp_path, capsys):
    from pipeline.runner import _relation, canonical

    assert _relation(canonical("memory://bucket/a/b"), canonical("memory://bucket/a/./c/../")) == "inside"
    assert _relation(canonical("s3://bkt/data"), canonical("s3://bkt/data/")) == "the same as"
    assert _relation(canonical("s3://bkt/data"), canonical("s3://other/data")) is None
    assert _relation(canonical(f"file://{tmp_path}/a"), canonical(str(tmp_path))) == "inside"


def test_write_rejected_into_the_input_is_refused(raw, tmp_path, capsys):
    argv = ["filter", "--in", str(raw), "--out", str(tmp_path / "f"), "--write-rejected", str(raw), *LOCAL,
            "--clip-model", ""]
    _refused(argv, raw, capsys, "the same as input")


def test_overwrite_removes_only_what_the_stage_wrote(raw, tmp_path, capsys):
    src = tmp_path / "src"
    out = tmp_path / "again"
    assert _ingest(src, out) == 0
    (out / "notes.txt").write_text("mine")
    (out / "keep").mkdir()
    before = _snapshot(out)
    assert _ingest(src, out, "--shard-size", "2", "--overwrite") == 2
    err = capsys.readouterr().err
    assert "did not write" in err and "notes.txt" in err and "keep" in err
    assert _snapshot(out) == before, "a refused --overwrite changed the folder"
    (out / "notes.txt").unlink()
    (out / "keep").rmdir()
    assert _ingest(src, out, "--shard-size", "2", "--overwrite") == 0
    assert len(list_shards(str(out))) == 5
    assert json.loads((out / "_stage.json").read_text())["config"]["shard_size"] == 2


# ------------------------------------------------------------------------------------- damaged outputs
def test_truncated_tar_in_out_is_redone_on_rerun(raw, tmp_path, capsys):
    whole = (raw / "000001.tar").read_bytes()
    (raw / "000001.tar").write_bytes(whole[: len(whole) // 2])
    assert _ingest(tmp_path / "src", raw) == 0
    err = capsys.readouterr().err
    assert "000001.tar is damaged" in err and "redoing shard 000001" in err
    assert (raw / "000001.tar").read_bytes() == whole
    # a tar cut exactly at a member boundary (no end-of-archive marker) is found too
    with tarfile.open(raw / "000002.tar") as tar:
        first = tar.getmembers()[1]
    cut = first.offset_data + ((first.size + 511) // 512) * 512
    whole2 = (raw / "000002.tar").read_bytes()
    (raw / "000002.tar").write_bytes(whole2[:cut])
    assert _ingest(tmp_path / "src", raw) == 0
    assert "redoing shard 000002" in capsys.readouterr().err
    assert (raw / "000002.tar").read_bytes() == whole2


def test_truncated_ledger_in_out_is_redone_on_rerun(raw, tmp_path, capsys):
    path = raw / "000000.parquet"
    whole = path.read_bytes()
    path.write_bytes(whole[:-40])
    assert _ingest(tmp_path / "src", raw) == 0
    assert "ledger unreadable" in capsys.readouterr().err
    assert ledger.read(str(path)).num_rows == 4


def test_garbage_stage_json_is_named_with_the_fix(raw, tmp_path, capsys):
    (raw / "_stage.json").write_bytes(b"\x00garbage{")
    before = _snapshot(raw)
    assert _ingest(tmp_path / "src", raw) == 2
    err = capsys.readouterr().err
    assert str(raw / "_stage.json") in err and "cannot be parsed" in err and "--overwrite" in err
    assert _snapshot(raw) == before
    assert _ingest(tmp_path / "src", raw, "--overwrite") == 0
    assert json.loads((raw / "_stage.json").read_text())["status"] == "complete"


def test_damage_after_the_checks_is_named_not_a_traceback(raw):
    from pipeline.errors import StageError
    from pipeline.runner import summarize

    (raw / "000000.tar").write_bytes(b"not a tar at all" * 10)
    with pytest.raises(StageError, match="000000.tar is damaged.*rerun the same command"):
        summarize(str(raw), [0, 1, 2])
