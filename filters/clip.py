"""CLIP image-text score with open_clip.

`--clip-model` takes:
  - an open_clip name with a pretrained tag: `ViT-B-32:laion2b_s34b_b79k`
  - an alias from manifests/models.yaml with `kind: open_clip` (`clip-vit-b-32`)
  - `hf-hub:org/repo`, or a local folder (open_clip's `local-dir:` layout: `open_clip_config.json` + weights),
    with or without the `local-dir:` prefix. The tiny test model is such a folder.

The score is the cosine similarity of the L2-normalised image and text embeddings (in [-1, 1]; DataComp's
"CLIP score" is this cosine, sometimes shown x100). Score names carry the model, so a score is reused only
for the same model: `clip:ViT-B-32:laion2b_s34b_b79k`, `clip:hf-hub:org/repo`, `clip:local:NAME@HASH`
(HASH covers the folder's config and weights).
"""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from contract.config import option
from contract.errors import PrxError
from contract.ledger import REJECTED
from filters.base import ScoreBatch, ScoreFilter

LOCAL_PREFIX, HUB_PREFIX = "local-dir:", "hf-hub:"


@dataclass(frozen=True)
class ClipSpec:
    name: str                  # what the user wrote
    model_name: str            # what open_clip's create_model_and_transforms gets
    pretrained: str | None     # tag or file (only without a schema)
    score_name: str            # `clip:...`, stable across aliases of the same weights
    revision: str | None = None

    def provenance(self) -> dict:
        return {"name": self.name, "open_clip": self.model_name, "pretrained": self.pretrained,
                "revision": self.revision, "score": self.score_name}

    def embed_dim(self) -> int | None:
        """Width of the image embeddings, from open_clip's config (None when the config does not say)."""
        import open_clip

        if self.model_name.startswith(LOCAL_PREFIX):
            with open(self.model_name[len(LOCAL_PREFIX):] + "/open_clip_config.json") as fh:
                return json.load(fh)["model_cfg"].get("embed_dim")
        if self.model_name.startswith(HUB_PREFIX):
            return None
        config = open_clip.get_model_config(self.model_name)
        return config.get("embed_dim") if config else None

    def model_spec(self):
        """The hub repo (or folder) open_clip loads, as a contract.models.ModelSpec for error messages."""
        import open_clip

        from contract.models import ModelSpec

        if self.model_name.startswith(LOCAL_PREFIX):
            return ModelSpec(self.name, self.model_name[len(LOCAL_PREFIX):], kind="local")
        if self.model_name.startswith(HUB_PREFIX):
            return ModelSpec(self.name, self.model_name[len(HUB_PREFIX):], self.revision)
        repo = (open_clip.get_pretrained_cfg(self.model_name, self.pretrained or "") or {}).get("hf_hub", "")
        return ModelSpec(self.name, repo.strip("/") or f"{self.model_name}:{self.pretrained}", self.revision)


def _weights_digest(folder: str) -> str:
    """Content hash of a local open_clip folder: config + weights (large files: size + head + tail)."""
    h = hashlib.sha256()
    for p in sorted(Path(folder).iterdir()):
        if not p.is_file() or p.name.startswith("."):
            continue
        h.update(p.name.encode())
        size = p.stat().st_size
        h.update(str(size).encode())
        with open(p, "rb") as fh:
            if size <= 64 << 20:
                h.update(fh.read())
            else:
                h.update(fh.read(8 << 20))
                fh.seek(size - (8 << 20))
                h.update(fh.read())
    return h.hexdigest()[:12]


def resolve_clip(name: str) -> ClipSpec:
    """User's --clip-model -> what to load and what to call its scores."""
    if not name:
        raise ValueError("empty --clip-model")
    if name.startswith(LOCAL_PREFIX) or os.path.isdir(name):
        folder = os.path.abspath(name[len(LOCAL_PREFIX):] if name.startswith(LOCAL_PREFIX) else name)
        if not os.path.isfile(os.path.join(folder, "open_clip_config.json")):
            raise FileNotFoundError(f"{folder} is not an open_clip folder (no open_clip_config.json); "
                                    "see filters/tiny.py for the layout")
        digest = _weights_digest(folder)
        return ClipSpec(name, LOCAL_PREFIX + folder, None, f"clip:local:{os.path.basename(folder)}@{digest}",
                        "local-" + digest)
    if name.startswith(HUB_PREFIX):
        return ClipSpec(name, name, None, f"clip:{name}")
    from contract.models import aliases

    entry = aliases().get(name)
    if entry is not None:
        if entry.get("kind") != "open_clip":
            raise ValueError(f"alias {name!r} in manifests/models.yaml is kind {entry.get('kind', 'hf')!r}, "
                             "not open_clip")
        arch, tag = entry["id"], entry.get("pretrained")
        return ClipSpec(name, arch, tag, f"clip:{arch}:{tag}" if tag else f"clip:{arch}", entry.get("revision"))
    if name.startswith((".", "/")):
        raise FileNotFoundError(f"CLIP model folder {name} does not exist")
    arch, _, tag = name.partition(":")
    import open_clip

    if arch not in open_clip.list_models():
        raise ValueError(f"unknown open_clip model {arch!r}: use NAME:PRETRAINED (e.g. ViT-B-32:laion2b_s34b_b79k), "
                         "an alias from manifests/models.yaml, hf-hub:ORG/REPO or a local folder")
    return ClipSpec(name, arch, tag or None, f"clip:{arch}:{tag}" if tag else f"clip:{arch}")


class ClipModel:
    """An open_clip model, its eval transform and tokenizer, on one device. Batched, no grad."""

    def __init__(self, spec: ClipSpec, device: str = "cpu"):
        import open_clip
        import torch

        from contract.models import loading, model_error

        self.spec, self.device = spec, device
        try:
            with loading(spec.model_spec(), "--clip-model"):
                model, _, preprocess = open_clip.create_model_and_transforms(
                    spec.model_name, pretrained=spec.pretrained, device=device)
        except RuntimeError as exc:  # open_clip's own "Failed to download weights ..."
            if "download" not in str(exc).lower():
                raise
            raise model_error(spec.model_spec(), "--clip-model", exc) from exc
        self.model = model.eval()
        self.preprocess = preprocess
        self.tokenizer = open_clip.get_tokenizer(spec.model_name)
        self.dim = int(self.model.text_projection.shape[1]) if getattr(self.model, "text_projection", None) \
            is not None else None
        self._torch = torch
        self.autocast = device.startswith("cuda")

    def image_tensor(self, image):
        """PIL RGB -> preprocessed tensor (CPU; run in decode threads)."""
        return self.preprocess(image)

    def encode_images(self, tensors) -> np.ndarray:
        torch = self._torch
        batch = torch.stack(list(tensors)).to(self.device, non_blocking=True)
        with torch.inference_mode(), torch.autocast("cuda", enabled=self.autocast):
            emb = self.model.encode_image(batch, normalize=True)
        return emb.float().cpu().numpy()

    def encode_texts(self, texts: list[str]) -> np.ndarray:
        torch = self._torch
        tokens = self.tokenizer(texts).to(self.device)
        with torch.inference_mode(), torch.autocast("cuda", enabled=self.autocast):
            emb = self.model.encode_text(tokens, normalize=True)
        return emb.float().cpu().numpy()


def load_clip(spec: ClipSpec, device: str = "cpu") -> ClipModel:
    return ClipModel(spec, device)


def clip_scores(image_emb: np.ndarray, text_emb: np.ndarray) -> np.ndarray:
    """Row-wise cosine of normalised embeddings (one score per pair, never a matrix)."""
    return np.einsum("nd,nd->n", image_emb.astype(np.float32), text_emb.astype(np.float32))


@dataclass
class ClipScore(ScoreFilter):
    """The image-caption cosine of the --clip-model: scored whenever there is one; --min-clip-score rejects in
    the reduce, --keep-top keeps a global top fraction of what every other check and dedup left."""

    name = "clip"
    reason = "clip_below_threshold"
    reasons = {reason: (REJECTED, "CLIP image-text cosine below --min-clip-score, or outside the --keep-top "
                                  "fraction (detail: score vs threshold)")}
    threshold_option = "min_clip_score"
    top_option = "keep_top"
    min_clip_score: float | None = option(None, help="reject image-text cosine below this")
    keep_top: float | None = option(None, help="keep this fraction (0-1] of the samples left after every other "
                                               "check and dedup, by CLIP score: one global threshold")

    def score_name(self) -> str | None:
        return self.ctx.clip.score_name if self.ctx.clip is not None else None

    def score(self, batch: ScoreBatch) -> np.ndarray:
        return clip_scores(batch.image_emb, batch.clip.encode_texts(batch.texts))

    def clip_flags(self) -> list[str]:
        return [flag for flag, value in (("--min-clip-score", self.min_clip_score), ("--keep-top", self.keep_top))
                if value is not None]

    def validate(self) -> None:
        if self.keep_top is not None and not 0 < self.keep_top <= 1:
            raise PrxError("--keep-top is a fraction in (0, 1]")

    def plan(self) -> dict:
        return {} if self.min_clip_score is None else {"min_clip_score": self.min_clip_score}
