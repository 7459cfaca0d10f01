"""The ``cancelflow`` command, one module per command group:

- ``run``: the process runners (``api``, ``worker``, ``beat``, ``sandbox``, ``demo``,
  ``billing-consumer``), with ``flower`` (``producers.flower_cmd``) and ``secret``;
- ``health``: ``healthcheck worker|http``;
- ``jobs``: ``enqueue``, ``status``, ``decide``, ``jobs``, ``watch``, ``bulk``, ``providers``;
- ``dlq``: ``dlq list|show|replay|purge``;
- ``endpoints``: ``endpoints add|list|show|update|enable|disable|rotate|delete``.

All but the process runners reach everything through the API with the client
(``cancelflow_client``): none needs Redis credentials.
"""

from producers.cli import dlq, endpoints, health, jobs, run
from producers.cli.main import main
from producers.flower_cmd import flower
from producers.secret_cmd import secret

main.add_command(flower)
main.add_command(secret)

__all__ = ["dlq", "endpoints", "health", "jobs", "main", "run"]
