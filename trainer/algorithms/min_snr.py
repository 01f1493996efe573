"""Min-SNR-gamma loss weighting (Hang et al. 2023), for flow matching's velocity target. Not in PRX: the seeds
add it as the well-known baseline.

Min-SNR weights the x0-space error by min(SNR(t), gamma). With x_t = (1 - t) x0 + t eps the SNR is
((1 - t) / t)^2, and the velocity v = eps - x0 errs by the x0 error over t (x0_hat = x_t - t v_hat), so the
v-space loss is the x0 loss / t^2. The weight on the v-space loss is therefore

    w(t) = min(SNR(t), gamma) x t^2 = min((1 - t)^2, gamma t^2)

(diffusion's v-prediction form, min(SNR, gamma) / (SNR + 1), is the same rule for the VP path's v). With
x-prediction the loss is also in v-space, divided by max(t, t_min)^2 (PRX's convert_x_to_v), so
w(t) = min(SNR(t), gamma) x max(t, t_min)^2. The weights are at most 1 and are not renormalised: the step's loss
is smaller than the unweighted one, as in the paper. Logged: the batch's mean weight (`min_snr_weight`); the
logged `flow_loss` and the fixed-batch eval loss stay unweighted.
"""
from __future__ import annotations

import torch

from trainer.algorithms.base import Algorithm


def min_snr_weights(t: torch.Tensor, gamma: float, prediction: str = "v", t_min: float = 0.05) -> torch.Tensor:
    """Per-sample weight of the v-space loss at timesteps t (float32)."""
    t = t.float()
    snr = ((1 - t) / t.clamp(min=1e-12)) ** 2
    scale = t.clamp(min=t_min) if prediction == "x" else t
    return torch.minimum(snr, torch.full_like(snr, gamma)) * scale ** 2


class MinSnr(Algorithm):
    """`--min-snr-gamma G` (> 0): the flow loss of each sample times min(SNR(t), G) t^2."""
    name, keys = "min_snr", ("min_snr_gamma",)

    @classmethod
    def enabled(cls, cfg) -> bool:
        return cfg.min_snr_gamma > 0

    def loss_weights(self, out, batch) -> torch.Tensor:
        return min_snr_weights(out.t, self.cfg.min_snr_gamma, self.cfg.prediction, self.cfg.x_pred_t_min)

    def log_values(self, out, batch) -> dict[str, torch.Tensor]:
        return {"min_snr_weight": self.loss_weights(out, batch).mean()}
