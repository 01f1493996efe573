"""PRX's optimiser: AdamW lr 1e-4, betas (0.9, 0.95), eps 1e-15, no weight decay, 1,000-step linear warmup
then constant, global gradient-norm clip 0.2. The learning rate is a pure function of the step, so a resumed
run needs only the step to restore the schedule."""
from __future__ import annotations

import torch


def lr_at(step: int, lr: float, warmup_steps: int) -> float:
    """Learning rate of optimizer step `step` (0-based): lr * min(1, (step + 1) / warmup)."""
    if warmup_steps <= 0:
        return lr
    return lr * min(1.0, (step + 1) / warmup_steps)


def build_optimizer(model: torch.nn.Module, cfg) -> torch.optim.AdamW:
    params = [p for p in model.parameters() if p.requires_grad]
    return torch.optim.AdamW(params, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.adam_eps,
                             weight_decay=cfg.weight_decay, foreach=None)


def set_lr(optimizer: torch.optim.Optimizer, value: float) -> None:
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
