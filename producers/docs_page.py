"""``/docs``: ``/openapi.json`` rendered by Swagger UI, every file served by this API.

Swagger UI's standalone bundle comes from ``swagger-ui-bundle-v2`` on PyPI (the connexion
maintainers' package of the upstream ``swagger-ui-dist`` files, locked in ``uv.lock``): no file
is copied into this repository, and the page loads nothing from anywhere else (its
``Content-Security-Policy`` allows only this origin; Swagger UI's online validator badge is
off). Public, as ``/openapi.json`` is: the document holds no secret. "Try it out" sends the
requests from the browser with a token typed into "Authorize", which stays in the page.
"""

from __future__ import annotations

from aiohttp import web
from swagger_ui_bundle import swagger_ui_path

from producers.openapi import DOCS_ASSETS, DOCS_VENDORED

PAGE_PATH = "/docs"
ASSETS_PATH = "/docs/assets/"
OUR_SCRIPT = "cancelflow-docs.js"
ASSETS = web.AppKey("docs_assets", dict)

# Relative links: the page works behind a proxy that serves the API under a path prefix.
PAGE = b"""<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<title>Cancelflow API</title>
<link rel="icon" type="image/png" href="docs/assets/favicon-32x32.png">
<link rel="stylesheet" href="docs/assets/swagger-ui.css">
</head>
<body>
<div id="swagger-ui"></div>
<script src="docs/assets/swagger-ui-bundle.js"></script>
<script src="docs/assets/cancelflow-docs.js"></script>
</body>
</html>
"""
# validatorUrl none: Swagger UI would otherwise send the document to validator.swagger.io.
SCRIPT = b"""window.addEventListener("load", function () {
  window.ui = SwaggerUIBundle({
    url: "openapi.json",
    dom_id: "#swagger-ui",
    deepLinking: true,
    validatorUrl: "none",
    defaultModelsExpandDepth: 0,
    displayRequestDuration: true,
  });
});
"""
_TYPES = {".css": "text/css", ".js": "text/javascript", ".png": "image/png"}
HEADERS = {
    "Content-Security-Policy": (
        "default-src 'none'; script-src 'self'; style-src 'self' 'unsafe-inline'; "
        "img-src 'self' data:; connect-src 'self'; frame-ancestors 'none'; base-uri 'none'; "
        "form-action 'none'"
    ),
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
}


def is_docs(path: str) -> bool:
    """Whether ``path`` is the page or one of its files (public routes)."""
    return path == PAGE_PATH or path.startswith(ASSETS_PATH)


def setup(app: web.Application) -> None:
    """Serve the page and its files on ``app``; the bundle's files are read once, here."""
    assets = {name: (swagger_ui_path / name).read_bytes() for name in DOCS_VENDORED}
    assets[OUR_SCRIPT] = SCRIPT
    assert set(assets) == set(DOCS_ASSETS)  # what the document says /docs/assets/ serves
    app[ASSETS] = assets
    app.router.add_get(PAGE_PATH, page)
    app.router.add_get(ASSETS_PATH + "{name}", asset)


async def page(_: web.Request) -> web.Response:
    return web.Response(
        body=PAGE,
        content_type="text/html",
        charset="utf-8",
        headers={**HEADERS, "Cache-Control": "no-cache"},
    )


async def asset(request: web.Request) -> web.Response:
    name = request.match_info["name"]
    found = request.app[ASSETS].get(name)
    if found is None:
        raise web.HTTPNotFound()
    suffix = name[name.rfind(".") :]
    return web.Response(
        body=found,
        content_type=_TYPES[suffix],
        headers={**HEADERS, "Cache-Control": "public, max-age=3600"},
    )
