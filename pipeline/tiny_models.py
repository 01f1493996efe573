"""`prx-data dev tiny-models DIR`: seeded tiny random models of the real classes, saved to folders.

Tests load them back through `contract.models.resolve` + the class's `from_pretrained` (the path real
models take). The builders live in `testing/tiny_models.py` and register themselves here by name when that
module is imported (BUILDER_MODULES); nothing is committed output, everything is rebuilt from a seed.
"""
from __future__ import annotations

import os
from typing import Callable

# name -> builder(folder, seed). Builders write a folder loadable like the real model's hub repo.
BUILDERS: dict[str, Callable[[str, int], None]] = {}


def register(name: str):
    def deco(fn: Callable[[str, int], None]):
        BUILDERS[name] = fn
        return fn
    return deco


def _load_builders() -> None:
    """Modules that define builders register themselves on import."""
    import importlib

    for module in BUILDER_MODULES:
        importlib.import_module(module)


# Modules holding `@register` builders: the project's live in testing/tiny_models.py; add a module here only
# for builders that cannot live there.
BUILDER_MODULES: list[str] = ["testing.tiny_models"]


def build(folder: str, names: list[str] | None = None, seed: int = 0) -> dict[str, str]:
    """Build the named tiny models (all by default) into folder/NAME; returns name -> path."""
    _load_builders()
    names = names or sorted(BUILDERS)
    unknown = set(names) - set(BUILDERS)
    if unknown:
        raise KeyError(f"unknown tiny model(s) {sorted(unknown)}; known: {sorted(BUILDERS)}")
    out = {}
    for name in names:
        path = os.path.join(folder, name)
        if not os.path.exists(os.path.join(path, ".complete")):
            os.makedirs(path, exist_ok=True)
            BUILDERS[name](path, seed)
            open(os.path.join(path, ".complete"), "w").close()
        out[name] = path
    return out
