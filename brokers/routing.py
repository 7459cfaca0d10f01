"""The queue a message was sent to, from its routing key (no kombu import)."""

from __future__ import annotations

import re

# Native delayed delivery prefixes a countdown's routing key with its 28 bits, one word each
# (kombu.transport.native_delayed_delivery.calculate_routing_key); the queue's own key follows.
_DELAY_PREFIX = re.compile(r"^(?:[01]\.){28}")


def queue_of(routing_key: object) -> str | None:
    """The queue name a Cancelflow routing key stands for (a queue's key is its name)."""
    if not isinstance(routing_key, str):
        return None
    return _DELAY_PREFIX.sub("", routing_key, count=1)
