"""TREAD (Krause et al. 2025) as a training algorithm: `--routing tread`. The routing itself (which tokens, the
routed forward) is trainer/algorithms/routing.py, run by the denoiser; this sets it up, seeds each forward's
route and counts it (log line, MFU)."""
from __future__ import annotations

from trainer.algorithms.base import Algorithm
from trainer.algorithms.routing import check_blocks, routed_count
from trainer.data import seed_for


class Tread(Algorithm):
    """A `route_ratio` share of the image tokens skips blocks route_start .. route_end (training only)."""
    name, keys = "tread", ("route_start", "route_end", "route_ratio")
    fusion = False  # SPRINT's fusion layer (trainer/algorithms/sprint.py)

    @classmethod
    def enabled(cls, cfg) -> bool:
        return cfg.routing == cls.name

    def build(self, denoiser, spec) -> None:
        c = self.cfg
        check_blocks(self.name, c.route_start, c.route_end, len(denoiser.transformer.blocks))
        denoiser.set_routing(self.name, c.route_start, c.route_end, c.route_ratio, seed=c.seed)
        self.patch = denoiser.config.patch_size

    def build_inference(self, denoiser) -> None:
        c = self.cfg
        denoiser.set_routing(self.name, c.route_start, c.route_end, c.route_ratio, seed=c.seed)

    def forward_kwargs(self, batch, step: int, micro: int) -> dict:
        return {"route_seed": seed_for(self.cfg.seed, "route", step, self.rank, micro)}

    def log_values(self, out, batch) -> dict[str, float]:
        return {"routed_tokens": float(routed_count(self._tokens(batch.x0.shape), self.cfg.route_ratio))}

    def flops_kwargs(self, x0_shape) -> dict:
        n = self._tokens(x0_shape)
        routed = routed_count(n, self.cfg.route_ratio)
        return {"route": (self.cfg.route_start, self.cfg.route_end + 1, n - routed) if routed else None,
                "fusion": self.fusion}

    def _tokens(self, x0_shape) -> int:
        return (x0_shape[-2] // self.patch) * (x0_shape[-1] // self.patch)
