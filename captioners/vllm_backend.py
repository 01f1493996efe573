"""The vLLM backend: offline batch inference with `vllm.LLM.generate`, written against vLLM's documented API.

vllm is an optional extra (it pins its own torch and transformers) and is imported only when an engine is
built, never at module import, so request building and output parsing are testable without it:

- engine: `LLM(model=..., revision=..., limit_mm_per_prompt={"image": 1, "video": 0},
  mm_processor_kwargs={"min_pixels": ..., "max_pixels": ...}, enable_prefix_caching=True, ...)`
- requests: `{"prompt": <chat-formatted text>, "multi_modal_data": {"image": PIL.Image}}`, the instruction
  before the image so every request shares the cached system+instruction prefix;
- one `SamplingParams(temperature, top_p, top_k, presence_penalty, max_tokens, seed, logprobs=0)` per request
  (per-request seeds make retries reproducible);
- outputs: `RequestOutput.outputs[0]` with `.text`, `.token_ids`, `.finish_reason` ("stop"/"length"),
  `.cumulative_logprob` and `.logprobs` (None unless requested).
"""
from __future__ import annotations

import math
from typing import Any, Callable

from captioners import sampling as sampling_mod
from captioners.base import (DEFAULT_MAX_PIXELS, DEFAULT_MIN_PIXELS, Backend, BackendUnavailable, Generation,
                             Request)

QWEN_SYSTEM = "You are a helpful assistant."
IMAGE_PLACEHOLDER = "<|vision_start|><|image_pad|><|vision_end|>"


def qwen_chat_prompt(instruction: str, system: str = QWEN_SYSTEM) -> str:
    """The Qwen2-VL / Qwen2.5-VL / Qwen3-VL chat format vLLM's examples use, instruction before the image."""
    return (f"<|im_start|>system\n{system}<|im_end|>\n"
            f"<|im_start|>user\n{instruction}{IMAGE_PLACEHOLDER}<|im_end|>\n"
            f"<|im_start|>assistant\n")


def vllm_available() -> tuple[bool, str]:
    """(usable, why not): vllm importable and a CUDA GPU present."""
    import importlib.util

    if importlib.util.find_spec("vllm") is None:
        return False, "vllm is not installed (optional extra: pip install -e '.[vllm]' in a separate GPU venv)"
    try:
        import torch

        if not torch.cuda.is_available():
            return False, "no CUDA GPU is visible"
    except Exception as exc:  # noqa: BLE001
        return False, f"torch unavailable: {exc}"
    return True, ""


def engine_kwargs(model_id: str, revision: str | None, *, max_pixels: int, min_pixels: int,
                  max_model_len: int = 8192, gpu_memory_utilization: float = 0.9, seed: int = 0,
                  dtype: str = "auto", max_num_seqs: int | None = None) -> dict[str, Any]:
    """Keyword arguments for `vllm.LLM(...)`."""
    kw: dict[str, Any] = {
        "model": model_id,
        "limit_mm_per_prompt": {"image": 1, "video": 0},
        "mm_processor_kwargs": {"min_pixels": int(min_pixels), "max_pixels": int(max_pixels)},
        "enable_prefix_caching": True,
        "max_model_len": int(max_model_len),
        "gpu_memory_utilization": float(gpu_memory_utilization),
        "seed": int(seed),
        "dtype": dtype,
    }
    if revision and revision != "main":
        kw["revision"] = revision
    if max_num_seqs:
        kw["max_num_seqs"] = int(max_num_seqs)
    return kw


def build_request(req: Request, chat_prompt: Callable[[str], str] = qwen_chat_prompt) -> dict[str, Any]:
    """One vLLM prompt dict (TextPrompt with multi_modal_data)."""
    return {"prompt": chat_prompt(req.prompt), "multi_modal_data": {"image": req.image}}


def sampling_kwargs(sampling: dict[str, Any], req: Request, want_logprobs: bool = True) -> dict[str, Any]:
    """Keyword arguments for one `vllm.SamplingParams(...)`."""
    kw = dict(sampling)
    kw["max_tokens"] = int(req.max_new_tokens)
    kw["seed"] = int(req.seed)
    kw["skip_special_tokens"] = True
    if want_logprobs:
        kw["logprobs"] = 0  # the sampled token's logprob only
    return kw


def parse_output(request_output: Any, seed: int | None = None) -> Generation:
    """vllm RequestOutput -> Generation (uses only documented attributes)."""
    out = request_output.outputs[0]
    token_ids = list(out.token_ids or [])
    n = len(token_ids)
    finish = out.finish_reason or "length"
    if finish not in ("stop", "length"):
        finish = str(finish)
    mean = None
    cum = getattr(out, "cumulative_logprob", None)
    if cum is not None and n and math.isfinite(cum):
        mean = float(cum) / n
    elif getattr(out, "logprobs", None) and n:
        vals = []
        for tok, step in zip(token_ids, out.logprobs):
            lp = step.get(tok) if isinstance(step, dict) else None
            vals.append(getattr(lp, "logprob", lp) if lp is not None else None)
        if vals and all(v is not None and math.isfinite(v) for v in vals):
            mean = float(sum(vals)) / len(vals)
    return Generation(text=out.text, num_tokens=n, finish_reason=finish, mean_logprob=mean, seed=seed,
                      extra={"stop_reason": getattr(out, "stop_reason", None)})


class VLLMBackend(Backend):
    name = "vllm"

    def __init__(self, model: str, *, sampling: dict[str, Any] | None = None, max_pixels: int = DEFAULT_MAX_PIXELS,
                 min_pixels: int = DEFAULT_MIN_PIXELS, max_model_len: int = 8192,
                 gpu_memory_utilization: float = 0.9, seed: int = 0, dtype: str = "auto",
                 chat_prompt: Callable[[str], str] = qwen_chat_prompt, llm: Any = None,
                 sampling_params_cls: Any = None):
        """`llm` / `sampling_params_cls` inject an engine and params class (tests); otherwise vllm is imported."""
        from pipeline.models import resolve

        self.spec = resolve(model)
        self._sampling = sampling_mod.effective("vllm", sampling)
        self.max_pixels, self.min_pixels = int(max_pixels), int(min_pixels)
        self.chat_prompt = chat_prompt
        self.engine_kwargs = engine_kwargs(self.spec.id, self.spec.revision if not self.spec.is_local else None,
                                           max_pixels=max_pixels, min_pixels=min_pixels, max_model_len=max_model_len,
                                           gpu_memory_utilization=gpu_memory_utilization, seed=seed, dtype=dtype)
        if llm is None or sampling_params_cls is None:
            ok, why = vllm_available()
            if not ok:
                raise BackendUnavailable(f"vllm backend unavailable: {why}; use --backend transformers")
            import vllm

            llm = llm or vllm.LLM(**self.engine_kwargs)
            sampling_params_cls = sampling_params_cls or vllm.SamplingParams
        self.llm, self.params_cls = llm, sampling_params_cls

    def model_info(self) -> dict[str, Any]:
        return {"name": self.spec.name, "id": self.spec.id, "revision": self.spec.revision}

    def sampling(self) -> dict[str, Any]:
        return dict(self._sampling)

    def build(self, requests: list[Request]) -> tuple[list[dict[str, Any]], list[Any]]:
        prompts = [build_request(r, self.chat_prompt) for r in requests]
        params = [self.params_cls(**sampling_kwargs(self._sampling, r)) for r in requests]
        return prompts, params

    def generate(self, requests: list[Request]) -> list[Generation]:
        if not requests:
            return []
        prompts, params = self.build(requests)
        outputs = self.llm.generate(prompts, sampling_params=params, use_tqdm=False)
        if len(outputs) != len(requests):
            raise RuntimeError(f"vllm returned {len(outputs)} outputs for {len(requests)} requests")
        return [parse_output(o, r.seed) for o, r in zip(outputs, requests)]
