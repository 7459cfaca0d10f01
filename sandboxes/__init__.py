"""Provider sandboxes: aiohttp servers that behave like each provider's real API.

Layout: one module per provider (`payway`, `azotte`, `appdirect`, `axelspringer`), each with its
`DEMO` references, demo credentials and `create_app`; shared pieces in `faults` (fault
injection), `tokens` (bearer tokens), `oauth1` (signature checks), `core` (the Sandbox base),
`control` (the `/_sandbox/` routes) and `server` (the registry, `build_app`, `run`).
"""
