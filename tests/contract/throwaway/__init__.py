"""A throwaway provider, defined here as the README's "Adding a provider" says, to prove it.

- ``provider.py`` is what ``cancelflow/providers/<key>.py`` would be (its SPEC);
- ``sandbox.py`` is what ``sandboxes/<key>.py`` would be (its SPEC);
- ``contract.py`` is what ``tests/contract/providers/<key>.py`` would be (its CONTRACT);
- ``plugin.py`` adds the three registry lines, as a pytest plugin (``-p``), before anything
  derives from the registries.

``tests/contract/test_adding_a_provider.py`` runs the contract suite with the plugin.
"""
