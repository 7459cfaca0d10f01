"""Property-based run over ``/openapi.json`` against a live API: no 5xx, and no answer that
contradicts the document (status codes, content types, headers, bodies).

Every check schemathesis has (``--checks all``), ``MAX_EXAMPLES`` (100) cases per operation and
generation mode, derandomized: the same cases on every run (set ``CANCELFLOW_FUZZ_EXAMPLES`` for
a longer run). The API under test has billing events on and no worker, so the jobs it queues
stay queued and no provider sandbox is called.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from typing import Any

import pytest
import schemathesis
from hypothesis import HealthCheck, Phase, assume, given, settings
from hypothesis.errors import Unsatisfiable
from schemathesis.checks import CHECKS as REGISTERED_CHECKS
from schemathesis.checks import load_all_checks
from schemathesis.config import SchemathesisConfig
from schemathesis.config._checks import (
    NEGATIVE_DATA_REJECTION_EXPECTED_STATUSES,
    POSITIVE_DATA_ACCEPTANCE_EXPECTED_STATUSES,
)
from schemathesis.core.result import Ok
from schemathesis.generation import GenerationMode

from producers.openapi import IDEMPOTENCY_KEY_PATTERN
from tests.support import System

pytestmark = pytest.mark.integration

MAX_EXAMPLES = int(os.environ.get("CANCELFLOW_FUZZ_EXAMPLES", "100"))
# Every registered check, as ``schemathesis run --checks all`` runs them (the OpenAPI ones
# register on import: ``load_all_checks``).
load_all_checks()
CHECKS = list(REGISTERED_CHECKS.get_all())
# A body over the size limit is refused (413) whatever it holds: valid or not, that is the
# documented answer (the limit is in each request body's description).
_TOO_LARGE = "413"
CONFIG = SchemathesisConfig.from_dict(
    {
        "checks": {
            "negative_data_rejection": {
                "expected-statuses": [*NEGATIVE_DATA_REJECTION_EXPECTED_STATUSES, _TOO_LARGE]
            },
            "positive_data_acceptance": {
                "expected-statuses": [*POSITIVE_DATA_ACCEPTANCE_EXPECTED_STATUSES, _TOO_LARGE]
            },
        }
    }
)


def _own_idempotency_key(case: Any) -> None:
    """A generated idempotency key made the body's own (a hash of the rest of it): the same
    body repeats its key, another body never reuses it. Hypothesis reuses small values, and
    a key sent again with another body is rightly refused (422, idempotency-key-reused).
    Only a valid key is replaced: an invalid one (a negative case) stays, to be refused."""
    body = case.body
    if not isinstance(body, dict):
        return
    rest = json.dumps({k: v for k, v in body.items() if k != "idempotency_key"}, sort_keys=True)
    own = "fuzz-" + hashlib.sha256(rest.encode()).hexdigest()[:32]
    key = body.get("idempotency_key")
    if isinstance(key, str) and 1 <= len(key) <= 255:
        body["idempotency_key"] = own
    for name, value in list((case.headers or {}).items()):
        if name.lower() == "idempotency-key" and re.fullmatch(IDEMPOTENCY_KEY_PATTERN, value):
            case.headers[name] = own  # equal to the body's key, when that is valid


def _sent_as_generated(case: Any) -> bool:
    """Whether the request carries the query the case was generated with. A parameter with an
    empty name, or an empty array (nothing to repeat), never reaches the wire: a negative case
    whose only fault was one is a valid request, rightly answered 200."""
    return all(name and value != [] for name, value in (case.query or {}).items())


def test_the_api_keeps_to_its_openapi_document(billing_api: System) -> None:
    """Every operation, with valid and invalid inputs. (Driven here rather than through
    ``schemathesis.pytest.from_fixture``, whose loader does not run under pytest 9.)"""
    schema = schemathesis.openapi.from_url(f"{billing_api.api_url}/openapi.json", config=CONFIG)
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
                derandomize=True,
                suppress_health_check=list(HealthCheck),
                phases=[Phase.generate, Phase.shrink],
            )
            def run(case: Any) -> None:
                assume(_sent_as_generated(case))
                _own_idempotency_key(case)
                case.call_and_validate(headers=headers, checks=CHECKS)

            try:
                run()
            except Unsatisfiable:
                pass  # nothing to make invalid: the operation takes no input
            # Every operation is tried; all failures are reported (schemathesis reports its
            # findings as a FailureGroup, a BaseExceptionGroup).
            except (Exception, BaseExceptionGroup) as exc:
                failures.append(f"{operation.label} ({mode.value}): {exc}")
    assert not failures, "\n\n".join(failures)
