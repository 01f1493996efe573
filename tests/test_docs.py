"""The README stays true: every ledger reason code a stage can write is documented there."""
from __future__ import annotations

from pathlib import Path

from pipeline import ledger
from pipeline.cli import _load_stage_modules


def test_every_reason_code_is_in_the_readme():
    _load_stage_modules()  # stages register their codes on import
    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    table = readme.split("## Ledger reason codes", 1)[1]
    missing = [code for code in ledger.REASONS if code and f"| `{code}` |" not in table]
    assert not missing, f"add to README's reason table (prx-data reasons prints it): {missing}"
