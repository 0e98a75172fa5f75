"""Write the comparison report of an ablation's latest sweep from MLflow, and print it.

    python pipelines/report.py --config configs/ablations/demo.yaml
"""

from __future__ import annotations

import sys
from pathlib import Path

from mmray.pipeline_support import ConfigError, config_parser, fail
from mmray.tune.grid import AblationConfig, load_ablation


def main(argv: list[str] | None = None) -> int:
    p = config_parser(__doc__.splitlines()[0], "configs/ablations/demo.yaml")
    p.add_argument("--report-dir", default="reports",
                   help="where the report goes: <dir>/<ablation>/report.{md,html,json} + PNGs")
    args = p.parse_args(argv)
    if args.smoke:  # a smoke ablation ends by writing this same report from its MLflow runs
        import ablate

        return ablate.main(["--smoke", *args.overrides])
    from mlflow.tracking import MlflowClient

    from mmray.report.writer import report_options, write_report
    from mmray.tracking.mlflow_log import resolve_tracking_uri
    from mmray.tracking.mlflow_read import latest_parent

    try:
        abl: AblationConfig = load_ablation(args.config, args.overrides)
        client = MlflowClient(resolve_tracking_uri(abl.experiment.tracking.uri))
        exp_id, parent = latest_parent(client, abl.experiment.tracking.experiment or abl.name)
    except (ConfigError, KeyError) as e:
        return fail(e)
    out = Path(args.report_dir) / abl.name
    print(write_report(client, exp_id, parent, out, report_options(abl)))
    print(f"Report: {out / 'report.html'} (and report.md, report.json)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
