"""Modality imbalance measured, not inferred: each modality inside the multimodal model against
the same modality trained alone in the same sweep (no MLflow, no plots).

- in-model: `<metric>_<m>`, the metric of modality m's own logits inside a multimodal model;
- unimodal: the `unimodal` method's model of m (`method.options.modality`), its `<metric>_<m>`
  (its fused `<metric>` where it logged no per-modality one: its only modality is m);
- the two cells are matched on every grid axis except the method's (`method`, `method.*`);
  where several unimodal cells of m match, the one that also agrees on most method axes (e.g.
  `method.fusion`) is taken, and a tie is reported rather than guessed;
- paired by seed (seeds both have): the gap unimodal − in-model, its t interval and the
  two-sided paired t-test (`stats.paired_test`). A positive gap: m learns less inside the
  fused model than alone.

Beside it, each multimodal cell's fused metric, its best unimodal model and the
`unimodal_ensemble` model (the mean of the per-modality unimodal models), matched the same way.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from mmray.report import stats
from mmray.report.compare import CellResult, cell_label

UNIMODAL = "unimodal"
ENSEMBLE = "unimodal_ensemble"
METHOD_PARAM = "method.name"
MODALITY_PARAM = "method.options.modality"
# Suffixes of `<metric>_<suffix>` that name a variant of the fused metric, not a modality
# (`acc_top5`, mmray/train/metrics.py).
FUSED_VARIANTS = ("top5",)


@dataclass
class Row:
    """One multimodal cell and modality against the unimodal cell of that modality."""

    cell: CellResult
    modality: str
    unimodal_cell: CellResult
    in_model: stats.Summary  # over the paired seeds
    unimodal: stats.Summary  # over the paired seeds
    gap: stats.PairedTest  # unimodal − in-model
    # Why the in-model logits are not the modality's alone (`Method.mixed_branches`); "" if they are.
    mixed: str = ""

    @property
    def seeds(self) -> list[str]:
        return list(self.gap.seeds)


@dataclass
class FusedRow:
    """A multimodal cell's fused metric beside its best unimodal model and the ensemble."""

    cell: CellResult
    fused: stats.Summary
    best: tuple[str, stats.Summary] | None  # (modality, its unimodal model's metric)
    ensemble: stats.Summary | None


@dataclass
class Skipped:
    """A (multimodal cell, modality) with an in-model metric but no row, and why."""

    cell: CellResult
    modality: str
    reason: str


@dataclass
class Imbalance:
    metric: str
    rows: list[Row] = field(default_factory=list)
    fused: list[FusedRow] = field(default_factory=list)
    skipped: list[Skipped] = field(default_factory=list)
    unimodal_cells: int = 0  # cells of the `unimodal` method in the sweep


def method_of(r: CellResult) -> str:
    return r.params.get(METHOD_PARAM) or r.cell.get(METHOD_PARAM, "")


def in_model_modalities(r: CellResult, metric: str) -> list[str]:
    """m of every `<metric>_<m>` the cell logged (fused-metric variants excluded)."""
    prefix = metric + "_"
    return sorted(name[len(prefix):] for name in r.metrics
                  if name.startswith(prefix) and "/" not in name[len(prefix):]
                  and name[len(prefix):] not in FUSED_VARIANTS)


def modality_of(r: CellResult, metric: str) -> str:
    """A unimodal cell's modality: its option, else the one modality it logged a metric of."""
    if r.params.get(MODALITY_PARAM):
        return r.params[MODALITY_PARAM]
    logged = in_model_modalities(r, metric)
    return logged[0] if len(logged) == 1 else ""


def unimodal_values(r: CellResult, metric: str, modality: str) -> dict[str, float]:
    return r.values(f"{metric}_{modality}") or r.values(metric)


def _is_method_axis(axis: str) -> bool:
    return axis == "method" or axis.startswith("method.")


def _non_method(r: CellResult) -> dict[str, str]:
    return {k: v for k, v in r.cell.items() if not _is_method_axis(k)}


def match(cell: CellResult, candidates: list[CellResult]) -> list[CellResult]:
    """The candidates with the same non-method grid values as `cell` and, among those, the
    most method axes in common with it: one is a match, none or several are not."""
    same = [c for c in candidates if _non_method(c) == _non_method(cell)]

    def agree(c: CellResult) -> int:
        return sum(c.cell.get(k) == v for k, v in cell.cell.items() if _is_method_axis(k))

    top = max((agree(c) for c in same), default=0)
    return [c for c in same if agree(c) == top]


def _row(r: CellResult, m: str, uni: CellResult, metric: str) -> Row | Skipped:
    inside, alone = r.values(f"{metric}_{m}"), unimodal_values(uni, metric, m)
    gap = stats.paired_test(alone, inside)
    if not gap.seeds:
        return Skipped(r, m, f"no seed in common with its `{UNIMODAL}` cell")
    return Row(r, m, uni, stats.describe([inside[s] for s in gap.seeds]),
               stats.describe([alone[s] for s in gap.seeds]), gap)


def _fused_row(r: CellResult, metric: str, mode: str, partners: dict[str, CellResult],
               ensembles: list[CellResult]) -> FusedRow | None:
    alone = {m: stats.describe(list(unimodal_values(u, metric, m).values()))
             for m, u in partners.items()}
    alone = {m: s for m, s in alone.items() if s.n}
    sign = 1 if mode == "max" else -1
    best = max(alone.items(), key=lambda kv: sign * kv[1].mean) if alone else None
    ens = match(r, ensembles)
    ensemble = stats.describe(list(ens[0].values(metric).values())) if len(ens) == 1 else None
    fused = stats.describe(list(r.values(metric).values()))
    if not fused.n or (best is None and not (ensemble and ensemble.n)):
        return None
    return FusedRow(r, fused, best, ensemble if ensemble and ensemble.n else None)


def mixed_branches(method: str) -> str:
    """The method's reason why its per-modality logits see other modalities; "" if they do not
    (or the method is not one of this mmray's)."""
    from mmray.methods import METHODS  # the registry: only the report's lookup needs it

    cls = METHODS.get(method)
    return cls.mixed_branches if cls is not None else ""


def imbalance(results: list[CellResult], metric: str, mode: str = "max") -> Imbalance:
    """Rows for every multimodal cell (method neither `unimodal` nor `unimodal_ensemble`) and
    every modality it logged `<metric>_<m>` for; in the order of `results`."""
    unimodal = [r for r in results if method_of(r) == UNIMODAL]
    ensembles = [r for r in results if method_of(r) == ENSEMBLE]
    by_modality: dict[str, list[CellResult]] = {}
    for u in unimodal:
        by_modality.setdefault(modality_of(u, metric), []).append(u)
    out = Imbalance(metric, unimodal_cells=len(unimodal))
    for r in results:
        if method_of(r) in (UNIMODAL, ENSEMBLE):
            continue
        partners: dict[str, CellResult] = {}
        for m in in_model_modalities(r, metric):
            if m not in by_modality:
                out.skipped.append(Skipped(r, m, f"the sweep has no `{UNIMODAL}` run of `{m}`"))
                continue
            found = match(r, by_modality[m])
            if len(found) != 1:
                why = (f"{len(found)} `{UNIMODAL}` cells of `{m}` match it equally well"
                       if found else f"no `{UNIMODAL}` run of `{m}` has its grid values "
                                     "(the method aside)")
                out.skipped.append(Skipped(r, m, why))
                continue
            row = _row(r, m, found[0], metric)
            if isinstance(row, Row):
                row.mixed = mixed_branches(method_of(r))
            (out.rows if isinstance(row, Row) else out.skipped).append(row)
            if isinstance(row, Row):
                partners[m] = found[0]
        if (fused := _fused_row(r, metric, mode, partners, ensembles)) is not None:
            out.fused.append(fused)
    return out


def _mean_ci(s: stats.Summary | stats.PairedTest) -> dict:
    if isinstance(s, stats.PairedTest):
        return {"mean": s.mean_diff, "ci": list(s.ci) if s.ci else None, "t": s.t, "p": s.p,
                "note": s.note or None}
    return {"mean": s.mean, "ci": list(s.ci) if s.ci else None, "n": s.n}


def to_json(imb: Imbalance, axes: list[str]) -> dict:
    """report.json's `imbalance` (the rows), `imbalance_fused` and `imbalance_skipped`."""
    return {
        "imbalance": [{"cell": cell_label(r.cell.cell, axes), "modality": r.modality,
                       "seeds": r.seeds, "metric": f"{imb.metric}_{r.modality}",
                       "unimodal_cell": cell_label(r.unimodal_cell.cell, axes),
                       "in_model": _mean_ci(r.in_model), "unimodal": _mean_ci(r.unimodal),
                       "gap": _mean_ci(r.gap), "mixed_branches": r.mixed or None}
                      for r in imb.rows],
        "imbalance_fused": [{"cell": cell_label(f.cell.cell, axes), "metric": imb.metric,
                             "fused": _mean_ci(f.fused),
                             "best_unimodal": ({"modality": f.best[0], **_mean_ci(f.best[1])}
                                               if f.best else None),
                             "ensemble": _mean_ci(f.ensemble) if f.ensemble else None}
                            for f in imb.fused],
        "imbalance_skipped": [{"cell": cell_label(s.cell.cell, axes), "modality": s.modality,
                               "reason": s.reason.replace("`", "")} for s in imb.skipped],
    }
