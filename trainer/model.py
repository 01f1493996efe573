"""The denoiser: diffusers' PRXTransformer2DModel, so a checkpoint loads in diffusers' PRXPipeline.

`prx-small` is the PRX ablation model (1.17B parameters with T5Gemma-2B's 2304-wide context); `tiny` is a
few-hundred-thousand-parameter model of the same class for tests and CPU benchmarks. `in_channels` and
`context_in_dim` come from the shards (the VAE's latent channels, the text encoder's width).
"""
from __future__ import annotations

import os
from typing import Any

import torch

PRESETS: dict[str, dict[str, Any]] = {
    # PRX ablation model: hidden 1792, depth 16, 28 heads (head dim 64 = axes 32 + 32), mlp 3.5, patch 2.
    "prx-small": dict(hidden_size=1792, depth=16, num_heads=28, mlp_ratio=3.5, patch_size=2, axes_dim=[32, 32]),
    # Same class, test-sized: head dim 32 = axes 16 + 16.
    "tiny": dict(hidden_size=64, depth=2, num_heads=2, mlp_ratio=2.0, patch_size=2, axes_dim=[16, 16]),
}


class PrecisionError(RuntimeError):
    """Trainable weights are not in the dtype the config asks for (the FP32 master-weights guard)."""


def model_config(name: str, in_channels: int, context_in_dim: int) -> dict[str, Any]:
    if name not in PRESETS:
        raise KeyError(f"unknown model preset {name!r}; known: {sorted(PRESETS)}")
    return dict(PRESETS[name], in_channels=int(in_channels), context_in_dim=int(context_in_dim))


def build_model(name: str, in_channels: int, context_in_dim: int, seed: int = 0):
    """A PRXTransformer2DModel from a preset (seeded init) or a folder (from_pretrained), checked against the data."""
    from diffusers import PRXTransformer2DModel

    if name not in PRESETS:
        if not os.path.isdir(name):
            raise FileNotFoundError(f"model {name!r}: not a preset ({', '.join(PRESETS)}) nor a folder")
        from pipeline.models import from_pretrained, resolve

        model = from_pretrained(resolve(name, "diffusers.PRXTransformer2DModel"), PRXTransformer2DModel,
                                flag="--model")
        model = model.float()
        got = (model.config.in_channels, model.config.context_in_dim)
        if got != (in_channels, context_in_dim):
            raise ValueError(f"model {name} has in_channels={got[0]}, context_in_dim={got[1]} but the shards have "
                             f"latent channels {in_channels} and text width {context_in_dim}")
        return model
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return PRXTransformer2DModel(**model_config(name, in_channels, context_in_dim))


def count_parameters(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def check_weights_dtype(model: torch.nn.Module, weights_dtype: str = "fp32") -> None:
    """Refuse trainable weights that are not FP32, unless the BF16-storage ablation was asked for."""
    want = {"fp32": torch.float32, "bf16": torch.bfloat16}[weights_dtype]
    bad = [(n, p.dtype) for n, p in model.named_parameters() if p.requires_grad and p.dtype != want]
    if bad:
        name, dtype = bad[0]
        if weights_dtype == "fp32":
            raise PrecisionError(
                f"{len(bad)} trainable parameter(s) are not FP32 (first: {name} is {dtype}); the trainer keeps FP32 "
                "master weights and computes in BF16 autocast. Storing weights in BF16 is an ablation (it cost "
                "3.7 FID in PRX): pass --weights-dtype bf16 to run it on purpose.")
        raise PrecisionError(f"--weights-dtype {weights_dtype}: parameter {name} is {dtype}")


def forward_flops(cfg: dict[str, Any], height: int, width: int, text_len: int) -> int:
    """FLOPs of one forward pass for one sample (a multiply-add = 2 FLOPs).

    N = (height/p)(width/p) image tokens, L = text tokens (padded length), d = hidden, m = int(d * mlp_ratio),
    P = in_channels p^2, D = context_in_dim, per block:
        img QKV 6Nd^2 + text KV 4Ld^2 + attention 4N(N+L)d + out proj 2Nd^2 + gated MLP 6Ndm + modulation 12d^2
    plus txt_in 2LDd + img_in 2NPd + time MLP 2(256d + d^2) + final layer (4d^2 + 2NdP).
    Training FLOPs = 3 x forward (backward = 2 x forward). Norms, RoPE and softmax are left out.
    """
    p, d = cfg["patch_size"], cfg["hidden_size"]
    n = (height // p) * (width // p)
    L = text_len
    m = int(d * cfg["mlp_ratio"])
    P = cfg["in_channels"] * p * p
    D = cfg["context_in_dim"]
    block = 6 * n * d * d + 4 * L * d * d + 4 * n * (n + L) * d + 2 * n * d * d + 6 * n * d * m + 12 * d * d
    rest = 2 * L * D * d + 2 * n * P * d + 2 * (256 * d + d * d) + 4 * d * d + 2 * n * d * P
    return int(cfg["depth"] * block + rest)


def train_flops_per_sample(cfg: dict[str, Any], height: int, width: int, text_len: int) -> int:
    return 3 * forward_flops(cfg, height, width, text_len)
