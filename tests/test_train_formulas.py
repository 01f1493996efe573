"""The trainer's formulas against closed forms: interpolation/target, timestep distribution, shift, caption
dropout, x-prediction, LR schedule, FLOPs count, FP32 guard, checkpointed optimizer state."""
from __future__ import annotations

import math

import pytest
import torch

from trainer import objective as obj
from trainer.model import PrecisionError, build_model, check_weights_dtype, forward_flops, model_config
from trainer.optim import lr_at


def test_interpolation_and_target():
    g = torch.Generator().manual_seed(0)
    x0, eps = torch.randn(4, 3, 5, 5, generator=g), torch.randn(4, 3, 5, 5, generator=g)
    t = torch.tensor([0.0, 0.25, 0.5, 1.0])
    x_t, v = obj.interpolate(x0, eps, t)
    assert torch.equal(x_t[0], x0[0]) and torch.equal(x_t[3], eps[3])
    torch.testing.assert_close(x_t[1], 0.75 * x0[1] + 0.25 * eps[1])
    torch.testing.assert_close(v, eps - x0)
    # v is the time derivative of x_t
    h = 1e-3
    x_h, _ = obj.interpolate(x0, eps, t + h)
    torch.testing.assert_close((x_h - x_t) / h, v, atol=1e-3, rtol=1e-3)


def test_x_prediction_velocity_closed_form():
    g = torch.Generator().manual_seed(1)
    x0, eps = torch.randn(3, 2, 4, 4, generator=g), torch.randn(3, 2, 4, 4, generator=g)
    t = torch.tensor([0.01, 0.3, 0.9])
    x_t, v = obj.interpolate(x0, eps, t)
    v_hat = obj.velocity_from_x(x_t, x0, t, t_min=0.05)
    # exact where t >= t_min; scaled by t / t_min below it
    torch.testing.assert_close(v_hat[1:], v[1:])
    torch.testing.assert_close(v_hat[0], v[0] * 0.01 / 0.05)


def test_x_prediction_target_is_clamped_like_the_prediction():
    """PRX's convert_x_to_v on both sides: a perfect x0 has zero loss at every t (t < t_min included); an x0
    off by d costs |d|^2 / max(t, t_min)^2."""

    class Oracle(torch.nn.Module):
        def __init__(self, x0, offset=0.0):
            super().__init__()
            self.x0, self.offset, self.w = x0, offset, torch.nn.Parameter(torch.zeros(1))

        def forward(self, hidden_states, timestep, encoder_hidden_states, attention_mask=None, return_dict=False):
            return (self.x0 + self.offset,)

    g = torch.Generator().manual_seed(2)
    x0, eps = torch.randn(3, 2, 4, 4, generator=g), torch.randn(3, 2, 4, 4, generator=g)
    t = torch.tensor([0.001, 0.02, 0.7])
    emb, mask = torch.zeros(3, 1, 4), torch.ones(3, 1, dtype=torch.bool)
    oc = obj.ObjectiveConfig(prediction="x", x_pred_t_min=0.05)
    assert torch.equal(obj.per_sample_loss(Oracle(x0), x0, eps, t, emb, mask, oc), torch.zeros(3))
    got = obj.per_sample_loss(Oracle(x0, 0.1), x0, eps, t, emb, mask, oc)
    torch.testing.assert_close(got, 0.01 / torch.tensor([0.05, 0.05, 0.7]) ** 2)


def test_logit_normal_moments():
    n = 400_000
    g = torch.Generator().manual_seed(0)
    t = obj.logit_normal_uniform(n, g, 0.0, 1.0, 0.0)
    logit = torch.log(t / (1 - t))
    assert abs(float(logit.mean())) < 0.01 and abs(float(logit.std()) - 1.0) < 0.01
    # E[sigmoid(N(0,1))] = 0.5 by symmetry; Var = 0.0429 (numerical integral, below)
    z = torch.linspace(-8, 8, 200_001, dtype=torch.float64)
    pdf = torch.exp(-z * z / 2) / math.sqrt(2 * math.pi)
    dz = float(z[1] - z[0])
    var = float((torch.sigmoid(z) - 0.5).pow(2).mul(pdf).sum() * dz)
    assert abs(float(t.double().mean()) - 0.5) < 0.002
    assert abs(float(t.double().var()) - var) < 0.002


def test_uniform_fraction_mixture_moments():
    n = 400_000
    g = torch.Generator().manual_seed(2)
    t = obj.logit_normal_uniform(n, g, 0.0, 1.0, 0.1).double()
    z = torch.linspace(-8, 8, 200_001, dtype=torch.float64)
    pdf = torch.exp(-z * z / 2) / math.sqrt(2 * math.pi)
    dz = float(z[1] - z[0])
    m2_ln = float(torch.sigmoid(z).pow(2).mul(pdf).sum() * dz)
    m2 = 0.9 * m2_ln + 0.1 * (1 / 3)          # E[t^2] of the mixture
    assert abs(float(t.mean()) - 0.5) < 0.002
    assert abs(float(t.pow(2).mean()) - m2) < 0.002
    # the uniform component shows in the tails: P(t < 0.02) = 0.9 P(z < logit 0.02) + 0.1 (0.02 - 1e-3) / (1 - 1e-3)
    p = 0.9 * 0.5 * (1 + math.erf(math.log(0.02 / 0.98) / math.sqrt(2))) + 0.1 * 0.019 / 0.999
    assert abs(float((t < 0.02).double().mean()) - p) < 0.001
    assert float(t.min()) >= 1e-3 and float(t.max()) < 1.0


def _phi(x: float) -> float:
    return 0.5 * (1 + math.erf(x / math.sqrt(2)))


def test_shift_applies_to_the_logit_normal_part_only():
    """PRX: t = shift(sigmoid(z)) w.p. 0.9, U[1e-3, 1) unshifted w.p. 0.1. CDF at y, shift s:
    0.9 Phi(logit(y / (s - (s - 1) y))) + 0.1 (y - 1e-3) / (1 - 1e-3)."""
    n, s = 400_000, 3.0
    g = torch.Generator().manual_seed(5)
    t = obj.sample_timesteps(n, obj.ObjectiveConfig(shift=s, uniform_fraction=0.1), g).double()
    for y in (0.01, 0.1, 0.5, 0.9):
        u = y / (s - (s - 1) * y)
        cdf = 0.9 * _phi(math.log(u / (1 - u))) + 0.1 * (y - 1e-3) / (1 - 1e-3)
        assert abs(float((t <= y).double().mean()) - cdf) < 0.003, (y, cdf)
    # shifting the whole mixture differs measurably at y = 0.1: the uniform part
    # would contribute 0.1 * u, not 0.1 * y
    u = 0.1 / (s - (s - 1) * 0.1)
    wrong = 0.9 * _phi(math.log(u / (1 - u))) + 0.1 * u
    assert abs(float((t <= 0.1).double().mean()) - wrong) > 0.004


def test_shift_closed_form_and_distribution():
    t = torch.linspace(0, 1, 11)
    s = 3.0
    ts = obj.shift_timesteps(t, s)
    torch.testing.assert_close(ts, s * t / (1 + (s - 1) * t))
    assert float(ts[0]) == 0.0 and abs(float(ts[-1]) - 1.0) < 1e-6
    assert torch.equal(obj.shift_timesteps(t, 1.0), t)
    # CDF: P(t' <= y) = P(t <= y / (s - (s-1) y)); for uniform t, P(t' <= 0.5) = 0.5 / (3 - 1) = 0.25
    g = torch.Generator().manual_seed(3)
    u = obj.shift_timesteps(torch.rand(200_000, generator=g), s)
    assert abs(float((u <= 0.5).float().mean()) - 0.25) < 0.005


def test_caption_dropout_rate_and_content():
    b, L, d = 20_000, 6, 3
    emb = torch.ones(b, L, d, dtype=torch.bfloat16)
    mask = torch.ones(b, L, dtype=torch.bool)
    empty = torch.full((L, d), 7.0, dtype=torch.bfloat16)
    empty_mask = torch.tensor([True, True, False, False, False, False])
    g = torch.Generator().manual_seed(4)
    out, out_mask, dropped = obj.caption_dropout(emb, mask, empty, empty_mask, 0.1, g)
    rate = float(dropped.float().mean())
    assert abs(rate - 0.1) < 4 * math.sqrt(0.1 * 0.9 / b)   # 4 sigma
    assert torch.equal(out[dropped], empty.expand(int(dropped.sum()), L, d))
    assert torch.equal(out_mask[dropped], empty_mask.expand(int(dropped.sum()), L))
    assert torch.equal(out[~dropped], emb[~dropped]) and bool(out_mask[~dropped].all())
    _, _, none = obj.caption_dropout(emb, mask, empty, empty_mask, 0.0, g)
    assert not none.any()


def test_lr_schedule():
    assert lr_at(0, 1e-4, 1000) == pytest.approx(1e-7)
    assert lr_at(499, 1e-4, 1000) == pytest.approx(5e-5)
    assert lr_at(999, 1e-4, 1000) == pytest.approx(1e-4)
    assert lr_at(50_000, 1e-4, 1000) == pytest.approx(1e-4)
    assert lr_at(0, 1e-4, 0) == 1e-4


def test_prx_small_is_the_ablation_model():
    from diffusers import PRXTransformer2DModel

    with torch.device("meta"):
        model = PRXTransformer2DModel(**model_config("prx-small", 16, 2304))
    n = sum(p.numel() for p in model.parameters())
    assert 1.15e9 < n < 1.2e9, n   # "the 1.17B ablation model"
    assert (model.config.hidden_size, model.config.depth, model.config.num_heads, model.config.mlp_ratio,
            model.config.patch_size) == (1792, 16, 28, 3.5, 2)


def test_forward_flops_matches_counted_linears():
    """The analytic FLOPs formula = FLOPs counted from every nn.Linear call + the attention matmuls."""
    model = build_model("tiny", 16, 32)
    cfg = dict(model.config)
    counted = [0]

    def hook(mod, inp, out):
        counted[0] += 2 * inp[0].numel() // mod.in_features * mod.in_features * mod.out_features

    hooks = [m.register_forward_hook(hook) for m in model.modules() if isinstance(m, torch.nn.Linear)]
    h = w = 8
    L = 10
    with torch.no_grad():
        model(torch.randn(1, 16, h, w), torch.tensor([0.5]), torch.randn(1, L, 32), return_dict=False)
    for hk in hooks:
        hk.remove()
    n = (h // 2) * (w // 2)
    attention = cfg["depth"] * 4 * n * (n + L) * cfg["hidden_size"]
    assert forward_flops(cfg, h, w, L) == counted[0] + attention


def test_fp32_guard_trips():
    model = build_model("tiny", 16, 32)
    check_weights_dtype(model, "fp32")
    model.to(torch.bfloat16)
    with pytest.raises(PrecisionError, match="--weights-dtype bf16"):
        check_weights_dtype(model, "fp32")
    check_weights_dtype(model, "bf16")  # the ablation, asked for
    # one stray non-FP32 trainable parameter is enough
    model = build_model("tiny", 16, 32)
    model.final_layer.linear.weight.data = model.final_layer.linear.weight.data.half()
    with pytest.raises(PrecisionError, match="final_layer.linear.weight"):
        check_weights_dtype(model, "fp32")


def test_optimizer_state_roundtrip_without_pickle(tmp_path):
    from safetensors.torch import load_file, save_file

    from trainer import checkpoint
    from trainer.config import TrainConfig
    from trainer.optim import build_optimizer

    model = build_model("tiny", 16, 32)
    cfg = TrainConfig(model="tiny")
    opt = build_optimizer(model, cfg)
    adamw = opt.members["adamw"]
    assert list(opt.members) == ["adamw"]
    assert adamw.defaults["betas"] == (0.9, 0.95) and adamw.defaults["eps"] == 1e-15 and adamw.defaults["weight_decay"] == 0
    model(torch.randn(2, 16, 4, 4), torch.tensor([0.3, 0.6]), torch.randn(2, 3, 32), return_dict=False)[0].sum().backward()
    opt.step()
    tensors, meta = checkpoint.optimizer_tensors(opt)
    save_file(tensors, tmp_path / "o.safetensors")
    model2 = build_model("tiny", 16, 32)
    opt2 = build_optimizer(model2, cfg)
    checkpoint.load_optimizer(opt2, load_file(tmp_path / "o.safetensors"), meta)
    assert all(k.startswith("adamw.state.") for k in tensors)  # each optimizer under its own prefix
    sa, sb = adamw.state_dict()["state"], opt2.members["adamw"].state_dict()["state"]
    assert sa.keys() == sb.keys() and len(sa) > 0
    for i in sa:
        for k in sa[i]:
            assert torch.equal(sa[i][k], sb[i][k])
    assert opt2.param_groups[0]["betas"] == (0.9, 0.95)
