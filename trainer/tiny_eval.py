"""`tiny-inception`: a seeded random-weight state dict of torch-fidelity's Inception-v3 (`prx-data dev tiny-models`).

Not small (the architecture is fixed: 24M parameters), but random, offline and built from a seed: tests drive
`prx-eval --inception-weights DIR/inception.pth` with it (the real file is torch-fidelity's converted TF
weights). Written with `torch.save` of plain tensors, so it loads with `torch.load(weights_only=True)`.
The tiny CLIP (`tiny-clip`) and DINOv2 (`tiny-dinov2`) extractors are registered by filters/ and the encoders.
"""
from __future__ import annotations

import os

from pipeline.tiny_models import register

INCEPTION_FILE = "inception.pth"


def inception_state_dict(seed: int = 0) -> dict:
    """A state dict with the keys and shapes torch-fidelity's FeatureExtractorInceptionV3 loads (random init)."""
    import torch
    from torch import nn
    from torch_fidelity import feature_extractor_inceptionv3 as fe

    torch.manual_seed(seed)
    shell = nn.Module()
    layers = [("Conv2d_1a_3x3", fe.BasicConv2d(3, 32, kernel_size=3, stride=2)),
              ("Conv2d_2a_3x3", fe.BasicConv2d(32, 32, kernel_size=3)),
              ("Conv2d_2b_3x3", fe.BasicConv2d(32, 64, kernel_size=3, padding=1)),
              ("Conv2d_3b_1x1", fe.BasicConv2d(64, 80, kernel_size=1)),
              ("Conv2d_4a_3x3", fe.BasicConv2d(80, 192, kernel_size=3)),
              ("Mixed_5b", fe.InceptionA(192, pool_features=32)), ("Mixed_5c", fe.InceptionA(256, pool_features=64)),
              ("Mixed_5d", fe.InceptionA(288, pool_features=64)), ("Mixed_6a", fe.InceptionB(288)),
              ("Mixed_6b", fe.InceptionC(768, channels_7x7=128)), ("Mixed_6c", fe.InceptionC(768, channels_7x7=160)),
              ("Mixed_6d", fe.InceptionC(768, channels_7x7=160)), ("Mixed_6e", fe.InceptionC(768, channels_7x7=192)),
              ("Mixed_7a", fe.InceptionD(768)), ("Mixed_7b", fe.InceptionE_1(1280)), ("Mixed_7c", fe.InceptionE_2(2048)),
              ("fc", nn.Linear(2048, 1008))]
    for name, module in layers:
        shell.add_module(name, module)
    return {k: v.detach().clone().contiguous() for k, v in shell.state_dict().items()}


@register("tiny-inception")
def build_tiny_inception(folder: str, seed: int) -> None:
    import torch

    os.makedirs(folder, exist_ok=True)
    torch.save(inception_state_dict(seed), os.path.join(folder, INCEPTION_FILE))
