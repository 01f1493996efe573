"""Sampling defaults per backend: Qwen's published values for its VL models, never the checkpoint's own
near-greedy `generation_config.json` (some ship temperature 0.01 / top_k 1, which loops on long captions).

| backend | temperature | top_p | top_k | presence_penalty | repetition_penalty |
|---|---|---|---|---|---|
| vllm | 0.7 | 0.8 | 20 | 1.5 | - |
| transformers | 0.7 | 0.8 | 20 | - | 1.05 (transformers has no presence penalty) |
"""
from __future__ import annotations

from typing import Any

DEFAULTS: dict[str, dict[str, Any]] = {
    "vllm": {"temperature": 0.7, "top_p": 0.8, "top_k": 20, "presence_penalty": 1.5},
    "transformers": {"temperature": 0.7, "top_p": 0.8, "top_k": 20, "repetition_penalty": 1.05},
}
KNOWN = ("temperature", "top_p", "top_k", "presence_penalty", "repetition_penalty")
SUPPORTED = {
    "vllm": set(KNOWN),
    "transformers": {"temperature", "top_p", "top_k", "repetition_penalty"},
}


def effective(backend: str, overrides: dict[str, Any] | None = None) -> dict[str, Any]:
    """Defaults for `backend` with the non-None overrides applied; refuses a parameter the backend lacks."""
    base = dict(DEFAULTS.get(backend, DEFAULTS["transformers"]))
    allowed = SUPPORTED.get(backend, set(KNOWN))
    for k, v in (overrides or {}).items():
        if v is None:
            continue
        if k not in allowed:
            raise ValueError(f"the {backend} backend has no {k!r} sampling parameter")
        base[k] = v
    if base.get("temperature", 1.0) <= 0:
        raise ValueError("temperature must be > 0: retries need sampling (greedy would repeat the same caption)")
    return base
