"""The filters of `prx-data filter`: one line each, `module:Class`, in the order they run (within each kind:
caption checks, then size and pixel checks, then scores; see filters/base.py). Their options become the stage's
flags in this order. Dedup is the stage's own global step (filters/dedup.py holds its search).

Adding a filter: a new file in filters/ with a `Check` or `ScoreFilter` subclass, and its line here.
"""
from __future__ import annotations

import importlib

FILTERS: list[str] = [
    "filters.clip:ClipScore",
    "filters.image_checks:MinSide",
    "filters.image_checks:AspectRatio",
    "filters.image_checks:Pixels",
    "filters.image_checks:FileSize",
    "filters.image_checks:NearBlank",
    "filters.text_checks:CaptionLength",
    "filters.text_checks:Language",
    "filters.laion_heads:AestheticHead",
    "filters.laion_heads:NsfwHead",
]


def load(entries: list[str] | None = None) -> list[type]:
    """The filter classes of the registry (or of `entries`), imported."""
    classes = []
    for entry in FILTERS if entries is None else entries:
        module, _, name = entry.partition(":")
        classes.append(getattr(importlib.import_module(module), name))
    return classes
