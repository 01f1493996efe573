"""`prx-data recaption`: an injected test backend (counts, provenance, every check with retries, one variant
failing, resume after SIGKILL) and the tiny Qwen2-VL through the transformers backend."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

import captioners
from captioners import checks
from captioners.base import Generation
from captioners.fake import FakeBackend
from contract import ledger
from pipeline.cli import main as prx_data
from contract.shards import Sample, list_shards, read_shard

ROOT = Path(__file__).resolve().parent.parent
PROV_KEYS = {"model", "backend", "prompt", "sampling", "max_pixels", "words", "output_tokens", "finish_reason",
             "tries", "mean_logprob", "checks"}
GOOD_SHORT = "A tabby cat sits on a wooden table near a bright window."
BAD = {
    checks.REFUSAL: ("I'm sorry, but I cannot describe this image for you.", "stop"),
    checks.TRUNCATED: (GOOD_SHORT, "length"),
    checks.REPETITION: ("A cat on a mat and a cat on a mat and a cat on a mat and a cat on a mat.", "stop"),
    checks.WRONG_LANGUAGE: ("Un chat tigré est assis sur une table en bois près de la fenêtre ouverte.", "stop"),
    checks.LENGTH: ("A cat.", "stop"),
    checks.TEMPLATE: ("<|im_start|>assistant\nA tabby cat sits on a wooden table near a window.", "stop"),
}


class ScriptedBackend(FakeBackend):
    """Good captions from FakeBackend unless `script(req, attempt)` returns (text, finish_reason)."""

    name = "scripted"

    def __init__(self, script=None, **kw):
        super().__init__(**kw)
        self.script = script or (lambda req, attempt: None)
        self.attempts: dict[tuple[str, str], int] = {}
        self.requests = 0

    def generate(self, requests):
        out = []
        for req in requests:
            n = self.attempts.get((req.key, req.variant), 0)
            self.attempts[(req.key, req.variant)] = n + 1
            self.requests += 1
            scripted = self.script(req, n)
            if scripted is None:
                out.extend(super().generate([req]))
            else:
                text, finish = scripted
                out.append(Generation(text, len(text.split()), finish, mean_logprob=-1.25, seed=req.seed))
        return out


@pytest.fixture
def inject():
    names = []

    def register(backend, name="test-backend"):
        captioners.register_backend(name, lambda **kw: backend)
        names.append(name)
        return name

    yield register
    for n in names:
        captioners.unregister_backend(n)


@pytest.fixture
def raw(tmp_path, photo_folder):
    out = tmp_path / "raw"
    assert prx_data(["ingest", "--in", str(photo_folder), "--out", str(out), "--executor", "local",
                     "--no-progress", "--shard-size", "3"]) == 0
    return out


def run_recaption(raw, out, *extra) -> int:
    return prx_data(["recaption", "--in", str(raw), "--out", str(out), "--executor", "local", "--no-progress",
                     *extra])


def samples(folder) -> list[Sample]:
    return [s for p in list_shards(str(folder)) for s in read_shard(p) if isinstance(s, Sample)]


def rows(folder) -> list[dict]:
    return ledger.read_folder(str(folder)).to_pylist()


def test_n_in_n_captioned_with_complete_provenance(raw, tmp_path, inject):
    backend = ScriptedBackend()
    out = tmp_path / "cap"
    assert run_recaption(raw, out, "--backend", inject(backend), "--batch-size", "2") == 0
    n_in = len(samples(raw))
    got = samples(out)
    assert len(got) == n_in and len(rows(out)) == n_in
    assert all(r["outcome"] == "kept" and r["reason"] == "" for r in rows(out))
    for s in got:
        assert {"caption_long.txt", "caption_short.txt", "txt", "json"} <= set(s.members)
        assert s.image_member is not None
        meta = s.meta()
        for v, band in (("long", (120, 200)), ("short", (5, 25))):
            prov = meta["captions"][v]
            assert PROV_KEYS <= set(prov), set(PROV_KEYS) - set(prov)
            assert prov["prompt"]["file"] == f"{v}.txt" and len(prov["prompt"]["sha256"]) == 64
            assert prov["sampling"]["temperature"] == 0.7 and "seed" in prov["sampling"]
            assert prov["max_pixels"] == 1024 * 28 * 28 and prov["tries"] == 1
            assert band[0] <= prov["words"] <= band[1]
            assert prov["words"] == checks.count_words(s.text(f"caption_{v}.txt"))
            assert prov["mean_logprob"] is None and "mean_logprob_absent" in prov
    stage = json.loads((out / "_stage.json").read_text())
    assert stage["provenance"]["prompts"]["long"]["sha256"] == got[0].meta()["captions"]["long"]["prompt"]["sha256"]
    assert stage["counts"]["kept"] == n_in
    # the original caption stays as txt
    assert {s.text("txt") for s in got} == {s.text("txt") for s in samples(raw)}


@pytest.mark.parametrize("reason", sorted(BAD))
def test_each_check_rejects_its_bad_output_and_retries(raw, tmp_path, inject, reason):
    def script(req, attempt):
        return BAD[reason] if req.variant == "short" and attempt == 0 else None

    backend = ScriptedBackend(script)
    out = tmp_path / "cap"
    assert run_recaption(raw, out, "--backend", inject(backend)) == 0
    got = samples(out)
    assert got and len(got) == len(samples(raw))
    for s in got:
        prov = s.meta()["captions"]["short"]
        assert prov["tries"] == 2 and prov["retry_reasons"] == [reason]
        assert s.meta()["captions"]["long"]["tries"] == 1
    # a retry draws a new seed
    assert all(n == 2 for (k, v), n in backend.attempts.items() if v == "short")


def test_one_variant_fails_sample_kept_with_the_other(raw, tmp_path, inject):
    backend = ScriptedBackend(lambda req, attempt: BAD[checks.LENGTH] if req.variant == "short" else None)
    out = tmp_path / "cap"
    assert run_recaption(raw, out, "--backend", inject(backend), "--retries", "1") == 0
    got = samples(out)
    assert len(got) == len(samples(raw))
    for s in got:
        assert "caption_long.txt" in s.members and "caption_short.txt" not in s.members
        assert set(s.meta()["captions"]) == {"long"}
    for r in rows(out):
        assert r["outcome"] == "kept"
        assert "short: caption_length after 2 tries" in r["detail"]


def test_all_variants_fail_is_rejected(raw, tmp_path, inject):
    backend = ScriptedBackend(lambda req, attempt: BAD[checks.REFUSAL])
    out = tmp_path / "cap"
    assert run_recaption(raw, out, "--backend", inject(backend), "--retries", "0") == 0
    assert samples(out) == []
    rs = rows(out)
    assert len(rs) == len(samples(raw))
    assert all(r["outcome"] == "rejected" and r["reason"] == checks.ALL_FAILED for r in rs)
    assert all("long: caption_refusal" in r["detail"] and "short: caption_refusal" in r["detail"] for r in rs)


def test_extreme_aspect_ratio_is_a_ledger_row_not_a_crash(tmp_path, photo_folder, inject):
    """Qwen-VL processors raise on a side ratio above 200, failing the whole request list: the stage refuses
    such an image itself, with a ledger row, and captions the rest."""
    from PIL import Image

    from captioners.base import MAX_ASPECT_RATIO

    Image.new("RGB", (2400, 8), (200, 30, 30)).save(photo_folder / "banner.png")
    raw = tmp_path / "raw"
    assert prx_data(["ingest", "--in", str(photo_folder), "--out", str(raw), "--executor", "local",
                     "--no-progress"]) == 0

    class ProcessorLike(ScriptedBackend):
        def generate(self, requests):
            for r in requests:
                w, h = r.image.size
                if max(w, h) / min(w, h) > MAX_ASPECT_RATIO:
                    raise ValueError("absolute aspect ratio must be smaller than 200")
            return super().generate(requests)

    out = tmp_path / "cap"
    assert run_recaption(raw, out, "--backend", inject(ProcessorLike()), "--relax-checks", "language") == 0
    rs = rows(out)
    assert len(rs) == len(samples(raw))
    bad = [r for r in rs if r["outcome"] != "kept"]
    assert [(r["reason"], r["outcome"]) for r in bad] == [("vlm_aspect_ratio", "rejected")]
    assert "2400x8" in bad[0]["detail"]
    assert len(samples(out)) == len(rs) - 1


def test_language_check_that_cannot_run_stops_the_stage(raw, tmp_path, inject, monkeypatch):
    import filters.language

    def broken(text):
        raise RuntimeError("detector model missing")

    monkeypatch.setattr(filters.language, "detect_language", broken)
    with pytest.raises(checks.CheckError):
        run_recaption(raw, tmp_path / "cap", "--backend", inject(ScriptedBackend()))


def test_bad_options_are_refused(raw, tmp_path, capsys):
    assert run_recaption(raw, tmp_path / "a", "--backend", "transformers", "--presence-penalty", "1.0") == 2
    assert "presence_penalty" in capsys.readouterr().err
    assert run_recaption(raw, tmp_path / "b", "--backend", "fake", "--word-bands", "medium=1-2") == 2
    assert "not one of" in capsys.readouterr().err
    assert run_recaption(raw, tmp_path / "c", "--backend", "fake", "--variants", "haiku") == 2
    assert "no prompt" in capsys.readouterr().err
    assert run_recaption(raw, tmp_path / "d", "--backend", "fake", "--max-new-tokens", "short=0") == 2
    assert "at least 1" in capsys.readouterr().err


def _cli(args, env_extra, **kw):
    env = {**os.environ, "PYTHONPATH": str(ROOT), **env_extra}
    return subprocess.Popen([sys.executable, "-m", "pipeline.cli", *args], cwd=str(ROOT), env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, **kw)


def _cached_pairs(out: Path) -> set[tuple[str, str]]:
    pairs = set()
    for f in (out / ".cache" / "recaption").rglob("*.jsonl"):
        for line in f.read_text().splitlines():
            rec = json.loads(line)
            pairs.add((rec["key"], rec["variant"]))
    return pairs


@pytest.mark.slow  # a stage process killed, then run again
def test_resume_after_sigkill_regenerates_nothing_finished(raw, tmp_path):
    out = tmp_path / "cap"
    log1, log2 = tmp_path / "run1.log", tmp_path / "run2.log"
    args = ["recaption", "--in", str(raw), "--out", str(out), "--backend", "fake", "--model", "fake",
            "--executor", "local", "--no-progress", "--batch-size", "1",
            "--relax-checks", "language"]  # lingua's load (~30 s here) is not what this test is about
    proc = _cli(args, {"PRX_FAKE_DELAY": "0.5", "PRX_FAKE_LOG": str(log1)})
    deadline = time.time() + 120
    while time.time() < deadline and len(_cached_pairs(out)) < 4 and proc.poll() is None:
        time.sleep(0.05)
    assert proc.poll() is None, proc.stdout.read().decode()
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    cached = _cached_pairs(out)
    n_in = len(samples(raw))
    assert 4 <= len(cached) < 2 * n_in
    proc = _cli(args, {"PRX_FAKE_LOG": str(log2)})
    output = proc.communicate(timeout=300)[0].decode()
    assert proc.returncode == 0, output
    regenerated = {tuple(line.split()[:2]) for line in log2.read_text().splitlines()}
    assert not regenerated & cached, f"regenerated finished captions: {regenerated & cached}"
    assert regenerated | cached == {(s.key, v) for s in samples(raw) for v in ("long", "short")}
    got = samples(out)
    assert len(got) == n_in and all("caption_long.txt" in s.members and "caption_short.txt" in s.members
                                     for s in got)
    # a complete folder reruns as a no-op
    log3 = tmp_path / "run3.log"
    proc = _cli(args, {"PRX_FAKE_LOG": str(log3)})
    assert proc.wait(timeout=300) == 0 and not log3.exists()


@pytest.mark.slow  # a real (tiny) VLM through the stage
def test_tiny_qwen2_vl_transformers_every_sample_every_variant(raw, tmp_path, tiny_model):
    model = tiny_model("tiny-qwen2-vl")
    cfg = tmp_path / "relaxed.yaml"
    cfg.write_text("relax_checks: [truncation, template, refusal, repetition, length, language]\n"
                   "max_new_tokens: [long=12, short=6]\n"
                   "vlm_max_pixels: 12544\n")
    out = tmp_path / "cap"
    assert run_recaption(raw, out, "--backend", "transformers", "--model", model, "--text-encoder", model,
                         "--config", str(cfg), "--model-batch-size", "4") == 0
    got = samples(out)
    assert len(got) == len(samples(raw))
    for s in got:
        for v, budget in (("long", 12), ("short", 6)):
            assert s.text(f"caption_{v}.txt")
            prov = s.meta()["captions"][v]
            assert PROV_KEYS <= set(prov)
            assert prov["backend"] == "transformers" and prov["model"]["revision"].startswith("local-")
            assert prov["sampling"]["top_k"] == 20 and prov["sampling"]["repetition_penalty"] == 1.05
            assert prov["sampling"]["max_new_tokens"] == budget and 0 < prov["output_tokens"] <= budget
            assert prov["max_pixels"] == 12544 and prov["checks"] == []
            assert isinstance(prov["mean_logprob"], float) and prov["text_encoder"]["tokens"] > 0


class ImageRecorder(ScriptedBackend):
    """Good captions; records each request's image (size and pixel digest) by sample key."""

    seen: dict

    def __init__(self, **kw):
        super().__init__(**kw)
        self.seen = {}

    def generate(self, requests):
        import hashlib

        for r in requests:
            self.seen[r.key] = (r.image.size, r.image.mode, hashlib.sha256(r.image.tobytes()).hexdigest())
        return super().generate(requests)


def test_prepare_processes_give_the_model_the_same_images(raw, tmp_path, inject):
    """--prepare-processes: decode and resize in a spawned process; the backend gets the same pixels, the
    shards are the same bytes."""
    backend = ImageRecorder()
    name = inject(backend)
    assert run_recaption(raw, tmp_path / "t", "--backend", name, "--seed", "3") == 0
    threads, backend.seen = backend.seen, {}
    assert run_recaption(raw, tmp_path / "p", "--backend", name, "--seed", "3", "--prepare-processes", "1") == 0
    assert len(threads) == len(samples(raw)) and backend.seen == threads
    by_key = {s.key: dict(s.members) for s in samples(tmp_path / "t")}
    assert {s.key: dict(s.members) for s in samples(tmp_path / "p")} == by_key
