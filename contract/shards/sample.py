"""What reading a shard yields: a `Sample` (raw member bytes, decoded only through its methods) or a `Problem`
(something that could not become a sample; one ledger row)."""
from __future__ import annotations

import posixpath
from dataclasses import dataclass
from typing import Any, Mapping

from contract import ledger
from contract.images import IMAGE_EXTS, ImageRejected, decode_image
from contract.shards.formats import BadMember, load_safetensors, parse_json
from contract.shards.localfile import Members


@dataclass
class Sample:
    """A sample's raw member bytes (a mapping name -> bytes; lazy `Members` when read from a local
    shard). Decoding happens only through the methods below."""

    key: str
    members: Mapping[str, bytes]
    shard: str = ""

    @property
    def input_id(self) -> str:
        return f"{posixpath.basename(self.shard)}:{self.key}" if self.shard else self.key

    @property
    def image_member(self) -> str | None:
        for name in sorted(self.members):
            if name.lower() in IMAGE_EXTS:
                return name
        return None

    def meta(self) -> dict[str, Any]:
        if "json" not in self.members:
            return {}
        return parse_json(self.members["json"], "json")

    def text(self, name: str = "txt") -> str | None:
        data = self.members.get(name)
        return None if data is None else data.decode("utf-8", errors="replace")

    def image(self, max_pixels: int | None = None):
        """(RGB PIL image, ImageInfo); raises ImageRejected (missing_image, decode_error, ...)."""
        name = self.image_member
        if name is None:
            raise ImageRejected("missing_image", f"members: {', '.join(sorted(self.members))}")
        kwargs = {} if max_pixels is None else {"max_pixels": max_pixels}
        return decode_image(self.members[name], **kwargs)

    def tensors(self, name: str, expect: dict[str, tuple[Any, int]] | None = None) -> dict:
        """Load a safetensors member (tensors view one buffer read straight from the shard); `expect` maps
        tensor name -> (torch dtype, ndim) to validate."""
        if name not in self.members:
            raise BadMember(f"{name}: missing")
        members = self.members
        buf = members.buffer(name) if isinstance(members, Members) else bytearray(members[name])
        tensors = load_safetensors(buf, name)
        for tname, (dtype, ndim) in (expect or {}).items():
            t = tensors.get(tname)
            if t is None:
                raise BadMember(f"{name}: tensor {tname!r} missing")
            if t.dtype != dtype or t.ndim != ndim:
                raise BadMember(f"{name}: tensor {tname!r} is {t.dtype} with {t.ndim} dims, "
                                f"expected {dtype} with {ndim}")
        return tensors


@dataclass
class Problem:
    """Something in a shard that could not become a sample; one ledger row."""

    key: str
    input_id: str
    reason: str
    detail: str = ""

    def row(self) -> ledger.Row:
        return ledger.row(self.key, self.input_id, self.reason, self.detail)
