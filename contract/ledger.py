"""The ledger: one parquet per output shard, one row per input sample, kept or not.

Nothing is dropped without a row that says why. Reasons are stable codes from `REASONS`; a stage that
adds a code adds it here with one line of explanation (README's table is generated from this dict by
`prx-data reasons`).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import pyarrow as pa
import pyarrow.parquet as pq

from contract import fs
from contract.errors import PrxError

KEPT, REJECTED, FAILED = "kept", "rejected", "failed"
OUTCOMES = (KEPT, REJECTED, FAILED)

# code -> (default outcome, meaning)
REASONS: dict[str, tuple[str, str]] = {
    "": (KEPT, "kept (detail may carry a note, e.g. a caption re-decoded from latin-1)"),
    # input and decode
    "empty_file": (FAILED, "zero-byte image"),
    "not_an_image": (FAILED, "bytes are not an image any decoder recognises (e.g. a text file named .jpg)"),
    "decode_error": (FAILED, "image header or pixel data is corrupt or truncated"),
    "unsupported_format": (FAILED, "an image format prx does not accept"),
    "image_too_large": (REJECTED, "header declares more pixels than --max-image-pixels (not decoded)"),
    "animated_image": (REJECTED, "animated GIF/PNG/WebP: several frames"),
    "missing_image": (FAILED, "a sample with no image member"),
    "duplicate_exact": (REJECTED, "same image bytes as the kept key named in detail"),
    "read_error": (FAILED, "the input file could not be read"),
    # tar structure (the safe reader)
    "unsafe_member_name": (FAILED, "tar member with a path-like name (/, .., absolute): not extracted"),
    "duplicate_member": (FAILED, "tar member name repeated within a shard; the first one is kept"),
    "truncated_tar": (FAILED, "the tar ends inside a member, or is unreadable from a damaged header on (a row "
                              "per key found after it); later samples of that shard are lost"),
    "bad_member": (FAILED, "a known member (json, safetensors, ...) that does not parse or has wrong dtype/shape"),
    "not_a_regular_file": (FAILED, "a tar member or folder input that is a link, device, FIFO or folder"),
    "member_too_large": (REJECTED, "a tar member or folder file larger than its kind's cap "
                                   "(--max-member-bytes-KIND): never read"),
    "sparse_member": (FAILED, "GNU/pax sparse tar member: refused, never expanded"),
    # download (img2dataset)
    "http_error": (FAILED, "HTTP error status other than those below"),
    "http_403": (FAILED, "HTTP 403 Forbidden"),
    "http_404": (FAILED, "HTTP 404 Not Found"),
    "http_410": (FAILED, "HTTP 410 Gone"),
    "http_429": (FAILED, "HTTP 429 Too Many Requests"),
    "http_5xx": (FAILED, "HTTP 5xx server error"),
    "timeout": (FAILED, "connection or read timed out"),
    "dns_error": (FAILED, "host name did not resolve"),
    "connection_error": (FAILED, "connection refused or reset"),
    "redirect_loop": (FAILED, "too many redirects"),
    "too_large": (REJECTED, "response body larger than --max-image-bytes"),
    "too_small": (REJECTED, "image smaller than the minimum size"),
    "opted_out": (REJECTED, "X-Robots-Tag noai/noimageai opt-out"),
    "private_address": (REJECTED, "peer address is private, loopback or link-local"),
    "invalid_url": (FAILED, "URL could not be parsed or has an unsupported scheme"),
    "download_error": (FAILED, "other download failure; detail has the message"),
}


_BUILTIN = tuple(REASONS)   # before any stage registers its own


def outcome_of(reason: str) -> str:
    return REASONS[reason][0]


def register_reasons(codes: dict[str, tuple[str, str]]) -> None:
    """Stages/filters add their codes at import time; a code means one thing everywhere."""
    for code, value in codes.items():
        if code in REASONS and REASONS[code] != value:
            raise ValueError(f"reason code {code!r} already registered with another meaning")
        REASONS[code] = value


SCHEMA = pa.schema([
    ("key", pa.string()),
    ("input_id", pa.string()),
    ("shard", pa.int32()),
    ("stage", pa.string()),
    ("outcome", pa.string()),
    ("reason", pa.string()),
    ("detail", pa.string()),
    ("scores", pa.map_(pa.string(), pa.float64())),
    ("seconds", pa.float64()),
])
TIMING_COLUMNS = ("seconds",)


@dataclass
class Row:
    key: str
    input_id: str
    outcome: str
    reason: str = ""
    detail: str = ""
    scores: dict[str, float] = field(default_factory=dict)
    seconds: float = 0.0

    def __post_init__(self):
        if self.outcome not in OUTCOMES:
            raise ValueError(f"outcome must be one of {OUTCOMES}, got {self.outcome!r}")
        if self.reason not in REASONS:
            raise ValueError(f"unknown reason code {self.reason!r}: add it to contract.ledger.REASONS")


def row(key: str, input_id: str, reason: str = "", detail: str = "", **kw) -> Row:
    """A row whose outcome follows from its reason code."""
    return Row(key=key, input_id=input_id, outcome=outcome_of(reason), reason=reason, detail=detail, **kw)


def to_table(rows: list[Row], shard: int, stage: str) -> pa.Table:
    cols = {
        "key": [r.key for r in rows],
        "input_id": [r.input_id for r in rows],
        "shard": [shard] * len(rows),
        "stage": [stage] * len(rows),
        "outcome": [r.outcome for r in rows],
        "reason": [r.reason for r in rows],
        "detail": [r.detail for r in rows],
        "scores": [sorted(r.scores.items()) for r in rows],
        "seconds": [float(r.seconds) for r in rows],
    }
    return pa.table(cols, schema=SCHEMA)


def write(path: str, rows: list[Row], shard: int, stage: str) -> None:
    import io

    buf = io.BytesIO()
    pq.write_table(to_table(rows, shard, stage), buf, compression="zstd")
    fs.write_bytes_atomic(path, buf.getvalue())


def read(path: str) -> pa.Table:
    return fs.read_parquet(path)


def read_folder(folder: str) -> pa.Table:
    paths = fs.glob(fs.join(folder, "*.parquet"))
    tables = [read(p) for p in paths]
    return pa.concat_tables(tables) if tables else SCHEMA.empty_table()


def reason_table_markdown() -> str:
    """The contract's own codes as declared, then the registered ones by name (the same table whatever order
    the stages and filters were imported in)."""
    registered = sorted(c for c in REASONS if c not in _BUILTIN)
    lines = ["| reason | outcome | meaning |", "|---|---|---|"]
    for code in [*_BUILTIN, *registered]:
        outcome, meaning = REASONS[code]
        if code:
            lines.append(f"| `{code}` | {outcome} | {meaning} |")
    return "\n".join(lines)


class StageJsonError(PrxError):
    """A `_stage.json` that cannot be parsed; `path` and `problem` let a caller name its own fix."""

    def __init__(self, path: str, folder: str, problem: str):
        self.path, self.folder, self.problem = path, folder, problem
        super().__init__(f"{path} {problem}; rerun the stage that wrote {folder} (with --overwrite) "
                         "or move the file away")

    def __reduce__(self):  # picklable across Dask workers
        return type(self), (self.path, self.folder, self.problem)


def read_stage_json(folder: str) -> dict | None:
    """A stage folder's `_stage.json` (None when there is none; StageJsonError when it does not parse)."""
    import json

    path = fs.join(folder, "_stage.json")
    if not fs.exists(path):
        return None
    try:
        doc = json.loads(fs.read_bytes(path).decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise StageJsonError(path, folder, f"cannot be parsed ({type(exc).__name__}: {str(exc)[:200]})") from None
    if not isinstance(doc, dict):
        raise StageJsonError(path, folder, "is not a JSON object")
    return doc
