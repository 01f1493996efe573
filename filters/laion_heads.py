"""LAION aesthetic and NSFW heads: small MLPs on CLIP image embeddings.

Weights by local path (`.safetensors`, or `.pth`/`.pt`/`.bin` loaded with `torch.load(weights_only=True)`)
or by hub id `ORG/REPO/FILE` (downloaded with huggingface_hub; offline runs need it in the cache). There is
no default and no silent skip: asking for an aesthetic or NSFW threshold without weights is an error.

The architecture is read from the state dict: its Linear layers in order of their index
(`layers.0.weight`, `layers.2.weight`, ... as in LAION's improved-aesthetic-predictor, or a single
`weight`/`bias` as in the older linear `sa_0_4_vit_l_14_linear.pth`). LAION's aesthetic MLP has no
activations between layers (dropout only), so the default is none; a safetensors file may say otherwise in
its metadata: `{"activation": "relu", "output": "sigmoid"}` (NSFW heads ported from LAION's Keras detector
use both). Inputs are L2-normalised CLIP image embeddings, as both predictors were trained on; the head's
input width must match the CLIP model's embedding width (ViT-L/14: 768), else a clear error.
"""
from __future__ import annotations

import os
import re

from dataclasses import dataclass

import numpy as np

from contract.config import flag_for, option
from contract.errors import PrxError
from contract.ledger import REJECTED
from filters.base import ScoreBatch, ScoreFilter

class HeadError(ValueError):
    """Missing or unusable head weights; the message says what to pass."""


def _load_state(path: str) -> tuple[dict, dict]:
    if path.endswith(".safetensors"):
        from safetensors import safe_open
        from safetensors.torch import load_file

        with safe_open(path, framework="pt") as fh:
            meta = dict(fh.metadata() or {})
        return load_file(path), meta
    import torch

    state = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise HeadError(f"{path}: expected a state dict of tensors")
    return state, {}


def locate(weights: str, flag: str = "the weights flag") -> str:
    """Local file, or ORG/REPO/FILE on the Hugging Face hub -> local file."""
    if not weights:
        raise HeadError("no weights given")
    if os.path.isfile(weights):
        return weights
    parts = weights.split("/")
    if weights.startswith((".", "/")) or len(parts) < 3:
        raise HeadError(f"head weights {weights!r} not found: pass a local .safetensors/.pth file or a hub id "
                        "ORG/REPO/FILE")
    from huggingface_hub import hf_hub_download

    from contract.models import ModelSpec, loading

    try:
        with loading(ModelSpec(weights, "/".join(parts[:2]), "main"), flag):
            return hf_hub_download("/".join(parts[:2]), "/".join(parts[2:]))
    except Exception as exc:  # noqa: BLE001 - offline, missing file, gated...: the message says which
        raise HeadError(str(exc)) from exc


def head_name(kind: str, weights: str) -> str:
    """The score name of a head: its kind and weights file (`aesthetic:sac+logos+ava1-l14-linearMSE.pth`)."""
    return f"{kind}:{os.path.basename(weights)}"


class LinearHead:
    """A stack of Linear layers (numpy float32 on CPU: these heads are tiny) applied to embeddings."""

    def __init__(self, weights: str, kind: str, flag: str = "the weights flag"):
        self.kind, self.source = kind, weights
        state, meta = _load_state(locate(weights, flag))
        layers: dict[str, dict[str, np.ndarray]] = {}
        for name, tensor in state.items():
            m = re.fullmatch(r"(?:(.*)\.)?(weight|bias)", name)
            if not m:
                continue
            layers.setdefault(m.group(1) or "", {})[m.group(2)] = tensor.detach().float().cpu().numpy()

        def order(prefix: str):
            nums = [int(n) for n in re.findall(r"\d+", prefix)]
            return (nums, prefix)

        self.layers = []
        for prefix in sorted(layers, key=order):
            w = layers[prefix].get("weight")
            if w is None or w.ndim != 2:
                continue  # norms and such have 1-d weights: not part of these heads
            b = layers[prefix].get("bias", np.zeros(w.shape[0], dtype=np.float32))
            self.layers.append((w, b))
        if not self.layers:
            raise HeadError(f"{weights}: no Linear layers found in the state dict")
        for (w1, _), (w2, _) in zip(self.layers, self.layers[1:]):
            if w1.shape[0] != w2.shape[1]:
                raise HeadError(f"{weights}: layer shapes do not chain ({w1.shape} then {w2.shape})")
        if self.layers[-1][0].shape[0] != 1:
            raise HeadError(f"{weights}: the last layer must output one value, not {self.layers[-1][0].shape[0]}")
        self.activation = meta.get("activation", "none")
        self.output = meta.get("output", "sigmoid" if kind == "nsfw" and meta.get("activation") else "identity")
        self.in_dim = int(self.layers[0][0].shape[1])

    @property
    def name(self) -> str:
        return head_name(self.kind, self.source)

    def check_dim(self, dim: int | None) -> None:
        if dim is not None and dim != self.in_dim:
            raise HeadError(f"{self.kind} head {self.source} expects {self.in_dim}-d CLIP embeddings but the CLIP "
                            f"model gives {dim}-d: use the CLIP model the head was trained on (LAION's: ViT-L/14)")

    def __call__(self, emb: np.ndarray) -> np.ndarray:
        x = emb.astype(np.float32)
        x = x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
        for i, (w, b) in enumerate(self.layers):
            x = x @ w.T + b
            if i < len(self.layers) - 1 and self.activation == "relu":
                x = np.maximum(x, 0)
        x = x[:, 0]
        if self.output == "sigmoid":
            x = 1.0 / (1.0 + np.exp(-x))
        return x.astype(np.float64)


def load_head(weights: str | None, kind: str, flag: str, threshold_flag: str) -> LinearHead:
    if not weights:
        raise HeadError(f"{threshold_flag} needs {flag} (a local .safetensors/.pth file or a hub id ORG/REPO/FILE); "
                        "prx ships no head weights")
    return LinearHead(weights, kind, flag)


class _Head(ScoreFilter):
    """A LAION head on the CLIP image embeddings: scored whenever its weights are given, thresholded when its
    threshold is; a threshold without weights, or weights for another embedding width, is an error."""

    weights_option = ""

    @property
    def weights(self) -> str | None:
        return getattr(self, self.weights_option)

    def head(self) -> LinearHead:
        weights, flag = self.weights, flag_for(self.weights_option)
        return self.ctx.cached(("laion-head", self.name, weights), lambda: LinearHead(weights, self.name, flag))

    def score_name(self) -> str | None:
        return head_name(self.name, self.weights) if self.weights else None

    def score(self, batch: ScoreBatch) -> np.ndarray:
        return self.head()(batch.image_emb)

    def clip_flags(self) -> list[str]:
        return [] if self.threshold() is None else [flag_for(self.threshold_option)]

    def validate(self) -> None:
        try:
            if self.threshold() is not None:
                load_head(self.weights, self.name, flag_for(self.weights_option), flag_for(self.threshold_option))
            if self.weights and self.ctx.clip is not None:
                self.head().check_dim(self.ctx.clip.embed_dim())
        except (HeadError, FileNotFoundError) as exc:
            raise PrxError(str(exc)) from exc

    def provenance(self) -> dict:
        if not self.weights:
            return {}
        h = self.head()
        return {self.name: {"weights": h.source, "score": h.name, "layers": [list(w.shape) for w, _ in h.layers],
                            "activation": h.activation, "output": h.output}}


@dataclass
class AestheticHead(_Head):
    name = "aesthetic"
    reason = "aesthetic_below_threshold"
    reasons = {reason: (REJECTED, "LAION aesthetic score below --min-aesthetic (head named in the score name)")}
    weights_option, threshold_option, direction = "aesthetic_weights", "min_aesthetic", "min"
    aesthetic_weights: str | None = option(None, help="LAION aesthetic head: .safetensors/.pth or ORG/REPO/FILE")
    min_aesthetic: float | None = option(None, help="reject aesthetic scores below this (needs --aesthetic-weights)")


@dataclass
class NsfwHead(_Head):
    name = "nsfw"
    reason = "nsfw_above_threshold"
    reasons = {reason: (REJECTED, "LAION NSFW probability above --max-nsfw")}
    weights_option, threshold_option, direction = "nsfw_weights", "max_nsfw", "max"
    nsfw_weights: str | None = option(None, help="NSFW head: .safetensors/.pth or ORG/REPO/FILE")
    max_nsfw: float | None = option(None, help="reject NSFW scores above this (needs --nsfw-weights)")
