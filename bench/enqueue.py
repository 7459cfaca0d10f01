"""``python -m bench.enqueue``: only the enqueue benchmark (target d), optionally profiled.

Starts a Redis DB (and with ``--broker amqp`` a RabbitMQ vhost of its own), the sandboxes
and the API as ``make bench`` does, runs ``bench.api_rate.measure`` and prints each round,
the CPU each process spent per request, and (``--profile``, one API process) where the API
process's CPU time went, sampled by py-spy during the API rounds. For working on the API's
speed without running the whole bench.
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from pathlib import Path

import click
import redis

from bench import api_rate, profiling
from bench.system import BenchSystem, bench_db, broker_leg, redis_server
from cancelflow.logging import configure_logging
from cancelflow.settings import load_settings


def log(message: str) -> None:
    print(f"[enqueue {time.strftime('%H:%M:%S')}] {message}", flush=True)


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--requests", default=1000, show_default=True, help="Requests per round.")
@click.option("--rounds", default=3, show_default=True)
@click.option("--connections", default=32, show_default=True)
@click.option(
    "--profile",
    type=click.Path(path_type=Path),
    default=None,
    help="Sample the API with py-spy during the API rounds; write the raw stacks here.",
)
@click.option(
    "--broker",
    type=click.Choice(["redis", "amqp"]),
    default="redis",
    show_default=True,
    help="amqp: a RabbitMQ vhost of its own, as make bench BROKER=amqp.",
)
@click.option("--processes", default=1, show_default=True, help="API processes.")
def main(
    requests: int,
    rounds: int,
    connections: int,
    profile: Path | None,
    broker: str,
    processes: int,
) -> None:
    """Measure the API's enqueue rate against a loop of plain send_task calls."""
    log_dir = Path(tempfile.mkdtemp(prefix="cancelflow-enqueue-"))
    base_url = os.environ.get("CANCELFLOW_REDIS_URL", "redis://127.0.0.1:6379")
    with (
        redis_server(base_url, log=log) as server,
        bench_db(server) as db_url,
        broker_leg(broker, log=log) as leg,
    ):
        system = BenchSystem(db_url, log_dir, broker=leg)
        try:
            system.start_sandbox()
            os.environ.update(system.env)
            settings = load_settings()
            configure_logging(fmt="json", level="WARNING")
            system.start_api(processes)
            log(f"load 1m {os.getloadavg()[0]:.2f}; logs in {log_dir}")
            spy = (
                profiling.start_py_spy(
                    system.procs.procs["api"].pid, profile, gil=False, pause=True
                )
                if profile is not None
                else None
            )
            try:
                doc = api_rate.measure(
                    system, settings, requests, rounds=rounds, connections=connections, log=log
                )
            finally:
                if spy is not None:
                    profiling.stop_py_spy(spy)
            redis.Redis.from_url(db_url).flushdb()
        finally:
            system.close()
    print(json.dumps(doc, indent=1))
    if profile is not None:
        print(json.dumps(profiling.cpu_profile(profile), indent=1))
    log(f"load 1m {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
