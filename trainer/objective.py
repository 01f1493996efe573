"""Rectified flow, as PRX trains it (docs/training.md).

    x_t = (1 - t) x0 + t eps,      target v = eps - x0      (t = 0 data, t = 1 noise; diffusers' convention:
                                                             PRXPipeline passes sigma = t to the model)
    t ~ shift(sigmoid(N(mu, sigma)))  with probability 1 - u,  U[1e-3, 1) with probability u  (mu 0, sigma 1,
        u 0.1); shift: t' = s t / (1 + (s - 1) t) applies to the logit-normal part only, as in PRX's code
    v-prediction: loss = |model(x_t, t) - v|^2
    x-prediction: the model predicts x0; loss in v-space with v_hat = (x_t - x_hat) / max(t, t_min) and the
        target clamped the same way, v = (x_t - x0) / max(t, t_min) (PRX's convert_x_to_v), so a perfect x0
        has zero loss at every t
    caption dropout: with probability p the sample's embedding and mask are replaced by the stored empty
    prompt's (once, here; the loader never drops captions)

All randomness comes from an explicit torch.Generator (saved in checkpoints), drawn on the CPU so a run
is the same on any device.
"""
from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass

import torch


UNIFORM_T_MIN = 1e-3  # PRX draws the uniform part of t from [1e-3, 1)


def logit_normal_uniform(n: int, generator: torch.Generator | None = None, mean: float = 0.0, std: float = 1.0,
                         uniform_fraction: float = 0.1, shift: float = 1.0) -> torch.Tensor:
    """n timesteps: shift(sigmoid(N(mean, std))), except a `uniform_fraction` of them drawn from U[1e-3, 1)
    (unshifted)."""
    normal = torch.randn(n, generator=generator)
    uniform = torch.rand(n, generator=generator)
    pick = torch.rand(n, generator=generator)
    t = shift_timesteps(torch.sigmoid(mean + std * normal), shift)
    return torch.where(pick < uniform_fraction, UNIFORM_T_MIN + (1 - UNIFORM_T_MIN) * uniform, t)


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


def autocast_dtype(cfg, device: torch.device) -> torch.dtype | None:
    """The trainer's compute dtype: BF16 autocast with --autocast bf16, or auto on CUDA; None (FP32) otherwise."""
    if cfg.autocast == "bf16" or (cfg.autocast == "auto" and device.type == "cuda"):
        return torch.bfloat16
    return None


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
    return logit_normal_uniform(n, generator, oc.logit_mean, oc.logit_std, oc.uniform_fraction, oc.shift)


@dataclass
class Losses:
    flow: torch.Tensor                     # B: flow-matching MSE per sample (float32)
    repa_cos: torch.Tensor | None = None   # B: mean REPA cosine per sample, when the model returned one
    pred: torch.Tensor | None = None       # B x C x H x W: the prediction in v-space (float32), what `flow` compares
    target: torch.Tensor | None = None     # B x C x H x W: the v-space target
    t: torch.Tensor | None = None          # B: the timesteps, on the prediction's device
    x0_pred: torch.Tensor | None = None    # B x C x H x W: the prediction as x0 (float32, with its graph): the
                                           # model's output itself with x-prediction, x_t - t v_hat with v
    x0: torch.Tensor | None = None         # B x C x H x W: the clean x0 the sample was noised from (no graph)


def losses(model, x0: torch.Tensor, eps: torch.Tensor, t: torch.Tensor, emb: torch.Tensor, mask: torch.Tensor,
           oc: ObjectiveConfig, autocast_dtype: torch.dtype | None = None, **model_kwargs) -> Losses:
    """MSE in v-space per sample (mean over C, H, W), in float32; `model_kwargs` (REPA features, route seed)
    go to the model (trainer.model.Denoiser), which may return a REPA cosine as its second output."""
    x_t, v = interpolate(x0, eps, t)
    ctx = torch.autocast(x0.device.type, dtype=autocast_dtype) if autocast_dtype else nullcontext()
    wdtype = next(model.parameters()).dtype  # inputs in the weights' dtype (BF16 embeddings, FP32 latents)
    kwargs = {k: a for k, a in model_kwargs.items() if a is not None}
    with ctx:
        outs = model(hidden_states=x_t.to(wdtype), timestep=t.to(x0.device), encoder_hidden_states=emb.to(wdtype),
                     attention_mask=mask, return_dict=False, **kwargs)
    out = outs[0].float()
    tt = t.to(x0.device)
    if oc.prediction == "x":  # PRX's convert_x_to_v on both sides
        pred, target = velocity_from_x(x_t, out, tt, oc.x_pred_t_min), velocity_from_x(x_t, x0, tt, oc.x_pred_t_min)
    else:
        pred, target = out, v
    target = target.float()
    flow = ((pred - target) ** 2).flatten(1).mean(1)
    x0_pred = out if oc.prediction == "x" else x_t - tt.view(-1, *([1] * (x_t.ndim - 1))).to(x_t.dtype) * out
    return Losses(flow, outs[1] if len(outs) > 1 else None, pred, target, tt, x0_pred, x0.detach())


def per_sample_loss(model, x0: torch.Tensor, eps: torch.Tensor, t: torch.Tensor, emb: torch.Tensor,
                    mask: torch.Tensor, oc: ObjectiveConfig, autocast_dtype: torch.dtype | None = None) -> torch.Tensor:
    """The flow-matching loss per sample (see `losses`)."""
    return losses(model, x0, eps, t, emb, mask, oc, autocast_dtype).flow


def draw_noise(x0_shape: torch.Size, oc: ObjectiveConfig, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    t = sample_timesteps(x0_shape[0], oc, generator)
    eps = torch.randn(x0_shape, generator=generator)
    return eps, t
