"""Benchmarks for internvl-queue: micro-batching, the service path, padding, video sampling.

`internvl-queue bench [--quick] [--json] [--model tiny|small|DIR] [--out DIR]`
runs them (benchmarks/run.py); BENCHMARKS.md holds the measured tables.
Every headline number is a ratio of two measurements taken side by side in
one run, because absolute times on a shared machine are noise.
"""
