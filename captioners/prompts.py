"""Prompts are files (`captioners/prompts/{variant}.txt`); their sha256 is recorded with every caption."""
from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

PROMPT_DIR = Path(__file__).resolve().parent / "prompts"


@dataclass(frozen=True)
class Prompt:
    variant: str
    text: str
    path: str
    sha256: str

    def provenance(self) -> dict[str, str]:
        return {"file": Path(self.path).name, "sha256": self.sha256}


def builtin_variants() -> list[str]:
    return sorted(p.stem for p in PROMPT_DIR.glob("*.txt"))


def load(variant: str, folder: str | None = None) -> Prompt:
    """The prompt for `variant` from `folder` (default: the built-in prompts)."""
    path = Path(folder or PROMPT_DIR) / f"{variant}.txt"
    if not path.is_file():
        raise FileNotFoundError(f"no prompt for variant {variant!r}: expected {path} "
                                f"(built-in variants: {', '.join(builtin_variants())})")
    data = path.read_bytes()
    return Prompt(variant, data.decode("utf-8").strip(), str(path), hashlib.sha256(data).hexdigest())
