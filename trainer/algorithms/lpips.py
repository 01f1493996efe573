"""LPIPS perceptual loss (Zhang et al. 2018, VGG trunk), as PRX's prx/algorithm/lpips.py:

    loss = flow loss + w x mean_i LPIPS_vgg(resize(x0_pred_i), resize(x0_i))

x0_pred is the denoiser's raw output (x-prediction: the model predicts x0; refused otherwise, as PRX refuses),
x0 the clean image, detached: the gradient reaches the denoiser through x0_pred only, the VGG trunk and the
linear heads are frozen. `resize` is bilinear (align_corners False) by `--lpips-resize` (PRX's resize_factor),
skipped at 1. PRX's JiT config (JIT-benchmark/LPIPS.yaml): w 0.1, vgg, resize_factor 0.5, t_threshold 1
(every sample, so there is no threshold here); manifests/ablations/lpips-jit.yaml is that run.

PRX applies the loss to the raw denoiser output in pixel space (IdentityVAE, x0 RGB in [-1, 1]); here too on
shards encoded with `--vae none`. In a latent space x0_pred and x0 are decoded through the run's VAE first
(trainer/algorithms/perceptual.py). Other differences from PRX: its x0_gt is rebuilt from the v-space target
as x_t - max(t, 0.05) v, here the clean x0 is used (the same for t >= 0.05); it runs LPIPS in BF16 and
compiled, here under the trainer's autocast (BF16 on CUDA), uncompiled; its frozen net sits in the model, so
Composer's train() switches the heads' dropout on, here it stays in eval mode (LPIPS as published); PRX's
crop_size option (off in its configs) is not offered.

Nothing is downloaded at run time: `--lpips-weights FILE` is the full state dict of lpips.LPIPS(net="vgg")
(torchvision's ImageNet VGG16 features and lpips's v0.1 linear heads), read with torch.load(weights_only=True)
or safetensors, never unpickled. Make it once on a machine with internet:

    python -m trainer.algorithms.lpips_weights --write-weights lpips_vgg.pth
"""
from __future__ import annotations

import os
import warnings
from contextlib import nullcontext

import torch
import torch.nn.functional as F

from contract.errors import PrxError
from trainer.algorithms.perceptual import PerceptualLoss
from trainer.checkpoint import sha256_file

HOW_TO = ("make it on a machine with internet (pip install lpips): python -m trainer.algorithms.lpips_weights "
          "--write-weights lpips_vgg.pth (torchvision's VGG16 and lpips's linear heads), then pass "
          "--lpips-weights lpips_vgg.pth")


def _lpips():
    try:
        import lpips
    except ImportError:
        raise PrxError("--lpips-weight needs the lpips package: pip install 'prx[perceptual]' "
                       "(or pip install lpips)") from None
    return lpips


def empty_vgg_lpips(meta: bool = False):
    """lpips.LPIPS(net="vgg", pretrained=False, pnet_rand=True): random weights, nothing downloaded or read (the
    shape the file must fill); `meta`: no storage at all (seconds faster: torchvision's VGG16 builds and
    initialises its 120M-parameter classifier, which LPIPS drops), to be filled by load_state_dict(assign=True)."""
    lpips = _lpips()
    with warnings.catch_warnings(), torch.device("meta") if meta else nullcontext():
        warnings.simplefilter("ignore")  # torchvision's `pretrained=` deprecation, inside lpips
        return lpips.LPIPS(net="vgg", pretrained=False, pnet_rand=True, verbose=False)


def load_state(path: str | None) -> dict[str, torch.Tensor]:
    """The LPIPS state dict from a file, never unpickling anything beyond tensors."""
    if not path or not os.path.isfile(path):
        raise PrxError(f"--lpips-weight needs --lpips-weights FILE, the state dict of lpips.LPIPS(net='vgg') "
                       f"({'not given' if not path else f'{path}: no such file'}); nothing is downloaded at run "
                       f"time: {HOW_TO}")
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file

        try:
            return load_file(path)
        except Exception as exc:  # noqa: BLE001 - a damaged file is refused with the way to remake it
            raise PrxError(f"--lpips-weights {path}: not a readable .safetensors file ({type(exc).__name__}: "
                           f"{str(exc)[:200]}); {HOW_TO}") from None
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - anything that is not plain tensors is refused
        raise PrxError(f"--lpips-weights {path}: refused, it does not load with torch.load(weights_only=True) "
                       f"({type(exc).__name__}: {str(exc)[:200]}); {HOW_TO}") from None
    if not isinstance(state, dict) or not all(torch.is_tensor(v) for v in state.values()):
        raise PrxError(f"--lpips-weights {path}: not a state dict of tensors; {HOW_TO}")
    return state


def load_lpips(path: str | None, device: torch.device = torch.device("cpu")):
    """The frozen VGG LPIPS from `--lpips-weights`, every weight of lpips.LPIPS(net="vgg") required (strict)."""
    state = load_state(path)
    net = empty_vgg_lpips(meta=True)
    try:
        net.load_state_dict(state, strict=True, assign=True)
    except RuntimeError as exc:
        raise PrxError(f"--lpips-weights {path}: not the state dict of lpips.LPIPS(net='vgg') "
                       f"({' '.join(str(exc).split())[:300]}); {HOW_TO}") from None
    left = [n for n, t in [*net.named_parameters(), *net.named_buffers()] if t.is_meta]
    if left:  # nothing may stay unset (strict loading already requires every key)
        raise PrxError(f"--lpips-weights {path}: {left[:3]} not set; {HOW_TO}")
    loaded = net.state_dict()  # lins.i and lin{i} are one module: a file whose two copies differ is not LPIPS's
    differ = [k for k, v in state.items() if not torch.equal(loaded[k].float(), v.float())]
    if differ:
        raise PrxError(f"--lpips-weights {path}: {differ[:3]} disagree with the copies of the same weights under "
                       f"other names; {HOW_TO}")
    return net.float().eval().requires_grad_(False).to(device)


def lpips_per_sample(net, pred: torch.Tensor, target: torch.Tensor, resize: float = 1.0) -> torch.Tensor:
    """B LPIPS distances between images in [-1, 1], each resized bilinearly by `resize` first (target detached)."""
    target = target.detach()
    if resize != 1.0:
        pred = F.interpolate(pred, scale_factor=resize, mode="bilinear", align_corners=False)
        target = F.interpolate(target, scale_factor=resize, mode="bilinear", align_corners=False)
    if min(pred.shape[-2:]) < 16:  # VGG16's four poolings before relu5_3
        raise ValueError(f"LPIPS (VGG) needs images of at least 16 x 16 pixels, got {tuple(pred.shape[-2:])} "
                         f"after --lpips-resize {resize}: raise the resolution or the resize factor")
    return net(pred, target).reshape(pred.shape[0]).float()


class Lpips(PerceptualLoss):
    """`--lpips-weight W` (> 0, x-prediction): loss += W x mean LPIPS_vgg(x0 prediction, x0), in pixels."""
    name, keys, weight_key = "lpips", ("lpips_weight", "lpips_weights", "lpips_resize"), "lpips_weight"

    def __init__(self, cfg, rank: int = 0, device: torch.device = torch.device("cpu")):
        super().__init__(cfg, rank, device)
        if not cfg.lpips_weights or not os.path.isfile(cfg.lpips_weights):
            load_state(cfg.lpips_weights)  # says how to make the file

    def load(self) -> str:
        self.net = load_lpips(self.cfg.lpips_weights, self.device)  # frozen; not in denoiser.aux: not trained
        self.sha256 = sha256_file(self.cfg.lpips_weights)
        return f"VGG from {self.cfg.lpips_weights} (sha256 {self.sha256[:12]}), resize {self.cfg.lpips_resize:g}"

    def distance(self, pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return lpips_per_sample(self.net, pred, target, self.cfg.lpips_resize)

    def summary(self) -> dict:
        return {**super().summary(), "lpips_weights_sha256": getattr(self, "sha256", None)}
