"""REPA (Yu et al. 2024): align one block's hidden states with a frozen vision teacher's patch features.

    loss_repa = -repa_weight x mean over samples and tokens of cos(proj(h_block), features)

- `h_block` is the output of block `repa_block`, read by an explicit forward hook (`RepaHook`) that only
  records while the denoiser asks it to (so a gradient-checkpointing recompute does not overwrite it);
- `proj` is an MLP hidden -> D -> D -> D with SiLU (D = the teacher's width), an auxiliary module trained with
  the denoiser and saved in `aux.safetensors`, never inside `transformer/`;
- `features` are the stored `repa.safetensors` of each sample (`prx-data encode --repa dinov2`, or `dinov3`:
  PRX's REPA-V3 / iREPA-V3 teacher), N x D on the denoiser's token grid, carried in the batch
  (`open_sources(..., with_repa=True)` sets `DataSpec.with_repa`; `batch.repa`); `--repa-encoder` requires one
  teacher family.
- `--repa-variant irepa` is PRX's iREPA: spatially normalised targets and a spatial projector
  (trainer/algorithms/irepa.py); everything else here is shared.

Burn-in (`repa_until_step`, PRX: REPA helps early and was reported to hurt after ~200k steps): after that
step the hook is removed, the projector is frozen and the loss is the flow loss alone.

`Repa` is the training algorithm (trainer/algorithms/base.py); the projector and the hook live on the
denoiser (`Denoiser.add_repa`), which returns the cosine beside its prediction.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from contract.encoders.repa import TEACHERS
from trainer.algorithms.base import Algorithm, log
from trainer.algorithms.routing import gather_tokens


class RepaProjector(nn.Sequential):
    """hidden -> D -> D -> D, SiLU between (seeded init)."""

    def __init__(self, hidden: int, dim: int, seed: int = 0):
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            super().__init__(nn.Linear(hidden, dim), nn.SiLU(), nn.Linear(dim, dim), nn.SiLU(), nn.Linear(dim, dim))

    def cosine(self, hidden: torch.Tensor, features: torch.Tensor, grid: tuple[int, int],
               keep: torch.Tensor | None = None) -> torch.Tensor:
        """B: mean cosine of the projected block output (B x K x hidden; K = the kept tokens when `keep`, B x K
        indices into the H x W `grid`, says which the block saw) with the teacher features (B x N x D)."""
        if keep is not None:
            features = gather_tokens(features, keep)
        return cosine_per_sample(self(hidden), features)


class RepaHook:
    """A forward hook on one block that keeps its output while `recording`."""

    def __init__(self, block: nn.Module):
        self.recording = False
        self.hidden: torch.Tensor | None = None
        self.handle = block.register_forward_hook(self._hook)

    def _hook(self, module, args, output):
        if self.recording:
            self.hidden = output

    def take(self) -> torch.Tensor | None:
        h, self.hidden, self.recording = self.hidden, None, False
        return h

    def remove(self) -> None:
        self.handle.remove()
        self.recording, self.hidden = False, None


def cosine_per_sample(projected: torch.Tensor, features: torch.Tensor) -> torch.Tensor:
    """B x N x D each -> B: mean over tokens of the cosine similarity (float32)."""
    if projected.shape != features.shape:
        raise ValueError(f"REPA features {tuple(features.shape)} do not match the projected hidden states "
                         f"{tuple(projected.shape)}: the stored features must be on the denoiser's token grid "
                         "(re-encode with `prx-data encode --repa dinov2 --repa-patch-size P`, P = the model's patch)")
    return F.cosine_similarity(projected.float(), features.float(), dim=-1).mean(dim=1)


def repa_loss(cos: torch.Tensor, weight: float) -> torch.Tensor:
    """-weight x mean cosine."""
    return -weight * cos.mean()


def check_sources(infos: list[dict], latent_downsample: int | None, patch_size: int, encoder: str = "any") -> int:
    """Every source has REPA features from one teacher (of family `encoder` unless "any") on the denoiser's grid;
    returns the feature width D."""
    teacher = "dinov2" if encoder == "any" else encoder
    recs = [i.get("repa") for i in infos]
    missing = [i.get("folder") for i, r in zip(infos, recs) if r is None]
    if missing:
        raise ValueError(f"--repa-weight > 0 but {missing[0]} has no stored REPA features: re-encode it with "
                         f"`prx-data encode --repa {teacher}` (or pass --repa-weight 0)")
    for info, rec in zip(infos, recs):
        if encoder != "any" and rec.get("class") != TEACHERS[encoder]:
            raise ValueError(f"--repa-encoder {encoder} but {info.get('folder')} holds REPA features of "
                             f"{rec.get('class')} ({rec.get('id')}): re-encode it with `prx-data encode --repa "
                             f"{encoder} --repa-patch-size {patch_size}`")
    widths = {int(r["hidden_size"]) for r in recs}
    if len(widths) > 1:
        raise ValueError(f"the sources' REPA features have different widths {sorted(widths)}: encode every source "
                         "with the same `--repa` teacher")
    for info, rec in zip(infos, recs):
        per_token = rec.get("pixels_per_token")
        if latent_downsample and per_token and int(per_token) != latent_downsample * patch_size:
            raise ValueError(
                f"{info.get('folder')}: REPA features were stored one per {per_token} pixels, the denoiser has one "
                f"token per {latent_downsample * patch_size} pixels (VAE x{latent_downsample}, patch {patch_size}): "
                f"the feature count does not match the token grid; re-encode with `prx-data encode --repa dinov2 "
                f"--repa-patch-size {patch_size}`")
    return widths.pop()


def check_block(block: int, depth: int) -> None:
    if not 0 <= block < depth:
        raise ValueError(f"--repa-block {block} is outside the model's {depth} blocks (0 .. {depth - 1})")


# ------------------------------------------------------------------------------------------- the algorithm
class Repa(Algorithm):
    """`--repa-weight W` (> 0): loss += -W x mean cos(proj(h_block), stored features), until `repa_until_step`."""
    name, keys = "repa", ("repa_weight", "repa_block", "repa_until_step", "repa_variant", "irepa_projector",
                          "repa_encoder")

    def __init__(self, cfg, rank: int = 0, device: torch.device = torch.device("cpu")):
        super().__init__(cfg, rank, device)
        self.on = True

    @property
    def unused_parameters(self) -> bool:
        return self.on and bool(self.cfg.repa_until_step)  # the projector stops getting gradients at the burn-in

    @classmethod
    def enabled(cls, cfg) -> bool:
        return cfg.repa_weight > 0

    def data_needs(self) -> dict:
        return {"with_repa": True}

    def build(self, denoiser, spec) -> None:
        check_block(self.cfg.repa_block, len(denoiser.transformer.blocks))
        c = self.cfg
        dim = check_sources([s.info for s in spec.sources], (spec.vae or {}).get("downsample"),
                            denoiser.config.patch_size, c.repa_encoder)
        if c.repa_variant == "irepa" and c.irepa_projector == "conv" and c.routing != "none" \
                and c.route_start <= c.repa_block <= c.route_end:
            raise ValueError(f"--irepa-projector conv needs every token of block {c.repa_block}, which --routing "
                             f"{c.routing} routes (blocks {c.route_start}..{c.route_end}): use --irepa-projector "
                             "attention (PRX's default), or a --repa-block outside the routed blocks")
        self.denoiser = denoiser
        denoiser.add_repa(c.repa_block, dim, seed=c.seed,
                          projector=c.irepa_projector if c.repa_variant == "irepa" else "mlp")

    def start(self, step: int) -> None:
        if self._burnt_in(step):  # a resume past the burn-in
            self._stop()

    def forward_kwargs(self, batch, step: int, micro: int) -> dict:
        return {"repa_features": batch.repa.to(self.device, non_blocking=True)} if self.on else {}

    def loss_terms(self, out, batch) -> dict[str, torch.Tensor]:
        return {"repa_loss": repa_loss(out.repa_cos, self.cfg.repa_weight)} if out.repa_cos is not None else {}

    def log_values(self, out, batch) -> dict[str, torch.Tensor]:
        return {"repa_cos": out.repa_cos.detach().mean()} if out.repa_cos is not None else {}

    def after_optimizer_step(self, step: int) -> None:
        if self.on and self._burnt_in(step):
            self._stop()
            log.info("step %d: REPA burn-in over (--repa-until-step %d): projector frozen, flow loss only",
                     step, self.cfg.repa_until_step)

    def _burnt_in(self, step: int) -> bool:
        return bool(self.cfg.repa_until_step) and step >= self.cfg.repa_until_step

    def _stop(self) -> None:
        self.denoiser.stop_repa()
        self.on = False
