"""Write the VGG LPIPS weights file `prx-train --lpips-weights` reads (trainer/algorithms/lpips.py), once, on a
machine with internet (torchvision's ImageNet VGG16; lpips's bundled v0.1 linear heads):

    python -m trainer.algorithms.lpips_weights --write-weights lpips_vgg.pth
"""
from __future__ import annotations

import argparse
import os
import sys
import warnings

import torch

from contract.errors import PrxError
from trainer.algorithms.lpips import _lpips, load_lpips
from trainer.checkpoint import sha256_file


def write_weights(path: str) -> None:
    """lpips.LPIPS(net="vgg") as lpips builds it (downloads torchvision's ImageNet VGG16; lpips's bundled v0.1
    linear heads), its full state dict saved to `path` (.safetensors, else torch.save)."""
    lpips = _lpips()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        net = lpips.LPIPS(net="vgg", verbose=False)
    state = {k: v.detach().clone().contiguous() for k, v in net.state_dict().items()}  # lins.i shares lini's
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    if path.endswith(".safetensors"):
        from safetensors.torch import save_file

        save_file(state, path)
    else:
        torch.save(state, path)
    load_lpips(path)  # the file reads back the way prx-train reads it


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m trainer.algorithms.lpips_weights",
                                description="Write the VGG LPIPS weights prx-train --lpips-weights reads (needs "
                                            "internet once: torchvision's VGG16).")
    p.add_argument("--write-weights", metavar="FILE", required=True, help=".pth or .safetensors to write")
    args = p.parse_args(argv)
    try:
        write_weights(args.write_weights)
    except PrxError as exc:
        sys.stderr.write(f"error: {exc}\n")
        return 2
    except OSError as exc:  # urllib's URLError included: torchvision's VGG16 download failed
        sys.stderr.write(f"error: could not fetch torchvision's ImageNet VGG16 weights ({exc}): run this once on a "
                         "machine with internet, or put vgg16-397923af.pth in $TORCH_HOME/hub/checkpoints/ first\n")
        return 2
    print(f"wrote {args.write_weights} (sha256 {sha256_file(args.write_weights)})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
