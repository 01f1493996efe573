"""Contrastive flow matching (Stoica et al. 2025, arXiv 2506.05350), as PRX's ContrastiveFlowMatching:

    loss = flow loss - lambda x MSE(prediction, target rolled by one in the batch)

The rolled target is `target.roll(1, dims=0)` (sample i is pushed away from sample i-1's target), the MSE is
the mean over the micro-batch and every element, both in the space the flow loss compares (v-space; with
x-prediction, PRX's convert_x_to_v of both sides). A micro-batch of one sample has no other target: the term is
skipped there, as in PRX. PRX's flux1-vae-benchmark/contrastive.yaml uses lambda 0.05.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from trainer.algorithms.base import Algorithm


def contrastive_term(pred: torch.Tensor, target: torch.Tensor, weight: float) -> torch.Tensor:
    """-weight x MSE(pred, target.roll(1, dims=0)); 0 for a batch of one."""
    if pred.shape[0] < 2:
        return pred.new_zeros(())
    return -weight * F.mse_loss(pred, target.roll(1, dims=0), reduction="mean")


class ContrastiveFlowMatching(Algorithm):
    """`--contrastive-weight W` (> 0): loss -= W x MSE(prediction, rolled target)."""
    name, keys = "contrastive_fm", ("contrastive_weight",)

    @classmethod
    def enabled(cls, cfg) -> bool:
        return cfg.contrastive_weight > 0

    def loss_terms(self, out, batch) -> dict[str, torch.Tensor]:
        return {"contrastive_loss": contrastive_term(out.pred, out.target, self.cfg.contrastive_weight)}
