"""The ablation grid: its schema (`AblationConfig`), its cells and their names.

A grid's categorical axes (method, fusion, missing rate, seed, ...) are run exhaustively; the
continuous ranges of `search.space` are searched inside each cell (`mmray.tune.search`). Nothing
here imports Ray or Optuna, so configs are checked and cells named without either.
"""

from __future__ import annotations

import copy
import dataclasses
import itertools
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from mmray.config import ConfigError, bounds, from_dict, has_path, load_config, merge_path, to_dict
from mmray.report import ReportConfig
from mmray.train.experiment import ExperimentConfig, preflight


def apply_grid_value(exp: dict, key: str, value: Any) -> dict:
    """`merge_path` of one grid value into an experiment dict; a value that switches the method
    or its preset drops the base's method options first (they are the resolved options of the
    base's method and preset, and would override the new preset's)."""
    switch = dict(value) if key == "method" and isinstance(value, Mapping) else (
        {key.split(".")[1]: value} if key in ("method.name", "method.preset") else {})
    method = exp.get("method")
    if isinstance(method, dict):
        if "name" in switch and method.get("name") != switch["name"]:
            method.pop("preset", None)  # the base's preset is one of the base method's
            method.pop("options", None)
        elif "preset" in switch and method.get("preset", "") != switch["preset"]:
            method.pop("options", None)
    return merge_path(exp, key, value)


def value_label(value: Any) -> str:
    """A short label for a grid value: mappings become their leaf values joined by '+'."""
    if isinstance(value, Mapping):
        return "+".join(value_label(v) for v in value.values())
    return str(value)


def expand_grid(grid: dict[str, list[Any]]) -> list[dict[str, Any]]:
    """Cartesian product of the axes, in the order the axes are written."""
    keys = list(grid)
    return [dict(zip(keys, values)) for values in itertools.product(*(grid[k] for k in keys))]


def short_keys(keys: list[str]) -> dict[str, str]:
    """Last path component of each key, or the whole key where two would collide."""
    last = [k.split(".")[-1] for k in keys]
    return {k: (s if last.count(s) == 1 else k) for k, s in zip(keys, last)}


def cell_name(cell: dict[str, Any]) -> str:
    """A filesystem- and MLflow-safe name, e.g. `name=normal,fusion=concat,seed=0`."""
    if not cell:
        return "base"
    short = short_keys(list(cell))
    name = ",".join(f"{short[k]}={value_label(v)}" for k, v in cell.items())
    return re.sub(r"[^A-Za-z0-9_.,=+-]", "_", name)


def trial_name(cell: dict[str, Any], index: int, num_samples: int) -> str:
    return cell_name(cell) if num_samples == 1 else f"{cell_name(cell)},t={index}"


@dataclass
class ParamRange:
    """A hyperparameter range Optuna searches."""

    type: Literal["float", "loguniform", "int", "categorical"] = "float"
    low: float = 0.0
    high: float = 1.0
    choices: list[Any] = field(default_factory=list)

    def validate(self, path: str, errors: list[str]) -> None:
        if self.type == "categorical":
            if not self.choices:
                errors.append(f"{path}.choices: a categorical range needs a non-empty list")
        elif not self.low < self.high:
            errors.append(f"{path}: low ({self.low}) must be below high ({self.high})")
        elif self.type == "loguniform" and self.low <= 0:
            errors.append(f"{path}.low: a loguniform range needs low > 0, got {self.low}")


@dataclass
class SearchConfig:
    # Experiment key paths (e.g. train.lr) and the ranges Optuna searches for each grid cell.
    space: dict[str, ParamRange] = field(default_factory=dict)
    # Optuna trials per grid cell (the same budget for every method).
    num_samples: int = field(default=1, metadata=bounds(1))
    # Metric that selects the best trial of a cell, and its direction.
    metric: str = "val/acc"
    mode: Literal["max", "min"] = "max"


@dataclass
class ResourcesConfig:
    # Trials run at once; 0 = as many as the cluster's CPUs/GPUs fit.
    max_concurrent_trials: int = field(default=0, metadata=bounds(0))


def _check_baseline(baseline: dict[str, Any], grid: dict[str, list[Any]],
                    errors: list[str], where: str = "report.baseline") -> None:
    axes = [k for k in grid if k != "seed"]
    if len(baseline) > 1:
        errors.append(f"{where}: {baseline!r} must name one grid axis; accepted: {axes}")
    for key, value in baseline.items():
        if key not in axes:
            errors.append(f"{where}.{key}: not a non-seed grid axis; accepted: {axes}")
        elif not any(v == value or value_label(v) == value_label(value) for v in grid[key]):
            labels = [value_label(v) for v in grid[key]]
            errors.append(f"{where}.{key}: {value!r} is not a value of grid.{key}; "
                          f"accepted: {labels}")


@dataclass
class AblationConfig:
    """A grid of experiments: the base experiment, the axes, the search, where results go."""

    name: str = "ablation"
    description: str = ""
    experiment: ExperimentConfig = field(default_factory=ExperimentConfig)
    # Categorical axes: experiment key path -> values, e.g. method.name: [normal, ogm_ge]; a
    # mapping value is merged at its key, e.g. method: [{name: mla, options: {fusion_rule: fixed}}].
    # A value that names another method than the base's starts from that method's default
    # options (the base's method.options belong to the base's method).
    grid: dict[str, list[Any]] = field(default_factory=dict)
    search: SearchConfig = field(default_factory=SearchConfig)
    resources: ResourcesConfig = field(default_factory=ResourcesConfig)
    # Ray Tune / Train results and checkpoints (a local folder, or s3:// on a cluster).
    storage_path: str = "runs"
    report: ReportConfig = field(default_factory=ReportConfig)

    def validate(self, path: str, errors: list[str]) -> None:
        if self.search.metric.startswith("val/"):  # runs select their epoch by it too
            self.experiment.train.select_metric = self.search.metric
            self.experiment.train.select_mode = self.search.mode
        if not self.name or any(c in self.name for c in "/\\ "):
            errors.append(f"name: {self.name!r} must be non-empty, without spaces or slashes")
        base = to_dict(self.experiment)
        for key, values in self.grid.items():
            if not isinstance(values, list) or not values:
                errors.append(f"grid.{key}: needs a non-empty list of values")
                continue
            for v in values:  # every value of every axis must make a valid experiment
                try:
                    from_dict(ExperimentConfig, apply_grid_value(copy.deepcopy(base), key, v))
                except (ConfigError, KeyError) as e:
                    msg = e.errors if isinstance(e, ConfigError) else [str(e)]
                    errors.extend(f"grid.{key}={v!r}: {m}" for m in msg)
        for key in self.search.space:
            if key in self.grid:
                errors.append(f"search.space.{key}: also a grid axis; a key is one or the other")
            elif not has_path(base, key):
                errors.append(f"search.space.{key}: not a key of the experiment config")
        _check_baseline(self.report.baseline, self.grid, errors)
        for i, other in enumerate(self.report.also_against):
            if not other:
                errors.append(f"report.also_against[{i}]: empty; name one grid axis and its value")
            _check_baseline(other, self.grid, errors, f"report.also_against[{i}]")


def trial_experiment(base: dict, cell: dict[str, Any], params: dict[str, Any],
                     workdir: str | Path | None = None) -> ExperimentConfig:
    """The experiment of one trial; relative paths of its grid values are resolved against
    `workdir`, the folder the ablation was started from (a trial runs in a Ray session folder)."""
    exp = copy.deepcopy(base)
    for key, value in {**cell, **params}.items():
        apply_grid_value(exp, key, value)
    return from_dict(ExperimentConfig, exp, base_dir=workdir)


def preflight_ablation(abl: AblationConfig, workdir: str | Path | None = None) -> None:
    """`preflight` of every grid cell's experiment (search-space values name no files): one
    ConfigError listing each problem once, with the cells it concerns, before any work starts."""
    base = to_dict(abl.experiment)
    where: dict[str, list[str]] = {}
    for cell in expand_grid(abl.grid):
        for problem in preflight(trial_experiment(base, cell, {}, workdir)):
            where.setdefault(problem, []).append(cell_name(cell))
    if where:
        n = len(expand_grid(abl.grid))
        raise ConfigError([p if len(cells) == n else f"{p} (grid cells {', '.join(cells)})"
                           for p, cells in where.items()])


def load_ablation(path: str | Path | None, overrides: list[str] = ()) -> AblationConfig:
    """An ablation config from YAML plus overrides; an override that names an experiment key
    (train.epochs=2) sets it in the ablation's base experiment."""
    own = {f.name for f in dataclasses.fields(AblationConfig)}
    return load_config(path, overrides, cls=AblationConfig, prefix="experiment", own_keys=own)
