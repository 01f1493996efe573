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
