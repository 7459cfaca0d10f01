"""Producers: the HTTP API, the command line, the billing-event consumer and the Python client.

They enqueue by task name through ``cancelflow.messaging`` and never import ``worker``.
"""
