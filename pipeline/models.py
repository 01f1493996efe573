"""Model names -> what to load: an alias from manifests/models.yaml, a hub id, or a local folder.

Real models and the tiny test models go through the same path: `resolve()` then the class's own
`from_pretrained` (or open_clip's `create_model_and_transforms`), so tests exercise the loading code
users run.
"""
from __future__ import annotations

import hashlib
import importlib
import os
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

import yaml

MANIFEST = Path(__file__).resolve().parent.parent / "manifests" / "models.yaml"
GATED_HELP = ("{id} is gated on the Hugging Face hub: accept its licence on the model page, then "
              "`export HF_TOKEN=...` (or `hf auth login`) before running; or pass a local folder.")


@dataclass(frozen=True)
class ModelSpec:
    name: str                    # what the user wrote
    id: str                      # hub id, open_clip model name, or absolute local folder
    revision: str | None = None
    subfolder: str | None = None
    cls: str | None = None       # "module.Class"
    kind: str = "hf"             # hf | open_clip | local
    pretrained: str | None = None
    gated: bool = False
    extra: dict[str, Any] = field(default_factory=dict, hash=False, compare=False)

    @property
    def is_local(self) -> bool:
        return self.kind == "local" or os.path.isdir(self.id)

    def provenance(self) -> dict[str, Any]:
        out = {"name": self.name, "id": self.id, "revision": self.revision}
        if self.subfolder:
            out["subfolder"] = self.subfolder
        if self.pretrained:
            out["pretrained"] = self.pretrained
        return out

    def load_kwargs(self) -> dict[str, Any]:
        kw: dict[str, Any] = {}
        if self.revision and not self.is_local:
            kw["revision"] = self.revision
        if self.subfolder:
            kw["subfolder"] = self.subfolder
        return kw


@lru_cache(maxsize=1)
def aliases() -> dict[str, dict[str, Any]]:
    return yaml.safe_load(MANIFEST.read_text()) or {}


def folder_revision(path: str) -> str:
    """A content hash of a local folder's small files (configs), standing in for a hub revision."""
    h = hashlib.sha256()
    for p in sorted(Path(path).rglob("*")):
        if p.is_file() and p.suffix in (".json", ".txt", ".yaml", ".model") and p.stat().st_size < 10_000_000:
            h.update(str(p.relative_to(path)).encode())
            h.update(p.read_bytes())
    return "local-" + h.hexdigest()[:12]


def resolve(name: str, default_cls: str | None = None) -> ModelSpec:
    """Alias, local folder or hub id -> ModelSpec."""
    if not name:
        raise ValueError("empty model name")
    table = aliases()
    if name in table:
        e = table[name]
        return ModelSpec(name=name, id=e["id"], revision=e.get("revision"), subfolder=e.get("subfolder"),
                         cls=e.get("class", default_cls), kind=e.get("kind", "hf"), pretrained=e.get("pretrained"),
                         gated=bool(e.get("gated")), extra={k: v for k, v in e.items() if k not in
                                                            ("id", "revision", "subfolder", "class", "kind",
                                                             "pretrained", "gated")})
    if os.path.isdir(name):
        path = os.path.abspath(name)
        return ModelSpec(name=name, id=path, revision=folder_revision(path), cls=default_cls, kind="local")
    if name.startswith((".", "/")) or os.sep in name and not name.count("/") == 1:
        raise FileNotFoundError(f"model folder {name} does not exist")
    return ModelSpec(name=name, id=name, revision="main", cls=default_cls)


def import_class(path: str) -> type:
    module, _, attr = path.rpartition(".")
    return getattr(importlib.import_module(module), attr)


def from_pretrained(spec: ModelSpec, cls: str | type | None = None, **kwargs) -> Any:
    """Load through the class's own from_pretrained; gated repos fail with a message that says what to do."""
    klass = import_class(cls) if isinstance(cls, str) else cls or import_class(spec.cls or "")
    try:
        return klass.from_pretrained(spec.id, **spec.load_kwargs(), **kwargs)
    except OSError as exc:
        if spec.gated or "gated" in str(exc).lower() or "401" in str(exc):
            raise OSError(GATED_HELP.format(id=spec.id) + f"\n(original error: {exc})") from exc
        raise
