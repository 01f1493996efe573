"""What the perceptual losses (LPIPS: trainer/algorithms/lpips.py, P-DINO: trainer/algorithms/pdino.py) share:
the x-prediction requirement, the trainer's compute dtype, and the way from the denoiser's space to RGB pixels.

PRX applies both losses to the raw denoiser output in pixel space (its JiT runs, IdentityVAE), where x0 is
already RGB in [-1, 1]: so does this trainer on shards encoded with `prx-data encode --vae none`. In a latent
space the predicted x0 is first decoded through the run's VAE (the one the shards record), with its gradient,
and the clean x0 without: the contract's own inverse normalisation (`contract.encoded.unscale_latent`, what
`VAE.decode` and so the sampler use) and the VAE's decoder, frozen, on the training device; no clamp on the
prediction, so values outside [-1, 1] still get a gradient.
"""
from __future__ import annotations

import json
import weakref
from contextlib import nullcontext
from typing import Any

import torch


def check_x_prediction(cfg, flag: str) -> None:
    """Refuse before step 1 unless the model predicts x0 (PRX's guard on both losses)."""
    if getattr(cfg, "prediction", "v") != "x":
        raise ValueError(f"{flag} compares the predicted x0 with the clean x0, as PRX does with x-prediction only: "
                         "add --prediction x (manifests/ablations/x-prediction.yaml, or jit-pixel.yaml in pixel "
                         "space)")


def autocast(cfg, device: torch.device):
    """The trainer's compute dtype, its rule (trainer.train.autocast_dtype, not imported: no import cycle): BF16
    autocast with --autocast bf16, or auto on CUDA (as PRX runs both losses in BF16); none otherwise."""
    on = cfg.autocast == "bf16" or (cfg.autocast == "auto" and device.type == "cuda")
    return torch.autocast(device.type, dtype=torch.bfloat16) if on else nullcontext()


class ToPixels:
    """Denoiser-space x0 -> float32 RGB B x 3 x H x W (about [-1, 1]) on the training device."""

    def __init__(self, vae_record: dict[str, Any], device: torch.device):
        from contract.encoders.pixels import is_pixel_space

        self.device, self.vae = device, None
        if not is_pixel_space(vae_record.get("class")):
            from contract.encoders.vae import load_vae
            from contract.models import aliases

            # the recorded VAE, named as trainer.sample.model_name does: its alias if it still is one, else its id
            name = vae_record.get("name") if vae_record.get("name") in aliases() else vae_record["id"]
            self.vae = load_vae(name, device=str(device))  # frozen, eval, float32
        self._key: Any = None
        self._pixels: tuple[torch.Tensor, torch.Tensor] | None = None

    @property
    def pixel_space(self) -> bool:
        return self.vae is None

    def decode(self, x: torch.Tensor, grad: bool, cfg=None) -> torch.Tensor:
        """One batch of x0 as pixels; `grad`: keep the graph back to `x` (the VAE's weights get none)."""
        if self.vae is None:
            return x.float()
        from contract.encoded import unscale_latent

        z = unscale_latent(x.float(), self.vae.info).to(self.device)
        with torch.set_grad_enabled(grad), (autocast(cfg, self.device) if cfg is not None else nullcontext()):
            return self.vae.model.decode(z, return_dict=False)[0].float()

    def pair(self, out, cfg=None) -> tuple[torch.Tensor, torch.Tensor]:
        """(predicted x0, clean x0) of one micro-batch's `trainer.objective.Losses` as pixels; decoded once per
        micro-batch when both losses are on."""
        if self.vae is None:
            return out.x0_pred.float(), out.x0.detach().float()
        if self._key is not None and self._key() is out.x0_pred:
            return self._pixels
        self._key = weakref.ref(out.x0_pred)
        self._pixels = (self.decode(out.x0_pred, True, cfg), self.decode(out.x0.detach(), False, cfg).detach())
        return self._pixels


_DECODERS: dict[tuple[str, str], ToPixels] = {}


def to_pixels(vae_record: dict[str, Any], device: torch.device) -> ToPixels:
    """The run's `ToPixels`, its VAE loaded once per process however many losses use it."""
    key = (json.dumps(vae_record, sort_keys=True, default=str), str(device))
    if key not in _DECODERS:
        _DECODERS.clear()  # one run at a time: a new run's VAE replaces the last one's
        _DECODERS[key] = ToPixels(vae_record, device)
    return _DECODERS[key]
