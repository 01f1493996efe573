"""iREPA (PRX's `iREPA`): its targets and projectors against PRX's formulas and code, a DINOv3 teacher stored by
`prx-data encode --repa`, and training with it end to end on the tiny models."""
import json
import math
import os

import pytest
import torch
import torch.nn.functional as F

from trainer.algorithms.irepa import IrepaAttentionProjector, IrepaConvProjector, spatial_normalize


# ------------------------------------------------------------------------------------------- PRX's projector, verbatim
class PrxAttentionProjector(torch.nn.Module):
    """Photoroom/PRX prx/algorithm/repa.py `AttentionProjector`, copied as the reference (comments dropped)."""

    def __init__(self, embed_dim, out_dim, num_heads=4, theta=10000.0):
        super().__init__()
        self.embed_dim, self.num_heads, self.head_dim, self.theta = embed_dim, num_heads, embed_dim // num_heads, theta
        self.q_proj = torch.nn.Linear(embed_dim, embed_dim, bias=True)
        self.k_proj = torch.nn.Linear(embed_dim, embed_dim, bias=True)
        self.v_proj = torch.nn.Linear(embed_dim, embed_dim, bias=True)
        self.out_proj = torch.nn.Linear(embed_dim, embed_dim, bias=True)
        self.output = torch.nn.Linear(embed_dim, out_dim)

    def rope(self, pos, dim, theta):
        scale = torch.arange(0, dim, 2, dtype=torch.float64, device=pos.device) / dim
        omega = 1.0 / (theta**scale)
        out = pos.unsqueeze(-1) * omega.unsqueeze(0)
        out = torch.stack([torch.cos(out), -torch.sin(out), torch.sin(out), torch.cos(out)], dim=-1)
        out = out.view(*out.shape[:-1], 2, 2)
        return out.float()

    def apply_rope(self, xq, freqs_cis):
        xq_ = xq.float().reshape(*xq.shape[:-1], -1, 1, 2)
        freqs_cis = freqs_cis.unsqueeze(1)
        xq_out = freqs_cis[..., 0] * xq_[..., 0] + freqs_cis[..., 1] * xq_[..., 1]
        return xq_out.reshape(*xq.shape).type_as(xq)

    def forward(self, x, h_coords, w_coords):
        B, N, D = x.shape
        q = self.q_proj(x).view(B, N, self.num_heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(B, N, self.num_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(B, N, self.num_heads, self.head_dim).transpose(1, 2)
        rope_h = self.rope(h_coords, self.head_dim // 2, self.theta)
        rope_w = self.rope(w_coords, self.head_dim // 2, self.theta)
        freqs_cis = torch.cat([rope_h, rope_w], dim=2)
        q = self.apply_rope(q, freqs_cis)
        k = self.apply_rope(k, freqs_cis)
        attn = torch.nn.functional.scaled_dot_product_attention(q, k, v)
        attn = attn.transpose(1, 2).contiguous().view(B, N, D)
        return self.output(self.out_proj(attn))


def prx_grid(h, w, b):  # PRX's full-grid coordinates (iREPALoss.forward, no TREAD)
    rows = torch.arange(h).repeat_interleave(w).unsqueeze(0).expand(b, -1).float()
    return rows, torch.arange(w).repeat(h).unsqueeze(0).expand(b, -1).float()


# ------------------------------------------------------------------------------------------- closed forms
def test_spatial_normalize_on_a_hand_built_case():
    # one sample, 2 tokens, 2 dims: F = [[1, 3], [3, 5]]; per-token g = [2, 4]; token-mean = [2, 4]
    f = torch.tensor([[[1.0, 3.0], [3.0, 5.0]]])
    # F' = F - g * mean: token 0: [1-4, 3-8] = [-3, -5]; token 1: [3-8, 5-16] = [-5, -11]
    # std over tokens (unbiased): dim0 |(-3)-(-5)|/sqrt(2) = sqrt(2); dim1 6/sqrt(2) = 3 sqrt(2)
    s0, s1 = math.sqrt(2) + 1e-6, 3 * math.sqrt(2) + 1e-6
    expected = torch.tensor([[[-3 / s0, -5 / s1], [-5 / s0, -11 / s1]]])
    torch.testing.assert_close(spatial_normalize(f), expected)


def test_conv_loss_equals_formula_with_a_hand_set_conv():
    from trainer.algorithms.repa import repa_loss

    proj = IrepaConvProjector(hidden=1, dim=2)
    with torch.no_grad():  # centre tap only: out = [h, -h] + [0, 1]
        proj.weight.zero_()
        proj.weight[0, 0, 1, 1], proj.weight[1, 0, 1, 1] = 1.0, -1.0
        proj.bias.copy_(torch.tensor([0.0, 1.0]))
    hidden = torch.tensor([[[2.0], [-1.0]]])  # a 1 x 2 grid
    feats = torch.tensor([[[1.0, 3.0], [3.0, 5.0]]])
    target = spatial_normalize(feats)[0]
    projected = torch.tensor([[2.0, -1.0], [-1.0, 2.0]])
    cos = [float(projected[i] @ target[i] / (projected[i].norm() * target[i].norm())) for i in range(2)]
    got = proj.cosine(hidden, feats, (1, 2))
    torch.testing.assert_close(got, torch.tensor([sum(cos) / 2]))
    torch.testing.assert_close(repa_loss(got, 0.5), torch.tensor(-0.5 * sum(cos) / 2))
    with pytest.raises(ValueError, match="attention"):
        proj.cosine(hidden[:, :1], feats, (1, 2), keep=torch.tensor([[0]]))


def test_the_conv_sees_neighbouring_tokens():
    proj = IrepaConvProjector(hidden=3, dim=4, seed=1)
    h = torch.randn(1, 4, 3)
    moved = h.clone()
    moved[0, 0] += 1.0  # token 0 of a 1 x 4 grid: its neighbour's (1) projection changes, a far token's (3) not
    a, b = proj.project(h, (1, 4)), proj.project(moved, (1, 4))
    assert not torch.allclose(a[0, 1], b[0, 1]) and torch.allclose(a[0, 3], b[0, 3])


def test_attention_projector_equals_prx_code_on_the_full_grid_and_on_kept_tokens():
    ours = IrepaAttentionProjector(hidden=32, dim=12, seed=3)
    ref = PrxAttentionProjector(32, 12)
    ref.load_state_dict(ours.state_dict())
    x = torch.randn(2, 12, 32)
    rows, cols = prx_grid(3, 4, 2)
    torch.testing.assert_close(ours(x, rows, cols), ref(x, rows, cols))
    feats = torch.randn(2, 12, 12)
    target = spatial_normalize(feats)
    expect = F.cosine_similarity(ref(x, rows, cols), target, dim=2).mean(1)
    torch.testing.assert_close(ours.cosine(x, feats, (3, 4)), expect)
    # routed: PRX normalises over the full grid, then gathers; coordinates are the kept indices' (row, column)
    keep = torch.tensor([[0, 5, 11], [2, 3, 7]])
    xk = torch.gather(x, 1, keep.unsqueeze(-1).expand(-1, -1, 32))
    tk = torch.gather(target, 1, keep.unsqueeze(-1).expand(-1, -1, 12))
    expect = F.cosine_similarity(ref(xk, (keep // 4).float(), (keep % 4).float()), tk, dim=2).mean(1)
    torch.testing.assert_close(ours.cosine(xk, feats, (3, 4), keep), expect)


def test_rope_makes_the_attention_projector_position_aware():
    proj = IrepaAttentionProjector(hidden=32, dim=8, seed=0)
    x = torch.randn(1, 6, 32)
    rows, cols = prx_grid(2, 3, 1)
    assert not torch.allclose(proj(x, rows, cols), proj(x, rows, cols.flip(1)))


# ------------------------------------------------------------------------------------------- DINOv3 and training
@pytest.fixture(scope="module")
def dinov3_shards(tmp_path_factory, tiny_model):
    from conftest import write_photo_folder
    from pipeline.cli import main as prx_data

    root = tmp_path_factory.mktemp("irepa")
    vae, te, dino = tiny_model("tiny-flux-vae"), tiny_model("tiny-t5gemma"), tiny_model("tiny-dinov3")
    common = ["--executor", "local", "--no-progress"]
    assert prx_data(["ingest", "--in", str(write_photo_folder(root / "photos")), "--out", str(root / "raw"),
                     *common]) == 0
    assert prx_data(["encode", "--in", str(root / "raw"), "--out", str(root / "enc"), "--resolution", "64",
                     "--variants", "original", "--vae", vae, "--text-encoder", te, "--repa", dino,
                     "--repa-patch-size", "2", *common]) == 0
    return {"root": root, "enc": str(root / "enc"), "vae": vae, "te": te}


def test_dinov3_features_are_stored_on_the_token_grid(dinov3_shards):
    from contract import encoded
    from contract.shards import Problem, read_shard

    rec = encoded.encoded_info(dinov3_shards["enc"])["repa"]
    assert rec["class"] == "transformers.DINOv3ViTModel" and rec["teacher_patch"] == 16
    assert rec["num_register_tokens"] == 4 and rec["pixels_per_token"] == 16
    shard = sorted(f for f in os.listdir(dinov3_shards["enc"]) if f.endswith(".tar"))[0]
    sample = next(s for s in read_shard(os.path.join(dinov3_shards["enc"], shard)) if not isinstance(s, Problem))
    h, w = encoded.read_latent(sample)[0].shape[-2:]  # latent grid; tokens at patch 2
    assert tuple(encoded.read_repa(sample).shape) == ((h // 2) * (w // 2), 32)


def irepa_cfg(shards, out, **kw):
    from trainer.config import TrainConfig

    base = dict(shards=[shards["enc"]], caption={"original": 1.0}, model="tiny", steps=3, batch_size=2, lr=1e-3,
                warmup_steps=0, out=str(out), log_every=1, checkpoint_every=1000, tensorboard=False, device="cpu",
                vae=shards["vae"], text_encoder=shards["te"], loader_workers=0, shuffle_buffer=16, repa_block=0,
                repa_weight=0.5, repa_variant="irepa", repa_encoder="dinov3")
    base.update(kw)
    return TrainConfig(**base)


@pytest.mark.parametrize("projector", ["attention", "conv"])
def test_irepa_trains_on_dinov3_features(dinov3_shards, tmp_path, projector):
    from trainer.algorithms import irepa
    from trainer.train import run

    out = run(irepa_cfg(dinov3_shards, tmp_path / projector, irepa_projector=projector))
    proj = out["denoiser"].aux["repa_projector"]
    kind = irepa.IrepaAttentionProjector if projector == "attention" else irepa.IrepaConvProjector
    assert isinstance(proj, kind) and len(out["losses"]) == 3
    summary = json.load(open(tmp_path / projector / "summary.json"))
    assert summary["algorithms"]["repa"]["repa_variant"] == "irepa"
    assert summary["algorithms"]["repa"]["irepa_projector"] == projector


def test_irepa_with_routing_through_its_block(dinov3_shards, tmp_path):
    from trainer.train import run

    out = run(irepa_cfg(dinov3_shards, tmp_path / "a", routing="tread", route_start=0, route_end=1, steps=2))
    assert all(math.isfinite(v) for v in out["losses"])
    with pytest.raises(ValueError, match="--irepa-projector attention"):
        run(irepa_cfg(dinov3_shards, tmp_path / "c", routing="tread", route_start=0, route_end=1,
                      irepa_projector="conv"))


def test_features_of_another_teacher_are_refused_before_step_1(dinov3_shards, tmp_path):
    from trainer.train import run

    with pytest.raises(ValueError, match="prx-data encode --repa dinov2 --repa-patch-size 2"):
        run(irepa_cfg(dinov3_shards, tmp_path / "r", repa_encoder="dinov2"))
    assert not os.path.exists(tmp_path / "r" / "checkpoints")
