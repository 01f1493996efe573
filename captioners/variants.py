"""Caption variants: each has a prompt file, a word band and a token budget (all overridable by the stage)."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class VariantSpec:
    min_words: int
    max_words: int
    max_new_tokens: int
    max_sentences: int | None = None


# long: ~160 words on subject, composition, lighting, palette, atmosphere, style (PRX: FID 18.2 vs 36.8 short).
# short: one sentence of ~10-15 words.
DEFAULTS: dict[str, VariantSpec] = {
    "long": VariantSpec(120, 200, 400),
    "short": VariantSpec(5, 25, 64, max_sentences=1),
}
FALLBACK = VariantSpec(1, 10_000, 256)


def spec(variant: str) -> VariantSpec:
    return DEFAULTS.get(variant, FALLBACK)
