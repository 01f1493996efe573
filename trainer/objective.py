"""Rectified flow, as PRX trains it (ARCHITECTURE.md, Trainer).

    x_t = (1 - t) x0 + t eps,      target v = eps - x0      (t = 0 data, t = 1 noise; diffusers' convention:
                                                             PRXPipeline passes sigma = t to the model)
    t ~ sigmoid(N(mu, sigma))  with probability 1 - u,  U[0, 1] with probability u   (mu 0, sigma 1, u 0.1)
    shift: t' = s t / (1 + (s - 1) t)
    v-prediction: loss = |model(x_t, t) - v|^2
    x-prediction: the model predicts x0; loss in v-space with v_hat = (x_t - x_hat) / max(t, t_min)
    caption dropout: with probability p the sample's embedding and mask are replaced by the stored empty
    prompt's (once, here; the loader never drops captions)

All randomness comes from an explicit torch.Generator (saved in checkpoints), drawn on the CPU so a run
is the same on any device.
"""
from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass

import torch


def logit_normal_uniform(n: int, generator: torch.Generator | None = None, mean: float = 0.0, std: float = 1.0,
                         uniform_fraction: float = 0.1) -> torch.Tensor:
    """n timesteps in [0, 1]: sigmoid(N(mean, std)), except a `uniform_fraction` of them drawn from U[0, 1]."""
    normal = torch.randn(n, generator=generator)
    uniform = torch.rand(n, generator=generator)
    pick = torch.rand(n, generator=generator)
    t = torch.sigmoid(mean + std * normal)
    return torch.where(pick < uniform_fraction, uniform, t)


def shift_timesteps(t: torch.Tensor, shift: float) -> torch.Tensor:
    """t' = s t / (1 + (s - 1) t): s > 1 moves mass toward noise (t = 1)."""
    if shift == 1.0:
        return t
    return shift * t / (1 + (shift - 1) * t)


def interpolate(x0: torch.Tensor, eps: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(x_t, v) = ((1 - t) x0 + t eps, eps - x0), t broadcast over the non-batch dims."""
    tb = t.view(-1, *([1] * (x0.ndim - 1))).to(x0.dtype)
    return (1 - tb) * x0 + tb * eps, eps - x0


def velocity_from_x(x_t: torch.Tensor, x_hat: torch.Tensor, t: torch.Tensor, t_min: float = 0.05) -> torch.Tensor:
    """x-prediction -> velocity: (x_t - x_hat) / max(t, t_min)."""
    tb = t.clamp(min=t_min).view(-1, *([1] * (x_t.ndim - 1))).to(x_t.dtype)
    return (x_t - x_hat) / tb


def caption_dropout(emb: torch.Tensor, mask: torch.Tensor, empty_emb: torch.Tensor, empty_mask: torch.Tensor,
                    p: float, generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Replace each sample's (embedding, mask) by the empty prompt's with probability p; returns (emb, mask, dropped)."""
    b = emb.shape[0]
    drop = torch.rand(b, generator=generator) < p
    if p <= 0 or not drop.any():
        return emb, mask, drop
    d = drop.to(emb.device)
    emb = torch.where(d.view(b, 1, 1), empty_emb.to(emb.dtype).unsqueeze(0).expand_as(emb), emb)
    mask = torch.where(d.view(b, 1), empty_mask.unsqueeze(0).expand_as(mask), mask)
    return emb, mask, drop


@dataclass
class ObjectiveConfig:
    prediction: str = "v"
    x_pred_t_min: float = 0.05
    logit_mean: float = 0.0
    logit_std: float = 1.0
    uniform_fraction: float = 0.1
    shift: float = 1.0
    caption_dropout: float = 0.1

    @classmethod
    def from_train_config(cls, cfg) -> "ObjectiveConfig":
        return cls(**{k: getattr(cfg, k) for k in cls.__dataclass_fields__})


def sample_timesteps(n: int, oc: ObjectiveConfig, generator: torch.Generator | None = None) -> torch.Tensor:
    t = logit_normal_uniform(n, generator, oc.logit_mean, oc.logit_std, oc.uniform_fraction)
    return shift_timesteps(t, oc.shift)


def per_sample_loss(model, x0: torch.Tensor, eps: torch.Tensor, t: torch.Tensor, emb: torch.Tensor,
                    mask: torch.Tensor, oc: ObjectiveConfig, autocast_dtype: torch.dtype | None = None) -> torch.Tensor:
    """MSE in v-space per sample (mean over C, H, W), in float32."""
    x_t, v = interpolate(x0, eps, t)
    ctx = torch.autocast(x0.device.type, dtype=autocast_dtype) if autocast_dtype else nullcontext()
    wdtype = next(model.parameters()).dtype  # inputs in the weights' dtype (BF16 embeddings, FP32 latents)
    with ctx:
        out = model(hidden_states=x_t.to(wdtype), timestep=t.to(x0.device), encoder_hidden_states=emb.to(wdtype),
                    attention_mask=mask, return_dict=False)[0]
    out = out.float()
    pred = velocity_from_x(x_t, out, t.to(x0.device), oc.x_pred_t_min) if oc.prediction == "x" else out
    return ((pred - v.float()) ** 2).flatten(1).mean(1)


def draw_noise(x0_shape: torch.Size, oc: ObjectiveConfig, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    t = sample_timesteps(x0_shape[0], oc, generator)
    eps = torch.randn(x0_shape, generator=generator)
    return eps, t
