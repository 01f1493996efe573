"""The denoiser: diffusers' PRXTransformer2DModel, so a checkpoint loads in diffusers' PRXPipeline.

`prx-small` is the PRX ablation model (1.17B parameters with T5Gemma-2B's 2304-wide context); `tiny` is a
few-hundred-thousand-parameter model of the same class for tests and CPU benchmarks. `in_channels` and
`context_in_dim` come from the shards (the VAE's latent channels, the text encoder's width).
"""
from __future__ import annotations

import os
from typing import Any

import torch

PRESETS: dict[str, dict[str, Any]] = {
    # PRX ablation model: hidden 1792, depth 16, 28 heads (head dim 64 = axes 32 + 32), mlp 3.5, patch 2.
    "prx-small": dict(hidden_size=1792, depth=16, num_heads=28, mlp_ratio=3.5, patch_size=2, axes_dim=[32, 32]),
    # Same class, test-sized: head dim 32 = axes 16 + 16.
    "tiny": dict(hidden_size=64, depth=2, num_heads=2, mlp_ratio=2.0, patch_size=2, axes_dim=[16, 16]),
    # PRX's DC-AE model (prx_dcae_small): prx-small with patch 1 on DC-AE's 32-channel, 32x-compressed latents.
    "prx-dcae-small": dict(hidden_size=1792, depth=16, num_heads=28, mlp_ratio=3.5, patch_size=1, axes_dim=[32, 32]),
    # PRX's pixel-space JiT model (prx_jit_32_small): prx-small on 32 x 32 pixel patches through a 256 bottleneck.
    "prx-jit-32-small": dict(hidden_size=1792, depth=16, num_heads=28, mlp_ratio=3.5, patch_size=32,
                             axes_dim=[32, 32], bottleneck_size=256),
    # Same shape, test-sized: 8 x 8 pixel patches through a 32 bottleneck.
    "tiny-pixel": dict(hidden_size=64, depth=2, num_heads=2, mlp_ratio=2.0, patch_size=8, axes_dim=[16, 16],
                       bottleneck_size=32),
}


class PrecisionError(RuntimeError):
    """Trainable weights are not in the dtype the config asks for (the FP32 master-weights guard)."""


def model_config(name: str, in_channels: int, context_in_dim: int) -> dict[str, Any]:
    if name not in PRESETS:
        raise KeyError(f"unknown model preset {name!r}; known: {sorted(PRESETS)}")
    return dict(PRESETS[name], in_channels=int(in_channels), context_in_dim=int(context_in_dim))


def build_model(name: str, in_channels: int, context_in_dim: int, seed: int = 0):
    """A PRXTransformer2DModel from a preset (seeded init) or a folder (from_pretrained), checked against the data."""
    from diffusers import PRXTransformer2DModel

    if name not in PRESETS:
        if not os.path.isdir(name):
            raise FileNotFoundError(f"model {name!r}: not a preset ({', '.join(PRESETS)}) nor a folder")
        from contract.models import from_pretrained, resolve

        model = from_pretrained(resolve(name, "diffusers.PRXTransformer2DModel"), PRXTransformer2DModel,
                                flag="--model")
        model = model.float()
        got = (model.config.in_channels, model.config.context_in_dim)
        if got != (in_channels, context_in_dim):
            raise ValueError(f"model {name} has in_channels={got[0]}, context_in_dim={got[1]} but the shards have "
                             f"latent channels {in_channels} and text width {context_in_dim}")
        return model
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return PRXTransformer2DModel(**model_config(name, in_channels, context_in_dim))


SPACE_PRESETS = {"diffusers.AutoencoderDC": "prx-dcae-small", "none": "prx-jit-32-small"}  # PRX's model per space


def check_preset_for_space(name: str, vae_info: dict[str, Any]) -> None:
    """`--model prx-small` on shards of a space PRX trains another variant for (DC-AE: patch 1; pixel space: JiT
    patch 32 with a bottleneck) stops, naming that preset."""
    want = SPACE_PRESETS.get(str(vae_info.get("class")))
    if name == "prx-small" and want:
        from contract.errors import PrxError

        raise PrxError(f"--model prx-small on {vae_info.get('class')} shards: PRX trains {want} in this space "
                       f"(pass --model {want}, or a folder with your own configuration)")


def check_fits(in_channels: int, patch: int, vae_info: dict[str, Any], resolution: int, buckets: str) -> None:
    """Refuse, before any step, a denoiser whose channels or patch do not fit the shards' space: its
    in_channels must be the space's channels, and every bucket's grid (size / downsample) must divide by its
    patch size."""
    from contract.encoders import buckets as bk
    from contract.errors import PrxError

    channels, down = int(vae_info["latent_channels"]), int(vae_info["downsample"])
    space = ("pixel space (--vae none)" if vae_info.get("class") == "none"
             else f"the VAE's latents ({vae_info.get('id')})")
    if in_channels != channels:
        raise PrxError(f"the model takes {in_channels} channels but the shards hold {space} with "
                       f"{channels}: use a model built for them (pixel space: --model prx-jit-32-small)")
    sizes = list(bk.aspect_ratio_bins()[resolution].values()) if buckets == bk.AR else [[resolution, resolution]]
    bad = [(h, w) for h, w in sizes if (h // down) % patch or (w // down) % patch]
    if bad:
        raise PrxError(f"the model's patch size {patch} does not divide the {space} grid of bucket(s) "
                       f"{', '.join(f'{h}x{w}' for h, w in bad[:4])} (downsample {down}): use a model with a patch "
                       f"that divides it, or re-encode at a resolution whose grid it divides")


def count_parameters(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def check_weights_dtype(model: torch.nn.Module, weights_dtype: str = "fp32") -> None:
    """Refuse trainable weights that are not FP32, unless the BF16-storage ablation was asked for."""
    want = {"fp32": torch.float32, "bf16": torch.bfloat16}[weights_dtype]
    bad = [(n, p.dtype) for n, p in model.named_parameters() if p.requires_grad and p.dtype != want]
    if bad:
        name, dtype = bad[0]
        if weights_dtype == "fp32":
            raise PrecisionError(
                f"{len(bad)} trainable parameter(s) are not FP32 (first: {name} is {dtype}); the trainer keeps FP32 "
                "master weights and computes in BF16 autocast. Storing weights in BF16 is an ablation (it cost "
                "3.7 FID in PRX): pass --weights-dtype bf16 to run it on purpose.")
        raise PrecisionError(f"--weights-dtype {weights_dtype}: parameter {name} is {dtype}")


def forward_flops(cfg: dict[str, Any], height: int, width: int, text_len: int,
                  route: tuple[int, int, int] | None = None, fusion: bool = False) -> int:
    """FLOPs of one forward pass for one sample (a multiply-add = 2 FLOPs).

    N = (height/p)(width/p) image tokens, L = text tokens (padded length), d = hidden, m = int(d * mlp_ratio),
    P = in_channels p^2, D = context_in_dim, per block:
        img QKV 6Nd^2 + text KV 4Ld^2 + attention 4N(N+L)d + out proj 2Nd^2 + gated MLP 6Ndm + modulation 12d^2
    plus txt_in 2LDd + img_in 2NPd + time MLP 2(256d + d^2) + final layer (4d^2 + 2NdP).
    Training FLOPs = 3 x forward (backward = 2 x forward). Norms, RoPE and softmax are left out.
    route = (start, end, kept tokens): blocks start .. end - 1 are counted at the kept length (TREAD/SPRINT);
    fusion adds SPRINT's Linear(2d -> d) over all tokens, 4Nd^2.
    """
    p, d = cfg["patch_size"], cfg["hidden_size"]
    n = (height // p) * (width // p)
    L = text_len
    m = int(d * cfg["mlp_ratio"])
    P = cfg["in_channels"] * p * p
    D = cfg["context_in_dim"]

    def block(k: int) -> int:
        return 6 * k * d * d + 4 * L * d * d + 4 * k * (k + L) * d + 2 * k * d * d + 6 * k * d * m + 12 * d * d

    rest = 2 * L * D * d + 2 * n * P * d + 2 * (256 * d + d * d) + 4 * d * d + 2 * n * d * P
    if route is None:
        return int(cfg["depth"] * block(n) + rest + (4 * n * d * d if fusion else 0))
    start, end, kept = route
    routed = max(0, min(end, cfg["depth"]) - start)
    return int((cfg["depth"] - routed) * block(n) + routed * block(kept) + rest + (4 * n * d * d if fusion else 0))


def train_flops_per_sample(cfg: dict[str, Any], height: int, width: int, text_len: int,
                           route: tuple[int, int, int] | None = None, fusion: bool = False) -> int:
    return 3 * forward_flops(cfg, height, width, text_len, route, fusion)


# ------------------------------------------------------------------------------------------- denoiser + aux
# The auxiliary modules the denoiser runs at inference too (part of the model, carried into a fine-tune start),
# with the flag that adds them. The others (REPA's projector) serve training only.
INFERENCE_AUX = {"sprint_fusion": "--routing sprint", "resolution_tokens": "--resolution-aware token"}


class Denoiser(torch.nn.Module):
    """The PRXTransformer2DModel plus the training algorithms' auxiliary modules, as one module (so DDP reduces
    the auxiliary gradients too). Called like the transformer (`return_dict=False`), plus:

    - `repa_features` (B x N x D): also return the per-sample REPA cosine of block `repa_block`'s output;
    - `route_seed`: the seed of this forward's TREAD/SPRINT route (training only).

    `transformer` is saved with `save_pretrained`; `aux` (`repa_projector`, `sprint_fusion`,
    `resolution_tokens`) goes to `aux.safetensors`. Without routing, fusion and resolution tokens the forward is
    the transformer's own. The algorithms (trainer/algorithms/) set it up in their `build` through `set_routing`,
    `add_repa` and `add_resolution_tokens`; the constructor's arguments do the first two in one call.
    """

    def __init__(self, transformer, routing: str = "none", route_start: int = 0, route_end: int = 0,
                 route_ratio: float = 0.0, repa_block: int | None = None, repa_dim: int | None = None,
                 seed: int = 0):
        super().__init__()
        self.transformer = transformer
        self.aux = torch.nn.ModuleDict()
        self.routing, self.route_start, self.route_end, self.route_ratio = "none", 0, 0, 0.0
        self.repa_block, self.repa_hook = None, None
        if routing != "none":
            self.set_routing(routing, route_start, route_end, route_ratio, seed)
        if repa_block is not None:
            self.add_repa(repa_block, repa_dim, seed)

    @property
    def config(self):
        return self.transformer.config

    def set_routing(self, routing: str, start: int, end: int, ratio: float, seed: int = 0) -> None:
        """TREAD or SPRINT over blocks start .. end - 1; SPRINT adds its fusion layer (seeded by seed + 1)."""
        from trainer.algorithms import routing as routing_mod

        self.routing, self.route_start, self.route_end = routing, start, end
        self.route_ratio = float(ratio or 0.0)
        if routing == "sprint":
            self.aux["sprint_fusion"] = routing_mod.SprintFusion(self.config.hidden_size, seed=seed + 1)

    def add_repa(self, block: int, dim: int, seed: int = 0, projector: str = "mlp") -> None:
        """REPA's projector (hidden -> dim, seeded by seed + 2: REPA's `mlp`, or iREPA's `attention` / `conv`,
        trainer/algorithms/irepa.py) and the hook that reads block `block`'s output."""
        from trainer.algorithms import irepa, repa

        self.repa_block = block
        hidden = self.config.hidden_size
        self.aux["repa_projector"] = (repa.RepaProjector(hidden, int(dim), seed=seed + 2) if projector == "mlp"
                                      else irepa.build_projector(projector, hidden, int(dim), seed=seed + 2))
        self.repa_hook = repa.RepaHook(self.transformer.blocks[block])

    def add_resolution_tokens(self, tokens: torch.nn.Module) -> None:
        """PRX's resolution tokens (trainer/algorithms/resolution_aware.py): `tokens(B, H, W, dtype)` (B x 2 x
        hidden) put before the text tokens by a forward hook on `txt_in`; the forward extends the mask."""
        self.aux["resolution_tokens"] = tokens
        self.transformer.txt_in.register_forward_hook(self._prepend_resolution_tokens)

    def _prepend_resolution_tokens(self, module, args, txt: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.aux["resolution_tokens"](*self._latent_grid, dtype=txt.dtype), txt], dim=1)

    def stop_repa(self) -> None:
        """REPA burn-in over: remove the hook and freeze the projector (it keeps its weights)."""
        if self.repa_hook is not None:
            self.repa_hook.remove()
            self.repa_hook = None
            self.aux["repa_projector"].requires_grad_(False)

    def route(self, hidden_states: torch.Tensor, seed: int | None):
        """This forward's Route, or None when the plain forward applies (no routing, eval mode, ratio 0)."""
        from trainer.algorithms import routing as routing_mod

        if self.routing == "none":
            return None
        p = self.transformer.config.patch_size
        n = (hidden_states.shape[-2] // p) * (hidden_states.shape[-1] // p)
        keep = None
        if self.training and routing_mod.routed_count(n, self.route_ratio) > 0:
            if seed is None:
                raise ValueError("a routed training forward needs route_seed (seed, step, rank, micro-batch)")
            keep = routing_mod.draw_route(hidden_states.shape[0], n, self.route_ratio, seed, hidden_states.device)
        if keep is None and self.routing == "tread":
            return None
        return routing_mod.Route(self.route_start, self.route_end, keep)

    def forward(self, hidden_states, timestep, encoder_hidden_states, attention_mask=None, return_dict=False,
                repa_features=None, route_seed=None):
        from trainer.algorithms import routing as routing_mod

        route = self.route(hidden_states, route_seed)
        if "resolution_tokens" in self.aux:  # two tokens go before the text (the txt_in hook): the mask grows
            self._latent_grid = (hidden_states.shape[0], *hidden_states.shape[-2:])
            if attention_mask is not None:
                attention_mask = torch.cat([attention_mask.new_ones(attention_mask.shape[0], 2), attention_mask], 1)
        want_repa = repa_features is not None and self.repa_hook is not None
        if want_repa:
            self.repa_hook.recording = True
        try:
            if route is None:
                out = self.transformer(hidden_states=hidden_states, timestep=timestep,
                                       encoder_hidden_states=encoder_hidden_states, attention_mask=attention_mask,
                                       return_dict=False)[0]
            else:
                out = routing_mod.routed_forward(self.transformer, hidden_states, timestep, encoder_hidden_states,
                                                 attention_mask, route, self.aux["sprint_fusion"]
                                                 if "sprint_fusion" in self.aux else None)
        finally:
            hidden = self.repa_hook.take() if want_repa else None
        if not want_repa:
            return (out,)
        p = self.config.patch_size
        grid = (hidden_states.shape[-2] // p, hidden_states.shape[-1] // p)
        routed = route is not None and route.keep is not None and route.start <= self.repa_block <= route.end
        # the block saw the kept tokens only when it is routed
        return out, self.aux["repa_projector"].cosine(hidden, repa_features.to(hidden.device), grid,
                                                       route.keep if routed else None)
