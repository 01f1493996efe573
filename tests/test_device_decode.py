"""`--decode gpu` (pipeline/device_decode.py) on this CPU machine: the device path run with `--decode-device cpu`.

What must hold: the device path takes only the JPEGs it decodes as Pillow does and hands everything else (PNG,
CMYK, an EXIF rotation, a truncated file, too many pixels) to the CPU decoder; its decode is Pillow's pixel for
pixel; its resize is Pillow's two-pass LANCZOS exactly; encode and filter runs with it write the golden bytes and
ledger rows of the default decoder (the corrupt JPEG of each input keeps its CPU reason and detail).
"""
from __future__ import annotations

import io
import os

import numpy as np
import pytest
import torch
from PIL import Image

from contract.images import decode_image
from contract.shards import Problem, read_shard
from pipeline.cli import main
from pipeline.device_decode import on_device, resize_box
from test_filter_golden import COMMON, GOLDEN, RUNS, golden_in, observed  # noqa: F401 - golden_in is a fixture
from test_host_path_golden import GOLDEN_LEDGER, GOLDEN_MEMBERS, captioned, ledger_digest, member_digest, run_encode  # noqa: F401


def _bytes(arr: np.ndarray, fmt: str = "JPEG", mode: str | None = None, **kw) -> bytes:
    img = Image.fromarray(arr)
    img = img.convert(mode) if mode else img
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


def _rotated(arr: np.ndarray) -> bytes:
    exif = Image.Exif()
    exif[0x0112] = 6
    return _bytes(arr, exif=exif.tobytes())


def test_device_decode_is_pillows_decode(photos):
    for name, arr in list(photos.items())[:4]:
        for data in (_bytes(arr, quality=90), _bytes(arr, quality=75, subsampling=0), _bytes(arr, mode="L"),
                     _bytes(arr, progressive=True)):
            img, info = on_device(data, None, "cpu")
            ref, ref_info = decode_image(data)
            assert info == ref_info
            assert np.array_equal(img.permute(1, 2, 0).numpy(), np.asarray(ref)), name


def test_what_the_device_path_leaves_to_the_cpu_decoder(photos):
    arr = next(iter(photos.values()))
    jpeg = _bytes(arr)
    for data in (_bytes(arr, "PNG"), _bytes(arr, mode="CMYK"), _rotated(arr), jpeg[: len(jpeg) // 2], b"",
                 b"not an image at all"):
        assert on_device(data, None, "cpu") is None
    assert on_device(jpeg, arr.shape[0] * arr.shape[1] - 1, "cpu") is None   # over --max-image-pixels
    assert on_device(jpeg, arr.shape[0] * arr.shape[1], "cpu") is not None


def _pillow_two_pass(img: Image.Image, box, size) -> np.ndarray:
    """Pillow's LANCZOS of a box as its two passes: horizontal over every row, then vertical."""
    (left, top, right, bottom), (h, w) = box, size
    wide = img.resize((w, img.height), Image.Resampling.LANCZOS, box=(left, 0, right, img.height))
    return np.asarray(wide.resize((w, h), Image.Resampling.LANCZOS, box=(0, top, w, bottom)))


def test_resize_box_is_pillows_two_pass_lanczos(photos):
    rng = np.random.default_rng(0)
    arrays = [a for a in photos.values()][:3]
    for trial in range(24):
        arr = arrays[trial % len(arrays)][::2, ::2].copy()     # half size: quick
        H, W = arr.shape[:2]
        left, top = int(rng.integers(0, W // 2)), int(rng.integers(0, H // 2))
        box = (left, top, int(rng.integers(left + 4, W + 1)), int(rng.integers(top + 4, H + 1)))
        size = (int(rng.integers(4, 300)), int(rng.integers(4, 300)))      # down- and upscaling, either axis
        if trial % 6 == 0:
            box, size = (0, top, W, box[3]), (size[0], W)                   # no horizontal pass
        got = resize_box(torch.from_numpy(arr).permute(2, 0, 1).contiguous(), box, size).numpy()
        assert np.array_equal(got, _pillow_two_pass(Image.fromarray(arr), box, size)), (box, size)


def test_encode_with_device_decode_writes_the_golden_bytes(captioned, tiny_model, tmp_path):
    jpegs = [s.members["jpg"] for shard in sorted(os.listdir(captioned)) if shard.endswith(".tar")
             for s in read_shard(os.path.join(captioned, shard)) if not isinstance(s, Problem)]
    taken = sum(on_device(j, None, "cpu") is not None for j in jpegs)
    assert 0 < taken < len(jpegs)                     # both paths run: the device's and the CPU fallback
    out = run_encode(captioned, str(tmp_path / "encoded"), tiny_model, decode="gpu", decode_device="cpu")
    assert member_digest(out) == GOLDEN_MEMBERS
    assert ledger_digest(out) == GOLDEN_LEDGER        # its truncated JPEGs: the CPU decoder's decode_error rows


def test_filter_with_device_decode_writes_the_golden_bytes(golden_in, tmp_path, tiny_model):  # noqa: F811
    model = tiny_model("tiny-clip")
    out, rej = tmp_path / "out", tmp_path / "rejected"
    assert main(["filter", "--in", str(golden_in / "raw"), "--out", str(out), "--write-rejected", str(rej),
                 *RUNS["a"](golden_in, model), *COMMON, "--decode", "gpu", "--decode-device", "cpu"]) == 0
    got, want = observed(golden_in, tmp_path, out, rej, model), GOLDEN["a"]
    assert {k: v for k, v in got.items() if k != "config_payload"} == \
        {k: v for k, v in want.items() if k != "config_payload"}
    assert got["config_payload"] != want["config_payload"]    # the decoder is in the provenance


@pytest.mark.parametrize("stage", ["encode", "filter"])
def test_decode_flags_have_help(stage, capsys):
    with pytest.raises(SystemExit):
        main([stage, "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "--decode {cpu,gpu}" in text and "nvJPEG" in text and "--decode-device" in text
