"""Feeding the model: the one model thread, the continuous step loop and the static micro-batcher.

Imports neither celery nor the HTTP API, the job path or storage I/O (import-linter contract).
"""
