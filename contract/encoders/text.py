"""The text encoder: T5Gemma-2B's encoder by default, or any Hugging Face encoder by alias or folder.

Qwen3-VL checkpoints (Qwen3-VL-Embedding-2B, Qwen3-VL-8B-Instruct) load as PRX's text tower loads them: the
whole Qwen3VLForConditionalGeneration, keeping its language model's last hidden state (no prompt template, the
caption's tokens only); a Qwen3 language model loads as Qwen3Model, also its last hidden state.

Captions are cleaned with diffusers' PRX pipeline's own `TextPreprocessor` (imported, not copied):
`prx` = `clean_text`, what `PRXPipeline` runs by default (`skip_text_cleaning=False`); `basic` =
`basic_clean` (`skip_text_cleaning=True`); `none` = the caption as written. Without an explicit choice the
mode is `default_cleaning(name)`: the alias's `cleaning` in manifests/models.yaml (qwen3vl-2b: `basic`, as PRX's
qwen3vl_2b_256_bf16.yaml sets `skip_text_cleaning: true`), else `prx`. Then tokenized (at most `max_length`
tokens, truncating) and encoded; the last hidden states of the real tokens only (no padding) are kept in BF16
with their token count.

Precision, against PRX's text tower (prx/models/text_tower.py): PRX loads the tower with `torch_dtype:
torch.bfloat16` (configs/yamls/text_tower/qwen3vl_{2b,8b}_256_bf16.yaml, t5gemma2b_256_bf16.yaml) and runs it
with autocast disabled, so its weights *and* its residual stream are BF16 and its embeddings come out BF16.
Here the weights load in float32 (the BF16 checkpoints' values, exactly) and, with `bf16` (the encode stage on a
GPU), run under BF16 autocast: the matmuls see the same BF16 weights, but the residual stream, norms and
embedding lookup stay float32 until the result is rounded to BF16 for storage. Both store BF16, so the format
is PRX's; the numbers differ by BF16 rounding noise that accumulates over the layers (on tiny-qwen3-vl, 2
layers: PRX's BF16 forward is 4.7e-3 from float32 in relative L2, ours 2.7e-3, the BF16 storage alone 1.6e-3).
This is kept, not aligned, because (1) the sampler encodes prompts in float32 (trainer/sample.py) and the
stored embeddings should be as near those as BF16 storage allows, (2) the VAE and REPA teacher run the same
way and each sample records `compute: bfloat16-autocast`. With `bf16` off (the CPU, `--precision float32`)
the compute is float32, PRX's TextTower default (`torch_dtype=torch.float32`) when a yaml sets none.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

from contract.models import ModelSpec, aliases, import_class, loading, resolve
from contract.errors import PrxError

DEFAULT_CLEANING = "prx"  # PRX's TextTower default (skip_text_cleaning=False) and PRXPipeline's
CLEANING = {
    "prx": "diffusers PRXPipeline TextPreprocessor.clean_text (the pipeline default, skip_text_cleaning=False)",
    "basic": "diffusers PRXPipeline TextPreprocessor.basic_clean (skip_text_cleaning=True)",
    "none": "none (caption as written)",
}


def cleaner(mode: str) -> Callable[[str], str]:
    if mode == "none":
        return lambda text: text
    from diffusers.pipelines.prx.pipeline_prx import TextPreprocessor

    pre = TextPreprocessor()
    if mode == "prx":
        return pre.clean_text
    if mode == "basic":
        return pre.basic_clean
    raise ValueError(f"unknown cleaning mode {mode!r}; use {', '.join(CLEANING)}")


def default_cleaning(name: str) -> str:
    """The cleaning `name` is encoded with when none is asked for: its alias's `cleaning` in
    manifests/models.yaml (the cleaning of PRX's text tower for that model), else DEFAULT_CLEANING."""
    entry = aliases().get(name)
    mode = entry.get("cleaning", DEFAULT_CLEANING) if isinstance(entry, dict) else DEFAULT_CLEANING
    if mode not in CLEANING:
        raise PrxError(f"manifests/models.yaml: {name}'s cleaning {mode!r} is not one of {', '.join(CLEANING)}")
    return mode


FLAG = "--text-encoder"


def load_config(spec: ModelSpec):
    from transformers import AutoConfig

    with loading(spec, FLAG):
        return AutoConfig.from_pretrained(spec.id, **spec.load_kwargs())


def encoder_class(spec: ModelSpec, config) -> str:
    """The class that loads the encoder part: the alias's, else chosen from the config's model type."""
    if spec.cls:
        return spec.cls
    mt = getattr(config, "model_type", "")
    if mt == "t5gemma":
        return "transformers.T5GemmaEncoderModel"
    if mt == "qwen3_vl":  # PRX's text tower: the whole checkpoint, then its language model (language_model)
        return "transformers.Qwen3VLForConditionalGeneration"
    if mt in ("t5", "mt5", "umt5"):
        return f"transformers.{ {'t5': 'T5', 'mt5': 'MT5', 'umt5': 'UMT5'}[mt]}EncoderModel"
    return "transformers.AutoModel"


def hidden_size(config) -> int:
    for c in (getattr(config, "encoder", None), getattr(config, "text_config", None), config):
        if c is None:
            continue
        for attr in ("hidden_size", "d_model"):
            v = getattr(c, attr, None)
            if isinstance(v, int):
                return v
    raise PrxError("cannot tell the text encoder's hidden size from its config")


def text_info(spec: ModelSpec, max_length: int, cleaning: str, config=None) -> dict[str, Any]:
    config = config if config is not None else load_config(spec)
    return {**spec.provenance(), "class": encoder_class(spec, config), "max_length": int(max_length),
            "hidden_size": hidden_size(config), "cleaning": cleaning, "cleaning_function": CLEANING[cleaning],
            "dtype": "bfloat16", "padding": "none (real tokens only)"}


@dataclass
class TextEncoder:
    model: Any
    tokenizer: Any
    spec: ModelSpec
    info: dict[str, Any]
    device: str
    bf16: bool
    clean: Callable[[str], str]

    @property
    def max_length(self) -> int:
        return self.info["max_length"]

    def tokenize(self, texts: list[str]):
        return self.tokenizer(list(texts), padding="longest", max_length=self.max_length, truncation=True,
                              return_attention_mask=True, return_tensors="pt")

    def token_ids(self, texts: list[str]) -> list[list[int]]:
        """Each caption's token ids as `tokenize` makes them (truncated at max_length), unpadded: one tokenizer
        call for a whole batch, padded later per forward (`pad`)."""
        return token_ids(self.tokenizer, texts, self.max_length)

    def pad(self, ids: list[list[int]]) -> dict:
        """Token id lists -> what `tokenize` returns for their captions (the tokenizer's own padding: to the
        longest, on its padding side, with the attention mask)."""
        return self.tokenizer.pad({"input_ids": ids}, padding="longest", return_attention_mask=True,
                                  return_tensors="pt")

    def count_tokens(self, texts: list[str]) -> list[int]:
        """Tokens before truncation (to tell whether a caption was cut at max_length)."""
        return count_tokens(self.tokenizer, texts)

    def encode_empty_prompt(self):
        """The empty prompt's hidden states (L x D bfloat16), for classifier-free guidance. A tokenizer that adds
        no special tokens makes 0 tokens of it, which no attention can use: it is then one end-of-sequence token
        (else pad, else bos), as T5's tokenizer encodes it."""
        import torch

        if self.count_tokens([self.clean("")])[0] > 0:
            return self.encode([self.clean("")])[0]
        tok = self.tokenizer
        ids = [i for i in (tok.eos_token_id, tok.pad_token_id, tok.bos_token_id) if i is not None]
        if not ids:
            raise PrxError(f"--text-encoder {self.spec.name}: its tokenizer makes 0 tokens of the empty prompt "
                             "and has no eos, pad or bos token to stand for it; use a tokenizer that adds special "
                             "tokens")
        one = torch.tensor([[ids[0]]], device=self.device)
        with torch.inference_mode(), torch.autocast(device_type=one.device.type, dtype=torch.bfloat16,
                                                    enabled=self.bf16):
            hidden = self.model(input_ids=one, attention_mask=torch.ones_like(one)).last_hidden_state
        return hidden[0].to(torch.bfloat16).cpu().clone()

    def encode(self, texts: list[str]):
        """Cleaned captions -> list of L_i x D bfloat16 CPU tensors (real tokens only)."""
        return self.encode_tokens(self.tokenize(texts)) if texts else []

    def encode_tokens(self, tok) -> list:
        """A tokenised batch (`tokenize`, or `pad` of `token_ids`) -> each caption's L_i x D bfloat16 CPU
        hidden states, real tokens only: views of one batch tensor (contiguous rows; no copy per caption)."""
        import torch

        lengths = tok["attention_mask"].sum(dim=1)
        if int(lengths.min()) == 0:
            raise PrxError("a caption with 0 tokens reached the text encoder; drop it first (count_tokens)")
        ids = tok["input_ids"].to(self.device, non_blocking=True)
        mask = tok["attention_mask"].to(self.device, non_blocking=True)
        with torch.inference_mode(), torch.autocast(device_type=ids.device.type, dtype=torch.bfloat16,
                                                    enabled=self.bf16):
            hidden = self.model(input_ids=ids, attention_mask=mask).last_hidden_state
        return split_rows(hidden.to(torch.bfloat16).cpu(), lengths.tolist(), self.tokenizer.padding_side == "left")


def token_ids(tokenizer, texts: list[str], max_length: int) -> list[list[int]]:
    """Each caption's token ids, truncated at max_length, unpadded (what the encoder gets, before padding)."""
    return tokenizer(list(texts), max_length=max_length, truncation=True, verbose=False)["input_ids"]


def count_tokens(tokenizer, texts: list[str]) -> list[int]:
    """Each caption's tokens before truncation."""
    return [len(ids) for ids in tokenizer(list(texts), truncation=False, verbose=False)["input_ids"]]


def caption_tokens(tokenizer, texts: list[str], max_length: int) -> list[tuple[list[int], bool]]:
    """(token ids truncated at max_length, was the caption cut?) per caption: one tokenizer call for all of
    them; only the captions that fill max_length are counted again, untruncated."""
    ids = token_ids(tokenizer, texts, max_length)
    full = [k for k, x in enumerate(ids) if len(x) >= max_length]
    counts = count_tokens(tokenizer, [texts[k] for k in full]) if full else []
    cut = {k for k, n in zip(full, counts) if n > max_length}
    return [(x, k in cut) for k, x in enumerate(ids)]


def split_rows(hidden, lengths: list[int], left: bool) -> list:
    """B x L x D -> row i's real tokens (the last n on the left-padded side, else the first n), as views."""
    hidden = hidden.contiguous()
    width = hidden.shape[1]
    return [hidden[i, width - n:] if left else hidden[i, :n] for i, n in enumerate(lengths)]


def language_model(model):
    """A vision-language checkpoint's text backbone (PRX's text tower keeps `model.language_model` of
    Qwen3VLForConditionalGeneration and discards the vision encoder); any other model as it is."""
    inner = getattr(model, "model", None)
    return inner.language_model if hasattr(inner, "language_model") else model


def load_text_encoder(name: str, max_length: int = 256, cleaning: str | None = None, device: str = "cpu",
                      bf16: bool = False) -> TextEncoder:
    """`cleaning` None: the model's default (`default_cleaning`)."""
    import torch

    cleaning = cleaning or default_cleaning(name)
    spec = resolve(name)
    config = load_config(spec)
    info = text_info(spec, max_length, cleaning, config)
    klass = import_class(info["class"])
    kwargs: dict[str, Any] = {}
    if getattr(config, "model_type", "") == "t5gemma" and getattr(config, "is_encoder_decoder", False):
        kwargs["is_encoder_decoder"] = False  # load the encoder half of an encoder-decoder checkpoint
    with loading(spec, FLAG):
        model = klass.from_pretrained(spec.id, **spec.load_kwargs(), dtype=torch.float32, **kwargs)
    tokenizer = load_tokenizer(spec)
    if getattr(config, "is_encoder_decoder", False) and hasattr(model, "get_encoder") \
            and "EncoderModel" not in type(model).__name__:
        model = model.get_encoder()
    model = language_model(model)
    model.requires_grad_(False).eval().to(device)
    return TextEncoder(model, tokenizer, spec, info, device, bf16, cleaner(cleaning))


def load_tokenizer(spec: ModelSpec):
    """The text encoder's tokenizer alone (its `tokenizer_subfolder`, else its subfolder), with a pad token
    (its eos where it has none): what `load_text_encoder` gives the encoder, and what a prepare process of
    the encode stage tokenises with."""
    from transformers import AutoTokenizer

    kwargs = {k: v for k, v in spec.load_kwargs().items() if k != "subfolder"}
    if spec.extra.get("tokenizer_subfolder"):
        kwargs["subfolder"] = spec.extra["tokenizer_subfolder"]
    elif spec.subfolder:
        kwargs["subfolder"] = spec.subfolder
    with loading(spec, FLAG):
        tokenizer = AutoTokenizer.from_pretrained(spec.id, **kwargs)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer
