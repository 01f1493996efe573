"""`tiny-word-tokenizer`: a word-level tokenizer (tokenizers' WordLevel) saved as a folder AutoTokenizer loads.

No special tokens are added around a text, so for captions of plain words (no punctuation) the token count
equals the word count: the audit's tests compute token figures by hand.
"""
from __future__ import annotations

from pipeline.tiny_models import register

SENTENCES = [
    "a red car on the street", "the dog runs fast today", "a blue sky over the sea",
    "very good photo of a cat sitting on a mat", "a photograph shows a house with a garden",
]


@register("tiny-word-tokenizer")
def build_tiny_word_tokenizer(folder: str, seed: int) -> None:
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = sorted({w for s in SENTENCES for w in s.split()})
    vocab = {"[UNK]": 0, "[PAD]": 1, **{w: i + 2 for i, w in enumerate(words)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]", model_max_length=16)
    fast.save_pretrained(folder)
