"""EMA of the weights with PRX's constant decay (not diffusers' EMAModel, whose decay ramps up).

Every `every` optimizer steps:  ema <- decay x ema + (1 - decay) x weights,  starting from the initial
weights. After k updates with weights w_1 .. w_k:  ema_k = d^k w_0 + (1 - d) sum_i d^(k - i) w_i.

The shadow lives beside the live weights (same dtype and device); `applied(module)` swaps it in for an
evaluation or for writing `transformer_ema/` with the model's own `save_pretrained`, then swaps back.
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import torch
from torch import nn

from trainer.algorithms.base import Algorithm


class EMA:
    def __init__(self, module: nn.Module, decay: float, every: int = 1, skip: tuple[str, ...] = ()):
        """Track every trainable parameter of `module` whose name does not start with one of `skip`."""
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"EMA decay {decay} must be in [0, 1)")
        self.decay, self.every = float(decay), int(every)
        self.shadow: dict[str, torch.Tensor] = {
            n: p.detach().clone() for n, p in module.named_parameters()
            if p.requires_grad and not n.startswith(skip)}

    @torch.no_grad()
    def update(self, module: nn.Module) -> None:
        params = dict(module.named_parameters())
        for name, s in self.shadow.items():
            s.lerp_(params[name].detach(), 1.0 - self.decay)

    def maybe_update(self, module: nn.Module, step: int) -> bool:
        """Update after optimizer step `step` (1-based) when it is a multiple of `every`."""
        if step % self.every == 0:
            self.update(module)
            return True
        return False

    @contextmanager
    def applied(self, module: nn.Module) -> Iterator[None]:
        """Swap the EMA weights into `module` for the duration of the block."""
        params = dict(module.named_parameters())
        live = {n: params[n].detach().clone() for n in self.shadow}
        with torch.no_grad():
            for n, s in self.shadow.items():
                params[n].copy_(s)
        try:
            yield
        finally:
            with torch.no_grad():
                for n, t in live.items():
                    params[n].copy_(t)

    def tensors(self, prefix: str = "") -> dict[str, torch.Tensor]:
        return {n[len(prefix):]: s for n, s in self.shadow.items() if n.startswith(prefix)}

    @torch.no_grad()
    def load(self, tensors: dict[str, torch.Tensor], prefix: str = "") -> None:
        """Restore shadow entries `prefix + name` from `tensors` (names without the prefix)."""
        for name, t in tensors.items():
            key = prefix + name
            if key not in self.shadow:
                raise ValueError(f"EMA state has {key!r}, which the model does not have")
            self.shadow[key].copy_(t)


# ------------------------------------------------------------------------------------------- the algorithm
class Ema(Algorithm):
    """`--ema-decay D` (> 0): the shadow of every trainable parameter of the denoiser except the REPA projector
    (training only), updated after every `ema_every`-th optimizer step; evaluated as eval/loss_ema and saved as
    transformer_ema/ (+ ema.sprint_fusion.* in aux.safetensors)."""
    name, keys = "ema", ("ema_decay", "ema_every")
    SKIP = ("aux.repa_projector",)

    @classmethod
    def enabled(cls, cfg) -> bool:
        return cfg.ema_decay > 0

    def build(self, denoiser, spec) -> None:
        self.denoiser = denoiser
        self.ema = EMA(denoiser, self.cfg.ema_decay, self.cfg.ema_every, skip=self.SKIP)

    def start(self, step: int) -> None:
        if step == 0:  # a fresh run: the shadow starts from the weights of step 0 (a fine-tune parent's included)
            self.ema = EMA(self.denoiser, self.cfg.ema_decay, self.cfg.ema_every, skip=self.SKIP)

    def after_optimizer_step(self, step: int) -> None:
        self.ema.maybe_update(self.denoiser, step)

    def eval_weights(self):
        return self.ema.applied(self.denoiser)

    def state_dict(self) -> dict[str, torch.Tensor]:
        """transformer.* (-> transformer_ema/) and the auxiliary modules' shadow without its `aux.` prefix."""
        return {(n if n.startswith("transformer.") else n[len("aux."):]): s for n, s in self.ema.shadow.items()}

    def load_state_dict(self, tensors: dict[str, torch.Tensor]) -> None:
        self.ema.load({(n if n.startswith("transformer.") else "aux." + n): t for n, t in tensors.items()})
