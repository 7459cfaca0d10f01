"""The Celery worker: the app, the thin task shells, and the per-process runtime."""
