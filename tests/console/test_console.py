"""The web console in a real browser, against a running system (API, worker, sandboxes).

Jobs are dead-lettered by the Payway sandbox failing every call (one attempt allowed), then
replayed from the console once it answers again, and seen to finish.
"""

from __future__ import annotations

import re
import time
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
from playwright.sync_api import Browser, BrowserContext, Locator, Page, expect

from producers.local import http_json
from sandboxes.azotte import DEMO as AZOTTE
from tests.console.conftest import Shot
from tests.fixtures.system import API_TOKEN, READ_TOKEN, StartSystem
from tests.support import System

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def console_system(start_system: StartSystem) -> System:
    return start_system(isolated=True, CANCELFLOW_PROVIDERS__PAYWAY__MAX_ATTEMPTS="1")


@pytest.fixture
def context(browser: Browser, console_system: System) -> Iterator[BrowserContext]:
    ctx = browser.new_context(base_url=console_system.api_url)
    try:
        yield ctx
    finally:
        ctx.close()


@pytest.fixture
def page(context: BrowserContext) -> Page:
    return context.new_page()


def sign_in(page: Page, token: str) -> None:
    page.goto("/console/")
    page.get_by_label("API token").fill(token)
    page.get_by_role("button", name="Sign in").click()
    expect(page.get_by_role("heading", name="Overview", exact=True)).to_be_visible()


def nav(page: Page, name: str) -> None:
    """Follow a link of the console's navigation."""
    page.get_by_role("navigation").get_by_role("link", name=name, exact=True).click()


def payway_subscriptions(
    system: System, count: int, kind: str = "immediate"
) -> list[dict[str, Any]]:
    status, created = http_json(
        "POST",
        f"{system.sandbox.url}/payway/_sandbox/subscriptions",
        {"count": count, "kind": kind},
    )
    assert status == 200, created
    return [
        {**ref, "cancellation_reason_id": "5cb80481c00000000000000a"}
        for ref in created["references"]
    ]


def dead_lettered_jobs(system: System, count: int) -> list[str]:
    """``count`` new Payway jobs, dead-lettered (the sandbox failing); the sandbox then answers."""
    system.sandbox.faults("payway", error_rate=1.0)
    try:
        jobs = [
            system.enqueue({"provider": "payway", "subscription": sub})["id"]
            for sub in payway_subscriptions(system, count)
        ]
        for job_id in jobs:
            system.wait(job_id, until={"dead_lettered"})
    finally:
        system.sandbox.faults("payway")
    return jobs


def dead_letter_of(system: System, job_id: str) -> str:
    status, listing = system.get("/v1/dead-letters?provider=payway&limit=1000")
    assert status == 200, listing
    (found,) = [dl["id"] for dl in listing["items"] if dl["job_id"] == job_id]
    return str(found)


def test_signing_in_with_an_api_token(page: Page, context: BrowserContext, shot: Shot) -> None:
    page.goto("/console/")
    expect(page).to_have_url(re.compile(r"/console/signin$"))
    shot(page, "signin")

    page.get_by_label("API token").fill("not-a-token")
    page.get_by_role("button", name="Sign in").click()
    expect(page.get_by_role("alert")).to_have_text("That is not a token this API accepts.")
    assert not [c for c in context.cookies() if c["name"] == "cf_console"]

    # From the keyboard alone: the token field has the focus, Enter submits.
    page.get_by_label("API token").focus()
    page.keyboard.type(API_TOKEN)
    page.keyboard.press("Enter")
    expect(page.get_by_role("heading", name="Overview", exact=True)).to_be_visible()
    for heading in ("Queue depths", "Dead letters", "Providers"):
        expect(page.get_by_role("heading", name=heading, exact=True)).to_be_visible()
    expect(page.get_by_role("cell", name="cancellations.payway", exact=True)).to_be_visible()
    shot(page, "overview")

    (cookie,) = [c for c in context.cookies() if c["name"] == "cf_console"]
    assert cookie["httpOnly"] is True
    assert cookie["sameSite"] == "Strict"
    assert time.time() + 3600 < cookie["expires"] <= time.time() + 8 * 3600 + 60
    assert API_TOKEN not in cookie["value"]

    page.get_by_role("navigation").get_by_role("link", name="Dead letters").focus()
    page.keyboard.press("Enter")
    expect(page.get_by_role("heading", name="Dead letters", exact=True)).to_be_visible()

    page.get_by_role("button", name="Sign out").click()
    expect(page).to_have_url(re.compile(r"/console/signin$"))
    page.goto("/console/jobs")
    expect(page).to_have_url(re.compile(r"/console/signin$"))


def test_finding_a_job_by_id_and_by_subscription_reference(
    page: Page, console_system: System, shot: Shot
) -> None:
    (sub,) = payway_subscriptions(console_system, 1)
    job_id = console_system.enqueue({"provider": "payway", "subscription": sub})["id"]
    console_system.wait(job_id)
    sign_in(page, API_TOKEN)

    nav(page, "Jobs")
    page.get_by_label("Job id").fill(job_id)
    page.get_by_role("button", name="Open job").click()
    expect(page).to_have_url(re.compile(f"/console/jobs/{job_id}$"))
    expect(page.locator("#job-status")).to_have_text("finished")
    expect(page.locator("#job-outcome")).to_have_text("cancelled")
    expect(page.get_by_role("heading", name="Timeline")).to_be_visible()
    # The confirm step's attempt, with the provider's answer, and the callback's delivery.
    expect(page.get_by_role("heading", name="confirm attempt", exact=False).first).to_be_visible()
    expect(page.get_by_role("cell", name="skipped", exact=True)).to_be_visible()
    shot(page, "job-by-id")

    nav(page, "Jobs")
    page.get_by_label("Subscription reference contains").fill(sub["user_product_id"][-10:])
    page.get_by_role("button", name="Search").click()
    expect(page.get_by_role("row").filter(has_text=job_id)).to_contain_text("cancelled")
    shot(page, "jobs-search")
    page.get_by_role("link", name=job_id).click()
    expect(page).to_have_url(re.compile(f"/console/jobs/{job_id}$"))
    shot(page, "job-by-reference")

    nav(page, "Jobs")
    page.get_by_label("Job id").fill("job_" + "0" * 32)
    page.get_by_role("button", name="Open job").click()
    expect(page.get_by_role("alert")).to_contain_text("No job has the id")


def test_finding_a_job_by_outcome_and_by_metadata(
    page: Page, console_system: System, shot: Shot
) -> None:
    # Two jobs of one campaign (metadata), one already cancelled at the provider, and a
    # third of another campaign: each filter must tell them apart.
    campaign = f"winback-{uuid.uuid4().hex[:8]}"
    (fresh,) = payway_subscriptions(console_system, 1)
    (cancelled_before,) = payway_subscriptions(console_system, 1, kind="already_cancelled")
    (other,) = payway_subscriptions(console_system, 1, kind="already_cancelled")
    jobs = {
        name: console_system.enqueue(
            {"provider": "payway", "subscription": sub, "metadata": metadata}
        )["id"]
        for name, sub, metadata in (
            ("fresh", fresh, {"campaign": campaign, "tier": 2}),
            ("already", cancelled_before, {"campaign": campaign, "tier": 3}),
            ("other", other, {"campaign": f"{campaign}-other", "tier": 3}),
        )
    }
    for job_id in jobs.values():
        console_system.wait(job_id)
    sign_in(page, API_TOKEN)

    def rows() -> Locator:
        return page.get_by_role("row").filter(has=page.get_by_role("link"))

    # By metadata alone: both jobs of the campaign, not the other one.
    nav(page, "Jobs")
    page.get_by_label("Metadata key=value 1").fill(f"campaign={campaign}")
    page.get_by_role("button", name="Search", exact=True).click()
    expect(rows()).to_have_count(2)
    for name in ("fresh", "already"):
        expect(rows().filter(has_text=jobs[name])).to_have_count(1)

    # By outcome and metadata: the campaign's already-cancelled job only. Without
    # JavaScript, a second metadata field is one more submit away; the form keeps its values.
    page.get_by_label("already_cancelled", exact=True).check()
    page.get_by_role("button", name="Add a metadata pair").click()
    expect(page.get_by_label("Metadata key=value 1")).to_have_value(f"campaign={campaign}")
    expect(page.get_by_label("already_cancelled", exact=True)).to_be_checked()
    page.get_by_label("Metadata key=value 2").fill("tier=3")
    page.get_by_label("Metadata key=value 2").press("Enter")
    # Enter searches (the form's first button), it does not add a field.
    expect(page).to_have_url(re.compile(r"outcome=already_cancelled"))
    expect(page.get_by_label("Metadata key=value 3")).to_have_value("")
    expect(page.get_by_label("Metadata key=value 4")).to_have_count(0)
    expect(rows()).to_have_count(1)
    expect(rows().first).to_contain_text(jobs["already"])
    expect(rows().first).to_contain_text("already_cancelled")
    shot(page, "jobs-by-outcome-and-metadata")

    # A pair no job has finds nothing; a malformed one is refused, saying which.
    page.get_by_label("Metadata key=value 2").fill("tier=2")
    page.get_by_role("button", name="Search", exact=True).click()
    expect(page.get_by_role("cell", name="No jobs on this page.")).to_be_visible()
    page.get_by_label("Metadata key=value 2").fill("no pair here")
    page.get_by_role("button", name="Search", exact=True).click()
    expect(page.get_by_role("alert")).to_contain_text("metadata")

    # By outcome alone, the fresh job (cancelled now) is found with the other cancelled ones.
    page.goto("/console/jobs")
    page.get_by_label("cancelled", exact=True).check()
    page.get_by_role("button", name="Search", exact=True).click()
    expect(rows().filter(has_text=jobs["fresh"])).to_have_count(1)
    expect(rows().filter(has_text=jobs["already"])).to_have_count(0)
    page.get_by_role("link", name=jobs["fresh"]).click()
    expect(page.locator("#job-outcome")).to_have_text("cancelled")


def test_a_job_parked_on_an_offer_shows_its_deadline(
    page: Page, console_system: System, shot: Shot
) -> None:
    console_system.sandbox.reset("azotte")
    job = console_system.enqueue(
        {"provider": "azotte", "subscription": {"order_identifier": AZOTTE.offer}}
    )
    console_system.wait(job["id"], until={"awaiting_decision"})
    sign_in(page, API_TOKEN)
    page.goto(f"/console/jobs/{job['id']}")
    expect(page.locator("#job-status")).to_have_text("awaiting_decision")
    offer = page.locator("dl.facts").nth(1)
    expect(offer).to_contain_text(AZOTTE.offer_identifier)
    expect(offer).to_contain_text("Decision due")
    expect(offer).not_to_contain_text("no deadline pending")
    shot(page, "job-offer")


def test_a_read_token_is_refused_an_action(page: Page, console_system: System, shot: Shot) -> None:
    (job_id,) = dead_lettered_jobs(console_system, 1)
    dl_id = dead_letter_of(console_system, job_id)
    sign_in(page, READ_TOKEN)
    expect(page.get_by_text("read-only")).to_be_visible()
    # The overview counts it: by kind, provider and error type, and its job by status.
    group = page.get_by_role("row").filter(has_text="ProviderUnavailable")
    expect(group.get_by_role("cell")).to_have_text(["job", "payway", "ProviderUnavailable", "1"])
    expect(page.get_by_role("link", name="dead_lettered", exact=True)).to_be_visible()
    shot(page, "overview-with-a-dead-letter")

    nav(page, "Dead letters")
    page.get_by_role("button", name=f"Replay {dl_id}").click()
    expect(page.locator("#dry-run-count")).to_have_text("1")
    expect(page.get_by_role("alert")).to_contain_text("read-only")
    page.get_by_label("Reason").fill("trying without the right")
    with page.expect_response(lambda r: r.url.endswith("/console/dead-letters/act")) as answer:
        page.get_by_role("button", name="Replay 1 dead letter").click()
    assert answer.value.status == 403
    expect(page.get_by_role("alert")).to_have_text(
        "This token is read-only: it cannot replay or purge."
    )
    shot(page, "read-token-refused")

    assert console_system.get(f"/v1/dead-letters/{dl_id}")[0] == 200
    assert console_system.job(job_id)["status"] == "dead_lettered"
    nav(page, "Audit log")
    expect(page.get_by_text("trying without the right")).to_have_count(0)
    # Replayed by a write token, so later tests find only their own dead letters.
    assert console_system.post(f"/v1/dead-letters/{dl_id}/replay")[0] == 202
    console_system.wait(job_id)


def test_replaying_a_dead_letter_and_seeing_its_job_finish(
    page: Page, console_system: System, shot: Shot
) -> None:
    (job_id,) = dead_lettered_jobs(console_system, 1)
    dl_id = dead_letter_of(console_system, job_id)
    sign_in(page, API_TOKEN)

    nav(page, "Dead letters")
    expect(page.get_by_role("row").filter(has_text=dl_id)).to_contain_text("ProviderUnavailable")
    shot(page, "dead-letters")
    page.get_by_role("link", name=dl_id).click()
    expect(page.get_by_role("heading", name=f"Dead letter {dl_id}")).to_be_visible()
    expect(page.get_by_text("provider answered 503").first).to_be_visible()
    shot(page, "dead-letter")
    page.get_by_role("button", name="Replay", exact=True).click()
    expect(page.locator("#dry-run-count")).to_have_text("1")
    shot(page, "replay-confirm")
    page.get_by_label("Reason").fill("payway is answering again")
    page.get_by_role("button", name="Replay 1 dead letter").click()
    expect(page.locator("#done-count")).to_have_text("1")
    expect(page.get_by_role("row").filter(has_text=dl_id)).to_contain_text("replayed")
    shot(page, "replay-done")

    page.get_by_role("link", name=job_id).click()
    deadline = time.monotonic() + 30
    while page.locator("#job-status").inner_text() != "finished":
        assert time.monotonic() < deadline, page.locator("#job-status").inner_text()
        time.sleep(0.3)
        page.reload()
    expect(page.locator("#job-outcome")).to_have_text("cancelled")
    expect(page.get_by_role("cell", name="replayed", exact=True)).to_be_visible()
    shot(page, "replayed-job")
    assert console_system.get(f"/v1/dead-letters/{dl_id}")[0] == 404

    nav(page, "Audit log")
    entry = page.get_by_role("row").filter(has_text="payway is answering again")
    expect(entry).to_contain_text("replay")
    expect(entry).to_contain_text("token:")
    expect(entry).to_contain_text("replayed: 1")
    shot(page, "audit")


def test_a_bulk_replay_by_filter_with_its_dry_run_count(
    page: Page, console_system: System, shot: Shot
) -> None:
    jobs = dead_lettered_jobs(console_system, 3)
    status, listing = console_system.get(
        "/v1/dead-letters?provider=payway&error_type=ProviderUnavailable&limit=1000"
    )
    assert status == 200
    matching = len(listing["items"])
    assert matching >= 3
    sign_in(page, API_TOKEN)

    nav(page, "Dead letters")
    page.get_by_label("Provider").select_option("payway")
    page.get_by_label("Error type").fill("ProviderUnavailable")
    page.get_by_role("button", name="Filter").click()
    page.get_by_role("button", name="Replay all that match").click()
    expect(page.locator("#dry-run-count")).to_have_text(str(matching))
    expect(page.get_by_text("provider payway, error type ProviderUnavailable")).to_be_visible()
    shot(page, "bulk-confirm")
    page.get_by_label("Reason").fill("bulk: payway outage over")
    page.get_by_role("button", name=f"Replay {matching} dead letters").click()
    expect(page.locator("#done-count")).to_have_text(str(matching))
    shot(page, "bulk-done")

    for job_id in jobs:
        assert console_system.wait(job_id)["outcome"]["type"] == "cancelled"
    status, listing = console_system.get("/v1/dead-letters?provider=payway")
    assert listing["items"] == []
    nav(page, "Audit log")
    entry = page.get_by_role("row").filter(has_text="bulk: payway outage over")
    expect(entry).to_contain_text("ProviderUnavailable")
    expect(entry.get_by_role("cell").nth(3)).to_have_text(str(matching))


def test_a_post_without_the_csrf_token_is_refused(
    page: Page, context: BrowserContext, console_system: System, shot: Shot
) -> None:
    (job_id,) = dead_lettered_jobs(console_system, 1)
    dl_id = dead_letter_of(console_system, job_id)
    sign_in(page, API_TOKEN)
    act = f"{console_system.api_url}/console/dead-letters/act"
    form: dict[str, str | float | bool] = {"do": f"purge:{dl_id}", "reason": "forged"}

    # The browser's own cookies, but no CSRF token, or another session's.
    assert context.request.post(act, form=form).status == 403
    assert context.request.post(act, form={**form, "csrf": "x" * 32}).status == 403
    refused = context.request.post(
        f"{console_system.api_url}/console/signin", form={"token": API_TOKEN}
    )
    assert refused.status == 403
    assert console_system.get(f"/v1/dead-letters/{dl_id}")[0] == 200

    # The same POST with the session's token goes through: the CSRF token is what was missing.
    nav(page, "Dead letters")
    csrf = page.locator("input[name=csrf]").first.get_attribute("value")
    assert csrf
    done = context.request.post(act, form={**form, "csrf": csrf})
    assert done.status == 200, done.text()
    assert console_system.get(f"/v1/dead-letters/{dl_id}")[0] == 404
    page.goto("/console/audit")
    expect(page.get_by_role("row").filter(has_text="forged")).to_contain_text("purge")
    shot(page, "audit-after-purge")


def test_purging_the_selected_dead_letters_only(
    page: Page, console_system: System, shot: Shot
) -> None:
    kept_job, purged_job = dead_lettered_jobs(console_system, 2)
    kept, purged = (
        dead_letter_of(console_system, kept_job),
        dead_letter_of(console_system, purged_job),
    )
    sign_in(page, API_TOKEN)
    nav(page, "Dead letters")
    page.get_by_role("checkbox", name=f"Select {purged}").check()
    page.get_by_role("button", name="Purge selected").click()
    expect(page.locator("#dry-run-count")).to_have_text("1")
    expect(page.get_by_role("cell", name=purged, exact=True)).to_be_visible()
    expect(page.get_by_role("cell", name=kept, exact=True)).to_have_count(0)
    shot(page, "purge-confirm")
    page.get_by_label("Reason").fill("inspected: not worth replaying")
    page.get_by_role("button", name="Purge 1 dead letter").click()
    expect(page.locator("#done-count")).to_have_text("1")
    assert console_system.get(f"/v1/dead-letters/{purged}")[0] == 404
    assert console_system.get(f"/v1/dead-letters/{kept}")[0] == 200
    # Leave none behind for the other tests.
    assert console_system.post(f"/v1/dead-letters/{kept}/replay")[0] == 202
    console_system.wait(kept_job)


def test_the_api_still_wants_its_bearer_token(console_system: System) -> None:
    assert http_json("GET", f"{console_system.api_url}/v1/stats")[0] == 401
    assert http_json("GET", f"{console_system.api_url}/consolex")[0] == 401
    assert http_json("GET", f"{console_system.api_url}/console/nowhere")[0] == 404
