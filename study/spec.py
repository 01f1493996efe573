"""The study file (manifests/studies/*.yaml), read and checked before any training.

    name: demo
    shards: ../../demo-out/04-encode        # every arm's training data (an arm may name its own)
    train: {model: tiny, steps: 4, ...}     # prx-train options every run shares (flat TrainConfig keys)
    eval_every: 2                           # evaluate every N steps (and the last step): the shared steps
    eval:   {real: ..., n: 4, metrics: [cmmd, dino_mmd, clip_score], cfg: [3.5], steps: 4, ...}  # prx-eval options
    prompts: [a cat, a rocket]              # the fixed prompts of the report's image grid
    baseline: {overlay: ../train/base.yaml, seeds: [0, 1, 2]}
    arms:
      - {name: muon, overlay: ../ablations/muon.yaml}              # seeds: [0] unless given
      - {name: flux2, overlay: ../ablations/vae-flux2.yaml, shards: ../../enc-flux2}

Relative paths (shards, overlay, and any `train`/`eval` value starting with ./ or ../) are relative to the
study file. Refused here, one line each naming the fix: a missing or unknown overlay, duplicate arm names, an
arm setting its own real set or eval options (every arm is judged on the same ones), options prx-train or
prx-eval do not know, and an arm whose shards do not fit its overlay (checked by prx-train's own config and
data checks before any run starts; plan.check_runs).
"""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from typing import Any

from contract.errors import PrxError

BASELINE = "baseline"
DEFAULT_BASELINE_SEEDS = (0, 1, 2)
TOP_KEYS = {"name", "shards", "train", "eval_every", "eval", "prompts", "baseline", "arms", "executor", "notes"}
ARM_KEYS = {"name", "overlay", "seeds", "shards", "train"}


class StudyError(PrxError):
    pass


@dataclass
class Arm:
    name: str
    overlay: str                         # absolute path of the overlay YAML
    seeds: list[int]
    shards: str                          # absolute path
    train: dict[str, Any] = field(default_factory=dict)   # this arm's extra prx-train options

    def digest(self, study: "Study") -> str:
        """What a run of this arm depends on: changed -> the arm's runs are stale."""
        doc = {"overlay": self.overlay, "overlay_text": _read(self.overlay), "shards": self.shards,
               "train": {**study.train, **self.train}, "eval": study.eval, "eval_every": study.eval_every}
        return hashlib.sha256(json.dumps(doc, sort_keys=True, default=str).encode()).hexdigest()[:16]


@dataclass
class Study:
    path: str
    name: str
    train: dict[str, Any]
    eval: dict[str, Any]
    eval_every: int
    prompts: list[str]
    arms: list[Arm]                      # the baseline first

    @property
    def baseline(self) -> Arm:
        return self.arms[0]

    @property
    def steps(self) -> int:
        return int(self.train["steps"])

    def eval_steps(self) -> list[int]:
        every = self.eval_every or self.steps
        return sorted({*range(every, self.steps + 1, every), self.steps})


def _read(path: str) -> str:
    with open(path) as fh:
        return fh.read()


def _rel(value: Any, here: str) -> Any:
    if isinstance(value, str) and value.startswith(("./", "../")):
        return os.path.normpath(os.path.join(here, value))
    return value


def _overlay(value: Any, here: str, who: str) -> str:
    if not isinstance(value, str) or not value:
        raise StudyError(f"{who}: `overlay:` must name a YAML file, e.g. ../ablations/muon.yaml")
    path = os.path.normpath(os.path.join(here, value))
    if not os.path.isfile(path):
        raise StudyError(f"{who}: overlay {value} not found (resolved to {path}); overlays live in "
                         "manifests/ablations/, paths are relative to the study file")
    return path


def _seeds(value: Any, default: tuple[int, ...], who: str) -> list[int]:
    seeds = list(default) if value is None else value
    if not isinstance(seeds, list) or not seeds or not all(isinstance(s, int) and s >= 0 for s in seeds) \
            or len(set(seeds)) != len(seeds):
        raise StudyError(f"{who}: `seeds:` must be a list of distinct integers >= 0, e.g. [0, 1, 2]")
    return seeds


def load(path: str) -> Study:
    import yaml

    if not os.path.isfile(path):
        raise StudyError(f"{path}: no such study file")
    with open(path) as fh:
        raw = yaml.safe_load(fh) or {}
    if not isinstance(raw, dict):
        raise StudyError(f"{path}: a study file is a mapping (name, shards, train, eval, baseline, arms)")
    here = os.path.dirname(os.path.abspath(path))
    unknown = set(raw) - TOP_KEYS
    if unknown:
        raise StudyError(f"{path}: unknown key(s) {sorted(unknown)}; a study has {sorted(TOP_KEYS)}")
    for key in ("shards", "train", "eval", "baseline"):
        if not raw.get(key):
            raise StudyError(f"{path}: `{key}:` is required (see manifests/studies/demo.yaml)")
    train = {k: _rel(v, here) for k, v in raw["train"].items()}
    if "steps" not in train:
        raise StudyError(f"{path}: `train:` must set steps (every arm trains as long)")
    evaluation = {k: _rel(v, here) for k, v in raw["eval"].items()}
    if "real" not in evaluation:
        raise StudyError(f"{path}: `eval:` must set real (the reference shards every arm is judged on)")
    shards = _rel(raw["shards"], here)
    base = raw["baseline"]
    arms = [Arm(BASELINE, _overlay(base.get("overlay"), here, "baseline"),
                _seeds(base.get("seeds"), DEFAULT_BASELINE_SEEDS, "baseline"), shards)]
    for i, a in enumerate(raw.get("arms") or []):
        arms.append(_arm(a, i, here, shards))
    names = [a.name for a in arms]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise StudyError(f"{path}: arm name(s) {dupes} used twice (`{BASELINE}` is the baseline's); give each "
                         "arm its own name")
    every = int(raw.get("eval_every") or 0)
    if every < 0:
        raise StudyError(f"{path}: eval_every must be >= 0 (0 = only the last step)")
    prompts = list(raw.get("prompts") or [])
    return Study(os.path.abspath(path), str(raw.get("name") or os.path.basename(path)), train, evaluation,
                 every, prompts, arms)


def _arm(a: Any, i: int, here: str, shards: str) -> Arm:
    if not isinstance(a, dict) or not a.get("name"):
        raise StudyError(f"arms[{i}]: each arm is a mapping with a name and an overlay")
    who = f"arm {a['name']}"
    if "real" in a or "eval" in a:
        raise StudyError(f"{who}: an arm cannot set its own real set or eval options; every arm is judged on the "
                         "study's `eval:` (move it there, or make a second study)")
    unknown = set(a) - ARM_KEYS
    if unknown:
        raise StudyError(f"{who}: unknown key(s) {sorted(unknown)}; an arm has {sorted(ARM_KEYS)}")
    name = str(a["name"])
    if not name.replace("-", "").replace("_", "").isalnum():
        raise StudyError(f"{who}: arm names are letters, digits, - and _ (they name run folders)")
    own = a.get("shards")
    return Arm(name, _overlay(a.get("overlay"), here, who), _seeds(a.get("seeds"), (0,), who),
               _rel(own, here) if own else shards, {k: _rel(v, here) for k, v in (a.get("train") or {}).items()})
