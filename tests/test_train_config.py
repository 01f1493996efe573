"""prx-train's options as facts kept in one place: base.yaml against the defaults, the loader's settings taken
from TrainConfig by name, and the one rule for draw weights (caption variants, sources)."""
from __future__ import annotations

import dataclasses
import inspect
import math

import pytest

from contract.config import ConfigError, read_yaml
from trainer.batches import LoaderSettings
from trainer.config import TrainConfig, check_weights, load_config, load_mixture
from trainer.data import MixtureLoader

BASE = "manifests/train/base.yaml"
# base.yaml's keys that are deliberately not the defaults: the recipe's encoders (the defaults take the
# shards'), its captions (long only, also over a mixture's; the defaults take the mixture's) and its run length
# and cadence (the defaults are a short run).
RECIPE_ONLY = {"vae", "text_encoder", "caption", "steps", "log_every", "checkpoint_every"}


def test_base_yaml_states_the_defaults_but_the_recipes_encoders_captions_and_length():
    keys = {str(k).replace("-", "_") for k in read_yaml(BASE)}
    base, default = load_config({"config": BASE}), TrainConfig()
    differ = {k for k in keys if getattr(base, k) != getattr(default, k)}
    assert differ == RECIPE_ONLY, f"base.yaml differs from TrainConfig's defaults in {sorted(differ)}"
    assert RECIPE_ONLY <= keys


def test_loader_settings_are_train_config_options_by_name():
    names = {f.name for f in dataclasses.fields(LoaderSettings)} - {"rank"}
    assert names <= set(TrainConfig.__dataclass_fields__)  # a renamed option fails here, not silently
    default = TrainConfig()
    assert {n: getattr(LoaderSettings(default.batch_size), n) for n in names} == \
        {n: getattr(default, n) for n in names}
    loader_defaults = {n: p.default for n, p in inspect.signature(MixtureLoader).parameters.items()
                       if n in names and p.default is not p.empty}
    assert loader_defaults == {n: getattr(default, n) for n in names - {"batch_size"}}
    cfg = TrainConfig(model="tiny", seed=5, batch_size=3, text_max_length=7, open_shards=2, shuffle_buffer=9)
    assert dataclasses.asdict(LoaderSettings.of(cfg, rank=1)) == {
        "batch_size": 3, "seed": 5, "rank": 1, "text_max_length": 7, "open_shards": 2, "shuffle_buffer": 9}
    assert LoaderSettings.of(cfg, rank=0, batch_size=8, seed=6).batch_size == 8


@pytest.mark.parametrize("weights", [{"long": -0.5, "short": 1.0}, {"long": 0.0}, {"long": math.nan},
                                     {"long": math.inf, "short": 1.0}, {}])
def test_weights_rule(weights):
    with pytest.raises(ConfigError, match="caption weights must be finite and >= 0 with a positive sum"):
        check_weights(weights, "caption weights")


def test_weights_rule_accepts_zero_among_positive():
    assert check_weights({"long": 0.0, "short": 2.0}, "caption weights") == {"long": 0.0, "short": 2.0}


def test_every_weight_source_goes_through_the_rule(tmp_path):
    with pytest.raises(ConfigError, match="--caption weights must be finite"):
        TrainConfig(model="tiny", caption={"long": math.nan})
    mix = tmp_path / "mix.yaml"
    mix.write_text("sources:\n  a: {shards: a, weight: 1}\ncaptions: {long: .nan}\n")
    with pytest.raises(ConfigError, match="^caption weights must be finite"):
        load_mixture(TrainConfig(model="tiny", mix=str(mix)))
    mix.write_text("sources:\n  a: {shards: a, weight: -1}\n  b: {shards: b, weight: 2}\n")
    with pytest.raises(ConfigError, match="source weights must be finite"):
        load_mixture(TrainConfig(model="tiny", mix=str(mix)))
