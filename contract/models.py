"""Model names -> what to load: an alias from manifests/models.yaml, a hub id, or a local folder.

Real models and the tiny test models go through the same path: `resolve()` then the class's own
`from_pretrained` (or open_clip's `create_model_and_transforms`), so tests exercise the loading code
users run.
"""
from __future__ import annotations

import hashlib
import importlib
import os
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

import yaml

from contract.errors import PrxError

MANIFEST = Path(__file__).resolve().parent.parent / "manifests" / "models.yaml"


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


def model_name(record: dict[str, Any]) -> str:
    """What to load for a recorded encoder (a shard's or run's record): its alias if it still is one, else its id
    (hub id or folder)."""
    name = record.get("name")
    return name if name in aliases() else record["id"]


def import_class(path: str) -> type:
    module, _, attr = path.rpartition(".")
    return getattr(importlib.import_module(module), attr)


def _chain(exc: BaseException):
    while exc is not None:
        yield exc
        exc = exc.__cause__ or exc.__context__


def model_error(spec: ModelSpec, flag: str, exc: BaseException) -> PrxError:
    """A hub or file error while loading `spec` -> one message: which model and revision, why, and what to do."""
    from huggingface_hub import constants
    from huggingface_hub import errors as hub

    what = f"{flag} {spec.name}"
    first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:300]
    if spec.is_local:
        lacks = _lacks(spec)
        return PrxError(f"{what}: cannot load the model folder {spec.id}{': ' if lacks else ''}{lacks} "
                          f"({type(exc).__name__}: {first}); point {flag} at a folder save_pretrained wrote (its "
                          "config.json and weights) or at an alias from manifests/models.yaml")
    rev = spec.revision or "main"
    fetch = f"hf download {spec.id} --revision {rev}"
    folder = f"or point {flag} at a local folder holding the model"
    chain = list(_chain(exc))
    text = " ".join(str(e) for e in chain).lower()
    if spec.gated or any(isinstance(e, hub.GatedRepoError) for e in chain) or "gated" in text or "401" in text:
        return PrxError(f"{what}: {spec.id} (revision {rev}) is gated on the Hugging Face hub: accept its licence "
                          f"on https://huggingface.co/{spec.id}, `export HF_TOKEN=...` (or `hf auth login`), then "
                          f"`{fetch}`; {folder}. ({first})")
    if any(isinstance(e, hub.RevisionNotFoundError) for e in chain):
        return PrxError(f"{what}: revision {rev} of {spec.id} does not exist on the hub; fix the revision in "
                          f"manifests/models.yaml, {folder}. ({first})")
    if any(isinstance(e, hub.RepositoryNotFoundError) for e in chain):
        return PrxError(f"{what}: {spec.id} was not found on the Hugging Face hub (a typo, or a private repo: "
                          f"`export HF_TOKEN=...`), {folder}. ({first})")
    hub_state = ("the hub is switched off here (HF_HUB_OFFLINE=1)" if constants.HF_HUB_OFFLINE
                 else "the hub could not be reached")
    return PrxError(f"{what}: {spec.id} (revision {rev}) is not in the local Hugging Face cache "
                      f"({constants.HF_HUB_CACHE}) and {hub_state}. Fetch it where the hub is reachable: `{fetch}` "
                      f"(a gated model also needs its licence accepted and `export HF_TOKEN=...`), {folder}. "
                      f"({first})")


def _lacks(spec: ModelSpec) -> str:
    """What a local model folder visibly lacks ('' when its config.json is there: the error says the rest)."""
    root = os.path.join(spec.id, spec.subfolder) if spec.subfolder else spec.id
    where = f"its subfolder {spec.subfolder}" if spec.subfolder else "it"
    if not os.path.isdir(root):
        return f"{where} does not exist"
    names = sorted(os.listdir(root))
    if "config.json" in names:
        return ""
    held = ", ".join(names[:5]) + (f" and {len(names) - 5} more" if len(names) > 5 else "")
    return f"{where} has no config.json ({f'only {held}' if held else 'it is empty'})"


@contextmanager
def loading(spec: ModelSpec, flag: str = "the model flag"):
    """Every model load of every stage and the trainer runs inside this: hub and file errors (offline, not
    cached, gated, missing repo or revision), and a local folder that is not a model (no config.json, a config
    without a model type: the ValueError or KeyError transformers raises), become one PrxError naming the
    model and the fix."""
    from huggingface_hub.errors import EntryNotFoundError

    try:
        yield
    except PrxError:
        raise
    except (OSError, EntryNotFoundError) as exc:
        raise model_error(spec, flag, exc) from exc
    except (ValueError, KeyError) as exc:
        if not spec.is_local:
            raise
        raise model_error(spec, flag, exc) from exc


def from_pretrained(spec: ModelSpec, cls: str | type | None = None, *, flag: str = "the model flag", **kwargs) -> Any:
    """Load through the class's own from_pretrained; failures say which model is missing and how to get it."""
    klass = import_class(cls) if isinstance(cls, str) else cls or import_class(spec.cls or "")
    with loading(spec, flag):
        return klass.from_pretrained(spec.id, **spec.load_kwargs(), **kwargs)
