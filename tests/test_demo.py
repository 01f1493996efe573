"""`make demo` runs end to end (what exists so far) and says where its outputs are."""
from __future__ import annotations

from pipeline.demo import run


def test_demo_runs_end_to_end(tmp_path, capsys):
    assert run([str(tmp_path / "demo")]) == 0
    out = capsys.readouterr().out
    assert "Demo outputs:" in out
    assert (tmp_path / "demo" / "raw" / "_stage.json").exists()
    assert (tmp_path / "demo" / "raw.html").exists()
