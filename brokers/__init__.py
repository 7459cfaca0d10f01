"""Cancelflow's brokers: what differs between Redis and RabbitMQ, in one package.

The core (``cancelflow``) only knows a broker's URL and its kind
(``cancelflow.broker_urls``); producers and workers build their Celery app with
``messaging.config``, which takes the RabbitMQ side of the configuration from
``brokers.amqp``; the queue depths come from ``brokers.queues``. Redis's own side (the
workers' channel with its poison items and batched acknowledgements, in
``messaging.patches``; per-process unacknowledged hashes, in ``worker.leases``) has no
RabbitMQ counterpart because RabbitMQ does those natively (see ``brokers.amqp``).
"""
