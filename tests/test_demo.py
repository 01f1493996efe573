"""`make demo`: the pipeline manifest, then training; every output it lists exists."""
from __future__ import annotations

import json
import re

import pytest

from demo.main import STEPS, TINY_MODELS, main

pytestmark = pytest.mark.slow   # the whole pipeline, training, sampling, evaluation and export


def test_demo_runs_end_to_end_and_every_listed_output_exists(tmp_path, capsys, tiny_model):
    base = tmp_path / "demo"
    # the session's tiny models (the same builder, the same seed): the demo finds them complete and builds none
    (base / "tiny-models").mkdir(parents=True)
    for name in TINY_MODELS:
        (base / "tiny-models" / name).symlink_to(tiny_model(name), target_is_directory=True)
    assert main([str(base)]) == 0
    out = capsys.readouterr().out
    listing = out.split("Demo outputs", 1)[1]
    assert "meaningless" in listing and "with real models: prx-data run manifests/pipelines/example-laion.yaml" \
        in listing
    paths = re.findall(r"^  \S.*?\s{2,}(/\S+)$", listing, flags=re.M)
    assert len(paths) >= len(STEPS) + 8
    missing = [p for p in paths if not (tmp_path / p).exists()]
    assert not missing, f"the demo lists outputs that do not exist: {missing}"
    run = json.loads((base / "_run.json").read_text())
    assert run["status"] == "complete" and run["funnel"]["balanced"] and run["gates"][0]["passed"]
    assert [r["stage"] for r in run["stages"]] == ["01-download", "02-filter", "03-recaption", "04-encode",
                                                   "05-audit"]
    assert run["stages"][0]["in"] == 6 and run["stages"][3]["kept"] > 0
    assert "127.0.0.1" in out and "http://" not in out.replace("http://127.0.0.1", "")
