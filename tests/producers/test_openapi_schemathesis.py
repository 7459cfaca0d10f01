"""Property-based run over ``/openapi.json`` against a live API: no 5xx, and no answer that
contradicts the document (status codes, content types, headers, bodies).

Bounded for CI: ``MAX_EXAMPLES`` cases per operation (set ``CANCELFLOW_FUZZ_EXAMPLES`` for a
longer run). The API under test has billing events on and no worker, so the jobs it queues
stay queued and no provider sandbox is called.
"""

from __future__ import annotations

import os
from typing import Any

import pytest
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis.errors import Unsatisfiable
from schemathesis.checks import not_a_server_error
from schemathesis.core.result import Ok
from schemathesis.generation import GenerationMode
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from tests.support import System

pytestmark = pytest.mark.integration

MAX_EXAMPLES = int(os.environ.get("CANCELFLOW_FUZZ_EXAMPLES", "30"))
CHECKS = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
]


def test_the_api_keeps_to_its_openapi_document(billing_api: System) -> None:
    """Every operation, with valid and invalid inputs. (Driven here rather than through
    ``schemathesis.pytest.from_fixture``, whose loader does not run under pytest 9.)"""
    schema = schemathesis.openapi.from_url(f"{billing_api.api_url}/openapi.json")
    headers = {"Authorization": f"Bearer {billing_api.token}"}
    failures: list[str] = []
    operations = []
    for result in schema.get_all_operations():
        assert isinstance(result, Ok), result.err()
        operations.append(result.ok())
    assert len(operations) >= 12
    for operation in operations:
        for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):

            @given(case=operation.as_strategy(generation_mode=mode))
            @settings(
                max_examples=MAX_EXAMPLES,
                deadline=None,
                database=None,
                suppress_health_check=list(HealthCheck),
                phases=[Phase.generate, Phase.shrink],
            )
            def run(case: Any) -> None:
                case.call_and_validate(headers=headers, checks=CHECKS)

            try:
                run()
            except Unsatisfiable:
                pass  # nothing to make invalid: the operation takes no input
            except Exception as exc:  # every operation is tried; all failures are reported
                failures.append(f"{operation.label} ({mode.value}): {exc}")
    assert not failures, "\n\n".join(failures)
