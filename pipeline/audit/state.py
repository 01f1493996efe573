"""What the audit's map hands its reduce: `AuditParams` (everything that decides the figures) and one group's
mergeable `GroupState`; a shard's states travel between processes as a safetensors blob (`to_bytes` /
`from_bytes`): numpy arrays plus a JSON tensor, never pickle."""
from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass, field, fields
from typing import Any

import numpy as np

from pipeline.audit.sketches import lsh_bands


CLIP_SCALE = 10_000          # CLIP scores are kept as integer counts at 1e-4 resolution


@dataclass
class AuditParams:
    """Everything that decides the figures (hashed into the audit's config)."""

    opening_words: int = 3
    top_k: int = 10
    openings_capacity: int = 10_000
    near_threshold: float = 0.8
    num_perm: int = 64
    shingle: int = 3
    loop_repeats: int = 3
    loop_max_n: int = 8
    distinct_cap: int = 1 << 20
    language: str = "en"
    language_min_confidence: float = 0.5
    language_detector: str = "fasttext"  # filters.language.DETECTORS
    language_sample: int = 0          # 0: every caption; N: the first N non-empty captions per shard and group
    token_limit: int | None = None

    def bands(self) -> tuple[int, int]:
        """(bands, rows) for the LSH, as datasketch's MinHashLSH chooses them."""
        return lsh_bands(self.near_threshold, self.num_perm)


_INT_HISTS = ("words", "tokens")   # int -> captions Counters, stored as [keys, counts] (JSON keys are strings)
_STR_COUNTERS = ("openings", "loop_examples", "refusal_examples", "languages", "models", "prompts")


def _pairs(c: Counter) -> list[list[int]]:
    return [list(c.keys()), list(c.values())]


def _from_pairs(pairs: list[list[int]]) -> Counter:
    return Counter(dict(zip(*pairs)))


@dataclass
class GroupState:
    """One group's mergeable state. Scalars and counters go to JSON, hash arrays to tensors."""

    n: int = 0
    empty: int = 0
    words: Counter = field(default_factory=Counter)           # word count -> captions
    tokens: Counter | None = None                             # token count -> captions (None: no tokenizer)
    over_limit: int = 0
    ttr_sum: float = 0.0
    ngrams: list = field(default_factory=lambda: [0, 0, 0])  # all 1/2/3-grams
    openings: Counter = field(default_factory=Counter)
    openings_error: int = 0
    loops: int = 0
    loop_examples: Counter = field(default_factory=Counter)
    refusals: int = 0
    refusal_examples: Counter = field(default_factory=Counter)
    languages: Counter = field(default_factory=Counter)       # detected code ("" = undetermined) -> captions
    language_checked: int = 0
    wrong_language: int = 0
    clip: dict = field(default_factory=dict)                  # score name -> Counter(round(score*1e4) -> n)
    models: Counter = field(default_factory=Counter)
    prompts: Counter = field(default_factory=Counter)
    arrays: dict = field(default_factory=dict)                # uniq1/2/3, dups (unique uint64), bands (n x b)

    # ---- serialisation (no pickle)
    def meta(self) -> dict[str, Any]:
        d = {f.name: getattr(self, f.name) for f in fields(self) if f.name not in ("arrays", "clip")}
        for name in _INT_HISTS:
            d[name] = None if d[name] is None else _pairs(d[name])
        for name in _STR_COUNTERS:
            d[name] = dict(d[name])
        d["clip"] = {name: _pairs(c) for name, c in self.clip.items()}
        return d

    @classmethod
    def from_meta(cls, d: dict[str, Any], arrays: dict[str, np.ndarray]) -> "GroupState":
        s = cls(**{k: v for k, v in d.items() if k not in (*_INT_HISTS, *_STR_COUNTERS, "clip")})
        for name in _INT_HISTS:
            setattr(s, name, None if d[name] is None else _from_pairs(d[name]))
        for name in _STR_COUNTERS:
            setattr(s, name, Counter(d[name]))
        s.clip = {name: _from_pairs(c) for name, c in d["clip"].items()}
        s.arrays = arrays
        return s


def to_bytes(groups: dict[str, GroupState], extra: dict[str, Any]) -> bytes:
    """One shard's partial state, {group id: GroupState} plus JSON `extra`, as a safetensors blob: the hash
    arrays as tensors, the rest as UTF-8 JSON in the uint8 tensor `meta`."""
    from safetensors.numpy import save

    arrays: dict[str, np.ndarray] = {}
    meta = {"groups": {}, "extra": extra}
    for i, (gid, g) in enumerate(groups.items()):
        meta["groups"][gid] = {"slot": i, "state": g.meta()}
        for name, arr in g.arrays.items():
            arrays[f"g{i}_{name}"] = np.ascontiguousarray(arr)
    arrays["meta"] = np.frombuffer(json.dumps(meta).encode("utf-8"), dtype=np.uint8)
    return save(arrays)


def from_bytes(data: bytes) -> tuple[dict[str, GroupState], dict[str, Any]]:
    """The inverse of `to_bytes` (the safetensors library checks the blob)."""
    from safetensors.numpy import load

    arrays = load(data)
    meta = json.loads(arrays.pop("meta").tobytes().decode("utf-8"))
    out = {}
    for gid, g in meta["groups"].items():
        prefix = f"g{g['slot']}_"
        out[gid] = GroupState.from_meta(g["state"], {k[len(prefix):]: v for k, v in arrays.items()
                                                     if k.startswith(prefix)})
    return out, meta["extra"]
