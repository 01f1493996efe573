"""Caps on what operators hand the programs: YAML configs and manifests (size, nesting, aliases, quoted values),
numeric flags (bounds, inf and nan), and prx-sample's sizes, prompts files, prompt lengths and --out.

Each refusal is one line, exit 2, before any work."""
from __future__ import annotations

import json
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from pipeline.cli import main as prx_data
from contract.config import MAX_CONFIG_BYTES, QUOTE_CHARS

REPO = Path(__file__).resolve().parent.parent
LOCAL = ["--executor", "local", "--no-progress"]


def alias_chain(levels: int = 9, width: int = 9) -> str:
    """A flow list of `levels` anchored lists, each holding `width` aliases of the one before: width**levels
    values once expanded, from ~300 bytes."""
    items, prev = [], None
    for name in "abcdefghijklmnopqrstuvwxyz"[:levels]:
        body = ",".join(['"x"'] * width) if prev is None else ",".join([f"*{prev}"] * width)
        items.append(f"&{name} [{body}]")
        prev = name
    return "[" + ", ".join(items) + "]"


def _one_line(err: str, prog: str) -> None:
    assert err.count("\n") == 1 and err.startswith(f"{prog}: error: "), err
    assert len(err) < 500, len(err)


# ------------------------------------------------------------------------------------- YAML
BOUNDED_RUN = textwrap.dedent("""
    import contextlib, io, json, resource, sys, time
    import pipeline.runner
    from pipeline.cli import main as prx_data
    from trainer.cli import main as prx_train

    vm = next(int(line.split()[1]) * 1024 for line in open("/proc/self/status") if line.startswith("VmSize:"))
    resource.setrlimit(resource.RLIMIT_AS, (vm + (512 << 20), vm + (512 << 20)))
    out = []
    for main, argv in json.loads(sys.argv[1]):
        err, start = io.StringIO(), time.perf_counter()
        with contextlib.redirect_stderr(err):
            try:
                rc = {"prx-data": prx_data, "prx-train": prx_train}[main](argv)
            except BaseException as exc:  # MemoryError, SystemExit, ...
                rc = type(exc).__name__
        out.append({"rc": rc, "err": err.getvalue()[:5000], "seconds": time.perf_counter() - start})
    print(json.dumps(out))
""")


@pytest.mark.slow  # three programs in a memory-bounded subprocess
def test_an_alias_chain_is_refused_fast_in_bounded_memory(tmp_path, photo_folder):
    """A ~300-byte file whose 9-level alias chain expands to 387 million values: a stage's --config, prx-train's
    --config and a prx-data run manifest each refuse it in a moment, with 512 MiB of address space to spare."""
    bomb = alias_chain()
    assert len(f"dedup: {bomb}\n") < 320
    (tmp_path / "filter.yaml").write_text(f"dedup: {bomb}\n")
    (tmp_path / "train.yaml").write_text(f"shards: {bomb}\n")
    (tmp_path / "run.yaml").write_text(f"root: {tmp_path / 'root'}\nstages:\n- ingest: {{in: {photo_folder}}}\n"
                                       f"- filter: {{dedup: {bomb}}}\n")
    calls = [("prx-data", ["filter", "--in", str(photo_folder), "--out", str(tmp_path / "f"), *LOCAL,
                           "--config", str(tmp_path / "filter.yaml")]),
             ("prx-train", ["--config", str(tmp_path / "train.yaml"), "--out", str(tmp_path / "t")]),
             ("prx-data", ["run", str(tmp_path / "run.yaml"), "--executor", "local", "--dry-run"])]
    done = subprocess.run([sys.executable, "-c", BOUNDED_RUN, json.dumps(calls)], cwd=REPO, capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    for (prog, argv), result in zip(calls, json.loads(done.stdout)):
        assert result["rc"] == 2, (argv, result)
        _one_line(result["err"], prog + (f" {argv[0]}" if prog == "prx-data" else ""))
        assert "more than 100,000 values once aliases" in result["err"], result
        assert result["seconds"] < 3, result
    assert not (tmp_path / "f").exists() and not (tmp_path / "root").exists()


def test_yaml_nested_500_deep_is_a_one_line_error(tmp_path, photo_folder, capsys):
    from trainer.cli import main as prx_train

    deep = tmp_path / "deep.yaml"
    deep.write_text("dedup: " + "[" * 500 + "]" * 500 + "\n")
    assert prx_data(["filter", "--in", str(photo_folder), "--out", str(tmp_path / "f"), *LOCAL,
                     "--config", str(deep)]) == 2
    err = capsys.readouterr().err
    _one_line(err, "prx-data filter")
    assert str(deep) in err and "nested more than 32 levels deep" in err, err
    deep.write_text("shards: " + "[" * 500 + "]" * 500 + "\n")
    assert prx_train(["--config", str(deep), "--out", str(tmp_path / "t")]) == 2
    _one_line(capsys.readouterr().err, "prx-train")


def test_error_messages_quote_a_few_hundred_characters_of_a_value(tmp_path, photo_folder, capsys):
    long = "y" * 100_000
    cases = [(f'min_side: "{long}"\n', "option 'min_side' must be an integer, got 'yyy"),
             (f"min_side: [{', '.join([long] * 5)}]\n", "option 'min_side' must be an integer, got ['yyy"),
             (f"? {long}\n: 1\n", "unknown option 'yyy")]  # then the valid options
    for text, expected in cases:
        cfg = tmp_path / "long.yaml"
        cfg.write_text(text)
        assert prx_data(["filter", "--in", str(photo_folder), "--out", str(tmp_path / "f"), *LOCAL,
                         "--config", str(cfg)]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and str(cfg) in err and expected in err, err[:1000]
        assert max(map(len, re.findall("y+", err))) < QUOTE_CHARS, err[:1000]
        assert len(err) < 500 or "valid:" in err, err[:1000]


def test_config_files_and_manifests_are_size_capped(tmp_path, photo_folder, capsys):
    big = tmp_path / "big.yaml"
    big.write_text("shard_size: 3\n#" + "x" * MAX_CONFIG_BYTES + "\n")
    assert prx_data(["ingest", "--in", str(photo_folder), "--out", str(tmp_path / "i"), *LOCAL,
                     "--config", str(big)]) == 2
    err = capsys.readouterr().err
    _one_line(err, "prx-data ingest")
    assert f"{big}: larger than {MAX_CONFIG_BYTES:,} bytes" in err, err
    big.write_text(f"root: {tmp_path / 'root'}\nstages:\n- ingest: {{in: {photo_folder}}}\n#"
                   + "x" * MAX_CONFIG_BYTES + "\n")
    assert prx_data(["run", str(big), "--executor", "local", "--dry-run"]) == 2
    assert f"larger than {MAX_CONFIG_BYTES:,} bytes" in capsys.readouterr().err
    assert not (tmp_path / "i").exists() and not (tmp_path / "root").exists()


# ------------------------------------------------------------------------------------- numeric options
def test_a_negative_limit_is_refused_by_every_stage_and_run(tmp_path, photo_folder, capsys):
    out = tmp_path / "i"
    assert prx_data(["ingest", "--in", str(photo_folder), "--out", str(out), *LOCAL, "--limit", "-3"]) == 2
    assert capsys.readouterr().err == "prx-data ingest: error: --limit -3: must be at least 0\n"
    cfg = tmp_path / "limit.yaml"
    cfg.write_text("limit: -3\n")
    assert prx_data(["filter", "--in", str(photo_folder), "--out", str(out), *LOCAL, "--config", str(cfg)]) == 2
    assert capsys.readouterr().err == f"prx-data filter: error: {cfg}: option 'limit' must be at least 0, got -3\n"
    manifest = tmp_path / "run.yaml"
    manifest.write_text(f"root: {tmp_path / 'root'}\nstages:\n- ingest: {{in: {photo_folder}}}\n")
    assert prx_data(["run", str(manifest), "--executor", "local", "--limit", "-3"]) == 2
    assert "--limit -3: must be at least 0" in capsys.readouterr().err
    assert not out.exists() and not (tmp_path / "root").exists()


def _exit_code(main, argv: list[str]) -> int:
    """A CLI's exit status, whether its main returns it or argparse exits."""
    try:
        return main(argv)
    except SystemExit as exc:
        return exc.code


def test_sample_and_eval_flags_are_refused_before_anything_is_read(tmp_path, capsys):
    """--run names no folder: each flag must be refused before the run is even looked at."""
    from trainer.evaluate import main as prx_eval
    from trainer.sample import main as prx_sample

    (tmp_path / "a-file").write_text("")
    base = ["--run", str(tmp_path / "no-run"), "--prompt", "x", "--out", str(tmp_path / "o")]
    cases = [(["--width", "100000"], "--width 100000: larger than --max-side 2048; pass --max-side 100000"),
             (["--height", "4096", "--width", "4096"], "pass --max-side 4096"),
             (["--height", "0"], "--height 0: must be at least 1"),
             (["--cfg", "inf"], "argument --cfg: expected a finite number, got 'inf'"),
             (["--cfg", "nan"], "argument --cfg: expected a finite number, got 'nan'"),
             (["--steps", "-2"], "--steps -2: must be 1 to 1000"),
             (["--seed", "-1"], "--seed -1: must be 0 to 4294967295"),
             (["--out", str(tmp_path / "a-file")], "is a file; pass a folder")]
    for args, message in cases:
        assert _exit_code(prx_sample, [*base, *args]) == 2, args
        err = capsys.readouterr().err
        assert err.splitlines()[-1].startswith("prx-sample: error: ") and message in err, (args, err)
    assert not (tmp_path / "o").exists()
    base = ["--run", str(tmp_path / "no-run"), "--real", str(tmp_path / "no-real"), "--metrics", "cmmd"]
    for args, message in [(["--cfg", "2,inf"], "expected a finite number, got 'inf'"),
                          (["--seed", "-1"], "--seed -1: must be 0 to 4294967295"),
                          (["--steps", "5000"], "--steps 5000: must be 1 to 1000")]:
        assert _exit_code(prx_eval, [*base, *args]) == 2, args
        err = capsys.readouterr().err
        assert err.splitlines()[-1].startswith("prx-eval: error: ") and message in err, (args, err)


def test_a_prompts_file_over_the_cap_is_refused(tmp_path, capsys):
    from trainer.sample import MAX_PROMPTS_BYTES, main

    prompts = tmp_path / "prompts.txt"
    prompts.write_bytes(b"a photo of coffee\n" * (MAX_PROMPTS_BYTES // 18 + 1))
    assert main(["--run", str(tmp_path / "no-run"), "--prompts", str(prompts), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    _one_line(err, "prx-sample")
    assert f"--prompts {prompts}: larger than {MAX_PROMPTS_BYTES:,} bytes; split it" in err, err


# ------------------------------------------------------------------------------------- prompt lengths
def test_long_prompts_are_truncated_to_the_encoder_length_with_a_count(eval_runs, tmp_path, capsys):
    """A prompt over the run's token limit is truncated and counted; a 1 MB one is cut to CHARS_PER_TOKEN x the
    encoder's max length before tokenizing, which keeps the same tokens (the embedding is the uncut one's)."""
    import torch

    from trainer.sample import CHARS_PER_TOKEN, Sampler, main, open_run

    words = " ".join(f"word{i}" for i in range(400))
    huge = "a photo of coffee " * 60_000
    prompts = tmp_path / "prompts.txt"
    prompts.write_text(f"a photo of coffee\n{words}\n{huge}\n")
    out = tmp_path / "out"
    assert main(["--run", eval_runs["a"], "--prompts", str(prompts), "--steps", "1", "--out", str(out),
                 "--device", "cpu"]) == 0
    assert "2 of 3 prompts are longer than 256 tokens" in capsys.readouterr().out
    rows = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    assert [r["truncated"] for r in rows] == [False, True, True]

    sampler = Sampler(open_run(eval_runs["a"]))
    longish = huge[:3 * CHARS_PER_TOKEN * sampler.text_encoder.max_length]
    uncut = sampler.pad(sampler.text_encoder.encode([sampler.text_encoder.clean(longish)]))
    assert all(torch.equal(a, b) for a, b in zip(sampler.embed([longish]), uncut))
    assert sampler.truncated(["a photo", words, longish]) == [False, True, True]
