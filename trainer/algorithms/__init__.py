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
from trainer.algorithms.lpips import Lpips
from trainer.algorithms.min_snr import MinSnr
from trainer.algorithms.pdino import PerceptualDino
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
    Lpips,   # lpips_weight > 0    (trainer/algorithms/lpips.py)
    PerceptualDino,  # pdino_weight > 0  (trainer/algorithms/pdino.py)
    Ema,     # ema_decay > 0       (trainer/algorithms/ema.py)
]


def active(cfg, rank: int = 0, device: torch.device = torch.device("cpu")) -> list[Algorithm]:
    """The algorithms `cfg` switches on, in registry order, for this process (rank, device)."""
    return [cls(cfg, rank, device) for cls in REGISTRY if cls.enabled(cfg)]


def recorded(config: dict):
    """A run's recorded config (RUN/config.yaml) over TrainConfig's defaults, as the algorithms read it."""
    import dataclasses
    from types import SimpleNamespace

    from trainer.config import TrainConfig

    values = {f.name: f.default for f in dataclasses.fields(TrainConfig)}
    values.update({k: v for k, v in config.items() if k in values})
    return SimpleNamespace(**values)


def needed_at_inference(config: dict) -> list[Algorithm]:
    """The algorithms a run's recorded config switches on whose inference needs modules outside transformer/
    (`Algorithm.inference_modules`): what no stock pipeline can run."""
    cfg = recorded(config)
    return [cls(cfg) for cls in REGISTRY if cls.enabled(cfg) and cls.inference_modules(cfg)]


def inference_model(model, config: dict, aux_file: str, weights: str = "raw"):
    """The module that samples a run: `model` (a PRXTransformer2DModel) itself, or, when the run's algorithms need
    modules outside transformer/, a Denoiser with them, loaded from the checkpoint's aux.safetensors (the EMA's
    `ema.<module>.*` copy for EMA weights)."""
    import os

    from safetensors.torch import load_file

    from trainer.model import Denoiser

    algos = needed_at_inference(config)
    if not algos:
        return model
    den = Denoiser(model)
    for a in algos:
        a.build_inference(den)
    tensors = load_file(aux_file) if os.path.exists(aux_file) else {}
    prefix = "ema." if weights == "ema" else ""
    want = den.aux.state_dict()
    got = {k: tensors[prefix + k] for k in want if prefix + k in tensors}
    if got.keys() != want.keys():
        raise ValueError(f"{aux_file}: the modules {', '.join(a.name for a in algos)} needs at inference are missing "
                         f"({sorted(set(want) - set(got))[:3]})")
    den.aux.load_state_dict(got, strict=True)
    return den.to(next(model.parameters()).device).eval().requires_grad_(False)
