"""PRX's optimisers, and the learning-rate schedule that drives them.

Baseline: AdamW lr 1e-4, betas (0.9, 0.95), eps 1e-15, no weight decay, 1,000-step linear warmup then
constant, global gradient-norm clip 0.2. The learning rate is a pure function of the step, so a resumed
run needs only the step to restore the schedule.

Muon ablation (`--optimizer muon`, PRX: FID 18.2 -> 15.5): PRX's split, every 2-D weight whose name
contains `blocks` goes to `torch.optim.Muon`, every other parameter (embeddings, final layer, norms,
auxiliary modules) to AdamW with PRX's muon.yaml `adam_config` (eps 1e-8, not the baseline's 1e-15).
Muon's `adjust_lr_fn="match_rms_adamw"` (PRX's `rms_scale: true`) scales each matrix's update to AdamW's RMS,
so one learning rate and one schedule drive both. Muon is an optimizer, not a training algorithm
(trainer/algorithms/): it is chosen here, where the optimizer is built.

The trainer sees one `Optimizers` object (step / zero_grad / param_groups); checkpoints store each member's
state under its own prefix (`adamw.`, `muon.`).
"""
from __future__ import annotations

from typing import Any, Iterable

import torch


def lr_at(step: int, lr: float, warmup_steps: int) -> float:
    """Learning rate of optimizer step `step` (0-based): lr * min(1, (step + 1) / warmup)."""
    if warmup_steps <= 0:
        return lr
    return lr * min(1.0, (step + 1) / warmup_steps)


class Optimizers:
    """One or more torch optimizers over disjoint parameters, driven as one: `members` maps a name
    (`adamw`, `muon`) to the optimizer; `param_groups` lists every member's groups (the LR schedule sets
    them all)."""

    def __init__(self, members: dict[str, torch.optim.Optimizer]):
        self.members = dict(members)

    @property
    def param_groups(self) -> list[dict[str, Any]]:
        return [g for opt in self.members.values() for g in opt.param_groups]

    def step(self) -> None:
        for opt in self.members.values():
            opt.step()

    def zero_grad(self, set_to_none: bool = True) -> None:
        for opt in self.members.values():
            opt.zero_grad(set_to_none=set_to_none)


def split_muon_parameters(named: Iterable[tuple[str, torch.nn.Parameter]]):
    """(Muon parameters, AdamW parameters, Muon names): 2-D trainable weights named `*blocks*` go to Muon."""
    muon, adamw, names = [], [], []
    for name, p in named:
        if not p.requires_grad:
            continue
        if p.ndim == 2 and "blocks" in name:
            muon.append(p)
            names.append(name)
        else:
            adamw.append(p)
    if not muon:
        raise ValueError("--optimizer muon: no 2-D weight whose name contains 'blocks' is trainable, so Muon would "
                         "train nothing; use --optimizer adamw for this model")
    return muon, adamw, names


MUON_ADAMW_EPS = 1e-8  # PRX's configs/yamls/optimizer/muon.yaml adam_config.eps


def _adamw(params: list, cfg, eps: float) -> torch.optim.AdamW:
    return torch.optim.AdamW(params, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=eps,
                             weight_decay=cfg.weight_decay, foreach=None)


def build_optimizer(model: torch.nn.Module, cfg) -> Optimizers:
    """AdamW over every trainable parameter, or PRX's Muon + AdamW split (`cfg.optimizer`)."""
    if getattr(cfg, "optimizer", "adamw") == "adamw":
        return Optimizers({"adamw": _adamw([p for p in model.parameters() if p.requires_grad], cfg, cfg.adam_eps)})
    muon, rest, _ = split_muon_parameters(model.named_parameters())
    members: dict[str, torch.optim.Optimizer] = {
        "muon": torch.optim.Muon(muon, lr=cfg.lr, weight_decay=cfg.muon_weight_decay, momentum=cfg.muon_momentum,
                                 nesterov=cfg.muon_nesterov, ns_steps=cfg.muon_ns_steps,
                                 adjust_lr_fn=cfg.muon_adjust_lr)}
    if rest:
        members["adamw"] = _adamw(rest, cfg, MUON_ADAMW_EPS)
    return Optimizers(members)


def set_lr(optimizer, value: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = value


def clip_grad(model: torch.nn.Module, max_norm: float, as_tensor: bool = False) -> float | torch.Tensor:
    """Clip the global gradient norm (max_norm <= 0: only measure it); returns the norm before clipping
    (as_tensor: a device tensor, no host sync)."""
    params = [p for p in model.parameters() if p.grad is not None]
    if not params:
        return torch.zeros(()) if as_tensor else 0.0
    if max_norm and max_norm > 0:
        norm = torch.nn.utils.clip_grad_norm_(params, max_norm)
    else:
        norm = torch.nn.utils.get_total_norm([p.grad for p in params])
    return norm if as_tensor else float(norm)
