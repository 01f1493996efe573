"""The backend interface every captioner implements.

A backend turns a list of `Request`s (an RGB image, an instruction, a token budget, a seed) into one
`Generation` per request, in order. Backends know nothing of shards, ledgers or runners; the recaption
stage (`pipeline/stages/recaption.py`) batches requests, runs the checks and records provenance.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

# Qwen2-VL merges 2x2 patches of 14 px: one vision token covers 28x28 pixels. A 1024x1024 image then costs
# 1024*1024/(28*28) ~ 1337 tokens; the default budget below caps every image at ~1024 vision tokens.
PIXELS_PER_VISION_TOKEN = 28 * 28
DEFAULT_MAX_PIXELS = 1024 * PIXELS_PER_VISION_TOKEN   # 802,816 pixels ~ 1024 vision tokens
DEFAULT_MIN_PIXELS = 4 * PIXELS_PER_VISION_TOKEN      # the processor's own floor (56x56)
# The Qwen-VL image processors (transformers' smart_resize, which vLLM also runs) raise on a longer/shorter side
# ratio above 200, failing the whole request list: such images must be refused before they reach a backend.
MAX_ASPECT_RATIO = 200


@dataclass
class Request:
    image: Any                 # PIL.Image.Image, RGB, already decoded (and resized within the pixel budget)
    prompt: str                # the instruction text (placed before the image in the chat turn)
    max_new_tokens: int
    seed: int
    variant: str = ""          # caption variant name (long, short, ...), informational
    key: str = ""              # sample key, informational (logging, fakes)


@dataclass
class Generation:
    text: str
    num_tokens: int                    # generated tokens, EOS included when produced
    finish_reason: str                 # "stop" (EOS) | "length" (hit max_new_tokens) | backend-specific
    mean_logprob: float | None = None  # mean log-probability of the generated tokens; None when not returned
    seed: int | None = None            # the seed the backend actually used for this request
    extra: dict[str, Any] = field(default_factory=dict)


class Backend:
    """Interface. Subclasses set `name` and implement `generate`."""

    name: str = "base"

    def model_info(self) -> dict[str, Any]:
        """{"name", "id", "revision"} of the model actually loaded."""
        raise NotImplementedError

    def sampling(self) -> dict[str, Any]:
        """The sampling parameters this backend actually passes (max_new_tokens and seed are per request)."""
        raise NotImplementedError

    def generate(self, requests: list[Request]) -> list[Generation]:
        raise NotImplementedError

    def close(self) -> None:
        pass


class BackendUnavailable(RuntimeError):
    """The backend cannot run here (package missing, no GPU); the message says what to install or use."""
