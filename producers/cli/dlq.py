"""``cancelflow dlq list|show|replay|purge``: dead letters through the API's ``/v1/dead-letters``
routes (the same replay the API and the console do), so a URL and a token are all it needs.

Exit status: 0 done, 1 nothing matched or an action failed, 2 bad usage or a refused token.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any, Literal, TypeVar

import click

from cancelflow_client import CancelflowClient, ClientError, DeadLetter, NotFound
from producers.cli.common import (
    Duration,
    client,
    client_options,
    die,
    fail,
    print_json,
    print_table,
    table,
)
from producers.cli.main import main

F = TypeVar("F", bound=Callable[..., Any])
Kind = Literal["job", "callback", "poison", "billing_event"]
# The most one page of ``GET /v1/dead-letters`` holds (``schemas.MAX_DEAD_LETTER_PAGE``).
PAGE = 1000
DL_PREFIX = "dl_"
FULL_ID_LENGTH = len(DL_PREFIX) + 32


@main.group()
def dlq() -> None:
    """Inspect, replay and purge dead letters (through the API)."""


def _filters(fn: F) -> F:
    for option in reversed(
        [
            click.option("--provider"),
            click.option(
                "--kind", type=click.Choice(["job", "callback", "poison", "billing_event"])
            ),
            click.option("--error-type"),
            click.option(
                "--older-than",
                type=Duration(),
                default=None,
                help="Dead-lettered longer ago than this: seconds, or 15m, 2h, 7d.",
            ),
        ]
    ):
        fn = option(fn)
    return fn


def _older(seconds: float | None) -> datetime | None:
    return datetime.now(UTC) - timedelta(seconds=seconds) if seconds else None


def _matching(
    api: CancelflowClient,
    provider: str | None,
    kind: Kind | None,
    error_type: str | None,
    older_than: float | None,
    limit: int = PAGE,
) -> list[DeadLetter]:
    return api.dead_letters(
        provider=provider,
        kind=kind,
        error_type=error_type,
        older_than=_older(older_than),
        limit=limit,
    )


def _resolve(api: CancelflowClient, given: str) -> DeadLetter:
    """The dead letter an id names, or the one whose id starts with ``given`` (as ``list``
    shows them); ``ClickException`` if none or several do."""
    if len(given) == FULL_ID_LENGTH:
        return api.dead_letter(given)
    prefix = given if given.startswith(DL_PREFIX) else DL_PREFIX + given
    found = [d for d in api.dead_letters(limit=PAGE) if d.id.startswith(prefix)]
    if not found:
        raise click.ClickException(f"no dead letter's id starts with {given!r}")
    if len(found) > 1:
        ids = ", ".join(d.id for d in found[:5]) + (", ..." if len(found) > 5 else "")
        raise click.ClickException(f"{given!r} is the start of {len(found)} ids: {ids}")
    return found[0]


def _rows(items: list[DeadLetter]) -> Any:
    shown = table("id", "kind", "provider", "step", "error type", "job", "created")
    for d in items:
        shown.add_row(
            d.id,
            d.kind,
            d.provider or "",
            d.step or "",
            d.error_type,
            d.job_id or "",
            d.created_at.isoformat(),
        )
    return shown


@dlq.command("list")
@_filters
@click.option("--limit", default=100, show_default=True, type=click.IntRange(1, PAGE))
@client_options
def dlq_list(
    provider: str | None,
    kind: Kind | None,
    error_type: str | None,
    older_than: float | None,
    limit: int,
    api_url: str | None,
    token: str | None,
    as_json: bool,
) -> None:
    """List dead letters, newest first, ids in full. Exit 1 when none matches."""
    with client(api_url, token) as api:
        try:
            items = _matching(api, provider, kind, error_type, older_than, limit)
        except ClientError as exc:
            fail(exc, as_json)
    if as_json:
        print_json(items)
    elif items:
        print_table(_rows(items))
    if not items:
        click.echo("cancelflow: no dead letter matches", err=True)
        sys.exit(1)


@dlq.command("show")
@click.argument("dl_id")
@client_options
def dlq_show(dl_id: str, api_url: str | None, token: str | None, as_json: bool) -> None:
    """Show one dead letter whole (payload, every error, the last traceback). DL_ID may be the
    start of an id."""
    with client(api_url, token) as api:
        try:
            dl = _resolve(api, dl_id)
        except ClientError as exc:
            fail(exc, as_json)
        except click.ClickException as exc:
            die(exc.message, 1)
    print_json(dl)  # the whole record: JSON is its table


def _targets(
    api: CancelflowClient,
    dl_ids: tuple[str, ...],
    filters: tuple[str | None, Kind | None, str | None, float | None],
) -> list[DeadLetter]:
    if dl_ids:
        return [_resolve(api, i) for i in dl_ids]
    return _matching(api, *filters)


def _act(
    what: Literal["replay", "purge"],
    dl_ids: tuple[str, ...],
    filters: tuple[str | None, Kind | None, str | None, float | None],
    *,
    dry_run: bool,
    yes: bool,
    api_url: str | None,
    token: str | None,
    as_json: bool,
) -> None:
    """Replay or purge the dead letters named, or every one the filters match (asking first
    unless ``yes``), page after page; one result per dead letter."""
    results: list[dict[str, Any]] = []
    with client(api_url, token) as api:
        try:
            targets = _targets(api, dl_ids, filters)
        except ClientError as exc:
            fail(exc, as_json)
        except click.ClickException as exc:
            die(exc.message, 1)
        if not targets:
            if as_json:
                print_json({"matched": 0, "results": []})
            die("no dead letter matches", 1)
        if dry_run:
            more = not dl_ids and len(targets) >= PAGE
            count = f"{len(targets)}{' or more' if more else ''}"
            if as_json:
                print_json(
                    {"dry_run": True, "matched": len(targets), "more": more, "items": targets}
                )
            else:
                print_table(_rows(targets))
                click.echo(f"dry run: would {what} {count} dead letters", err=True)
            return
        if not dl_ids and not yes:
            plus = " (or more)" if len(targets) >= PAGE else ""
            click.confirm(
                f"{what.capitalize()} all {len(targets)}{plus} dead letters the filters match?",
                abort=True,
                err=True,
            )
        seen: set[str] = set()
        while targets:
            for dl in targets:
                seen.add(dl.id)
                results.append(_one(api, what, dl))
            if dl_ids:
                break
            # Acted-on dead letters leave the store: the next page holds the rest.
            try:
                targets = [d for d in _matching(api, *filters) if d.id not in seen]
            except ClientError as exc:
                fail(exc, as_json)
    failed = [r for r in results if not r["ok"]]
    if as_json:
        print_json({"matched": len(results), "failed": len(failed), "results": results})
    else:
        for r in results:
            click.echo(f"{r['id']}: {r['result']}")
        done = "replayed" if what == "replay" else "purged"
        click.echo(f"{done} {len(results) - len(failed)} of {len(results)}", err=True)
    if failed:
        sys.exit(1)


def _one(api: CancelflowClient, what: str, dl: DeadLetter) -> dict[str, Any]:
    entry: dict[str, Any] = {"id": dl.id, "job_id": dl.job_id}
    try:
        if what == "purge":
            api.purge(dl.id)
            return {**entry, "ok": True, "result": "purged"}
        replayed = api.replay(dl.id)
    except NotFound:
        return {**entry, "ok": False, "result": "gone (replayed or purged meanwhile)"}
    except ClientError as exc:
        return {**entry, "ok": False, "result": f"not {what}ed: {exc}"}
    return {**entry, "ok": True, "result": f"replayed -> {replayed.next or 'nothing to do'}"}


@dlq.command("replay")
@click.argument("dl_ids", nargs=-1)
@_filters
@click.option("--dry-run", is_flag=True, help="Show what would be replayed; replay nothing.")
@click.option("--yes", is_flag=True, help="Do not ask before replaying all that match.")
@client_options
def dlq_replay(
    dl_ids: tuple[str, ...],
    provider: str | None,
    kind: Kind | None,
    error_type: str | None,
    older_than: float | None,
    dry_run: bool,
    yes: bool,
    api_url: str | None,
    token: str | None,
    as_json: bool,
) -> None:
    """Replay dead letters from the step they failed at (the same job id): those named (ids or
    their starts), else every one the filters match, after asking. Exit 1 when none matched
    or one was not replayed."""
    _act(
        "replay",
        dl_ids,
        (provider, kind, error_type, older_than),
        dry_run=dry_run,
        yes=yes,
        api_url=api_url,
        token=token,
        as_json=as_json,
    )


@dlq.command("purge")
@click.argument("dl_ids", nargs=-1)
@_filters
@click.option("--dry-run", is_flag=True, help="Show what would be purged; purge nothing.")
@click.option("--yes", is_flag=True, help="Do not ask before purging all that match.")
@client_options
def dlq_purge(
    dl_ids: tuple[str, ...],
    provider: str | None,
    kind: Kind | None,
    error_type: str | None,
    older_than: float | None,
    dry_run: bool,
    yes: bool,
    api_url: str | None,
    token: str | None,
    as_json: bool,
) -> None:
    """Delete dead letters: those named (ids or their starts), else every one the filters
    match, after asking. Exit 1 when none matched or one was not purged."""
    _act(
        "purge",
        dl_ids,
        (provider, kind, error_type, older_than),
        dry_run=dry_run,
        yes=yes,
        api_url=api_url,
        token=token,
        as_json=as_json,
    )
