"""Every check before any work: what a config names is checked on the driver before Ray starts,
and a run whose workers cannot set up fails once, without Ray's retries."""

from __future__ import annotations

import pytest
import torch

from mmray.config import ConfigError
from mmray.train.experiment import load_experiment, preflight
from mmray.tune.grid import load_ablation, preflight_ablation

from helpers import load_pipeline


def test_preflight_names_every_missing_file_and_unknown_name(tmp_path):
    cfg = load_experiment(None, [
        "data.dataset=cremad", f"data.root={tmp_path / 'no-cremad'}",
        f"model.weights={{audio: {tmp_path / 'a.pt'}}}", f"model.clip_weights={tmp_path / 'clip.pt'}",
        "model.encoder=timm", "model.timm_name=resnet_nope",
        "data.text.tokenizer=open_clip", "data.text.open_clip_model=ViT-Nope",
    ])
    problems = preflight(cfg)
    assert len(problems) == 5, problems
    for where in ("data.root", "model.weights.audio", "model.clip_weights", "model.timm_name",
                  "data.text.open_clip_model"):
        assert sum(p.startswith(f"{where}:") for p in problems) == 1, (where, problems)
    assert any(str(tmp_path / "a.pt") in p for p in problems)


def test_preflight_of_the_defaults_and_existing_files_is_clean(tmp_path):
    assert preflight(load_experiment(None)) == []  # synthetic: its raw folder is generated
    weights = tmp_path / "a.pt"
    torch.save({}, weights)
    cfg = load_experiment(None, [f"data.root={tmp_path}", "data.dataset=cremad",
                                 f"model.weights={{audio: {weights}}}"])
    assert preflight(cfg) == []


def test_method_path_options_and_model_names_are_checked(tmp_path):
    cfg = load_experiment(None, ["method.name=m2pt", f"method.options.aux_weights={tmp_path / 'aux.pt'}",
                                 "method.options.timm_name=vit_nope"])
    problems = preflight(cfg)
    assert [p.split(":")[0] for p in problems] == ["method.options.aux_weights",
                                                   "method.options.timm_name"], problems


def test_ablation_preflight_lists_each_problem_once_with_its_cells(tmp_path):
    abl = load_ablation("configs/ablations/m2pt.yaml",
                        [f"method.options.aux_weights={tmp_path / 'aux.pt'}"])
    with pytest.raises(ConfigError) as e:
        preflight_ablation(abl)
    text = str(e.value)
    assert text.count("method.options.aux_weights") == 1 and str(tmp_path / "aux.pt") in text


def test_pipelines_fail_on_a_missing_file_before_ray_starts(tmp_path, capsys):
    import ray

    ablate, train = load_pipeline("ablate"), load_pipeline("train")
    missing = f"method.options.aux_weights={tmp_path / 'aux.pt'}"
    assert ablate.main(["--config", "configs/ablations/m2pt.yaml", missing]) == 2
    assert train.main(["--config", "configs/methods/m2pt.yaml", missing]) == 2
    err = capsys.readouterr().err
    assert err.count("method.options.aux_weights") == 2 and "not found" in err
    assert not ray.is_initialized()


@pytest.mark.ray
def test_a_setup_error_fails_the_run_once_without_retries(tiny_data, tmp_path):
    from mmray.train.ray_train import SetupError, build_trainer, fit_trainer, setup_errors

    cfg, prepared = tiny_data
    weights = tmp_path / "a.pt"
    torch.save({}, weights)  # exists, so preflight passes; the small encoders take no weights
    cfg = load_experiment(None, [f"data.root={cfg.data.root}", f"data.data_dir={cfg.data.data_dir}",
                                 f"model.weights={{audio: {weights}}}", "train.max_failures=2",
                                 "train.report_poll_s=0.1"])
    assert preflight(cfg) == []
    trainer = build_trainer(cfg, prepared.version_dir, "bad-setup", str(tmp_path / "runs"))
    with pytest.raises(SetupError, match="small encoders take no pretrained weights"):
        fit_trainer(trainer)
    assert len(setup_errors(trainer.train_loop_config)) == 1  # one attempt, not 1 + max_failures


def test_a_method_the_dataset_cannot_run_is_named_before_any_work(tmp_path):
    from mmray.data.sources.synthetic import SyntheticConfig, generate

    root = tmp_path / "syn3"
    generate(SyntheticConfig(num_samples=30, modalities=["audio", "image", "text"],
                             strength={"audio": 0.9, "image": 0.5, "text": 0.5}), root)
    cfg = load_experiment(None, [f"data.root={root}", "method.name=dynmm"])
    problems = preflight(cfg)
    assert len(problems) == 1 and problems[0].startswith("method.name: dynmm needs exactly 2 "
                                                         "modalities"), problems
    assert "'audio', 'image', 'text'" in problems[0]
    assert preflight(load_experiment(None, [f"data.root={root}", "method.name=normal"])) == []
