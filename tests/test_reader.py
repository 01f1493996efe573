"""The shard reader: the indexed (local) and streaming paths give the samples and Problems the old
streaming reader gave, on every hostile tar and on hundreds of random corruptions; members over their
cap, and sparse members, are refused without being read; members never touched are never read."""
from __future__ import annotations

import gc
import io
import os
import pickle
import posixpath
import tarfile
import tracemalloc

import fsspec
import numpy as np
import pytest
import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from contract import ledger
from pipeline.cli import main as prx_data
from contract.config import CommonConfig, ConfigError, build_config
from contract.shards import BadMember, MemberCaps, Members, Problem, Sample, ShardWriter, load_safetensors, read_shard
from contract.shards import localfile, tarheaders
from contract.shards.localfile import _ShardFile
from contract.shards.tarheaders import _plain_headers
from pipeline.stage import MapStage

HUGE = 1 << 62
UNCAPPED = MemberCaps(HUGE, HUGE, HUGE, HUGE, HUGE)


# ------------------------------------------------------------------------------- the reference reader --
def _old_split_name(name):
    if not name or name.startswith("/") or "/" in name or "\\" in name or name in (".", ".."):
        return None
    key, dot, member = name.partition(".")
    if not key or not dot or not member:
        return None
    return key, member


def old_read_shard(path):
    """The reference reader: a plain streaming reader (tarfile `r|*` over an fsspec file, every member read)."""
    base = posixpath.basename(str(path))
    seen_keys = set()
    current = None
    current_problem = None

    def finish(sample, problem):
        if sample.key in seen_keys:
            return Problem(sample.key, sample.input_id, "duplicate_member",
                           "key repeated non-consecutively in the shard; first occurrence kept")
        seen_keys.add(sample.key)
        if problem:
            return Problem(sample.key, sample.input_id, "duplicate_member", problem)
        return sample

    try:
        fh = fsspec.open(str(path), "rb").open()
    except Exception as exc:  # noqa: BLE001
        yield Problem("", base, "read_error", f"{type(exc).__name__}: {exc}")
        return
    with fh:
        try:
            tar = tarfile.open(fileobj=fh, mode="r|*")
        except (tarfile.TarError, EOFError, OSError) as exc:
            yield Problem("", base, "truncated_tar", f"cannot open tar: {exc}")
            return
        try:
            for info in tar:
                split = _old_split_name(info.name)
                if split is None:
                    yield Problem("", f"{base}:{info.name}", "unsafe_member_name", info.name)
                    continue
                if info.isdir():
                    continue
                key, member = split
                if not info.isfile():
                    yield Problem(key, f"{base}:{info.name}", "not_a_regular_file", f"tar type {info.type!r}")
                    continue
                if current is None or current.key != key:
                    if current is not None:
                        yield finish(current, current_problem)
                    current, current_problem = Sample(key, {}, str(path)), None
                data = tar.extractfile(info).read()
                if len(data) != info.size:
                    raise EOFError(f"member {info.name} truncated ({len(data)} of {info.size} bytes)")
                if member in current.members:
                    current_problem = f"member {info.name} appears twice"
                    continue
                current.members[member] = data
        except (tarfile.TarError, EOFError, OSError, ValueError) as exc:
            if current is not None:
                yield Problem(current.key, current.input_id, "truncated_tar", f"{exc}")
            else:
                yield Problem("", base, "truncated_tar", f"{exc}")
            return
        if current is not None:
            yield finish(current, current_problem)


def _norm(items) -> list[tuple]:
    """What a reader yielded, every member read (so a lazy member that fails to read fails here)."""
    out = []
    for it in items:
        if isinstance(it, Problem):
            out.append(("P", it.key, it.input_id, it.reason, it.detail))
        else:
            out.append(("S", it.key, it.input_id, {k: bytes(v) for k, v in it.members.items()}))
    return out


# ------------------------------------------------------------------------------- hostile tars
def _info(name, data=b"", type_=tarfile.REGTYPE, **kw):
    info = tarfile.TarInfo(name)
    info.size, info.type = len(data), type_
    for k, v in kw.items():
        setattr(info, k, v)
    return info, data


def _tar(entries, fmt=tarfile.GNU_FORMAT) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=fmt) as tar:
        for e in entries:
            info, data = e if isinstance(e[0], tarfile.TarInfo) else _info(*e)
            tar.addfile(info, io.BytesIO(data) if info.type in tarfile.REGULAR_TYPES else None)
    return buf.getvalue()


def _payload(i: int, n: int) -> bytes:
    return np.random.default_rng(i).integers(0, 256, n, dtype=np.uint8).tobytes()


LONG = "k" * 120
BASES = {
    "plain": _tar([("a.jpg", _payload(1, 700)), ("a.txt", b"caption a"), ("a.json", b'{"x": 1}'),
                   ("b.jpg", _payload(2, 1500)), ("b.txt", b"b"), ("c.latent.safetensors", _payload(3, 2000)),
                   ("c.txt", b"")]),
    "pax": _tar([(LONG + ".jpg", _payload(4, 600)), (LONG + ".caption_long.txt", "café ☕".encode()),
                 ("é.txt", b"x"), ("z.json", b"{}")], fmt=tarfile.PAX_FORMAT),
    "gnu_long": _tar([(LONG + ".jpg", _payload(5, 900)), (LONG + ".txt", b"t"), ("m.txt", b"m" * 1000)]),
    "ustar": _tar([("s.jpg", _payload(6, 513)), ("s.txt", b"s"), ("t.txt", b"t" * 512)], fmt=tarfile.USTAR_FORMAT),
}
HOSTILE = {
    "unsafe_names": _tar([("a.jpg", b"1"), ("../evil.jpg", b"2"), ("/abs.jpg", b"3"), ("dir/x.jpg", b"4"),
                          ("noext", b"5"), (".hidden", b"6"), ("b\\c.jpg", b"7"), ("b.txt", b"8")]),
    "duplicates": _tar([("b.jpg", b"1"), ("b.jpg", b"2"), ("b.jpg", b"3"), ("c.jpg", b"4"), ("b.txt", b"5"),
                        ("d.jpg", b"6")]),
    "links_devices": _tar([("a.jpg", b"1"), _info("a.txt", type_=tarfile.SYMTYPE, linkname="/etc/passwd"),
                           _info("h.jpg", type_=tarfile.LNKTYPE, linkname="a.jpg"),
                           _info("d.jpg", type_=tarfile.CHRTYPE, devmajor=1, devminor=3),
                           _info("f.jpg", type_=tarfile.FIFOTYPE), _info("somedir", type_=tarfile.DIRTYPE),
                           ("e.jpg", b"e")]),
    "empty": b"",
    "not_a_tar": b"hello, this is not a tar file\n" * 40,
    "zeros": bytes(4096),
    "end_marker_then_garbage": BASES["plain"] + b"garbage" * 100,
    "truncated_in_data": BASES["plain"][:512 + 300],
    "truncated_in_header": BASES["plain"][:512 * 3 + 100],
    "truncated_at_boundary": BASES["plain"][:512 * 4],
    "gzip": __import__("gzip").compress(BASES["plain"], mtime=0),
}


def _write(tmp_path, name: str, data: bytes) -> str:
    path = tmp_path / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return str(path)


def _memory(name: str, data: bytes) -> str:
    url = f"memory://reader-test/{name}"
    with fsspec.open(url, "wb") as fh:
        fh.write(data)
    return url


def _all_readers(path_local: str, url: str, caps=UNCAPPED):
    """(old, indexed, streaming) normalised outputs for the same bytes at a local path and a memory URL."""
    old = _norm(old_read_shard(path_local))
    indexed = _norm(read_shard(path_local, caps))
    streamed = _norm(read_shard(url, caps))
    return old, indexed, streamed


REGION = "is unreadable from byte"   # the rows for what follows a tar's apparent end


def _as_old(items: list[tuple], old: list[tuple]) -> tuple[list[tuple], list[tuple]]:
    """(what the reader gave, what the reference reader gave) without the reader's own truncated_tar rows for
    an unreadable region after the headers' apparent end, and the sample being read when the walk ended there
    (the reference reader yields it as read, the last thing it yields; the reader says it may miss members)."""
    cut = {t[1] for t in items if t[0] == "P" and REGION in t[4] and "may be missing members" in t[4]}
    return ([t for t in items if not (t[0] == "P" and REGION in t[4])],
            [t for t in old if not (t[1] in cut and t is old[-1])])


def _unreadable_after(data: bytes) -> bool | None:
    """Whether tarfile's walk over `data` ends quietly with anything but zeros after it (None: it raises)."""
    try:
        with tarfile.open(fileobj=io.BytesIO(data), mode="r:") as tar:
            for _ in tar:
                pass
            return bool(data[tar.offset:].strip(b"\0"))
    except (tarfile.TarError, EOFError, OSError, ValueError, OverflowError):
        return None


def _check_against_old(data: bytes, old, indexed, streamed, what) -> None:
    """Both paths agree; they give what the reference reader gives but for the truncated_tar rows, which come exactly when
    tarfile's walk ends quietly with anything but zeros after it."""
    assert indexed == streamed, what
    mine, theirs = _as_old(indexed, old)
    assert mine == theirs, what
    after = _unreadable_after(data)
    if after is not None:
        assert after == any(t[0] == "P" and REGION in t[4] for t in indexed), what


@pytest.mark.parametrize("case", sorted({**BASES, **HOSTILE}))
def test_same_as_old_reader_on_hostile_tars(tmp_path, case):
    data = {**BASES, **HOSTILE}[case]
    local = _write(tmp_path, "000000.tar", data)
    old, indexed, streamed = _all_readers(local, _memory(f"{case}/000000.tar", data))
    _check_against_old(data, old, indexed, streamed, case)
    assert old or case == "zeros", "every case but an empty archive yields something"


def test_hostile_cases_give_the_documented_rows(tmp_path):
    got = {}
    for case in ("unsafe_names", "duplicates", "links_devices", "truncated_in_data", "empty", "not_a_tar"):
        path = _write(tmp_path / case, "000000.tar", HOSTILE[case])
        got[case] = [(x.key, x.reason) if isinstance(x, Problem) else (x.key, "sample") for x in read_shard(path)]
    assert got["unsafe_names"] == [("", "unsafe_member_name")] * 6 + [("a", "sample"), ("b", "sample")]
    assert got["duplicates"] == [("b", "duplicate_member"), ("c", "sample"), ("b", "duplicate_member"),
                                 ("d", "sample")]
    assert got["links_devices"] == [("a", "not_a_regular_file"), ("h", "not_a_regular_file"),
                                    ("d", "not_a_regular_file"), ("f", "not_a_regular_file"),
                                    ("", "unsafe_member_name"), ("a", "sample"), ("e", "sample")]  # somedir
    assert got["truncated_in_data"] == [("a", "truncated_tar")]
    assert got["empty"] == got["not_a_tar"] == [("", "truncated_tar")]


# ------------------------------------------------------------------------------- random corruptions
def _header_offsets(data: bytes) -> list[int]:
    out = []
    for off in range(0, len(data) - 511, 512):
        try:
            tarfile.TarInfo.frombuf(data[off:off + 512], "utf-8", "surrogateescape")
            out.append(off)
        except tarfile.HeaderError:
            pass
    return out


def _with_checksum(block: bytearray) -> bytearray:
    block[148:156] = b" " * 8
    block[148:156] = b"%06o\0 " % sum(block)
    return block


FIELD_VALUES = [b"0", b"1", b"2", b"5", b"7", b"L", b"K", b"x", b"g", b"\0", b"/", b".", b"7", b"\xff", b"\x80", b" "]


def corrupt(data: bytes, rng: np.random.Generator) -> bytes:
    """flip bytes / truncate / splice two tars / change a header field and fix its checksum."""
    kind = int(rng.integers(4))
    if kind == 0:
        out = bytearray(data)
        for _ in range(int(rng.integers(1, 9))):
            i = int(rng.integers(len(out)))
            out[i] ^= int(rng.integers(1, 256))
        return bytes(out)
    if kind == 1:
        cut = int(rng.integers(len(data)))
        return data[:cut - cut % 512] if rng.random() < 0.3 else data[:cut]
    if kind == 2:
        other = list(BASES.values())[int(rng.integers(len(BASES)))]
        i, j = int(rng.integers(len(data))), int(rng.integers(len(other)))
        if rng.random() < 0.5:
            i, j = i - i % 512, j - j % 512
        return data[:i] + other[j:]
    out = bytearray(data)
    offsets = _header_offsets(data)
    off = offsets[int(rng.integers(len(offsets)))]
    block = bytearray(out[off:off + 512])
    field = int(rng.choice([0, 50, 99, 100, 124, 130, 135, 156, 157, 257, 345, 400]))
    span = int(rng.integers(1, 4))
    for k in range(field, min(field + span, 500)):
        block[k] = FIELD_VALUES[int(rng.integers(len(FIELD_VALUES)))][0]
    if block[156:157] == b"S":  # a sparse member would make the reference reader expand it: not a fair reference
        block[156:157] = b"0"
    out[off:off + 512] = _with_checksum(block)
    return bytes(out)


@pytest.mark.parametrize("whole", [True, False], ids=["read-whole", "pread"])
def test_same_as_old_reader_on_random_corruptions(tmp_path, monkeypatch, whole):
    """A few hundred seeds: identical samples (bytes) and Problems from the reference reader, the indexed path
    (the shard read whole, or headers and members by pread) and the streaming path; no exception escapes."""
    monkeypatch.setattr(localfile, "WHOLE_SHARD", 16 << 20 if whole else 0)
    bases = list(BASES.values()) + [HOSTILE["duplicates"], HOSTILE["links_devices"]]
    kinds, quick = set(), 0
    for seed in range(400):
        rng = np.random.default_rng(seed)
        data = corrupt(bases[seed % len(bases)], rng)
        local = _write(tmp_path, f"{seed}/000000.tar", data)
        old, indexed, streamed = _all_readers(local, _memory(f"{seed}/000000.tar", data))
        _check_against_old(data, old, indexed, streamed, f"seed {seed}")
        kinds.update(t[3] if t[0] == "P" else "sample" for t in old)
        quick += _plain_headers(_ShardFile(local)) is not None
        fsspec.filesystem("memory").rm(f"/reader-test/{seed}", recursive=True)
    assert {"sample", "truncated_tar", "duplicate_member", "unsafe_member_name", "not_a_regular_file"} <= kinds
    assert 60 <= quick <= 340, quick  # both header passes (quick plain one, tarfile) were exercised


def test_quick_header_pass_takes_plain_shards_only(tmp_path):
    def quick(data):
        return _plain_headers(_ShardFile(_write(tmp_path, "000000.tar", data)))

    assert [h[0] for h in quick(BASES["plain"])] == ["a.jpg", "a.txt", "a.json", "b.jpg", "b.txt",
                                                      "c.latent.safetensors", "c.txt"]
    assert quick(BASES["ustar"]) is not None
    assert [h[0] for h in quick(BASES["plain"][:2560])] == ["a.jpg", "a.txt"]  # cut at a header: as tarfile
    for case in ("pax", "gnu_long"):
        assert quick(BASES[case]) is None, case
    for case in ("links_devices", "empty", "not_a_tar", "zeros", "truncated_at_boundary", "truncated_in_data"):
        assert quick(HOSTILE[case]) is None, case


def test_usual_header_pass_equals_the_checked_one(tmp_path, monkeypatch):
    """The numpy pass over the headers of a shard read whole, in the usual format, returns exactly what the
    header-by-header pass returns, and leaves every other shard to it (None), as it does a shard above
    WHOLE_SHARD (read by pread: there the headers are few next to the members)."""
    def passes(data, name):
        f = _ShardFile(_write(tmp_path, name, data))
        f.read_whole()
        return tarheaders._usual_headers(f), tarheaders._checked_headers(f)

    usual, checked = passes(BASES["plain"], "plain.tar")
    assert usual is not None and usual == checked and len(usual) == 7
    bases = list(BASES.values()) + [HOSTILE["duplicates"], HOSTILE["links_devices"]]
    taken = 0
    for seed in range(300):
        usual, checked = passes(corrupt(bases[seed % len(bases)], np.random.default_rng(seed)), f"{seed}.tar")
        if usual is not None:
            taken += 1
            assert usual == checked, seed
    assert 30 <= taken <= 250, taken   # both outcomes exercised
    monkeypatch.setattr(localfile, "WHOLE_SHARD", 0)
    assert passes(BASES["plain"], "big.tar")[0] is None


def _rchar() -> int:
    return int(next(line for line in open("/proc/self/io") if line.startswith("rchar")).split()[1])


def test_a_small_shard_is_read_once(tmp_path):
    """A shard up to WHOLE_SHARD bytes is read whole, once: its headers and members come from that read."""
    w = ShardWriter(str(tmp_path / "txt"), 0, "test")
    for i in range(300):
        w.write(f"k{i:04d}", {"txt": f"caption {i}".encode() * 20, "json": b'{"source": "s"}'})
    w.close()
    path = str(tmp_path / "txt" / "000000.tar")
    before = _rchar()
    texts = [s.text("txt") for s in read_shard(path) if s.meta()["source"] == "s"]
    read = _rchar() - before
    assert texts[7] == "caption 7" * 20 and len(texts) == 300
    assert os.path.getsize(path) <= read < os.path.getsize(path) + 64 * 1024


def test_safetensors_parse_matches_the_library(tmp_path):
    """Our in-place parse accepts what safetensors accepts (same tensors) and refuses what it refuses."""
    blobs = [st_save({"mean": torch.randn(4, 3, 2), "logvar": torch.randn(4, 3, 2)}),
             st_save({"hidden": torch.randn(5, 8).to(torch.bfloat16)}, metadata={"a": "b"}),
             st_save({"x": torch.arange(7, dtype=torch.int16), "e": torch.zeros(0, 3), "b": torch.ones(3).bool()})]
    agree = 0
    for seed in range(300):
        rng = np.random.default_rng(seed)
        blob = bytearray(blobs[seed % len(blobs)])
        if seed % 3 == 1:
            blob = blob[:int(rng.integers(len(blob)))]
        elif seed % 3 == 2:
            for _ in range(int(rng.integers(1, 4))):
                i = int(rng.integers(min(len(blob), 8 + int.from_bytes(blob[:8], "little") + 4)))
                blob[i] = int(rng.choice(list(b'0123456789"{}[],: ax\xff')))
        try:
            want = st_load(bytes(blob))
        except Exception:  # noqa: BLE001 - the library refuses: so must we
            with pytest.raises(BadMember):
                load_safetensors(bytearray(blob), "m")
            continue
        got = load_safetensors(bytearray(blob), "m")
        assert sorted(got) == sorted(want), seed
        for k in want:
            assert got[k].dtype == want[k].dtype and torch.equal(got[k], want[k]), (seed, k)
        agree += 1
    assert agree >= 100


def test_tensors_view_the_member_buffer_without_a_copy():
    buf = bytearray(st_save({"mean": torch.zeros(16, 4, 4), "logvar": torch.zeros(16, 4, 4)}))
    t = load_safetensors(buf, "latent.safetensors")
    end = len(buf)
    buf[end - 4:end] = np.float32(2.5).tobytes()  # the last value of the last tensor (sorted by offset)
    assert 2.5 in (t["mean"].flatten()[-1].item(), t["logvar"].flatten()[-1].item())
    assert t["mean"].is_contiguous() and not t["mean"].requires_grad


# ------------------------------------------------------------------------------- caps
def _sparse_tar(real_size: int = 2 << 30, stored: int = 10_000) -> bytes:
    """A GNU sparse member (type S) that tarfile would expand to `real_size` bytes, in a ~20 KB file."""
    block = bytearray(512)
    block[0:5] = b"k.jpg"
    block[100:108] = b"0000644\0"
    block[108:116] = block[116:124] = b"0000000\0"
    block[124:136] = b"%011o\0" % stored
    block[136:148] = b"00000000000\0"
    block[156:157] = b"S"
    block[257:265] = b"ustar  \0"
    block[386:398] = b"%011o\0" % (real_size - stored)  # one data extent at the end, a hole before it
    block[398:410] = b"%011o\0" % stored
    block[483:495] = b"%011o\0" % real_size
    data = bytes(_with_checksum(block)) + b"\xd8" * stored
    data += bytes(-len(data) % 512)
    return data + _tar([("ok.jpg", b"fine"), ("ok.txt", b"ok")])


def _pax_sparse_tar(real_size: int = 2 << 30) -> bytes:
    """The same as a pax (GNU sparse 1.0) member."""
    smap = b"1\n%d\n%d\n" % (real_size - 100, 100)
    data = smap + bytes(512 - len(smap)) + b"\xd8" * 100
    info = tarfile.TarInfo("k.jpg")
    info.size = len(data)
    info.pax_headers = {"GNU.sparse.major": "1", "GNU.sparse.minor": "0", "GNU.sparse.name": "k.jpg",
                        "GNU.sparse.realsize": str(real_size)}
    return _tar([(info, data), ("ok.jpg", b"fine")], fmt=tarfile.PAX_FORMAT)


def _peak_mb(fn) -> tuple[float, object]:
    gc.collect()
    tracemalloc.start()
    try:
        result = fn()
        return tracemalloc.get_traced_memory()[1] / 1e6, result
    finally:
        tracemalloc.stop()


@pytest.mark.parametrize("maker", [_sparse_tar, _pax_sparse_tar])
def test_sparse_member_refused_without_expanding(tmp_path, maker):
    data = maker()
    assert len(data) < 25_000
    info = next(iter(tarfile.open(fileobj=io.BytesIO(data))))
    assert info.issparse() and info.size == 2 << 30  # what the reference reader would expand
    for path in (_write(tmp_path, "000000.tar", data), _memory(f"sparse-{maker.__name__}/000000.tar", data)):
        peak, items = _peak_mb(lambda: _norm(read_shard(path)))
        assert peak < 200, f"{path}: {peak:.0f} MB"
        assert [(t[1], t[3]) if t[0] == "P" else (t[1], "sample") for t in items] == [
            ("k", "sparse_member"), ("ok", "sample")]
        assert "not expanded" in items[0][4]


def test_member_over_its_cap_is_refused_without_being_read(tmp_path):
    big = b"\xff\xd8" + bytes(24 << 20)  # a 24 MiB "image"
    data = _tar([("a.jpg", b"small"), ("a.txt", b"a"), ("b.jpg", big), ("b.txt", b"b"), ("c.txt", b"x" * 5000),
                 ("d.jpg", b"d")])
    caps = MemberCaps(image=1 << 20, text=4096)
    for path in (_write(tmp_path, "000000.tar", data), _memory("cap/000000.tar", data)):
        peak, items = _peak_mb(lambda: [(x.key, x.reason, x.detail) if isinstance(x, Problem)
                                        else (x.key, "sample", dict(x.members)) for x in read_shard(path, caps)])
        assert peak < 5, f"{path}: peak {peak:.1f} MB while a 24 MiB member was refused"
        assert [i[:2] for i in items] == [("a", "sample"), ("b", "member_too_large"), ("c", "member_too_large"),
                                         ("d", "sample")]
        assert "--max-member-bytes-image" in items[1][2] and "25,165,826 bytes" in items[1][2]
        assert "--max-member-bytes-text" in items[2][2]
    del big
    # defaults: images 64 MiB, so the same shard reads whole
    assert [x.key for x in read_shard(path) if isinstance(x, Sample)] == ["a", "b", "c", "d"]


def test_caps_by_member_kind_and_defaults():
    caps = MemberCaps()
    assert {m: caps.kind(m) for m in ("jpg", "PNG", "webp", "json", "txt", "caption_long.txt",
                                      "latent.safetensors", "emb_short.safetensors", "pyd", "cls")} == {
        "jpg": "image", "PNG": "image", "webp": "image", "json": "json", "txt": "text", "caption_long.txt": "text",
        "latent.safetensors": "tensors", "emb_short.safetensors": "tensors", "pyd": "other", "cls": "other"}
    common = CommonConfig()
    assert MemberCaps.from_config(common) == caps  # the stage flags' defaults are the reader's defaults
    assert (caps.image, caps.json, caps.text, caps.tensors, caps.other) == (64 << 20, 1 << 20, 1 << 20, 1 << 30,
                                                                           64 << 20)
    with pytest.raises(ValueError, match="positive"):
        MemberCaps(image=0)
    with pytest.raises(ConfigError, match="--max-member-bytes-text must be a positive"):
        build_config(CommonConfig, {"max_member_bytes_text": -1})


class _Echo(MapStage):
    name = "echo"

    def process_batch(self, samples, task):
        raise NotImplementedError


def test_map_stage_reads_with_the_configured_caps(tmp_path):
    folder = tmp_path / "in"
    w = ShardWriter(str(folder), 0, "test")
    w.write("a", {"txt": b"short", "json": b"{}"})
    w.write("b", {"txt": b"long " * 100, "json": b"{}"})
    w.close()
    stage = _Echo(build_config(CommonConfig, {"input": str(folder), "max_member_bytes_text": 100}))
    (task,) = stage.plan()
    got = [(x.key, x.reason) if isinstance(x, Problem) else (x.key, "sample") for x in stage.samples(task)]
    assert got == [("a", "sample"), ("b", "member_too_large")]
    assert ledger.outcome_of("member_too_large") == ledger.REJECTED


def test_ingest_flag_refuses_a_large_member(tmp_path, capsys):
    src = tmp_path / "wds"
    src.mkdir()
    (src / "000000.tar").write_bytes(_tar([("a.jpg", _jpeg()), ("a.txt", b"a"), ("b.jpg", _jpeg(96)),
                                           ("b.txt", b"t" * 3000)]))
    out = tmp_path / "raw"
    args = ["ingest", "--in", str(src), "--out", str(out), "--executor", "local", "--no-progress"]
    assert prx_data(args + ["--max-member-bytes-text", "2048"]) == 0
    rows = ledger.read_folder(str(out)).to_pylist()
    assert sorted((r["input_id"], r["reason"]) for r in rows) == [("000000.tar:a", ""),
                                                                  ("000000.tar:b", "member_too_large")]
    assert prx_data(args + ["--max-member-bytes-image", "0", "--overwrite"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["prx-data ingest: error: --max-member-bytes-image must be a positive number of bytes, got 0"]


def _jpeg(side: int = 64) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(np.full((side, side, 3), 120, np.uint8)).save(buf, "JPEG")
    return buf.getvalue()


# ------------------------------------------------------------------------------- lazy members
def _encoded_like(tmp_path, n: int = 6) -> str:
    w = ShardWriter(str(tmp_path / "enc"), 0, "test")
    for i in range(n):
        w.write(f"k{i}", {"latent.safetensors": st_save({"mean": torch.full((4, 8, 8), float(i)),
                                                         "logvar": torch.zeros(4, 8, 8)}),
                          "emb_long.safetensors": st_save({"hidden": torch.ones(3000, 64).to(torch.bfloat16)}),
                          "emb_short.safetensors": st_save({"hidden": torch.ones(7, 64).to(torch.bfloat16)}),
                          "jpg": _payload(i, 30_000), "json": b'{"i": %d}' % i, "txt": b"caption %d" % i})
    w.close()
    return str(tmp_path / "enc" / "000000.tar")


def test_members_mapping_behaves_like_a_dict(tmp_path):
    path = _encoded_like(tmp_path, 2)
    s = next(read_shard(path))
    assert isinstance(s.members, Members)
    d = dict(s.members)
    assert sorted(d) == sorted(s.members) == ["emb_long.safetensors", "emb_short.safetensors", "jpg", "json",
                                              "latent.safetensors", "txt"]
    assert len(s.members) == 6 and "jpg" in s.members and "png" not in s.members
    assert s.members["txt"] == b"caption 0" and s.members.get("png") is None
    assert dict(s.members.items()) == d and s.members == d and {**s.members} == d
    assert s.members.size("jpg") == 30_000
    assert pickle.loads(pickle.dumps(s)).members == d  # pickles as a plain dict of bytes
    assert s.meta() == {"i": 0} and s.text() == "caption 0"


def test_samples_outlive_the_reader_and_close_the_file(tmp_path):
    """Samples held after their reader ended (the trainer's shuffle buffer) read their members by pread: they
    keep the file open, not the whole-shard copy (2,048 buffered samples would otherwise pin ~700 shards)."""
    path = _encoded_like(tmp_path)
    fds = lambda: sum(os.path.realpath(f"/proc/self/fd/{fd}") == os.path.realpath(path)  # noqa: E731
                      for fd in os.listdir("/proc/self/fd") if os.path.exists(f"/proc/self/fd/{fd}"))
    gen = read_shard(path)
    window = [next(gen) for _ in range(3)]  # a shuffle buffer holding samples...
    assert window[0].members._file.data is not None   # a small shard: read whole while it is walked
    gen.close()                              # ...after the reader moved on and was dropped
    del gen
    gc.collect()
    assert window[0].members._file.data is None       # the buffered samples do not pin that copy
    assert [s.tensors("latent.safetensors")["mean"][0, 0, 0].item() for s in window] == [0.0, 1.0, 2.0]
    assert fds() == 1
    del window
    gc.collect()
    assert fds() == 0


@pytest.mark.skipif(not os.path.exists("/proc/self/io"), reason="needs Linux /proc/self/io")
def test_members_never_touched_are_never_read(tmp_path, monkeypatch):
    """The trainer's access pattern (latent + one embedding) reads only those members from disk, in a shard
    above the size read whole (real encoded shards are ~1.4 MB a sample)."""
    monkeypatch.setattr(localfile, "WHOLE_SHARD", 0)
    path = _encoded_like(tmp_path)

    before = _rchar()
    latents = []
    for s in read_shard(path):
        latents.append(s.tensors("latent.safetensors", {"mean": (torch.float32, 3)})["mean"])
        s.tensors("emb_short.safetensors", {"hidden": (torch.bfloat16, 2)})
    read = _rchar() - before
    size = os.path.getsize(path)
    wanted = sum(len(st_save(x)) for x in ({"mean": torch.zeros(4, 8, 8), "logvar": torch.zeros(4, 8, 8)},
                                           {"hidden": torch.ones(7, 64).to(torch.bfloat16)})) * 6
    assert read < wanted + 64 * 1024, f"read {read:,} bytes of a {size:,}-byte shard; needed {wanted:,}"
    assert read < size / 10
    assert [t[0, 0, 0].item() for t in latents] == [0.0, 1.0, 2.0, 3.0, 4.0, 5.0]


def test_json_depth_cap_still_holds_with_the_quick_bound():
    from contract.shards import JSON_MAX_DEPTH, parse_json

    assert parse_json(b'{"a": "' + b"[" * 500 + b'"}') == {"a": "[" * 500}  # brackets in strings: not depth
    deep = b'{"a": ' + b"[" * (JSON_MAX_DEPTH + 1) + b"]" * (JSON_MAX_DEPTH + 1) + b"}"
    with pytest.raises(BadMember, match="depth cap"):
        parse_json(deep)
    assert parse_json(b'{"a": ' + b"[" * 10 + b"]" * 10 + b"}") == {"a": [[[[[[[[[[]]]]]]]]]]}
