"""The comparison report of a sweep (`mmray.report.writer.write_report`).

`summary` reads the selected runs back from MLflow, `stats` holds the statistics (numpy/scipy
only), `compare` turns runs into numbers and series, `plots` draws the PNGs, `render` writes
Markdown and HTML, and `writer` puts it together. Nothing here starts Ray.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass
class ReportConfig:
    """The comparison report written at the end of a sweep (mmray/report/)."""

    # The baseline of the paired tests: one grid axis key and one of its values (a mapping
    # value by its label, e.g. {method: normal} for method: [{name: normal}, ...]). Empty: the
    # first value of the first non-seed axis.
    baseline: dict[str, Any] = field(default_factory=dict)
    # Further baselines, each a mapping like `baseline` on the same or another axis, every cell
    # tested against each the same way (e.g. [{method: unimodal_ensemble}] beside Normal).
    also_against: list[dict[str, Any]] = field(default_factory=list)
    # Test metrics tested and plotted; empty: search.metric with val/ replaced by test/.
    metrics: list[str] = field(default_factory=list)
