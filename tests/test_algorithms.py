"""The one shape of every training algorithm (trainer/algorithms/base.py): a toy algorithm registered in one
line reaches the loss, runs once per optimizer step, appears in RUN/summary.json and keeps its state across a
checkpoint; SPRINT + EMA + the toy together resume bit for bit with the checkpoint keys older runs wrote.
Then the algorithms as PRX's code has them (Photoroom/PRX prx/algorithm, prx/training): where routed tokens
rejoin, SPRINT's mask token, Muon's AdamW epsilon, what --compile compiles.

Data: a synthetic encoded folder (testing/synthetic.py) and the tiny model, so each run takes about a second."""
from __future__ import annotations

import json
import os

import pytest
import torch
from safetensors.torch import load_file

from testing.synthetic import write_encoded_folder
from trainer import algorithms
from trainer.algorithms.base import Algorithm
from trainer.config import TrainConfig
from trainer.model import Denoiser, model_config

TERM = 0.25


class Toy(Algorithm):
    """Adds a constant loss term and counts the optimizer steps it saw (its checkpoint state)."""
    name, keys = "toy", ("seed",)

    def __init__(self, cfg, rank=0, device=torch.device("cpu")):
        super().__init__(cfg, rank, device)
        self.count = torch.zeros((), dtype=torch.int64)
        self.calls: list[int] = []

    @classmethod
    def enabled(cls, cfg) -> bool:
        return True

    def loss_terms(self, out, batch):
        return {"toy_loss": torch.tensor(TERM, device=out.flow.device)}

    def after_optimizer_step(self, step):
        self.count += 1
        self.calls.append(step)

    def state_dict(self):
        return {"count": self.count.clone()}

    def load_state_dict(self, tensors):
        self.count = tensors["count"].clone()

    def summary(self):
        return {**super().summary(), "count": int(self.count)}


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    root = tmp_path_factory.mktemp("algorithms")
    return write_encoded_folder(str(root / "enc"), 2, 8, source="web", latent_shape=(4, 4, 4), text_dim=8,
                                tokens={"long": 6, "short": 3})


@pytest.fixture
def with_toy(monkeypatch):
    monkeypatch.setattr(algorithms, "REGISTRY", [*algorithms.REGISTRY, Toy])  # registering an algorithm: one line


def cfg_for(shards, out, **kw) -> TrainConfig:
    base = dict(shards=[shards], model="tiny", steps=4, batch_size=2, grad_accum=2, lr=1e-3, warmup_steps=0,
                out=out, log_every=1, checkpoint_every=2, tensorboard=False, device="cpu", loader_workers=0,
                shuffle_buffer=16, route_start=0, route_end=1)
    base.update(kw)
    return TrainConfig(**base)


class Killed(Exception):
    pass


def kill_at(n):
    def on_step(step, _):
        if step == n:
            raise Killed
    return on_step


def test_toy_term_reaches_the_loss_and_its_hook_runs_once_per_step(shards, tmp_path, monkeypatch):
    from trainer.train import run

    plain = run(cfg_for(shards, str(tmp_path / "plain")))
    monkeypatch.setattr(algorithms, "REGISTRY", [*algorithms.REGISTRY, Toy])
    out = run(cfg_for(shards, str(tmp_path / "toy")))
    toy = out["algorithms"]["toy"]
    assert toy.calls == [1, 2, 3, 4]  # after each optimizer step, not each of the 2 micro-batches
    # a constant term moves the loss by TERM and leaves the gradients (so the run) as they were
    assert len(out["losses"]) == 4
    for a, b in zip(out["losses"], plain["losses"]):
        assert abs(a - (b + TERM)) < 1e-5, (a, b)
    for (n, a), (_, b) in zip(out["model"].state_dict().items(), plain["model"].state_dict().items()):
        assert torch.equal(a, b), n
    log = open(os.path.join(out["run_dir"], "train.log")).read()
    assert log.count(f"toy_loss={TERM}") == 4 and "toy_loss" not in open(
        os.path.join(plain["run_dir"], "train.log")).read()
    summary = json.load(open(os.path.join(out["run_dir"], "summary.json")))
    assert summary["algorithms"] == {"toy": {"seed": 0, "count": 4}}
    assert json.load(open(os.path.join(plain["run_dir"], "summary.json")))["algorithms"] == {}


def test_toy_state_survives_a_checkpoint(shards, tmp_path, with_toy):
    from trainer.train import run

    with pytest.raises(Killed):
        run(cfg_for(shards, str(tmp_path / "part")), on_step=kill_at(3))
    saved = load_file(tmp_path / "part" / "checkpoints" / "step-00000002" / "aux.safetensors")
    assert set(saved) == {"toy.count"} and int(saved["toy.count"]) == 2
    resumed = run(cfg_for(shards, None, resume=str(tmp_path / "part")))
    toy = resumed["algorithms"]["toy"]
    assert resumed["start_step"] == 2 and toy.calls == [3, 4] and int(toy.count) == 4
    assert json.load(open(tmp_path / "part" / "summary.json"))["algorithms"]["toy"]["count"] == 4


def test_sprint_ema_and_toy_resume_bit_for_bit_with_the_old_key_names(shards, tmp_path, with_toy):
    """Every algorithm with checkpoint state at once (SPRINT's fusion, EMA's shadow of it and of the transformer,
    the toy's counter), killed after step 3 and resumed from step 2: the same losses, weights and EMA."""
    from trainer.train import run

    kw = dict(routing="sprint", ema_decay=0.5, ema_every=1)
    full = run(cfg_for(shards, str(tmp_path / "full"), **kw))
    with pytest.raises(Killed):
        run(cfg_for(shards, str(tmp_path / "part"), **kw), on_step=kill_at(3))
    resumed = run(cfg_for(shards, None, resume=str(tmp_path / "part"), **kw))
    assert resumed["start_step"] == 2 and resumed["losses"] == full["losses"][2:]
    for (n, a), (_, b) in zip(full["denoiser"].state_dict().items(), resumed["denoiser"].state_dict().items()):
        assert torch.equal(a, b), n
    assert full["ema"].shadow.keys() == resumed["ema"].shadow.keys()
    for k, v in full["ema"].shadow.items():
        assert torch.equal(v, resumed["ema"].shadow[k]), k
    ckpt = tmp_path / "full" / "checkpoints" / "step-00000004"
    aux = load_file(ckpt / "aux.safetensors")
    assert {k.split(".")[0] for k in aux} == {"sprint_fusion", "ema", "toy"}
    assert "ema.sprint_fusion.linear.weight" in aux and "sprint_fusion.linear.weight" in aux
    ema_weights = load_file(ckpt / "transformer_ema" / "diffusion_pytorch_model.safetensors")
    for n, t in ema_weights.items():
        assert torch.equal(t, full["ema"].shadow["transformer." + n]), n


# ------------------------------------------------------------------------------------------- as in PRX's code
def prx_model(depth: int = 2, seed: int = 0):
    """A tiny PRXTransformer2DModel with every weight perturbed (a fresh one's blocks start as the identity)."""
    from diffusers import PRXTransformer2DModel

    with torch.random.fork_rng(devices=[]), torch.no_grad():
        torch.manual_seed(seed)
        model = PRXTransformer2DModel(**dict(model_config("tiny", 16, 32), depth=depth))
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model


def inputs(b=2, h=8, w=8):
    g = torch.Generator().manual_seed(0)
    return dict(hidden_states=torch.randn(b, 16, h, w, generator=g), timestep=torch.rand(b, generator=g),
                encoder_hidden_states=torch.randn(b, 5, 32, generator=g),
                attention_mask=torch.ones(b, 5, dtype=torch.bool))


@pytest.mark.parametrize("method", ["tread", "sprint"])
def test_tokens_rejoin_after_block_route_end_as_in_prx(method):
    """PRX rejoins the routed tokens in a post-hook on blocks[route_end]: its (2, 12) routes blocks 2..12 of 16;
    here (1, 2) of 4 blocks routes blocks 1 and 2, and route_end must be a block of the model."""
    from trainer.algorithms import routing

    den = Denoiser(prx_model(depth=4), method, 1, 2, 0.75).train()
    seen = []
    for b in den.transformer.blocks:
        b.register_forward_hook(lambda m, a, o: seen.append(o.shape[1]))
    den(**inputs(), route_seed=3)  # 16 tokens: 12 routed, 4 kept
    assert seen == [16, 4, 4, 16]
    routing.check_blocks(method, 1, 3, 4)
    with pytest.raises(ValueError, match="route_end <= 3"):
        routing.check_blocks(method, 1, 4, 4)


def test_sprint_mask_token_is_a_learnable_parameter_starting_at_zero():
    """PRX's SPRINT (learnable_mask: true): the dropped positions hold a zero-initialised trained parameter."""
    den = Denoiser(prx_model(), "sprint", 0, 1, 0.75).train()
    mask = den.aux["sprint_fusion"].mask_token
    assert isinstance(mask, torch.nn.Parameter) and mask.shape == (64,) and not mask.any()
    assert dict(den.named_parameters())["aux.sprint_fusion.mask_token"] is mask
    den(**inputs(), route_seed=3)[0].square().mean().backward()
    assert mask.grad is not None and mask.grad.abs().sum() > 0


def test_muon_adamw_half_uses_prx_epsilon():
    """PRX's optimizer/muon.yaml gives its Adam group eps 1e-8; the AdamW baseline (adamw.yaml) keeps 1e-15."""
    from trainer.optim import build_optimizer

    den = Denoiser(prx_model())
    muon = build_optimizer(den, TrainConfig(model="tiny", optimizer="muon"))
    assert muon.members["adamw"].defaults["eps"] == 1e-8
    assert build_optimizer(den, TrainConfig(model="tiny")).members["adamw"].defaults["eps"] == 1e-15


def test_compile_compiles_the_denoiser_with_its_algorithms(shards, tmp_path, monkeypatch):
    """--compile compiles what PRX compiles, its denoiser with the algorithms' modules and hooks; compiling the
    bare transformer made `tread.yaml --compile` a TypeError (it takes no route seed). Traced by dynamo and
    AOTAutograd (backend aot_eager: inductor's code generation takes minutes on a CPU), same losses as eager."""
    from trainer.train import run

    compiled_modules, compile = [], torch.compile

    def aot_eager(module, **kw):
        compiled_modules.append(module)
        return compile(module, backend="aot_eager", **kw)

    kw = dict(steps=2, grad_accum=1, checkpoint_every=1000, routing="sprint", ema_decay=0.5, ema_every=1,
              resolution_aware="token")  # the txt_in hook and the grown mask traced too
    eager = run(cfg_for(shards, str(tmp_path / "eager"), **kw))
    monkeypatch.setattr(torch, "compile", aot_eager)
    compiled = run(cfg_for(shards, str(tmp_path / "compiled"), compile=True, **kw))
    assert [type(m) for m in compiled_modules] == [Denoiser] and compiled_modules[0] is compiled["denoiser"]
    assert len(compiled["losses"]) == 2
    for a, b in zip(compiled["losses"], eager["losses"]):
        assert abs(a - b) <= 1e-5 * abs(b), (a, b)


# ------------------------------------------------------------------------------------------- loss-shaping algorithms
def test_contrastive_term_is_the_formula_on_a_hand_built_batch():
    """PRX's ContrastiveFlowMatching: -lambda x mean((pred - target.roll(1))^2), i.e. sample i against target i-1."""
    from trainer.algorithms.contrastive import contrastive_term

    pred = torch.tensor([[1.0, 2.0], [3.0, 5.0], [0.0, -1.0]])
    target = torch.tensor([[0.0, 0.0], [1.0, 1.0], [2.0, 4.0]])
    # rolled targets: [2, 4], [0, 0], [1, 1]; squared errors: 1+4, 9+25, 1+4 -> mean 44 / 6
    assert contrastive_term(pred, target, 0.05).item() == pytest.approx(-0.05 * 44 / 6)
    assert contrastive_term(pred[:1], target[:1], 0.05).item() == 0.0  # one sample: no other target


def test_min_snr_weights_equal_the_closed_form_at_chosen_t():
    """w(t) = min(SNR, gamma) t^2 with SNR = ((1 - t) / t)^2: at t = 0.5 SNR is 1 (w = 0.25), at t = 0.1 SNR is
    81, clipped to 5 (w = 5 x 0.01), at t = 0.9 SNR is 1/81 (w = 0.01); x-prediction scales by max(t, 0.05)^2."""
    from trainer.algorithms.min_snr import min_snr_weights

    w = min_snr_weights(torch.tensor([0.5, 0.1, 0.9]), 5.0)
    assert torch.allclose(w, torch.tensor([0.25, 0.05, 0.01]), atol=1e-7)
    wx = min_snr_weights(torch.tensor([0.01, 0.5]), 5.0, "x", 0.05)
    assert torch.allclose(wx, torch.tensor([5.0 * 0.05 ** 2, 0.25]), atol=1e-7)


def test_min_snr_weights_the_step_loss_and_leaves_the_logged_flow_loss_alone():
    from trainer.algorithms.min_snr import MinSnr
    from trainer.objective import Losses
    from trainer.train import weighted_flow

    out = Losses(flow=torch.tensor([2.0, 4.0]), t=torch.tensor([0.5, 0.9]))
    algo = MinSnr(TrainConfig(model="tiny", min_snr_gamma=5.0))
    assert weighted_flow(out, None, [algo]).tolist() == pytest.approx([2.0 * 0.25, 4.0 * 0.01])
    assert out.flow.tolist() == [2.0, 4.0]
    assert algo.summary() == {"min_snr_gamma": 5.0}


def test_fp8_converts_prx_layers_by_their_diffusers_names_and_refuses_a_cpu():
    """PRX's FP8.yaml filter (gate/up/down_proj, img_qkv_proj, txt_kv_proj, attn_out) names, in diffusers'
    PRXTransformer2DModel, six Linears per block and nothing outside the blocks."""
    from trainer.algorithms import fp8

    model = prx_model(depth=3)
    picked = [fqn for fqn, m in model.named_modules() if fp8.wanted(m, fqn)]
    assert len(picked) == 3 * 6 and all(f.startswith("blocks.") for f in picked)
    assert {f.split(".", 2)[2] for f in picked} == {"gate_proj", "up_proj", "down_proj",
                                                    "attention.img_qkv_proj", "attention.txt_kv_proj",
                                                    "attention.to_out.0"}
    with pytest.raises(ValueError, match="Hopper"):
        fp8.check_device(torch.device("cpu"))
