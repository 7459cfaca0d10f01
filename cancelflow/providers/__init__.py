"""The provider registry. Adding a provider is one module plus one line here."""

from __future__ import annotations

from cancelflow.providers import appdirect, axelspringer, azotte, payway
from cancelflow.providers.base import ProviderSpec

REGISTRY: dict[str, ProviderSpec] = {
    spec.key: spec
    for spec in (
        payway.SPEC,
        azotte.SPEC,
        appdirect.SPEC,
        axelspringer.SPEC,
    )
}
