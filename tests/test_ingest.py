"""Ingest: every hostile or unusual input ends as exactly one ledger row with the right outcome and reason."""
from __future__ import annotations

import io
import json
import struct
import tarfile
import zlib

import numpy as np
import pyarrow.compute as pc
import pytest
from PIL import Image

from contract import ledger
from pipeline.cli import main as prx_data
from contract.shards import Sample, list_shards, read_shard


def _jpeg(arr, **kw) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="JPEG", **kw)
    return buf.getvalue()


def _png_header_only(width: int, height: int) -> bytes:
    """A PNG whose IHDR declares width x height, with one tiny IDAT: decoding it would need huge memory."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\x00" * 16)) + chunk(b"IEND", b"")


def _exif_rotated_jpeg(arr) -> bytes:
    img = Image.fromarray(arr)
    exif = img.getexif()
    exif[0x0112] = 6  # rotate 90 CW on display: width and height swap
    buf = io.BytesIO()
    img.save(buf, format="JPEG", exif=exif.tobytes())
    return buf.getvalue()


@pytest.fixture
def hostile_folder(tmp_path, photos):
    astro = photos["astronaut"]
    coffee = photos["coffee"]
    small = np.asarray(Image.fromarray(astro).resize((96, 96)))
    d = tmp_path / "in"
    (d / "sub").mkdir(parents=True)
    good = _jpeg(astro)
    files = {
        "good.jpg": good,
        "truncated.jpg": _jpeg(coffee)[:5000],
        "zero.jpg": b"",
        "text.jpg": b"this is not an image, just text\n",
        "random.bin": np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes(),
        "huge.png": _png_header_only(60000, 60000),
        "cmyk.jpg": _jpeg_mode(small, "CMYK"),
        "sixteen.png": _png16(small),
        "palette.png": _png_palette(small),
        "animated.gif": _gif_animated(small),
        "rotated.jpg": _exif_rotated_jpeg(np.asarray(Image.fromarray(coffee).resize((120, 60)))),
        "wide.png": _png(np.zeros((4, 2000, 3), np.uint8) + 128),
        "latin1.jpg": _jpeg(small[:, ::-1].copy()),
        "sub/again.jpg": good,  # the same bytes as good.jpg
    }
    for name, data in files.items():
        (d / name).write_bytes(data)
    (d / "good.txt").write_text("an astronaut")
    (d / "latin1.txt").write_bytes("caf\xe9 cr\xe8me".encode("latin-1"))
    (d / "rotated.json").write_text(json.dumps({"url": "http://example.com/rotated.jpg"}))
    return d


def _jpeg_mode(arr, mode):
    buf = io.BytesIO()
    Image.fromarray(arr).convert(mode).save(buf, format="JPEG")
    return buf.getvalue()


def _png(arr):
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


def _png16(arr):
    gray = (arr.mean(axis=2) * 257).astype(np.uint16)
    buf = io.BytesIO()
    Image.fromarray(gray).save(buf, format="PNG")
    assert Image.open(io.BytesIO(buf.getvalue())).mode.startswith("I")
    return buf.getvalue()


def _png_palette(arr):
    buf = io.BytesIO()
    Image.fromarray(arr).convert("P", palette=Image.Palette.ADAPTIVE, colors=16).save(buf, format="PNG")
    return buf.getvalue()


def _gif_animated(arr):
    frames = [Image.fromarray(arr), Image.fromarray(255 - arr)]
    buf = io.BytesIO()
    frames[0].save(buf, format="GIF", save_all=True, append_images=frames[1:], duration=100, loop=0)
    return buf.getvalue()


def _rows(folder) -> dict[str, dict]:
    table = ledger.read_folder(str(folder))
    rows = {}
    for r in table.to_pylist():
        assert r["input_id"] not in rows, f"two rows for {r['input_id']}"
        rows[r["input_id"]] = r
    return rows


def test_each_hostile_input_is_one_row(hostile_folder, tmp_path):
    out = tmp_path / "raw"
    assert prx_data(["ingest", "--in", str(hostile_folder), "--out", str(out), "--executor", "local",
                     "--source", "hostile", "--shard-size", "100", "--no-progress"]) == 0
    rows = _rows(out)
    expect = {
        "good.jpg": ("kept", ""),
        "truncated.jpg": ("failed", "decode_error"),
        "zero.jpg": ("failed", "empty_file"),
        "text.jpg": ("failed", "not_an_image"),
        "random.bin": ("failed", "not_an_image"),
        "huge.png": ("rejected", "image_too_large"),
        "cmyk.jpg": ("kept", ""),
        "sixteen.png": ("kept", ""),
        "palette.png": ("kept", ""),
        "animated.gif": ("rejected", "animated_image"),
        "rotated.jpg": ("kept", ""),
        "wide.png": ("kept", ""),
        "latin1.jpg": ("kept", ""),
        "sub/again.jpg": ("rejected", "duplicate_exact"),
    }
    assert {k: (v["outcome"], v["reason"]) for k, v in rows.items()} == expect
    assert "60000x60000" in rows["huge.png"]["detail"]
    assert "latin-1" in rows["latin1.jpg"]["detail"] or "cp1252" in rows["latin1.jpg"]["detail"]
    assert json.loads(rows["sub/again.jpg"]["detail"])["kept_key"] == rows["good.jpg"]["key"]
    assert rows["zero.jpg"]["key"] == "" or len(rows["zero.jpg"]["key"]) == 32

    samples = {s.meta()["input_id"]: s for p in list_shards(str(out)) for s in read_shard(p)}
    assert set(samples) == {k for k, v in expect.items() if v[0] == "kept"}
    rot = samples["rotated.jpg"].meta()
    assert (rot["width"], rot["height"]) == (60, 120)  # after EXIF orientation
    assert rot["url"] == "http://example.com/rotated.jpg"
    img, _ = samples["rotated.jpg"].image()
    assert img.size == (60, 120)
    assert samples["latin1.jpg"].text() == "café crème"
    assert samples["good.jpg"].text() == "an astronaut"
    # bytes kept as they are, member named by the detected format
    assert samples["good.jpg"].members["jpg"] == (hostile_folder / "good.jpg").read_bytes()
    assert "png" in samples["sixteen.png"].members and "png" in samples["palette.png"].members
    for s in samples.values():
        img, info = s.image()
        assert img.mode == "RGB"
        assert s.key == s.meta()["sha256"][:32]


def _tar(entries: list[tuple[str, bytes]], truncate_to: int | None = None) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.GNU_FORMAT) as tar:
        for name, data in entries:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    data = buf.getvalue()
    return data[:truncate_to] if truncate_to else data


def test_hostile_tars_become_rows(tmp_path, photos):
    img_a = _jpeg(photos["astronaut"][:64, :64].copy())
    img_b = _jpeg(photos["coffee"][:64, :64].copy())
    img_c = _jpeg(photos["chelsea"][:64, :64].copy())
    src = tmp_path / "tars"
    src.mkdir()
    (src / "000000.tar").write_bytes(_tar([
        ("a.jpg", img_a), ("a.txt", b"caption a"),
        ("../evil.jpg", img_b),
        ("b.jpg", img_b), ("b.jpg", img_c),       # duplicate member name inside a sample
        ("c.jpg", img_c), ("c.json", b'{"url": "http://x/c.jpg"}'),
    ]))
    full = _tar([("d.jpg", img_a), ("d.txt", b"d"), ("e.jpg", img_b), ("e.txt", b"e")])
    e_jpg = next(m for m in tarfile.open(fileobj=io.BytesIO(full)).getmembers() if m.name == "e.jpg")
    (src / "000001.tar").write_bytes(full[: e_jpg.offset_data + 100])  # cut inside e.jpg
    out = tmp_path / "raw"
    assert prx_data(["ingest", "--in", str(src), "--out", str(out), "--executor", "local", "--no-progress"]) == 0
    rows = _rows(out)
    got = {k: (v["outcome"], v["reason"]) for k, v in rows.items()}
    assert got == {
        "000000.tar:a": ("kept", ""),
        "000000.tar:../evil.jpg": ("failed", "unsafe_member_name"),
        "000000.tar:b": ("failed", "duplicate_member"),
        "000000.tar:c": ("kept", ""),
        "000001.tar:d": ("kept", ""),
        "000001.tar:e": ("failed", "truncated_tar"),
    }
    kept = [s for p in list_shards(str(out)) for s in read_shard(p)]
    assert sorted(s.meta()["orig_key"] for s in kept) == ["a", "c", "d"]
    c = next(s for s in kept if s.meta()["orig_key"] == "c")
    assert c.meta()["url"] == "http://x/c.jpg"


def test_reader_never_decodes_pickles(tmp_path):
    """A .pyd member is returned as raw bytes; nothing is unpickled."""
    import pickle

    class Boom:
        def __reduce__(self):
            return (exec, ("raise SystemExit('unpickled!')",))

    path = tmp_path / "000000.tar"
    path.write_bytes(_tar([("k.pyd", pickle.dumps(Boom())), ("k.txt", b"x")]))
    (sample,) = list(read_shard(str(path)))
    assert isinstance(sample, Sample)
    assert sample.members["pyd"].startswith(b"\x80")


def test_hf_dataset_ingest(tmp_path, photos):
    import datasets

    rows = {"image": [], "text": [], "url": []}
    for i, name in enumerate(["astronaut", "coffee", "chelsea"]):
        rows["image"].append({"bytes": _jpeg(photos[name][:80, :80].copy()), "path": None})
        rows["text"].append(f"photo {name}")
        rows["url"].append(f"http://example.com/{i}.jpg")
    ds = datasets.Dataset.from_dict(rows, features=datasets.Features(
        {"image": datasets.Image(), "text": datasets.Value("string"), "url": datasets.Value("string")}))
    ds.save_to_disk(str(tmp_path / "hfds"))
    out = tmp_path / "raw"
    assert prx_data(["ingest", "--in", str(tmp_path / "hfds"), "--out", str(out), "--executor", "local",
                     "--shard-size", "2", "--source", "hf-test", "--no-progress"]) == 0
    samples = [s for p in list_shards(str(out)) for s in read_shard(p)]
    assert len(list_shards(str(out))) == 2
    assert sorted(s.text() for s in samples) == ["photo astronaut", "photo chelsea", "photo coffee"]
    meta = sorted((s.meta() for s in samples), key=lambda m: m["orig_key"])
    assert [m["url"] for m in meta] == [f"http://example.com/{i}.jpg" for i in range(3)]
    assert {m["source"] for m in meta} == {"hf-test"}
    table = ledger.read_folder(str(out))
    assert pc.sum(pc.equal(table.column("outcome"), "kept")).as_py() == 3
