"""``python -m bench``: run every scenario and the baseline in one run, report, check targets.

Order of a run: Redis DB, sandboxes; then, for each broker of ``--brokers`` (a leg: Redis,
then RabbitMQ on a vhost of the bench's own), the API's enqueue rate against a loop of
``send_task`` (before any worker runs, so neither competes with jobs); both kinds of workers
and ``--rounds`` rounds of [baseline, each scenario]; the same rounds of [baseline,
no_latency] with each count of worker processes of ``--scaling``; then the profile with
counted workers (Cancelflow's, then the baseline's). Medians over rounds; each ratio is the
median of the ratios of the same round, within one leg.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import platform
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import click
import redis

from bench import api_rate, profiling, report
from bench.load import Flight, Run, make_requests, send_baseline, send_cancelflow
from bench.system import (
    BenchSystem,
    RssSampler,
    Workers,
    bench_db,
    broker_leg,
    redis_server,
    wait_idle,
)
from cancelflow.contract import CALLBACKS_QUEUE, provider_queue
from cancelflow.logging import configure_logging
from cancelflow.settings import Settings, load_settings
from messaging.config import create_celery
from producers.local import http_json

# Scenario -> the faults every sandbox in the mix gets (PUT /{key}/_sandbox/faults).
SCENARIOS: dict[str, dict[str, Any]] = {
    "no_latency": {},
    "latency_200ms": {"latency_ms": 200},
    "fail_once_20": {"fail_once_rate": 0.2, "seed": 8},
}
RESULTS = Path(__file__).parent / "results"
BROKERS = ("redis", "amqp")


@dataclass
class Config:
    jobs: int = 1000
    rounds: int = 3
    scenarios: list[str] = field(default_factory=lambda: list(SCENARIOS))
    # One worker process of each kind (``cancelflow worker`` as the README runs it): a worker
    # has a core to itself while Redis, the sandboxes and this driver share the other.
    workers: int = 1
    # Processes of each Cancelflow worker and of the API (``--processes``): one per core the
    # bench may use, as the baseline's prefork pool spreads over every core.
    processes: int = field(default_factory=lambda: len(os.sched_getaffinity(0)))
    concurrency: int = 100
    window: int = 500
    providers: list[str] = field(default_factory=lambda: ["payway"])
    api_jobs: int = 1000
    api_connections: int = 32
    profile_jobs: int = 400
    out: Path = RESULTS
    baseline: bool = True
    # The legs, each on its broker: the first is the one ``scenarios`` and ``targets`` of
    # the JSON's top level describe (every leg's are under ``brokers``).
    brokers: list[str] = field(default_factory=lambda: ["redis"])
    # Other counts of worker processes per side, each run for ``rounds`` rounds of [baseline,
    # no_latency] after the main rounds (the scaling figures).
    scaling: list[int] = field(default_factory=lambda: [2])


def log(message: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {message}", flush=True)


def set_faults(sandbox_url: str, providers: list[str], faults: dict[str, Any]) -> None:
    for key in providers:
        status, body = http_json("PUT", f"{sandbox_url}/{key}/_sandbox/faults", faults)
        if status != 200:
            raise RuntimeError(f"sandbox {key} refused faults {faults}: {body}")


def _timeout(cfg: Config) -> float:
    return 120 + cfg.jobs * 0.5


def measure_cancelflow(
    system: BenchSystem, settings: Settings, cfg: Config, workers: Workers, scenario: str, tag: str
) -> Run:
    requests = make_requests(system.sandbox_url, cfg.jobs, cfg.providers, tag)
    set_faults(system.sandbox_url, cfg.providers, SCENARIOS[scenario])
    flight = Flight()
    sampler = RssSampler(workers.pids, lambda: flight.count, cpu_pids=system.other_pids())
    sampler.start()
    try:
        sent, records = asyncio.run(
            send_cancelflow(
                settings, requests, window=cfg.window, flight=flight, timeout_s=_timeout(cfg)
            )
        )
    finally:
        sampler.stop()
        set_faults(system.sandbox_url, cfg.providers, {})
    run = Run.of_cancelflow(scenario, sent, records)
    run.peak_rss_mb, run.peak_rss_at_max_in_flight_mb = sampler.peak, sampler.peak_at_window
    run.max_in_flight = sampler.max_in_flight
    run.cpu_s = sampler.cpu_s
    run.load_1m = round(os.getloadavg()[0], 2)
    wait_idle(settings, [provider_queue(k) for k in cfg.providers] + [CALLBACKS_QUEUE])
    return run


def measure_baseline(
    system: BenchSystem, settings: Settings, cfg: Config, workers: Workers, tag: str
) -> Run:
    flight = Flight()
    sampler = RssSampler(workers.pids, lambda: flight.count, cpu_pids=system.other_pids())
    sampler.start()
    try:
        sent, done = asyncio.run(
            send_baseline(
                settings, cfg.jobs, tag, window=cfg.window, flight=flight, timeout_s=_timeout(cfg)
            )
        )
    finally:
        sampler.stop()
    run = Run.of_baseline(sent, done)
    run.peak_rss_mb, run.peak_rss_at_max_in_flight_mb = sampler.peak, sampler.peak_at_window
    run.max_in_flight = sampler.max_in_flight
    run.cpu_s = sampler.cpu_s
    run.load_1m = round(os.getloadavg()[0], 2)
    return run


def _describe(run: Run) -> str:
    s = run.summary()
    lat = s["latency_ms"]
    return (
        f"{run.scenario}: {s['jobs_per_s']} jobs/s, p50 {lat['p50']} ms, p95 {lat['p95']} ms, "
        f"p99 {lat['p99']} ms, peak RSS {s['peak_rss_mb']} MB, "
        f"{s['completed']}/{s['jobs']} completed, load {s['load_1m']}"
    )


@contextlib.contextmanager
def _environ(env: dict[str, str]) -> Iterator[None]:
    """``env`` in this process's environment for the block (the bench's own producer reads
    the settings the workers get), the environment as it was afterwards."""
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def run_rounds(
    system: BenchSystem,
    settings: Settings,
    cfg: Config,
    scenarios: list[str],
    workers: int,
    *,
    broker: str,
) -> list[dict[str, Any]]:
    """``cfg.rounds`` rounds of the baseline and ``scenarios``, with ``workers`` processes of
    each kind; every run's summary."""
    runs: list[dict[str, Any]] = []
    ours = system.start_workers("cancelflow", workers, cfg.concurrency, processes=cfg.processes)
    theirs = system.start_workers("baseline", workers, cfg.concurrency) if cfg.baseline else None
    log(
        f"[{broker}] workers: {workers} x cancelflow ({cfg.processes} processes each), "
        f"{workers if theirs else 0} x baseline, concurrency {cfg.concurrency}"
    )
    try:
        order = (["baseline"] if theirs is not None else []) + scenarios
        for r in range(cfg.rounds):
            # Each round starts with another scenario: a drift of the machine's load over a
            # round does not always fall on the same one.
            for scenario in order[r % len(order) :] + order[: r % len(order)]:
                tag = f"{broker}-w{workers}-r{r}"
                if scenario == "baseline":
                    assert theirs is not None
                    run = measure_baseline(system, settings, cfg, theirs, tag)
                else:
                    run = measure_cancelflow(
                        system, settings, cfg, ours, scenario, f"{tag}-{scenario}"
                    )
                log(f"[{broker}] {workers} worker(s), round {r + 1}/{cfg.rounds} {_describe(run)}")
                runs.append(
                    {
                        "round": r,
                        "broker": broker,
                        "workers": workers,
                        "system": run.system,
                        "scenario": scenario,
                        **run.summary(),
                    }
                )
    finally:
        system.stop_workers(ours)
        if theirs is not None:
            system.stop_workers(theirs)
    return runs


def purge_queues(settings: Settings, queues: list[str]) -> None:
    """Empty ``queues`` on the settings' RabbitMQ (the bench's own vhost); a queue not
    declared yet has nothing to empty."""
    app = create_celery(settings)
    purged = 0
    try:
        with app.connection_for_write() as conn:
            for name in queues:
                channel = conn.channel()
                try:
                    purged += int(channel.queue_purge(name) or 0)
                except conn.channel_errors:  # not found: RabbitMQ closed the channel
                    continue
                channel.close()
    finally:
        app.close()
    log(f"purged {purged} message(s) left by the enqueue rounds")


def run_leg(
    system: BenchSystem, settings: Settings, cfg: Config, db_url: str, broker: str
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """One broker's leg: the enqueue rate, the rounds, the scaling rounds, the profile."""
    leg: dict[str, Any] = {}
    if cfg.api_jobs:
        system.start_api(cfg.processes)
        leg["api"] = api_rate.measure(
            system,
            settings,
            cfg.api_jobs,
            rounds=max(cfg.rounds, 3),
            connections=cfg.api_connections,
            log=lambda m: log(f"[{broker}] {m}"),
        )
        system.stop("api")
        redis.Redis.from_url(db_url).flushdb()
        if settings.broker_kind() == "amqp":
            # The enqueue rounds' first steps wait on RabbitMQ's queues (the flush above
            # only cleared Redis): the workers would take them as messages of jobs that do
            # not exist (dead-lettered as poison), in the first round's time.
            purge_queues(settings, [provider_queue(k) for k in cfg.providers] + [CALLBACKS_QUEUE])
    runs = run_rounds(system, settings, cfg, cfg.scenarios, cfg.workers, broker=broker)
    for count in cfg.scaling:
        if count != cfg.workers:
            runs += run_rounds(
                system, settings, cfg, ["no_latency"] if cfg.baseline else [], count, broker=broker
            )
    main = [r for r in runs if r["workers"] == cfg.workers]
    leg["scenarios"] = report.summarise(main)
    leg["scaling"] = report.scaling(runs, cfg.workers)
    if cfg.profile_jobs:
        leg["profile"] = profiling.profile(system, settings, cfg, log=log)
    leg["targets"] = report.targets(leg, cfg.window)
    return leg, runs


def run_bench(cfg: Config) -> dict[str, Any]:
    """Everything ``make bench`` measures, as the JSON document it writes."""
    started = datetime.now(UTC)
    log_dir = Path(tempfile.mkdtemp(prefix="cancelflow-bench-"))
    base_url = os.environ.get("CANCELFLOW_REDIS_URL", "redis://127.0.0.1:6379")
    runs: list[dict[str, Any]] = []
    legs: dict[str, dict[str, Any]] = {}
    with redis_server(base_url, log=log) as server, bench_db(server) as db_url:
        system = BenchSystem(db_url, log_dir)
        try:
            system.start_sandbox()
            configure_logging(fmt="json", level="WARNING")
            log(f"Redis DB {db_url}, sandboxes {system.sandbox_url}, logs in {log_dir}")
            for broker in cfg.brokers:
                with broker_leg(broker, log=log) as found:
                    system.broker = found
                    with _environ(system.env):
                        settings = load_settings()
                        legs[broker], leg_runs = run_leg(system, settings, cfg, db_url, broker)
                    runs += leg_runs
                redis.Redis.from_url(db_url).flushdb()
        finally:
            system.close()
        server_info: dict[str, Any] = redis.Redis.from_url(db_url).info("server")  # type: ignore[assignment]
    first = legs[cfg.brokers[0]]
    doc: dict[str, Any] = {
        "version": 2,
        "started_at": started.isoformat(timespec="seconds"),
        "finished_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": {
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
            "redis": server_info.get("redis_version"),
            "platform": platform.platform(),
            # Runs on two machines of the same kind differ by as much as a third: say which.
            "cpu_model": _cpu_model(),
        },
        "config": {**asdict(cfg), "out": str(cfg.out)},
        "runs": runs,
        # The first leg's figures at the top level, as a one-broker run has them.
        "broker": cfg.brokers[0],
        **{k: first[k] for k in ("api", "profile") if k in first},
        "scenarios": first["scenarios"],
        "scaling": first["scaling"],
        "targets": first["targets"],
        "brokers": legs,
    }
    return doc


def _list(value: str) -> list[str]:
    return [v.strip() for v in value.split(",") if v.strip()]


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.option(
    "--jobs", envvar="BENCH_JOBS", default=Config.jobs, show_default=True, help="Jobs per run."
)
@click.option(
    "--rounds",
    envvar="BENCH_ROUNDS",
    default=Config.rounds,
    show_default=True,
    help="Runs of each scenario (medians reported).",
)
@click.option(
    "--scenarios", envvar="BENCH_SCENARIOS", default=",".join(SCENARIOS), show_default=True
)
@click.option(
    "--workers",
    envvar="BENCH_WORKERS",
    default=Config.workers,
    show_default=True,
    help="Worker processes (each kind).",
)
@click.option(
    "--processes",
    envvar="BENCH_PROCESSES",
    default=None,
    type=int,
    help="Processes of each Cancelflow worker and of the API [the cores this process may use].",
)
@click.option(
    "--concurrency",
    envvar="BENCH_CONCURRENCY",
    default=None,
    type=int,
    help="Threads per worker [CANCELFLOW_WORKER__CONCURRENCY's default: 100].",
)
@click.option(
    "--window",
    envvar="BENCH_WINDOW",
    default=Config.window,
    show_default=True,
    help="Most jobs in flight.",
)
@click.option("--providers", envvar="BENCH_PROVIDERS", default="payway", show_default=True)
@click.option(
    "--api-jobs",
    envvar="BENCH_API_JOBS",
    default=Config.api_jobs,
    show_default=True,
    help="Requests per enqueue-rate run (0: skip).",
)
@click.option(
    "--profile-jobs",
    envvar="BENCH_PROFILE_JOBS",
    default=Config.profile_jobs,
    show_default=True,
    help="Jobs of the profile run (0: skip).",
)
@click.option(
    "--out",
    envvar="BENCH_OUT",
    default=str(RESULTS),
    show_default=True,
    type=click.Path(path_type=Path),
)
@click.option("--no-baseline", is_flag=True, help="Skip the baseline (ratios are then missing).")
@click.option(
    "--brokers",
    envvar="BENCH_BROKERS",
    default="redis",
    show_default=True,
    help="Brokers, a leg each: redis, amqp (RabbitMQ, a vhost of the bench's own), or both.",
)
@click.option(
    "--scaling",
    envvar="BENCH_SCALING",
    default="2",
    show_default=True,
    help="Other counts of worker processes per side to measure (empty: none).",
)
def main(
    jobs: int,
    rounds: int,
    scenarios: str,
    workers: int,
    processes: int | None,
    concurrency: int | None,
    window: int,
    providers: str,
    api_jobs: int,
    profile_jobs: int,
    out: Path,
    no_baseline: bool,
    brokers: str,
    scaling: str,
) -> None:
    """Benchmark Cancelflow against plain Celery chains; exit 1 if a target fails."""
    unknown = set(_list(scenarios)) - set(SCENARIOS)
    if unknown:
        raise click.BadParameter(f"unknown scenarios {sorted(unknown)}; known: {list(SCENARIOS)}")
    legs = _list(brokers)
    if not legs or set(legs) - set(BROKERS):
        raise click.BadParameter(f"brokers {legs}: one or more of {list(BROKERS)}")
    cfg = Config(
        jobs=jobs,
        rounds=rounds,
        scenarios=_list(scenarios),
        workers=workers,
        processes=processes or len(os.sched_getaffinity(0)),
        concurrency=concurrency or Settings().worker.concurrency,
        window=window,
        providers=_list(providers),
        api_jobs=api_jobs,
        profile_jobs=min(profile_jobs, jobs) if profile_jobs else 0,
        out=out,
        baseline=not no_baseline,
        brokers=legs,
        scaling=[int(n) for n in _list(scaling)],
    )
    doc = run_bench(cfg)
    previous = report.load(out / "latest.json")
    paths = report.write(doc, out)
    print(report.table(doc))
    print(report.profile_text(doc))
    if previous is not None:
        print(report.delta(previous, doc))
    print(report.targets_text(doc))
    for path in paths:
        print(f"wrote {path}")
    failed = [t for leg in doc["brokers"].values() for t in leg["targets"] if t["status"] == "FAIL"]
    sys.exit(1 if failed else 0)


def _cpu_model() -> str:
    """The CPU's model name and clock, from /proc/cpuinfo; the architecture where it names
    neither (not Linux, or an ARM CPU's /proc/cpuinfo)."""
    info: dict[str, str] = {}
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as f:
        info = {k.strip(): v.strip() for k, _, v in (ln.partition(":") for ln in f) if v}
    model, mhz = info.get("model name"), info.get("cpu MHz")
    if model and mhz:
        return f"{model} @ {float(mhz):.0f} MHz"
    return model or platform.processor() or platform.machine()


if __name__ == "__main__":
    main()
