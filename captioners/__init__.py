"""VLM captioners: backends behind one interface (`captioners.base.Backend`), prompts, sampling defaults and
caption checks. Nothing here knows about shards or runners (see pipeline/stages/recaption.py).

Backends by name: `transformers` (captioners.hf), `vllm` (captioners.vllm_backend; optional extra),
`fake` (captioners.fake: deterministic captions for plumbing dry runs and tests), `auto` (vllm when it is
importable and runs on a CUDA GPU, else transformers: on CPU, vLLM's CPU build runs only when asked for by
name), or `module:Class` for your own Backend subclass.
Tests may also `register_backend(name, factory)` in-process.
"""
from __future__ import annotations

import importlib
import itertools
from typing import Any, Callable

_FACTORIES: dict[str, Callable[..., Any]] = {}
_REGISTRATIONS: dict[str, int] = {}  # name -> registration number, part of per-worker cache keys
_REGISTRATION_COUNTER = itertools.count()


def register_backend(name: str, factory: Callable[..., Any]) -> None:
    """factory(model=..., sampling=..., max_pixels=..., min_pixels=..., seed=..., **options) -> Backend."""
    _FACTORIES[name] = factory
    _REGISTRATIONS[name] = next(_REGISTRATION_COUNTER)


def unregister_backend(name: str) -> None:
    _FACTORIES.pop(name, None)
    _REGISTRATIONS.pop(name, None)


def factory_token(name: str) -> str:
    """Identifies what `make_backend(name)` builds, for per-worker model caches (a re-registered name differs)."""
    # A counter, not id(factory): a garbage-collected factory's id can be reused by the next one.
    return f"{name}@{_REGISTRATIONS[name]}" if name in _REGISTRATIONS else name


def resolve_backend_name(name: str) -> str:
    if name != "auto":
        return name
    from captioners.vllm_backend import vllm_available, vllm_platform

    return "vllm" if vllm_available()[0] and vllm_platform() == "cuda" else "transformers"


def known_backend(name: str) -> bool:
    return name in ("auto", "transformers", "vllm", "fake") or name in _FACTORIES or ":" in name


def make_backend(name: str, model: str, **opts: Any):
    """Build a backend by name. Options a backend does not take are dropped (documented per backend)."""
    name = resolve_backend_name(name)
    if name in _FACTORIES:
        return _FACTORIES[name](model=model, **opts)
    if name == "transformers":
        from captioners.hf import TransformersBackend

        keep = ("sampling", "max_pixels", "min_pixels", "device", "dtype", "batch_size")
        return TransformersBackend(model, **{k: v for k, v in opts.items() if k in keep})
    if name == "vllm":
        from captioners.vllm_backend import VLLMBackend

        keep = ("sampling", "max_pixels", "min_pixels", "max_model_len", "gpu_memory_utilization", "seed", "dtype")
        return VLLMBackend(model, **{k: v for k, v in opts.items() if k in keep})
    if name == "fake":
        from captioners.fake import FakeBackend

        return FakeBackend(model=model, **opts)
    if ":" in name:
        module, _, attr = name.partition(":")
        return getattr(importlib.import_module(module), attr)(model=model, **opts)
    raise ValueError(f"unknown captioning backend {name!r}: use auto, transformers, vllm, fake or module:Class")
