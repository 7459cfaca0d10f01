"""Provider sandboxes: aiohttp servers that behave like each provider's real API.

Layout: one module per provider (`payway`, `azotte`, `appdirect`, `axelspringer`), each with its
`DEMO` references, demo credentials, `create_app` and registry entry `SPEC`; shared pieces in
`faults` (fault injection), `tokens` (bearer tokens), `oauth1` (signature checks), `core` (the
Sandbox base and `SandboxSpec`), `control` (the `/_sandbox/` routes), `server` (the registry
`SANDBOXES`, `build_app`, `run`) and `env` (the demo settings, from the registry).
"""
