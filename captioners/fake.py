"""A deterministic backend with no model: captions built from the image's colours, in the variant's band.

For plumbing dry runs (`--backend fake`) and tests. `PRX_FAKE_DELAY` (seconds per generate call) and
`PRX_FAKE_LOG` (a file that gets one `key variant seed` line per generated caption) let tests watch what is
regenerated after a crash.
"""
from __future__ import annotations

import os
import random
from typing import Any

from captioners.base import Backend, Generation, Request

_LONG = [
    "The frame is filled by {subject} whose {tone} tones dominate the composition from edge to edge.",
    "Light falls softly across the scene, leaving gentle shadows that give the surfaces some depth.",
    "The palette leans toward {colour}, balanced by quieter neutral areas near the borders.",
    "The camera looks at the subject from a slightly elevated angle, so the ground plane recedes naturally.",
    "Fine textures are visible in the brighter regions, while the darker corners fall into a calm blur.",
    "The atmosphere feels {mood}, as if the moment was captured on an ordinary afternoon.",
    "Its style is that of a straightforward photograph, without heavy filters or obvious retouching.",
    "Contrast stays moderate, which keeps details readable in both highlights and shadows.",
    "Small variations of hue ripple through the middle ground and lead the eye toward the centre.",
    "Nothing in view suggests hurry; the arrangement is stable, orderly and easy to read.",
    "A subtle grain adds a tactile quality that suits the overall restrained presentation.",
    "The background remains uncluttered, letting the main shapes stand out against it clearly.",
    "Edges are crisp where the focus lands, then soften gradually with increasing distance.",
    "Overall the picture conveys a {mood} mood through its {tone} light and simple geometry.",
]


class FakeBackend(Backend):
    name = "fake"

    def __init__(self, model: str = "fake", sampling: dict[str, Any] | None = None, **_: Any):
        self.model = model
        self._sampling = {"temperature": 0.7, **{k: v for k, v in (sampling or {}).items() if v is not None}}
        self.delay = float(os.environ.get("PRX_FAKE_DELAY", "0") or 0)
        self.log = os.environ.get("PRX_FAKE_LOG") or None

    def model_info(self) -> dict[str, Any]:
        return {"name": self.model, "id": "fake", "revision": "1"}

    def sampling(self) -> dict[str, Any]:
        return dict(self._sampling)

    def caption(self, req: Request) -> str:
        small = req.image.convert("RGB").resize((1, 1))
        r, g, b = small.getpixel((0, 0))
        colour = max((("red", r), ("green", g), ("blue", b)), key=lambda t: t[1])[0]
        tone = "bright" if r + g + b > 380 else "dark" if r + g + b < 200 else "mid"
        mood = {"bright": "open and cheerful", "dark": "quiet and moody", "mid": "calm and balanced"}[tone]
        rng = random.Random(req.seed)
        if req.variant == "short" or req.max_new_tokens < 100:
            return f"A {tone} photograph with mostly {colour} colours and a {mood.split()[0]} everyday feeling."
        parts = _LONG[:1] + rng.sample(_LONG[1:], len(_LONG) - 1)
        return " ".join(p.format(subject="a photographed scene", tone=tone, colour=colour, mood=mood)
                        for p in parts[:11])

    def generate(self, requests: list[Request]) -> list[Generation]:
        import time

        if self.delay:
            time.sleep(self.delay)
        out = []
        for req in requests:
            text = self.caption(req)
            out.append(Generation(text=text, num_tokens=len(text.split()) + 1, finish_reason="stop",
                                  mean_logprob=None, seed=req.seed))
        if self.log:
            with open(self.log, "a") as fh:
                fh.writelines(f"{r.key} {r.variant} {r.seed}\n" for r in requests)
        return out
