"""`make demo` runs end to end (what exists so far) and says where its outputs are."""
from __future__ import annotations

import json

from pipeline.demo import run


def test_demo_runs_end_to_end(tmp_path, capsys):
    assert run([str(tmp_path / "demo")]) == 0
    out = capsys.readouterr().out
    assert "Demo outputs:" in out
    assert (tmp_path / "demo" / "raw" / "_stage.json").exists()
    assert (tmp_path / "demo" / "raw.html").exists()
    for folder in ("filtered", "captioned", "encoded"):
        assert json.loads((tmp_path / "demo" / folder / "_stage.json").read_text())["status"] == "complete"
    assert (tmp_path / "demo" / "audit.html").exists()
    assert list((tmp_path / "demo" / "train-run" / "checkpoints").iterdir()), "the train step saved a checkpoint"
