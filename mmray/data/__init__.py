"""Dataset sources, the synthetic generator, Ray Data preprocessing and the shard reader."""
