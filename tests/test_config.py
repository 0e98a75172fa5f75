"""Config validation: every error names its key and what is accepted; every YAML loads."""

from __future__ import annotations

from pathlib import Path

import pytest

from mmray.config import ConfigError, config_hash, flatten, load_config, parse_overrides, to_dict
from mmray.train.experiment import ExperimentConfig, load_experiment
from mmray.tune.grid import AblationConfig, load_ablation

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
ALL_YAML = sorted(CONFIGS.rglob("*.yaml"))


def _errors(overrides, cls=ExperimentConfig, path=None) -> str:
    with pytest.raises(ConfigError) as e:
        load_config(path, overrides, cls=cls)
    return str(e.value)


def test_defaults_are_valid():
    cfg = load_experiment(None)
    assert cfg.method.name == "normal" and cfg.data.dataset == "synthetic"


@pytest.mark.parametrize("override, expected", [
    ("train.lr=-1", "train.lr: -1.0 is out of range; accepted: (0.0, 10.0]"),
    ("train.epochs=x", "train.epochs: expected an integer, got 'x'"),
    ("train.optimizer=lbfgs", "train.optimizer: 'lbfgs' is not accepted; accepted: one of 'sgd', 'adam', 'adamw'"),
    ("method.name=nope", "method.name: unknown method 'nope'; known: ['agm', 'dynmm', 'dynmm_fusion', "),
    ("data.dataset=nope", "data.dataset: unknown dataset 'nope'; known: ["),
    ("bogus.key=1", "bogus: unknown key; known: ["),
    ("train.bogus=1", "train.bogus: unknown key; known: ["),
    ("method.fusion=avg", "method.fusion: 'avg' is not accepted; accepted: one of 'concat', 'sum'"),
    ("data.synthetic.strength={audio: 1.5, image: 0.5}", "data.synthetic.strength.audio: 1.5 is outside [0, 1]"),
    ("data.synthetic.strength={audoi: 0.5}", "data.synthetic.strength.audoi: not a modality; accepted: audio, image, text"),
    ("data.synthetic.modalities=[image, text]", "data.synthetic.strength: no strength for modality 'text'"),
    ("method.options={gamma: 1}", "method.options.gamma: unknown key"),
    ("train.compile=1", "train.compile: expected true or false, got 1"),
    ("train.precision=fp8", "train.precision: 'fp8' is not accepted; accepted: one of 'auto', 'fp32', 'bf16', 'fp16'"),
])
def test_each_error_names_the_key(override, expected):
    assert expected in _errors([override])


def test_strengths_of_modalities_not_written_are_dropped(tmp_path):
    # The included base sets {audio: 0.9, image: 0.5}; mappings merge, so audio stays unless dropped.
    (tmp_path / "it.yaml").write_text(
        f"include: [{CONFIGS / 'base.yaml'}]\n"
        "data: {synthetic: {modalities: [image, text], strength: {image: 0.9, text: 0.6}}}\n")
    cfg = load_experiment(tmp_path / "it.yaml")
    assert cfg.data.synthetic.strength == {"image": 0.9, "text": 0.6}


def test_a_grid_value_switching_the_method_starts_from_its_default_options():
    from mmray.tune.grid import trial_experiment

    base = to_dict(load_experiment(None, ["method.name=ogm_ge", "method.options={alpha: 0.3}"]))
    exp = trial_experiment(base, {"method": {"name": "normal"}}, {})
    assert exp.method.name == "normal" and exp.method.options == {}
    assert trial_experiment(base, {"method.name": "qmf"}, {}).method.options["rank_weight"] == 1.0
    same = trial_experiment(base, {"method": {"name": "ogm_ge", "options": {"conv_only": True}}}, {})
    assert same.method.options["alpha"] == 0.3 and same.method.options["conv_only"] is True


def test_errors_are_gathered_into_one_message():
    msg = _errors(["train.lr=-1", "train.epochs=0", "method.name=nope"])
    assert "train.lr" in msg and "train.epochs" in msg and "method.name" in msg


def test_ablation_grid_values_are_validated_before_any_work():
    msg = _errors(["grid={method.fusion: [concat, avg], seed: [0]}"], cls=AblationConfig)
    assert "grid.method.fusion='avg'" in msg and "accepted: one of 'concat', 'sum'" in msg
    msg = _errors(["grid={train.lr: [0.1, -2.0]}"], cls=AblationConfig)
    assert "grid.train.lr=-2.0" in msg and "out of range" in msg


def test_search_space_keys_must_exist():
    msg = _errors(["search.space={train.lrr: {type: loguniform, low: 0.001, high: 0.1}}"],
                  cls=AblationConfig)
    assert "search.space.train.lrr: not a key of the experiment config" in msg
    msg = _errors(["search.space={train.lr: {type: loguniform, low: 0, high: 0.1}}"], cls=AblationConfig)
    assert "loguniform range needs low > 0" in msg


def test_ablation_overrides_reach_the_experiment():
    abl = load_ablation(CONFIGS / "ablations/demo.yaml", ["train.epochs=7", "grid.seed=[3]"])
    assert abl.experiment.train.epochs == 7 and abl.grid["seed"] == [3]


def test_includes_merge_in_order(tmp_path):
    (tmp_path / "a.yaml").write_text("train: {epochs: 5, lr: 0.5}\n")
    (tmp_path / "b.yaml").write_text("include: [a.yaml]\ntrain: {epochs: 9}\n")
    cfg = load_experiment(tmp_path / "b.yaml")
    assert cfg.train.epochs == 9 and cfg.train.lr == 0.5


def test_missing_include_and_file_are_named(tmp_path):
    (tmp_path / "b.yaml").write_text("include: [nope.yaml]\n")
    assert "nope.yaml not found" in _errors([], path=tmp_path / "b.yaml")
    assert "config file not found" in _errors([], path=tmp_path / "absent.yaml")


def test_overrides_parse_as_yaml():
    assert parse_overrides(["a.b=3", "c=[1, 2]", "d=true", "e=x"]) == [
        ("a.b", 3), ("c", [1, 2]), ("d", True), ("e", "x")]
    with pytest.raises(ConfigError, match="expected key.path=value"):
        parse_overrides(["novalue"])


def test_hash_and_flatten_are_stable():
    a, b = load_experiment(None), load_experiment(None)
    assert config_hash(a) == config_hash(b)
    assert config_hash(a) != config_hash(load_experiment(None, ["seed=1"]))
    flat = flatten({"train": {"lr": 0.1}, "grid": {}})
    assert flat == {"train.lr": 0.1, "grid": {}}


@pytest.mark.parametrize("path", ALL_YAML, ids=lambda p: str(p.relative_to(CONFIGS)))
def test_every_yaml_loads(path):
    cls = AblationConfig if path.parent.name == "ablations" else ExperimentConfig
    header = []
    for line in path.read_text().splitlines():
        if not line.startswith("#"):
            break
        header.append(line)
    own = f"--config {path.relative_to(CONFIGS.parent)}"
    assert any("Run: " in line and own in line for line in header), \
        f"{path}: the header comment must give the command that runs this file ({own})"
    load_config(path, cls=cls)


@pytest.mark.parametrize("path", sorted((CONFIGS / "methods").glob("*.yaml")), ids=lambda p: p.name)
def test_method_yamls_do_not_restate_defaults(path):
    """A method's defaults live in its Config only: a YAML names just what it changes."""
    import dataclasses

    import yaml

    from mmray.methods import METHODS

    method = yaml.safe_load(path.read_text())["method"]
    defaults = dataclasses.asdict(METHODS[method["name"]].Config())
    restated = {k: v for k, v in (method.get("options") or {}).items() if defaults.get(k) == v}
    assert not restated, f"{path.name} restates defaults of its method's Config: {restated}"
    assert method.get("fusion", "") != "concat", f"{path.name} restates method.fusion=concat"


def test_grid_mapping_values_merge_into_the_base():
    from mmray.tune.grid import trial_experiment

    abl = load_ablation(CONFIGS / "ablations/demo.yaml", ["method.fusion=sum"])
    cfg = trial_experiment(to_dict(abl.experiment), {"method": {"name": "mla", "options": {"fusion_rule": "fixed"}}}, {})
    assert cfg.method.name == "mla" and cfg.method.fusion == "sum"  # fusion kept from the base
    assert cfg.method.options["fusion_rule"] == "fixed" and cfg.method.options["project"] is True
    msg = _errors(["grid={method: [{name: mla, options: {fusion_rule: sometimes}}]}"], cls=AblationConfig)
    assert "method.options.fusion_rule" in msg


@pytest.mark.parametrize("path", sorted((CONFIGS / "ablations").glob("*.yaml")), ids=lambda p: p.name)
def test_every_ablation_shrinks_to_a_smoke_run(path):
    from mmray.pipeline_support import SMOKE_OVERRIDES

    abl = load_ablation(path, SMOKE_OVERRIDES)  # what `ablate.py --smoke` loads
    assert abl.experiment.train.epochs == 1 and abl.experiment.data.synthetic.num_samples == 48


def test_paths_are_made_absolute_where_the_config_is_loaded(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cfg = load_experiment(None, ["data.root=raw", "model.weights={audio: w/a.pt}",
                             "method.name=m2pt", "method.options={aux_weights: ~/aux.pt}"])
    assert cfg.data.root == str(tmp_path / "raw")
    assert cfg.model.weights == {"audio": str(tmp_path / "w" / "a.pt")}
    assert cfg.method.options["aux_weights"] == str(Path("~/aux.pt").expanduser())
    assert load_experiment(None, ["data.root=s3://bucket/raw"]).data.root == "s3://bucket/raw"


def test_a_path_in_a_grid_value_resolves_against_the_ablation_folder(tmp_path, monkeypatch):
    """A trial runs in a Ray session folder; its grid values' paths mean the driver's folder."""
    from mmray.tune.grid import trial_experiment

    base = to_dict(load_experiment(None))
    monkeypatch.chdir(tmp_path)  # where the trial process happens to run
    cell = {"method": {"name": "m2pt", "options": {"aux_weights": "aux/audio.pt"}}}
    cfg = trial_experiment(base, cell, {}, workdir="/work/abl")
    assert cfg.method.options["aux_weights"] == "/work/abl/aux/audio.pt"
