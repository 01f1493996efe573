"""The training algorithms (PRX's Composer `Algorithm`s, without Composer): one module each, one line each here.

`REGISTRY` is also the order in which their hooks run (trainer/algorithms/base.py): routing before REPA (the
aux modules keep the order of older checkpoints: sprint_fusion, then repa_projector), EMA last (it shadows
every module the others add).
"""
from __future__ import annotations

import torch

from trainer.algorithms.base import Algorithm
from trainer.algorithms.contrastive import ContrastiveFlowMatching
from trainer.algorithms.ema import Ema
from trainer.algorithms.fp8 import Fp8
from trainer.algorithms.min_snr import MinSnr
from trainer.algorithms.repa import Repa
from trainer.algorithms.resolution_aware import ResolutionAware
from trainer.algorithms.sprint import Sprint
from trainer.algorithms.tread import Tread

REGISTRY: list[type[Algorithm]] = [
    ResolutionAware,  # resolution_aware  (trainer/algorithms/resolution_aware.py): adds a transformer module first
    Fp8,     # fp8                 (trainer/algorithms/fp8.py): converts the Linears before the others hook blocks
    Tread,   # routing: tread      (trainer/algorithms/tread.py)
    Sprint,  # routing: sprint     (trainer/algorithms/sprint.py)
    Repa,    # repa_weight > 0     (trainer/algorithms/repa.py)
    ContrastiveFlowMatching,  # contrastive_weight > 0  (trainer/algorithms/contrastive.py)
    MinSnr,  # min_snr_gamma > 0   (trainer/algorithms/min_snr.py)
    Ema,     # ema_decay > 0       (trainer/algorithms/ema.py)
]


def active(cfg, rank: int = 0, device: torch.device = torch.device("cpu")) -> list[Algorithm]:
    """The algorithms `cfg` switches on, in registry order, for this process (rank, device)."""
    return [cls(cfg, rank, device) for cls in REGISTRY if cls.enabled(cfg)]


def needed_at_inference(config: dict) -> list[str]:
    """The algorithms a run's recorded config (RUN/config.yaml) switches on whose inference needs modules outside
    transformer/ (`Algorithm.inference_modules`): what prx-sample and prx-export cannot run."""
    import dataclasses
    from types import SimpleNamespace

    from trainer.config import TrainConfig

    values = {f.name: f.default for f in dataclasses.fields(TrainConfig)}
    values.update({k: v for k, v in config.items() if k in values})
    cfg = SimpleNamespace(**values)
    return [cls.name for cls in REGISTRY if cls.inference_modules and cls.enabled(cfg)]
