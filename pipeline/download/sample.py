"""A raw sample's content key and caption text, made the same way by both source stages (`ingest`,
`download`) and the download engine (which names the key of an image it rejects)."""
from __future__ import annotations

import hashlib


def content_key(data: bytes) -> tuple[str, str]:
    """(`__key__`, full sha256): the key is the first 32 hex digits of the sha256 of the image bytes."""
    digest = hashlib.sha256(data).hexdigest()
    return digest[:32], digest


def decode_caption(raw: bytes | str | None) -> tuple[str, str]:
    """Caption bytes -> (text, note). Non-UTF-8 text is decoded as cp1252 or latin-1 and the note says so."""
    if raw is None:
        return "", ""
    if isinstance(raw, str):
        return raw, ""
    if raw.startswith(b"\xef\xbb\xbf"):
        raw = raw[3:]
    try:
        return raw.decode("utf-8"), ""
    except UnicodeDecodeError:
        pass
    for enc in ("cp1252", "latin-1"):
        try:
            return raw.decode(enc), f"caption not UTF-8; decoded as {enc}"
        except UnicodeDecodeError:
            continue
    return raw.decode("utf-8", errors="replace"), "caption not UTF-8; undecodable bytes replaced"
