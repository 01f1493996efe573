"""The encode stage's text-encoder batches: captions sorted by length, so a forward computes few padding tokens.
Its padding waste (tokens computed / real tokens) is counted per shard and logged."""
from __future__ import annotations

import io
import logging
import random

import pytest
from PIL import Image

from conftest import photo_arrays
from contract import ledger
from contract.shards import ShardWriter
from test_host_path_golden import WORDS, ExactEncode, caption, run_encode


def mixed_captions(n: int, seed: int = 0) -> list[str]:
    """Half short (4-15 words), half long (60-200 words), shuffled."""
    rng = random.Random(seed)
    out = []
    for k in range(n):
        words = rng.randint(4, 15) if k % 2 else rng.randint(60, 200)
        out.append(" ".join(rng.choice(WORDS) for _ in range(words)) + ".")
    rng.shuffle(out)
    return out


@pytest.fixture(scope="module")
def stage_and_text(tiny_model, tmp_path_factory):
    from contract.config import build_config
    from pipeline.stages.encode import EncodeConfig

    tmp = tmp_path_factory.mktemp("padding")
    cfg = build_config(EncodeConfig, {"input": str(tmp), "out": str(tmp / "out"), "vae": tiny_model("tiny-flux-vae"),
                                      "text_encoder": tiny_model("tiny-t5gemma"), "max_length": 256,
                                      "batch_size": 16})
    stage = ExactEncode(cfg)
    return stage, stage.models()[1]


def padding_of(order: list[list[int]], batch: int) -> float:
    chunks = [order[s:s + batch] for s in range(0, len(order), batch)]
    return sum(len(c) * max(map(len, c)) for c in chunks) / sum(len(x) for x in order)


def test_sorted_batches_pad_under_1_2_on_a_long_short_mix(stage_and_text):
    stage, text = stage_and_text
    captions = mixed_captions(96)
    ids = text.token_ids(captions)
    assert padding_of(ids, 16) > 1.5          # the same captions unsorted: the mix is one that pads a lot
    hidden = stage._encode_texts([(k, "long", t, x) for k, (t, x) in enumerate(zip(captions, ids))], text)
    assert [hidden[(k, "long")].shape[0] for k in range(len(ids))] == [len(x) for x in ids]
    assert stage.padding.forwards == 6 and stage.padding.real == sum(map(len, ids))
    print(stage.padding.describe(), f"unsorted {padding_of(ids, 16):.3f}")
    assert 1.0 <= stage.padding.ratio < 1.2, stage.padding.describe()


def test_padding_is_logged_per_shard(tmp_path, tiny_model, caplog):
    src = tmp_path / "in"
    w = ShardWriter(str(src), 0, "recaption")
    buf = io.BytesIO()
    Image.fromarray(next(iter(photo_arrays().values()))).save(buf, format="JPEG", quality=90)
    for k in range(6):
        key = f"{k:032x}"
        w.write(key, {"jpg": buf.getvalue(), "txt": caption(k, 5 + 30 * (k % 2)).encode(), "json": b"{}"})
        w.add_row(ledger.row(key, key))
    w.close()
    with caplog.at_level(logging.INFO, logger="pipeline.stages.encode"):
        run_encode(str(src), str(tmp_path / "out"), tiny_model, variants=["original"])
    lines = [r.getMessage() for r in caplog.records if "text-encoder padding" in r.getMessage()]
    assert len(lines) == 1 and lines[0].startswith("encode shard 000000: text-encoder padding ")
    assert "over 2 forwards" in lines[0]
