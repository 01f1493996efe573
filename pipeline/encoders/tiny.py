"""Tiny seeded random models of the encode stage's real classes (`prx-data dev tiny-models`).

- `tiny-flux-vae`: diffusers `AutoencoderKL` with FLUX.1's layout (4 levels = 8x downsampling, 16 latent
  channels, no quant convs, FLUX.1's scaling_factor 0.3611 and shift_factor 0.1159), narrow channels.
- `tiny-t5gemma`: transformers `T5GemmaEncoderModel` (encoder-only `T5GemmaConfig`) plus a byte-level BPE
  tokenizer trained here, offline, on a few sentences (Gemma's special ids: pad 0, eos 1, bos 2, unk 3).
- `tiny-dinov2`: transformers `Dinov2WithRegistersModel` (patch 14, 4 registers) plus its image processor.
Each is saved with `save_pretrained`, so it loads through the same `from_pretrained` path as the real model.
"""
from __future__ import annotations

import os

from pipeline.tiny_models import register

FLUX1_SCALING, FLUX1_SHIFT = 0.3611, 0.1159

_CORPUS = """
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


@register("tiny-flux-vae")
def build_tiny_flux_vae(folder: str, seed: int = 0) -> None:
    from diffusers import AutoencoderKL

    _seed(seed)
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=16,
        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(8, 16, 16, 16), layers_per_block=1, norm_num_groups=4, act_fn="silu",
        sample_size=64, scaling_factor=FLUX1_SCALING, shift_factor=FLUX1_SHIFT, force_upcast=True,
        use_quant_conv=False, use_post_quant_conv=False, mid_block_add_attention=True,
    ).eval()
    vae.save_pretrained(folder)


def build_tokenizer(folder: str, vocab_size: int = 384) -> None:
    """A byte-level BPE tokenizer trained offline on a few sentences, saved as a fast tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "<eos>", "<bos>", "<unk>"]  # Gemma's ids: pad 0, eos 1, bos 2, unk 3
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([line for line in _CORPUS.splitlines() if line.strip()] * 4, trainer=trainer)
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

    build_tokenizer(folder)
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
