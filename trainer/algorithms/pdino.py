"""Perceptual DINO (P-DINO), as PRX's prx/algorithm/perceptual_dino.py:

    loss = flow loss + w x mean_i (1/|P|) sum_{p in P} (1 - cos(f_p(x0_pred_i), f_p(x0_i)))

f_p: the patch tokens of a frozen DINOv2 with registers (last_hidden_state after the final LayerNorm, PRX's
`x_norm_patchtokens`; CLS and register tokens dropped) on the image resized to R x R (bilinear,
align_corners False), mapped from [-1, 1] by (x + 1) / 2, clamped to [0, 1], then ImageNet mean/std. The
clean x0's features are computed without a graph; the encoder is frozen (eval, no gradients), so the gradient
reaches the denoiser through x0_pred only. x-prediction only (x0_pred is the model's output; refused
otherwise, as PRX refuses). PRX's configs (JIT-benchmark and flux1-vae-benchmark/Perceptual_DINO.yaml):
w 0.01, dinov2_vitb14_reg (here `--pdino-encoder dinov2-b`, facebook/dinov2-with-registers-base, loaded by
alias, hub id or folder as the REPA teacher is), resize_resolution 224, t_threshold 1 (every sample, so there
is no threshold here); manifests/ablations/perceptual-dino.yaml is that run.

PRX applies the loss to the raw denoiser output in pixel space (IdentityVAE, x0 RGB in [-1, 1]); here too on
shards encoded with `--vae none`. In a latent space x0_pred and x0 are decoded through the run's VAE first
(trainer/algorithms/perceptual.py). Other differences from PRX: its x0_gt is rebuilt from the v-space target
as x_t - max(t, 0.05) v, here the clean x0 is used (the same for t >= 0.05); it loads the encoder through
torch.hub and runs it in BF16, compiled, here through transformers under the trainer's autocast (BF16 on
CUDA), uncompiled; PRX's crop_size option (off in its configs) is not offered. A DINOv3-ViT folder or id works
too (PRX lists dinov3_vitl16): the patch tokens are taken after its register tokens the same way.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from trainer.algorithms.base import Algorithm, log
from trainer.algorithms.perceptual import autocast, check_x_prediction, to_pixels

IMAGENET_MEAN = (0.485, 0.456, 0.406)  # PRX's IMAGENET_DEFAULT_MEAN / STD
IMAGENET_STD = (0.229, 0.224, 0.225)


class PdinoEncoder(torch.nn.Module):
    """Images in [-1, 1] -> B x P x D patch tokens of a frozen DINO at resolution x resolution."""

    def __init__(self, model, num_register_tokens: int, resolution: int):
        super().__init__()
        self.model, self.skip, self.resolution = model, 1 + int(num_register_tokens), int(resolution)
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)
        self.requires_grad_(False).eval()

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        r = self.resolution
        x = F.interpolate(images, size=(r, r), mode="bilinear", align_corners=False)
        x = ((x + 1.0) / 2.0).clamp(0.0, 1.0)
        x = (x - self.mean.to(x.dtype)) / self.std.to(x.dtype)
        return self.model(pixel_values=x).last_hidden_state[:, self.skip:]


def load_encoder(name: str, resolution: int, device: torch.device = torch.device("cpu")) -> PdinoEncoder:
    """The frozen DINO by alias, hub id or folder (`--pdino-encoder`), as the REPA teacher is loaded."""
    from transformers import AutoConfig

    from contract.encoders.repa import DEFAULT_CLASS, teacher_class
    from contract.models import from_pretrained, loading, resolve

    spec = resolve(name, DEFAULT_CLASS)
    with loading(spec, "--pdino-encoder"):
        config = AutoConfig.from_pretrained(spec.id, **spec.load_kwargs())
    model = from_pretrained(spec, teacher_class(spec, config), flag="--pdino-encoder", dtype=torch.float32)
    return PdinoEncoder(model, getattr(config, "num_register_tokens", 0), resolution).to(device)


def pdino_per_sample(encoder: PdinoEncoder, pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """B values: the mean over patches of 1 - cos(f(pred), f(target)); the target's features without a graph."""
    f_pred = encoder(pred)
    with torch.no_grad():
        f_target = encoder(target.detach())
    return (1 - F.cosine_similarity(f_pred.float(), f_target.float(), dim=-1)).mean(dim=-1)


class PerceptualDino(Algorithm):
    """`--pdino-weight W` (> 0, x-prediction): loss += W x mean over patches of 1 - cos(DINO(x0 pred), DINO(x0))."""
    name, keys = "pdino", ("pdino_weight", "pdino_encoder", "pdino_resolution")

    @classmethod
    def enabled(cls, cfg) -> bool:
        return cfg.pdino_weight > 0

    def __init__(self, cfg, rank: int = 0, device: torch.device = torch.device("cpu")):
        super().__init__(cfg, rank, device)  # made in preflight: refused before any run of a study trains
        check_x_prediction(cfg, "--pdino-weight")

    def build(self, denoiser, spec) -> None:
        self.encoder = load_encoder(self.cfg.pdino_encoder, self.cfg.pdino_resolution, self.device)
        self.pixels = to_pixels(spec.vae, self.device)
        self.last: torch.Tensor | None = None
        log.info("P-DINO: %s at %d px, weight %g, in %s", self.cfg.pdino_encoder, self.cfg.pdino_resolution,
                 self.cfg.pdino_weight, "pixel space" if self.pixels.pixel_space else "pixels decoded by the run's VAE")

    def loss_terms(self, out, batch) -> dict[str, torch.Tensor]:
        pred, target = self.pixels.pair(out, self.cfg)
        with autocast(self.cfg, self.device):
            value = pdino_per_sample(self.encoder, pred, target).mean()
        self.last = value.detach()
        return {"pdino_loss": self.cfg.pdino_weight * value}

    def log_values(self, out, batch) -> dict[str, torch.Tensor]:
        return {"pdino": self.last} if self.last is not None else {}  # unweighted, PRX's loss/train/pdino
