"""SPRINT (Park et al. 2025) as a training algorithm: `--routing sprint`. TREAD's hooks, plus the fusion layer
(trainer/algorithms/routing.py:SprintFusion, part of the model at inference too) that merges the sparse middle
with the dense path."""
from __future__ import annotations

from trainer.algorithms.tread import Tread


class Sprint(Tread):
    """The routed blocks see the kept tokens; at route_end the fusion layer merges them with the dense output."""
    name, fusion = "sprint", True

    @classmethod
    def inference_modules(cls, cfg) -> bool:
        return True  # the fusion layer (aux.safetensors) runs at inference too
