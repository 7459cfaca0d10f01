"""``python -m bench.pools``: which stock Celery pool runs the baseline fastest on this load.

The baseline of ``make bench`` is plain Celery at its best: this runs the baseline's chains
alone (no Cancelflow worker) on each stock pool Celery has here, alternately, ``--rounds``
times, with the bench's Redis DB and settings (``acks_late``, prefetch 1, events), on the broker
``--broker`` names (Redis, or a RabbitMQ vhost of its own as ``make bench BROKER=amqp``), and
prints each pool's jobs/s and worker CPU per job. gevent and eventlet are not dependencies: a pool
whose package is missing is reported, not run. Under ``scripts/with-redis`` (as ``make bench``)
it never touches the machine's Redis.
"""

from __future__ import annotations

import importlib.util
import os
import statistics
import tempfile
from pathlib import Path

import click

from bench import system as bench_system
from bench.run import Config, log, measure_baseline
from bench.system import BenchSystem, bench_db, broker_leg, redis_server
from cancelflow.logging import configure_logging
from cancelflow.settings import load_settings

# (pool, concurrency): the threads pool at the bench's concurrency; prefork with a process
# per core and with four per core (its tasks are CPU, its messages cross a pipe); solo (one
# task at a time, in the consumer's thread).
POOLS = (("threads", 100), ("prefork", 2), ("prefork", 8), ("solo", 1))
GREEN = ("gevent", "eventlet")


@click.command()
@click.option("--jobs", default=1000, show_default=True)
@click.option("--rounds", default=3, show_default=True)
@click.option("--only", default="", help="Pools to run (comma-separated names), default all.")
@click.option(
    "--broker",
    type=click.Choice(["redis", "amqp"]),
    default="redis",
    show_default=True,
    help="The broker: Redis, or RabbitMQ (a vhost of its own, as make bench BROKER=amqp).",
)
def main(jobs: int, rounds: int, only: str, broker: str) -> None:
    """Run the baseline on each stock pool, alternately; print jobs/s and CPU per job."""
    wanted = {p.strip() for p in only.split(",") if p.strip()}
    pools = tuple(p for p in POOLS if not wanted or p[0] in wanted)
    for green in GREEN:
        if importlib.util.find_spec(green) is None:
            log(f"{green}: not installed (not a dependency), not measured")
    cfg = Config(jobs=jobs, rounds=rounds, api_jobs=0, profile_jobs=0)
    rates: dict[str, list[float]] = {}
    cpu: dict[str, list[float]] = {}
    base_url = os.environ.get("CANCELFLOW_REDIS_URL", "redis://127.0.0.1:6379")
    with (
        redis_server(base_url, log=log) as server,
        bench_db(server) as db_url,
        broker_leg(broker, log=log) as leg,
    ):
        system = BenchSystem(db_url, Path(tempfile.mkdtemp(prefix="cancelflow-pools-")))
        system.broker = leg
        try:
            system.start_sandbox()
            os.environ.update(system.env)
            settings = load_settings()
            configure_logging(fmt="json", level="WARNING")
            for r in range(rounds):
                for pool, concurrency in pools[r % len(pools) :] + pools[: r % len(pools)]:
                    name = f"{pool} -c {concurrency}"
                    bench_system.BASELINE_POOL = pool
                    workers = system.start_workers("baseline", 1, concurrency)
                    try:
                        run = measure_baseline(system, settings, cfg, workers, f"{pool}{r}")
                    finally:
                        system.stop_workers(workers)
                    s = run.summary()
                    rates.setdefault(name, []).append(s["jobs_per_s"] or 0.0)
                    cpu.setdefault(name, []).append(s["cpu_ms_per_job"].get("workers", 0.0))
                    log(
                        f"round {r + 1}/{rounds} {name}: {s['jobs_per_s']} jobs/s, "
                        f"worker CPU {s['cpu_ms_per_job'].get('workers')} ms/job, "
                        f"load {s['load_1m']}"
                    )
        finally:
            system.close()
    for name, values in rates.items():
        print(
            f"{broker} {name:14} jobs/s median {statistics.median(values):7.1f} "
            f"(rounds {', '.join(f'{v:.1f}' for v in values)}), "
            f"worker CPU ms/job median {statistics.median(cpu[name]):.2f}"
        )


if __name__ == "__main__":
    main()
