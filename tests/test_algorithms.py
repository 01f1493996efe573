"""The one shape of every training algorithm (trainer/algorithms/base.py): a toy algorithm registered in one
line reaches the loss, runs once per optimizer step, appears in RUN/summary.json and keeps its state across a
checkpoint; SPRINT + EMA + the toy together resume bit for bit with the checkpoint keys older runs wrote.

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
