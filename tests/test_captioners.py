"""captioners/: checks, sampling defaults, prompts, the vLLM request/response layer (without vllm) and the
transformers backend on the tiny Qwen2-VL."""
from __future__ import annotations

import importlib.util
import sys
from types import SimpleNamespace

import numpy as np
import pytest
from PIL import Image

from captioners import checks, prompts, sampling
from captioners.base import Request
from captioners.fake import FakeBackend
from filters.language import detect_language

LONG = checks.CheckConfig(min_words=120, max_words=200)
SHORT = checks.CheckConfig(min_words=5, max_words=25, max_sentences=1)
GOOD_SHORT = "A tabby cat sits on a wooden table near a bright window."


def good_long(seed=0) -> str:
    return FakeBackend().caption(Request(Image.new("RGB", (8, 8), (30, 90, 200)), "p", 400, seed, variant="long"))


def test_default_pixel_budget_is_1024_vision_tokens(tiny_model):
    """With the default budget the captioner's preprocessing brings a 1200 x 1000 photo (1,530 vision tokens of
    28 x 28 px) down to at most 1024 vision tokens, keeping most of them; a 280 x 196 one (70) stays whole."""
    from captioners.hf import TransformersBackend

    backend = TransformersBackend(tiny_model("tiny-qwen2-vl"), batch_size=2)
    big, small = Image.new("RGB", (1200, 1000), (200, 40, 40)), Image.new("RGB", (280, 196), (40, 200, 40))
    grids = backend.encode([Request(big, "Describe this image.", 4, seed=0),
                            Request(small, "Describe this image.", 4, seed=1)])["image_grid_thw"]
    big_tokens, small_tokens = (int(np.prod(thw)) // 4 for thw in grids.tolist())  # 2 x 2 patches merge into one
    assert 0.9 * 1024 < big_tokens <= 1024
    assert small_tokens == 280 * 196 // (28 * 28)


def test_good_captions_pass():
    assert checks.run_checks(GOOD_SHORT, "stop", SHORT, detect_language) is None
    assert checks.run_checks(good_long(), "stop", LONG, detect_language) is None


@pytest.mark.parametrize("text,finish,cfg,reason", [
    ("I'm sorry, but I cannot describe this image for you.", "stop", SHORT, checks.REFUSAL),
    ("As an AI, I am unable to see images but a cat may be there.", "stop", SHORT, checks.REFUSAL),
    (GOOD_SHORT, "length", SHORT, checks.TRUNCATED),
    ("A cat on a mat and a cat on a mat and a cat on a mat and a cat on a mat and a cat on a mat.",
     "stop", SHORT, checks.REPETITION),
    ("the the the the cat sat on the wooden table by the window.", "stop", SHORT, checks.REPETITION),
    ("Un chat tigré est assis sur une table en bois près de la fenêtre ouverte.", "stop", SHORT,
     checks.WRONG_LANGUAGE),
    ("A cat.", "stop", SHORT, checks.LENGTH),
    ("A cat sits on a table. It looks at the window with calm green eyes.", "stop", SHORT, checks.LENGTH),
    ("", "stop", SHORT, checks.LENGTH),
    (GOOD_SHORT, "stop", LONG, checks.LENGTH),
    ("<|im_start|>assistant\nA tabby cat sits on a wooden table near a window.", "stop", SHORT, checks.TEMPLATE),
    ("Sure! Here is a caption: a tabby cat sits on a wooden table.", "stop", SHORT, checks.TEMPLATE),
    ("**A tabby cat** sits on a wooden table near a bright window.", "stop", SHORT, checks.TEMPLATE),
    ("Caption: a tabby cat sits on a wooden table near a bright window.", "stop", SHORT, checks.TEMPLATE),
])
def test_each_check_rejects_crafted_bad_output(text, finish, cfg, reason):
    failure = checks.run_checks(text, finish, cfg, detect_language)
    assert failure is not None and failure.reason == reason, failure


def test_long_loop_caught_by_compression_ratio():
    looped = " ".join(f"The light falls on surface {i % 3} of the calm room." for i in range(20))
    f = checks.check_repetition(looped, "stop", LONG)
    assert f is not None and f.reason == checks.REPETITION


def test_relaxed_checks_skip_by_name_but_empty_always_fails():
    relaxed = checks.CheckConfig(skip=frozenset(checks.CHECK_NAMES))
    assert checks.run_checks("zq xk", "length", relaxed) is None
    assert checks.run_checks("  ", "stop", relaxed).reason == checks.LENGTH
    with pytest.raises(ValueError):
        checks.CheckConfig(skip=frozenset({"spelling"}))


def test_a_check_that_cannot_run_is_an_error_not_a_pass():
    def broken(text):
        raise RuntimeError("model files missing")

    with pytest.raises(checks.CheckError):
        checks.run_checks(GOOD_SHORT, "stop", SHORT, detector=broken)


def test_undetermined_language_fails():
    f = checks.run_checks(GOOD_SHORT, "stop", SHORT, detector=lambda t: (None, 0.0))
    assert f.reason == checks.WRONG_LANGUAGE and "undetermined" in f.detail


def test_sampling_defaults_are_qwens_not_the_checkpoints():
    assert sampling.effective("vllm") == {"temperature": 0.7, "top_p": 0.8, "top_k": 20, "presence_penalty": 1.5}
    assert sampling.effective("transformers") == {"temperature": 0.7, "top_p": 0.8, "top_k": 20,
                                                  "repetition_penalty": 1.05}
    assert sampling.effective("vllm", {"temperature": 0.9, "top_k": None})["temperature"] == 0.9
    with pytest.raises(ValueError, match="presence_penalty"):
        sampling.effective("transformers", {"presence_penalty": 1.0})
    with pytest.raises(ValueError, match="temperature"):
        sampling.effective("vllm", {"temperature": 0})


def test_prompts_are_files_with_hashes(tmp_path):
    p = prompts.load("long")
    assert "160 words" in p.text and len(p.sha256) == 64 and p.provenance()["file"] == "long.txt"
    assert set(prompts.builtin_variants()) >= {"long", "short"}
    (tmp_path / "long.txt").write_text("Describe it.")
    assert prompts.load("long", str(tmp_path)).sha256 != p.sha256
    with pytest.raises(FileNotFoundError):
        prompts.load("haiku")


# ------------------------------------------------------------------------------------------ vLLM, no vllm
class FakeSamplingParams:
    def __init__(self, **kw):
        self.kw = kw


def fake_output(text, token_ids, finish="stop", cumulative=None, logprobs=None):
    return SimpleNamespace(outputs=[SimpleNamespace(text=text, token_ids=token_ids, finish_reason=finish,
                                                    cumulative_logprob=cumulative, logprobs=logprobs,
                                                    stop_reason=None)])


class FakeLLM:
    def __init__(self):
        self.calls = []

    def generate(self, prompts, sampling_params=None, use_tqdm=True):
        self.calls.append((prompts, sampling_params))
        return [fake_output(f"caption {i}", [5, 6, 7], "stop", -3.0) for i, _ in enumerate(prompts)]


def test_vllm_module_does_not_import_vllm():
    import captioners.vllm_backend  # noqa: F401

    if importlib.util.find_spec("vllm") is None:
        assert "vllm" not in sys.modules


def test_vllm_request_building():
    from captioners import vllm_backend as vb

    img = Image.new("RGB", (64, 48))
    req = Request(img, "Describe this image.", 300, seed=42, variant="long")
    d = vb.build_request(req)
    assert set(d) == {"prompt", "multi_modal_data"} and d["multi_modal_data"] == {"image": img}
    prompt = d["prompt"]
    assert prompt.startswith("<|im_start|>system\n") and prompt.endswith("<|im_start|>assistant\n")
    # the instruction comes before the image, so requests share a cacheable prefix
    assert prompt.index("Describe this image.") < prompt.index("<|vision_start|><|image_pad|><|vision_end|>")
    kw = vb.sampling_kwargs(sampling.effective("vllm"), req)
    assert kw == {"temperature": 0.7, "top_p": 0.8, "top_k": 20, "presence_penalty": 1.5, "max_tokens": 300,
                  "seed": 42, "skip_special_tokens": True, "logprobs": 0}
    ek = vb.engine_kwargs("Qwen/Qwen2-VL-7B-Instruct", "abc123", max_pixels=1024 * 28 * 28, min_pixels=3136)
    assert ek["limit_mm_per_prompt"] == {"image": 1, "video": 0}
    assert ek["mm_processor_kwargs"] == {"size": {"shortest_edge": 3136, "longest_edge": 802816}}
    assert ek["enable_prefix_caching"] is True and ek["revision"] == "abc123"


def test_vllm_output_parsing():
    from captioners.vllm_backend import parse_output

    g = parse_output(fake_output("A cat.", [1, 2, 3, 4], "stop", cumulative=-2.0), seed=7)
    assert (g.text, g.num_tokens, g.finish_reason, g.mean_logprob, g.seed) == ("A cat.", 4, "stop", -0.5, 7)
    g = parse_output(fake_output("A ca", (1, 2), "length"))
    assert g.finish_reason == "length" and g.mean_logprob is None
    per_token = [{1: SimpleNamespace(logprob=-1.0)}, {2: SimpleNamespace(logprob=-3.0)}]
    g = parse_output(fake_output("A", [1, 2], "stop", cumulative=None, logprobs=per_token))
    assert g.mean_logprob == -2.0


def test_vllm_backend_with_injected_engine():
    from captioners.vllm_backend import VLLMBackend

    llm = FakeLLM()
    b = VLLMBackend("qwen2-vl-2b", llm=llm, sampling_params_cls=FakeSamplingParams, max_pixels=200_000)
    assert b.model_info()["id"] == "Qwen/Qwen2-VL-2B-Instruct"
    assert b.engine_kwargs["mm_processor_kwargs"]["size"]["longest_edge"] == 200_000
    imgs = [Image.new("RGB", (32, 32), (i, 0, 0)) for i in range(3)]
    gens = b.generate([Request(im, "Say.", 20, seed=i) for i, im in enumerate(imgs)])
    assert [g.text for g in gens] == ["caption 0", "caption 1", "caption 2"]
    prompts_sent, params = llm.calls[0]
    assert len(prompts_sent) == 3 and [p.kw["seed"] for p in params] == [0, 1, 2]
    assert all(p.kw["presence_penalty"] == 1.5 and p.kw["max_tokens"] == 20 for p in params)


def _vllm_skip_reason() -> str | None:
    from captioners.vllm_backend import vllm_available, vllm_platform

    ok, why = vllm_available()
    if ok and vllm_platform() != "cuda":
        return "vLLM runs on CPU here (its CPU build is tested by make test-vllm)"
    return None if ok else why


@pytest.mark.gpu
@pytest.mark.skipif(_vllm_skip_reason() is not None, reason=f"vLLM integration needs vllm and a CUDA GPU: "
                                                            f"{_vllm_skip_reason()}")
def test_vllm_integration_tiny_qwen2_vl(tiny_model):
    from captioners.vllm_backend import VLLMBackend

    b = VLLMBackend(tiny_model("tiny-qwen2-vl"), max_pixels=28 * 28 * 16, max_model_len=1024,
                    gpu_memory_utilization=0.3)
    gens = b.generate([Request(Image.new("RGB", (96, 64), (9, 9, 9)), "Describe.", 8, seed=s) for s in range(2)])
    assert len(gens) == 2 and all(0 < g.num_tokens <= 8 for g in gens)


# ------------------------------------------------------------------------------------------ transformers
@pytest.fixture(scope="module")
def hf_backend(tiny_model):
    from captioners.hf import TransformersBackend

    return TransformersBackend(tiny_model("tiny-qwen2-vl"), max_pixels=28 * 28 * 16, batch_size=4)


def test_transformers_backend_generates_with_our_sampling(hf_backend, photos):
    b = hf_backend
    # the tiny checkpoint ships near-greedy defaults like some real ones; they are not what we use
    assert b.checkpoint_generation_config["temperature"] == 0.01
    gc = b.generation_config(12)
    assert (gc.temperature, gc.top_p, gc.top_k, gc.repetition_penalty, gc.do_sample) == (0.7, 0.8, 20, 1.05, True)
    imgs = [Image.fromarray(a) for a in list(photos.values())[:3]]
    reqs = [Request(im, "Describe this image.", 6, seed=i) for i, im in enumerate(imgs)]
    enc = b.encode(reqs)
    # pixel budget: at most 16 merged vision tokens per image
    assert all(int(np.prod(thw)) // 4 <= 16 for thw in enc["image_grid_thw"].tolist())
    gens = b.generate(reqs)
    assert len(gens) == 3
    for g in gens:
        assert 0 < g.num_tokens <= 6 and g.finish_reason in ("stop", "length")
        assert g.mean_logprob is not None and g.mean_logprob < 0
    again = b.generate(reqs)
    assert [g.text for g in again] == [g.text for g in gens]  # same seeds, same captions


def test_chosen_logprobs_match_a_full_log_softmax():
    import torch

    from captioners.hf import _chosen_logprobs

    g = torch.Generator().manual_seed(0)
    logits = tuple(torch.randn(3, 11, generator=g) for _ in range(5))
    tokens = torch.randint(0, 11, (3, 5), generator=g)
    full = torch.log_softmax(torch.stack(logits, dim=1), dim=-1)
    want = full.gather(-1, tokens.unsqueeze(-1)).squeeze(-1)
    torch.testing.assert_close(_chosen_logprobs(logits, tokens), want)
    assert _chosen_logprobs(logits, tokens[:, :3]).shape == (3, 3)
