"""Grid cells and the Optuna search inside each cell, as one Ray Tune searcher.

The design decision (see RAY.md on Tune + Optuna): the categorical axes of an ablation (method,
fusion, missing rate, seed, ...) form a grid that is run exhaustively; the continuous
hyperparameters in `search.space` are tuned by a separate, seeded Optuna TPE study per grid cell,
with the same number of trials (`search.num_samples`) for every cell. One study over all axes
would let the sampler spend more trials on methods it likes, which biases an ablation; a study per
cell gives every method the same tuning budget.

Trial names come from the cell and the trial's index inside it, never from time, so a resumed
sweep and its MLflow runs find each other.
"""

from __future__ import annotations

import pickle
from typing import Any

import optuna
from ray.tune.search import Searcher

from mmray.tune.grid import ParamRange, trial_name


def _distribution(r: ParamRange) -> optuna.distributions.BaseDistribution:
    if r.type == "categorical":
        return optuna.distributions.CategoricalDistribution(r.choices)
    if r.type == "int":
        return optuna.distributions.IntDistribution(int(r.low), int(r.high))
    return optuna.distributions.FloatDistribution(r.low, r.high, log=r.type == "loguniform")


class CellSearcher(Searcher):
    """Suggests every (cell, index) once, in grid order; Optuna picks `space` values per cell."""

    def __init__(self, cells: list[dict[str, Any]], space: dict[str, ParamRange], num_samples: int,
                 metric: str, mode: str, seed: int = 0):
        super().__init__(metric=metric, mode=mode)
        self.cells = cells
        self.space = space
        self.num_samples = num_samples
        self.seed = seed
        self.distributions = {k: _distribution(r) for k, r in space.items()}
        self.studies: dict[int, optuna.Study] = {}
        self.next_slot = 0  # index into the flat (cell, sample) sequence
        self.live: dict[str, tuple[int, int]] = {}  # tune trial id -> (cell index, optuna number)

    @property
    def total(self) -> int:
        return len(self.cells) * self.num_samples

    def _study(self, cell_idx: int) -> optuna.Study:
        if cell_idx not in self.studies:
            optuna.logging.set_verbosity(optuna.logging.WARNING)
            sampler = optuna.samplers.TPESampler(seed=self.seed + cell_idx)
            direction = "maximize" if self.mode == "max" else "minimize"
            self.studies[cell_idx] = optuna.create_study(direction=direction, sampler=sampler)
        return self.studies[cell_idx]

    def suggest(self, trial_id: str) -> dict | None:
        if self.next_slot >= self.total:
            return Searcher.FINISHED
        # Sample-major order: every cell's first trial before any cell's second, so an
        # interrupted sweep has covered the grid as evenly as possible.
        sample, cell_idx = divmod(self.next_slot, len(self.cells))
        self.next_slot += 1
        otrial = self._study(cell_idx).ask(self.distributions)
        self.live[trial_id] = (cell_idx, otrial.number)
        cell = self.cells[cell_idx]
        return {"trial": trial_name(cell, sample, self.num_samples), "cell": dict(cell),
                "params": dict(otrial.params)}

    def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False) -> None:
        if trial_id not in self.live:
            return
        cell_idx, number = self.live.pop(trial_id)
        study = self._study(cell_idx)
        value = (result or {}).get(self.metric)
        if error or value is None:
            study.tell(number, state=optuna.trial.TrialState.FAIL)
        else:
            study.tell(number, float(value))

    def get_state(self) -> dict:
        return {k: getattr(self, k) for k in ("cells", "space", "num_samples", "seed", "studies",
                                               "next_slot", "live", "_metric", "_mode")}

    def set_state(self, state: dict) -> None:
        for k, v in state.items():
            setattr(self, k, v)
        self.distributions = {k: _distribution(r) for k, r in self.space.items()}

    def save(self, checkpoint_path: str) -> None:
        with open(checkpoint_path, "wb") as f:
            pickle.dump(self.get_state(), f)

    def restore(self, checkpoint_path: str) -> None:
        with open(checkpoint_path, "rb") as f:
            self.set_state(pickle.load(f))
