"""Tar headers parsed by the project: the quick pass over a plain local shard's 512-byte headers
(`_plain_headers`; anything it does not accept is walked by `tarfile` instead), and tarfile's own test for a
compressed stream."""
from __future__ import annotations

import os
import re
import tarfile

import numpy as np

from contract.shards.localfile import _ShardFile


# tarfile's own test for a compressed stream (mode r|* decompresses these; they have no member offsets)
def _compressed(head: bytes) -> bool:
    return (head.startswith((b"\x1f\x8b\x08", b"\x5d\x00\x00\x80", b"\xfd7zXZ"))
            or (head[0:3] == b"BZh" and head[4:10] == b"1AY&SY"))


_Header = tuple  # (name, size, offset of its data): a plain regular-file header, as `_plain_headers` returns it


_OCTAL = re.compile(rb" *[0-7]* *(?:\0|$)")  # a numeric header field tarfile reads as plain octal
_NUMERIC_FIELDS = ((100, 108), (108, 116), (116, 124), (124, 136), (136, 148), (148, 156), (329, 337), (337, 345))
# The same fields as Python's tarfile, GNU tar and webdataset write them (zero-padded octal, NUL-terminated;
# the checksum "NNNNNN\0 "; device numbers empty or zero): a shortcut past the per-field check, which they pass
_USUAL_FIELDS = re.compile(rb"[0-7]{7}\0[0-7]{7}\0[0-7]{7}\0[0-7]{11}\0[0-7]{11}\0[0-7]{6}\0 ")
_USUAL_DEVICES = re.compile(rb"(?:\0{8}|[0-7]{7}\0){2}")


def _octal_fields(block: bytes) -> tuple[int, int] | None:
    """(size, checksum) of a header whose numeric fields are all plain octal, else None (tarfile decides)."""
    if _USUAL_FIELDS.fullmatch(block, 100, 156) and _USUAL_DEVICES.fullmatch(block, 329, 345):
        return int(block[124:135], 8), int(block[148:154], 8)
    values = []
    for start, end in _NUMERIC_FIELDS:
        if not _OCTAL.match(block, start, end):  # base-256, signs, garbage
            return None
        values.append(int(block[start:end].split(b"\0", 1)[0].strip() or b"0", 8))
    return values[3], values[5]


def _checksums_match(blocks: list[bytes], checksums: list[int]) -> bool:
    """Every header's stored checksum is the unsigned sum of its bytes with the checksum field as spaces."""
    if not blocks:
        return True
    b = np.frombuffer(b"".join(blocks), dtype=np.uint8).reshape(len(blocks), 512)
    sums = b.sum(axis=1, dtype=np.int64) - b[:, 148:156].sum(axis=1, dtype=np.int64) + 256
    return bool(np.array_equal(sums, np.asarray(checksums, dtype=np.int64)))


def _plain_headers(file: _ShardFile) -> list[_Header] | None:
    """The headers of a shard made only of plain regular files (what ShardWriter and most webdataset
    writers produce), parsed quickly; None when anything else shows up (pax or GNU headers, links, folders,
    prefixes, base-256 numbers, a bad checksum, truncation, trailing garbage), and then `tarfile` walks the
    shard instead. What this accepts, tarfile reads the same (tests/test_reader.py). Headers in the usual
    format take `_usual_headers`; a shard with any other header takes `_checked_headers`."""
    file.read_whole()
    usual = _usual_headers(file)
    return usual if usual is not None else _checked_headers(file)


_ZERO_BLOCK = bytes(512)
# The usual format, byte by byte over a header's numeric fields (offsets 100-155): octal digits, NUL
# terminators at 107, 115, 123, 135, 147, 154, and the space that ends the checksum at 155.
_USUAL_NUL = np.array([107, 115, 123, 135, 147, 154])
_USUAL_DIGIT = np.setdiff1d(np.arange(100, 155), _USUAL_NUL)
_OCTAL_WEIGHTS = 8 ** np.arange(5, -1, -1, dtype=np.int64)    # the checksum's 6 digits


def _header_block(file: _ShardFile, offset: int) -> bytes:
    return file.data[offset:offset + 512] if file.data is not None else os.pread(file.fd, 512, offset)


def _usual_headers(file: _ShardFile) -> list[_Header] | None:
    """`_checked_headers` for a shard read whole whose headers all match `_USUAL_FIELDS` and
    `_USUAL_DEVICES`: the headers are followed from the first by their size fields (one `int` each, no
    check yet), then every check is made for all of them at once in numpy (fields, type, devices, checksums,
    names). None when any header is not in that format or fails a check: `_checked_headers` then decides,
    header by header, exactly as before. (A size field that `int` accepts but the usual format does not, with
    a space or a sign, fails the field check: its header is one of those followed.)"""
    data, size = file.data, file.size
    if data is None or size < 512:
        return None
    chain, sizes, offset = [], [], 0
    while size - offset >= 512:   # a whole header left (tarfile ends quietly on a short one after the first)
        if not data[offset]:
            if offset and data[offset:offset + 512] == _ZERO_BLOCK:  # a zero block ends the archive
                break
            return None
        try:
            member = int(data[offset + 124:offset + 135], 8)
        except ValueError:
            return None
        chain.append(offset // 512)
        sizes.append(member)
        offset += 512 + -(-member // 512) * 512
        if member and offset > size:  # the member runs past the end
            return None
    if not chain:
        return None
    h = np.frombuffer(data, dtype=np.uint8, count=size // 512 * 512).reshape(-1, 512)[chain]
    names = _usual_names(h)
    if names is None or not _usual_fields(h):
        return None
    return list(zip(names, sizes, [c * 512 + 512 for c in chain]))


def _usual_fields(h: np.ndarray) -> bool:
    """Every header (rows of `h`) in the usual format, a regular file, with a matching checksum."""
    digits = h[:, _USUAL_DIGIT] - 48   # uint8: anything below "0" wraps above 7
    if not ((digits <= 7).all() and not h[:, _USUAL_NUL].any() and (h[:, 155] == 32).all()):
        return False
    devices = h[:, 329:345].reshape(-1, 2, 8)
    dev_ok = ~devices.any(axis=2) | (((devices[:, :, :7] - 48) <= 7).all(axis=2) & (devices[:, :, 7] == 0))
    kind = h[:, 156]
    if not (dev_ok.all() and ((kind == 48) | (kind == 0)).all() and not h[:, 345].any()):
        return False
    stored = digits[:, -6:].astype(np.int64) @ _OCTAL_WEIGHTS   # the checksum's digits, 148-153
    sums = h.sum(axis=1, dtype=np.int64) - h[:, 148:156].sum(axis=1, dtype=np.int64) + 256
    return bool(np.array_equal(sums, stored))


def _usual_names(h: np.ndarray) -> list[str] | None:
    """Each header's name (its first 100 bytes up to the first NUL, decoded as tarfile does); None when a
    name has bytes after its NUL or ends with "/" (the checked pass decides those)."""
    field = h[:, :100]
    nul = field == 0
    length = np.where(nul.any(axis=1), nul.argmax(axis=1), 100)
    if not np.array_equal(np.count_nonzero(field, axis=1), length):   # a byte after the first NUL
        return None
    raw = field.copy().view("S100").ravel().tolist()   # numpy drops the trailing NULs
    names = b"\0".join(raw).decode(tarfile.ENCODING, "surrogateescape").split("\0")
    if len(names) != len(raw) or any(n.endswith("/") for n in names):
        return None
    return names


def _checked_headers(file: _ShardFile) -> list[_Header] | None:
    """`_plain_headers` header by header: each header's fields checked on their own (any octal spelling
    tarfile reads as plain octal), the checksums compared in one numpy pass at the end."""
    out, offset, size = [], 0, file.size
    blocks, checksums = [], []
    while True:
        if offset and size - offset < 512:  # tarfile ends quietly on a missing or short header (not at 0)
            break
        block = _header_block(file, offset)
        if len(block) < 512 or block[156:157] not in (b"0", b"\0") or block[345] or not block[0]:
            if offset and block == bytes(512):  # a zero block ends the archive
                break
            return None
        fields = _octal_fields(block)
        if fields is None:
            return None
        member_size, data = fields[0], offset + 512
        blocks.append(block)
        checksums.append(fields[1])
        name = block[:100].split(b"\0", 1)[0].decode(tarfile.ENCODING, "surrogateescape")
        offset = data + -(-member_size // 512) * 512
        if name.endswith("/") or (member_size and size < offset):
            return None
        out.append((name, member_size, data))
    return out if _checksums_match(blocks, checksums) else None


def _plain_end(headers: list[_Header]) -> int:
    """Where the headers of `_plain_headers` end: after the last member's data, padded to a block."""
    _, size, data = headers[-1]
    return data + -(-size // 512) * 512
