"""Golden outputs of the encode stage and the trainer's loader: what the host-path speed-ups (issue 25) must not
change. The digests below were produced by the code before those changes; every output byte must stay the same.

The stage runs its own code (`EncodeStage`, `TextEncoder.encode`, `VAE.encode`) with the tiny models' tokenizer
and records, but with exact stand-in forwards (strided pixels as the posterior, token ids as hidden states), so
the digests do not depend on a machine's float rounding: they check crops, token ids, truncation, batching and
serialisation, byte for byte.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
from types import SimpleNamespace

import pytest
import torch
from PIL import Image

from contract import ledger
from contract.encoders.text import TextEncoder, load_text_encoder
from contract.encoders.vae import VAE, load_vae
from contract.errors import PrxError
from contract.shards import Problem, ShardWriter, read_shard
from pipeline.cli import main
from pipeline.stages.encode import EncodeStage

WORDS = ("red blue green small large wooden stone glass river mountain forest street light shadow morning "
         "evening quiet busy old new bright dark soft sharp").split()

# sha256 over every output member (key, name, bytes) in shard order, and over the ledger rows (no timings)
GOLDEN_MEMBERS = "3e059effd9d2e98b08c5a4c199f06840f0128f075360cfab382dc4cab382b428"
GOLDEN_LEDGER = "124e56d0559734ba32adf3bf8edd19934253dd2a54162fe829d9759db8c77de8"
GOLDEN_BATCHES = "112ea952ce72cbf365d8ea701fac64963b0f01c865db0a7cb2683348286e2a54"


def caption(i: int, words: int) -> str:
    return f"Photo {i}: " + " ".join(WORDS[(i * 7 + j * 3) % len(WORDS)] for j in range(words)) + "."


class StridedVAE(torch.nn.Module):
    """An exact posterior: every 8th pixel (mean) and the pixels 4 further (logvar), as many channels as the
    tiny VAE has."""

    def __init__(self, channels: int):
        super().__init__()
        self.channels = channels

    def encode(self, x):
        rep = -(-self.channels // 3)
        mean = x[:, :, ::8, ::8].repeat(1, rep, 1, 1)[:, :self.channels].contiguous()
        logvar = x[:, :, 4::8, 4::8].repeat(1, rep, 1, 1)[:, :self.channels].contiguous()
        return SimpleNamespace(latent_dist=SimpleNamespace(mean=mean, logvar=logvar))


class IdsText(torch.nn.Module):
    """Hidden states that are the token ids (and positions) themselves, exact in BF16."""

    def __init__(self, dim: int):
        super().__init__()
        self.dim = dim

    def forward(self, input_ids, attention_mask):
        pos = torch.arange(input_ids.shape[1]).view(1, -1, 1)
        h = (input_ids.unsqueeze(-1) * 7 + pos * 3 + torch.arange(self.dim).view(1, 1, -1)) % 256
        return SimpleNamespace(last_hidden_state=(h * attention_mask.unsqueeze(-1)).float())


class ExactEncode(EncodeStage):
    """The encode stage with the exact stand-in forwards (module level: a prepare process builds it too)."""

    def models(self):
        cfg = self.cfg
        vae, text = load_vae(cfg.vae), load_text_encoder(cfg.text_encoder, cfg.max_length, cfg.cleaning)
        channels = int(vae.info["latent_channels"])
        dim = int(text.info["hidden_size"])
        return (VAE(StridedVAE(channels), vae.spec, vae.info, "cpu", False),
                TextEncoder(IdsText(dim), text.tokenizer, text.spec, text.info, "cpu", False, text.clean), None)


@pytest.fixture(scope="module")
def captioned(tmp_path_factory, photos):
    """Ingested photos (two shards) with a long and a short caption variant, a sample over max_length, a
    missing variant, a corrupt image and a caption that cleans to nothing."""
    base = tmp_path_factory.mktemp("golden")
    photo_dir = base / "photos"
    photo_dir.mkdir()
    for i, (name, arr) in enumerate(sorted(photos.items())):
        Image.fromarray(arr).save(photo_dir / f"{name}.jpg", quality=90)
        (photo_dir / f"{name}.txt").write_text(caption(i, 12 + 9 * i))
    raw = str(base / "raw")
    assert main(["ingest", "--in", str(photo_dir), "--out", raw, "--executor", "local", "--no-progress",
                 "--shard-size", "4"]) == 0
    out = str(base / "captioned")
    os.makedirs(out)
    for shard in sorted(p for p in os.listdir(raw) if p.endswith(".tar")):
        index = int(shard.split(".")[0])
        writer = ShardWriter(out, index, "recaption")
        for j, s in enumerate(x for x in read_shard(os.path.join(raw, shard)) if not isinstance(x, Problem)):
            members = dict(s.members)
            members["caption_long.txt"] = caption(j + 10 * index, 150 if j % 3 == 0 else 40).encode()
            if j % 2 == 0:
                members["caption_short.txt"] = caption(j, 6).encode()
            if j == 1:
                members["jpg"] = members["jpg"][: len(members["jpg"]) // 3]
            if j == 2:
                members["txt"] = b"  "
            writer.write(s.key, members)
            writer.add_row(ledger.row(s.key, s.meta()["input_id"]))
        writer.close()
    return out


def _local(data: bytes) -> bytes:
    """The bytes with this session's temporary folder (in the encoders' names and ids) written as <tmp>."""
    return re.sub(rb"/[^\"]*?/pytest-[0-9]+/", b"<tmp>/", data)


def encode_config(src: str, out: str, tiny_model, **extra):
    from contract.config import build_config
    from pipeline.stages.encode import EncodeConfig

    return build_config(EncodeConfig, {"input": src, "out": out, "executor": "local", "progress": False,
                                       "vae": tiny_model("tiny-flux-vae"), "text_encoder": tiny_model("tiny-t5gemma"),
                                       "resolution": 64, "max_length": 48, "batch_size": 3, "decode_threads": 2,
                                       **extra})


def run_encode(src: str, out: str, tiny_model, **extra) -> str:
    from pipeline.runner import run_stage

    run_stage(ExactEncode(encode_config(src, out, tiny_model, **extra)))
    return out


def member_digest(folder: str) -> str:
    h = hashlib.sha256()
    for shard in sorted(p for p in os.listdir(folder) if p.endswith(".tar")):
        for s in read_shard(os.path.join(folder, shard)):
            assert not isinstance(s, Problem)
            for name in sorted(s.members):
                h.update(f"{shard}/{s.key}.{name}:".encode())
                h.update(hashlib.sha256(_local(bytes(s.members[name]))).digest())
    return h.hexdigest()


def ledger_digest(folder: str) -> str:
    rows = ledger.read_folder(folder).to_pylist()
    keep = [{k: v for k, v in r.items() if k not in ("seconds", "stage_run", "run_id", "written_at")} for r in rows]
    text = json.dumps(sorted(keep, key=lambda r: (r["shard"], r["key"])), sort_keys=True, default=str)
    return hashlib.sha256(_local(text.encode())).hexdigest()


def batch_digest(folder: str) -> str:
    from trainer.config import Mixture, Source
    from trainer.data import MixtureLoader, open_sources

    loader = MixtureLoader(open_sources(Mixture([Source("a", folder, 1.0)], {"long": 1.0, "short": 1.0})), 3,
                           text_max_length=40, shuffle_buffer=8)
    h = hashlib.sha256()
    for _ in range(4):
        b = loader.next_batch()
        for t in (b.x0, b.tokens, b.index, b.lengths):
            h.update(str((t.dtype, tuple(t.shape))).encode())
            h.update(t.contiguous().view(torch.uint8).numpy().tobytes())
        h.update(json.dumps([b.keys, b.variants, b.draws]).encode())
    return h.hexdigest()


@pytest.fixture(scope="module")
def encoded(captioned, tiny_model, tmp_path_factory):
    return run_encode(captioned, str(tmp_path_factory.mktemp("golden-out") / "encoded"), tiny_model)


def test_encode_output_bytes_are_the_golden_ones(encoded):
    assert member_digest(encoded) == GOLDEN_MEMBERS


def test_encode_ledger_rows_are_the_golden_ones(encoded):
    rows = ledger.read_folder(encoded).to_pylist()
    assert {r["reason"] for r in rows} >= {"", "decode_error"}   # the fixture's corrupt image is there
    assert ledger_digest(encoded) == GOLDEN_LEDGER


def test_loader_batches_are_the_golden_ones(encoded):
    assert batch_digest(encoded) == GOLDEN_BATCHES


@pytest.mark.parametrize("executor", ["local", pytest.param("dask", marks=pytest.mark.slow)])
def test_encode_in_prepare_processes_is_golden(captioned, tiny_model, tmp_path, executor):
    """--prepare-processes: decode, crop, cleaning and tokenisation in spawned processes, the same bytes; under
    Dask too (prx's local cluster then starts its worker non-daemonic, so that it may have children)."""
    extra = {"workers": 1} if executor == "dask" else {}
    out = run_encode(captioned, str(tmp_path / "encoded"), tiny_model, prepare_processes=2, executor=executor,
                     **extra)
    assert member_digest(out) == GOLDEN_MEMBERS
    assert ledger_digest(out) == GOLDEN_LEDGER


def test_a_prepare_process_tokenises_what_the_batch_call_would(captioned, tiny_model, tmp_path):
    """With processes, prepare() hands back each caption's (token ids, cut?) as the text encoder's tokenizer
    makes them in the batch; with threads it leaves that to the batch (one tokenizer shared by threads is not
    thread-safe)."""
    sample = next(x for x in read_shard(os.path.join(captioned, "000000.tar")) if not isinstance(x, Problem))
    text = load_text_encoder(tiny_model("tiny-t5gemma"), 48)
    p = ExactEncode(encode_config(captioned, str(tmp_path / "a"), tiny_model, prepare_processes=2)).prepare(sample)
    assert set(p.tokens) == set(p.texts) == {"original", "long", "short"}
    for v, t in p.texts.items():
        ids, cut = p.tokens[v]
        assert ids == text.token_ids([t])[0]
        assert cut == (text.count_tokens([t])[0] > 48)
    assert any(cut for _, cut in p.tokens.values())   # the 150-word long caption is cut at 48 tokens
    assert ExactEncode(encode_config(captioned, str(tmp_path / "b"), tiny_model)).prepare(sample).tokens == {}


def test_prepare_processes_in_a_daemonic_worker_is_a_clear_error(monkeypatch):
    from pipeline import prepare_pool

    monkeypatch.setattr(prepare_pool.multiprocessing, "current_process", lambda: SimpleNamespace(daemon=True))
    with pytest.raises(PrxError, match="distributed.worker.daemon: False"):
        prepare_pool.process_pool(ExactEncode, None, 2)


class DyingEncode(ExactEncode):
    """A prepare process that dies on its first sample while PRX_TEST_DIE_IN_PREPARE is set (read by each
    process as it starts its work, so a pool started after it is unset works)."""

    def prepare(self, sample):
        if os.environ.get("PRX_TEST_DIE_IN_PREPARE"):
            os._exit(3)
        return super().prepare(sample)


def test_a_prepare_process_that_dies_is_one_clear_error_and_the_rerun_resumes(captioned, tiny_model, tmp_path,
                                                                             monkeypatch):
    from pipeline.runner import run_stage

    cfg = encode_config(captioned, str(tmp_path / "encoded"), tiny_model, prepare_processes=1)
    monkeypatch.setenv("PRX_TEST_DIE_IN_PREPARE", "1")
    with pytest.raises(PrxError, match="prepare-processes process died.*run the same command again"):
        run_stage(DyingEncode(cfg))
    assert not [p for p in os.listdir(cfg.out) if p.endswith(".tar")]   # nothing half-written published
    monkeypatch.delenv("PRX_TEST_DIE_IN_PREPARE")
    run_stage(DyingEncode(cfg))   # the same stage and config: the broken pool is replaced
    assert member_digest(cfg.out) == GOLDEN_MEMBERS
    assert ledger_digest(cfg.out) == GOLDEN_LEDGER


def test_prepare_processes_exit_when_their_worker_is_killed(tmp_path):
    """A worker killed without closing its pool (SIGKILL, a Dask nanny's terminate) leaves no process behind."""
    import subprocess
    import sys
    import time

    import psutil

    script = tmp_path / "worker.py"
    script.write_text(f"""
import os, signal, sys
sys.path[:0] = {sys.path!r}
from contract.config import build_config
from pipeline import prepare_pool
from pipeline.stages.encode import EncodeConfig, EncodeStage

if __name__ == "__main__":
    cfg = build_config(EncodeConfig, {{"input": "in", "out": "out", "vae": "none", "prepare_processes": 2}})
    pool = prepare_pool.process_pool(EncodeStage, cfg, 2)
    for f in [pool.executor.submit(prepare_pool._prepare_in_child, []) for _ in range(4)]:
        f.result()
    print(" ".join(str(p) for p in pool.executor._processes), flush=True)
    os.kill(os.getpid(), signal.SIGKILL)
""")
    out = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=120, cwd=tmp_path)
    children = [int(p) for p in out.stdout.split()]
    assert children, out.stderr
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline and any(psutil.pid_exists(p) and psutil.Process(p).status() != "zombie"
                                              for p in children):
        time.sleep(0.2)
    assert not [p for p in children if psutil.pid_exists(p) and psutil.Process(p).status() != "zombie"]
