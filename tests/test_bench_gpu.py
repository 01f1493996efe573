"""bench/gpu.py --dry-run: every GPU section runs its code path on the CPU with tiny shapes and writes the report."""
from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow   # every section of the GPU benchmark, on the CPU

BENCH = Path(__file__).resolve().parent.parent / "bench" / "gpu.py"


def test_gpu_benchmark_dry_run_writes_every_section(tmp_path, capsys):
    spec = importlib.util.spec_from_file_location("bench_gpu", BENCH)
    gpu = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = gpu  # dataclasses look their module up
    spec.loader.exec_module(gpu)
    assert gpu.main(["--dry-run", "--out", str(tmp_path)]) == 0
    doc = json.loads((tmp_path / "gpu.json").read_text())
    assert doc["dry_run"] and set(doc["sections"]) == set(gpu.SECTIONS) == {
        "train", "train-pixel", "encode", "encode-spaces", "decode", "recaption", "sample", "extractors", "fp8"}
    for name, sec in doc["sections"].items():
        assert "error" not in sec and sec["rows"], name
    assert {"date", "device", "torch"} <= set(doc["machine"])
    assert doc["sections"]["fp8"]["rows"][0][1] == "skipped"  # on a CPU: the row says why
    page = (tmp_path / "gpu.md").read_text()
    assert "--dry-run" in page and page.count("| train |") >= 2
