"""Resolution-aware conditioning: `vec` (PRX's formula, an effect only through its module, the baseline's init
elsewhere, an export that PRXPipeline loads) and `token` (PRX's tokens before the text; sampled through the
Denoiser, refused by prx-export)."""
import math

import pytest
import torch

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


def test_token_mode_is_prxs_tokens_before_the_text():
    from trainer.algorithms.resolution_aware import ResolutionTokens

    den = Denoiser(build_model("tiny", 16, 32))
    ResolutionAware(TrainConfig(model="tiny", resolution_aware="token")).build(den, None)
    tokens = den.aux["resolution_tokens"]
    assert isinstance(tokens, ResolutionTokens) and not any(k.startswith("resolution") for k in
                                                            den.transformer.state_dict())
    # PRX: stack([h_embedder(timestep_embedding(H, 128, time_factor=1)), w_embedder(same for W)], dim=1)
    got = tokens(2, 8, 6, dtype=torch.float32)
    for i, (mlp, size) in enumerate(((tokens.h_embedder, 8.0), (tokens.w_embedder, 6.0))):
        emb = prx_timestep_embedding(torch.full((2,), size), 128, time_factor=1.0)
        torch.testing.assert_close(got[:, i], mlp.out_layer(torch.nn.functional.silu(mlp.in_layer(emb))))
    # the forward: txt_in's output gets the two tokens in front, the mask two ones
    seen = {}
    den.transformer.blocks[0].register_forward_pre_hook(
        lambda m, args, kw: seen.update(txt=kw["encoder_hidden_states"], mask=kw["attention_mask"]), with_kwargs=True)
    x = inputs(h=8, w=6)
    den(**x)
    txt = den.transformer.txt_in(x["encoder_hidden_states"])  # (the hook: tokens before the text)
    torch.testing.assert_close(seen["txt"], txt)
    torch.testing.assert_close(seen["txt"][:, :2], tokens(2, 8, 6, dtype=torch.float32))
    assert seen["txt"].shape[1] == 7 and seen["mask"].shape[-1] == 7 and bool(seen["mask"][:, :2].all())


def test_token_mode_changes_the_output_only_through_its_tokens():
    base, den = Denoiser(build_model("tiny", 16, 32)), Denoiser(build_model("tiny", 16, 32))
    ResolutionAware(TrainConfig(model="tiny", resolution_aware="token")).build(den, None)
    for m in (base, den):  # the same perturbed weights: a fresh PRX model's modulation is zero
        g = torch.Generator().manual_seed(1)
        with torch.no_grad():
            for p in m.transformer.parameters():
                p.add_(0.05 * torch.randn(p.shape, generator=g))
    x = inputs()
    assert not torch.allclose(den(**x)[0], base(**x)[0])
    den(**x)[0].square().mean().backward()
    assert all(p.grad is not None for p in den.aux["resolution_tokens"].parameters())


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


def test_a_token_run_samples_fine_tunes_and_is_not_exported(eval_runs, tmp_path, capsys):
    from conftest import train_tiny
    from safetensors.torch import load_file

    from trainer.export import main as export_main
    from trainer.sample import Sampler, open_run

    run = train_tiny(eval_runs["enc"], tmp_path / "run", resolution_aware="token")
    sampler = Sampler(open_run(run))
    assert "resolution_tokens" in sampler.model.aux
    assert export_main([run, "--out", str(tmp_path / "out")]) != 0
    assert "trained with resolution_aware" in capsys.readouterr().err
    # seed 1: a fresh init of the tokens would differ from the parent's by far more than one step moves them
    child = train_tiny(eval_runs["enc"], tmp_path / "child", resolution_aware="token", init_from=run, steps=1, seed=1)
    parent_tokens = sampler.model.aux["resolution_tokens"].state_dict()
    # one step from the parent's tokens (lr 1e-3): close to them, far from a fresh init
    got = load_file(f"{child}/checkpoints/step-00000001/aux.safetensors")
    diff = max(float((got["resolution_tokens." + k] - v).abs().max()) for k, v in parent_tokens.items())
    assert diff < 5e-3
    with pytest.raises(ValueError, match="--resolution-aware token"):
        train_tiny(eval_runs["enc"], tmp_path / "plain", init_from=run, steps=1)
