"""Make the registry's torchvision importable beside a CPU-only torch (the `.venv-vllm` of `make test-vllm`).

The torchvision wheel on the package registry is a CUDA build: its C++ ops (`_C.so`: nms, roi_align,
deform_conv) and its image decoder (`image.so`) link libtorch_cuda and cannot load beside `torch+cpu`.
torchvision then runs without them (`torchvision.extension._has_ops()` is False; calling such an op raises its
"Couldn't load custom C++ ops" error), except that `_meta_registrations.py` registers fake kernels for
`torchvision::nms` and `torchvision::qnms` unconditionally, and registering a kernel for an undefined op
fails, so `import torchvision` fails. This script guards those two registrations with `_has_ops()`, as the
same file already does for its other ops. transformers needs torchvision's Python transforms (the Qwen2-VL
processor builds its video processor from them); nothing in prx calls torchvision's C++ ops.

    python -m testing.torchvision_cpu       # in the environment to fix; idempotent
"""
from __future__ import annotations

import importlib.util
import os
import sys

MARK = "# prx: guarded for a CPU-only torch (testing/torchvision_cpu.py)"
GUARD = (f"\n\n{MARK}\n"
         "def _register_fake_if_ops(name):\n"
         "    return torch.library.register_fake(name) if torchvision.extension._has_ops() else (lambda fn: fn)\n")
IMPORT_LINE = "import torchvision.extension  # noqa: F401\n"
OPS = ("torchvision::nms", "torchvision::qnms")


def patched(source: str) -> str:
    """`_meta_registrations.py`'s text with the unconditional fake registrations guarded."""
    if MARK in source:
        return source
    if IMPORT_LINE not in source:
        raise SystemExit("torchvision_cpu: torchvision/_meta_registrations.py is not the expected file")
    out = source.replace(IMPORT_LINE, IMPORT_LINE + GUARD, 1)
    for op in OPS:
        line = f'@torch.library.register_fake("{op}")'
        if line not in out:
            raise SystemExit(f"torchvision_cpu: no registration of {op} in torchvision/_meta_registrations.py")
        out = out.replace(line, f'@_register_fake_if_ops("{op}")')
    return out


def main() -> int:
    spec = importlib.util.find_spec("torchvision")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("torchvision_cpu: torchvision is not installed here")
    path = os.path.join(list(spec.submodule_search_locations)[0], "_meta_registrations.py")
    with open(path, encoding="utf-8") as fh:
        source = fh.read()
    new = patched(source)
    if new != source:
        with open(path, "w", encoding="utf-8") as fh:
            fh.write(new)
    print(f"torchvision_cpu: {path} {'patched' if new != source else 'already patched'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
