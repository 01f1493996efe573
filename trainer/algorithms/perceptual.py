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

from trainer.algorithms.base import Algorithm, log


def check_x_prediction(cfg, flag: str) -> None:
    """Refuse before step 1 unless the model predicts x0 (PRX's guard on both losses)."""
    if getattr(cfg, "prediction", "v") != "x":
        raise ValueError(f"{flag} compares the predicted x0 with the clean x0, as PRX does with x-prediction only: "
                         "add --prediction x (manifests/ablations/x-prediction.yaml, or jit-pixel.yaml in pixel "
                         "space)")


def autocast(cfg, device: torch.device):
    """The trainer's autocast (trainer.objective.autocast_dtype: BF16 on CUDA, as PRX runs both losses)."""
    from trainer.objective import autocast_dtype

    dtype = autocast_dtype(cfg, device)
    return torch.autocast(device.type, dtype=dtype) if dtype else nullcontext()


class ToPixels:
    """Denoiser-space x0 -> float32 RGB B x 3 x H x W (about [-1, 1]) on the training device."""

    def __init__(self, vae_record: dict[str, Any], device: torch.device):
        from contract.encoders.pixels import is_pixel_space

        self.device, self.vae = device, None
        if not is_pixel_space(vae_record.get("class")):
            from contract.encoders.vae import load_vae
            from contract.models import model_name

            self.vae = load_vae(model_name(vae_record), device=str(device))  # frozen, eval, float32
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


class PerceptualLoss(Algorithm):
    """A loss between the predicted and the clean x0 as pixels, x-prediction only (LPIPS, P-DINO): a subclass
    names its weight key, loads its frozen network in `load` and scores a pair in `distance` (B values).

        loss += weight x mean_i distance(x0_pred_i, x0_i)     (logged: `<name>_loss`, and `<name>` unweighted)
    """
    weight_key = ""  # the TrainConfig key of the weight (0 = off)

    @classmethod
    def enabled(cls, cfg) -> bool:
        return getattr(cfg, cls.weight_key) > 0

    def __init__(self, cfg, rank: int = 0, device: torch.device = torch.device("cpu")):
        super().__init__(cfg, rank, device)  # made in preflight: refused before any run of a study trains
        check_x_prediction(cfg, "--" + self.weight_key.replace("_", "-"))

    def load(self) -> str:
        """Load the frozen network; returns what to log about it."""
        raise NotImplementedError

    def distance(self, pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def build(self, denoiser, spec) -> None:
        what = self.load()
        self.pixels = to_pixels(spec.vae, self.device)
        self.last: torch.Tensor | None = None
        log.info("%s: %s, weight %g, in %s", self.name, what, getattr(self.cfg, self.weight_key),
                 "pixel space" if self.pixels.pixel_space else "pixels decoded by the run's VAE")

    def loss_terms(self, out, batch) -> dict[str, torch.Tensor]:
        pred, target = self.pixels.pair(out, self.cfg)
        with autocast(self.cfg, self.device):
            value = self.distance(pred, target).mean()
        self.last = value.detach()
        return {f"{self.name}_loss": getattr(self.cfg, self.weight_key) * value}

    def log_values(self, out, batch) -> dict[str, torch.Tensor]:
        return {self.name: self.last} if self.last is not None else {}  # unweighted, PRX's loss/train/<name>
