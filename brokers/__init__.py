"""Cancelflow's brokers: what differs between Redis and RabbitMQ, in one package.

The core (``cancelflow``) only knows a broker's URL and its kind
(``cancelflow.broker_urls``); producers and workers build their Celery app with
``cancelflow.messaging``, which takes the RabbitMQ side of the configuration from
``brokers.amqp`` and the queue depths from ``brokers.queues``. Redis's own side (its channel,
batched acknowledgements, per-process unacknowledged hashes) stays in ``worker.transport``
and ``worker.leases``: RabbitMQ does those natively (see ``brokers.amqp``).
"""
