"""``python -m producers.cli``: how ``producers.local.cancelflow_command`` starts a child."""

from producers.cli import main

main()
