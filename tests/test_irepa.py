"""iREPA's loss against its formula on hand-built cases (PRX's iREPALoss)."""
import math

import torch
import torch.nn.functional as F

from trainer.algorithms.irepa import IrepaProjector, irepa_cosine, irepa_loss, spatial_normalize


def test_spatial_normalize_on_a_hand_built_case():
    # one sample, 2 tokens, 2 dims: F = [[1, 3], [3, 5]]; per-token g = [2, 4]; token-mean = [2, 4]
    f = torch.tensor([[[1.0, 3.0], [3.0, 5.0]]])
    # F' = F - g * mean: token 0: [1-4, 3-8] = [-3, -5]; token 1: [3-8, 5-16] = [-5, -11]
    # std over tokens (unbiased): dim0 |(-3)-(-5)|/sqrt(2) = sqrt(2); dim1 6/sqrt(2) = 3 sqrt(2)
    s0, s1 = math.sqrt(2) + 1e-6, 3 * math.sqrt(2) + 1e-6
    expected = torch.tensor([[[-3 / s0, -5 / s1], [-5 / s0, -11 / s1]]])
    torch.testing.assert_close(spatial_normalize(f), expected)


def test_loss_equals_formula_with_a_hand_set_conv():
    proj = IrepaProjector(hidden=1, dim=2)
    with torch.no_grad():  # centre tap only: out = [h, -h] + [0, 1]
        proj.weight.zero_()
        proj.weight[0, 0, 1, 1], proj.weight[1, 0, 1, 1] = 1.0, -1.0
        proj.bias.copy_(torch.tensor([0.0, 1.0]))
    hidden = torch.tensor([[[2.0], [-1.0]]])  # a 1 x 2 grid
    feats = torch.tensor([[[1.0, 3.0], [3.0, 5.0]]])
    target = spatial_normalize(feats)[0]
    projected = torch.tensor([[2.0, -1.0], [-1.0, 2.0]])
    cos = [float(projected[i] @ target[i] / (projected[i].norm() * target[i].norm())) for i in range(2)]
    got = irepa_cosine(proj, hidden, feats, height=1, width=2)
    torch.testing.assert_close(got, torch.tensor([sum(cos) / 2]))
    torch.testing.assert_close(irepa_loss(got, 0.5), torch.tensor(-0.5 * sum(cos) / 2))


def test_the_conv_sees_neighbouring_tokens():
    proj = IrepaProjector(hidden=3, dim=4, seed=1)
    h = torch.randn(1, 4, 3)
    moved = h.clone()
    moved[0, 0] += 1.0  # token 0 of a 1 x 4 grid: its neighbour's (1) projection changes, a far token's (3) not
    a, b = proj.project(h, 1, 4), proj.project(moved, 1, 4)
    assert not torch.allclose(a[0, 1], b[0, 1]) and torch.allclose(a[0, 3], b[0, 3])
    assert F.cosine_similarity(a, a, dim=-1).min() > 0.999
