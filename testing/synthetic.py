"""Synthetic encoded folders: the layout `prx-data encode` writes, with seeded random latents and embeddings.

For loader tests and benchmarks at real sizes (16 x 32 x 32 latent moments, 2304-wide BF16 embeddings of
~200, ~40 and ~20 tokens) without running a VAE or a text encoder. Written with the project's shard writer
(`contract.shards.ShardWriter`: tar + ledger per shard); `_stage.json` carries an encoder record of the same
form as the encode stage's (`contract.encoded.encoded_info` reads it), naming the synthetic models.

Every sample's json says which shard and which position it was written at (`synthetic: {shard, index}`) and
its `source`, like an ingested sample, so tests can check mixing and `prx-data audit` reads it.
"""
from __future__ import annotations

import json
import os
from typing import Any

import torch
from safetensors.torch import save

from contract import fs, ledger
from contract.encoded import EMPTY_PROMPT_FILE, LATENT_MEMBER, embedding_member
from contract.shards import ShardWriter, dumps_json

REAL_TOKENS = {"long": 200, "medium": 40, "short": 20}


def encoder_record(latent_shape: tuple[int, int, int], text_dim: int, variants: list[str], *,
                   max_length: int = 512, cleaning: str = "prx", vae_id: str = "synthetic/vae",
                   text_id: str = "synthetic/text-encoder") -> dict[str, Any]:
    c, h, _ = latent_shape
    return {"format_version": 1,
            "vae": {"name": vae_id, "id": vae_id, "revision": None, "subfolder": None, "scaling_factor": 1.0,
                    "shift_factor": 0.0, "latent_channels": c, "downsample": 8},
            "text_encoder": {"name": text_id, "id": text_id, "revision": None, "subfolder": None,
                             "max_length": max_length, "hidden_size": text_dim, "cleaning": cleaning},
            "variants": list(variants), "resolution": 8 * h, "buckets": "square", "repa": None,
            "empty_prompt": EMPTY_PROMPT_FILE}


def write_encoded_folder(folder: str, shards: int, per_shard: int, *, latent_shape=(16, 32, 32), text_dim: int = 2304,
                         tokens: dict[str, int] | None = None, source: str = "synthetic", seed: int = 0,
                         record: dict[str, Any] | None = None) -> str:
    """Write `shards` shards of `per_shard` samples; returns `folder`. `tokens`: variant -> token count."""
    tokens = dict(tokens or REAL_TOKENS)
    os.makedirs(folder, exist_ok=True)
    g = torch.Generator().manual_seed(seed)
    for s in range(shards):
        writer = ShardWriter(folder, s, "encode")
        for i in range(per_shard):
            key = f"{source}{s:04d}{i:05d}"
            members = {LATENT_MEMBER: save({"mean": torch.randn(latent_shape, generator=g),
                                            "logvar": torch.full(latent_shape, -6.0)})}
            for v, n in tokens.items():
                members[embedding_member(v)] = save({"hidden": torch.randn(n, text_dim, generator=g).bfloat16()})
            meta = {"key": key, "source": source, "synthetic": {"shard": s, "index": i},
                    "encoders": {"latent": {"shape": list(latent_shape)},
                                 "captions": {v: {"tokens": n} for v, n in tokens.items()}}}
            members["json"] = dumps_json(meta)
            writer.write(key, members)
            writer.add_row(ledger.row(key, f"{source}:{key}"))
        writer.close()
    fs.write_bytes_atomic(fs.join(folder, EMPTY_PROMPT_FILE),
                          save({"hidden": torch.randn(2, text_dim, generator=g).bfloat16()}))
    doc = {"stage": "encode", "status": "complete", "inputs": [], "config": {},
           "provenance": {"encoded": record or encoder_record(latent_shape, text_dim, list(tokens))}}
    fs.write_bytes_atomic(fs.join(folder, "_stage.json"), json.dumps(doc, indent=2).encode("utf-8"))
    return folder
