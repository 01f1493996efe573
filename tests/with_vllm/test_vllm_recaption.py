"""The vLLM backend for real: a `vllm.LLM` (vLLM's CPU build) on the tiny Qwen2-VL, through `prx-data recaption
--backend vllm` and against the transformers backend. Runs in .venv-vllm (`make test-vllm`); skipped where vllm
is not installed."""
from __future__ import annotations

import os
import signal
import time

import pytest

pytest.importorskip("vllm", reason="vLLM tests run in .venv-vllm: make test-vllm")

from PIL import Image  # noqa: E402
from vllm_support import (cache_files, cached_pairs, distinct_photos, recaption_cmd, relaxed,  # noqa: E402,F401
                          shards, start, vllm_model)

from captioners import prompts  # noqa: E402
from captioners.base import Request  # noqa: E402
from contract import ledger  # noqa: E402
from pipeline.cli import main as prx_data  # noqa: E402
from contract.shards import Sample, list_shards, read_shard  # noqa: E402


def samples(folder) -> list[Sample]:
    return [s for p in list_shards(str(folder)) for s in read_shard(p) if isinstance(s, Sample)]


def ledger_rows(folder) -> list[dict]:
    return ledger.read_folder(str(folder)).to_pylist()


def wait_for_cache(proc, out, deadline_s: float = 400) -> dict[str, bytes]:
    """The resume cache once it holds a finished batch, the run still going."""
    deadline = time.time() + deadline_s
    while time.time() < deadline and not cache_files(out) and proc.poll() is None:
        time.sleep(0.05)
    assert proc.poll() is None, "the run ended before a kill could land mid-run"
    return cache_files(out)


def test_backend_selection_takes_vllms_cpu_platform_by_name_only():
    from captioners import resolve_backend_name
    from captioners.vllm_backend import vllm_available, vllm_platform

    assert vllm_available() == (True, "") and vllm_platform() == "cpu"
    assert resolve_backend_name("auto") == "transformers"  # on CPU, vLLM runs when asked for
    assert resolve_backend_name("vllm") == "vllm"


def test_every_sample_captioned_and_a_killed_run_resumes_from_its_cache(shards, vllm_model, relaxed, tmp_path):
    raw, out = shards(12), tmp_path / "cap"
    cmd = recaption_cmd(raw, out, vllm_model, relaxed, "--executor", "local", "--batch-size", "1")
    proc = start(cmd, tmp_path / "run1.log")
    first = wait_for_cache(proc, out)
    os.killpg(proc.pid, signal.SIGKILL)  # the run and its engine process, as an OOM kill or a lost node would
    proc.wait()
    first = cache_files(out)
    keys = {s.key for s in samples(raw)}
    assert 0 < len(cached_pairs(first)) < 2 * len(keys)
    proc = start(cmd, tmp_path / "run2.log")
    assert proc.wait(timeout=600) == 0, (tmp_path / "run2.log").read_text()[-3000:]
    after = cache_files(out)
    assert {f: after[f] for f in first} == first  # the first run's captions kept as they were...
    new = {f: b for f, b in after.items() if f not in first}
    assert not cached_pairs(new) & cached_pairs(first)  # ...and not made again
    assert cached_pairs(after) == {(k, v) for k in keys for v in ("long", "short")}
    rows = ledger_rows(out)
    assert sorted(r["key"] for r in rows) == sorted(keys) and {r["outcome"] for r in rows} == {"kept"}
    for s in samples(out):
        for v in ("long", "short"):
            prov = s.meta()["captions"][v]
            assert s.text(f"caption_{v}.txt") and prov["backend"] == "vllm"
            assert prov["sampling"]["presence_penalty"] == 1.5 and isinstance(prov["mean_logprob"], float)
    # the same ledger columns and provenance keys as the transformers backend writes
    hf_out = tmp_path / "cap-hf"
    assert prx_data(["recaption", "--in", str(raw), "--out", str(hf_out), "--backend", "transformers", "--model",
                     vllm_model, "--config", str(relaxed), "--executor", "local", "--no-progress"]) == 0
    assert set(ledger_rows(hf_out)[0]) == set(rows[0])
    hf_prov = samples(hf_out)[0].meta()["captions"]["long"]
    assert set(hf_prov) == set(samples(out)[0].meta()["captions"]["long"])


@pytest.mark.parametrize("victim", ["VLLM::Worker", "VLLM::EngineCore"])
def test_an_engine_crash_mid_run_is_a_clear_stop_that_keeps_the_cache(victim, shards, vllm_model, relaxed, tmp_path):
    """The engine's model worker or its scheduler process killed (the OOM killer's way) between two batches."""
    import psutil

    raw, out, log = shards(12), tmp_path / "cap", tmp_path / "run.log"
    proc = start(recaption_cmd(raw, out, vllm_model, relaxed, "--executor", "local", "--batch-size", "1"), log)
    wait_for_cache(proc, out)
    targets = [p for p in psutil.Process(proc.pid).children(recursive=True) if victim in " ".join(p.cmdline())]
    assert len(targets) == 1, [p.cmdline() for p in psutil.Process(proc.pid).children(recursive=True)]
    targets[0].kill()
    try:
        assert proc.wait(timeout=300) == 2
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    lines = log.read_text().splitlines()
    stop = [line for line in lines if line.startswith("prx-data recaption: error: ")]
    assert len(stop) == 1 and stop[0].startswith("prx-data recaption: error: the vLLM engine stopped during a list of "
                                                 "2 requests (EngineDeadError"), lines[-8:]
    assert "rerunning the same command resumes" in stop[0]
    # no traceback of prx-data's before its stop (what Python's multiprocessing resource tracker may print at
    # exit, cleaning up the shared memory of the killed process, comes after it and is not prx-data's)
    assert not any(line.startswith("Traceback") for line in lines[:lines.index(stop[0])]), lines[-40:]
    kept = cached_pairs(cache_files(out))
    assert kept and all(v in ("long", "short") for _, v in kept)
    assert not list_shards(str(out))  # the shard in progress is not written half


def test_default_batch_size_on_64_images(shards, vllm_model, relaxed, tmp_path):
    """One request list of 128 (64 images x 2 variants), several prefill steps, per-request seeds, the default
    executor (Dask: the engine runs in its worker) and the default CPU KV cache."""
    raw, out, log = shards(64), tmp_path / "cap", tmp_path / "run.log"
    env_kv = os.environ.pop("VLLM_CPU_KVCACHE_SPACE", None)
    try:
        proc = start(recaption_cmd(raw, out, vllm_model, relaxed), log)
    finally:
        if env_kv is not None:
            os.environ["VLLM_CPU_KVCACHE_SPACE"] = env_kv
    assert proc.wait(timeout=600) == 0, log.read_text()[-3000:]
    rows = ledger_rows(out)
    assert len(rows) == 64 and {r["outcome"] for r in rows} == {"kept"}


def test_greedy_decoding_matches_the_transformers_backend(vllm_model):
    """Same prompts, greedy on both sides (top_k 1, no penalties), float32: the same tokens, and mean logprobs
    (vLLM's raw logprobs, transformers' raw logits) within 1e-4."""
    from captioners.hf import TransformersBackend
    from captioners.vllm_backend import VLLMBackend

    images = [Image.fromarray(a) for a in distinct_photos(6).values()]
    reqs = [Request(im, prompts.load(v).text, 24, seed=i) for i, im in enumerate(images) for v in ("long", "short")]
    pixels = {"max_pixels": 28 * 28 * 64, "min_pixels": 56 * 56}
    engine = VLLMBackend(vllm_model, sampling={"top_k": 1, "presence_penalty": 0.0}, **pixels)
    try:
        vllm_gens = engine.generate(reqs)
    finally:
        engine.close()
    hf = TransformersBackend(vllm_model, sampling={"top_k": 1, "repetition_penalty": 1.0}, device="cpu", batch_size=1,
                             **pixels)
    hf_gens = hf.generate(reqs)
    for a, b in zip(vllm_gens, hf_gens):
        assert (a.text, a.num_tokens, a.finish_reason) == (b.text, b.num_tokens, b.finish_reason)
        assert abs(a.mean_logprob - b.mean_logprob) <= 1e-4, (a.mean_logprob, b.mean_logprob)
