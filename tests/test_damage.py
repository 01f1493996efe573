"""A damaged tar is verified, named and seen.

A zeroed header (or a zeroed page) mid-archive reads, to `tarfile`, as the end-of-archive marker: reading stops
early and "cleanly". A finished shard is checked against its ledger before a rerun trusts it; an input shard's
unreadable region becomes `truncated_tar` rows; `prx-data audit`, `prx-data inspect` and `prx-train` say so.
"""
from __future__ import annotations

import json
import tarfile

import numpy as np
import pytest
from PIL import Image

from contract import ledger
from pipeline.cli import main as prx_data
from contract.shards import Problem, read_shard

LOCAL = ["--executor", "local", "--no-progress"]


def _images(folder, n: int):
    """n distinct small PNGs with captions."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for i in range(n):
        Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)).save(folder / f"{i:03d}.png")
        (folder / f"{i:03d}.txt").write_text(f"generated image number {i} of a small test set")
    return folder


@pytest.fixture
def raw(tmp_path):
    """One ingested shard of 10 samples (png, json, txt each) and its bytes."""
    assert prx_data(["ingest", "--in", str(_images(tmp_path / "src", 10)), "--out", str(tmp_path / "raw"),
                     *LOCAL]) == 0
    return tmp_path / "raw"


def _members(path) -> list[tarfile.TarInfo]:
    with tarfile.open(path) as tar:
        return tar.getmembers()


def _zero(path, offset: int, n: int = 512) -> None:
    data = bytearray(path.read_bytes())
    data[offset:offset + n] = bytes(n)
    path.write_bytes(bytes(data))


def _kept_keys(folder) -> list[str]:
    return [r["key"] for r in ledger.read_folder(str(folder)).to_pylist() if r["outcome"] == ledger.KEPT]


def _middle_header(path) -> tuple[int, str, list[str]]:
    """(offset of the header of sample 4's middle member, that sample's key, every key in order)."""
    members = _members(path)
    keys = list(dict.fromkeys(m.name.partition(".")[0] for m in members))
    mine = [m for m in members if m.name.startswith(keys[4] + ".")]
    return mine[1].offset, keys[4], keys


# ------------------------------------------------------------------------------------- finished shards
def test_a_zeroed_page_in_a_finished_shard_is_redone_on_rerun(raw, tmp_path, capsys):
    """4 KiB of zeros from a header of sample 4 on (a page lost in a crash): the walk ends there on what looks
    like a whole end-of-archive marker, so an end-marker check alone trusts the shard ("resumed", 6 samples
    gone). Checked against its ledger, and for data after the end, it is redone, byte for byte."""
    tar = raw / "000000.tar"
    whole = tar.read_bytes()
    offset, _, _ = _middle_header(tar)
    _zero(tar, offset, 4096)
    assert len([s for s in read_shard(str(tar)) if not isinstance(s, Problem)]) < 10
    src = tmp_path / "src"
    assert prx_data(["ingest", "--in", str(src), "--out", str(raw), *LOCAL]) == 0
    err = capsys.readouterr().err
    assert "000000.tar is damaged" in err and "redoing shard 000000" in err
    assert "unreadable from byte" in err
    assert tar.read_bytes() == whole
    assert json.loads((raw / "_stage.json").read_text())["counts"]["shards_resumed"] == 0


def test_a_zeroed_header_in_a_finished_shard_is_redone_and_named(raw, tmp_path, capsys):
    tar = raw / "000000.tar"
    whole = tar.read_bytes()
    offset, _, _ = _middle_header(tar)
    _zero(tar, offset)
    assert prx_data(["ingest", "--in", str(tmp_path / "src"), "--out", str(raw), *LOCAL]) == 0
    err = capsys.readouterr().err
    assert f"000000.tar is damaged: the tar is unreadable from byte {offset:,}" in err, err
    assert tar.read_bytes() == whole


def test_a_finished_shard_missing_a_kept_sample_is_redone(raw, tmp_path, capsys):
    """A tar rewritten whole but without one of the samples its ledger kept (end marker and all in place)."""
    tar = raw / "000000.tar"
    whole = tar.read_bytes()
    with tarfile.open(tar) as t:
        members = [(m, t.extractfile(m).read()) for m in t.getmembers()]
    first = members[0][0].name.partition(".")[0]
    with tarfile.open(tar, "w", format=tarfile.USTAR_FORMAT) as t:
        for m, data in members:
            if not m.name.startswith(first + "."):
                t.addfile(m, __import__("io").BytesIO(data))
    assert prx_data(["ingest", "--in", str(tmp_path / "src"), "--out", str(raw), *LOCAL]) == 0
    err = capsys.readouterr().err
    assert "the tar holds 9 samples, its ledger kept 10" in err and first in err, err
    assert tar.read_bytes() == whole


# ------------------------------------------------------------------------------------- input shards
def test_a_zeroed_header_in_an_input_shard_gives_rows_for_the_lost_keys(raw, tmp_path):
    """The filter reads the damaged shard: the samples before the damage are kept, the one being read when
    it came and every key whose header lies after it get a `truncated_tar` row naming the byte: one row per
    input sample, none lost."""
    tar = raw / "000000.tar"
    offset, cut, keys = _middle_header(tar)
    _zero(tar, offset)
    out = tmp_path / "filtered"
    assert prx_data(["filter", "--in", str(raw), "--out", str(out), *LOCAL]) == 0
    rows = ledger.read_folder(str(out)).to_pylist()
    assert sorted(r["key"] for r in rows) == sorted(_kept_keys(raw)) == sorted(keys)
    by_key = {r["key"]: r for r in rows}
    assert [k for k in keys if by_key[k]["outcome"] == ledger.KEPT] == keys[:4]
    lost = [by_key[k] for k in keys[4:]]
    assert {r["reason"] for r in lost} == {"truncated_tar"}
    assert all(f"unreadable from byte {offset:,}" in r["detail"] for r in lost)
    assert "may be missing members" in by_key[cut]["detail"]


def test_data_after_the_end_marker_is_one_row_naming_the_byte(tmp_path):
    """Two tars concatenated: the first one's samples are read and each key of the second gets a `truncated_tar`
    row; data after the end marker without a member header is one row naming the byte it starts at."""
    from contract.shards import ShardWriter

    for i, keys in enumerate((["a", "b"], ["c", "d"])):
        w = ShardWriter(str(tmp_path), i, "t")
        for k in keys:
            w.write(k, {"txt": k.encode()})
        w.close()
    first = (tmp_path / "000000.tar").read_bytes()
    (tmp_path / "000002.tar").write_bytes(first + (tmp_path / "000001.tar").read_bytes())
    got = [(x.key, x.reason if isinstance(x, Problem) else "sample") for x in read_shard(str(tmp_path / "000002.tar"))]
    assert got == [("a", "sample"), ("b", "sample"), ("c", "truncated_tar"), ("d", "truncated_tar")]
    (tmp_path / "000003.tar").write_bytes(first + b"\x01" * 700)
    got = list(read_shard(str(tmp_path / "000003.tar")))
    assert [x.key for x in got] == ["a", "b", ""] and isinstance(got[2], Problem)
    # the archive ends at byte 2,048 (two samples: a header and one data block each)
    assert got[2].detail.startswith("the tar is unreadable from byte 2,048 to its end (8,892 bytes): data "
                                    "follows its end-of-archive marker; no member header found in it")


# ------------------------------------------------------------------------------------- audit, inspect
def test_audit_shows_and_gates_unreadable_samples(raw, tmp_path, capsys):
    tar = raw / "000000.tar"
    offset, _, _ = _middle_header(tar)
    _zero(tar, offset)
    argv = ["audit", str(raw), *LOCAL]
    assert prx_data([*argv, "--fail-on", "unreadable.samples > 0"]) == 1
    out, err = capsys.readouterr()
    assert "UNREADABLE raw: 6 (truncated_tar 6) in 1 of 1 shard(s)" in out, out
    assert "FAIL unreadable.samples > 0" in err and "src/original: 6" in err, err
    assert prx_data([*argv, "--fail-on", "unreadable.shards >= 1"]) == 1
    clean = tmp_path / "clean"
    assert prx_data(["ingest", "--in", str(tmp_path / "src"), "--out", str(clean), *LOCAL]) == 0
    capsys.readouterr()
    assert prx_data(["audit", str(clean), *LOCAL, "--fail-on", "unreadable.samples > 0"]) == 0
    assert "UNREADABLE" not in capsys.readouterr().out


def test_inspect_names_the_damage_without_a_traceback(raw, tmp_path, capsys):
    """A first header of garbage (tarfile cannot open the shard) and a zeroed one (tarfile sees an empty
    archive): each shard counted as far as it reads, and named, as a message rather than a traceback."""
    garbled = raw / "000000.tar"
    data = bytearray(garbled.read_bytes())
    data[:512] = b"\x01" * 512
    garbled.write_bytes(bytes(data))
    assert prx_data(["inspect", str(raw)]) == 0
    out = capsys.readouterr().out
    assert "0 samples" in out and "unreadable: 11 (truncated_tar 11)" in out, out   # the shard's row + 10 keys
    assert "DAMAGED 000000.tar: cannot open tar" in out
    data[:512] = bytes(512)
    garbled.write_bytes(bytes(data))
    assert prx_data(["inspect", str(raw), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["samples"] == 0 and report["unreadable"] == {"truncated_tar": 10}
    assert report["damaged"]["000000.tar"].startswith("the tar is unreadable from byte 0 ")


def test_inspect_of_a_folder_that_is_none_is_one_line_exit_2(tmp_path, capsys):
    assert prx_data(["inspect", str(tmp_path / "nonexistent")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("prx-data inspect: error:") and err.count("\n") == 1
    assert str(tmp_path / "nonexistent") in err and "does not exist" in err
    (tmp_path / "empty").mkdir()
    assert prx_data(["inspect", str(tmp_path / "empty")]) == 2
    assert "holds no NNNNNN.tar shards" in capsys.readouterr().err


# ------------------------------------------------------------------------------------- prx-train
def test_train_names_the_damaged_shard(tmp_path, capsys):
    from trainer.cli import main as prx_train
    from testing.synthetic import write_encoded_folder

    folder = write_encoded_folder(str(tmp_path / "enc"), 1, 8, source="web", latent_shape=(4, 4, 4), text_dim=8,
                                  tokens={"long": 6, "short": 3})
    tar = tmp_path / "enc" / "000000.tar"
    offset, _, _ = _middle_header(tar)
    _zero(tar, offset)
    rc = prx_train(["--shards", folder, "--model", "tiny", "--steps", "2", "--batch-size", "4", "--device", "cpu",
                    "--no-tensorboard", "--loader-workers", "0", "--shuffle-buffer", "8",
                    "--out", str(tmp_path / "run")])
    err = capsys.readouterr().err
    assert rc == 2, err
    line = err.strip().splitlines()[-1]
    assert line.startswith("prx-train: error: damaged shard") and str(tar) in line, err
    assert f"truncated_tar: the tar is unreadable from byte {offset:,}" in line and "prx-data encode" in line


@pytest.mark.parametrize("chunk", [512, 1536, 1 << 20])
def test_the_rows_do_not_depend_on_how_the_shard_is_read(raw, monkeypatch, chunk):
    """Read whole, by pread or streamed (memory://), in any chunk size: the same rows for the same damage."""
    import fsspec

    from contract.shards import damage, localfile

    tar = raw / "000000.tar"
    offset, _, keys = _middle_header(tar)
    _zero(tar, offset)
    url = f"memory://damage-{chunk}/000000.tar"
    with fsspec.open(url, "wb") as fh:
        fh.write(tar.read_bytes())

    def rows(path):
        return [(x.key, x.reason, x.detail) if isinstance(x, Problem) else (x.key, sorted(x.members))
                for x in read_shard(path)]

    twice = raw / "000001.tar"   # an end-of-archive marker at the damage, then the whole shard again
    twice.write_bytes(tar.read_bytes()[:offset] + bytes(1024) + tar.read_bytes())
    expected = [rows(str(tar)), rows(str(twice))]
    assert [r[0] for r in expected[0]] == keys and [r[0] for r in expected[1]] == keys
    assert [r[1] for r in expected[1][5:]] == ["truncated_tar"] * 5   # keys 0-4 were read before the marker
    assert "data follows its end-of-archive marker" in expected[1][5][2]
    monkeypatch.setattr(damage, "TAIL_CHUNK", chunk)
    assert rows(url) == expected[0]
    monkeypatch.setattr(localfile, "WHOLE_SHARD", 0)
    assert [rows(str(tar)), rows(str(twice))] == expected
