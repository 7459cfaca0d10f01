"""Cancelflow core: the job contract, settings, the job store, provider adapters and the steps.

Nothing in this package imports Celery: the worker (``worker``) and the producers
(``producers``) wrap it.
"""
