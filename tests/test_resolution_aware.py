"""Resolution-aware conditioning (`--resolution-aware vec`): PRX's formula, an effect only through its module,
the baseline's init elsewhere, and an export that PRXPipeline loads; `token` mode refused with its reason."""
import math

import pytest
import torch

from contract.config import ConfigError
from trainer.algorithms.resolution_aware import ResolutionAware
from trainer.config import TrainConfig
from trainer.model import Denoiser, build_model


def prx_timestep_embedding(t, dim, max_period=10000, time_factor=1000.0):
    """Photoroom/PRX prx/models/prx_layers.py `timestep_embedding`, copied as the reference."""
    t = time_factor * t
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(start=0, end=half, dtype=torch.float32) / half)
    args = t[:, None].float() * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


def with_embedder(seed=0):
    den = Denoiser(build_model("tiny", 16, 32, seed=seed))
    ResolutionAware(TrainConfig(model="tiny", resolution_aware="vec", seed=seed)).build(den, None)
    return den


def inputs(h=8, w=6):
    g = torch.Generator().manual_seed(0)
    return dict(hidden_states=torch.randn(2, 16, h, w, generator=g), timestep=torch.rand(2, generator=g),
                encoder_hidden_states=torch.randn(2, 5, 32, generator=g),
                attention_mask=torch.ones(2, 5, dtype=torch.bool))


def test_the_embedding_is_prxs_vec_mode():
    emb = with_embedder().transformer.resolution_embedder
    h, w = torch.tensor([32.0, 64.0]), torch.tensor([48.0, 16.0])
    # PRX's ResolutionEmbedder (vec): MLP(concat[timestep_embedding(H, 128, time_factor=1), same for W])
    sin = torch.cat([prx_timestep_embedding(h, 128, time_factor=1.0), prx_timestep_embedding(w, 128, time_factor=1.0)],
                    dim=-1)
    expect = emb.mlp.out_layer(torch.nn.functional.silu(emb.mlp.in_layer(sin)))
    torch.testing.assert_close(emb(h, w, dtype=torch.float32), expect)


def test_it_changes_the_output_only_through_its_module_and_leaves_the_baseline_init():
    base, den = Denoiser(build_model("tiny", 16, 32)), with_embedder()
    new = {k for k in den.state_dict()} - set(base.state_dict())
    assert new and all(k.startswith("transformer.resolution_embedder.") for k in new)
    for k, v in base.state_dict().items():  # every other weight is the baseline's
        assert torch.equal(v, den.state_dict()[k]), k
    with torch.no_grad():  # a fresh PRX model's modulation is zero: give the blocks something to modulate
        for m in (base, den):
            g = torch.Generator().manual_seed(1)
            for n, p in m.transformer.named_parameters():
                if "resolution_embedder" not in n:
                    p.add_(0.05 * torch.randn(p.shape, generator=g))
    x = inputs()
    assert not torch.allclose(den(**x)[0], base(**x)[0])
    with torch.no_grad():
        den.transformer.resolution_embedder.mlp.out_layer.weight.zero_()
        den.transformer.resolution_embedder.mlp.out_layer.bias.zero_()
    torch.testing.assert_close(den(**x)[0], base(**x)[0], rtol=0, atol=0)


def test_token_mode_is_refused_with_its_reason():
    with pytest.raises(ConfigError, match="--resolution-aware vec"):
        TrainConfig(model="tiny", resolution_aware="token")


def test_a_vec_run_exports_and_loads_in_prx_pipeline(eval_runs, tmp_path):
    from conftest import train_tiny
    from diffusers import PRXPipeline, PRXTransformer2DModel

    from trainer.export import export

    run = train_tiny(eval_runs["enc"], tmp_path / "run", resolution_aware="vec")
    pipe = PRXPipeline.from_pretrained(export(run, str(tmp_path / "export")))
    assert pipe.transformer.config.resolution_embeds and pipe.transformer.resolution_embedder is not None
    trained = PRXTransformer2DModel.from_pretrained(f"{run}/checkpoints/step-00000002/transformer").state_dict()
    got = pipe.transformer.state_dict()
    assert got.keys() == trained.keys() and any("resolution_embedder" in k for k in got)
    for k, v in trained.items():
        assert torch.equal(v, got[k]), k
    image = pipe(prompt_embeds=torch.randn(1, 4, 32), prompt_attention_mask=torch.ones(1, 4, dtype=torch.bool),
                 guidance_scale=1.0, num_inference_steps=2, height=64, width=32, output_type="pt",
                 use_resolution_binning=False).images
    assert image.shape[-2:] == (64, 32)
