"""FP8 training through TorchAO, as PRX's `prx/models/tao_fp8.py` (configs/yamls/JIT-benchmark/FP8.yaml):
the denoiser's compute-heavy Linear layers become torchao `Float8Linear`s (dynamic scaling; the weights stay
FP32 parameters with the same names, so checkpoints and exports are unchanged), under BF16 autocast.

Converted layers, PRX's `layers_substring_filter` in diffusers' PRXTransformer2DModel names: the MLP's
gate_proj / up_proj / down_proj, attention's img_qkv_proj / txt_kv_proj and its output projection (PRX's
`attn_out`, diffusers' `attention.to_out.0`). PRX's `precompute_scale` hook serves FSDP's float8 all-gather;
this trainer uses DDP, where it does nothing, so it is left out.

FP8 matrix multiplies need an NVIDIA GPU of compute capability 8.9 or newer (Ada, Hopper); PRX trains it on
Hopper. Anything else is refused before step 1, as is a missing torchao (`pip install -e '.[fp8]'`).
"""
from __future__ import annotations

import torch

from trainer.algorithms.base import Algorithm, log

LAYERS = ("gate_proj", "up_proj", "down_proj", "img_qkv_proj", "txt_kv_proj", "attention.to_out.0")
MIN_CAPABILITY = (8, 9)


def check_device(device: torch.device) -> None:
    """Refuse FP8 on anything but a CUDA GPU with FP8 tensor cores."""
    if device.type != "cuda":
        raise ValueError(f"--fp8 needs an NVIDIA GPU with FP8 tensor cores (Hopper, e.g. H100); this run is on "
                         f"{device.type}: drop --fp8 (BF16 autocast is the baseline)")
    cap = torch.cuda.get_device_capability(device)
    if cap < MIN_CAPABILITY:
        name = torch.cuda.get_device_name(device)
        raise ValueError(f"--fp8 needs compute capability >= {MIN_CAPABILITY[0]}.{MIN_CAPABILITY[1]} (Hopper, e.g. "
                         f"H100); {name} has {cap[0]}.{cap[1]}: drop --fp8")


def wanted(module: torch.nn.Module, fqn: str) -> bool:
    return isinstance(module, torch.nn.Linear) and any(part in fqn for part in LAYERS)


def convert(transformer: torch.nn.Module) -> int:
    """Swap the LAYERS Linears of `transformer` for torchao Float8Linear in place; returns how many."""
    try:
        from torchao.float8 import Float8LinearConfig, convert_to_float8_training
    except ImportError as exc:
        raise ValueError(f"--fp8 needs torchao ({exc}): pip install -e '.[fp8]' (or pip install torchao)") from exc
    count = sum(1 for fqn, m in transformer.named_modules() if wanted(m, fqn))
    convert_to_float8_training(transformer, config=Float8LinearConfig(), module_filter_fn=wanted)
    return count


class Fp8(Algorithm):
    """`--fp8`: the transformer's projection Linears train in FP8 (torchao), BF16 autocast elsewhere."""
    name, keys = "fp8", ("fp8",)

    @classmethod
    def enabled(cls, cfg) -> bool:
        return bool(cfg.fp8)

    def build(self, denoiser, spec) -> None:
        check_device(self.device)
        log.info("fp8: %d Linear layers converted to torchao Float8Linear", convert(denoiser.transformer))

    def summary(self) -> dict:
        return {"fp8": True, "layers": list(LAYERS)}
