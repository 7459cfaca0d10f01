"""``cancelflow bulk``: many cancellations from a CSV or JSON Lines file, through the API.

Rows:
  JSON Lines  one ``CancellationRequest`` object per line.
  CSV         a header row; ``provider``, ``subscription.<field>``, ``reason.code``,
              ``reason.comment``, ``callback_url``, ``idempotency_key``, ``metadata.<key>``
              columns; empty cells are left out.
A row is named by its line number in the file. ``--provider`` fills in a missing provider.

Safe to run again: each row's idempotency key is its own ``idempotency_key``, else one derived
from its content (``bulk:<sha256>``), so a row sent twice finds its first job. The report (JSON
Lines, one entry per row handled, appended as rows finish) is also the journal: a second run
skips the rows it already has a job for and retries the others.
"""

from __future__ import annotations

import asyncio
import csv
import hashlib
import json
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from pydantic import ValidationError

from cancelflow_client import (
    ApiError,
    AsyncCancelflowClient,
    AuthError,
    CancellationRequest,
    TransportError,
)
from producers.problems import field_errors


@dataclass(frozen=True)
class Row:
    """One row of the file: its request body, or why it could not be read."""

    number: int
    body: dict[str, Any] | None = None
    error: str | None = None

    @property
    def key(self) -> str | None:
        return self.body.get("idempotency_key") if self.body else None


def derive_key(body: dict[str, Any], *, prefix: str = "") -> str:
    """The idempotency key of a row without one: the same content, the same key."""
    canonical = json.dumps(body, sort_keys=True, separators=(",", ":"), default=str)
    return "bulk:" + hashlib.sha256((prefix + canonical).encode()).hexdigest()[:48]


def _nest(flat: dict[str, str]) -> dict[str, Any]:
    body: dict[str, Any] = {}
    for name, value in flat.items():
        if not name or value is None or value == "":
            continue
        *parents, leaf = name.strip().split(".")
        node = body
        for part in parents:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ValueError(f"column {name!r} nests under a plain value")
        node[leaf] = value
    return body


def _csv_rows(handle: IO[str]) -> Iterator[Row]:
    reader = csv.DictReader(handle)
    _ = reader.fieldnames  # reads the header row
    start = reader.line_num + 1
    for record in reader:
        number = start
        start = reader.line_num + 1
        if None in record:
            yield Row(
                number, error=f"more cells than the header has columns ({len(record[None])} extra)"
            )
            continue
        try:
            yield Row(number, body=_nest(record))
        except ValueError as exc:
            yield Row(number, error=str(exc))


def _jsonl_rows(handle: IO[str]) -> Iterator[Row]:
    for number, line in enumerate(handle, 1):
        if not line.strip():
            continue
        try:
            body = json.loads(line)
        except ValueError as exc:
            yield Row(number, error=f"not JSON: {exc}")
            continue
        if not isinstance(body, dict):
            yield Row(number, error="not a JSON object")
            continue
        yield Row(number, body=body)


def read_rows(path: Path, *, provider: str | None = None, key_prefix: str = "") -> Iterator[Row]:
    """The file's rows, each with an idempotency key (its own, or derived)."""
    with path.open(encoding="utf-8", newline="") as handle:
        rows = _csv_rows(handle) if path.suffix.lower() == ".csv" else _jsonl_rows(handle)
        for row in rows:
            if row.body is None:
                yield row
                continue
            body = dict(row.body)
            if provider and "provider" not in body:
                body["provider"] = provider
            if not body.get("idempotency_key"):
                body["idempotency_key"] = derive_key(body, prefix=key_prefix)
            yield Row(row.number, body=body)


def count_rows(path: Path) -> int:
    """How many rows the file has (for the progress bar)."""
    return sum(1 for _ in read_rows(path))


class Report:
    """The per-row report, appended to as rows finish; read back to resume."""

    def __init__(self, path: Path) -> None:
        self.path = path
        # row -> idempotency key of the rows that already have a job.
        self.done: dict[int, str] = {}
        if path.exists():
            for line in path.read_text(encoding="utf-8").splitlines():
                try:
                    entry = json.loads(line)
                except ValueError:
                    continue  # a line cut short by a kill
                if entry.get("job_id"):
                    self.done[int(entry["row"])] = entry.get("idempotency_key")
                else:
                    self.done.pop(int(entry.get("row", 0)), None)
        self._handle = path.open("a", encoding="utf-8")

    def finished(self, row: Row) -> bool:
        return row.number in self.done and self.done[row.number] == row.key

    def write(self, entry: dict[str, Any]) -> None:
        self._handle.write(json.dumps(entry, separators=(",", ":")) + "\n")
        self._handle.flush()  # each row is on disk before the next: a kill loses none

    def close(self) -> None:
        self._handle.close()

    def latest(self) -> dict[int, dict[str, Any]]:
        """Each row's last entry."""
        out: dict[int, dict[str, Any]] = {}
        for line in self.path.read_text(encoding="utf-8").splitlines():
            try:
                entry = json.loads(line)
            except ValueError:
                continue
            out[int(entry["row"])] = entry
        return out


@dataclass
class Summary:
    """What a run did (this run's counts) and where the file stands (every row's last entry)."""

    rows: int = 0
    this_run: Counter[str] = field(default_factory=Counter)
    with_job: int = 0
    failed: int = 0
    interrupted: bool = False
    aborted: str | None = None
    elapsed_s: float = 0.0
    report: str = ""

    def as_dict(self) -> dict[str, Any]:
        return {
            "rows": self.rows,
            "with_job": self.with_job,
            "failed": self.failed,
            "this_run": dict(self.this_run),
            "interrupted": self.interrupted,
            "aborted": self.aborted,
            "elapsed_s": round(self.elapsed_s, 2),
            "report": self.report,
        }


class Pacer:
    """At most ``rate`` starts per second, however many workers ask."""

    def __init__(self, rate: float) -> None:
        self._interval = 1.0 / rate
        self._next = time.monotonic()
        self._lock = asyncio.Lock()

    async def wait(self) -> None:
        async with self._lock:
            now = time.monotonic()
            slot = max(now, self._next)
            self._next = slot + self._interval
        if slot > now:
            await asyncio.sleep(slot - now)


class BulkAborted(Exception):
    """Every further row would fail the same way (the token is refused)."""


async def run_bulk(
    client: AsyncCancelflowClient,
    path: Path,
    *,
    report_path: Path,
    rate: float,
    concurrency: int,
    provider: str | None = None,
    key_prefix: str = "",
    advance: Callable[[], None] = lambda: None,
) -> Summary:
    """Send every row not done yet; ``advance`` is called once per row."""
    started = time.monotonic()
    report = Report(report_path)
    summary = Summary(report=str(report_path))
    pacer = Pacer(rate)
    queue: asyncio.Queue[Row | None] = asyncio.Queue(maxsize=concurrency * 2)

    async def send(row: Row) -> None:
        assert row.body is not None
        base: dict[str, Any] = {"row": row.number, "idempotency_key": row.key}
        try:
            request = CancellationRequest.model_validate(row.body)
        except ValidationError as exc:
            errors = field_errors(exc)
            report.write(
                {
                    **base,
                    "status": "error",
                    "error": "invalid fields",
                    "errors": errors,
                    "retryable": False,
                }
            )
            summary.this_run["failed"] += 1
            return
        await pacer.wait()
        try:
            enqueued = await client.enqueue(request)
        except AuthError as exc:
            raise BulkAborted(str(exc)) from exc
        except ApiError as exc:
            entry = {
                **base,
                "status": "error",
                "error": str(exc),
                "http_status": exc.status,
                "retryable": exc.status in (429, 502, 503, 504),
            }
            if exc.problem.errors:
                entry["errors"] = [e.model_dump() for e in exc.problem.errors]
            if exc.problem.job_id:
                entry["job_of_key"] = exc.problem.job_id
            report.write(entry)
            summary.this_run["failed"] += 1
            return
        except TransportError as exc:
            report.write({**base, "status": "error", "error": str(exc), "retryable": True})
            summary.this_run["failed"] += 1
            return
        report.write({**base, "status": "ok", "job_id": enqueued.job.id, "how": enqueued.how})
        summary.this_run[enqueued.how] += 1

    async def worker() -> None:
        while (row := await queue.get()) is not None:
            try:
                await send(row)
            finally:
                advance()

    async def feed() -> None:
        for row in read_rows(path, provider=provider, key_prefix=key_prefix):
            summary.rows += 1
            if row.body is None:
                report.write(
                    {"row": row.number, "status": "error", "error": row.error, "retryable": False}
                )
                summary.this_run["failed"] += 1
                advance()
            elif report.finished(row):
                summary.this_run["skipped"] += 1
                advance()
            else:
                await queue.put(row)
        for _ in range(concurrency):
            await queue.put(None)

    workers = [asyncio.create_task(worker()) for _ in range(concurrency)]
    feeder = asyncio.create_task(feed())
    try:
        done, _ = await asyncio.wait([feeder, *workers], return_when=asyncio.FIRST_EXCEPTION)
        for task in done:
            if task.exception() is not None:
                raise task.exception()  # type: ignore[misc]
    except BulkAborted as exc:
        summary.aborted = str(exc)
    except asyncio.CancelledError:
        summary.interrupted = True
    finally:
        for task in [feeder, *workers]:
            task.cancel()
        await asyncio.gather(feeder, *workers, return_exceptions=True)
        report.close()
        latest = report.latest()
        summary.with_job = sum(1 for e in latest.values() if e.get("job_id"))
        summary.failed = sum(1 for e in latest.values() if not e.get("job_id"))
        summary.elapsed_s = time.monotonic() - started
    return summary
