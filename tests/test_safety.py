"""Operator mistakes and hostile data never lose input or stop a stage.

Each test builds a hostile input and asserts its outcome: input untouched and exit 2 for every overwrite
mistake, the neighbouring samples kept for every bad member, damaged outputs redone or named, a server that
drips its headers cut at the deadline, config and model errors as one-line messages.
"""
from __future__ import annotations

import hashlib
import json
import os
import tarfile

import numpy as np
import pytest
from PIL import Image

from contract import ledger
from pipeline.cli import main as prx_data
from contract.shards import list_shards, read_shard

LOCAL = ["--executor", "local", "--no-progress"]


def _images(folder, n: int, seed: int = 0):
    """n distinct small PNGs with captions."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i in range(n):
        Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)).save(folder / f"{i:03d}.png")
        (folder / f"{i:03d}.txt").write_text(f"generated image {i}")
    return folder


def _snapshot(folder) -> dict[str, str]:
    """Every file below folder -> sha256 of its bytes (links followed)."""
    out = {}
    for root, _dirs, files in os.walk(folder):
        for name in files:
            path = os.path.join(root, name)
            with open(path, "rb") as fh:
                out[os.path.relpath(path, folder)] = hashlib.sha256(fh.read()).hexdigest()
    return out


def _ingest(src, out, *extra) -> int:
    return prx_data(["ingest", "--in", str(src), "--out", str(out), *LOCAL, "--shard-size", "4", *extra])


def _rows(folder) -> dict[str, dict]:
    return {r["input_id"]: r for r in ledger.read_folder(str(folder)).to_pylist()}


# ------------------------------------------------------------------------------------- --overwrite
@pytest.fixture
def raw(tmp_path):
    """An ingested shard folder (3 shards) and the image folder it came from."""
    src = _images(tmp_path / "src", 10)
    assert _ingest(src, tmp_path / "raw") == 0
    return tmp_path / "raw"


def _refused(argv, protected, capsys, *needles):
    before = _snapshot(protected)
    assert prx_data(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and ": error: " in err, err
    for n in needles:
        assert n in err, err
    assert _snapshot(protected) == before, "the input was touched"
    return err


@pytest.mark.parametrize("overwrite", [[], ["--overwrite"]])
def test_out_equal_to_input_is_refused_and_input_untouched(raw, capsys, overwrite):
    argv = ["filter", "--in", str(raw), "--out", str(raw), *LOCAL, "--clip-model", "", *overwrite]
    _refused(argv, raw, capsys, "the same as input", "Nothing was changed")
    # ingest of a folder into itself: refused before anything is deleted (its shards and _stage.json stay)
    _refused(["ingest", "--in", str(raw), "--out", str(raw), *LOCAL, *overwrite], raw, capsys, "the same as input")


def test_out_holding_the_input_is_refused(tmp_path, capsys):
    parent = tmp_path / "p"
    src = _images(parent / "sub", 4)
    _refused(["ingest", "--in", str(src), "--out", str(parent), *LOCAL, "--overwrite"], parent, capsys,
             "a folder holding input")
    assert len(_snapshot(src)) == 8


def test_out_inside_the_input_is_refused(tmp_path, capsys):
    src = _images(tmp_path / "src", 4)
    _refused(["ingest", "--in", str(src), "--out", str(src / "shards"), *LOCAL, "--overwrite"], src, capsys,
             "inside input")
    assert not (src / "shards").exists()


def test_out_reaching_the_input_through_a_symlink_or_dotdot_is_refused(raw, tmp_path, capsys):
    link = tmp_path / "link"
    link.symlink_to(raw, target_is_directory=True)
    for out in (link, tmp_path / "x" / ".." / "raw"):
        _refused(["ingest", "--in", str(raw), "--out", str(out), *LOCAL, "--overwrite"], raw, capsys,
                 "the same as input")


def test_fsspec_urls_are_compared_too(tmp_path, capsys):
    from pipeline.runner import relation, canonical

    assert relation(canonical("memory://bucket/a/b"), canonical("memory://bucket/a/./c/../")) == "inside"
    assert relation(canonical("s3://bkt/data"), canonical("s3://bkt/data/")) == "the same as"
    assert relation(canonical("s3://bkt/data"), canonical("s3://other/data")) is None
    assert relation(canonical(f"file://{tmp_path}/a"), canonical(str(tmp_path))) == "inside"


def test_write_rejected_into_the_input_is_refused(raw, tmp_path, capsys):
    argv = ["filter", "--in", str(raw), "--out", str(tmp_path / "f"), "--write-rejected", str(raw), *LOCAL,
            "--clip-model", ""]
    _refused(argv, raw, capsys, "the same as input")


def test_overwrite_removes_only_what_the_stage_wrote(raw, tmp_path, capsys):
    src = tmp_path / "src"
    out = tmp_path / "again"
    assert _ingest(src, out) == 0
    (out / "notes.txt").write_text("mine")
    (out / "keep").mkdir()
    before = _snapshot(out)
    assert _ingest(src, out, "--shard-size", "2", "--overwrite") == 2
    err = capsys.readouterr().err
    assert "did not write" in err and "notes.txt" in err and "keep" in err
    assert _snapshot(out) == before, "a refused --overwrite changed the folder"
    (out / "notes.txt").unlink()
    (out / "keep").rmdir()
    assert _ingest(src, out, "--shard-size", "2", "--overwrite") == 0
    assert len(list_shards(str(out))) == 5
    assert json.loads((out / "_stage.json").read_text())["config"]["shard_size"] == 2


# ------------------------------------------------------------------------------------- damaged outputs
def test_truncated_tar_in_out_is_redone_on_rerun(raw, tmp_path, capsys):
    whole = (raw / "000001.tar").read_bytes()
    (raw / "000001.tar").write_bytes(whole[: len(whole) // 2])
    assert _ingest(tmp_path / "src", raw) == 0
    err = capsys.readouterr().err
    assert "000001.tar is damaged" in err and "redoing shard 000001" in err
    assert (raw / "000001.tar").read_bytes() == whole
    # a tar cut exactly at a member boundary (no end-of-archive marker) is found too
    with tarfile.open(raw / "000002.tar") as tar:
        first = tar.getmembers()[1]
    cut = first.offset_data + ((first.size + 511) // 512) * 512
    whole2 = (raw / "000002.tar").read_bytes()
    (raw / "000002.tar").write_bytes(whole2[:cut])
    assert _ingest(tmp_path / "src", raw) == 0
    assert "redoing shard 000002" in capsys.readouterr().err
    assert (raw / "000002.tar").read_bytes() == whole2


def test_truncated_ledger_in_out_is_redone_on_rerun(raw, tmp_path, capsys):
    path = raw / "000000.parquet"
    whole = path.read_bytes()
    path.write_bytes(whole[:-40])
    assert _ingest(tmp_path / "src", raw) == 0
    assert "ledger unreadable" in capsys.readouterr().err
    assert ledger.read(str(path)).num_rows == 4


def test_garbage_stage_json_is_named_with_the_fix(raw, tmp_path, capsys):
    (raw / "_stage.json").write_bytes(b"\x00garbage{")
    before = _snapshot(raw)
    assert _ingest(tmp_path / "src", raw) == 2
    err = capsys.readouterr().err
    assert str(raw / "_stage.json") in err and "cannot be parsed" in err and "--overwrite" in err
    assert _snapshot(raw) == before
    assert _ingest(tmp_path / "src", raw, "--overwrite") == 0
    assert json.loads((raw / "_stage.json").read_text())["status"] == "complete"


def test_damage_after_the_checks_is_named_not_a_traceback(raw):
    from contract.errors import PrxError
    from pipeline.runner import summarize

    (raw / "000000.tar").write_bytes(b"not a tar at all" * 10)
    with pytest.raises(PrxError, match="000000.tar is damaged.*rerun the same command"):
        summarize(str(raw), [0, 1, 2])


# ------------------------------------------------------------------------------------- bad members
DEEP = b"[" * 100_000 + b"]" * 100_000
HOSTILE_JSON = {
    "deep": b'{"a":' + DEEP + b"}",                                    # RecursionError in json.loads
    "nan": b'{"url": "http://x/a.jpg", "score": NaN, "w": Infinity}',  # no JSON writer may emit it again
    "overflow": b'{"url": "http://x/a.jpg", "scores": {"clip:x": -1e400}}',  # Infinity by another spelling
    "huge": b'{"blob": "' + b"x" * (50 << 20) + b'"}',                 # 50 MB: over the 1 MiB cap
}


def test_hostile_json_sidecars_are_rows_and_neighbours_are_kept(tmp_path):
    src = _images(tmp_path / "src", 6)
    for i, (name, data) in enumerate(HOSTILE_JSON.items()):
        (src / f"{i:03d}.json").write_bytes(data)
    (src / "004.json").write_text(json.dumps({"url": "http://example.com/4.jpg", "w": 1e300}))
    assert _ingest(src, tmp_path / "raw") == 0
    rows = _rows(tmp_path / "raw")
    assert len(rows) == 6
    for i, name in enumerate(HOSTILE_JSON):
        r = rows[f"{i:03d}.png"]
        assert (r["outcome"], r["reason"]) == ("failed", "bad_member"), (name, r)
    assert "nested" in rows["000.png"]["detail"] and "NaN" in rows["001.png"]["detail"]
    assert "1e400 is out of the float range" in rows["002.png"]["detail"] and "cap" in rows["003.png"]["detail"]
    assert [rows[f"{i:03d}.png"]["outcome"] for i in range(4, 6)] == ["kept"] * 2
    metas = {s.key: s.meta() for p in list_shards(str(tmp_path / "raw")) for s in read_shard(p)}
    assert sorted(m.get("url") or "" for m in metas.values()) == ["", "http://example.com/4.jpg"]


def _crafted_shard(raw, folder, members_by_index: dict[int, bytes]):
    """raw's samples in one shard, json member i replaced by members_by_index[i]."""
    from contract.shards import ShardWriter

    samples = [s for p in list_shards(str(raw)) for s in read_shard(p)]
    w = ShardWriter(str(folder), 0, "ingest")
    for i, s in enumerate(samples):
        members = dict(s.members)
        if i in members_by_index:
            members["json"] = members_by_index[i]
        w.write(s.key, members)
        w.add_row(ledger.row(s.key, s.input_id))
    w.close()
    return [s.key for s in samples]


@pytest.mark.slow  # four stages end to end
def test_hostile_json_members_are_rows_in_ingest_filter_recaption_encode(raw, tmp_path, tiny_model):
    crafted = tmp_path / "crafted"
    keys = _crafted_shard(raw, crafted, dict(enumerate(HOSTILE_JSON.values())))
    hostile = set(keys[:len(HOSTILE_JSON)])

    def check(out):
        table = ledger.read_folder(str(out)).to_pylist()
        by_key = {r["key"]: r for r in table}
        # the 50 MB json is refused by the reader's member cap before it is read; the others do not parse
        bad = [r for r in table if r["reason"] in ("bad_member", "member_too_large")]
        assert len(bad) == 4, table
        assert sorted(r["reason"] for r in bad) == ["bad_member"] * 3 + ["member_too_large"], table
        kept = {s.key for p in list_shards(str(out)) for s in read_shard(p)}
        assert len(kept) == len(keys) - 4 and not kept & hostile
        for p in list_shards(str(out)):
            for s in read_shard(p):
                s.meta()  # every json written is valid, capped JSON
        return by_key

    # ingest of a webdataset shard
    assert prx_data(["ingest", "--in", str(crafted), "--out", str(tmp_path / "i"), *LOCAL]) == 0
    check(tmp_path / "i")
    # filter (scan and apply), recaption, encode
    assert prx_data(["filter", "--in", str(crafted), "--out", str(tmp_path / "f"), *LOCAL,
                     "--dedup", "exact", "--write-rejected", str(tmp_path / "rej")]) == 0
    check(tmp_path / "f")
    assert prx_data(["recaption", "--in", str(crafted), "--out", str(tmp_path / "r"), *LOCAL,
                     "--backend", "fake", "--relax-checks", "language"]) == 0
    check(tmp_path / "r")
    assert prx_data(["encode", "--in", str(crafted), "--out", str(tmp_path / "e"), *LOCAL,
                     "--vae", tiny_model("tiny-flux-vae"), "--text-encoder", tiny_model("tiny-t5gemma"),
                     "--variants", "original"]) == 0
    check(tmp_path / "e")


# ------------------------------------------------------------------------------------- url deadline
def test_url_deadline_cuts_a_header_drip_too():
    """A server that drips its status line and headers: the watchdog shuts the socket down mid-headers (a body
    drip through the whole download stage: test_download.py)."""
    import socket
    import threading
    import time

    from pipeline.download import net

    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(1)
    stop = threading.Event()

    def serve():
        conn, _ = listener.accept()
        try:
            for b in b"HTTP/1.0 200 OK\r\nContent-Type: image/jpeg\r\nX-Pad: " + b"a" * 1000:
                if stop.is_set():
                    break
                conn.send(bytes([b]))
                time.sleep(0.1)
        except OSError:
            pass
        finally:
            conn.close()

    t = threading.Thread(target=serve, daemon=True)
    t.start()
    opener = net.build_opener(net.NetPolicy(allow_private_network=True, url_deadline=1.0))
    start = time.monotonic()
    with pytest.raises(net.DownloadRefused) as info:
        opener.open(f"http://127.0.0.1:{listener.getsockname()[1]}/x.jpg", timeout=5).read()
    stop.set()
    listener.close()
    assert info.value.code == "timeout" and net.reason_for(str(info.value)) == "timeout"
    assert time.monotonic() - start < 3


# ------------------------------------------------------------------------------------- config errors
CONFIG_ERRORS = [
    ("python tag", "min_side: !!python/object/apply:os.system ['echo hacked']\n", "min_side",
     "no python tags"),
    ("wrong type", 'min_side: "abc"\n', "min_side", "must be an integer"),
    ("wrong list type", "dedup: 3\n", "dedup", "must be a list of strings"),
    ("key twice", "min_side: 8\nreject_empty_caption: true\nmin_side: 64\n", "min_side", "given twice (lines 1 and 3)"),
]


@pytest.mark.parametrize("name,text,key,expected", CONFIG_ERRORS, ids=[c[0] for c in CONFIG_ERRORS])
def test_config_errors_name_file_and_key(raw, tmp_path, capsys, name, text, key, expected):
    cfg = tmp_path / "bad.yaml"
    cfg.write_text(text)
    assert prx_data(["filter", "--in", str(raw), "--out", str(tmp_path / "f"), *LOCAL, "--config", str(cfg)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("prx-data filter: error: "), err
    assert str(cfg) in err and repr(key) in err and expected in err, err
    assert not (tmp_path / "f").exists()


def test_trainer_config_errors_name_file_and_key(tmp_path, capsys):
    from trainer.cli import main as prx_train

    cfg = tmp_path / "train.yaml"
    cfg.write_text("steps: 10\nlr: fast\nsteps: 20\n")
    assert prx_train(["--config", str(cfg), "--out", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("prx-train: error: ") and str(cfg) in err and "'steps' is given twice" in err, err
    cfg.write_text("steps: 10\nlr: fast\n")
    assert prx_train(["--config", str(cfg), "--out", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert str(cfg) in err and "option 'lr' must be a number, got 'fast'" in err, err


# ------------------------------------------------------------------------------------- 0-token prompt
def _no_special_tokens(folder, out):
    """A copy of a text encoder whose tokenizer adds no special tokens ("" becomes 0 tokens) and drops zero-width
    spaces in its normaliser (as many tokenizers drop characters), so a caption of them is 0 tokens too."""
    import shutil

    shutil.copytree(folder, out)
    tok = json.loads((out / "tokenizer.json").read_text())
    tok["post_processor"] = None
    tok["normalizer"] = {"type": "Replace", "pattern": {"String": "\u200b"}, "content": ""}
    (out / "tokenizer.json").write_text(json.dumps(tok))
    return out


def test_text_encoder_without_special_tokens(raw, tmp_path, tiny_model):
    from safetensors.torch import load_file

    from contract.encoders.text import load_text_encoder
    from contract.shards import ShardWriter

    enc = _no_special_tokens(tiny_model("tiny-t5gemma"), tmp_path / "t5-plain")
    assert load_text_encoder(str(enc)).count_tokens(["", "\u200b\u200b", "a photo"])[:2] == [0, 0]
    # one sample whose only caption is a zero-width space: not blank to str.strip(), 0 tokens to the tokenizer
    samples = [s for p in list_shards(str(raw)) for s in read_shard(p)]
    w = ShardWriter(str(tmp_path / "in"), 0, "ingest")
    for i, s in enumerate(samples[:4]):
        w.write(s.key, {**s.members, "txt": "\u200b".encode() if i == 0 else s.members["txt"]})
        w.add_row(ledger.row(s.key, s.input_id))
    w.close()
    assert prx_data(["encode", "--in", str(tmp_path / "in"), "--out", str(tmp_path / "e"), *LOCAL,
                     "--vae", tiny_model("tiny-flux-vae"), "--text-encoder", str(enc), "--variants", "original",
                     "--cleaning", "none"]) == 0
    rows = {r["key"]: r for r in ledger.read_folder(str(tmp_path / "e")).to_pylist()}
    first = rows[samples[0].key]
    assert (first["outcome"], first["reason"]) == ("rejected", "no_caption_variant")
    assert "0 tokens for the text encoder: original" in first["detail"]
    assert [rows[s.key]["outcome"] for s in samples[1:4]] == ["kept"] * 3
    empty = load_file(str(tmp_path / "e" / "_empty_prompt.safetensors"))["hidden"]
    assert empty.shape[0] == 1 and empty.shape[1] > 0  # one eos token stands for the empty prompt


# ------------------------------------------------------------------------------------- model loading errors
MISSING = "prx-tests/not-in-any-cache"  # a hub id that no cache holds; the hub is offline in tests


def _model_error(capsys, prog: str, flag: str, model_id: str):
    err = capsys.readouterr().err.splitlines()[-1]  # (tiny models built on first use print progress first)
    assert err.startswith(f"{prog}: error: {flag} "), err
    assert model_id in err and "revision" in err and f"hf download {model_id} --revision" in err, err
    assert "HF_TOKEN" in err and f"point {flag} at a local folder" in err and "HF_HUB_OFFLINE=1" in err, err
    assert "Traceback" not in err


def test_recaption_model_missing_offline_says_what_to_do(raw, tmp_path, capsys):
    assert os.environ.get("HF_HUB_OFFLINE") == "1"
    assert prx_data(["recaption", "--in", str(raw), "--out", str(tmp_path / "r"), *LOCAL, "--backend",
                     "transformers", "--model", "qwen2-vl"]) == 2
    from contract.models import resolve

    _model_error(capsys, "prx-data recaption", "--model", resolve("qwen2-vl").id)


@pytest.mark.parametrize("flag", ["--vae", "--text-encoder", "--repa"])
def test_encode_model_flags_missing_offline_say_what_to_do(raw, tmp_path, capsys, tiny_model, flag):
    models = {"--vae": tiny_model("tiny-flux-vae"), "--text-encoder": tiny_model("tiny-t5gemma"),
              "--repa": tiny_model("tiny-dinov2"), flag: MISSING}
    argv = ["encode", "--in", str(raw), "--out", str(tmp_path / "e"), *LOCAL, "--variants", "original"]
    assert prx_data(argv + [x for kv in models.items() for x in kv]) == 2
    _model_error(capsys, "prx-data encode", flag, MISSING)


def test_filter_and_audit_model_flags_missing_offline(raw, tmp_path, capsys):
    assert prx_data(["filter", "--in", str(raw), "--out", str(tmp_path / "f"), *LOCAL,
                     "--clip-model", "hf-hub:" + MISSING]) == 2
    _model_error(capsys, "prx-data filter", "--clip-model", MISSING)
    assert prx_data(["audit", str(raw), "--text-encoder", MISSING, *LOCAL]) == 2
    _model_error(capsys, "prx-data audit", "--text-encoder", MISSING)


def test_gated_and_local_folder_messages():
    from contract.models import ModelSpec, model_error

    gated = model_error(ModelSpec("flux1", "black-forest-labs/FLUX.1-dev", "abc123"), "--vae",
                        OSError("401 Client Error"))
    assert "is gated" in str(gated) and "HF_TOKEN" in str(gated)
    assert "hf download black-forest-labs/FLUX.1-dev --revision abc123" in str(gated)
    local = model_error(ModelSpec("./m", "/nonexistent/m", kind="local"), "--model", OSError("no config.json"))
    assert "cannot load the model folder /nonexistent/m" in str(local) and "hf download" not in str(local)


def test_trainer_model_folder_error_is_a_message(tmp_path):
    from contract.errors import PrxError
    from trainer.model import build_model

    broken = tmp_path / "broken-model"
    broken.mkdir()
    (broken / "config.json").write_text('{"_class_name": "PRXTransformer2DModel"}')
    with pytest.raises(PrxError, match="--model .*broken-model.*cannot load the model folder"):
        build_model(str(broken), 16, 32)


# ------------------------------------------------------------------------------------- corruption property
@pytest.fixture(scope="module")
def encoded_shard(tmp_path_factory, tiny_model):
    """One valid shard holding every member kind (image, txt, json, captions, latent, embeddings)."""
    base = tmp_path_factory.mktemp("corrupt")
    src = _images(base / "src", 3)
    for i in range(3):
        Image.fromarray(np.random.default_rng(i).integers(0, 256, (48, 64, 3), dtype=np.uint8)).save(
            src / f"{i:03d}.png")
    assert _ingest(src, base / "raw") == 0
    assert prx_data(["recaption", "--in", str(base / "raw"), "--out", str(base / "cap"), *LOCAL,
                     "--backend", "fake", "--relax-checks", "language", "--variants", "short"]) == 0
    assert prx_data(["encode", "--in", str(base / "cap"), "--out", str(base / "enc"), *LOCAL,
                     "--vae", tiny_model("tiny-flux-vae"), "--text-encoder", tiny_model("tiny-t5gemma"),
                     "--variants", "original,short", "--resolution", "64"]) == 0
    return (base / "enc" / "000000.tar").read_bytes(), tiny_model


def corrupt(data: bytes, seed: int) -> bytes:
    """A flip, truncation or splice of `data`, chosen by seed."""
    rng = np.random.default_rng(seed)
    kind = seed % 3
    buf = bytearray(data)
    if kind == 0:                                         # flip 1-16 bytes
        for pos in rng.integers(0, len(buf), int(rng.integers(1, 17))):
            buf[pos] ^= int(rng.integers(1, 256))
        return bytes(buf)
    if kind == 1:                                         # truncate
        return bytes(buf[: int(rng.integers(0, len(buf)))])
    a, b = sorted(int(x) for x in rng.integers(0, len(buf), 2))  # splice a chunk of the shard elsewhere
    at = int(rng.integers(0, len(buf)))
    return bytes(buf[:at] + buf[a:b] + buf[at + int(rng.integers(0, 2048)):])


def _every_reader(path: str, out: str, tiny_model, encode_models: bool) -> list[str]:
    """Read one shard through every stage's reader; return the reasons of the rows produced. Encode runs its
    reader and CPU part (`prepare`) always, its models only when `encode_models` (they take most of the time)."""
    from contract import encoded
    from contract.config import build_config
    from contract.shards import BadMember, Problem, Sample, ShardWriter
    from pipeline.stage import Task
    from pipeline.stages import audit, encode, filter as filt, ingest, recaption

    reasons = []
    task = Task(0, [path])

    def run(stage, name):
        w = ShardWriter(os.path.join(out, name), 0, name)
        stage.process(task, w)
        reasons.extend(r.reason for r in w.close().rows)

    run(ingest.IngestStage(build_config(ingest.IngestConfig, {"input": os.path.dirname(path)})), "ingest")
    fcfg = build_config(filt.FilterConfig, {"input": path, "min_side": 8, "reject_empty_caption": True,
                                            "dedup": ["exact", "perceptual"]})
    scanned = filt.FilterStage(fcfg).scan(task)
    reasons.extend(r[0] for rs in scanned.column("reasons").to_pylist() for r in json.loads(rs))
    run(recaption.RecaptionStage(build_config(recaption.RecaptionConfig, {
        "input": path, "out": os.path.join(out, "cap"), "backend": "fake", "relax_checks": ["language"],
        "variants": ["short"]})), "cap")
    encoder = encode.EncodeStage(build_config(encode.EncodeConfig, {
        "input": path, "out": os.path.join(out, "enc"), "vae": tiny_model("tiny-flux-vae"),
        "text_encoder": tiny_model("tiny-t5gemma"), "variants": ["original", "short"], "resolution": 64}))
    if encode_models:
        run(encoder, "enc")
    else:
        for item in encoder.samples(task):
            done = item if isinstance(item, Problem) else encoder.prepare(item).done
            reasons.append(done.reason if isinstance(done, Problem) else done.row.reason if done else "")
    auditor = audit.AuditStage(build_config(audit.AuditConfig, {"dirs": [os.path.dirname(path)]}))
    auditor.scan(auditor.plan()[0])
    for item in read_shard(path):  # the trainer's readers: a bad member is BadMember (the trainer names it)
        if isinstance(item, Problem):
            reasons.append(item.reason)
            continue
        assert isinstance(item, Sample)
        try:
            encoded.encoder_meta(item)
            for v in encoded.available_variants(item):
                encoded.read_embedding(item, v)
            encoded.read_latent(item)
        except BadMember as exc:
            reasons.append(exc.reason)
    return reasons


# the first 25 seeds in make test-fast, all (PRX_CORRUPTION_SEEDS, default 200) in make test
@pytest.mark.parametrize("first,stop", [(0, 25), pytest.param(25, None, marks=pytest.mark.slow)],
                         ids=["seeds-0-24", "seeds-25-on"])
def test_random_corruption_never_escapes_any_stage_reader(encoded_shard, tmp_path, first, stop):
    """Flip, truncate, splice: a few hundred seeds through every stage's reader give rows with known reasons."""
    import shutil

    valid, tiny_model = encoded_shard
    seen: dict[str, int] = {}
    for seed in range(first, stop or int(os.environ.get("PRX_CORRUPTION_SEEDS", 200))):
        folder = tmp_path / f"s{seed}"
        folder.mkdir()
        (folder / "000000.tar").write_bytes(corrupt(valid, seed))
        try:
            reasons = _every_reader(str(folder / "000000.tar"), str(tmp_path / f"o{seed}"), tiny_model,
                                    encode_models=seed % 25 == 0)
        except Exception as exc:  # noqa: BLE001 - the property: nothing escapes
            raise AssertionError(f"seed {seed}: {type(exc).__name__}: {exc}") from exc
        for r in reasons:
            assert r in ledger.REASONS, (seed, r)
            seen[r] = seen.get(r, 0) + 1
        shutil.rmtree(folder)
        shutil.rmtree(tmp_path / f"o{seed}", ignore_errors=True)
    assert {"truncated_tar", "bad_member"} <= set(seen), seen  # the corruption reached both kinds of problem
