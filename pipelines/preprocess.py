"""Preprocess a dataset into versioned Parquet shards with Ray Data (cached by version).

    python pipelines/preprocess.py --config configs/base.yaml [--generate] [key=value ...]

--generate first writes the synthetic dataset at data.root (a no-op if it is there).
"""

from __future__ import annotations

import sys
import tempfile

from mmray.pipeline_support import ConfigError, config_parser, fail, smoke_overrides
from mmray.train.experiment import load_experiment


def main(argv: list[str] | None = None) -> int:
    p = config_parser(__doc__.splitlines()[0], "configs/base.yaml")
    p.add_argument("--generate", action="store_true", help="write the synthetic dataset first")
    p.add_argument("--force", action="store_true", help="rewrite even if the version exists")
    args = p.parse_args(argv)
    from mmray.data.preprocess import preprocess
    from mmray.data.sources.synthetic import generate

    with tempfile.TemporaryDirectory(prefix="mmray-smoke-") as tmp:
        overrides = (smoke_overrides(tmp) if args.smoke else []) + list(args.overrides)
        try:
            data = load_experiment(args.config, overrides).data
            if args.generate or args.smoke:
                if data.dataset != "synthetic":
                    raise ConfigError([f"--generate writes the synthetic dataset, not {data.dataset!r}"])
                generate(data.synthetic, data.root)
            prepared = preprocess(data, force=args.force)
        except (ConfigError, FileNotFoundError, FileExistsError, ValueError) as e:
            return fail(e)
        m = prepared.manifest
        print(f"{'cache hit' if prepared.cache_hit else 'written'}: {prepared.version_dir}")
        print("rows: " + ", ".join(f"{s}={n}" for s, n in m["rows"].items())
              + (f"; skipped {len(m['skipped'])} bad input(s)" if m["skipped"] else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
