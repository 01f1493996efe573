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

from trainer.algorithms.perceptual import PerceptualLoss

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
    from contract.encoders.repa import DEFAULT_CLASS, load_config, teacher_class
    from contract.models import from_pretrained, resolve

    spec = resolve(name, DEFAULT_CLASS)
    config = load_config(spec, "--pdino-encoder")
    model = from_pretrained(spec, teacher_class(spec, config), flag="--pdino-encoder", dtype=torch.float32)
    return PdinoEncoder(model, getattr(config, "num_register_tokens", 0), resolution).to(device)


def pdino_per_sample(encoder: PdinoEncoder, pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """B values: the mean over patches of 1 - cos(f(pred), f(target)); the target's features without a graph."""
    f_pred = encoder(pred)
    with torch.no_grad():
        f_target = encoder(target.detach())
    return (1 - F.cosine_similarity(f_pred.float(), f_target.float(), dim=-1)).mean(dim=-1)


class PerceptualDino(PerceptualLoss):
    """`--pdino-weight W` (> 0, x-prediction): loss += W x mean over patches of 1 - cos(DINO(x0 pred), DINO(x0))."""
    name, keys, weight_key = "pdino", ("pdino_weight", "pdino_encoder", "pdino_resolution"), "pdino_weight"

    def load(self) -> str:
        self.encoder = load_encoder(self.cfg.pdino_encoder, self.cfg.pdino_resolution, self.device)
        return f"{self.cfg.pdino_encoder} at {self.cfg.pdino_resolution} px"

    def distance(self, pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return pdino_per_sample(self.encoder, pred, target)
