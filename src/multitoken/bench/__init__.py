"""Benchmarks: `multitoken bench memory` (memory.py), `multitoken bench train` (train_speed.py).

Each benchmark module offers `add_arguments(parser)` and `run(args) -> dict`: `run` prints a readable
table and returns the JSON document the CLI prints as the last stdout line. Every measured
configuration runs in a fresh subprocess (memory.py's worker) so that peaks and warm caches never mix;
flops.py holds the analytic FLOP count and plots.py the PNG figures.
"""
