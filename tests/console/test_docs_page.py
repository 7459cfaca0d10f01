"""``/docs`` in a real browser: Swagger UI renders ``/openapi.json`` from files this API
serves, with no token, and loads nothing from anywhere else."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from playwright.sync_api import Browser, Page, expect

from producers.local import http_json
from tests.console.conftest import Shot
from tests.fixtures.system import StartSystem
from tests.support import System

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def docs_api(start_system: StartSystem) -> System:
    return start_system(workers=0, isolated=True)


@pytest.fixture
def page(browser: Browser, docs_api: System) -> Iterator[Page]:
    ctx = browser.new_context(base_url=docs_api.api_url)
    try:
        yield ctx.new_page()
    finally:
        ctx.close()


def test_the_docs_page_renders_the_document_from_our_own_files(
    page: Page, docs_api: System, shot: Shot
) -> None:
    requested: list[str] = []
    errors: list[str] = []
    page.on("request", lambda request: requested.append(request.url))
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    page.on("console", lambda msg: errors.append(msg.text) if msg.type == "error" else None)
    answer = page.goto("/docs")  # no token
    assert answer is not None and answer.status == 200
    assert "default-src 'none'" in answer.headers["content-security-policy"]
    expect(page.get_by_text("Queue a cancellation")).to_be_visible()
    _, document = http_json("GET", f"{docs_api.api_url}/openapi.json")
    operations = sum(len(item) for item in document["paths"].values())
    expect(page.locator(".opblock")).to_have_count(operations)
    # The discriminated request: one schema per provider, listed among the schemas.
    page.get_by_role("button", name="Schemas").click()
    expect(page.get_by_text("PaywayCancellationRequest", exact=True).first).to_be_visible()
    page.get_by_text("Queue a cancellation").click()
    expect(page.get_by_text("order-81723-cancel").first).to_be_visible()  # the example
    shot(page, "docs")
    assert requested and all(url.startswith(docs_api.api_url + "/") for url in requested), [
        url for url in requested if not url.startswith(docs_api.api_url + "/")
    ]
    assert f"{docs_api.api_url}/openapi.json" in requested
    assert not errors, errors


def test_docs_assets_are_only_the_pages_own(docs_api: System) -> None:
    status, _ = http_json("GET", f"{docs_api.api_url}/docs/assets/swagger-ui.css")
    assert status == 200
    for name in ("index.html", "..%2Fopenapi.json", "swagger-initializer.js"):
        status, problem = http_json("GET", f"{docs_api.api_url}/docs/assets/{name}")
        assert status == 404, (name, problem)
