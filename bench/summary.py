"""Gather every benchmark's results into one JSON and one Markdown page.

    python bench/summary.py [--out bench/results]

Reads the <name>.json and <name>.md each benchmark in bench/ wrote into --out and writes
summary.json ({name: results}) and summary.md (one section per benchmark, in the order below,
then any others). `make bench` runs the benchmarks, then this.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

ORDER = {"overhead": "Pipeline overhead and preprocessing throughput (bench/overhead.py)",
         "sweep": "Sweep wall time, 1 vs 2 concurrent trials (bench/sweep.py)",
         "dynmm_cost": "DynMM FLOPs saving (bench/dynmm_cost.py)",
         "m2pt_merge": "M2PT merged vs plain latency (bench/m2pt_merge.py)",
         "reprogram_cost": "Reprogramming vs separate encoder (bench/reprogram_cost.py)",
         "gpu_throughput": "GPU training throughput and peak memory (bench/gpu_throughput.py)"}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="bench/results")
    args = p.parse_args(argv)
    out = Path(args.out)
    names = [n for n in ORDER if (out / f"{n}.json").is_file()]
    names += sorted(f.stem for f in out.glob("*.json")
                    if f.stem not in ORDER and f.stem != "summary")
    results = {n: json.loads((out / f"{n}.json").read_text()) for n in names}
    sections = []
    for n in names:
        md = out / f"{n}.md"
        body = md.read_text().strip() if md.is_file() else f"```\n{json.dumps(results[n], indent=1)}\n```"
        sections.append(f"## {ORDER.get(n, n)}\n\n{body}\n")
    (out / "summary.json").write_text(json.dumps(results, indent=1))
    (out / "summary.md").write_text("# mmray benchmarks\n\n" + "\n".join(sections))
    print((out / "summary.md").read_text())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
