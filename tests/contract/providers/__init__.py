"""Each provider's contract fixture table: one module per registry key, named after it.

A provider added to the registry without a module here fails the contract suite, by name.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from typing import Any, Literal

from cancelflow.contract import OutcomeType

Call = Literal["check", "confirm"]


@dataclass(frozen=True)
class ContractFixture:
    """Demo references of a provider's sandbox, and how to provoke its auth failures."""

    # Eligible; confirm cancels it. `cancel_key` is its key in the sandbox's effective_cancels.
    success: dict[str, Any]
    cancel_key: str
    # check ends "already_cancelled".
    already_cancelled: dict[str, Any]
    # check ends `not_found_outcome` (not_found, or not_eligible where the provider says so).
    not_found: dict[str, Any]
    not_found_outcome: OutcomeType
    # Settings the provider refuses (a wrong secret or key): any call raises ProviderAuthError.
    bad_credentials: dict[str, Any]
    # A provider call that needs no set-up, as (method, path under the sandbox's /{key}):
    # faults strike before auth, so the sandbox fault tests (tests/sandboxes) send it.
    probe: tuple[str, str]
    # Providers with bearer tokens: the token route's name in the sandbox's call counts, and
    # the end of the token endpoint's path (a garbage server answers a token there).
    token_route: str | None = None
    token_path: str | None = None
    # The calls that read a success body (a garbage body must end in ProviderProtocolError).
    parses_body: tuple[Call, ...] = ("check", "confirm")
    # Extra settings for every adapter built in the suite.
    settings: dict[str, Any] = field(default_factory=dict)


# Tables of providers defined outside this package, registered at run time (the throwaway
# provider of tests/contract/throwaway).
REGISTERED: dict[str, ContractFixture] = {}


def contract_for(key: str) -> ContractFixture | None:
    """The provider's table, or None if it has no module here yet."""
    if key in REGISTERED:
        return REGISTERED[key]
    try:
        module = importlib.import_module(f"{__name__}.{key}")
    except ModuleNotFoundError:
        return None
    fixture: ContractFixture = module.CONTRACT
    return fixture
