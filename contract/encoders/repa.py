"""REPA teacher features: DINOv2-with-registers patch tokens at the denoiser's token grid.

The denoiser sees the latent (H/8 x W/8 for FLUX.1's VAE) in patches of `patch_size` (2 for PRX), so its
token grid is (H/16, W/16). The crop is resized to (grid_h * 14, grid_w * 14) for DINOv2's 14-pixel
patches (224 x 224 for a 256 crop, as in REPA), normalised with the teacher's own processor mean/std, and
the last hidden state's patch tokens (CLS and register tokens removed) are stored row-major, BF16.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from contract.models import ModelSpec, loading, resolve

DEFAULT_CLASS = "transformers.Dinov2WithRegistersModel"


def load_config(spec: ModelSpec):
    from transformers import AutoConfig

    with loading(spec, "--repa"):
        return AutoConfig.from_pretrained(spec.id, **spec.load_kwargs())


def repa_info(spec: ModelSpec, token_patch: int, downsample: int, config=None) -> dict[str, Any]:
    config = config if config is not None else load_config(spec)
    return {**spec.provenance(), "class": spec.cls or DEFAULT_CLASS, "hidden_size": int(config.hidden_size),
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
    model = from_pretrained(spec, spec.cls or DEFAULT_CLASS, flag="--repa", dtype=torch.float32)
    try:
        proc = AutoImageProcessor.from_pretrained(spec.id, **spec.load_kwargs())
        mean, std = proc.image_mean, proc.image_std
    except OSError:
        mean, std = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]  # ImageNet, DINOv2's own
    model.requires_grad_(False).eval().to(device)
    return Teacher(model, info, torch.tensor(mean).view(1, 3, 1, 1), torch.tensor(std).view(1, 3, 1, 1), device, bf16)
