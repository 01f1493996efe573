"""`prx-export RUN|CKPT --out DIR [--weights ema|raw]`: a folder `PRXPipeline.from_pretrained(DIR)` loads as is
(`PRXPixelPipeline` for a pixel-space run).

What diffusers 0.42.1 needs, and why each step is here:
- `model_index.json` names the text encoder `["prx", "T5GemmaEncoder"]` (the class diffusers' PRX pipeline
  module imports); `save_pretrained` writes `["transformers", "T5GemmaEncoder"]`, which fails to reload;
- `text_encoder/config.json` is the composite `T5GemmaConfig` with the encoder's fields also at the top level
  (`T5GemmaEncoder(config)` reads `config.hidden_size` etc.), and the weights carry no `encoder.` prefix
  (prefixed ones would not match and load silently as random weights);
- the tokenizer's `model_max_length` is the run's `text_max_length` (PRXPipeline pads prompts to it);
- `FlowMatchEulerDiscreteScheduler(shift=<the run's shift>)`, the run's VAE, `default_sample_size` = the
  resolution the shards were encoded at.
A pixel-space run (`--vae none`) exports as PRXPixelPipeline: no VAE, x-predictions turned into velocities
with t clamped at 0.05, noise_scale 1.0 (the trainer draws unit noise, as PRX's JiT baseline trains; the
pipeline's default 2.0 would start from other noise than training saw).
Refused with the reason: latent x-prediction runs (PRXPipeline has no x-to-v step), pixel runs that are not
x-prediction with t_min 0.05 (what PRXPixelPipeline assumes), runs with modules PRXPipeline
cannot hold (SPRINT's fusion layer, a text encoder other than T5Gemma, a VAE other than AutoencoderKL or AutoencoderDC),
and runs encoded with cleaning `none` (PRXPipeline always cleans prompts).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any

from contract.errors import PrxError
from trainer import algorithms
from trainer.data import TEXT_MAX_LENGTH
from trainer.sample import RunInfo, model_name, open_run


PIXEL_NOISE_SCALE = 1.0  # the trainer's noise is unit randn (trainer/objective.py draw_noise)
PIXEL_X_T_MIN = 0.05     # PRXPixelPipeline's clamp of t in its x-to-v step


def is_pixel_run(info: RunInfo) -> bool:
    from contract.encoders.pixels import is_pixel_space

    return is_pixel_space(info.data.get("vae", {}).get("class"))


PIPELINE_VAES = ("AutoencoderKL", "AutoencoderDC")  # the VAE classes diffusers' PRXPipeline decodes

def check_exportable(info: RunInfo) -> None:
    extra = [a.name for a in algorithms.needed_at_inference(info.config)]
    if extra:
        raise PrxError(f"{info.run_dir} was trained with {', '.join(extra)}, whose model needs modules outside "
                       "transformer/ at inference (aux.safetensors) that PRXTransformer2DModel and the stock "
                       "pipelines do not have: the export is not supported; prx-sample and prx-eval run it")
    if is_pixel_run(info):
        if info.get("prediction", "v") != "x" or float(info.get("x_pred_t_min", PIXEL_X_T_MIN)) != PIXEL_X_T_MIN:
            raise PrxError(f"{info.run_dir} is a pixel-space run with prediction {info.get('prediction', 'v')}, "
                           f"x_pred_t_min {info.get('x_pred_t_min', PIXEL_X_T_MIN)}: PRXPixelPipeline assumes "
                           f"x-prediction with t clamped at {PIXEL_X_T_MIN}; sample it with prx-sample instead")
    elif info.get("prediction", "v") == "x":
        raise PrxError(f"{info.run_dir} is an x-prediction run: PRXPipeline treats the model output as a velocity "
                         "and has no x-to-v step, so its images would be wrong; sample it with prx-sample instead")
    te, vae = info.data.get("text_encoder", {}), info.data.get("vae", {})
    if "T5Gemma" not in str(te.get("class", "")):
        raise PrxError(f"{info.run_dir}: text encoder {te.get('id')} ({te.get('class')}) is not T5Gemma; "
                         "PRXPipeline holds a T5GemmaEncoder, so the export is not supported; sample the run with "
                         "prx-sample, which encodes prompts with the text encoder its shards name")
    vae_class = str(vae.get("class", "diffusers.AutoencoderKL")).rpartition(".")[2]
    if not is_pixel_run(info) and vae_class not in PIPELINE_VAES:
        raise PrxError(f"{info.run_dir}: VAE class {vae.get('class')} is not one PRXPipeline decodes "
                       f"({' or '.join(PIPELINE_VAES)}) "
                       "(no stock diffusers pipeline decodes a PRX model in this latent space); sample the run "
                       "with prx-sample, which decodes it")
    if te.get("cleaning") == "none":
        raise PrxError(f"{info.run_dir} was encoded with --cleaning none, but PRXPipeline always cleans prompts "
                         "(clean_text, or basic_clean with skip_text_cleaning=True): its prompts would differ from "
                         "training; re-encode with --cleaning prx or basic")


def text_encoder_config(config) -> dict[str, Any]:
    """The composite T5GemmaConfig dict with the encoder's fields at the top level too."""
    d = config.to_dict()
    top = {k: v for k, v in d["encoder"].items() if k != "model_type"}
    top.update(d)
    top["architectures"] = ["T5GemmaEncoder"]
    return top


def save_text_encoder(model, folder: str) -> None:
    """The T5Gemma encoder as PRXPipeline reloads it: composite config, prefix-less safetensors."""
    from safetensors.torch import save_file

    os.makedirs(folder, exist_ok=True)
    for f in os.listdir(folder):  # what PRXPipeline.save_pretrained wrote there
        os.remove(os.path.join(folder, f))
    with open(os.path.join(folder, "config.json"), "w") as fh:
        json.dump(text_encoder_config(model.config), fh, indent=2)
    state = {k: v.detach().contiguous() for k, v in model.encoder.state_dict().items()}
    save_file(state, os.path.join(folder, "model.safetensors"), metadata={"format": "pt"})


def build_pipeline(info: RunInfo):
    """(PRXPipeline or PRXPixelPipeline of the run's modules, the T5GemmaEncoderModel its text encoder comes from)."""
    import torch
    from diffusers import (AutoencoderDC, AutoencoderKL, FlowMatchEulerDiscreteScheduler, PRXPipeline, PRXPixelPipeline,
                           PRXTransformer2DModel)
    from transformers import AutoTokenizer, T5GemmaEncoderModel

    from contract.encoders.text import load_config
    from contract.models import from_pretrained, resolve

    te_name = model_name(info.data["text_encoder"])
    spec = resolve(te_name)
    tok_kwargs = {k: v for k, v in spec.load_kwargs().items() if k != "subfolder"}
    tokenizer = AutoTokenizer.from_pretrained(spec.id, **tok_kwargs)
    tokenizer.model_max_length = int(info.get("text_max_length", TEXT_MAX_LENGTH))
    kwargs = {"is_encoder_decoder": False} if getattr(load_config(spec), "is_encoder_decoder", False) else {}
    encoder = T5GemmaEncoderModel.from_pretrained(spec.id, **spec.load_kwargs(), dtype=torch.float32, **kwargs)
    common = dict(transformer=PRXTransformer2DModel.from_pretrained(info.transformer_dir),
                  scheduler=FlowMatchEulerDiscreteScheduler(shift=float(info.get("shift", 1.0))),
                  text_encoder=encoder.encoder, tokenizer=tokenizer, default_sample_size=info.resolution())
    if is_pixel_run(info):
        return PRXPixelPipeline(**common, noise_scale=PIXEL_NOISE_SCALE), encoder
    vae_class = str(info.data["vae"].get("class", "diffusers.AutoencoderKL"))
    vae = from_pretrained(resolve(model_name(info.data["vae"]), vae_class),
                          AutoencoderDC if vae_class.endswith("AutoencoderDC") else AutoencoderKL)
    return PRXPipeline(**common, vae=vae), encoder


def export(source: str, out: str, weights: str | None = None) -> str:
    if not out:
        raise PrxError("--out DIR is required")
    if os.path.exists(out) and (not os.path.isdir(out) or os.listdir(out)):
        raise PrxError(f"--out {out} exists and is not empty: choose a new folder (nothing is overwritten)")
    is_ckpt = os.path.isdir(os.path.join(source, "transformer"))
    info = open_run(None if is_ckpt else source, source if is_ckpt else None, weights)
    check_exportable(info)
    pipe, encoder = build_pipeline(info)
    pipe.save_pretrained(out, safe_serialization=True)
    save_text_encoder(encoder, os.path.join(out, "text_encoder"))
    index_path = os.path.join(out, "model_index.json")
    with open(index_path) as fh:
        index = json.load(fh)
    index["text_encoder"] = ["prx", "T5GemmaEncoder"]
    with open(index_path, "w") as fh:
        json.dump(index, fh, indent=2)
    cleaning = info.data["text_encoder"].get("cleaning", "prx")
    with open(os.path.join(out, "prx_export.json"), "w") as fh:
        json.dump({"run": os.path.abspath(info.run_dir), "checkpoint": info.ckpt, "step": info.step,
                   "weights": info.weights, "shift": info.get("shift", 1.0), "cleaning": cleaning,
                   "call_with": {"skip_text_cleaning": cleaning == "basic"},
                   "text_max_length": info.get("text_max_length", TEXT_MAX_LENGTH)}, fh, indent=2)
    if cleaning == "basic":
        print("note: the run was encoded with --cleaning basic: call the pipeline with skip_text_cleaning=True",
              file=sys.stderr)
    return out


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="prx-export", description=__doc__.split("\n\n")[0])
    parser.add_argument("source", help="run folder (its last checkpoint) or a checkpoint folder")
    parser.add_argument("--out", required=True, help="new folder for the diffusers pipeline")
    parser.add_argument("--weights", choices=["ema", "raw"], help="default: ema when the run has it, else raw")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        print(export(args.source, args.out, args.weights))
    except (PrxError, FileNotFoundError, ValueError) as exc:
        print(f"prx-export: error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
