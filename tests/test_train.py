"""prx-train on CPU with tiny models, on real photos ingested, recaptioned (fake backend) and encoded by the
tiny VAE and tiny T5Gemma through the real stages."""
from __future__ import annotations

import json
import os
import shutil

import pytest
import torch

from pipeline.cli import main as prx_data
from trainer.config import Mixture, Source, TrainConfig, load_config
from trainer.data import DataError, MixtureLoader, open_sources


@pytest.fixture(scope="session")
def encoded(tmp_path_factory, tiny_model):
    """Two encoded sources from the bundled photos:
    a: 128 px square crops, shards of 2 samples, variants original/long/short (fake recaptions);
    b: 256 px aspect-ratio buckets (several latent shapes), one shard, variant original only."""
    from conftest import write_photo_folder

    root = tmp_path_factory.mktemp("train-data")
    photos = write_photo_folder(root / "photos")
    vae, te = tiny_model("tiny-flux-vae"), tiny_model("tiny-t5gemma")
    common = ["--executor", "local", "--no-progress"]
    enc = ["--vae", vae, "--text-encoder", te]
    assert prx_data(["ingest", "--in", str(photos), "--out", str(root / "raw-a"), "--shard-size", "2",
                     "--source", "a", *common]) == 0
    assert prx_data(["recaption", "--in", str(root / "raw-a"), "--out", str(root / "cap-a"), "--backend", "fake",
                     "--relax-checks", "language", *common]) == 0
    assert prx_data(["encode", "--in", str(root / "cap-a"), "--out", str(root / "a"), "--resolution", "128",
                     *enc, *common]) == 0
    assert prx_data(["ingest", "--in", str(photos), "--out", str(root / "raw-b"), "--source", "b", *common]) == 0
    assert prx_data(["encode", "--in", str(root / "raw-b"), "--out", str(root / "b"), "--resolution", "256",
                     "--buckets", "ar", *enc, *common]) == 0
    return {"root": root, "a": str(root / "a"), "b": str(root / "b"), "raw": str(root / "raw-a"), "vae": vae,
            "te": te}


def cfg_for(encoded, tmp_path, **kw) -> TrainConfig:
    base = dict(shards=[encoded["a"]], model="tiny", steps=4, batch_size=4, lr=1e-3, warmup_steps=0,
                out=str(tmp_path / "run"), log_every=1, checkpoint_every=1000, tensorboard=False, device="cpu",
                vae=encoded["vae"], text_encoder=encoded["te"], loader_workers=0,
                shuffle_buffer=16)   # a few photos: a 2,048-sample buffer would read each hundreds of times
    base.update(kw)
    return TrainConfig(**base)


def loader_for(encoded, sources, captions=None, batch_size=4, seed=0, rank=0, world=1, **kw):
    mix = Mixture([Source(n, encoded[n], w) for n, w in sources], captions or {})
    return MixtureLoader(open_sources(mix, rank=rank, world=world), batch_size, seed=seed, rank=rank, **kw)


# ------------------------------------------------------------------------------------------- training
def test_loss_on_fixed_eval_batch_drops(encoded, tmp_path):
    """Fixed x0, noise and t: after 40 steps (lr 1e-3, no warmup) the loss is below 0.8 x step 0's."""
    from trainer.train import run

    out = run(cfg_for(encoded, tmp_path, steps=40, eval_every=40, eval_batch_size=8, caption=dict(long=1.0)))
    (s0, l0), (s1, l1) = out["eval"]
    assert (s0, s1) == (0, 40)
    assert l1 < 0.8 * l0, (l0, l1)


def test_killed_and_resumed_run_matches_uninterrupted(encoded, tmp_path):
    """Two sources (one with aspect-ratio buckets, so samples wait in buckets across the checkpoint),
    grad accumulation 2, shuffle buffer over 2 open shards: a run killed after step 3 and resumed gives the
    same losses and weights; the uninterrupted run uses no loader worker, the killed one 2, the resumed one 3
    (the batches do not depend on the worker count)."""
    from trainer.train import run

    mix = tmp_path / "mix.yaml"
    mix.write_text(f"sources:\n  a: {{shards: {encoded['a']}, weight: 0.6}}\n"
                   f"  b: {{shards: {encoded['b']}, weight: 0.4}}\n"
                   "captions: {original: 1.0}\n")  # b has no recaptions (the baseline's long would be refused)
    kw = dict(shards=[], mix=str(mix), steps=6, batch_size=3, grad_accum=2, open_shards=2, shuffle_buffer=6)
    full = run(cfg_for(encoded, tmp_path, out=str(tmp_path / "full"), **kw))

    class Killed(Exception):
        pass

    def kill(step, _):
        if step == 3:
            raise Killed

    with pytest.raises(Killed):
        run(cfg_for(encoded, tmp_path, out=str(tmp_path / "part"), checkpoint_every=3, **kw, loader_workers=2),
            on_step=kill)
    resumed = run(cfg_for(encoded, tmp_path, out=None, resume=str(tmp_path / "part"), **kw, loader_workers=3))
    assert resumed["start_step"] == 3
    assert resumed["losses"] == full["losses"][3:]
    for (n, a), (_, b) in zip(full["model"].state_dict().items(), resumed["model"].state_dict().items()):
        assert torch.equal(a, b), n
    assert resumed["counts"] == full["counts"]


def test_fp32_guard_trips_in_the_trainer(encoded, tmp_path, monkeypatch):
    from trainer import train
    from trainer.model import PrecisionError, build_model

    def bf16_model(*a, **k):
        return build_model(*a, **k).to(torch.bfloat16)

    monkeypatch.setattr(train, "build_model", bf16_model)
    with pytest.raises(PrecisionError, match="--weights-dtype bf16"):
        train.run(cfg_for(encoded, tmp_path, steps=1))
    # asking for the ablation runs it
    out = train.run(cfg_for(encoded, tmp_path, steps=2, weights_dtype="bf16", out=str(tmp_path / "bf16")))
    assert next(out["model"].parameters()).dtype == torch.bfloat16


# ------------------------------------------------------------------------------------------- data
def test_source_mixture_realised_counts(encoded):
    """0.8 / 0.2 over 1,200 samples: realised fractions within 0.03 (binomial sd 0.012)."""
    loader = loader_for(encoded, [("a", 0.8), ("b", 0.2)], batch_size=8)
    while loader.counts["samples"] < 1200:
        loader.next_batch()
    n = loader.counts["samples"]
    frac = loader.counts["source"]["a"] / n
    assert abs(frac - 0.8) < 0.03, loader.counts


def test_caption_weights_select_variants(encoded):
    loader = loader_for(encoded, [("a", 1.0)], captions={"long": 0.75, "short": 0.25}, batch_size=8)
    batches = [loader.next_batch() for _ in range(100)]
    c = loader.counts["variant"]
    assert c.get("original", 0) == 0 and abs(c["long"] / 800 - 0.75) < 0.04, c
    assert {v for b in batches for v in b.variants} == {"long", "short"}
    # a variant no sample has: its weight goes to the rest (renormalised)
    loader = loader_for(encoded, [("a", 1.0)], captions={"short": 1.0, "medium": 3.0})
    loader.next_batch()
    assert set(loader.counts["variant"]) <= {"short", "medium"} and loader.counts["variant"]["short"] == 4
    # samples with none of the asked variants are skipped and counted
    loader = loader_for(encoded, [("a", 0.5), ("b", 0.5)], captions={"long": 1.0})
    for _ in range(5):
        b = loader.next_batch()
        assert set(b.sources) == {"a"}
    assert loader.counts["skipped_no_variant"] > 0
    # every variant of the sample, equally, when no weights are given
    loader = loader_for(encoded, [("a", 1.0)], batch_size=8)
    for _ in range(60):
        loader.next_batch()
    assert all(abs(n / 480 - 1 / 3) < 0.06 for n in loader.counts["variant"].values()), loader.counts


def test_batches_are_bucketed_padded_and_masked(encoded):
    loader = loader_for(encoded, [("b", 1.0)], batch_size=2)
    shapes = set()
    for _ in range(20):
        b = loader.next_batch()
        shapes.add(tuple(b.x0.shape[1:]))
        emb, mask = b.padded()
        assert emb.shape[1] == 256 and emb.dtype == torch.bfloat16 and mask.shape == (len(b), 256)
        assert not emb[~mask].any()  # padding is zero and masked out
        assert torch.equal(mask.sum(1), b.lengths) and torch.equal(emb[mask], b.tokens)
    assert len(shapes) > 1  # several aspect-ratio buckets, each batch one shape


def test_loader_resumes_at_exact_next_batch(encoded):
    loader = loader_for(encoded, [("a", 0.5), ("b", 0.5)], batch_size=3, seed=5)
    for _ in range(7):
        loader.next_batch()
    for _ in range(50):  # stop where samples wait in a bucket
        if loader.state()["replay_from"] < loader.state()["next_draw"]:
            break
        loader.next_batch()
    state = json.loads(json.dumps(loader.state()))
    assert state["replay_from"] < state["next_draw"]  # samples are waiting in buckets
    expect = [loader.next_batch() for _ in range(6)]
    again = loader_for(encoded, [("a", 0.5), ("b", 0.5)], batch_size=3, seed=5)
    again.load_state(state)
    got = [again.next_batch() for _ in range(6)]
    for e, g in zip(expect, got):
        assert e.keys == g.keys and e.variants == g.variants and torch.equal(e.x0, g.x0)
    assert again.counts == loader.counts


def test_ranks_read_distinct_shards(encoded):
    from trainer.data import SourceStream

    mix = Mixture([Source("a", encoded["a"], 1.0)], {})
    streams = [SourceStream(open_sources(mix, rank=r, world=2).sources[0], 0, 0, 8, 16) for r in (0, 1)]
    for epoch in range(3):
        r0, r1 = ([s.shard_path(epoch * s.n_rank + i) for i in range(s.n_rank)] for s in streams)
        assert r0 and r1 and not set(r0) & set(r1)
        assert sorted(r0 + r1) == sorted(open_sources(mix).sources[0].shards)
    with pytest.raises(Exception, match="fewer than the 2 processes"):
        open_sources(Mixture([Source("b", encoded["b"], 1.0)], {}), rank=0, world=2)
    # 7 samples in shards of 2, 2, 2, 1: a shuffle block of 3 stays inside each rank's first epoch
    keys0, keys1 = (set(loader_for(encoded, [("a", 1)], rank=r, world=2, batch_size=3,
                                   shuffle_buffer=3).next_batch().keys) for r in (0, 1))
    assert not keys0 & keys1 and len(keys0 | keys1) == 6


# ------------------------------------------------------------------------------------------- refusals
def test_bad_shard_stops_with_its_name(encoded, tmp_path):
    from trainer.train import run

    bad = tmp_path / "bad"
    shutil.copytree(encoded["a"], bad)
    victim = bad / "000001.tar"
    data = victim.read_bytes()
    victim.write_bytes(data[: len(data) // 2])
    with pytest.raises(DataError, match="000001.tar"):
        run(cfg_for(encoded, tmp_path, shards=[str(bad)], steps=20, batch_size=4))


def test_corrupt_member_stops_with_shard_name(encoded, tmp_path):
    import tarfile

    bad = tmp_path / "bad"
    shutil.copytree(encoded["a"], bad)
    src = bad / "000000.tar"
    with tarfile.open(src) as tar:
        members = [(m, tar.extractfile(m).read()) for m in tar.getmembers()]
    with tarfile.open(src, "w", format=tarfile.USTAR_FORMAT) as tar:
        import io

        for m, payload in members:
            if m.name.endswith("latent.safetensors"):
                payload = b"not a safetensors file"
                m.size = len(payload)
            tar.addfile(m, io.BytesIO(payload))
    loader = MixtureLoader(open_sources(Mixture([Source("bad", str(bad), 1.0)], {})), 2)
    with pytest.raises(DataError, match=r"000000\.tar.*latent\.safetensors"):
        for _ in range(10):
            loader.next_batch()


def test_not_encoded_and_wrong_encoder_are_refused(encoded, tmp_path):
    from trainer.cli import main

    out = str(tmp_path / "r")
    base = ["--model", "tiny", "--steps", "1", "--out", out, "--no-tensorboard", "--device", "cpu"]
    assert main(["--shards", encoded["raw"], *base]) == 2
    assert main(["--shards", encoded["a"], "--vae", encoded["te"], *base]) == 2


def test_refusal_messages(encoded, capsys):
    from trainer.cli import main

    main(["--shards", encoded["raw"], "--model", "tiny", "--steps", "1", "--out", "unused", "--device", "cpu"])
    assert "prx-data encode" in capsys.readouterr().err
    main(["--shards", encoded["a"], "--vae", encoded["te"], "--model", "tiny", "--out", "unused"])
    err = capsys.readouterr().err
    assert "encoded with other models" in err and "tiny-t5gemma" in err


# ------------------------------------------------------------------------------------------- CLI
def test_cli_overlay_config_tiny_prx_folder_and_outputs(encoded, tmp_path, tiny_model):
    from trainer.cli import main

    overlay = tmp_path / "short.yaml"
    overlay.write_text(f"base: {os.path.abspath('manifests/train/base.yaml')}\ncaption: {{short: 1.0}}\n")
    run_dir = tmp_path / "run"
    rc = main(["--config", str(overlay), "--shards", encoded["a"], "--model", tiny_model("tiny-prx"),
               "--vae", encoded["vae"], "--text-encoder", encoded["te"], "--steps", "3", "--batch-size", "2",
               "--out", str(run_dir), "--log-every", "1", "--device", "cpu"])
    assert rc == 0
    saved = load_config({"config": str(run_dir / "config.yaml")})
    assert saved.caption == {"short": 1.0} and saved.steps == 3 and saved.lr == 1e-4 and saved.warmup_steps == 1000
    counts = json.loads((run_dir / "counts-rank0.json").read_text())
    assert counts["variant"] == {"short": 6}
    log = (run_dir / "train.log").read_text()
    assert "t0.0-0.3=" in log and "samples/s=" in log and "MFU=n/a" in log and "grad_norm=" in log
    assert any(f.startswith("events") for f in os.listdir(run_dir / "tb"))
    ckpt = run_dir / "checkpoints" / "step-00000003"
    assert (ckpt / "transformer" / "diffusion_pytorch_model.safetensors").exists()
    assert not list(ckpt.rglob("*.pt")) and not list(ckpt.rglob("*.bin")) and not list(ckpt.rglob("*.pkl"))
    from diffusers import PRXTransformer2DModel

    PRXTransformer2DModel.from_pretrained(ckpt / "transformer")  # loads where diffusers' PRXPipeline would
    # the finished run refuses a fresh start into the same folder
    assert main(["--shards", encoded["a"], "--model", "tiny", "--out", str(run_dir), "--steps", "1"]) == 2


def test_ablation_overlays_change_one_thing():
    base = load_config({"config": "manifests/train/base.yaml"})
    for name, field, value in [("caption-short", "caption", {"short": 1.0}), ("weights-bf16", "weights_dtype", "bf16"),
                               ("shift-3", "shift", 3.0), ("x-prediction", "prediction", "x")]:
        over = load_config({"config": f"manifests/ablations/{name}.yaml"})
        assert getattr(over, field) == value
        diff = {f for f in TrainConfig.__dataclass_fields__ if getattr(over, f) != getattr(base, f)}
        assert diff == {field, "config", "base"}, (name, diff)
    # the command line wins over the files
    assert load_config({"config": "manifests/ablations/shift-3.yaml", "shift": 2.0}).shift == 2.0
    assert (base.lr, base.beta1, base.beta2, base.adam_eps, base.weight_decay, base.warmup_steps, base.grad_clip,
            base.caption_dropout, base.uniform_fraction) == (1e-4, 0.9, 0.95, 1e-15, 0.0, 1000, 0.2, 0.1, 0.1)


def test_mixture_resolution_must_match_the_encoding(encoded):
    from contract.errors import PrxError

    with pytest.raises(PrxError, match="resolution 128.*--resolution 256"):
        open_sources(Mixture([Source("a", encoded["a"], 1.0)], {}, resolution=256))


def expected_first_loss(cfg: TrainConfig, spec) -> float:
    """Step 1's loss of a run, from the formulas written out here: the run's first batch, the init weights
    (seeded), and its draws from torch.Generator(seed * 1000) (rank 0): z ~ N(0, 1), u ~ U[0, 1), pick ~ U[0, 1)
    per sample, then eps. t = s sigmoid(z) / (1 + (s - 1) sigmoid(z)), or 1e-3 + (1 - 1e-3) u where
    pick < uniform_fraction. Caption dropout 1: every sample sees the empty prompt. Loss per sample, mean over
    C x H x W: v-prediction |F - (eps - x0)|^2; x-prediction |x0 - F|^2 / max(t, t_min)^2."""
    from trainer.data import pad_embedding
    from trainer.model import build_model
    from trainer.train import loader_settings

    assert cfg.caption_dropout == 1.0 and cfg.logit_mean == 0.0 and cfg.logit_std == 1.0
    x0 = loader_settings(cfg, 0).loader(spec).next_batch().x0
    b, s = x0.shape[0], cfg.shift
    g = torch.Generator().manual_seed(cfg.seed * 1000)
    z, u, pick = torch.randn(b, generator=g), torch.rand(b, generator=g), torch.rand(b, generator=g)
    t = torch.where(pick < cfg.uniform_fraction, 1e-3 + (1 - 1e-3) * u,
                    s * torch.sigmoid(z) / (1 + (s - 1) * torch.sigmoid(z)))
    eps = torch.randn(x0.shape, generator=g)
    emb, mask, _ = pad_embedding(spec.empty_prompt, cfg.text_max_length)
    tb = t.view(-1, 1, 1, 1)
    model = build_model(cfg.model, spec.latent_channels, spec.text_dim, seed=cfg.seed)
    with torch.no_grad():
        out = model(hidden_states=(1 - tb) * x0 + tb * eps, timestep=t, return_dict=False,
                    encoder_hidden_states=emb.float().expand(b, -1, -1), attention_mask=mask.expand(b, -1))[0]
    if cfg.prediction == "x":
        per_sample = (x0 - out).pow(2).flatten(1).mean(1) / t.clamp(min=cfg.x_pred_t_min) ** 2
    else:
        per_sample = (out - (eps - x0)).pow(2).flatten(1).mean(1)
    return float(per_sample.mean())


def test_x_prediction_and_shift_change_the_loss_as_their_formulas_say(encoded, tmp_path):
    """Step 1's loss (the init weights: no update yet) under v-prediction without shift and x-prediction
    with shift 3 is, in each run, the value the formulas give; and the two differ."""
    from trainer.config import load_mixture
    from trainer.train import run

    got, want = {}, {}
    for prediction, shift in (("v", 1.0), ("x", 3.0)):
        cfg = cfg_for(encoded, tmp_path, steps=1, prediction=prediction, shift=shift, caption_dropout=1.0,
                      out=str(tmp_path / prediction))
        got[prediction] = float(run(cfg)["losses"][0])
        want[prediction] = expected_first_loss(cfg, open_sources(load_mixture(cfg)))
    assert abs(want["x"] - want["v"]) > 0.01 * want["v"], want
    for prediction in got:
        assert got[prediction] == pytest.approx(want[prediction], rel=1e-4), (prediction, got, want)


def test_no_usable_caption_variant_stops_instead_of_spinning(encoded, tmp_path):
    from contract.config import ConfigError
    from trainer.config import load_mixture

    loader = loader_for(encoded, [("a", 1.0)], captions={"medium": 1.0})   # no sample has it
    loader.MAX_SKIPPED = 50
    with pytest.raises(DataError, match="medium"):
        loader.next_batch()
    mix = tmp_path / "zero.yaml"
    mix.write_text(f"sources:\n  a: {{shards: {encoded['a']}}}\ncaptions: {{long: 0}}\n")
    with pytest.raises(ConfigError, match="positive sum"):
        load_mixture(TrainConfig(model="tiny", mix=str(mix)))
