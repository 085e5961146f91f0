"""The path of one job through a worker: claim, fetch, prepare, run, store, notify, callbacks, error classification.

Celery-free: the Celery app (worker/celery_app.py) wraps these functions in tasks.
"""
