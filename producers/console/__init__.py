"""The web console at ``/console/``: server-rendered pages over the API's own readers and actions.

``setup(app, settings)`` is the one call ``producers.api.create_app`` makes; the rest is in
``views`` (pages and the console's gate), ``sessions`` (signed cookies, CSRF) and ``audit``.
"""

from __future__ import annotations

from aiohttp import web

from cancelflow.settings import Settings


def setup(app: web.Application, settings: Settings) -> None:
    """Serve the console under ``/console/`` on the API application ``app``."""
    # Imported here: ``views`` reads the API's application keys, and the API imports this
    # package while it is itself being imported.
    from producers.console import views

    views.register(app, settings)
