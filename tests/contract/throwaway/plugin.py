"""Registers the throwaway provider: the three registry lines a new provider adds.

Load it with ``pytest -p tests.contract.throwaway.plugin``: pytest imports it before any test
module, so before ``cancelflow.settings`` derives its provider settings from the registry.
"""

from __future__ import annotations

import sys

from cancelflow.providers import REGISTRY
from sandboxes.server import SANDBOXES
from tests.contract import providers
from tests.contract.throwaway import contract, provider, sandbox

# Settings, queues, validation and OpenAPI are derived from the registry when their modules
# are imported: registered after that, the provider would be half there.
assert "cancelflow.settings" not in sys.modules, "register providers before importing settings"

REGISTRY[provider.KEY] = provider.SPEC
SANDBOXES[sandbox.SPEC.key] = sandbox.SPEC
providers.REGISTERED[provider.KEY] = contract.CONTRACT
