"""Feature extractors behind one interface: `extractor(uint8 N x 3 x H x W) -> float32 N x D` (numpy).

- `InceptionExtractor` (FID): torch-fidelity's `FeatureExtractorInceptionV3`, 2048-d pool features. uint8 in
  (float input is refused), torch-fidelity's own TF1-style bilinear resize to 299 x 299
  (`interpolate_bilinear_2d_like_tensorflow1x`, what the original TF FID code does), then (x - 128) / 128.
  Weights only from a file (`--inception-weights`): a `.safetensors` file, or a `.pth` accepted only after
  `torch.load(weights_only=True)` succeeds (torch-fidelity itself would unpickle it, and would download it).
- `ClipExtractor` (CMMD, CLIP score): an open_clip model (default CLIP ViT-L/14-336 `openai`, alias
  `clip-vit-l-14-336`) with its own eval preprocessing (bicubic resize of the shorter side, centre crop, CLIP
  mean/std); projected image and text embeddings, L2-normalised.
- `DinoExtractor` (DINO-MMD): DINOv2-L/14 with registers (alias `dinov2`) through transformers; bicubic
  resize (antialiased) to 518 x 518, ImageNet mean/std, the normalised CLS token (`pooler_output`),
  L2-normalised.
Each has a `key` naming model and preprocessing: cached real features are reused only under the same key.
"""
from __future__ import annotations

import hashlib
import os
import tempfile
from typing import Any

import numpy as np

from contract.errors import PrxError

IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
DINO_SIZE = 518


def check_uint8(images) -> None:
    import torch

    if not torch.is_tensor(images) or images.dtype != torch.uint8:
        raise TypeError(f"extractors take uint8 N x 3 x H x W tensors, got {getattr(images, 'dtype', type(images))}")
    if images.ndim != 4 or images.shape[1] != 3:
        raise TypeError(f"extractors take uint8 N x 3 x H x W tensors, got shape {tuple(images.shape)}")


def file_digest(path: str) -> str:
    """Content hash of a weights file (size + first and last 8 MiB: cheap on GB files)."""
    h = hashlib.sha256()
    size = os.path.getsize(path)
    h.update(str(size).encode())
    with open(path, "rb") as fh:
        h.update(fh.read(8 << 20))
        if size > 16 << 20:
            fh.seek(size - (8 << 20))
            h.update(fh.read())
    return h.hexdigest()[:12]


def folder_digest(folder: str) -> str:
    h = hashlib.sha256()
    for name in sorted(os.listdir(folder)):
        p = os.path.join(folder, name)
        if os.path.isfile(p) and not name.startswith("."):
            h.update(name.encode() + file_digest(p).encode())
    return h.hexdigest()[:12]


class Extractor:
    """Base: batching, the uint8 contract, provenance. Subclasses define `_forward(uint8 batch) -> tensor`."""

    metric = ""
    key = ""
    batch_size = 32

    def __call__(self, images) -> np.ndarray:
        import torch

        check_uint8(images)
        out = []
        with torch.inference_mode():
            for i in range(0, len(images), self.batch_size):
                out.append(self._forward(images[i:i + self.batch_size]).float().cpu())
        return torch.cat(out).numpy() if out else np.zeros((0, 0), np.float32)

    def _forward(self, images):
        raise NotImplementedError

    def info(self) -> dict[str, Any]:
        return {"key": self.key, "preprocessing": self.preprocessing}


# ------------------------------------------------------------------------------------------- Inception
def load_inception_state(path: str) -> dict:
    """The Inception state dict from a file, never unpickling anything beyond tensors."""
    import torch

    if not path or not os.path.isfile(path):
        raise PrxError(f"--inception-weights {path}: no such file. FID needs torch-fidelity's Inception-v3 "
                         "weights (weights-inception-2015-12-05-6726825d.pth from its releases); pass "
                         "--inception-weights FILE")
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file

        return load_file(path)
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - anything that is not plain tensors is refused
        raise PrxError(f"--inception-weights {path}: refused, it does not load with torch.load(weights_only=True) "
                         f"({type(exc).__name__}: {str(exc)[:200]}); convert it to a plain state dict or "
                         ".safetensors") from None
    if not isinstance(state, dict) or not all(torch.is_tensor(v) for v in state.values()):
        raise PrxError(f"--inception-weights {path}: not a state dict of tensors")
    return state


class InceptionExtractor(Extractor):
    metric = "fid"
    preprocessing = "uint8, torch-fidelity TF1-style bilinear resize to 299x299, (x - 128) / 128; pool3 2048-d"

    def __init__(self, weights: str, device: str = "cpu"):
        import torch

        try:
            from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3
        except ImportError:
            raise PrxError("FID needs torch-fidelity: pip install 'prx[eval]' (or pip install torch-fidelity), "
                             "or leave fid out of --metrics") from None
        state = load_inception_state(weights)
        # torch-fidelity's constructor torch.load()s a path with weights_only=False: give it a file written
        # here from the verified tensors, never the user's file.
        with tempfile.TemporaryDirectory() as tmp:
            safe = os.path.join(tmp, "inception.pth")
            torch.save(dict(state), safe)
            self.model = FeatureExtractorInceptionV3("inception-v3-compat", ["2048"],
                                                     feature_extractor_weights_path=safe).to(device)
        self.device = device
        self.key = f"inception-v3-2048:{file_digest(weights)}"
        self.weights = os.path.abspath(weights)

    def _forward(self, images):
        return self.model(images.to(self.device))[0]

    def info(self) -> dict[str, Any]:
        return {**super().info(), "weights": self.weights}


# ------------------------------------------------------------------------------------------- CLIP
def resolve_open_clip(name: str) -> tuple[str, str | None, str]:
    """--clip-model -> (open_clip model name, pretrained tag, cache key). Alias, local folder or NAME:TAG."""
    from contract.models import aliases

    if os.path.isdir(name):
        folder = os.path.abspath(name)
        if not os.path.isfile(os.path.join(folder, "open_clip_config.json")):
            raise PrxError(f"--clip-model {name}: not an open_clip folder (no open_clip_config.json)")
        return "local-dir:" + folder, None, f"open_clip:local:{os.path.basename(folder)}@{folder_digest(folder)}"
    entry = aliases().get(name)
    if entry is not None:
        if entry.get("kind") != "open_clip":
            raise PrxError(f"--clip-model {name}: the alias in manifests/models.yaml is not an open_clip model")
        return entry["id"], entry.get("pretrained"), f"open_clip:{entry['id']}:{entry.get('pretrained')}"
    arch, _, tag = name.partition(":")
    return arch, tag or None, f"open_clip:{arch}:{tag}"


def open_clip_kwargs(tag: str | None) -> dict:
    """OpenAI's CLIP weights were trained with QuickGELU: open_clip builds plain GELU unless told (it only warns),
    which changes every feature; CMMD's reference (google-research/cmmd) runs OpenAI's model as trained."""
    return {"force_quick_gelu": True} if tag == "openai" else {}


class ClipExtractor(Extractor):
    metric = "cmmd"

    def __init__(self, name: str, device: str = "cpu"):
        import open_clip

        arch, tag, self.key = resolve_open_clip(name)
        try:
            model, _, self.preprocess = open_clip.create_model_and_transforms(arch, pretrained=tag, device=device,
                                                                              **open_clip_kwargs(tag))
        except Exception as exc:  # noqa: BLE001 - missing weights offline, unknown tag: one clear line
            raise PrxError(f"--clip-model {name}: cannot load ({type(exc).__name__}: {str(exc)[:200]}); pass "
                             "--clip-model with a local open_clip folder or a cached alias") from None
        self.model = model.eval()
        self.tokenizer = open_clip.get_tokenizer(arch)
        self.device, self.name = device, name
        self.preprocessing = f"open_clip eval transform: {self.preprocess}".replace("\n", " ")

    def _forward(self, images):
        import torch
        from PIL import Image

        pil = [Image.fromarray(im.permute(1, 2, 0).cpu().numpy()) for im in images]
        batch = torch.stack([self.preprocess(p) for p in pil]).to(self.device)
        return self.model.encode_image(batch, normalize=True)

    @property
    def context_length(self) -> int:
        return int(getattr(self.tokenizer, "context_length", 77))

    def count_truncated(self, texts: list[str]) -> int:
        """Captions longer than the text tower's context (start and end tokens included), which it truncates."""
        if hasattr(self.tokenizer, "encode"):  # open_clip's SimpleTokenizer: ids without start/end
            return sum(len(self.tokenizer.encode(t)) + 2 > self.context_length for t in texts)
        hf = self.tokenizer.tokenizer  # open_clip's HFTokenizer wraps a Hugging Face tokenizer
        return sum(len(hf(t)["input_ids"]) > self.context_length for t in texts)

    def text(self, texts: list[str]) -> np.ndarray:
        import torch

        out = []
        with torch.inference_mode():
            for i in range(0, len(texts), self.batch_size):
                tokens = self.tokenizer(texts[i:i + self.batch_size]).to(self.device)
                out.append(self.model.encode_text(tokens, normalize=True).float().cpu())
        return torch.cat(out).numpy()


# ------------------------------------------------------------------------------------------- DINOv2
class DinoExtractor(Extractor):
    metric = "dino_mmd"
    preprocessing = (f"bicubic (antialiased) resize to {DINO_SIZE}x{DINO_SIZE}, ImageNet mean/std, "
                     "pooler_output (normalised CLS), L2-normalised")

    def __init__(self, name: str, device: str = "cpu"):
        from transformers import AutoModel

        from contract.models import resolve

        spec = resolve(name)
        try:
            self.model = AutoModel.from_pretrained(spec.id, **spec.load_kwargs()).eval().to(device)
        except OSError as exc:
            raise PrxError(f"--dino-model {name}: cannot load ({str(exc)[:200]}); pass --dino-model with a local "
                             "folder or a cached alias") from None
        rev = spec.revision if not spec.is_local else folder_digest(spec.id)
        self.key = f"dinov2:{spec.id if not spec.is_local else os.path.basename(spec.id)}@{rev}"
        self.device = device

    def _forward(self, images):
        import torch
        import torch.nn.functional as F

        x = images.to(self.device).float() / 255.0
        x = F.interpolate(x, size=(DINO_SIZE, DINO_SIZE), mode="bicubic", align_corners=False, antialias=True)
        mean = torch.tensor(IMAGENET_MEAN, device=x.device).view(1, 3, 1, 1)
        std = torch.tensor(IMAGENET_STD, device=x.device).view(1, 3, 1, 1)
        out = self.model(pixel_values=(x - mean) / std).pooler_output
        return F.normalize(out.float(), dim=-1)
