"""The member formats the project parses itself: JSON (deterministic bytes out; parsed only within caps, NaN,
Infinity and lone surrogates refused) and safetensors (checked as the safetensors library checks it, tensors
viewing one buffer). A member that does not parse raises `BadMember`."""
from __future__ import annotations

import json
import math
import os
import re
import sys
from typing import Any


def dumps_json(meta: dict) -> bytes:
    """Deterministic JSON bytes (insertion order kept, no whitespace variance)."""
    return json.dumps(meta, ensure_ascii=False, separators=(",", ":"), allow_nan=False).encode("utf-8")


class BadMember(Exception):
    """A known member that does not parse; `reason` is `bad_member`."""

    reason = "bad_member"


# JSON members and sidecars: parsed only within these caps (env PRX_JSON_MAX_BYTES / PRX_JSON_MAX_DEPTH).
JSON_MAX_BYTES = int(os.environ.get("PRX_JSON_MAX_BYTES", 1 << 20))
JSON_MAX_DEPTH = int(os.environ.get("PRX_JSON_MAX_DEPTH", 64))
_JSON_STRING = re.compile(rb'"(?:[^"\\]|\\.)*"', re.S)
_SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89a-fA-F]")  # \ud800-\udfff: half of a pair, or a lone one


def _reject_constant(name: str):
    raise ValueError(f"{name} is not valid JSON")


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):  # 1e400: Infinity by another spelling
        raise ValueError(f"{text} is out of the float range")
    return value


_DECODER = json.JSONDecoder(parse_constant=_reject_constant, parse_float=_finite_float)  # json.loads: one a call


def _loads(text: str) -> Any:
    """json.loads(text) refusing NaN, Infinity and out-of-range numbers, with one decoder for the process."""
    if text.startswith("\ufeff"):
        raise json.JSONDecodeError("Unexpected UTF-8 BOM (decode using utf-8-sig)", text, 0)
    return _DECODER.decode(text)


def json_depth(data: bytes) -> int:
    """Deepest nesting of [ and { outside strings (without parsing, so a 100,000-deep file costs O(n))."""
    import numpy as np

    body = np.frombuffer(_JSON_STRING.sub(b'""', bytes(data)), dtype=np.uint8)
    step = (np.isin(body, (ord("["), ord("{"))).astype(np.int32) - np.isin(body, (ord("]"), ord("}"))))
    return int(np.cumsum(step).max()) if step.size else 0


def parse_json(data: bytes, what: str = "json", max_bytes: int | None = None, max_depth: int | None = None) -> dict:
    """A JSON object from bytes, or BadMember: over `max_bytes`, nested deeper than `max_depth`, not UTF-8,
    not JSON, NaN/Infinity or a number beyond the float range (which no JSON writer here may emit), not an
    object, or holding a lone surrogate escape (`"\\ud800"`: a str that cannot be written back as UTF-8)."""
    max_bytes = JSON_MAX_BYTES if max_bytes is None else max_bytes
    max_depth = JSON_MAX_DEPTH if max_depth is None else max_depth
    if len(data) > max_bytes:
        raise BadMember(f"{what}: {len(data):,} bytes, over the {max_bytes:,}-byte JSON cap (PRX_JSON_MAX_BYTES)")
    bound = data.count(b"[") + data.count(b"{")  # depth can be no more than this: the exact count only if needed
    depth = json_depth(data) if bound > max_depth else 0
    if depth > max_depth:
        raise BadMember(f"{what}: nested {depth} deep, over the JSON depth cap {max_depth} (PRX_JSON_MAX_DEPTH)")
    try:
        value = _loads(bytes(data).decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise BadMember(f"{what}: {exc}") from None
    if not isinstance(value, dict):
        raise BadMember(f"{what}: expected an object, got {type(value).__name__}")
    if _SURROGATE_ESCAPE.search(data) and not _utf8_text(value):
        raise BadMember(f"{what}: a lone UTF-16 surrogate escape (\\ud800-\\udfff without its pair): not text "
                        "that UTF-8 can hold")
    return value


def _utf8_text(value: Any) -> bool:
    """Whether every string of a parsed JSON value (keys too) encodes as UTF-8: `json` decodes a lone surrogate
    escape ("\\ud800") to a str that no UTF-8 writer (dumps_json, the ledger) can store."""
    try:
        json.dumps(value, ensure_ascii=False).encode("utf-8")
        return True
    except UnicodeEncodeError:
        return False


# safetensors: the format's dtype names; a member is parsed in place (tensors view one buffer).
SAFETENSORS_MAX_HEADER = 100_000_000  # the safetensors library's own limit
_ST_DTYPES = {"F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16", "I64": "int64",
              "I32": "int32", "I16": "int16", "I8": "int8", "U8": "uint8", "BOOL": "bool", "U16": "uint16",
              "U32": "uint32", "U64": "uint64", "F8_E4M3": "float8_e4m3fn", "F8_E5M2": "float8_e5m2",
              "C64": "complex64"}


def _tensor_entry(name: str, info: Any, what: str) -> tuple[Any, list[int], int, int]:
    """(torch dtype, shape, begin, end) of one header entry, or BadMember."""
    import torch

    ok = (isinstance(info, dict) and isinstance(info.get("dtype"), str) and isinstance(info.get("shape"), list)
          and isinstance(info.get("data_offsets"), list) and len(info["data_offsets"]) == 2
          and all(isinstance(x, int) and not isinstance(x, bool) and x >= 0
                  for x in info["shape"] + info["data_offsets"]))
    if not ok:
        raise BadMember(f"{what}: tensor {name!r}: header entry is not {{dtype, shape, data_offsets}}")
    dtype = getattr(torch, _ST_DTYPES.get(info["dtype"], ""), None)
    if dtype is None:
        raise BadMember(f"{what}: tensor {name!r}: unsupported dtype {info['dtype']!r}")
    begin, end = info["data_offsets"]
    return dtype, info["shape"], begin, end


def load_safetensors(buf: bytearray, what: str = "safetensors") -> dict:
    """name -> tensor of a safetensors blob, checked as the safetensors library checks it (header length,
    JSON object, dtypes, contiguous offsets that cover the data exactly), or BadMember. The tensors are
    views of `buf` (no copy) unless a tensor's data is misaligned for its dtype."""
    import torch

    if sys.byteorder != "little":  # the views below assume the format's byte order
        from safetensors.torch import load
        return load(bytes(buf))
    n = int.from_bytes(buf[:8], "little") if len(buf) >= 8 else -1
    if n < 0 or n > SAFETENSORS_MAX_HEADER or 8 + n > len(buf) or buf[8:9] != b"{":
        raise BadMember(f"{what}: not a safetensors blob (header length {n}, {len(buf)} bytes)")
    try:
        header = _loads(bytes(buf[8:8 + n]).decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise BadMember(f"{what}: header: {exc}") from None
    if not isinstance(header, dict):
        raise BadMember(f"{what}: header is not a JSON object")
    meta = header.pop("__metadata__", {})
    if not isinstance(meta, dict) or not all(isinstance(v, str) for v in meta.values()):
        raise BadMember(f"{what}: __metadata__ is not a mapping of strings")
    entries = sorted(((name, *_tensor_entry(name, info, what)) for name, info in header.items()),
                     key=lambda e: (e[3], e[4]))
    done, base = 0, 8 + n
    for name, dtype, shape, begin, end in entries:
        if begin != done or end - begin != math.prod(shape) * dtype.itemsize:
            raise BadMember(f"{what}: tensor {name!r}: data offsets [{begin}, {end}] do not fit its dtype and "
                            f"shape {shape}, or leave a gap or overlap")
        done = end
    if base + done != len(buf):
        raise BadMember(f"{what}: the header covers {done:,} bytes of data, the member has {len(buf) - base:,}")
    return {name: _view(buf, base + begin, math.prod(shape), dtype, shape)
            for name, dtype, shape, begin, end in entries}


def _view(buf: bytearray, offset: int, numel: int, dtype, shape: list[int]):
    import torch

    if numel == 0:
        return torch.empty(shape, dtype=dtype)
    if offset % dtype.itemsize:  # misaligned for its dtype: copy rather than view
        return torch.frombuffer(bytearray(buf[offset:offset + numel * dtype.itemsize]), dtype=dtype).reshape(shape)
    return torch.frombuffer(buf, dtype=dtype, count=numel, offset=offset).reshape(shape)
