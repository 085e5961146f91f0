"""The HTTP API (`internvl-queue api`): the ASGI app, job and batch routes, SSE events, tenants, the batch store.

CPU only: nothing here imports the model runtime, torch or celery (import-linter contract).
"""
