"""What tracing costs a step while off (and on), measured on the pool's own path.

``python -m bench.tracing_off [--steps N] [--rounds R] [--on]``: N step messages handed to
``worker.pool.TaskPool`` as Celery's worker hands them (Celery's own tracer, the message's
parts), each a task whose coroutine half builds the next step's headers
(``messaging.dispatch._step_headers``, where a message gets its ``traceparent``) as a step
does; prints the CPU microseconds per step of each round and their median. Run it from a
checkout of the code before tracing (``PYTHONPATH=that checkout``) to compare: the script
touches only what both have. ``--on``: with tracing on, spans kept by the SDK in memory.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import threading
import time
from concurrent.futures import Future
from typing import Any

from celery import Celery, Task
from celery.app.trace import trace_task_ret

from cancelflow.contract import Step
from cancelflow.lifecycle import Next
from messaging.dispatch import _step_headers
from worker.pool import TaskPool

app = Celery("bench-tracing", broker="memory://", set_as_current=False)
app.conf.accept_content = ["json"]


class Step2(Task):  # type: ignore[misc]
    async def run_async(self, args: Any, kwargs: Any, request: Any) -> Any:
        return _step_headers(Next(Step.CONFIRM, args[0], "payway"))


@app.task(base=Step2, bind=True, name="bench.step")  # type: ignore[untyped-decorator]
def step(self: Task, *args: Any) -> Any:
    return None


def run_round(pool: TaskPool, steps: int) -> float:
    """CPU seconds of this process per step, over ``steps`` steps 100 at a time."""
    body = json.dumps([["job"], {}, {}])
    started = time.process_time()
    for start in range(0, steps, 100):
        done: list[Future[Any]] = []
        for n in range(start, min(start + 100, steps)):
            future: Future[Any] = Future()
            request = {
                "id": f"t{n}",
                "job_id": "job",
                "provider": "payway",
                "delivery_info": {"routing_key": "cancellations.payway"},
                "traceparent": "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
            }
            pool.apply_async(
                trace_task_ret,
                args=("bench.step", f"t{n}", request, body, "application/json", "utf-8"),
                kwargs={"app": app},
                callback=future.set_result,
            )
            done.append(future)
        for future in done:
            future.result(60)
    return (time.process_time() - started) / steps


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=20_000)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--on", action="store_true")
    options = parser.parse_args()
    if options.on:
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import SimpleSpanProcessor
        from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

        from cancelflow import tracing

        provider = TracerProvider()
        provider.add_span_processor(SimpleSpanProcessor(InMemorySpanExporter()))
        tracing.use_tracer_provider(provider)
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    pool = TaskPool(limit=100, app=app, loop=loop)
    pool.start()
    run_round(pool, 1000)  # warm up
    rounds = [run_round(pool, options.steps) * 1e6 for _ in range(options.rounds)]
    pool.stop()
    loop.call_soon_threadsafe(loop.stop)
    print(
        json.dumps(
            {
                "rounds_us_per_step": [round(r, 1) for r in rounds],
                "median_us_per_step": round(statistics.median(rounds), 1),
            }
        )
    )


if __name__ == "__main__":
    main()
