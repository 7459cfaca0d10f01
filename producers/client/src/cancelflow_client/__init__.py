"""A Python client for the Cancelflow API: ``CancelflowClient`` (blocking) and
``AsyncCancelflowClient`` (asyncio), the same methods and answers. See README.md.

    with CancelflowClient("https://cancelflow.internal", token) as cf:
        job = cf.enqueue("payway", {...}).job
        done = cf.wait(job.id, timeout=120)
"""

from cancelflow_client._async.client import AsyncCancelflowClient
from cancelflow_client._sync.client import CancelflowClient
from cancelflow_client.errors import (
    ApiError,
    AuthError,
    BadRequest,
    ClientError,
    Conflict,
    Forbidden,
    NotFound,
    PayloadTooLarge,
    RateLimited,
    ServerError,
    TransportError,
    Unauthorized,
    ValidationFailed,
    WaitTimeout,
    error_for,
    parse_retry_after,
)
from cancelflow_client.models import (
    FINAL_STATUSES,
    CallbackAttempt,
    CancellationRequest,
    DeadLetter,
    Decision,
    Enqueued,
    FieldError,
    JobPage,
    JobRecord,
    JobSummary,
    Offer,
    Outcome,
    OutcomeType,
    Problem,
    ProviderState,
    ProviderStates,
    Reason,
    Replayed,
    Stats,
    Status,
    TimelineEntry,
)
from cancelflow_client.retry import RetryPolicy
from cancelflow_client.settings import CLIENT_ENV, ClientSettings, SettingsError

__all__ = [
    "CLIENT_ENV",
    "FINAL_STATUSES",
    "ApiError",
    "AsyncCancelflowClient",
    "AuthError",
    "BadRequest",
    "CallbackAttempt",
    "CancelflowClient",
    "CancellationRequest",
    "ClientError",
    "ClientSettings",
    "Conflict",
    "DeadLetter",
    "Decision",
    "Enqueued",
    "FieldError",
    "Forbidden",
    "JobPage",
    "JobRecord",
    "JobSummary",
    "NotFound",
    "Offer",
    "Outcome",
    "OutcomeType",
    "PayloadTooLarge",
    "Problem",
    "ProviderState",
    "ProviderStates",
    "RateLimited",
    "Reason",
    "Replayed",
    "RetryPolicy",
    "ServerError",
    "SettingsError",
    "Stats",
    "Status",
    "TimelineEntry",
    "TransportError",
    "Unauthorized",
    "ValidationFailed",
    "WaitTimeout",
    "error_for",
    "parse_retry_after",
]
