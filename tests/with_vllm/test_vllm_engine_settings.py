"""The vLLM engine's settings per platform (no vllm needed: these run in the main suite too)."""
from __future__ import annotations

from captioners import vllm_backend as vb

BUDGET = {"max_pixels": 1024 * 28 * 28, "min_pixels": 4 * 28 * 28}


def test_cpu_prefills_whole_prompts_in_float32_with_a_stated_kv_cache(monkeypatch):
    monkeypatch.delenv("VLLM_CPU_KVCACHE_SPACE", raising=False)
    kw = vb.engine_kwargs("Qwen/Qwen2-VL-7B-Instruct", None, platform="cpu", max_model_len=8192, **BUDGET)
    # a seeded request's prefill is never split over steps (vLLM would rewind a CPU generator and die), and one
    # step's token budget holds the longest prompt the engine accepts
    assert kw["enable_chunked_prefill"] is False and kw["max_num_batched_tokens"] >= kw["max_model_len"] == 8192
    assert kw["dtype"] == "float32"  # as the transformers backend on CPU; vLLM's auto would be bfloat16
    assert kw["kv_cache_memory_bytes"] == vb.CPU_KV_CACHE_GIB << 30 and "gpu_memory_utilization" not in kw
    assert kw["mm_processor_kwargs"] == {"size": {"shortest_edge": 3136, "longest_edge": 802816}}
    assert vb.engine_kwargs("m", None, platform="cpu", dtype="bfloat16", **BUDGET)["dtype"] == "bfloat16"


def test_cpu_kv_cache_from_vllms_own_variable(monkeypatch):
    monkeypatch.setenv("VLLM_CPU_KVCACHE_SPACE", "2")
    assert "kv_cache_memory_bytes" not in vb.engine_kwargs("m", None, platform="cpu", **BUDGET)  # vLLM reads it


def test_gpu_keeps_vllms_scheduling_and_the_memory_fraction_asked_for():
    kw = vb.engine_kwargs("m", "abc", platform="cuda", gpu_memory_utilization=0.5, **BUDGET)
    assert kw["gpu_memory_utilization"] == 0.5 and kw["dtype"] == "auto" and kw["revision"] == "abc"
    assert not {"enable_chunked_prefill", "max_num_batched_tokens", "kv_cache_memory_bytes"} & set(kw)
