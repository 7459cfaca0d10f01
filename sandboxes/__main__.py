"""`python -m sandboxes --port 8080 [--error-rate 0.1 ...]`: serve every provider sandbox.

The project CLI (`cancelflow sandbox`) calls `sandboxes.server.run` the same way.
"""

from __future__ import annotations

import argparse

from sandboxes.faults import FaultSettings
from sandboxes.server import run


def main(argv: list[str] | None = None) -> None:
    """Parse the command line and serve until Ctrl-C."""
    parser = argparse.ArgumentParser(prog="python -m sandboxes", description=__doc__)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8080)
    parser.add_argument("--token-ttl-s", type=int, default=None)
    # One option per fault setting, named after its field (--error-rate, --hang-s, ...).
    for name, info in FaultSettings.model_fields.items():
        kind = int if info.annotation in (int, int | None) else float
        parser.add_argument(f"--{name.replace('_', '-')}", type=kind, default=info.default)
    args = vars(parser.parse_args(argv))
    faults = FaultSettings(**{name: args[name] for name in FaultSettings.model_fields})
    run(args["host"], args["port"], faults=faults, token_ttl_s=args["token_ttl_s"])


if __name__ == "__main__":
    main()
