"""PyYAML's SafeLoader, strict: duplicate mapping keys are refused instead of the last one kept.

Role: the one YAML reader of the local config file (xds/local.py imports it only when a local
config is parsed, so an xDS-mode instance never loads PyYAML: tests/unit/test_lazy_imports.py).
Invariant: what it builds is exactly SafeLoader's (plain dicts, lists, scalars); errors are
PyYAML's own (yaml.YAMLError), with marks.
"""

from __future__ import annotations

from typing import Any

import yaml


def load_strict(text: str) -> Any:
    """The YAML document in `text`, built by the strict SafeLoader."""
    return yaml.load(text, Loader=_StrictLoader)  # a SafeLoader subclass: no arbitrary objects


class _StrictLoader(yaml.SafeLoader):
    """SafeLoader that refuses duplicate mapping keys instead of keeping the last one."""


def _construct_mapping(loader: _StrictLoader, node: yaml.MappingNode) -> dict:
    # Only keys written in this mapping count: "<<" merge keys may be overridden, that is their
    # point, and construct_mapping below resolves them.
    seen: set = set()
    for key_node, _ in node.value:
        if key_node.tag == "tag:yaml.org,2002:merge":
            continue
        key = loader.construct_object(key_node, deep=True)
        try:
            duplicate = key in seen
        except TypeError:  # unhashable key: construct_mapping below reports it with its position
            continue
        if duplicate:
            raise yaml.constructor.ConstructorError(
                "while constructing a mapping", node.start_mark,
                f"duplicate key {key!r}", key_node.start_mark,
            )
        seen.add(key)
    return loader.construct_mapping(node, deep=True)


_StrictLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)
