"""The PRX ablations on CPU with tiny models: Muon, REPA, TREAD/SPRINT, EMA, fine-tune start,
the overlays, exact resume of each, and the refusals before step 1.

Data: the bundled photos ingested, recaptioned (fake backend) and encoded by the tiny VAE, tiny T5Gemma and
tiny DINOv2 (REPA features) through the real stages; a second source encoded from the raw ingest (original
captions only, no REPA features)."""
from __future__ import annotations

import copy
import glob
import json
import os

import pytest
import torch

from pipeline.cli import main as prx_data
from trainer.config import TrainConfig, load_config
from trainer.model import Denoiser, build_model

TINY = dict(route_start=0, route_end=1, repa_block=0)  # the tiny preset has 2 blocks
# The test shards hold 9 samples: a 2,048-sample shuffle buffer would hold each ~230 times, and every loader worker
# reads them all (~900 shard opens) before the first batch. Nothing here depends on the buffer's size.
BUFFER = 16
OVERLAYS = sorted(os.path.basename(p)[:-5] for p in glob.glob("manifests/ablations/*.yaml"))


@pytest.fixture(scope="module")
def data(tmp_path_factory, tiny_model):
    from conftest import write_photo_folder

    root = tmp_path_factory.mktemp("ablation-data")
    photos = write_photo_folder(root / "photos")
    vae, te, dino = tiny_model("tiny-flux-vae"), tiny_model("tiny-t5gemma"), tiny_model("tiny-dinov2")
    common = ["--executor", "local", "--no-progress"]
    enc = ["--vae", vae, "--text-encoder", te, *common]
    assert prx_data(["ingest", "--in", str(photos), "--out", str(root / "raw"), "--shard-size", "3", *common]) == 0
    assert prx_data(["recaption", "--in", str(root / "raw"), "--out", str(root / "cap"), "--backend", "fake",
                     "--relax-checks", "language", *common]) == 0
    assert prx_data(["encode", "--in", str(root / "cap"), "--out", str(root / "rich"), "--resolution", "128",
                     "--repa", dino, "--repa-patch-size", "2", *enc]) == 0
    assert prx_data(["encode", "--in", str(root / "raw"), "--out", str(root / "plain"), "--resolution", "64",
                     "--variants", "original", *enc]) == 0
    assert prx_data(["encode", "--in", str(root / "cap"), "--out", str(root / "rich3"), "--resolution", "64",
                     "--variants", "long", "--repa", tiny_model("tiny-dinov3"), "--repa-patch-size", "2", *enc]) == 0
    from test_perceptual import random_lpips_state

    torch.save(random_lpips_state(), str(root / "lpips_vgg.pth"))  # random VGG LPIPS weights (a state dict)
    return {"root": root, "rich": str(root / "rich"), "plain": str(root / "plain"), "rich3": str(root / "rich3"),
            "vae": vae, "te": te, "lpips": str(root / "lpips_vgg.pth"), "dino": dino}


def cfg_for(data, tmp_path, **kw) -> TrainConfig:
    base = dict(shards=[data["rich"]], model="tiny", steps=3, batch_size=2, lr=1e-3, warmup_steps=0,
                out=str(tmp_path / "run"), log_every=1, checkpoint_every=1000, tensorboard=False, device="cpu",
                vae=data["vae"], text_encoder=data["te"], shuffle_buffer=BUFFER, **TINY)
    base.update(kw)
    return TrainConfig(**base)


def tiny(seed=0):
    """The tiny preset with every weight perturbed (a fresh PRX model's modulation is zero, so its blocks
    start as the identity and routing would change nothing)."""
    model = build_model("tiny", 16, 32)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    return model


def tiny_inputs(b=2, h=8, w=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    return dict(hidden_states=torch.randn(b, 16, h, w, generator=g), timestep=torch.rand(b, generator=g),
                encoder_hidden_states=torch.randn(b, 5, 32, generator=g),
                attention_mask=torch.ones(b, 5, dtype=torch.bool))


# ------------------------------------------------------------------------------------------- Muon
def test_muon_split_and_one_step_equals_reference_pair():
    from trainer.optim import build_optimizer

    den = Denoiser(tiny())
    ref = copy.deepcopy(den)
    opt = build_optimizer(den, TrainConfig(model="tiny", optimizer="muon", lr=1e-3))
    names = {id(p): n for n, p in den.named_parameters()}
    muon = [names[id(p)] for p in opt.members["muon"].param_groups[0]["params"]]
    adamw = [names[id(p)] for p in opt.members["adamw"].param_groups[0]["params"]]
    expect = [n for n, p in den.named_parameters() if p.ndim == 2 and "blocks" in n]
    assert muon == expect and len(expect) == 2 * 7  # per block: qkv, txt kv, out, gate, up, down, modulation
    assert sorted(adamw) == sorted(n for n, _ in den.named_parameters() if n not in expect)
    m = opt.members["muon"].defaults
    assert (m["weight_decay"], m["momentum"], m["nesterov"], m["ns_steps"], m["adjust_lr_fn"]) == \
        (0.0, 0.95, True, 5, "match_rms_adamw")
    rp = dict(ref.named_parameters())
    ref_muon = torch.optim.Muon([rp[n] for n in expect], lr=1e-3, weight_decay=0.0, momentum=0.95, nesterov=True,
                                ns_steps=5, adjust_lr_fn="match_rms_adamw")
    ref_adamw = torch.optim.AdamW([rp[n] for n in adamw], lr=1e-3, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.0)
    for module in (den, ref):
        module(**tiny_inputs())[0].square().mean().backward()
    opt.step()
    ref_muon.step()
    ref_adamw.step()
    for (n, a), (_, b) in zip(den.named_parameters(), ref.named_parameters()):
        assert torch.equal(a, b), n
    assert any(not torch.equal(a, b) for a, b in zip(den.parameters(), Denoiser(tiny()).parameters()))


def test_muon_with_no_2d_block_weight_is_refused():
    from trainer.optim import build_optimizer

    model = tiny()
    for b in model.blocks:
        b.requires_grad_(False)
    with pytest.raises(ValueError, match="--optimizer adamw"):
        build_optimizer(model, TrainConfig(model="tiny", optimizer="muon"))


# ------------------------------------------------------------------------------------------- REPA
def test_repa_loss_is_minus_weight_at_equal_features_and_reaches_only_early_blocks():
    from trainer.algorithms import repa

    den = Denoiser(tiny(), repa_block=0, repa_dim=24)
    x = tiny_inputs()
    with torch.no_grad():  # the features the projector would produce
        den.repa_hook.recording = True
        den.transformer(**x, return_dict=False)
        target = den.aux["repa_projector"](den.repa_hook.take())
    _, cos = den(**x, repa_features=target)
    loss = repa.repa_loss(cos, 0.7)
    assert abs(float(loss.detach()) + 0.7) < 1e-5
    den.zero_grad()
    repa.repa_loss(den(**x, repa_features=torch.randn_like(target))[1], 0.5).backward()
    grads = {n: p.grad for n, p in den.named_parameters()}
    assert any(g is not None and g.abs().sum() > 0 for n, g in grads.items() if n.startswith("transformer.blocks.0."))
    after = [n for n in grads if n.startswith(("transformer.blocks.1.", "transformer.final_layer."))]
    assert after and all(grads[n] is None or not grads[n].any() for n in after)
    # burn-in over: no hook, frozen projector, the model returns the prediction alone
    den.stop_repa()
    assert len(den(**x, repa_features=target)) == 1
    assert not any(p.requires_grad for p in den.aux["repa_projector"].parameters())


def test_repa_burnin_leaves_the_flow_loss_alone(data, tmp_path):
    from trainer.train import run

    out = run(cfg_for(data, tmp_path, steps=4, repa_weight=0.5, repa_until_step=2))
    den = out["denoiser"]
    assert den.repa_hook is None and not any(p.requires_grad for p in den.aux["repa_projector"].parameters())
    log = open(os.path.join(out["run_dir"], "train.log")).read()
    assert "REPA burn-in over" in log
    lines = [line for line in log.splitlines() if " step " in line and "flow_loss=" in line]
    assert len(lines) == 4
    for line in lines:  # steps 1-2: loss = flow + REPA (cosine logged); steps 3-4: the flow loss alone
        step = int(line.split(" step ")[1].split("/")[0])
        loss = float(line.split(" loss=")[1].split()[0])
        flow = float(line.split("flow_loss=")[1].split()[0])
        assert ("repa_cos=" in line) == (step <= 2) and (abs(loss - flow) < 1e-4) == (step > 2), line


# ------------------------------------------------------------------------------------------- TREAD / SPRINT
def test_tread_off_or_eval_is_the_plain_model_bit_for_bit():
    from trainer.algorithms import routing

    model = tiny()
    x = tiny_inputs()
    plain = model(**x, return_dict=False)[0]
    tread = Denoiser(model, "tread", 0, 1, 0.5)
    tread.eval()
    assert torch.equal(tread(**x)[0], plain)
    tread.train()
    assert torch.equal(Denoiser(model, "tread", 0, 1, 0.0)(**x, route_seed=1)[0], plain)
    # the written-out forward with nothing routed is diffusers' forward
    assert torch.equal(routing.routed_forward(model, *x.values(), routing.Route(0, 2, None)), plain)
    assert not torch.equal(tread(**x, route_seed=1)[0], plain)


@pytest.mark.parametrize("n", [2, 3, 5, 16, 64])
def test_routed_counts_follow_the_formula(n):
    from trainer.algorithms import routing

    for ratio in (0.01, 0.25, 0.5, 0.75, 0.99):
        routed = min(max(round(n * ratio), 1), n - 1)
        assert routing.routed_count(n, ratio) == routed
        keep = routing.draw_route(4, n, ratio, seed=7, device=torch.device("cpu"))
        assert keep.shape == (4, n - routed)
        assert all(len(set(row.tolist())) == n - routed and row.tolist() == sorted(row.tolist()) for row in keep)
        assert torch.equal(keep, routing.draw_route(4, n, ratio, seed=7, device=torch.device("cpu")))
    assert routing.routed_count(1, 0.5) == 0 and routing.routed_count(10, 0.0) == 0


@pytest.mark.parametrize("method", ["tread", "sprint"])
def test_routed_blocks_see_the_kept_tokens_and_checkpointing_matches(method):
    den = Denoiser(tiny(), method, 0, 1, 0.75, repa_block=0, repa_dim=24).train()
    seen = []
    hooks = [b.register_forward_hook(lambda m, a, o: seen.append(o.shape[1])) for b in den.transformer.blocks]
    x = tiny_inputs(h=8, w=8)  # 16 tokens: 12 routed, 4 kept
    feats = torch.randn(2, 16, 24)

    def loss_and_grads(module):
        module.zero_grad()
        out, cos = module(**x, repa_features=feats, route_seed=3)
        loss = out.square().mean() - cos.mean()
        loss.backward()
        return loss.detach(), {n: p.grad.clone() for n, p in module.named_parameters() if p.grad is not None}

    loss, grads = loss_and_grads(den)
    assert seen == [4, 4]  # (0, 1): blocks 0 and 1 routed, the tokens rejoin after block 1
    for h in hooks:
        h.remove()
    ckpt = copy.deepcopy(den)
    ckpt.transformer.enable_gradient_checkpointing()
    loss2, grads2 = loss_and_grads(ckpt)
    assert torch.equal(loss, loss2) and grads.keys() == grads2.keys()
    for n in grads:
        torch.testing.assert_close(grads[n], grads2[n], rtol=1e-5, atol=1e-7, msg=n)
    assert ("aux.sprint_fusion.linear.weight" in grads) == (method == "sprint")


def test_routed_flops_count_blocks_at_the_kept_length():
    from trainer.model import forward_flops

    cfg = dict(tiny().config)
    full, routed = forward_flops(cfg, 8, 8, 5), forward_flops(cfg, 8, 8, 5, route=(0, 1, 4))
    d, m, L = cfg["hidden_size"], int(cfg["hidden_size"] * cfg["mlp_ratio"]), 5

    def block(k):
        return 6 * k * d * d + 4 * L * d * d + 4 * k * (k + L) * d + 2 * k * d * d + 6 * k * d * m + 12 * d * d

    assert full - routed == block(16) - block(4)
    assert forward_flops(cfg, 8, 8, 5, route=(0, 1, 4), fusion=True) - routed == 4 * 16 * d * d


# ------------------------------------------------------------------------------------------- EMA
def test_ema_after_k_updates_is_the_closed_form():
    from trainer.algorithms.ema import EMA

    lin = torch.nn.Linear(3, 2)
    w = [lin.weight.detach().clone()]
    ema, d = EMA(lin, 0.9, every=3), 0.9
    updates = 0
    for step in range(1, 13):
        with torch.no_grad():
            lin.weight.normal_()
        if ema.maybe_update(lin, step):
            w.append(lin.weight.detach().clone())
            updates += 1
    k = updates
    assert k == 4
    closed = d ** k * w[0] + sum((1 - d) * d ** (k - i) * w[i] for i in range(1, k + 1))
    torch.testing.assert_close(ema.shadow["weight"], closed)
    live = lin.weight.detach().clone()
    with ema.applied(lin):
        assert torch.equal(lin.weight, ema.shadow["weight"])
    assert torch.equal(lin.weight, live)


def test_ema_run_writes_transformer_ema_and_eval_loss_ema(data, tmp_path):
    from diffusers import PRXTransformer2DModel

    from trainer.train import run

    out = run(cfg_for(data, tmp_path, ema_decay=0.5, ema_every=1, eval_every=3, eval_batch_size=2))
    assert [s for s, _ in out["eval_ema"]] == [3] and out["eval_ema"][0][1] != out["eval"][-1][1]
    ckpt = os.path.join(out["run_dir"], "checkpoints", "step-00000003")
    ema = PRXTransformer2DModel.from_pretrained(os.path.join(ckpt, "transformer_ema"))
    for n, p in ema.named_parameters():
        torch.testing.assert_close(p, out["ema"].shadow["transformer." + n], rtol=0, atol=0)
    summary = json.load(open(os.path.join(out["run_dir"], "summary.json")))
    assert summary["samples_per_s"] > 0 and summary["batches_per_s"] > 0 and summary["peak_memory_bytes"] > 0
    assert summary["mfu"] is None  # a CPU has no known peak: no MFU rather than a made-up one


# ------------------------------------------------------------------------------------------- fine-tune start
def test_init_from_starts_at_step_0_with_empty_optimizer_state(data, tmp_path):
    from safetensors.torch import load_file

    from trainer import checkpoint
    from trainer.train import run

    parent = run(cfg_for(data, tmp_path, out=str(tmp_path / "parent"), steps=2, ema_decay=0.5, ema_every=1))
    out = run(cfg_for(data, tmp_path, out=str(tmp_path / "child"), steps=1, init_from=str(tmp_path / "parent"),
                      init_weights="ema", lr=0.0))
    assert out["start_step"] == 0 and len(out["losses"]) == 1
    # a new optimizer: after its first step AdamW's step count is 1 (the parent's state says 2)
    steps = {k: float(v) for k, v in load_file(tmp_path / "child/checkpoints/step-00000001/optimizer.safetensors").items()
             if k.endswith(".step")}
    assert steps and set(steps.values()) == {1.0}
    # lr 0: the weights after that step are the parent's EMA weights
    ema = checkpoint.read_weights(os.path.join(parent["run_dir"], "checkpoints", "step-00000002"), "transformer_ema")
    for n, p in out["model"].state_dict().items():
        assert torch.equal(p, ema[n]), n
    rec = json.load(open(tmp_path / "child" / "data.json"))["parent"]
    assert rec["step"] == 2 and rec["weights"] == "ema" and rec["init_from"].endswith("step-00000002")


# ------------------------------------------------------------------------------------------- overlays, resume
EXPECTED_CHANGES = {
    "caption-mixed": {"caption"}, "caption-original": {"caption"}, "caption-short": {"caption"},
    "ema": {"ema_decay"}, "finetune": {"init_from", "mix", "steps"}, "muon": {"optimizer"},
    "repa-burnin": {"repa_weight", "repa_until_step"}, "repa-dinov2": {"repa_weight"}, "shift-3": {"shift"},
    "sprint": {"routing", "route_ratio"}, "tread": {"routing", "route_ratio"}, "weights-bf16": {"weights_dtype"},
    "x-prediction": {"prediction"}, "contrastive-fm": {"contrastive_weight"}, "min-snr": {"min_snr_gamma"},
    "fp8": {"fp8"}, "jit-pixel": {"vae", "model", "prediction", "shift"},
    "jit-pixel-1024": {"vae", "model", "prediction", "shift"},
    "text-qwen3vl": {"text_encoder"}, "vae-flux2": {"vae"}, "vae-repa-e": {"vae"}, "vae-dcae": {"vae", "model"},
    "repa-dinov3": {"repa_weight", "repa_encoder"}, "irepa-dinov2": {"repa_weight", "repa_variant", "repa_encoder"},
    "irepa-dinov3": {"repa_weight", "repa_variant", "repa_encoder"}, "resolution-aware": {"resolution_aware"},
    "resolution-aware-vec": {"resolution_aware"},
    "lpips-jit": {"vae", "model", "prediction", "shift", "lpips_weight", "lpips_resize"},
    "perceptual-dino": {"prediction", "pdino_weight"},
}
GPU_ONLY = {"fp8"}  # refused on this CPU before step 1 (test_bad_ablation_input_is_refused_before_step_1)


def overlay_cli(name: str, data, out: str, **extra) -> list[str]:
    """The overlay, run on the tiny model over the test shards (what the command line overrides)."""
    # rich3: DINOv3 teacher features, and 64 px crops, a quarter of the pixels the perceptual losses decode and score
    shards = data["rich3"] if name.endswith("dinov3") or name.startswith(("lpips", "perceptual")) else data["rich"]
    args = ["--config", f"manifests/ablations/{name}.yaml", "--shards", shards, "--mix", "",
            "--model", "tiny", "--vae", data["vae"], "--text-encoder", data["te"], "--steps", "3",
            "--batch-size", "2", "--warmup-steps", "0", "--out", out, "--log-every", "1", "--no-tensorboard",
            "--device", "cpu", "--route-start", "0", "--route-end", "1", "--repa-block", "0", "--ema-every", "1",
            "--repa-until-step", "2" if name == "repa-burnin" else "0", "--shuffle-buffer", str(BUFFER)]
    if name.startswith("lpips"):
        args += ["--lpips-weights", data["lpips"]]
    if name == "perceptual-dino":
        args += ["--pdino-encoder", data["dino"]]  # the tiny DINOv2 with registers, not the hub's
    for k, v in extra.items():
        args += [f"--{k.replace('_', '-')}", str(v)]
    return args


def test_overlays_change_exactly_their_keys_and_each_runs_3_steps(data, tmp_path, capsys):
    from trainer.cli import main
    from trainer.train import run

    base = load_config({"config": "manifests/train/base.yaml"})
    assert base.caption == {"long": 1.0} and base.optimizer == "adamw" and base.repa_weight == 0
    assert TrainConfig().caption == {} and base.routing == "none" and base.ema_decay == 0
    assert set(OVERLAYS) == set(EXPECTED_CHANGES)
    for name in OVERLAYS:
        over = load_config({"config": f"manifests/ablations/{name}.yaml"})
        diff = {f for f in TrainConfig.__dataclass_fields__ if getattr(over, f) != getattr(base, f)}
        assert diff - {"config", "base"} == EXPECTED_CHANGES[name], name
    parent = run(cfg_for(data, tmp_path, out=str(tmp_path / "parent"), steps=1))
    for name in sorted(set(OVERLAYS) - GPU_ONLY):
        extra = {"init_from": parent["run_dir"]} if name == "finetune" else {}
        rc = main(overlay_cli(name, data, str(tmp_path / name), **extra))
        assert rc == 0, (name, capsys.readouterr().err)
        assert os.path.exists(tmp_path / name / "checkpoints" / "step-00000003" / "state.json"), name


@pytest.mark.parametrize("name", ["muon", "repa-dinov2", "repa-burnin", "repa-dinov3", "irepa-dinov2", "irepa-dinov3",
                                  "tread", "sprint", "ema",
                                  "contrastive-fm", "min-snr", "resolution-aware", "resolution-aware-vec",
                                  "lpips-jit", "perceptual-dino"])
def test_killed_and_resumed_overlay_matches_uninterrupted(name, data, tmp_path):
    from safetensors.torch import load_file

    from trainer.cli import build_parser
    from trainer.train import run

    def cfg(out, **kw):
        args = vars(build_parser().parse_args(overlay_cli(name, data, out or "unused")))
        args.update(steps=4, batch_size=3, grad_accum=2, checkpoint_every=2, out=out, **kw)
        return load_config(args)

    full = run(cfg(str(tmp_path / "full")))

    class Killed(Exception):
        pass

    def kill(step, _):
        if step == 2:
            raise Killed

    with pytest.raises(Killed):
        run(cfg(str(tmp_path / "part")), on_step=kill)
    resumed = run(cfg(None, resume=str(tmp_path / "part")))
    assert resumed["start_step"] == 2 and resumed["losses"] == full["losses"][2:]
    for (n, a), (_, b) in zip(full["denoiser"].state_dict().items(), resumed["denoiser"].state_dict().items()):
        assert torch.equal(a, b), n
    if full["ema"] is not None:
        for k, v in full["ema"].shadow.items():
            assert torch.equal(v, resumed["ema"].shadow[k]), k
    ckpt = tmp_path / "full" / "checkpoints" / "step-00000004"
    prefixes = {k.split(".")[0] for k in load_file(ckpt / "optimizer.safetensors")}
    assert prefixes == ({"muon", "adamw"} if name == "muon" else {"adamw"})
    aux = set(load_file(ckpt / "aux.safetensors")) if (ckpt / "aux.safetensors").exists() else set()
    assert ({k.split(".")[0] for k in aux} == {"sprint_fusion"}) == (name == "sprint")
    assert ({k.split(".")[0] for k in aux} == {"repa_projector"}) == ("repa" in name)
    assert ({k.split(".")[0] for k in aux} == {"resolution_tokens"}) == (name == "resolution-aware")
    assert not any("fusion" in k or "projector" in k for k in load_file(ckpt / "transformer" /
                                                                      "diffusion_pytorch_model.safetensors"))
    assert (ckpt / "transformer_ema").is_dir() == (name == "ema")


# ------------------------------------------------------------------------------------------- refusals
def refused(capsys, argv) -> str:
    from trainer.cli import main

    assert main(argv) == 2
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("prx-train: error: ")]
    assert len(lines) == 1, lines  # one line naming the fix (stderr may also hold a stale log handler's noise)
    return lines[0]


def test_bad_ablation_input_is_refused_before_step_1(data, tmp_path, capsys):
    out = str(tmp_path / "never")
    plain = ["--shards", data["plain"], "--caption", "original=1"]
    # REPA without stored features; a source without long captions under the baseline
    assert "prx-data encode --repa" in refused(capsys, overlay_cli("repa-dinov2", data, out) + plain)
    # iREPA-V3 on DINOv2 features: the DINOv3 features are missing
    assert "prx-data encode --repa dinov3" in refused(capsys, overlay_cli("irepa-dinov3", data, out)
                                                      + ["--shards", data["rich"]])
    assert "prx-data recaption" in refused(capsys, overlay_cli("muon", data, out) + ["--shards", data["plain"]])
    # block indices outside the depth, ratio outside (0, 1), decay outside [0, 1)
    assert "outside the model's 2 blocks" in refused(capsys, overlay_cli("tread", data, out, route_end=12))
    assert "outside the model's 2 blocks" in refused(capsys, overlay_cli("repa-dinov2", data, out, repa_block=2))
    assert "(0, 1)" in refused(capsys, overlay_cli("sprint", data, out, route_ratio=1.0))
    assert "[0, 1)" in refused(capsys, overlay_cli("ema", data, out, ema_decay=1.0))
    # FP8 on a CPU: the message names the GPU it needs and the way back to the baseline
    fp8 = refused(capsys, overlay_cli("fp8", data, out))
    assert "Hopper" in fp8 and "drop --fp8" in fp8
    assert not os.path.exists(os.path.join(out, "checkpoints"))


def test_repa_features_off_the_token_grid_are_refused(data, tmp_path, capsys):
    from diffusers import PRXTransformer2DModel

    from trainer.model import model_config

    folder = str(tmp_path / "patch1")  # one token per 8 px; the stored features are one per 16 px
    PRXTransformer2DModel(**dict(model_config("tiny", 16, 32), patch_size=1)).save_pretrained(folder)
    err = refused(capsys, overlay_cli("repa-dinov2", data, str(tmp_path / "r"), model=folder))
    assert "does not match the token grid" in err and "--repa-patch-size 1" in err


def test_init_from_refusals(data, tmp_path, capsys):
    from diffusers import PRXTransformer2DModel

    from trainer.model import model_config
    from trainer.train import run

    parent = run(cfg_for(data, tmp_path, out=str(tmp_path / "parent"), steps=1))["run_dir"]
    wide = str(tmp_path / "wide")
    PRXTransformer2DModel(**dict(model_config("tiny", 16, 32), hidden_size=96, num_heads=3)).save_pretrained(wide)
    err = refused(capsys, overlay_cli("finetune", data, str(tmp_path / "a"), init_from=parent, model=wide))
    assert "another architecture" in err and "hidden_size 64 vs 96" in err
    other = tmp_path / "other"  # the same run, recorded as trained on another VAE's shards
    import shutil

    shutil.copytree(parent, other)
    rec = json.loads((other / "data.json").read_text())
    rec["vae"]["id"] = "black-forest-labs/FLUX.1-dev"
    (other / "data.json").write_text(json.dumps(rec))
    err = refused(capsys, overlay_cli("finetune", data, str(tmp_path / "b"), init_from=other))
    assert "another VAE" in err
    err = refused(capsys, overlay_cli("muon", data, str(tmp_path / "c"), init_from=parent)
                  + ["--resume", parent, "--out", parent])
    assert "--resume continues" in err and "not both" in err
    err = refused(capsys, overlay_cli("finetune", data, str(tmp_path / "d"), init_from=parent, init_weights="ema"))
    assert "transformer_ema/" in err
