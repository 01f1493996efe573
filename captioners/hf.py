"""The transformers backend: `model.generate`, batched with left padding, on CPU or GPU.

The model and processor load through `contract.models` (alias, hub id or local folder) with the class named
in `manifests/models.yaml` (default `AutoModelForImageTextToText`). Sampling is passed as a complete
`GenerationConfig` so the checkpoint's own (often near-greedy) `generation_config.json` never applies.
"""
from __future__ import annotations

import math
from typing import Any

from captioners import sampling as sampling_mod
from captioners.base import DEFAULT_MAX_PIXELS, DEFAULT_MIN_PIXELS, Backend, Generation, Request

DEFAULT_CLASS = "transformers.AutoModelForImageTextToText"


def chat_messages(instruction: str) -> list[dict[str, Any]]:
    """One user turn: the instruction first, then the image (the shared prefix is cacheable)."""
    return [{"role": "user", "content": [{"type": "text", "text": instruction}, {"type": "image"}]}]


def batch_seed(seeds: list[int]) -> int:
    """transformers samples a batch from one RNG: derive one seed from the requests' seeds."""
    acc = 0
    for s in seeds:
        acc = (acc * 1_000_003 + int(s)) % (2**63 - 1)
    return acc


class TransformersBackend(Backend):
    name = "transformers"

    def __init__(self, model: str, *, sampling: dict[str, Any] | None = None, max_pixels: int = DEFAULT_MAX_PIXELS,
                 min_pixels: int = DEFAULT_MIN_PIXELS, device: str | None = None, dtype: str = "auto",
                 batch_size: int = 16, attn_implementation: str | None = None, ignore_eos: bool = False):
        """ignore_eos: always generate max_new_tokens (benchmarks at a fixed output length)."""
        import torch

        from contract.models import from_pretrained, import_class, resolve

        self.spec = resolve(model, default_cls=DEFAULT_CLASS)
        self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        if dtype == "auto":
            dtype = "bfloat16" if str(self.device).startswith("cuda") else "float32"
        self.dtype = dtype
        self.max_pixels, self.min_pixels = int(max_pixels), int(min_pixels)
        self.batch_size = max(1, int(batch_size))
        self.ignore_eos = bool(ignore_eos)
        self._sampling = sampling_mod.effective("transformers", sampling)
        kw: dict[str, Any] = {"dtype": getattr(torch, dtype)}
        if attn_implementation:
            kw["attn_implementation"] = attn_implementation
        self.model = from_pretrained(self.spec, self.spec.cls or DEFAULT_CLASS, flag="--model",
                                     **kw).to(self.device).eval()
        proc_cls = self.spec.extra.get("processor", "transformers.AutoProcessor")
        self.processor = from_pretrained(self.spec, import_class(proc_cls), flag="--model")
        self.processor.tokenizer.padding_side = "left"
        gen = self.model.generation_config
        self.eos_ids = _as_list(gen.eos_token_id) or _as_list(self.processor.tokenizer.eos_token_id)
        self.pad_id = gen.pad_token_id if gen.pad_token_id is not None else self.processor.tokenizer.pad_token_id
        if self.pad_id is None:
            self.pad_id = self.eos_ids[0]
        self.checkpoint_generation_config = {k: getattr(gen, k, None) for k in
                                             ("do_sample", "temperature", "top_p", "top_k", "repetition_penalty")}

    def model_info(self) -> dict[str, Any]:
        return {"name": self.spec.name, "id": self.spec.id, "revision": self.spec.revision}

    def sampling(self) -> dict[str, Any]:
        return {"do_sample": True, **self._sampling}

    def generation_config(self, max_new_tokens: int):
        from transformers import GenerationConfig

        extra = {"min_new_tokens": int(max_new_tokens)} if self.ignore_eos else {}
        return GenerationConfig(do_sample=True, max_new_tokens=int(max_new_tokens), eos_token_id=self.eos_ids, **extra,
                                pad_token_id=self.pad_id, return_dict_in_generate=True, output_logits=True,
                                **self._sampling)

    def prompt_text(self, instruction: str) -> str:
        return self.processor.apply_chat_template(chat_messages(instruction), tokenize=False,
                                                  add_generation_prompt=True)

    def encode(self, requests: list[Request]):
        texts = [self.prompt_text(r.prompt) for r in requests]
        return self.processor(text=texts, images=[r.image for r in requests], padding=True, return_tensors="pt",
                              size={"shortest_edge": self.min_pixels, "longest_edge": self.max_pixels})

    def generate(self, requests: list[Request]) -> list[Generation]:
        out: list[Generation | None] = [None] * len(requests)
        # one generate call per (prompt, budget) group, in chunks of batch_size
        groups: dict[tuple[str, int], list[int]] = {}
        for i, r in enumerate(requests):
            groups.setdefault((r.prompt, r.max_new_tokens), []).append(i)
        for (_, budget), idxs in groups.items():
            for start in range(0, len(idxs), self.batch_size):
                chunk = idxs[start:start + self.batch_size]
                for i, g in zip(chunk, self._generate_chunk([requests[i] for i in chunk], budget)):
                    out[i] = g
        return out  # type: ignore[return-value]

    def _generate_chunk(self, requests: list[Request], max_new_tokens: int) -> list[Generation]:
        import torch

        inputs = self.encode(requests).to(self.device)
        seed = batch_seed([r.seed for r in requests])
        torch.manual_seed(seed)
        with torch.inference_mode():
            res = self.model.generate(**inputs, generation_config=self.generation_config(max_new_tokens))
        new = res.sequences[:, inputs["input_ids"].shape[1]:]
        logprobs = _chosen_logprobs(res.logits, new) if res.logits else None
        return self.parse(new, logprobs, seed)

    def parse(self, new_tokens, logprobs, seed: int) -> list[Generation]:
        """Generated token ids (batch x steps, padded after EOS) -> Generations."""
        eos = set(self.eos_ids)
        gens = []
        for row in range(new_tokens.shape[0]):
            ids = new_tokens[row].tolist()
            n, finish = len(ids), "length"
            for j, t in enumerate(ids):
                if t in eos:
                    n, finish = j + 1, "stop"
                    break
            text = self.processor.tokenizer.decode(ids[:n], skip_special_tokens=True)
            mean = None
            if logprobs is not None and n:
                vals = logprobs[row, :n].tolist()
                mean = float(sum(vals) / n) if all(math.isfinite(v) for v in vals) else None
            gens.append(Generation(text=text, num_tokens=n, finish_reason=finish, mean_logprob=mean, seed=seed))
        return gens


def _chosen_logprobs(logits: tuple, tokens):
    """Raw-model log-probabilities (before sampling processors) of the tokens generated, batch x steps."""
    import torch

    # step by step: stacking batch x steps x vocab in float32 would cost GBs at Qwen's 152k vocabulary
    steps = min(len(logits), tokens.shape[1])
    cols = [torch.log_softmax(logits[t].float(), dim=-1).gather(-1, tokens[:, t:t + 1].to(logits[t].device))
            for t in range(steps)]
    return torch.cat(cols, dim=1).cpu()


def _as_list(x) -> list[int]:
    if x is None:
        return []
    return [int(v) for v in x] if isinstance(x, (list, tuple)) else [int(x)]
