"""Run an ablation grid: preprocess once, then every cell × seed as a Ray Train run under Ray Tune.

    python pipelines/ablate.py --config configs/ablations/demo.yaml [--resume] [key=value ...]
    ray job submit --working-dir . -- python pipelines/ablate.py --config configs/ablations/demo.yaml

Overrides name ablation keys (grid.seed=[0,1,2], search.num_samples=4) or, for anything else,
keys of the experiment (train.epochs=2 means experiment.train.epochs=2). With no cluster
($RAY_ADDRESS unset) an embedded local Ray is started.
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

from mmray.pipeline_support import ConfigError, config_parser, fail, prepare_data, smoke_overrides
from mmray.tune.grid import AblationConfig, load_ablation, preflight_ablation


def main(argv: list[str] | None = None) -> int:
    p = config_parser(__doc__.splitlines()[0], "configs/ablations/demo.yaml")
    p.add_argument("--resume", action="store_true",
                   help="finish the sweep of this name if it exists (else start it)")
    p.add_argument("--report-dir", default="reports",
                   help="where the report goes: <dir>/<ablation>/report.{md,html,json} + PNGs")
    p.add_argument("--smoke-dir", help="with --smoke: keep its files (data, runs, MLflow store, "
                   "report) in this folder instead of a temporary one")
    args = p.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="mmray-smoke-") as tmp:
        work = Path(args.smoke_dir).resolve() if args.smoke_dir else Path(tmp)
        overrides = list(args.overrides)
        if args.smoke:  # every cell of the grid, one seed, one trial each, tiny
            overrides = [*smoke_overrides(work), f"storage_path={work}/runs", "grid.seed=[0]",
                         "search.num_samples=1", *overrides]
        try:
            abl: AblationConfig = load_ablation(args.config, overrides)
            preflight_ablation(abl)  # files and names of every cell, before Ray starts
        except ConfigError as e:
            return fail(e)
        return run(abl, args.resume, (work if args.smoke else Path(args.report_dir)) / abl.name)


def run(abl: AblationConfig, resume: bool, report_dir: Path) -> int:
    import ray
    from mlflow.tracking import MlflowClient

    from mmray.ray_utils import init_ray
    from mmray.report.writer import report_options, write_report
    from mmray.tune.sweep import run_sweep

    init_ray()
    try:
        prepared = prepare_data(abl.experiment.data)
        result = run_sweep(abl, str(prepared.version_dir), prepared.manifest["version"], resume=resume)
    except (FileExistsError, FileNotFoundError, ValueError) as e:
        return fail(e)
    finally:
        ray.shutdown()  # the report needs only MLflow; Ray's forwarded logs end before it prints
    text = write_report(MlflowClient(result.tracking_uri), result.experiment_id, result.parent_run_id,
                        report_dir, report_options(abl))
    print(text)
    print(f"Report: {report_dir / 'report.html'} (and report.md, report.json)\n"
          f"MLflow: {result.tracking_uri} "
          f"(experiment {abl.experiment.tracking.experiment or abl.name}); `make ui` to browse")
    if result.num_errors:
        print(f"{result.num_errors} of {result.num_trials} trials failed; rerun with --resume",
              file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
