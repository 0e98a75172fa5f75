"""Grid expansion, the per-cell Optuna searcher, and the Ray Tune sweep."""
