"""Webhook endpoints at the callback step (fake Redis, the sandbox receiver on a real port,
the standardwebhooks library verifying): each endpoint signs with its own secret, gets only
the event types it asked for, beside the job's own callback URL; a rotation signs with both
secrets for its overlap; a 410 or days of failures disable it, with an operational event."""

from __future__ import annotations

import asyncio
import contextlib
from datetime import datetime, timedelta

import pytest
import structlog
from prometheus_client import REGISTRY

from cancelflow import callbacks, delivery, lifecycle
from cancelflow.contract import Outcome, OutcomeType, utcnow
from cancelflow.endpoints import EndpointStore
from cancelflow.settings import DAY
from sandboxes.receiver import DEMO_CALLBACK_SECRET
from tests.callbacks.harness import Harness, deliver_until_done, harness, settings

CANCELLED = Outcome(type=OutcomeType.CANCELLED, cancellation_type="immediate")


def endpoints(h: Harness) -> EndpointStore:
    return EndpointStore(h.deps.store.redis)


async def add(h: Harness, **kw: object) -> tuple[str, str]:
    created, secret = await endpoints(h).create(
        url=h.url,
        description="",
        event_types=list(kw.pop("event_types", [])),  # type: ignore[call-overload]
        rotation_overlap_s=float(kw.pop("rotation_overlap_s", DAY)),  # type: ignore[arg-type]
    )
    return created.id, secret


def disabled_count(reason: str) -> float:
    value = REGISTRY.get_sample_value(
        "cancelflow_callback_endpoints_disabled_total", {"reason": reason}
    )
    return value or 0.0


def test_an_endpoint_gets_every_event_signed_with_its_own_secret() -> None:
    async def scenario() -> None:
        async with harness() as h:
            endpoint_id, secret = await add(h)
            assert secret.startswith("whsec_") and secret != DEMO_CALLBACK_SECRET
            # The receiver holds the endpoint's secret only: the job's own URL (signed with
            # the provider's) is refused, the endpoint's request verifies.
            h.configure(secrets=[secret])
            job_id = await h.finished(CANCELLED, callback_url=None)
            assert await deliver_until_done(h, job_id) == []
            [request] = h.receiver.requests
            assert (request.verified, request.status) == (True, 200)
            job = await h.record(job_id)
            [delivered, skipped] = sorted(job.callbacks, key=lambda c: c.result)
            assert (delivered.result, delivered.endpoint_id, delivered.url) == (
                "delivered",
                endpoint_id,
                h.url,
            )
            assert delivered.latency_ms is not None and delivered.response
            assert skipped.result == "skipped" and skipped.endpoint_id is None
            found = await endpoints(h).get(endpoint_id)
            assert found is not None and found.last_success_at and found.failing_since_at is None

    asyncio.run(scenario())


def test_the_jobs_own_callback_url_keeps_working_beside_the_endpoints() -> None:
    async def scenario() -> None:
        async with harness() as h:
            _, secret = await add(h)
            h.configure(secrets=[DEMO_CALLBACK_SECRET, secret])
            job_id = await h.finished(CANCELLED)
            assert await deliver_until_done(h, job_id) == []
            job = await h.record(job_id)
            assert sorted((c.result, c.endpoint_id is None) for c in job.callbacks) == [
                ("delivered", False),
                ("delivered", True),
            ]
            assert all(r.verified for r in h.receiver.requests)
            assert len(h.receiver.requests) == 2

    asyncio.run(scenario())


def test_the_event_type_filter_and_disabled_endpoints() -> None:
    async def scenario() -> None:
        async with harness() as h:
            wants_dead, secret = await add(h, event_types=["cancellation.dead_lettered"])
            off, _ = await add(h)
            h.configure(secrets=[secret])
            await endpoints(h).update(off, enabled=False)
            job_id = await h.finished(CANCELLED, callback_url=None)
            assert await deliver_until_done(h, job_id) == []
            job = await h.record(job_id)
            assert [c.result for c in job.callbacks] == ["skipped"]
            dead = await h.dead_lettered(callback_url=None)
            assert await deliver_until_done(h, dead) == []
            job = await h.record(dead)
            assert [(c.result, c.endpoint_id) for c in job.callbacks if c.endpoint_id] == [
                ("delivered", wants_dead)
            ]
            assert [r.verified for r in h.receiver.requests] == [True]

    asyncio.run(scenario())


def test_an_endpoint_registered_after_an_event_does_not_get_it() -> None:
    async def scenario() -> None:
        async with harness() as h:
            job_id = await h.finished(CANCELLED, callback_url=None)
            await asyncio.sleep(0.01)
            await add(h)
            assert await deliver_until_done(h, job_id) == []
            assert h.receiver.requests == []

    asyncio.run(scenario())


def test_a_rotation_signs_with_both_secrets_for_its_overlap(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    async def scenario() -> None:
        async with harness() as h:
            endpoint_id, old = await add(h, rotation_overlap_s=3600)
            rotated = await endpoints(h).rotate(endpoint_id)
            assert rotated is not None
            record, new = rotated
            assert new != old and record.previous_secret_expires_at is not None
            assert await endpoints(h).signing_secrets(endpoint_id, now=utcnow()) == [new, old]
            for held in ([old], [new]):
                h.configure(secrets=held)
                job_id = await h.finished(CANCELLED, callback_url=None)
                assert await deliver_until_done(h, job_id) == []
                assert h.receiver.requests[-1].verified
            # Past the overlap, the old secret no longer signs (only the clock is moved).
            expires = datetime.fromisoformat(record.previous_secret_expires_at)
            assert expires - utcnow() <= timedelta(seconds=3600)
            later = expires + timedelta(seconds=1)
            job_id = await h.finished(CANCELLED, callback_url=None)
            monkeypatch.setattr(delivery, "utcnow", lambda: later)
            h.configure(secrets=[old])
            with pytest.raises(callbacks.CallbackRetryable, match="400"):
                await delivery.callback(h.deps, job_id, lifecycle.EVENT_OUTCOME)
            assert await endpoints(h).signing_secrets(endpoint_id, now=later) == [new]

    asyncio.run(scenario())


def test_a_410_disables_the_endpoint_with_an_operational_event() -> None:
    async def scenario() -> None:
        async with harness() as h:
            endpoint_id, secret = await add(h)
            h.configure(secrets=[secret], fail_next=1, status=410)
            before = disabled_count("gone")
            job_id = await h.finished(CANCELLED, callback_url=None)
            with structlog.testing.capture_logs() as logs:
                assert await deliver_until_done(h, job_id) == []
            found = await endpoints(h).get(endpoint_id)
            assert found is not None and not found.enabled
            assert found.disabled_reason and "410" in found.disabled_reason
            assert disabled_count("gone") == before + 1
            [event] = [e for e in logs if e["event"] == "callback.endpoint.disabled"]
            assert (event["endpoint_id"], event["reason"]) == (endpoint_id, "gone")
            [dl] = await h.dead_letters()
            assert dl.event == f"outcome@endpoint:{endpoint_id}"
            # Disabled, it is sent nothing more.
            other = await h.finished(CANCELLED, callback_url=None)
            assert await deliver_until_done(h, other) == []
            assert len(h.receiver.requests) == 1

    asyncio.run(scenario())


def test_an_endpoint_failing_for_days_is_disabled(monkeypatch: pytest.MonkeyPatch) -> None:
    # At the default disable-after (5 days) and horizon (3 days): each job's target gives up
    # after its horizon, the endpoint after failing, job after job, for five days.
    async def scenario() -> None:
        async with harness(settings()) as h:
            assert h.deps.settings.callbacks.endpoint_disable_after_s == 5 * DAY
            endpoint_id, secret = await add(h)
            h.configure(secrets=[secret], fail_next=10**6, status=503)
            start = utcnow()
            before = disabled_count("failing")
            for day in range(6):
                now = start + timedelta(days=day, seconds=1)
                monkeypatch.setattr(delivery, "utcnow", lambda now=now: now)
                monkeypatch.setattr("cancelflow.endpoints.utcnow", lambda now=now: now)
                job_id = await h.finished(CANCELLED, callback_url=None)
                # The job's event happened "now": registered before it, the endpoint gets it.
                with (
                    structlog.testing.capture_logs() as logs,
                    contextlib.suppress(callbacks.CallbackRetryable),
                ):
                    await delivery.callback(h.deps, job_id, lifecycle.EVENT_OUTCOME)
                found = await endpoints(h).get(endpoint_id)
                assert found is not None
                if day < 5:
                    assert found.enabled and found.failing_since_at is not None
                else:
                    assert not found.enabled and "every delivery failed" in (
                        found.disabled_reason or ""
                    )
                    assert any(e["event"] == "callback.endpoint.disabled" for e in logs)
            assert disabled_count("failing") == before + 1
            # Re-enabled by an operator, its failures are forgotten.
            found = await endpoints(h).update(endpoint_id, enabled=True)
            assert found is not None and found.enabled and found.failing_since_at is None

    asyncio.run(scenario())


def test_a_success_ends_an_endpoints_failing_streak() -> None:
    async def scenario() -> None:
        async with harness() as h:
            endpoint_id, secret = await add(h)
            h.configure(secrets=[secret], fail_next=2, status=500)
            job_id = await h.finished(CANCELLED, callback_url=None)
            assert len(await deliver_until_done(h, job_id)) == 2
            found = await endpoints(h).get(endpoint_id)
            assert found is not None and found.failing_since_at is None and found.last_failure_at

    asyncio.run(scenario())


def test_writes_to_a_deleted_endpoint_leave_nothing_behind() -> None:
    async def scenario() -> None:
        async with harness() as h:
            endpoint_id, _ = await add(h)
            assert await endpoints(h).delete(endpoint_id)
            # A worker noting an attempt, an operator changing it: both after the delete.
            assert await endpoints(h).failed(endpoint_id, at=utcnow()) is None
            await endpoints(h).delivered(endpoint_id)
            assert await endpoints(h).update(endpoint_id, enabled=False) is None
            assert await endpoints(h).rotate(endpoint_id) is None
            assert not await h.deps.store.redis.exists(f"cf:endpoint:{endpoint_id}")
            assert await endpoints(h).all() == []
            assert not await endpoints(h).delete(endpoint_id)

    asyncio.run(scenario())
