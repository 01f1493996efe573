"""The VAE: a diffusers `AutoencoderKL` (FLUX.1's by default), `AutoencoderKLFlux2` or `AutoencoderDC` (DC-AE,
as PRX's dc_ae_sana) by alias or folder.

`mean` and `logvar` of the posterior are stored (float32), so the trainer can draw a fresh latent each
epoch; DC-AE's encoder is deterministic (`posterior: deterministic` in the record): its latent is stored as
`mean` (with a zero `logvar`) and the trainer uses it as it is; the normalisation into the denoiser's space is recorded, not applied (`contract.encoded.scale_latent`
applies it, `VAE.decode` its inverse): scaling and shift factors for AutoencoderKL, FLUX.2's batch-norm
running mean/std over 2x2-patchified latents for AutoencoderKLFlux2 (as diffusers' Flux2Pipeline does).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from contract.models import ModelSpec, loading, resolve
from contract.errors import PrxError

DEFAULT_CLASS = "diffusers.AutoencoderKL"
SUPPORTED = ("AutoencoderKL", "AutoencoderKLFlux2", "AutoencoderDC")
DETERMINISTIC = "deterministic"  # the record's `posterior` for a VAE without a posterior (DC-AE)
UNSUPPORTED: dict[str, str] = {}
BATCH_NORM_2X2 = "batch_norm_2x2"  # FLUX.2: patchify 2x2, (z - running_mean) / sqrt(running_var + eps)


def vae_spec(name: str) -> ModelSpec:
    spec = resolve(name, DEFAULT_CLASS)
    cls = (spec.cls or DEFAULT_CLASS).rpartition(".")[2]
    if cls in UNSUPPORTED:
        raise PrxError(f"--vae {name}: {UNSUPPORTED[cls]}")
    return spec


def load_config(spec: ModelSpec) -> dict[str, Any]:
    from diffusers import AutoencoderKL

    with loading(spec, "--vae"):
        cfg = AutoencoderKL.load_config(spec.id, **spec.load_kwargs())
    cls = cfg.get("_class_name", "AutoencoderKL")
    if cls in UNSUPPORTED:
        raise PrxError(f"--vae {spec.name}: {UNSUPPORTED[cls]}")
    if cls not in SUPPORTED:
        raise PrxError(f"--vae {spec.name} is a {cls}; the encode stage supports diffusers "
                       f"{' and '.join(SUPPORTED)} VAEs")
    return cfg


def vae_info(spec: ModelSpec, cfg: dict[str, Any] | None = None) -> dict[str, Any]:
    """What `_stage.json` and every sample's json record about the VAE."""
    cfg = cfg if cfg is not None else load_config(spec)
    cls = cfg.get("_class_name", "AutoencoderKL")
    info = {**spec.provenance(), "class": f"diffusers.{cls}",
            "scaling_factor": float(cfg.get("scaling_factor") or 1.0),
            "shift_factor": float(cfg.get("shift_factor") or 0.0),
            "latent_channels": int(cfg.get("latent_channels", 4)),
            "downsample": 2 ** (len(cfg.get("block_out_channels", [0])) - 1),
            "normalisation": "scale_shift", "dtype": "float32"}
    if cls == "AutoencoderKLFlux2":
        info.update(normalisation=BATCH_NORM_2X2, scaling_factor=1.0, shift_factor=0.0,
                    **batch_norm_stats(spec, float(cfg.get("batch_norm_eps", 1e-4))))
    if cls == "AutoencoderDC":  # its spatial_compression_ratio: 2 ** (encoder stages - 1); no shift
        info.update(latent_channels=int(cfg.get("latent_channels", 32)), shift_factor=0.0, posterior=DETERMINISTIC,
                    downsample=2 ** (len(cfg.get("encoder_block_out_channels", [0])) - 1))
    return info


WEIGHTS_FILE = "diffusion_pytorch_model.safetensors"


def batch_norm_stats(spec: ModelSpec, eps: float) -> dict[str, list[float]]:
    """FLUX.2's normalisation statistics per patchified channel (4 x latent_channels), as Flux2Pipeline reads
    them: mean = bn.running_mean, std = sqrt(bn.running_var + batch_norm_eps); read from the weights file
    alone (two buffers, not the model)."""
    import os

    import torch
    from safetensors import safe_open

    with loading(spec, "--vae"):
        if spec.is_local:
            path = os.path.join(spec.id, spec.subfolder or "", WEIGHTS_FILE)
        else:
            from huggingface_hub import hf_hub_download

            path = hf_hub_download(spec.id, WEIGHTS_FILE, **spec.load_kwargs())
        with safe_open(path, "pt") as f:
            mean, var = f.get_tensor("bn.running_mean").double(), f.get_tensor("bn.running_var").double()
    return {"bn_mean": mean.tolist(), "bn_std": torch.sqrt(var + eps).tolist()}


@dataclass
class VAE:
    model: Any
    spec: ModelSpec
    info: dict[str, Any]
    device: str
    bf16: bool  # BF16 autocast (GPU)

    def encode(self, pixels):
        """float32 B x 3 x H x W in [-1, 1] -> (mean, logvar), float32 on the CPU."""
        import torch

        x = pixels.to(self.device, non_blocking=True)
        with torch.inference_mode(), torch.autocast(device_type=x.device.type, dtype=torch.bfloat16,
                                                    enabled=self.bf16):
            out = self.model.encode(x)
        if self.info.get("posterior") == DETERMINISTIC:  # DC-AE: the latent itself
            latent = out.latent.float().cpu()
            return latent, torch.zeros_like(latent)
        return out.latent_dist.mean.float().cpu(), out.latent_dist.logvar.float().cpu()

    def decode(self, latents):
        """Denoiser-space latents B x C x h x w -> float32 B x 3 x H x W in [-1, 1] on the CPU.

        The inverse of what the trainer trains on: x / scaling_factor + shift_factor (the recorded factors,
        `contract.encoded.unscale_latent`, what PRXPipeline does), then the VAE's decoder."""
        import torch

        from contract.encoded import unscale_latent

        z = unscale_latent(latents.float(), self.info).to(self.device, non_blocking=True)
        with torch.inference_mode(), torch.autocast(device_type=z.device.type, dtype=torch.bfloat16,
                                                    enabled=self.bf16):
            out = self.model.decode(z, return_dict=False)[0]
        return out.float().clamp(-1.0, 1.0).cpu()


def to_uint8(pixels):
    """float B x 3 x H x W in [-1, 1] -> uint8 B x 3 x H x W (the rounding diffusers' postprocess does)."""
    import torch

    return ((pixels.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)


def to_uint8_truncated(pixels):
    """float B x 3 x H x W in [-1, 1] -> uint8 by truncation, as PRX's metric callback does
    (`torch.clamp(images * 255.0, 0, 255).to(torch.uint8)` on images in [0, 1])."""
    import torch

    return torch.clamp((pixels.float().clamp(-1, 1) + 1) / 2 * 255.0, 0, 255).to(torch.uint8)


def load_vae(name: str, device: str = "cpu", bf16: bool = False) -> VAE:
    import torch

    from contract.models import from_pretrained

    spec = vae_spec(name)
    cfg = load_config(spec)  # refuses other classes, and says how to get access to a gated repo
    cls = "diffusers." + cfg.get("_class_name", "AutoencoderKL")
    model = from_pretrained(spec, cls, flag="--vae", torch_dtype=torch.float32, low_cpu_mem_usage=False)
    model.requires_grad_(False).eval().to(device)
    return VAE(model, spec, vae_info(spec, cfg), device, bf16)
