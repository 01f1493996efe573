"""Every seeded tiny random model of the real classes, in one place: `python -m testing.tiny_models DIR`.

Tests (`tests/conftest.py`'s `tiny_model`), the demo and the CPU benchmarks build these folders with `build`
(nothing here is committed output; everything is rebuilt from a seed) and load them through the same
alias/path loader (`contract.models.resolve`) and `from_pretrained` path as the real models. A builder is a
function `(folder, seed)` registered by name with `@register`. This module imports filters, captioners and
the trainer, so it is testing support, outside every layer: no package imports it.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Callable

# name -> builder(folder, seed). Builders write a folder loadable like the real model's hub repo.
BUILDERS: dict[str, Callable[[str, int], None]] = {}


def register(name: str):
    def deco(fn: Callable[[str, int], None]):
        BUILDERS[name] = fn
        return fn
    return deco


def build(folder: str, names: list[str] | None = None, seed: int = 0) -> dict[str, str]:
    """Build the named tiny models (all by default) into folder/NAME; returns name -> path."""
    names = names or sorted(BUILDERS)
    unknown = set(names) - set(BUILDERS)
    if unknown:
        raise KeyError(f"unknown tiny model(s) {sorted(unknown)}; known: {sorted(BUILDERS)}")
    out = {}
    for name in names:
        path = os.path.join(folder, name)
        if not os.path.exists(os.path.join(path, ".complete")):
            os.makedirs(path, exist_ok=True)
            BUILDERS[name](path, seed)
            open(os.path.join(path, ".complete"), "w").close()
        out[name] = path
    return out


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m testing.tiny_models",
                                description="build seeded tiny random models of the real classes into DIR")
    p.add_argument("dir", metavar="DIR")
    p.add_argument("--only", type=lambda s: [x for x in s.split(",") if x], default=None,
                   help="comma-separated names (default: all)")
    p.add_argument("--seed", type=int, default=0)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        paths = build(args.dir, args.only, seed=args.seed)
    except KeyError as exc:
        print(f"python -m testing.tiny_models: error: {exc.args[0]}", file=sys.stderr)
        return 2
    for name, path in paths.items():
        print(f"{name}: {path}")
    return 0


# ------------------------------------------------ open_clip (the filter stage)
# The seeded tiny open_clip model (`python -m testing.tiny_models DIR --only tiny-clip`).
#
# A real `open_clip.CLIP` (ViT image tower, transformer text tower with the stock BPE tokenizer) with a few
# thousand-wide layers cut to 32, saved the way open_clip's `local-dir:` schema reads a folder:
# `open_clip_config.json` ({model_cfg, preprocess_cfg}) + `open_clip_model.safetensors`. The filter stage loads
# it through exactly the path a downloaded checkpoint folder takes (`filters.clip.load_clip`).

TINY_CLIP_CFG = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 32, "layers": 2, "width": 32, "head_width": 16, "patch_size": 8},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 2},
}
TINY_PREPROCESS = {"size": 32, "mean": [0.48145466, 0.4578275, 0.40821073],
                   "std": [0.26862954, 0.26130258, 0.27577711], "interpolation": "bicubic", "resize_mode": "shortest"}


def save_open_clip_folder(model, model_cfg: dict, preprocess_cfg: dict, folder: str) -> None:
    """Write an open_clip model as a `local-dir:` folder (config JSON + safetensors weights)."""
    from safetensors.torch import save_file

    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, "open_clip_config.json"), "w") as fh:
        json.dump({"model_cfg": model_cfg, "preprocess_cfg": preprocess_cfg}, fh, indent=2, sort_keys=True)
    state = {k: v.detach().contiguous().clone() for k, v in model.state_dict().items()}
    save_file(state, os.path.join(folder, "open_clip_model.safetensors"))


@register("tiny-clip")
def build_tiny_clip(folder: str, seed: int) -> None:
    import open_clip
    import torch

    torch.manual_seed(seed)
    model = open_clip.CLIP(**TINY_CLIP_CFG)
    save_open_clip_folder(model, TINY_CLIP_CFG, TINY_PREPROCESS, folder)


# ------------------------------------------------ FLUX.1 VAE, T5Gemma, DINOv2 (the encode stage)
# Tiny seeded random models of the encode stage's real classes (`python -m testing.tiny_models DIR`).
#
# - `tiny-flux-vae`: diffusers `AutoencoderKL` with FLUX.1's layout (4 levels = 8x downsampling, 16 latent
#   channels, no quant convs, FLUX.1's scaling_factor 0.3611 and shift_factor 0.1159), narrow channels.
# - `tiny-t5gemma`: transformers `T5GemmaEncoderModel` (encoder-only `T5GemmaConfig`) plus a byte-level BPE
#   tokenizer trained here, offline, on a few sentences (Gemma's special ids: pad 0, eos 1, bos 2, unk 3).
# - `tiny-dinov2`: transformers `Dinov2WithRegistersModel` (patch 14, 4 registers) plus its image processor.
# Each is saved with `save_pretrained`, so it loads through the same `from_pretrained` path as the real model.

FLUX1_SCALING, FLUX1_SHIFT = 0.3611, 0.1159

T5GEMMA_CORPUS = """
A photo of an astronaut in a white flight suit in front of an American flag.
A cup of coffee on a saucer with a spoon, seen from above, on a wooden table.
Chelsea the tabby cat looking up at the camera with green eyes.
A rocket on the launch pad before lift-off under a clear blue sky.
A red motorcycle parked on a street; the left view of a stereo pair.
A Chinese temple with a red roof among green trees in the mountains.
A close-up of a pink flower with yellow stamens and soft light.
A microscope image of stained tissue with brown and blue cells.
The quick brown fox jumps over the lazy dog. 0123456789 , . ! ? - ' " ( ) : ;
a long detailed caption describing the scene, the lighting, the colours and the composition of the image.
"""


def _seed(seed: int):
    import torch

    torch.manual_seed(seed)


def tiny_flux_vae(seed: int = 0, scaling_factor: float = FLUX1_SCALING, shift_factor: float = FLUX1_SHIFT):
    """The seeded tiny AutoencoderKL with FLUX.1's layout (not saved)."""
    from diffusers import AutoencoderKL

    _seed(seed)
    return AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=16,
        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(8, 16, 16, 16), layers_per_block=1, norm_num_groups=4, act_fn="silu",
        sample_size=64, scaling_factor=scaling_factor, shift_factor=shift_factor, force_upcast=True,
        use_quant_conv=False, use_post_quant_conv=False, mid_block_add_attention=True,
    ).eval()


@register("tiny-flux-vae")
def build_tiny_flux_vae(folder: str, seed: int = 0) -> None:
    tiny_flux_vae(seed).save_pretrained(folder)


SHARP_LOGVAR = -20.0  # posterior std exp(-10) = 5e-5
# 1 / std and mean of tiny-flux-vae's posterior means over the bundled photos at 64 px (conftest.photo_arrays),
# measured the way FLUX.1's factors were on its data: scaled latents have mean 0 and std 1.
SHARP_SCALING, SHARP_SHIFT = 2.91, -0.034


@register("tiny-flux-vae-sharp")
def build_tiny_flux_vae_sharp(folder: str, seed: int = 0) -> None:
    """`tiny-flux-vae` (same seed, same weights, same decoder) with a sharp posterior: logvar = SHARP_LOGVAR.

    A trained VAE's posterior std is small next to the spread of its means; the random tiny one's logvar is
    about 0 (std 1, three times the spread of its means), so a latent the trainer draws from it is mostly
    noise and nothing can be memorised. Here the logvar half of the encoder's last conv is zeroed and its
    bias set to SHARP_LOGVAR; the means are tiny-flux-vae's."""
    import torch

    vae = tiny_flux_vae(seed, SHARP_SCALING, SHARP_SHIFT)
    conv = vae.encoder.conv_out  # out channels: [mean (latent_channels), logvar (latent_channels)]
    half = vae.config.latent_channels
    with torch.no_grad():
        conv.weight[half:].zero_()
        conv.bias[half:].fill_(SHARP_LOGVAR)
    vae.save_pretrained(folder)


@register("tiny-flux2-vae")
def build_tiny_flux2_vae(folder: str, seed: int = 0) -> None:
    """A seeded tiny AutoencoderKLFlux2 (FLUX.2's layout: 32 latent channels, 8x, batch norm over the 2x2
    patchified latents) whose running mean/var are random, so the normalisation is not the identity."""
    import torch
    from diffusers import AutoencoderKLFlux2

    _seed(seed)
    vae = AutoencoderKLFlux2(
        in_channels=3, out_channels=3, latent_channels=32, block_out_channels=(8, 16, 16, 16),
        layers_per_block=1, norm_num_groups=4, sample_size=64, use_quant_conv=True, use_post_quant_conv=True,
    ).eval()
    with torch.no_grad():
        vae.bn.running_mean.copy_(torch.randn(128) * 0.1)
        vae.bn.running_var.copy_(torch.rand(128) * 0.5 + 0.05)
    vae.save_pretrained(folder)


@register("tiny-dc-ae")
def build_tiny_dc_ae(folder: str, seed: int = 0) -> None:
    """A seeded tiny AutoencoderDC (DC-AE's classes and layout, ResBlock stages then an EfficientViT stage): 8
    latent channels, 4x compression (three stages), DC-AE f32c32's scaling factor."""
    from diffusers import AutoencoderDC

    _seed(seed)
    blocks = ("ResBlock", "ResBlock", "EfficientViTBlock")
    AutoencoderDC(in_channels=3, latent_channels=8, attention_head_dim=8, encoder_block_types=blocks,
                  decoder_block_types=blocks, encoder_block_out_channels=(8, 16, 16),
                  decoder_block_out_channels=(8, 16, 16), encoder_layers_per_block=(1, 1, 1),
                  decoder_layers_per_block=(1, 1, 1), encoder_qkv_multiscales=((), (), (5,)),
                  decoder_qkv_multiscales=((), (), (5,)), scaling_factor=0.41407).eval().save_pretrained(folder)


def build_t5gemma_tokenizer(folder: str, vocab_size: int = 384) -> None:
    """A byte-level BPE tokenizer trained offline on a few sentences, saved as a fast tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "<eos>", "<bos>", "<unk>"]  # Gemma's ids: pad 0, eos 1, bos 2, unk 3
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([line for line in T5GEMMA_CORPUS.splitlines() if line.strip()] * 4, trainer=trainer)
    # Gemma's tokenizer prepends <bos> (and adds no <eos>): mirror that.
    tok.post_processor = processors.TemplateProcessing(single="<bos> $A", pair="<bos> $A <bos> $B",
                                                       special_tokens=[("<bos>", 2)])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<bos>", eos_token="<eos>",
                                   pad_token="<pad>", unk_token="<unk>", model_max_length=512,
                                   padding_side="right")
    fast.save_pretrained(folder)


@register("tiny-t5gemma")
def build_tiny_t5gemma(folder: str, seed: int = 0) -> None:
    from transformers import T5GemmaConfig, T5GemmaEncoderModel
    from transformers.models.t5gemma.configuration_t5gemma import T5GemmaModuleConfig

    build_t5gemma_tokenizer(folder)
    from transformers import AutoTokenizer

    vocab = len(AutoTokenizer.from_pretrained(folder))
    _seed(seed)
    module = T5GemmaModuleConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                 num_attention_heads=2, num_key_value_heads=1, head_dim=16,
                                 max_position_embeddings=512, sliding_window=64, query_pre_attn_scalar=16,
                                 pad_token_id=0, eos_token_id=1, bos_token_id=2)
    cfg = T5GemmaConfig(encoder=module.to_dict(), decoder=module.to_dict(), is_encoder_decoder=False,
                        vocab_size=vocab, pad_token_id=0, eos_token_id=1, bos_token_id=2)
    model = T5GemmaEncoderModel(cfg).eval()
    model.save_pretrained(folder)


@register("tiny-dinov2")
def build_tiny_dinov2(folder: str, seed: int = 0) -> None:
    from transformers import BitImageProcessor, Dinov2WithRegistersConfig, Dinov2WithRegistersModel

    _seed(seed)
    cfg = Dinov2WithRegistersConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, mlp_ratio=2,
                                    patch_size=14, image_size=56, num_register_tokens=4)
    Dinov2WithRegistersModel(cfg).eval().save_pretrained(folder)
    # DINOv2's processor: resize shorter side 256, centre crop 224, ImageNet mean/std
    BitImageProcessor(do_resize=True, size={"shortest_edge": 256}, do_center_crop=True,
                      crop_size={"height": 224, "width": 224}, do_rescale=True, do_normalize=True,
                      image_mean=[0.485, 0.456, 0.406], image_std=[0.229, 0.224, 0.225],
                      do_convert_rgb=True).save_pretrained(folder)
    os.makedirs(folder, exist_ok=True)


@register("tiny-dinov3")
def build_tiny_dinov3(folder: str, seed: int = 0) -> None:
    """DINOv3-ViT (PRX's REPA-V3 / iREPA-V3 teacher) at test size: 16-pixel patches, 4 register tokens, RoPE."""
    from transformers import DINOv3ViTConfig, DINOv3ViTImageProcessor, DINOv3ViTModel

    _seed(seed)
    cfg = DINOv3ViTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                          patch_size=16, image_size=64, num_register_tokens=4)
    DINOv3ViTModel(cfg).eval().save_pretrained(folder)
    DINOv3ViTImageProcessor(image_mean=[0.485, 0.456, 0.406], image_std=[0.229, 0.224, 0.225]).save_pretrained(folder)


# ------------------------------------------------ Qwen2-VL (the recaption stage)
# The tiny Qwen2-VL for tests and CPU benchmarks: `python -m testing.tiny_models DIR --only tiny-qwen2-vl`.
#
# Real classes, random weights, seeded: `Qwen2VLForConditionalGeneration` with a tiny config, a
# `Qwen2VLProcessor` made of `Qwen2VLImageProcessor` and a byte-level BPE tokenizer trained here, offline, on a
# few sentences, wrapped as the Qwen2 tokenizer with Qwen2-VL's special tokens and chat template. The folder
# also ships a near-greedy `generation_config.json` like some real checkpoints do, so tests can show the
# backend never uses it.

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

QWEN_CORPUS = [
    "A photograph of a tabby cat sitting on a wooden table near a bright window.",
    "The astronaut stands in front of a flag, lit by soft studio light with a blue and white palette.",
    "A red motorcycle parked on a grey street, seen from the left side in afternoon sun.",
    "A cup of coffee on a saucer, photographed from above with warm brown and cream colours.",
    "A rocket waits on the launch pad under a clear sky; the mood is calm and expectant.",
    "A pink flower in close-up with a blurred green background and gentle natural light.",
    "A temple with a red roof among tall trees, a quiet and peaceful scene.",
    "Describe this image in one detailed paragraph about the subject, composition, lighting and style.",
]


def build_qwen_tokenizer(vocab_size: int = 512):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(QWEN_CORPUS * 4, trainer=trainer)
    try:
        from transformers import Qwen2TokenizerFast as TokCls
    except ImportError:  # transformers 5 names the tokenizers-backed class Qwen2Tokenizer
        from transformers import Qwen2Tokenizer as TokCls
    return TokCls(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>", unk_token=None,
                  bos_token=None, errors="replace", model_max_length=32768)


# Text and vision sizes of the tiny Qwen2-VL; `tiny-qwen2-vl-vllm` differs only where vLLM's CPU build needs it:
# its attention kernels take head_dim >= 32 (tiny-qwen2-vl has 16), and its engine's default max_model_len
# (8192) must fit the model's max_position_embeddings.
QWEN2_VL_TEXT = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
                 "num_key_value_heads": 2, "max_position_embeddings": 4096, "mrope_section": [2, 3, 3]}
QWEN2_VL_VISION = {"depth": 2, "embed_dim": 32, "num_heads": 2}
QWEN2_VL_VLLM_TEXT = {**QWEN2_VL_TEXT, "num_attention_heads": 2, "num_key_value_heads": 1,
                      "max_position_embeddings": 8192, "mrope_section": [4, 6, 6]}  # head_dim 32
QWEN2_VL_VLLM_VISION = {**QWEN2_VL_VISION, "num_heads": 1}  # head_dim 32


@register("tiny-qwen2-vl")
def build_tiny_qwen2_vl(folder: str, seed: int = 0) -> None:
    save_tiny_qwen2_vl(folder, seed, "tiny-qwen2-vl", QWEN2_VL_TEXT, QWEN2_VL_VISION)


@register("tiny-qwen2-vl-vllm")
def build_tiny_qwen2_vl_vllm(folder: str, seed: int = 0) -> None:
    """tiny-qwen2-vl with head_dim 32 and room for vLLM's default max_model_len: the vLLM tests' model."""
    save_tiny_qwen2_vl(folder, seed, "tiny-qwen2-vl-vllm", QWEN2_VL_VLLM_TEXT, QWEN2_VL_VLLM_VISION)


def save_tiny_qwen2_vl(folder: str, seed: int, builder: str, text: dict, vision: dict) -> None:
    import torch
    from transformers import (Qwen2VLConfig, Qwen2VLForConditionalGeneration, Qwen2VLImageProcessor,
                              Qwen2VLProcessor, Qwen2VLVideoProcessor)

    tokenizer = build_qwen_tokenizer()
    tokenizer.chat_template = CHAT_TEMPLATE
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS}
    vocab = ((len(tokenizer) + 63) // 64) * 64
    sizes = {k: v for k, v in text.items() if k != "mrope_section"}
    config = Qwen2VLConfig(
        text_config={"vocab_size": vocab, **sizes,
                     "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0,
                                         "mrope_section": text["mrope_section"]},
                     "bos_token_id": ids["<|endoftext|>"], "eos_token_id": ids["<|im_end|>"],
                     "pad_token_id": ids["<|endoftext|>"]},
        vision_config={**vision, "hidden_size": 64, "mlp_ratio": 2, "patch_size": 14, "spatial_merge_size": 2,
                       "temporal_patch_size": 2, "in_channels": 3},
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
        json.dump({"builder": builder, "seed": seed, "special_token_ids": ids}, fh, indent=1)


# ------------------------------------------------ Qwen3-VL and Qwen3 text towers (the encode stage)
# `tiny-qwen3-vl`: transformers `Qwen3VLForConditionalGeneration` (tiny text and vision configs; the encoder
# keeps its language model, as PRX's text tower does) with the byte-level Qwen tokenizer above.
# `tiny-qwen3`: transformers `Qwen3Model` (a Qwen3 language model) with the same tokenizer. Both are 32 wide.

QWEN3_TEXT = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2,
              "num_key_value_heads": 1, "head_dim": 16, "max_position_embeddings": 512}


def _save_qwen_tokenizer(folder: str) -> dict:
    tokenizer = build_qwen_tokenizer()
    tokenizer.save_pretrained(folder)
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS}
    return {"vocab_size": ((len(tokenizer) + 63) // 64) * 64, "bos_token_id": ids["<|endoftext|>"],
            "eos_token_id": ids["<|im_end|>"], "pad_token_id": ids["<|endoftext|>"]}


@register("tiny-qwen3-vl")
def build_tiny_qwen3_vl(folder: str, seed: int = 0) -> None:
    from transformers import Qwen3VLConfig, Qwen3VLForConditionalGeneration

    tok = _save_qwen_tokenizer(folder)
    rope = {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3]}
    config = Qwen3VLConfig(text_config={**QWEN3_TEXT, **tok, "rope_parameters": rope},
                           vision_config={"depth": 2, "hidden_size": 32, "intermediate_size": 64, "num_heads": 2,
                                          "out_hidden_size": 32, "patch_size": 16, "num_position_embeddings": 64,
                                          "deepstack_visual_indexes": [1]},
                           tie_word_embeddings=True)
    _seed(seed)
    Qwen3VLForConditionalGeneration(config).eval().save_pretrained(folder)


@register("tiny-qwen3")
def build_tiny_qwen3(folder: str, seed: int = 0) -> None:
    from transformers import Qwen3Config, Qwen3Model

    tok = _save_qwen_tokenizer(folder)
    _seed(seed)
    Qwen3Model(Qwen3Config(**QWEN3_TEXT, **tok)).eval().save_pretrained(folder)


# ------------------------------------------------ PRX denoiser (the trainer)
# `tiny-prx`: a seeded tiny PRXTransformer2DModel (the trainer's `tiny` preset) for `python -m testing.tiny_models`.
#
# Its input widths match the other tiny models: 16 latent channels (tiny-flux-vae, like FLUX.1's VAE) and
# 32-wide text embeddings (tiny-t5gemma). `prx-train --model DIR` loads it through from_pretrained.

TINY_LATENT_CHANNELS = 16
TINY_TEXT_DIM = 32


@register("tiny-prx")
def build_tiny_prx(folder: str, seed: int) -> None:
    from trainer.model import build_model

    build_model("tiny", TINY_LATENT_CHANNELS, TINY_TEXT_DIM, seed=seed).save_pretrained(folder,
                                                                                        safe_serialization=True)


# ------------------------------------------------ word-level tokenizer (the audit)
# `tiny-word-tokenizer`: a word-level tokenizer (tokenizers' WordLevel) saved as a folder AutoTokenizer loads.
#
# No special tokens are added around a text, so for captions of plain words (no punctuation) the token count
# equals the word count: the audit's tests compute token figures by hand.

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


# ------------------------------------------------ Inception-v3 (prx-eval's FID extractor)
# `tiny-inception`: a seeded random-weight state dict of torch-fidelity's Inception-v3. Not small (the architecture
# is fixed: 24M parameters), but random, offline and built from a seed: tests drive `prx-eval --inception-weights
# DIR/inception.pth` with it (the real file is torch-fidelity's converted TF weights). Written with `torch.save` of
# plain tensors, so it loads with `torch.load(weights_only=True)`.
INCEPTION_FILE = "inception.pth"


def inception_state_dict(seed: int = 0) -> dict:
    """A state dict with the keys and shapes torch-fidelity's FeatureExtractorInceptionV3 loads (random init)."""
    import torch
    from torch import nn
    from torch_fidelity import feature_extractor_inceptionv3 as fe

    torch.manual_seed(seed)
    shell = nn.Module()
    layers = [("Conv2d_1a_3x3", fe.BasicConv2d(3, 32, kernel_size=3, stride=2)),
              ("Conv2d_2a_3x3", fe.BasicConv2d(32, 32, kernel_size=3)),
              ("Conv2d_2b_3x3", fe.BasicConv2d(32, 64, kernel_size=3, padding=1)),
              ("Conv2d_3b_1x1", fe.BasicConv2d(64, 80, kernel_size=1)),
              ("Conv2d_4a_3x3", fe.BasicConv2d(80, 192, kernel_size=3)),
              ("Mixed_5b", fe.InceptionA(192, pool_features=32)), ("Mixed_5c", fe.InceptionA(256, pool_features=64)),
              ("Mixed_5d", fe.InceptionA(288, pool_features=64)), ("Mixed_6a", fe.InceptionB(288)),
              ("Mixed_6b", fe.InceptionC(768, channels_7x7=128)), ("Mixed_6c", fe.InceptionC(768, channels_7x7=160)),
              ("Mixed_6d", fe.InceptionC(768, channels_7x7=160)), ("Mixed_6e", fe.InceptionC(768, channels_7x7=192)),
              ("Mixed_7a", fe.InceptionD(768)), ("Mixed_7b", fe.InceptionE_1(1280)), ("Mixed_7c", fe.InceptionE_2(2048)),
              ("fc", nn.Linear(2048, 1008))]
    for name, module in layers:
        shell.add_module(name, module)
    return {k: v.detach().clone().contiguous() for k, v in shell.state_dict().items()}


@register("tiny-inception")
def build_tiny_inception(folder: str, seed: int) -> None:
    import torch

    os.makedirs(folder, exist_ok=True)
    torch.save(inception_state_dict(seed), os.path.join(folder, INCEPTION_FILE))


if __name__ == "__main__":
    sys.exit(main())
