"""REPA teacher features: DINOv2-with-registers (`--repa dinov2`) or DINOv3-ViT (`--repa dinov3`, PRX's
REPA-V3 / iREPA-V3 teacher) patch tokens at the denoiser's token grid.

The denoiser sees the latent (H/8 x W/8 for FLUX.1's VAE) in patches of `patch_size` (2 for PRX), so its
token grid is (H/16, W/16). The crop is resized to (grid_h * P, grid_w * P) for the teacher's P-pixel
patches (DINOv2: 14, so 224 x 224 for a 256 crop, as in REPA; DINOv3: 16, so 256 x 256), normalised with the
teacher's own processor mean/std, and the last hidden state's patch tokens (after the final LayerNorm, PRX's
`x_norm_patchtokens`; CLS and register tokens removed) are stored row-major, BF16. The shards record the
teacher's class, so training can require one family (`prx-train --repa-encoder dinov3`).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from contract.models import ModelSpec, loading, resolve

TEACHERS = {"dinov2": "transformers.Dinov2WithRegistersModel", "dinov3": "transformers.DINOv3ViTModel"}  # families
DEFAULT_CLASS = TEACHERS["dinov2"]
CLASSES = {"dinov2_with_registers": TEACHERS["dinov2"], "dinov3_vit": TEACHERS["dinov3"]}  # by config model_type


def teacher_class(spec: ModelSpec, config) -> str:
    """The class that loads the teacher: by its config's model_type (DINOv2 with registers, DINOv3-ViT), else the
    alias's class."""
    return CLASSES.get(getattr(config, "model_type", None)) or spec.cls or DEFAULT_CLASS


def load_config(spec: ModelSpec, flag: str = "--repa"):
    from transformers import AutoConfig

    with loading(spec, flag):
        return AutoConfig.from_pretrained(spec.id, **spec.load_kwargs())


def repa_info(spec: ModelSpec, token_patch: int, downsample: int, config=None) -> dict[str, Any]:
    config = config if config is not None else load_config(spec)
    return {**spec.provenance(), "class": teacher_class(spec, config), "hidden_size": int(config.hidden_size),
            "teacher_patch": int(config.patch_size),
            "num_register_tokens": int(getattr(config, "num_register_tokens", 0)),
            "grid": f"latent / {token_patch} (image / {downsample * token_patch})",
            "pixels_per_token": downsample * token_patch, "dtype": "bfloat16"}


@dataclass
class Teacher:
    model: Any
    info: dict[str, Any]
    mean: Any
    std: Any
    device: str
    bf16: bool

    def grid(self, height: int, width: int) -> tuple[int, int]:
        p = self.info["pixels_per_token"]
        return height // p, width // p

    def features(self, pixels):
        """float32 B x 3 x H x W in [-1, 1] -> B x (gh*gw) x D bfloat16 on the CPU."""
        import torch
        import torch.nn.functional as F

        gh, gw = self.grid(pixels.shape[-2], pixels.shape[-1])
        tp = self.info["teacher_patch"]
        x = pixels.to(self.device, non_blocking=True)
        x = (x + 1.0) / 2.0
        x = F.interpolate(x, size=(gh * tp, gw * tp), mode="bicubic", antialias=True, align_corners=False)
        x = (x - self.mean.to(x.device)) / self.std.to(x.device)
        with torch.inference_mode(), torch.autocast(device_type=x.device.type, dtype=torch.bfloat16,
                                                    enabled=self.bf16):
            hidden = self.model(pixel_values=x).last_hidden_state
        skip = 1 + self.info["num_register_tokens"]
        tokens = hidden[:, skip:]
        if tokens.shape[1] != gh * gw:
            raise RuntimeError(f"teacher returned {tokens.shape[1]} patch tokens, expected {gh}x{gw}")
        return tokens.to(torch.bfloat16).cpu()


def load_teacher(name: str, token_patch: int, downsample: int, device: str = "cpu", bf16: bool = False) -> Teacher:
    import torch
    from transformers import AutoImageProcessor

    from contract.models import from_pretrained

    spec = resolve(name, DEFAULT_CLASS)
    config = load_config(spec)
    info = repa_info(spec, token_patch, downsample, config)
    model = from_pretrained(spec, info["class"], flag="--repa", dtype=torch.float32)
    try:
        proc = AutoImageProcessor.from_pretrained(spec.id, **spec.load_kwargs())
        mean, std = proc.image_mean, proc.image_std
    except OSError:
        mean, std = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]  # ImageNet, DINOv2's own
    model.requires_grad_(False).eval().to(device)
    return Teacher(model, info, torch.tensor(mean).view(1, 3, 1, 1), torch.tensor(std).view(1, 3, 1, 1), device, bf16)
