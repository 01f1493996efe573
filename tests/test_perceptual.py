"""PRX's perceptual losses: LPIPS (trainer/algorithms/lpips.py) and Perceptual DINO (trainer/algorithms/pdino.py),
on random VGG weights written to a file and the tiny DINOv2; nothing is downloaded."""
from __future__ import annotations

import math
import os
import pickle

import pytest
import torch

from contract.errors import PrxError
from trainer.config import TrainConfig
from trainer.objective import Losses

PIXELS = {"class": "none"}  # a DataSpec's vae record in pixel space (`prx-data encode --vae none`)


class Spec:
    vae = PIXELS


def random_lpips_state(seed: int = 0) -> dict[str, torch.Tensor]:
    """A full state dict of lpips.LPIPS(net="vgg"): He-scaled random convolutions, non-negative linear heads (as
    LPIPS's trained ones are, so distances are >= 0), LPIPS's own input scaling."""
    from trainer.algorithms.lpips import empty_vgg_lpips

    g = torch.Generator().manual_seed(seed)
    scaling = {"scaling_layer.shift": torch.tensor([-.030, -.088, -.188]).view(1, 3, 1, 1),
               "scaling_layer.scale": torch.tensor([.458, .448, .450]).view(1, 3, 1, 1)}
    state = {}
    for k, v in empty_vgg_lpips(meta=True).state_dict().items():
        if k in scaling:
            state[k] = scaling[k]
        elif v.ndim > 1:
            w = torch.randn(v.shape, generator=g) * (2.0 / v[0].numel()) ** 0.5
            state[k] = w.abs() if k.startswith("lin") else w
        else:
            state[k] = torch.zeros(v.shape)
    for k in [k for k in state if k.startswith("lins.")]:  # lpips.LPIPS's lins[i] is its lin{i}: one tensor
        state[k] = state[k.replace("lins.", "lin", 1)]
    return state


@pytest.fixture(scope="module")
def lpips_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("lpips") / "lpips_vgg.pth"
    torch.save(random_lpips_state(), path)
    return str(path)


def images(seed: int = 0, n: int = 2, size: int = 32) -> torch.Tensor:
    """Smooth random images in [-1, 1] (upsampled noise, so resizing and VGG see structure)."""
    g = torch.Generator().manual_seed(seed)
    small = torch.rand(n, 3, size // 4, size // 4, generator=g) * 2 - 1
    return torch.nn.functional.interpolate(small, size=(size, size), mode="bilinear", align_corners=False)


def x_cfg(**kw) -> TrainConfig:
    return TrainConfig(model="tiny", prediction="x", device="cpu", **kw)


def losses_for(pred: torch.Tensor, x0: torch.Tensor) -> Losses:
    """What trainer.objective.losses hands the loss hooks, for a chosen x0 prediction (a leaf with a gradient)."""
    return Losses(flow=torch.zeros(pred.shape[0]), t=torch.full((pred.shape[0],), 0.5), x0_pred=pred, x0=x0)


def check_term(algo, term: str, x0: torch.Tensor, frozen: torch.nn.Module) -> None:
    """0 at x0_pred == x0; > 0 otherwise, its gradient reaching x0_pred only (not the target, not the network)."""
    same = x0.clone().requires_grad_()
    assert float(algo.loss_terms(losses_for(same, x0), None)[term].detach()) == pytest.approx(0.0, abs=1e-6)
    target = x0.clone().requires_grad_()  # a target with a graph: the loss must still not reach it
    pred = (x0 + 0.3 * images(seed=7, n=x0.shape[0], size=x0.shape[-1])).requires_grad_()
    value = algo.loss_terms(losses_for(pred, target), None)[term]
    assert float(value.detach()) > 0 and math.isfinite(float(value.detach()))
    value.backward()
    assert pred.grad is not None and float(pred.grad.abs().sum()) > 0
    assert target.grad is None
    assert all(not p.requires_grad and p.grad is None for p in frozen.parameters())
    logged = algo.log_values(None, None)
    assert len(logged) == 1 and float(next(iter(logged.values()))) > 0


# ------------------------------------------------------------------------------------------- LPIPS
def test_lpips_is_zero_for_the_same_image_positive_otherwise_and_trains_the_prediction_only(lpips_file):
    from trainer.algorithms.lpips import Lpips

    algo = Lpips(x_cfg(lpips_weight=0.1, lpips_weights=lpips_file, lpips_resize=0.5))
    algo.build(None, Spec())
    assert not algo.net.training
    check_term(algo, "lpips_loss", images(), algo.net)
    assert algo.summary()["lpips_weight"] == 0.1 and algo.summary()["lpips_resize"] == 0.5
    assert len(algo.summary()["lpips_weights_sha256"]) == 64


def test_lpips_term_is_the_weight_times_the_mean_over_samples_at_the_resized_images(lpips_file):
    import torch.nn.functional as F

    from trainer.algorithms.lpips import Lpips

    algo = Lpips(x_cfg(lpips_weight=0.25, lpips_weights=lpips_file, lpips_resize=0.5))
    algo.build(None, Spec())
    x0, pred = images(1, n=3), images(2, n=3)
    half = dict(scale_factor=0.5, mode="bilinear", align_corners=False)
    with torch.no_grad():
        want = algo.net(F.interpolate(pred, **half), F.interpolate(x0, **half)).flatten()
        term = algo.loss_terms(losses_for(pred, x0), None)["lpips_loss"]
    assert want.shape == (3,) and float(term) == pytest.approx(0.25 * float(want.mean()), rel=1e-5)


def test_lpips_refuses_v_prediction_and_a_missing_file_before_step_1(lpips_file, tmp_path):
    from trainer.algorithms.lpips import Lpips

    with pytest.raises(ValueError, match=r"x-prediction\.yaml"):
        Lpips(TrainConfig(model="tiny", lpips_weight=0.1, lpips_weights=lpips_file))
    with pytest.raises(PrxError, match="--write-weights"):
        Lpips(x_cfg(lpips_weight=0.1))
    with pytest.raises(PrxError, match="no such file.*--write-weights"):
        Lpips(x_cfg(lpips_weight=0.1, lpips_weights=str(tmp_path / "absent.pth")))


class Planted:
    """An object whose unpickling leaves a mark: a file read with weights_only=False would run it."""

    def __init__(self, mark: str):
        self.mark = mark

    def __reduce__(self):
        return (open, (self.mark, "w"))


def test_lpips_refuses_pickled_objects_garbage_and_other_state_dicts_without_unpickling(tmp_path):
    from trainer.algorithms.lpips import Lpips, load_lpips

    mark = tmp_path / "unpickled"
    pickled = tmp_path / "pickled.pth"
    with open(pickled, "wb") as fh:
        pickle.dump({"w": Planted(str(mark))}, fh, protocol=2)
    torch.save({"w": Planted(str(mark))}, tmp_path / "torch_pickled.pth")
    (tmp_path / "garbage.pth").write_bytes(b"not a torch file at all")
    (tmp_path / "garbage.safetensors").write_bytes(b"\x00" * 64)
    torch.save(torch.nn.Linear(3, 3).state_dict(), tmp_path / "linear.pth")
    for name in ("pickled.pth", "torch_pickled.pth", "garbage.pth", "garbage.safetensors", "linear.pth"):
        with pytest.raises(PrxError, match="--write-weights") as exc:
            load_lpips(str(tmp_path / name))
        assert str(tmp_path / name) in str(exc.value)
    assert not mark.exists()
    algo = Lpips(x_cfg(lpips_weight=0.1, lpips_weights=str(pickled)))  # exists: the content is read in build
    with pytest.raises(PrxError, match="weights_only"):
        algo.build(None, Spec())
    assert not mark.exists()


def test_lpips_weights_file_round_trips_as_pth_and_safetensors(tmp_path, monkeypatch):
    """`python -m trainer.algorithms.lpips_weights --write-weights FILE` writes what --lpips-weights reads (the download
    replaced by random weights here)."""
    import lpips

    from trainer.algorithms import lpips as ours
    from trainer.algorithms.lpips_weights import main as write_main

    state, real = random_lpips_state(seed=3), lpips.LPIPS

    def offline_lpips(**kw):
        if kw.get("pretrained") is False:  # the reader's empty net
            return real(**kw)
        assert kw == {"net": "vgg", "verbose": False}  # the writer's: lpips's pretrained VGG16 and linear heads
        net = ours.empty_vgg_lpips(meta=True)
        net.load_state_dict(state, assign=True)
        return net

    monkeypatch.setattr(lpips, "LPIPS", offline_lpips)
    for name in ("w.pth", "w.safetensors"):
        assert write_main(["--write-weights", str(tmp_path / name)]) == 0
        back = ours.load_lpips(str(tmp_path / name)).state_dict()
        assert back.keys() == state.keys() and all(torch.equal(back[k], state[k]) for k in state)


# ------------------------------------------------------------------------------------------- P-DINO
def test_pdino_is_zero_for_the_same_image_positive_otherwise_and_trains_the_prediction_only(tiny_model):
    from trainer.algorithms.pdino import PerceptualDino

    algo = PerceptualDino(x_cfg(pdino_weight=0.01, pdino_encoder=tiny_model("tiny-dinov2"), pdino_resolution=56))
    algo.build(None, Spec())
    assert not algo.encoder.training
    check_term(algo, "pdino_loss", images(), algo.encoder)
    assert algo.summary() == {"pdino_weight": 0.01, "pdino_encoder": tiny_model("tiny-dinov2"),
                              "pdino_resolution": 56}


def test_pdino_term_is_the_mean_over_patches_of_one_minus_cosine(tiny_model):
    """Against the formula on the tiny DINOv2 itself: 56 x 56 -> 4 x 4 patch tokens (CLS and 4 registers
    dropped), ImageNet-normalised [0, 1] input."""
    import torch.nn.functional as F
    from transformers import Dinov2WithRegistersModel

    from trainer.algorithms.pdino import PerceptualDino

    folder = tiny_model("tiny-dinov2")
    algo = PerceptualDino(x_cfg(pdino_weight=0.5, pdino_encoder=folder, pdino_resolution=56))
    algo.build(None, Spec())
    model = Dinov2WithRegistersModel.from_pretrained(folder).eval()
    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)

    def tokens(x):
        x = F.interpolate(x, size=(56, 56), mode="bilinear", align_corners=False)
        return model(pixel_values=(((x + 1) / 2).clamp(0, 1) - mean) / std).last_hidden_state[:, 5:]

    x0, pred = images(1, n=3), 1.5 * images(2, n=3)  # beyond [-1, 1] somewhere: clamped before DINO
    with torch.no_grad():
        fp, ft = tokens(pred), tokens(x0)
        want = (1 - F.cosine_similarity(fp, ft, dim=-1)).mean(-1)
        term = algo.loss_terms(losses_for(pred, x0), None)["pdino_loss"]
    assert fp.shape == (3, 16, 32) and float(term) == pytest.approx(0.5 * float(want.mean()), rel=1e-5)


def test_pdino_refuses_v_prediction_before_step_1(tiny_model):
    from trainer.algorithms.pdino import PerceptualDino

    with pytest.raises(ValueError, match=r"--prediction x .*x-prediction\.yaml"):
        PerceptualDino(TrainConfig(model="tiny", pdino_weight=0.01, pdino_encoder=tiny_model("tiny-dinov2")))


# ------------------------------------------------------------------------------------------- latent space
def test_latent_x0_is_decoded_by_the_runs_vae_with_the_gradient_to_the_prediction(tiny_model):
    """In a latent space both x0 are decoded through the recorded VAE (the contract's unscale + decoder, what the
    sampler's VAE.decode does, less its clamp); the VAE's weights get no gradient."""
    from contract.encoders.vae import load_vae
    from trainer.algorithms.perceptual import to_pixels

    vae = load_vae(tiny_model("tiny-flux-vae"))
    pixels = to_pixels(vae.info, torch.device("cpu"))
    assert not pixels.pixel_space
    g = torch.Generator().manual_seed(0)
    z0, zp = torch.randn(2, 16, 4, 4, generator=g), torch.randn(2, 16, 4, 4, generator=g).requires_grad_()
    pred, gt = pixels.pair(losses_for(zp, z0))
    assert pixels.pair(losses_for(zp, z0))[0] is pred  # decoded once per micro-batch for both losses
    torch.testing.assert_close(gt.clamp(-1, 1), vae.decode(z0), atol=1e-5, rtol=1e-5)
    assert pred.shape == (2, 3, 32, 32) and not gt.requires_grad
    pred.square().mean().backward()
    assert float(zp.grad.abs().sum()) > 0
    assert all(p.grad is None for p in pixels.vae.model.parameters())


# ------------------------------------------------------------------------------------------- training runs
@pytest.fixture(scope="module")
def pixel_shards(tmp_path_factory, tiny_model):
    from conftest import photo_arrays, write_photo_folder
    from pipeline.cli import main as prx_data

    root = tmp_path_factory.mktemp("perceptual-data")
    write_photo_folder(root / "photos", dict(sorted(photo_arrays().items())[:4]))
    common = ["--executor", "local", "--no-progress"]
    te = tiny_model("tiny-t5gemma")
    assert prx_data(["ingest", "--in", str(root / "photos"), "--out", str(root / "raw"), "--source", "p",
                     *common]) == 0
    assert prx_data(["encode", "--in", str(root / "raw"), "--out", str(root / "px"), "--resolution", "32",
                     "--vae", "none", "--text-encoder", te, *common]) == 0
    return {"folder": str(root / "px"), "te": te}


def pixel_cfg(pixel_shards, out, **kw) -> TrainConfig:
    return TrainConfig(shards=[pixel_shards["folder"]], model="tiny-pixel", steps=2, batch_size=2, lr=1e-3,
                       warmup_steps=0, out=str(out), log_every=1, checkpoint_every=1000, tensorboard=False,
                       device="cpu", vae="none", text_encoder=pixel_shards["te"], loader_workers=0,
                       shuffle_buffer=8, prediction="x", caption=dict(original=1.0), **kw)


def logged(run_dir: str, name: str) -> list[float]:
    with open(os.path.join(run_dir, "train.log")) as fh:
        return [float(w.split("=", 1)[1]) for line in fh for w in line.split() if w.startswith(name + "=")]


@pytest.mark.parametrize("algo", ["lpips", "pdino"])
def test_pixel_space_run_logs_a_finite_perceptual_term(algo, pixel_shards, lpips_file, tiny_model, tmp_path):
    import json

    from trainer.train import run

    kw = (dict(lpips_weight=0.1, lpips_weights=lpips_file, lpips_resize=0.5) if algo == "lpips" else
          dict(pdino_weight=0.01, pdino_encoder=tiny_model("tiny-dinov2"), pdino_resolution=28))
    out = run(pixel_cfg(pixel_shards, tmp_path / "run", **kw))
    assert len(out["losses"]) == 2 and all(math.isfinite(v) for v in out["losses"])
    terms, raw = logged(out["run_dir"], f"{algo}_loss"), logged(out["run_dir"], algo)
    assert len(terms) == 2 and all(math.isfinite(v) and v > 0 for v in terms + raw)
    with open(os.path.join(out["run_dir"], "summary.json")) as fh:
        summary = json.load(fh)["algorithms"]
    assert set(summary) == {algo} and summary[algo][f"{algo}_weight"] == kw[f"{algo}_weight"]


def test_v_prediction_run_is_refused_before_anything_is_written(pixel_shards, lpips_file, tmp_path):
    import dataclasses

    from trainer.train import run

    cfg = pixel_cfg(pixel_shards, tmp_path / "run", lpips_weight=0.1, lpips_weights=lpips_file)
    with pytest.raises(ValueError, match=r"x-prediction\.yaml"):
        run(dataclasses.replace(cfg, prediction="v"))
    assert not (tmp_path / "run").exists()
