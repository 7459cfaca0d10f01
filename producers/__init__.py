"""Producers: the HTTP API, the command line, the billing-event consumer and the Python client.

They enqueue by task name through ``messaging`` (shared with the workers) and never import
``worker``.
"""
