"""The trainer's data path: shuffling quality, workers, exact resume, `--resume RUN`, uneven shards, DDP errors.

Data: synthetic encoded folders (testing/synthetic.py: the encode stage's layout, seeded random tensors at
small sizes) so every test stays fast; the layout and reader are the real ones.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch

from trainer.batches import LoaderFeed, LoaderSettings
from trainer.config import Mixture, Source
from trainer.data import (MixtureLoader, SourceStream, consecutive_overlap, expected_same_shard_rate, open_sources,
                          same_shard_rate)
from testing.synthetic import encoder_record, write_encoded_folder

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SMALL = dict(latent_shape=(4, 4, 4), text_dim=8, tokens={"long": 6, "short": 3})


@pytest.fixture(scope="session")
def sorted_sources(tmp_path_factory):
    """4 sources x 8 shards x 16 samples; content sorted by shard (a shard = one crawl domain, say)."""
    root = tmp_path_factory.mktemp("sorted")
    return {f"s{i}": write_encoded_folder(str(root / f"s{i}"), 8, 16, source=f"s{i}", seed=i, **SMALL)
            for i in range(4)}


def mixture(folders: dict[str, str], **weights) -> Mixture:
    return Mixture([Source(n, f, weights.get(n, 1.0)) for n, f in folders.items()], {})


def batches_of(spec, n, **kw):
    loader = MixtureLoader(spec, kw.pop("batch_size", 32), **kw)
    return [loader.next_batch() for _ in range(n)]


# ------------------------------------------------------------------------------------------- shuffling
def test_shard_index_in_a_batch_is_as_mixed_as_the_buffer_allows(sorted_sources):
    """Stated bound: the fraction of within-batch pairs from the same shard is at most 1.25 x what drawing a
    source by weight and then one of its k open shards uniformly gives (sum_s w_s^2 / k). With k = 8 (every
    shard of a source open) that is a uniform draw over all 32 shards: 1/32. (A block larger than k shards'
    worth of samples spans more shards and mixes better still; here the block is the k shards' length.)"""
    spec = open_sources(mixture(sorted_sources))
    weights = {s.name: s.weight for s in spec.sources}
    rates = []
    for k, buffer in ((2, 4 * 2 * 16), (8, 4 * 8 * 16)):
        batches = batches_of(spec, 30, open_shards=k, shuffle_buffer=buffer, seed=3)
        bound = expected_same_shard_rate(weights, {n: k for n in weights})
        rate = same_shard_rate(batches)
        assert rate <= 1.25 * bound, (k, rate, bound)
        rates.append(rate)
    assert rates[0] > 2 * rates[1]  # more open shards, less correlation
    assert bound == 1 / 32 and expected_same_shard_rate(weights, {n: 2 for n in weights}) == 1 / 8
    # sources within a batch: independent draws by weight (same-source pair rate = sum w^2 = 1/4)
    same_source = sum(sum(c * (c - 1) // 2 for c in [b.sources.count(s) for s in weights]) for b in batches)
    assert abs(same_source / (30 * 32 * 31 / 2) - 0.25) < 0.03
    # one shard at a time, shuffled within the shard, is far more correlated: ~1/4
    narrow = same_shard_rate(batches_of(spec, 20, open_shards=1, shuffle_buffer=4 * 16, seed=3))
    assert narrow > 0.15
    assert consecutive_overlap(batches) > 0  # reported by bench/train.py next to a uniform draw's


def test_every_sample_once_per_epoch(sorted_sources):
    spec = open_sources(mixture({"s0": sorted_sources["s0"]}))
    loader = MixtureLoader(spec, 16, open_shards=3, shuffle_buffer=32)  # a block of 32 divides the epoch of 128
    keys = [k for _ in range(16) for k in loader.next_batch().keys]  # 2 epochs of 128
    assert len(set(keys[:128])) == 128 and set(keys[:128]) == set(keys[128:])
    assert keys[:128] != keys[128:]  # reshuffled


def test_shard_order_reshuffled_every_epoch_and_ranks_balanced(sorted_sources, tmp_path):
    """Documented: epoch e permutes all shards (seed shared by ranks); rank r of W takes r, r+W, ...; when W
    does not divide the count, ranks hold ceil/floor of n/W per epoch and, over epochs, every shard visits
    every rank."""
    odd = write_encoded_folder(str(tmp_path / "odd"), 3, 4, source="odd", **SMALL)
    srcs = [open_sources(mixture({"odd": odd}), rank=r, world=2).sources[0] for r in (0, 1)]
    assert [s.shards_per_rank() for s in srcs] == [2, 1]
    streams = [SourceStream(s, 0, 0, 8, 16) for s in srcs]
    seen = {0: set(), 1: set()}
    orders = []
    for epoch in range(8):
        per_rank = [[st.shard_path(epoch * st.n_rank + i) for i in range(st.n_rank)] for st in streams]
        assert sorted(per_rank[0] + per_rank[1]) == sorted(srcs[0].shards)  # disjoint, complete
        for r in (0, 1):
            seen[r] |= set(per_rank[r])
        orders.append(per_rank[0] + per_rank[1])
    assert seen[0] == seen[1] == set(srcs[0].shards)
    assert len({tuple(o) for o in orders}) > 1
    # the loader on the short rank simply goes round its epochs faster; nothing waits on the other rank
    loader = MixtureLoader(open_sources(mixture({"odd": odd}), rank=1, world=2), 4, rank=1, shuffle_buffer=4)
    assert len({k for _ in range(6) for k in loader.next_batch().keys}) == 12  # all 12 samples reached rank 1


# ------------------------------------------------------------------------------------------- workers, resume
def _same(a, b):
    assert a.keys == b.keys and a.variants == b.variants and torch.equal(a.x0, b.x0)
    assert torch.equal(a.tokens, b.tokens) and torch.equal(a.index, b.index)


def test_workers_give_the_same_batches_and_resume_exactly(sorted_sources):
    spec = open_sources(mixture(sorted_sources, s0=0.4, s1=0.3, s2=0.2, s3=0.1))
    settings = LoaderSettings(batch_size=8, seed=11, open_shards=3, shuffle_buffer=64)
    plain = LoaderFeed(spec, settings, workers=0)
    ref = [plain.next() for _ in range(12)]
    pooled = LoaderFeed(spec, settings, workers=2, prefetch=2)
    got = [pooled.next() for _ in range(5)]
    state = json.loads(json.dumps(pooled.state()))
    pooled.close()
    for a, b in zip(ref, got):
        _same(a, b)
    resumed = LoaderFeed(spec, settings, state, workers=3)
    for a in ref[5:]:
        _same(a, resumed.next())
    assert resumed.state()["counts"] == plain.state()["counts"]
    resumed.close()
    assert len(json.dumps(state)) < 4000  # positions, not buffered samples


def test_device_padding_matches_host_padding(sorted_sources):
    from trainer.batches import device_inputs
    from trainer.data import pad_embedding

    spec = open_sources(mixture(sorted_sources))
    b = MixtureLoader(spec, 6, text_max_length=5).next_batch()
    emb, mask = b.padded("cpu")
    assert emb.shape == (6, 5, 8) and (b.lengths <= 5).all()
    empty, empty_mask, _ = pad_embedding(spec.empty_prompt, 5)
    x0, e2, m2 = device_inputs(b, torch.device("cpu"), empty, empty_mask, 1.0, torch.Generator().manual_seed(0))
    assert torch.equal(x0, b.x0) and torch.equal(m2, empty_mask.expand(6, 5)) and torch.equal(e2[0], empty)


# ------------------------------------------------------------------------------------------- refusals
def test_encoder_cleaning_or_max_length_differences_are_refused(tmp_path):
    from contract.encoded import EncoderMismatch

    a = write_encoded_folder(str(tmp_path / "a"), 1, 2, **SMALL)
    for name, kw in (("b", {"max_length": 256}), ("c", {"cleaning": "basic"})):
        rec = encoder_record((4, 4, 4), 8, ["long", "short"], **kw)
        other = write_encoded_folder(str(tmp_path / name), 1, 2, record=rec, **SMALL)
        with pytest.raises(EncoderMismatch, match=list(kw)[0]):
            open_sources(mixture({"a": a, name: other}))


def test_source_names_follow_audit(tmp_path):
    """--shards names a source as `prx-data audit` does (the samples' json `source`), not by folder name."""
    from trainer.config import TrainConfig, load_mixture

    folder = write_encoded_folder(str(tmp_path / "enc-v3"), 1, 2, source="laion-art", **SMALL)
    mix = load_mixture(TrainConfig(model="tiny", shards=[folder, folder]))
    assert [s.name for s in mix.sources] == ["laion-art", "laion-art-2"]
    assert open_sources(mix).sources[0].audit_source == "laion-art"


# ------------------------------------------------------------------------------------------- prx-train --resume
def _train(args):
    from trainer.cli import main

    return main(args)


def test_resume_with_only_the_run_folder(sorted_sources, tmp_path, capsys):
    """`prx-train --resume RUN` alone continues bit-identically, in RUN, even when RUN was moved."""
    base = ["--shards", f"{sorted_sources['s0']},{sorted_sources['s1']}", "--model", "tiny", "--steps", "4",
            "--batch-size", "4", "--grad-accum", "2", "--lr", "1e-3", "--warmup-steps", "0", "--device", "cpu",
            "--no-tensorboard", "--open-shards", "3", "--shuffle-buffer", "40", "--loader-workers", "0",
            "--log-every", "1"]
    full, part = tmp_path / "full", tmp_path / "part"
    assert _train([*base, "--out", str(full)]) == 0
    assert _train([*base, "--out", str(part), "--checkpoint-every", "2"]) == 0
    shutil.rmtree(part / "checkpoints" / "step-00000004")  # as if killed after the step-2 checkpoint
    moved = tmp_path / "moved"
    part.rename(moved)  # its config.yaml still names `part` as --out
    assert _train(["--resume", str(moved), "--loader-workers", "1"]) == 0  # workers: safe to change
    assert not part.exists()
    a, b = (d / "checkpoints" / "step-00000004" for d in (full, moved))
    for rel in ("transformer/diffusion_pytorch_model.safetensors", "optimizer.safetensors",
                "rng-rank0.safetensors", "loader-rank0.json"):
        assert (a / rel).read_bytes() == (b / rel).read_bytes(), rel
    assert "resumed from" in (moved / "train.log").read_text()
    # refused: an unsafe flag names itself; --out elsewhere; safe flags pass
    capsys.readouterr()
    assert _train(["--resume", str(moved), "--lr", "0.5"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("prx-train: error:") and "--lr 0.5" in err and "--steps" in err
    assert _train(["--resume", str(moved), "--out", str(tmp_path / "x")]) == 2
    assert "--out" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------- DDP
def test_data_error_on_one_rank_stops_both(tmp_path):
    """Two CPU ranks (gloo, torchrun): one rank's shard has a corrupt latent; both ranks end with its message."""
    import tarfile

    folder = write_encoded_folder(str(tmp_path / "enc"), 2, 4, source="web", **SMALL)
    victim = os.path.join(folder, "000001.tar")
    with tarfile.open(victim) as tar:
        members = [(m, tar.extractfile(m).read()) for m in tar.getmembers()]
    with tarfile.open(victim, "w", format=tarfile.USTAR_FORMAT) as tar:
        import io

        for m, payload in members:
            if m.name.endswith("latent.safetensors"):
                payload = b"not a safetensors file"
                m.size = len(payload)
            tar.addfile(m, io.BytesIO(payload))
    env = dict(os.environ, OMP_NUM_THREADS="1", MASTER_ADDR="127.0.0.1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           "-m", "trainer.cli", "--shards", folder, "--model", "tiny", "--steps", "3", "--batch-size", "2",
           "--device", "cpu", "--no-tensorboard", "--loader-workers", "0", "--shuffle-buffer", "8",
           "--out", str(tmp_path / "run")]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0, out
    lines = ["prx-train: error:" + m for m in out.split("prx-train: error:")[1:]]
    assert len(lines) == 2, out  # both ranks, the same message naming the shard
    assert all("000001.tar" in ln and "latent.safetensors" in ln for ln in lines), out
