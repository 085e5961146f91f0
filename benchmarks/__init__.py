"""Benchmarks for internvl-queue: continuous vs static batching vs one generate per job, the service
path against the bare engine and against a plain Celery task, short-job latency, padding, video sampling.

`internvl-queue bench [--quick] [--json] [--model tiny|small|DIR] [--out DIR]`
runs them (benchmarks/run.py); BENCHMARKS.md holds the measured tables.
Every headline number is a ratio of two measurements taken side by side in
one run, because absolute times on a shared machine are noise.
"""
