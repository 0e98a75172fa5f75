"""Method presets: a preset sets options on top of the Config defaults, options given explicitly
win, unknown presets are refused naming the accepted ones, and grid values that switch the
method or the preset start from that method's and preset's options."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from mmray.config import ConfigError, to_dict
from mmray.methods import METHODS
from mmray.train.experiment import load_experiment
from mmray.tune.grid import trial_experiment

PRESETS = [(name, preset) for name, cls in sorted(METHODS.items()) for preset in sorted(cls.presets)]


@pytest.mark.parametrize("name, preset", PRESETS, ids=[f"{n}-{p}" for n, p in PRESETS])
def test_a_preset_resolves_to_its_options_and_an_explicit_option_wins(name, preset):
    cls = METHODS[name]
    # a method on CLIP's towers needs CLIP's tokens (checked when the experiment loads)
    clip = ["data.text.tokenizer=open_clip", "data.text.open_clip_model=mmray-tiny"] \
        if cls.clip_backbone else []
    cfg = load_experiment(None, [f"method.name={name}", f"method.preset={preset}", *clip])
    expected = {**dataclasses.asdict(cls.Config()), **cls.presets[preset]}
    assert cfg.method.options == expected
    key = next(f.name for f in dataclasses.fields(cls.Config) if f.type in ("bool", bool))
    flipped = load_experiment(None, [f"method.name={name}", f"method.preset={preset}", *clip,
                                     f"method.options.{key}={str(not expected[key]).lower()}"])
    assert flipped.method.options == {**expected, key: not expected[key]}


@pytest.fixture
def toy_presets(monkeypatch):
    ogm = METHODS["ogm_ge"]
    monkeypatch.setattr(ogm, "presets", {"reference": {"conv_only": True, "alpha": 0.5},
                                         "paper": {}})
    return ogm


def test_unknown_presets_name_the_accepted_ones(toy_presets):
    with pytest.raises(ConfigError, match=r"method.preset: method ogm_ge has no preset 'ref'; "
                                          r"accepted: \['paper', 'reference'\]"):
        load_experiment(None, ["method.name=ogm_ge", "method.preset=ref"])
    with pytest.raises(ConfigError, match="method normal has no preset 'paper'"):
        load_experiment(None, ["method.preset=paper"])


def test_grid_values_switching_preset_or_method_start_from_their_options(toy_presets):
    base = to_dict(load_experiment(None, ["method.name=ogm_ge", "method.preset=reference",
                                          "method.options.gaussian_enhance=false"]))
    assert base["method"]["options"]["alpha"] == 0.5
    paper = trial_experiment(base, {"method.preset": "paper"}, {})
    assert paper.method.options["alpha"] == 0.8 and paper.method.options["conv_only"] is False
    same = trial_experiment(base, {"method": {"preset": "reference"}}, {})
    assert same.method.options["gaussian_enhance"] is False  # same preset: base options kept
    normal = trial_experiment(base, {"method": {"name": "normal"}}, {})
    assert normal.method.preset == "" and normal.method.options == {}


ABLATIONS = sorted((Path(__file__).resolve().parents[1] / "configs" / "ablations").glob("*.yaml"))
CLAIMS = [p for p in ABLATIONS if "reference" in p.read_text()]


@pytest.mark.parametrize("path", CLAIMS, ids=lambda p: p.name)
def test_ablations_that_say_reference_run_presets(path):
    """An ablation file that speaks of the reference runs every method that has presets under
    a named preset (reference, or the paper beside it), never under the plain defaults."""
    from mmray.tune.grid import expand_grid, load_ablation

    abl = load_ablation(path)
    base = to_dict(abl.experiment)
    used: dict[str, set[str]] = {}
    for cell in expand_grid(abl.grid):
        method = trial_experiment(base, cell, {}).method
        if METHODS[method.name].presets:
            assert method.preset, f"{path.name}: cell {cell} runs {method.name} with no preset"
            used.setdefault(method.name, set()).add(method.preset)
    assert used, f"{path.name} mentions the reference but runs no method that has presets"
    for name, presets in used.items():
        assert presets & {"reference", "reference_rgbd", "mla"}, (path.name, name, presets)


def test_a_method_built_directly_resolves_its_preset(toy_presets):
    from mmray.encoders import ModelConfig
    from mmray.methods import MethodConfig, build_method

    from helpers import SPEC

    model = ModelConfig(width=2, feature_dim=4)
    method = build_method(SPEC, model, MethodConfig("ogm_ge", preset="reference",
                                                   options={"alpha": 0.3}))
    assert method.options.conv_only is True and method.options.alpha == 0.3
    with pytest.raises(ValueError, match="method.preset: method ogm_ge has no preset 'nope'"):
        build_method(SPEC, model, MethodConfig("ogm_ge", preset="nope"))
