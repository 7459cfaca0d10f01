"""The sandboxes as the bench serves them: ``python -m bench.sandbox PORT``.

The same application as ``cancelflow sandbox`` without its access log: the sandboxes stand in
for the providers' servers, whose work is not Cancelflow's, yet here they share its two cores.
"""

from __future__ import annotations

import sys

from aiohttp import web

from sandboxes.server import build_app


def main() -> None:
    web.run_app(build_app(), host="127.0.0.1", port=int(sys.argv[1]), access_log=None, print=None)


if __name__ == "__main__":
    main()
