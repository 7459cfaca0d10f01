"""One aiohttp server hosting every provider sandbox, each under `/{key}`.

Provider base URLs are `http://HOST:PORT/{key}` (axelspringer's API is under
`/axelspringer/api/v1/`, its token URL `/axelspringer/oauth2/token`). Adding a provider's
sandbox is one module with a `SPEC` (a `SandboxSpec`) plus one line in SANDBOXES, which has
one entry per key of `cancelflow.providers.REGISTRY`: the demo settings (`sandboxes.env`), the
demo, the benchmark and the tests derive their provider lists from it.
"""

from __future__ import annotations

import asyncio

from aiohttp import web

from sandboxes import appdirect, axelspringer, azotte, payway, receiver
from sandboxes.core import SandboxSpec
from sandboxes.faults import FaultSettings

SANDBOXES: dict[str, SandboxSpec] = {
    spec.key: spec
    for spec in (
        payway.SPEC,
        azotte.SPEC,
        appdirect.SPEC,
        axelspringer.SPEC,
    )
}

# The mounted sub-apps by key, for typed access to a sandbox's state in tests:
# app[PROVIDER_APPS]["payway"][PAYWAY_STATE].
PROVIDER_APPS: web.AppKey[dict[str, web.Application]] = web.AppKey("provider_apps")


def build_app(
    *, faults: FaultSettings | None = None, token_ttl_s: int | None = None
) -> web.Application:
    """The root app: every provider mounted at `/{key}`, plus `GET /healthz`.

    `faults` starts every sandbox with those faults (each keeps its own seeded random stream);
    `token_ttl_s` overrides the default 3600 s lifetime of issued tokens.
    """
    root = web.Application()
    mounted: dict[str, web.Application] = {}
    for key, spec in SANDBOXES.items():
        mounted[key] = spec.create_app(faults=faults, token_ttl_s=token_ttl_s)
        root.add_subapp(f"/{key}", mounted[key])
    root[PROVIDER_APPS] = mounted
    root.add_subapp(f"/{receiver.KEY}", receiver.create_app())  # callbacks land here

    async def healthz(request: web.Request) -> web.Response:
        return web.json_response({"status": "ok", "providers": sorted(SANDBOXES)})

    root.router.add_get("/healthz", healthz)
    return root


def base_urls(host: str, port: int) -> dict[str, str]:
    """Each provider's base URL on a server listening at host:port."""
    return {key: f"http://{host}:{port}/{key}" for key in SANDBOXES}


async def start(
    host: str = "127.0.0.1",
    port: int = 8080,
    *,
    faults: FaultSettings | None = None,
    token_ttl_s: int | None = None,
) -> web.AppRunner:
    """Start serving in the running loop and return the runner; `await runner.cleanup()` stops it.

    With `port=0` the OS picks a free port: read it from `runner.addresses`.
    """
    runner = web.AppRunner(build_app(faults=faults, token_ttl_s=token_ttl_s))
    await runner.setup()
    await web.TCPSite(runner, host, port).start()
    return runner


async def serve(
    host: str = "127.0.0.1",
    port: int = 8080,
    *,
    faults: FaultSettings | None = None,
    token_ttl_s: int | None = None,
) -> None:
    """Serve until cancelled (for callers that already run an event loop)."""
    runner = await start(host, port, faults=faults, token_ttl_s=token_ttl_s)
    try:
        await asyncio.Event().wait()
    finally:
        await runner.cleanup()


def run(
    host: str = "127.0.0.1",
    port: int = 8080,
    *,
    faults: FaultSettings | None = None,
    token_ttl_s: int | None = None,
) -> None:
    """Block serving every sandbox until Ctrl-C; what `cancelflow sandbox --port` calls.

    Prints each provider's base URL once listening.
    """
    app = build_app(faults=faults, token_ttl_s=token_ttl_s)

    async def announce(app: web.Application) -> None:
        for key, url in base_urls(host, port).items():
            print(f"{key:>13}  {url}", flush=True)

    app.on_startup.append(announce)
    web.run_app(app, host=host, port=port, print=None)
