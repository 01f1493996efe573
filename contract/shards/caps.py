"""The reader's per-member size caps (`MemberCaps`), by member kind."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from contract.images import IMAGE_EXTS
from contract.shards.formats import JSON_MAX_BYTES


# Per-member size caps (bytes, as declared in the member's tar header), checked before a member is read.
MIB = 1 << 20


@dataclass(frozen=True)
class MemberCaps:
    """The largest member of each kind the reader accepts; a sample with a bigger one becomes one
    `member_too_large` Problem and that member is never read (nor handed out, in a shard read whole). Kinds go by the member's last extension:
    image (`jpg`, `png`, ... IMAGE_EXTS), json, text (`txt`, `caption_long.txt`), tensors (`safetensors`),
    other (anything else: copied byte for byte by the stages)."""

    image: int = 64 * MIB
    json: int = JSON_MAX_BYTES
    text: int = 1 * MIB
    tensors: int = 1024 * MIB
    other: int = 64 * MIB

    def __post_init__(self):
        for kind in ("image", "json", "text", "tensors", "other"):
            value = getattr(self, kind)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"member cap {kind} must be a positive number of bytes, got {value!r}")

    @staticmethod
    def kind(member: str) -> str:
        ext = member.rsplit(".", 1)[-1].lower()
        if ext in IMAGE_EXTS:
            return "image"
        return {"json": "json", "txt": "text", "safetensors": "tensors"}.get(ext, "other")

    def refusal(self, member: str, size: int) -> str | None:
        """Why a member of `size` bytes is refused (the ledger detail), or None if it is within its cap."""
        kind = self.kind(member)
        cap = getattr(self, kind)
        if size > cap:
            return (f"member {member}: {size:,} bytes, over the {cap:,}-byte {kind} cap "
                    f"(--max-member-bytes-{kind})")
        return None

    @classmethod
    def from_config(cls, cfg: Any) -> "MemberCaps":
        """The caps a stage config asks for (its `max_member_bytes_*` options; defaults where it has none)."""
        default = cls()
        return cls(**{k: getattr(cfg, f"max_member_bytes_{k}", None) or getattr(default, k)
                      for k in ("image", "json", "text", "tensors", "other")})
