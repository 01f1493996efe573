"""The tiny Qwen2-VL for tests and CPU benchmarks: `prx-data dev tiny-models DIR --only tiny-qwen2-vl`.

Real classes, random weights, seeded: `Qwen2VLForConditionalGeneration` with a tiny config, a
`Qwen2VLProcessor` made of `Qwen2VLImageProcessor` and a byte-level BPE tokenizer trained here, offline, on a
few sentences, wrapped as the Qwen2 tokenizer with Qwen2-VL's special tokens and chat template. The folder
also ships a near-greedy `generation_config.json` like some real checkpoints do, so tests can show the
backend never uses it.
"""
from __future__ import annotations

import json
import os

from pipeline.tiny_models import register

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>",
                  "<|box_start|>", "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>",
                  "<|vision_end|>", "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>"]

CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}<|im_end|>\n"
    "{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'video' or 'video' in content %}<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}"
    "{% endfor %}<|im_end|>\n{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

CORPUS = [
    "A photograph of a tabby cat sitting on a wooden table near a bright window.",
    "The astronaut stands in front of a flag, lit by soft studio light with a blue and white palette.",
    "A red motorcycle parked on a grey street, seen from the left side in afternoon sun.",
    "A cup of coffee on a saucer, photographed from above with warm brown and cream colours.",
    "A rocket waits on the launch pad under a clear sky; the mood is calm and expectant.",
    "A pink flower in close-up with a blurred green background and gentle natural light.",
    "A temple with a red roof among tall trees, a quiet and peaceful scene.",
    "Describe this image in one detailed paragraph about the subject, composition, lighting and style.",
]


def build_tokenizer(vocab_size: int = 512):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(CORPUS * 4, trainer=trainer)
    try:
        from transformers import Qwen2TokenizerFast as TokCls
    except ImportError:  # transformers 5 names the tokenizers-backed class Qwen2Tokenizer
        from transformers import Qwen2Tokenizer as TokCls
    return TokCls(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>", unk_token=None,
                  bos_token=None, errors="replace", model_max_length=32768)


@register("tiny-qwen2-vl")
def build_tiny_qwen2_vl(folder: str, seed: int = 0) -> None:
    import torch
    from transformers import (Qwen2VLConfig, Qwen2VLForConditionalGeneration, Qwen2VLImageProcessor,
                              Qwen2VLProcessor, Qwen2VLVideoProcessor)

    tokenizer = build_tokenizer()
    tokenizer.chat_template = CHAT_TEMPLATE
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS}
    vocab = ((len(tokenizer) + 63) // 64) * 64
    config = Qwen2VLConfig(
        text_config={"vocab_size": vocab, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
                     "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 4096,
                     "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3]},
                     "bos_token_id": ids["<|endoftext|>"], "eos_token_id": ids["<|im_end|>"],
                     "pad_token_id": ids["<|endoftext|>"]},
        vision_config={"depth": 2, "embed_dim": 32, "hidden_size": 64, "num_heads": 2, "mlp_ratio": 2,
                       "patch_size": 14, "spatial_merge_size": 2, "temporal_patch_size": 2, "in_channels": 3},
        image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"],
        tie_word_embeddings=True,
    )
    torch.manual_seed(seed)
    model = Qwen2VLForConditionalGeneration(config).eval()
    # like some real checkpoints: near-greedy defaults that the backends must not use
    gc = model.generation_config
    gc.do_sample, gc.temperature, gc.top_k, gc.top_p = True, 0.01, 1, 0.001
    gc.eos_token_id, gc.pad_token_id, gc.bos_token_id = [ids["<|im_end|>"], ids["<|endoftext|>"]], ids["<|endoftext|>"], ids["<|endoftext|>"]
    model.save_pretrained(folder)
    image_processor = Qwen2VLImageProcessor(min_pixels=56 * 56, max_pixels=28 * 28 * 256, patch_size=14,
                                            merge_size=2, temporal_patch_size=2)
    video_processor = Qwen2VLVideoProcessor(patch_size=14, merge_size=2, temporal_patch_size=2)
    processor = Qwen2VLProcessor(image_processor=image_processor, tokenizer=tokenizer,
                                 video_processor=video_processor, chat_template=CHAT_TEMPLATE)
    processor.save_pretrained(folder)
    with open(os.path.join(folder, "prx_tiny.json"), "w") as fh:
        json.dump({"builder": "tiny-qwen2-vl", "seed": seed, "special_token_ids": ids}, fh, indent=1)
