"""The trainer-side reader of encoded shards (written by `prx-data encode`).

The trainer reads latents and text embeddings only through this module, so the layout of an encoded
folder is decided in one place (ARCHITECTURE.md, Members):

- `latent.safetensors`: `mean`, `logvar` (float32, C x h x w) of the VAE posterior of the crop; or, in pixel
  space (`--vae none`), `pixels.webp`: the crop itself, lossless (contract/encoders/pixels.py);
- `emb_{variant}.safetensors`: `hidden` (bfloat16, L x D, unpadded: L is the caption's token count);
- `repa.safetensors` (optional): `features` (bfloat16, N x D; N = the denoiser's token grid, row-major);
- `_empty_prompt.safetensors` at the folder root: `hidden` of the empty caption, for caption dropout;
- `json.encoders`: VAE id/revision, scaling/shift, bucket, crop box, original size; per variant the
  encoder id, max length, cleaning mode and token count.

The folder's `_stage.json` (stage `encode`) records the encoders once for the whole folder;
`encoded_info` returns that record and `check_encoders` refuses a folder encoded with other models.
"""
from __future__ import annotations

import json
import re
from typing import Any

from contract import fs
from contract.shards import BadMember, Sample
from contract.errors import PrxError
from contract.ledger import read_stage_json

LATENT_MEMBER = "latent.safetensors"
REPA_MEMBER = "repa.safetensors"
EMPTY_PROMPT_FILE = "_empty_prompt.safetensors"
EMB_PREFIX, EMB_SUFFIX = "emb_", ".safetensors"
ORIGINAL = "original"  # the variant held in the `txt` member
_VARIANT_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]*")

__all__ = [
    "EncoderMismatch", "encoded_info", "check_encoders", "load_empty_prompt", "read_latent", "read_image",
    "read_embedding",
    "available_variants", "read_repa", "encoder_meta", "caption_member", "embedding_member", "variant_of_member",
    "is_encoded_folder", "scale_latent", "unscale_latent", "sample_posterior", "LATENT_MEMBER", "REPA_MEMBER",
    "EMPTY_PROMPT_FILE", "ORIGINAL", "BadMember",
]


class EncoderMismatch(PrxError):
    """The folder was encoded with other models than the ones asked for."""


# --------------------------------------------------------------------------------------- member names
def check_variant_name(variant: str) -> str:
    if not _VARIANT_RE.fullmatch(variant or ""):
        raise ValueError(f"invalid caption variant name {variant!r}: use letters, digits, '_' or '-'")
    return variant


def caption_member(variant: str) -> str:
    """Where a caption variant's text lives: `original` -> `txt`, others -> `caption_{variant}.txt`."""
    return "txt" if variant == ORIGINAL else f"caption_{check_variant_name(variant)}.txt"


def embedding_member(variant: str) -> str:
    return f"{EMB_PREFIX}{check_variant_name(variant)}{EMB_SUFFIX}"


def variant_of_member(member: str) -> str | None:
    if member.startswith(EMB_PREFIX) and member.endswith(EMB_SUFFIX):
        v = member[len(EMB_PREFIX):-len(EMB_SUFFIX)]
        return v if _VARIANT_RE.fullmatch(v) else None
    return None


# --------------------------------------------------------------------------------------- folder level
def _not_encoded(folder: str, why: str) -> PrxError:
    return PrxError(f"{folder} is not an encoded folder ({why}): run `prx-data encode --in {folder} "
                      f"--out ENCODED_DIR` and point at ENCODED_DIR")


def encoded_info(folder: str) -> dict[str, Any]:
    """The encoders of an encode run, from its `_stage.json`.

    {"vae": {id, revision, scaling_factor, shift_factor, latent_channels, dtype, ...},
     "text_encoder": {id, revision, max_length, hidden_size, cleaning, ...},
     "variants": [...], "resolution": int, "buckets": "square"|"ar", "repa": {...} or None,
     "status": "running"|"complete", "folder": folder}
    Raises PrxError naming the fix for any folder not written by `prx-data encode`.
    """
    try:
        doc = read_stage_json(folder)
    except (OSError, ValueError) as exc:
        raise _not_encoded(folder, f"unreadable _stage.json: {exc}") from None
    if doc is None:
        raise _not_encoded(folder, "no _stage.json")
    if doc.get("stage") != "encode":
        raise _not_encoded(folder, f"it holds a run of stage {doc.get('stage')!r}")
    info = (doc.get("provenance") or {}).get("encoded")
    if not isinstance(info, dict) or "vae" not in info or "text_encoder" not in info:
        raise _not_encoded(folder, "its _stage.json has no encoder record")
    out = dict(info)
    out.setdefault("repa", None)
    out["status"] = doc.get("status")
    out["folder"] = folder
    return out


def is_encoded_folder(folder: str) -> bool:
    try:
        encoded_info(folder)
        return True
    except PrxError:
        return False


def _matches(asked: str, recorded: dict[str, Any]) -> bool:
    """Does the model the user names (alias, hub id or folder) match the recorded one?"""
    from contract.models import resolve

    if asked in (recorded.get("name"), recorded.get("id")):
        return True
    try:
        spec = resolve(asked)
    except (FileNotFoundError, ValueError):
        return False
    if spec.id != recorded.get("id"):
        return False
    if (spec.subfolder or None) != (recorded.get("subfolder") or None):
        return False
    rev = recorded.get("revision")
    return not (spec.revision and rev and spec.revision != rev)


def check_encoders(folder: str, vae: str | None = None, text_encoder: str | None = None) -> dict[str, Any]:
    """encoded_info(folder), after checking that it was encoded with `vae` and `text_encoder` (when given).

    Raises EncoderMismatch naming both ids when they differ."""
    info = encoded_info(folder)
    problems = []
    for label, asked, rec in (("VAE", vae, info["vae"]), ("text encoder", text_encoder, info["text_encoder"])):
        if asked and not _matches(asked, rec):
            problems.append(f"{label}: the folder was encoded with {rec.get('id')} (revision {rec.get('revision')}), "
                            f"the config asks for {asked}")
    if problems:
        raise EncoderMismatch(f"{folder} was encoded with other models: " + "; ".join(problems) +
                              ". Re-encode with `prx-data encode` using the config's models, or change the config.")
    return info


def load_empty_prompt(folder: str):
    """The empty caption's embedding (L x D, bfloat16), for caption dropout."""
    import torch
    from safetensors.torch import load

    path = fs.join(folder, EMPTY_PROMPT_FILE)
    if not fs.exists(path):
        encoded_info(folder)  # a clearer error when the folder is not an encoded one
        raise PrxError(f"{path} is missing: rerun `prx-data encode` into {folder} to write it")
    try:
        t = load(fs.read_bytes(path))["hidden"]
    except Exception as exc:  # noqa: BLE001
        raise PrxError(f"{path} is unreadable ({type(exc).__name__}: {exc}); rerun `prx-data encode`") from None
    if t.dtype != torch.bfloat16 or t.ndim != 2:
        raise PrxError(f"{path}: expected bfloat16 L x D, got {t.dtype} with shape {tuple(t.shape)}")
    return t


# --------------------------------------------------------------------------------------- sample level
def encoder_meta(sample: Sample) -> dict[str, Any]:
    """The sample's `json.encoders` section ({} when absent)."""
    meta = sample.meta()
    enc = meta.get("encoders") or {}
    if not isinstance(enc, dict):
        raise BadMember("json: encoders is not an object")
    return enc


def read_latent(sample: Sample):
    """(mean, logvar): float32 C x h x w tensors, validated (same shape, finite)."""
    import torch

    t = sample.tensors(LATENT_MEMBER, {"mean": (torch.float32, 3), "logvar": (torch.float32, 3)})
    mean, logvar = t["mean"], t["logvar"]
    if mean.shape != logvar.shape:
        raise BadMember(f"{LATENT_MEMBER}: mean {tuple(mean.shape)} and logvar {tuple(logvar.shape)} differ")
    if min(mean.shape) == 0:
        raise BadMember(f"{LATENT_MEMBER}: empty tensor {tuple(mean.shape)}")
    if not (torch.isfinite(mean).all() and torch.isfinite(logvar).all()):
        raise BadMember(f"{LATENT_MEMBER}: non-finite values")
    return mean, logvar


def read_image(sample: Sample):
    """The sample's image in its encoded space: (mean, logvar) of the VAE posterior, or in pixel space
    (pixels, None) with the crop as float32 3 x H x W in [-1, 1]."""
    from contract.encoders.pixels import PIXELS_MEMBER, read_pixels

    if PIXELS_MEMBER not in sample.members:
        return read_latent(sample)
    try:
        return read_pixels(sample.members[PIXELS_MEMBER]), None
    except Exception as exc:  # noqa: BLE001 - any decode failure is a bad member
        raise BadMember(f"{PIXELS_MEMBER}: unreadable ({type(exc).__name__}: {exc})") from None


def read_embedding(sample: Sample, variant: str):
    """The caption variant's last hidden states (L x D bfloat16, unpadded), or None when absent."""
    import torch

    name = embedding_member(variant)
    if name not in sample.members:
        return None
    t = sample.tensors(name, {"hidden": (torch.bfloat16, 2)})["hidden"]
    if t.shape[0] == 0 or t.shape[1] == 0:
        raise BadMember(f"{name}: empty tensor {tuple(t.shape)}")
    return t


def available_variants(sample: Sample) -> list[str]:
    """Caption variants with an embedding in this sample, sorted."""
    return sorted(v for v in (variant_of_member(m) for m in sample.members) if v)


def read_repa(sample: Sample):
    """The vision teacher's patch tokens (N x D bfloat16, row-major over the denoiser's grid), or None."""
    import torch

    if REPA_MEMBER not in sample.members:
        return None
    return sample.tensors(REPA_MEMBER, {"features": (torch.bfloat16, 2)})["features"]


# --------------------------------------------------------------------------------------- latents
def sample_posterior(mean, logvar, generator=None):
    """A draw from the VAE posterior N(mean, exp(logvar)) (what `latent_dist.sample()` does)."""
    import torch

    logvar = logvar.clamp(-30.0, 20.0)  # diffusers' DiagonalGaussianDistribution clamps the same way
    eps = torch.randn(mean.shape, generator=generator, dtype=mean.dtype, device=mean.device)
    return mean + torch.exp(0.5 * logvar) * eps


def scale_latent(latent, vae_info: dict[str, Any]):
    """VAE latent -> the denoiser's space: (x - shift) * scaling (the inverse of PRXPipeline's decode), or for
    FLUX.2's VAE (normalisation batch_norm_2x2) Flux2Pipeline's 2x2 patchify, (x - bn_mean) / bn_std, unpatchify
    (the denoiser keeps the VAE's channels and grid, as PRX's prx_flux2)."""
    if vae_info.get("normalisation") == "batch_norm_2x2":
        mean, std = _bn_stats(latent, vae_info)
        return _unpatchify_2x2((_patchify_2x2(latent) - mean) / std)
    return (latent - float(vae_info.get("shift_factor") or 0.0)) * float(vae_info.get("scaling_factor") or 1.0)


def unscale_latent(latent, vae_info: dict[str, Any]):
    """The denoiser's space -> VAE latent: x / scaling + shift (what PRXPipeline does before vae.decode), or for
    FLUX.2's VAE patchify, x * bn_std + bn_mean, unpatchify (what Flux2Pipeline does before vae.decode)."""
    if vae_info.get("normalisation") == "batch_norm_2x2":
        mean, std = _bn_stats(latent, vae_info)
        return _unpatchify_2x2(_patchify_2x2(latent) * std + mean)
    return latent / float(vae_info.get("scaling_factor") or 1.0) + float(vae_info.get("shift_factor") or 0.0)


def _bn_stats(latent, vae_info: dict[str, Any]):
    import torch

    def col(key):
        return torch.tensor(vae_info[key], dtype=latent.dtype, device=latent.device).view(-1, 1, 1)

    return col("bn_mean"), col("bn_std")


def _patchify_2x2(z):
    """[..., C, H, W] -> [..., 4C, H/2, W/2], channel order c*4 + 2*dy + dx (Flux2Pipeline._patchify_latents)."""
    *lead, c, h, w = z.shape
    n = len(lead)
    z = z.reshape(*lead, c, h // 2, 2, w // 2, 2)  # c, y, dy, x, dx
    z = z.permute(*range(n), n, n + 2, n + 4, n + 1, n + 3)  # c, dy, dx, y, x
    return z.reshape(*lead, c * 4, h // 2, w // 2)


def _unpatchify_2x2(z):
    """The inverse of `_patchify_2x2` (Flux2Pipeline._unpatchify_latents)."""
    *lead, c4, h, w = z.shape
    n = len(lead)
    z = z.reshape(*lead, c4 // 4, 2, 2, h, w)  # c, dy, dx, y, x
    z = z.permute(*range(n), n, n + 3, n + 1, n + 4, n + 2)  # c, y, dy, x, dx
    return z.reshape(*lead, c4 // 4, h * 2, w * 2)


def dumps_info(info: dict[str, Any]) -> str:
    return json.dumps(info, indent=2, sort_keys=True, default=str)
