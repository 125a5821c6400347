"""Benchmarks of the KV shift (op, layer, model, decode), reported as ratios against vanilla attention."""
