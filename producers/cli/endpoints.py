"""``cancelflow endpoints add|list|show|rotate|enable|disable|update|delete``: webhook endpoints
through the API's ``/v1/webhook-endpoints`` routes, so a URL and a token are all it needs.

``add`` and ``rotate`` print the endpoint's ``whsec_`` secret: the API answers it this once.
Exit status: 0 done, 1 no such endpoint or an action failed, 2 bad usage or a refused token.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, get_args

import click

from cancelflow_client import CancelflowClient, ClientError, EndpointSecret, WebhookEndpoint
from cancelflow_client.models import EventType
from producers.cli.common import (
    Duration,
    client,
    client_options,
    fail,
    print_json,
    print_table,
    table,
)
from producers.cli.main import main

EVENT_TYPES = get_args(EventType)


@main.group()
def endpoints() -> None:
    """Register callback URLs of your own (webhook endpoints), each with its own secret,
    rotation overlap and event-type filter (through the API)."""


def _rows(items: list[WebhookEndpoint]) -> Any:
    shown = table("id", "url", "events", "enabled", "failing since", "created")
    for e in items:
        state = "yes" if e.enabled else f"no: {e.disabled_reason or ''}"
        events = ", ".join(e.event_types) or "all"
        since = e.failing_since_at.isoformat() if e.failing_since_at else ""
        shown.add_row(e.id, e.url, events, state, since, e.created_at.isoformat())
    return shown


def _show(found: WebhookEndpoint | EndpointSecret | list[WebhookEndpoint], as_json: bool) -> None:
    if as_json or not isinstance(found, list | WebhookEndpoint):
        print_json(found)
        return
    print_table(_rows(found if isinstance(found, list) else [found]))


def _run(
    api_url: str | None,
    token: str | None,
    as_json: bool,
    action: Callable[[CancelflowClient], Any],
) -> Any:
    with client(api_url, token) as api:
        try:
            return action(api)
        except ClientError as exc:
            fail(exc, as_json)


_events = click.option(
    "--event",
    "events",
    multiple=True,
    type=click.Choice(EVENT_TYPES),
    help="An event type to send (repeat for more); none: every type.",
)
_overlap = click.option(
    "--rotation-overlap",
    type=Duration(),
    default=None,
    help="How long an old secret keeps signing after a rotation: seconds, or 15m, 2h, 7d "
    "(default: the server's, 24h).",
)


@endpoints.command("add")
@click.argument("url")
@_events
@click.option("--description", default="")
@_overlap
@click.option("--disabled", is_flag=True, help="Register it disabled.")
@client_options
def endpoints_add(
    url: str,
    events: tuple[str, ...],
    description: str,
    rotation_overlap: float | None,
    disabled: bool,
    api_url: str | None,
    token: str | None,
    as_json: bool,
) -> None:
    """Register URL as a webhook endpoint; prints its id and its secret (shown this once)."""
    created: EndpointSecret = _run(
        api_url,
        token,
        as_json,
        lambda api: api.create_endpoint(
            url,
            event_types=events,  # type: ignore[arg-type]
            description=description,
            rotation_overlap_s=rotation_overlap,
            enabled=not disabled,
        ),
    )
    if as_json:
        print_json(created)
        return
    click.echo(created.endpoint.id)
    click.echo(created.secret)
    click.echo("cancelflow: keep the secret: it is not shown again", err=True)


@endpoints.command("list")
@client_options
def endpoints_list(api_url: str | None, token: str | None, as_json: bool) -> None:
    """Every webhook endpoint, oldest first."""
    _show(_run(api_url, token, as_json, lambda api: api.endpoints()), as_json)


@endpoints.command("show")
@click.argument("endpoint_id")
@client_options
def endpoints_show(endpoint_id: str, api_url: str | None, token: str | None, as_json: bool) -> None:
    """One webhook endpoint whole (JSON): filter, state, failures."""
    print_json(_run(api_url, token, as_json, lambda api: api.endpoint(endpoint_id)))


@endpoints.command("update")
@click.argument("endpoint_id")
@click.option("--url", default=None)
@_events
@click.option("--all-events", is_flag=True, help="Send every event type (clear the filter).")
@click.option("--description", default=None)
@_overlap
@client_options
def endpoints_update(
    endpoint_id: str,
    url: str | None,
    events: tuple[str, ...],
    all_events: bool,
    description: str | None,
    rotation_overlap: float | None,
    api_url: str | None,
    token: str | None,
    as_json: bool,
) -> None:
    """Change an endpoint's URL, event filter, description or rotation overlap."""
    if all_events and events:
        raise click.UsageError("--all-events and --event exclude each other")
    filter_: tuple[str, ...] | None = () if all_events else (events or None)
    _show(
        _run(
            api_url,
            token,
            as_json,
            lambda api: api.update_endpoint(
                endpoint_id,
                url=url,
                event_types=filter_,  # type: ignore[arg-type]
                description=description,
                rotation_overlap_s=rotation_overlap,
            ),
        ),
        as_json,
    )


@endpoints.command("enable")
@click.argument("endpoint_id")
@client_options
def endpoints_enable(
    endpoint_id: str, api_url: str | None, token: str | None, as_json: bool
) -> None:
    """Enable an endpoint again (a disabled one's failures are forgotten)."""
    update = lambda api: api.update_endpoint(endpoint_id, enabled=True)  # noqa: E731
    _show(_run(api_url, token, as_json, update), as_json)


@endpoints.command("disable")
@click.argument("endpoint_id")
@client_options
def endpoints_disable(
    endpoint_id: str, api_url: str | None, token: str | None, as_json: bool
) -> None:
    """Disable an endpoint: it is sent nothing until enabled."""
    update = lambda api: api.update_endpoint(endpoint_id, enabled=False)  # noqa: E731
    _show(_run(api_url, token, as_json, update), as_json)


@endpoints.command("rotate")
@click.argument("endpoint_id")
@click.option(
    "--overlap",
    type=Duration(),
    default=None,
    help="How long the old secret keeps signing beside the new: seconds, or 15m, 2h, 7d "
    "(default: the endpoint's rotation overlap; 0: stop it now).",
)
@client_options
def endpoints_rotate(
    endpoint_id: str, overlap: float | None, api_url: str | None, token: str | None, as_json: bool
) -> None:
    """A new secret for the endpoint (printed, shown this once); until the overlap ends,
    deliveries are signed with both."""
    rotated: EndpointSecret = _run(
        api_url,
        token,
        as_json,
        lambda api: api.rotate_endpoint_secret(endpoint_id, overlap_s=overlap),
    )
    if as_json:
        print_json(rotated)
        return
    click.echo(rotated.secret)
    until = rotated.endpoint.previous_secret_expires_at
    click.echo(
        f"cancelflow: the old secret signs too until {until}"
        if until
        else "cancelflow: the old secret no longer signs",
        err=True,
    )


@endpoints.command("delete")
@click.argument("endpoint_id")
@client_options
def endpoints_delete(
    endpoint_id: str, api_url: str | None, token: str | None, as_json: bool
) -> None:
    """Delete an endpoint: it is sent nothing more."""
    _run(api_url, token, as_json, lambda api: api.delete_endpoint(endpoint_id))
    if as_json:
        print_json({"deleted": endpoint_id})
    else:
        click.echo(f"deleted {endpoint_id}", err=True)
