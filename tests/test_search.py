"""Grid expansion, trial names, and the per-cell Optuna searcher (no Ray runtime needed)."""

from __future__ import annotations

import optuna

from mmray.tune.grid import ParamRange, cell_name, expand_grid, trial_name
from mmray.tune.search import CellSearcher


def test_grid_is_the_cartesian_product_in_axis_order():
    cells = expand_grid({"method.fusion": ["concat", "sum"], "seed": [0, 1, 2]})
    assert len(cells) == 6
    assert cells[0] == {"method.fusion": "concat", "seed": 0}
    assert cells[-1] == {"method.fusion": "sum", "seed": 2}
    assert expand_grid({}) == [{}]


def test_names_are_deterministic_and_safe():
    cell = {"method.name": "normal", "method.fusion": "sum", "seed": 1}
    assert cell_name(cell) == "name=normal,fusion=sum,seed=1"
    assert cell_name({"a.x": 1, "b.x": 2}) == "a.x=1,b.x=2"  # colliding short names stay long
    assert cell_name({"data.root": "/a b"}) == "root=_a_b"
    assert trial_name(cell, 2, 3) == "name=normal,fusion=sum,seed=1,t=2"
    assert trial_name(cell, 0, 1) == cell_name(cell)


def _run(searcher: CellSearcher, value=lambda cfg: 0.5) -> list[dict]:
    out = []
    while True:
        cfg = searcher.suggest(f"id{len(out)}")
        if cfg == CellSearcher.FINISHED:
            return out
        searcher.on_trial_complete(f"id{len(out)}", {"val/acc": value(cfg)})
        out.append(cfg)


def test_every_cell_gets_the_same_budget_and_names_are_unique():
    cells = expand_grid({"method.fusion": ["concat", "sum"], "seed": [0, 1]})
    space = {"train.lr": ParamRange(type="loguniform", low=1e-4, high=1e-1)}
    s = CellSearcher(cells, space, num_samples=3, metric="val/acc", mode="max", seed=0)
    trials = _run(s)
    assert len(trials) == 12
    assert len({t["trial"] for t in trials}) == 12
    for cell in cells:
        mine = [t for t in trials if t["cell"] == cell]
        assert len(mine) == 3
        assert all(1e-4 <= t["params"]["train.lr"] <= 1e-1 for t in mine)
    # Optuna was told every result: each cell's study holds its 3 completed trials.
    assert all(len(st.get_trials(states=[optuna.trial.TrialState.COMPLETE])) == 3
               for st in s.studies.values())


def test_searcher_is_seeded_and_restores(tmp_path):
    cells = expand_grid({"seed": [0, 1]})
    space = {"train.lr": ParamRange(type="float", low=0.0, high=1.0)}
    a = _run(CellSearcher(cells, space, 4, "val/acc", "max", seed=7))
    b = _run(CellSearcher(cells, space, 4, "val/acc", "max", seed=7))
    assert a == b

    s = CellSearcher(cells, space, 4, "val/acc", "max", seed=7)
    first = [s.suggest(f"x{i}") for i in range(3)]
    s.save(str(tmp_path / "s.pkl"))
    r = CellSearcher([], {}, 1, "val/acc", "max")
    r.restore(str(tmp_path / "s.pkl"))
    rest = []
    while (cfg := r.suggest(f"y{len(rest)}")) != CellSearcher.FINISHED:
        rest.append(cfg)
    assert len(first) + len(rest) == 8
    assert not {t["trial"] for t in first} & {t["trial"] for t in rest}


def test_failed_trials_are_told_to_optuna_as_failures():
    s = CellSearcher([{}], {"train.lr": ParamRange(low=0.1, high=0.2)}, 1, "val/acc", "max")
    s.suggest("a")
    s.on_trial_complete("a", None, error=True)
    (trial,) = s.studies[0].get_trials()
    assert trial.state == optuna.trial.TrialState.FAIL


def test_mapping_values_name_cells_compactly():
    cell = {"method": {"name": "mla", "options": {"fusion_rule": "fixed"}}, "seed": 2}
    assert cell_name(cell) == "method=mla+fixed,seed=2"
