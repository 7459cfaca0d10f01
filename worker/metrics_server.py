"""The worker's ``/metrics`` endpoint: one per worker process, started with the worker."""

from __future__ import annotations

import threading

from cancelflow.logging import get_logger
from cancelflow.metrics import MetricsServer, serve_worker_metrics
from cancelflow.settings import WorkerSettings

log = get_logger(__name__)

_server: MetricsServer | None = None
_lock = threading.Lock()


def start(conf: WorkerSettings) -> MetricsServer | None:
    """Serve this process's metrics on ``conf.metrics_port`` (off when 0). A port already
    taken (a second worker on the same host) is logged and the worker runs without them:
    metrics must not stop cancellations."""
    global _server
    with _lock:
        if _server is not None or conf.metrics_port == 0:
            return _server
        try:
            _server = serve_worker_metrics(conf.metrics_host, conf.metrics_port)
        except OSError as exc:
            log.error(
                "worker.metrics.unavailable",
                host=conf.metrics_host,
                port=conf.metrics_port,
                error=f"{type(exc).__name__}: {exc}",
                hint="give each worker on this host its own CANCELFLOW_WORKER__METRICS_PORT",
            )
            return None
        log.info("worker.metrics.serving", host=conf.metrics_host, port=_server.port)
        return _server


def stop() -> None:
    global _server
    with _lock:
        if _server is not None:
            _server.close()
            _server = None
