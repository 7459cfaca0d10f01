"""The client's methods. ``_async/client.py`` is the source; ``_sync/client.py``, the blocking
client, is generated from it by ``unasync`` (``producers/client/unasync_gen.py``)."""

from __future__ import annotations

import builtins
from collections.abc import AsyncIterator, Collection, Mapping
from datetime import datetime
from types import TracebackType
from typing import Any, Literal, Self

import httpx

from cancelflow_client._core import (
    Base,
    Call,
    Reply,
    async_sleep,
    dead_letter_path,
    endpoint_path,
    job_path,
    monotonic,
)
from cancelflow_client.errors import ApiError, Conflict, TransportError, WaitTimeout
from cancelflow_client.models import (
    FINAL_STATUSES,
    CancellationRequest,
    DeadLetter,
    DeadLetterKind,
    DeadLetterPage,
    EndpointCreate,
    EndpointPage,
    EndpointSecret,
    EndpointUpdate,
    Enqueued,
    EventType,
    JobPage,
    JobRecord,
    JobSummary,
    OutcomeType,
    ProviderStates,
    Reason,
    Replayed,
    SecretRotation,
    Stats,
    Status,
    WebhookEndpoint,
)


class AsyncCancelflowClient(Base):
    """A client of the Cancelflow API: one connection pool, opened on first use; close it with
    a ``with`` block or ``close()``. URL and token come from the arguments, else from
    ``CANCELFLOW_CLIENT__URL`` and ``CANCELFLOW_CLIENT__TOKEN`` (see ``ClientSettings``)."""

    _http: httpx.AsyncClient | None = None

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        """Close the connection pool (the client opens a new one if used again)."""
        if self._http is not None:
            await self._http.aclose()
            self._http = None

    # --- jobs --------------------------------------------------------------------------------

    async def enqueue(
        self,
        provider: str | CancellationRequest,
        subscription: Mapping[str, Any] | None = None,
        *,
        reason: Reason | None = None,
        callback_url: str | None = None,
        idempotency_key: str | None = None,
        metadata: Mapping[str, Any] | None = None,
    ) -> Enqueued:
        """Queue a cancellation (or a whole ``CancellationRequest``): the job and whether it
        was ``created``, an ``existing`` one (the same key) or ``joined`` (already in flight).
        Checked before it is sent (``ValidationFailed``); always sent with an idempotency key,
        a fresh one unless given, so a retried enqueue never makes two jobs."""
        call = self._enqueue_call(
            provider,
            subscription,
            reason=reason,
            callback_url=callback_url,
            idempotency_key=idempotency_key,
            metadata=metadata,
        )
        reply = await self._call(call)
        how = reply.headers.get("cancelflow-enqueue", "created")
        return Enqueued.model_validate({"job": reply.json(), "how": how})

    async def get(self, job_id: str) -> JobRecord:
        """The job record; ``NotFound`` if there is none."""
        return JobRecord.model_validate((await self._call(Call("GET", job_path(job_id)))).json())

    async def decide(
        self,
        job_id: str,
        decision: Literal["accept", "reject"],
        *,
        survey: Mapping[str, Any] | None = None,
    ) -> JobRecord:
        """Answer a retention offer; ``Conflict`` if the job is not awaiting a decision."""
        try:
            reply = await self._call(self._decide_call(job_id, decision, survey))
        except Conflict:
            # A retried decision whose first attempt went through (its answer was lost).
            job = await self.get(job_id)
            if self._decided(job, decision):
                return job
            raise
        return JobRecord.model_validate(reply.json())

    async def wait(
        self,
        job_id: str,
        timeout: float = 60.0,  # noqa: ASYNC109 - a deadline to poll to, the same in both clients
        *,
        until: Collection[Status] = FINAL_STATUSES,
        poll_s: float = 0.25,
    ) -> JobRecord:
        """Poll the job until its status is one of ``until`` (by default a final one: finished
        or dead-lettered; ``{Status.AWAITING_DECISION}`` waits for an offer). Polls every
        ``poll_s``, half as often again after each poll, at most every 5 s; ``WaitTimeout``
        (with the job as last seen) after ``timeout`` seconds."""
        deadline = monotonic() + timeout
        while True:
            job = await self.get(job_id)
            if job.status in until:
                return job
            left = deadline - monotonic()
            if left <= 0:
                raise WaitTimeout(job, timeout)
            await async_sleep(min(poll_s, left))
            poll_s = min(poll_s * 1.5, 5.0)

    async def list(
        self,
        *,
        provider: str | None = None,
        status: Status | str | Collection[Status | str] | None = None,
        outcome: OutcomeType | str | Collection[OutcomeType | str] | None = None,
        reference: str | None = None,
        idempotency_key: str | None = None,
        metadata: Mapping[str, str] | None = None,
        created_after: datetime | None = None,
        created_before: datetime | None = None,
        limit: int = 50,
        cursor: str | None = None,
    ) -> JobPage:
        """One page of the jobs the filters match, newest first. ``reference``: a part of any
        value of the subscription reference; ``metadata``: every pair must match. A page may
        come back short (even empty) with a ``next_cursor``: follow it (``iter_jobs``)."""
        call = self._list_call(
            provider=provider,
            status=status,
            outcome=outcome,
            reference=reference,
            idempotency_key=idempotency_key,
            metadata=metadata,
            created_after=created_after,
            created_before=created_before,
            limit=limit,
            cursor=cursor,
        )
        return JobPage.model_validate((await self._call(call)).json())

    async def iter_jobs(self, **filters: Any) -> AsyncIterator[JobSummary]:
        """Every job the filters (those of ``list``) match, page after page."""
        cursor = None
        while True:
            page = await self.list(**filters, cursor=cursor)
            for item in page.items:
                yield item
            if page.next_cursor is None:
                return
            cursor = page.next_cursor

    async def stats(self, *, since_s: float = 24 * 3600) -> Stats:
        """Counts of the jobs created in the last ``since_s`` seconds, by provider and status."""
        call = Call("GET", "/v1/stats", query=[("since_s", str(since_s))])
        return Stats.model_validate((await self._call(call)).json())

    async def providers(self) -> ProviderStates:
        """Each configured provider's circuit breaker, calls in flight and recent error rate."""
        reply = await self._call(Call("GET", "/v1/providers"))
        return ProviderStates.model_validate(reply.json())

    # --- dead letters ------------------------------------------------------------------------

    async def dead_letters(
        self,
        *,
        provider: str | None = None,
        kind: DeadLetterKind | None = None,
        error_type: str | None = None,
        older_than: datetime | None = None,
        newer_than: datetime | None = None,
        limit: int = 100,
    ) -> builtins.list[DeadLetter]:
        """The dead letters the filters match, newest first (at most ``limit``)."""
        call = self._dead_letters_call(
            provider=provider,
            kind=kind,
            error_type=error_type,
            older_than=older_than,
            newer_than=newer_than,
            limit=limit,
        )
        return DeadLetterPage.model_validate((await self._call(call)).json()).items

    async def dead_letter(self, dl_id: str) -> DeadLetter:
        """One dead letter whole (payload, every error, the last traceback); ``NotFound``."""
        reply = await self._call(Call("GET", dead_letter_path(dl_id)))
        return DeadLetter.model_validate(reply.json())

    async def replay(self, dl_id: str) -> Replayed:
        """Replay a dead letter from the step it failed at (the same job id); ``NotFound`` if
        it is gone (replayed or purged), ``Conflict`` if it cannot be replayed now."""
        reply = await self._call(Call("POST", f"{dead_letter_path(dl_id)}/replay"))
        return Replayed.model_validate(reply.json())

    async def purge(self, dl_id: str) -> None:
        """Delete a dead letter; ``NotFound`` if it is gone."""
        await self._call(Call("DELETE", dead_letter_path(dl_id)))

    # --- webhook endpoints --------------------------------------------------------------------

    async def create_endpoint(
        self,
        url: str,
        *,
        event_types: Collection[EventType] = (),
        description: str = "",
        rotation_overlap_s: float | None = None,
        enabled: bool = True,
    ) -> EndpointSecret:
        """Register a webhook endpoint; the answer holds its ``whsec_`` secret, this once.
        ``ValidationFailed`` names a URL the API refuses (http, credentials, internal)."""
        body = EndpointCreate(
            url=url,
            description=description,
            event_types=builtins.list(event_types),
            rotation_overlap_s=rotation_overlap_s,
            enabled=enabled,
        )
        call = Call("POST", "/v1/webhook-endpoints", body=body.model_dump(exclude_none=True))
        return EndpointSecret.model_validate((await self._call(call)).json())

    async def endpoints(self) -> builtins.list[WebhookEndpoint]:
        """Every webhook endpoint, oldest first (no secrets)."""
        reply = await self._call(Call("GET", "/v1/webhook-endpoints"))
        return EndpointPage.model_validate(reply.json()).items

    async def endpoint(self, endpoint_id: str) -> WebhookEndpoint:
        """One webhook endpoint; ``NotFound``."""
        reply = await self._call(Call("GET", endpoint_path(endpoint_id)))
        return WebhookEndpoint.model_validate(reply.json())

    async def update_endpoint(
        self,
        endpoint_id: str,
        *,
        url: str | None = None,
        description: str | None = None,
        event_types: Collection[EventType] | None = None,
        rotation_overlap_s: float | None = None,
        enabled: bool | None = None,
    ) -> WebhookEndpoint:
        """Change the fields given (``enabled=True`` re-enables a disabled endpoint)."""
        body = EndpointUpdate(
            url=url,
            description=description,
            event_types=None if event_types is None else builtins.list(event_types),
            rotation_overlap_s=rotation_overlap_s,
            enabled=enabled,
        )
        call = Call("PATCH", endpoint_path(endpoint_id), body=body.model_dump(exclude_none=True))
        return WebhookEndpoint.model_validate((await self._call(call)).json())

    async def rotate_endpoint_secret(
        self, endpoint_id: str, *, overlap_s: float | None = None
    ) -> EndpointSecret:
        """A new secret for the endpoint (in the answer, this once); the old one keeps
        signing beside it for ``overlap_s`` (default: the endpoint's rotation overlap)."""
        body = SecretRotation(overlap_s=overlap_s).model_dump(exclude_none=True)
        call = Call("POST", f"{endpoint_path(endpoint_id)}/rotate-secret", body=body)
        return EndpointSecret.model_validate((await self._call(call)).json())

    async def delete_endpoint(self, endpoint_id: str) -> None:
        """Delete a webhook endpoint; ``NotFound`` if it is gone."""
        await self._call(Call("DELETE", endpoint_path(endpoint_id)))

    # --- sending -----------------------------------------------------------------------------

    async def _call(self, call: Call) -> Reply:
        attempt, started = 0, monotonic()
        while True:
            try:
                return self._reply(await self._send(call))
            except (TransportError, ApiError) as exc:
                delay = self._delay(call, exc, attempt, started)
            await async_sleep(delay)
            attempt += 1

    async def _send(self, call: Call) -> httpx.Response:
        if self._http is None:
            self._http = httpx.AsyncClient(**self._client_options())
        try:
            return await self._http.request(call.method, call.path, **self._request_options(call))
        except httpx.TransportError as exc:
            raise self._transport_error(call, exc) from exc
