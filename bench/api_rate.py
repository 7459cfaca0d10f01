"""The API's enqueue rate against a loop of plain ``send_task`` calls (target d).

The loop: one thread calling ``send_task`` on Cancelflow's Celery config, to a queue no worker
reads. The API: ``POST /v1/cancellations`` for fresh sandbox subscriptions from
``connections`` keep-alive connections at once (many producers), through a minimal HTTP/1.1
client so that the client's own cost, on the same two cores, stays small. No worker runs
meanwhile. Each is run ``rounds`` times, alternately; medians, and the median of the ratios.
"""

from __future__ import annotations

import asyncio
import json
import statistics
import time
import uuid
from collections import Counter
from collections.abc import Callable
from typing import Any
from urllib.parse import urlsplit

import redis
from celery import Celery

from bench import baseline
from bench.load import make_requests
from bench.system import API_TOKEN, BenchSystem, cpu_seconds
from cancelflow.settings import Settings

WARM_UP = 50


def send_task_loop(celery: Celery, n: int) -> float:
    """Messages per second of ``n`` sequential ``send_task`` calls."""
    for _ in range(WARM_UP):
        celery.send_task("bench.noop", args=[f"job_{uuid.uuid4().hex}"], queue=baseline.SINK_QUEUE)
    started = time.perf_counter()
    for _ in range(n):
        celery.send_task("bench.noop", args=[f"job_{uuid.uuid4().hex}"], queue=baseline.SINK_QUEUE)
    return n / (time.perf_counter() - started)


def _request(host: str, body: bytes) -> bytes:
    head = (
        f"POST /v1/cancellations HTTP/1.1\r\nHost: {host}\r\nAuthorization: Bearer {API_TOKEN}\r\n"
        f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
    )
    return head.encode() + body


async def post_all(
    api_url: str, bodies: list[bytes], connections: int
) -> tuple[float, Counter[int]]:
    """Requests per second of POSTing every body over ``connections`` keep-alive connections,
    and the statuses answered."""
    parts = urlsplit(api_url)
    host, port = parts.hostname or "127.0.0.1", parts.port or 80
    requests = [_request(f"{host}:{port}", b) for b in bodies]
    statuses: Counter[int] = Counter()
    next_index = iter(range(len(requests)))

    async def client() -> None:
        reader, writer = await asyncio.open_connection(host, port)
        try:
            for i in next_index:
                writer.write(requests[i])
                head = await reader.readuntil(b"\r\n\r\n")
                lines = head.decode("latin-1").split("\r\n")
                statuses[int(lines[0].split(" ")[1])] += 1
                length = next(
                    int(h.split(":", 1)[1])
                    for h in lines[1:]
                    if h.lower().startswith("content-length:")
                )
                await reader.readexactly(length)
        finally:
            writer.close()

    started = time.perf_counter()
    await asyncio.gather(*(client() for _ in range(connections)))
    return len(requests) / (time.perf_counter() - started), statuses


class CpuMeter:
    """CPU seconds each of some processes spends between ``start`` and ``stop``, added up."""

    def __init__(self, pids: dict[str, int]) -> None:
        self.pids = pids
        self.spent: dict[str, float] = dict.fromkeys(pids, 0.0)
        self._then: dict[str, float | None] = {}

    def start(self) -> None:
        self._then = {name: cpu_seconds(pid) for name, pid in self.pids.items()}

    def stop(self) -> None:
        for name, pid in self.pids.items():
            now, then = cpu_seconds(pid), self._then.get(name)
            if now is not None and then is not None:
                self.spent[name] += now - then

    def per_request_ms(self, requests: int) -> dict[str, float]:
        return {name: round(s / requests * 1000, 3) for name, s in self.spent.items()}


def measure(
    system: BenchSystem,
    settings: Settings,
    n: int,
    *,
    rounds: int,
    connections: int,
    log: Callable[[str], None],
) -> dict[str, Any]:
    """The enqueue benchmark's figures (JSON-ready)."""
    celery = baseline.create_baseline(settings)
    loop_rates: list[float] = []
    api_rates: list[float] = []
    statuses: Counter[int] = Counter()
    # CPU per request of the API, the load generator (this process) and Redis, while the API
    # rounds run; and of this process and Redis while the loop runs (the loop is this process).
    others = {k: v for k, v in system.other_pids().items() if k in ("driver", "redis")}
    api_cpu = CpuMeter({"api": system.procs.procs["api"].pid, **others})
    loop_cpu = CpuMeter(others)
    try:
        warm = [
            json.dumps(r.model_dump(mode="json")).encode()
            for r in make_requests(system.sandbox_url, WARM_UP, ["payway"], "api-warm")
        ]
        asyncio.run(post_all(system.api_url, warm, min(connections, WARM_UP)))
        for r in range(rounds):
            loop_cpu.start()
            loop_rates.append(send_task_loop(celery, n))
            loop_cpu.stop()
            bodies = [
                json.dumps(req.model_dump(mode="json")).encode()
                for req in make_requests(system.sandbox_url, n, ["payway"], f"api-{r}")
            ]
            api_cpu.start()
            rate, answered = asyncio.run(post_all(system.api_url, bodies, connections))
            api_cpu.stop()
            api_rates.append(rate)
            statuses.update(answered)
            log(
                f"enqueue round {r + 1}/{rounds}: send_task loop {loop_rates[-1]:.0f}/s, "
                f"API {rate:.0f}/s ({dict(answered)})"
            )
    finally:
        celery.close()
        redis.Redis.from_url(settings.redis_url).delete(baseline.SINK_QUEUE)
    ratios = [a / b for a, b in zip(api_rates, loop_rates, strict=True)]
    return {
        "requests": n,
        "connections": connections,
        "send_task_loop_per_s": round(statistics.median(loop_rates), 1),
        "api_per_s": round(statistics.median(api_rates), 1),
        "ratio": round(statistics.median(ratios), 3),
        "statuses": {str(k): v for k, v in sorted(statuses.items())},
        # Milliseconds of CPU per request (or per message of the loop), by process.
        "api_cpu_ms_per_request": api_cpu.per_request_ms(n * rounds),
        "loop_cpu_ms_per_message": loop_cpu.per_request_ms(n * rounds),
        "rounds": [
            {"send_task_loop_per_s": round(a, 1), "api_per_s": round(b, 1)}
            for a, b in zip(loop_rates, api_rates, strict=True)
        ],
    }
