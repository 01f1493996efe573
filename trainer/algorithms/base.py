"""The shape every training algorithm has: Composer's `Algorithm`, without Composer's events.

A technique (REPA, TREAD, SPRINT, EMA, ...) is one subclass of `Algorithm` in its own module of
trainer/algorithms/, listed once in `REGISTRY` (trainer/algorithms/__init__.py) and switched on by its flat
`TrainConfig` keys. trainer/train.py builds the enabled ones (`active(cfg)`, registry order) and calls their
hooks at fixed points, every one of them explicit in the loop:

    setup      data_needs()  ->  build(denoiser, spec)  ->  [optimizer, checkpoint load]  ->  start(step)
    micro-batch   forward_kwargs(batch, step, micro)  ->  model  ->  loss_weights(out, batch), loss_terms(out, batch),
               log_values(out, batch)
    step       after_optimizer_step(step)
    log        flops_kwargs(x0_shape) (MFU), log_values (averaged until the log line), eval_weights() (eval/loss_NAME)
    checkpoint state_dict() / load_state_dict(tensors)
    end        summary()  ->  RUN/summary.json "algorithms"

Every hook has a do-nothing default, so an algorithm overrides only what it uses. Why each exists:

- `data_needs`: what the batches must carry (REPA: the stored teacher features), given to `open_sources` before
  anything is written, so bad data is refused first.
- `build`: refuse bad input before step 1 (block indices vs the model's depth, missing features) and add the
  algorithm's trainable modules to `denoiser.aux` (so the optimizer, gradient clipping, DDP and the checkpoint's
  aux.safetensors see them) or its forward hooks to the blocks. Runs before the optimizer exists.
- `start`: the state at this process's first step, once the weights are final (after a fine-tune start's parent
  weights or a resumed checkpoint are loaded): a resume past REPA's burn-in has no REPA; EMA starts from them.
- `forward_kwargs`: extra keyword arguments of the denoiser's forward for one micro-batch (the REPA features, the
  TREAD/SPRINT route seed, from (seed, step, rank, micro-batch) so a resume draws the same routes).
- `loss_weights`: a weight per sample (B) that multiplies the flow loss in the step's loss (Min-SNR), or None;
  the logged `flow_loss` and the fixed-batch eval loss stay unweighted, so runs with and without it compare.
- `loss_terms`: named scalar terms added to the flow loss (REPA's `repa_loss`); each is logged under its name.
- `log_values`: named scalars to log, averaged over the steps since the last log line (REPA's cosine, the routed
  tokens per sample).
- `after_optimizer_step`: after each optimizer step, 1-based (EMA update, end of REPA's burn-in).
- `flops_kwargs`: keyword arguments of `trainer.model.train_flops_per_sample` (routed blocks counted at the kept
  length), so MFU counts what the algorithm really computes.
- `eval_weights`: a context manager that swaps other weights in for the fixed-batch evaluation (EMA), or None.
- `state_dict` / `load_state_dict`: tensors beyond the model's modules that a resume needs. A key
  `transformer.<param>` is part of a full set of transformer weights, written as RUN/checkpoints/step-N/
  `transformer_<name>/` (a diffusers folder, e.g. transformer_ema/); any other key is written to aux.safetensors
  as `<name>.<key>` (e.g. ema.sprint_fusion.weight). Modules in `denoiser.aux` are saved by the checkpoint itself.
- `summary`: the algorithm's parameters for RUN/summary.json (default: the values of its `keys`).

`inference_modules(cfg)`: True when the algorithm's model needs, at inference, modules that are not in transformer/
(SPRINT's fusion layer). prx-sample and prx-eval run such a run through `inference_model` (the transformer in a
Denoiser with those modules, built by `build_inference` and loaded from aux.safetensors); prx-export refuses it
(`needed_at_inference`), since no stock pipeline has them. Modules used only in training (REPA's projector) do
not count.

`unused_parameters`: True when some of its parameters stop getting gradients mid-run (REPA's burn-in freezes
the projector): DDP then runs with find_unused_parameters. Muon is not an algorithm: it is an optimizer
(`--optimizer muon`, trainer/optim.py), chosen where the optimizer is built. The fine-tune start (`--init-from`)
is how the weights start, done in setup (trainer/checkpoint.py:load_parent) before `start`.
"""
from __future__ import annotations

import logging
from contextlib import AbstractContextManager
from typing import Any

import torch

log = logging.getLogger("prx.train")  # rank 0 logs INFO, the other ranks warnings only (trainer/train.py)


class Algorithm:
    name: str = ""                  # summary.json / checkpoint prefix; unique in the registry
    keys: tuple[str, ...] = ()      # its flat TrainConfig keys (summary.json records their values)
    unused_parameters: bool = False

    def __init__(self, cfg, rank: int = 0, device: torch.device = torch.device("cpu")):
        self.cfg, self.rank, self.device = cfg, rank, device  # this process's rank and device

    @classmethod
    def enabled(cls, cfg) -> bool:
        """Whether `cfg` switches this algorithm on."""
        raise NotImplementedError

    @classmethod
    def inference_modules(cls, cfg) -> bool:
        """Whether `cfg`'s model needs this algorithm's modules outside transformer/ at inference."""
        return False

    def data_needs(self) -> dict[str, Any]:
        return {}

    def build(self, denoiser, spec) -> None:
        pass

    def start(self, step: int) -> None:
        pass

    def build_inference(self, denoiser) -> None:
        """(`inference_modules` only) add the modules inference needs to `denoiser`, as `build` does."""
        raise NotImplementedError

    def forward_kwargs(self, batch, step: int, micro: int) -> dict[str, Any]:
        return {}

    def loss_weights(self, out, batch) -> torch.Tensor | None:
        return None

    def loss_terms(self, out, batch) -> dict[str, torch.Tensor]:
        return {}

    def log_values(self, out, batch) -> dict[str, torch.Tensor | float]:
        return {}

    def after_optimizer_step(self, step: int) -> None:
        pass

    def flops_kwargs(self, x0_shape) -> dict[str, Any]:
        return {}

    def eval_weights(self) -> AbstractContextManager | None:
        return None

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {}

    def load_state_dict(self, tensors: dict[str, torch.Tensor]) -> None:
        if tensors:
            raise ValueError(f"{self.name} keeps no checkpoint state, got {sorted(tensors)[:3]}")

    def summary(self) -> dict[str, Any]:
        return {k: getattr(self.cfg, k) for k in self.keys}
