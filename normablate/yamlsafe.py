"""Loading YAML that a user wrote (run configs, sweep specs, CLI override values) with bounded alias expansion.

``yaml.safe_load`` builds an aliased node once and shares it, so a "billion laughs" document (each level a list
of aliases to the one before) loads in microseconds, and then every walk over the result (checking values,
copying, storing it in a study, writing it to ``summary.md``) pays for the full expansion: a 342-byte config with
9 alias levels took 180 s to refuse, and a 7-level ``description`` put 254 MB into ``optuna.db``. ``load``
composes the node graph first and counts what the expansion would hold (every node plus every scalar's
characters) with one visit per distinct node, so the count costs microseconds whatever the expansion; a document
over ``MAX_EXPANDED`` units, nested deeper than ``MAX_DEPTH`` or holding a recursive alias is refused
(``ConfigError``) before anything is built from it.

Hand-written: PyYAML has no expansion limit (ruamel.yaml has none either), and this is the composer step of
``yaml.safe_load`` plus a count.
"""
from __future__ import annotations

from typing import IO, Any

import yaml

from .errors import ConfigError

MAX_EXPANDED = 2_000_000  # nodes + scalar characters after alias expansion (real configs and specs: < 20,000)
MAX_DEPTH = 100  # nesting of sequences and mappings (real configs: < 6)


def _expanded_size(root: yaml.Node, what: str, limit: int) -> int:
    """Nodes plus scalar characters of the document with every alias expanded; each distinct node visited once."""
    memo: dict[int, int] = {}
    active: set[int] = set()

    def size(node: yaml.Node, depth: int) -> int:
        key = id(node)
        if key in memo:
            return memo[key]
        if depth > MAX_DEPTH:
            raise ConfigError(f"{what}: nested more than {MAX_DEPTH} levels deep; flatten it")
        if key in active:
            raise ConfigError(f"{what}: a YAML alias refers to itself (a recursive structure); write the value out")
        active.add(key)
        if isinstance(node, yaml.ScalarNode):
            n = 1 + len(node.value)
        elif isinstance(node, yaml.SequenceNode):
            n = 1 + sum(size(child, depth + 1) for child in node.value)
        else:  # MappingNode
            n = 1 + sum(size(k, depth + 1) + size(v, depth + 1) for k, v in node.value)
        active.discard(key)
        if n > limit:
            raise ConfigError(f"{what}: its YAML aliases expand to more than {limit:,} values and characters (an "
                              f"alias bomb?); write the values out, or use fewer nested aliases")
        memo[key] = n
        return n

    return size(root, 0)


def load(stream: str | bytes | IO[Any], what: str = "YAML document", limit: int = MAX_EXPANDED) -> Any:
    """``yaml.safe_load(stream)`` that refuses (``ConfigError`` naming ``what``) a document whose alias expansion
    exceeds ``limit``, that nests deeper than ``MAX_DEPTH`` or that refers to itself. YAML syntax errors are raised
    as ``yaml.YAMLError`` (callers name the file and line)."""
    loader = yaml.SafeLoader(stream)
    try:
        try:
            node = loader.get_single_node()
        except RecursionError:  # PyYAML's composer recurses per nesting level
            raise ConfigError(f"{what}: nested too deeply to read; flatten it") from None
        if node is None:
            return None
        _expanded_size(node, what, limit)
        return loader.construct_document(node)
    finally:
        loader.dispose()


MAX_STRING = 10_000  # characters of any one string a sweep stores in its study (a description, a norm name, ...)


def check_strings(obj: Any, where: str, limit: int = MAX_STRING, path: str = "") -> None:
    """Refuse (``ConfigError`` naming the key) any string in ``obj`` (nested dicts and lists; keys too) longer than
    ``limit`` characters: everything a spec holds is stored in the study and printed in reports."""
    if isinstance(obj, str):
        if len(obj) > limit:
            raise ConfigError(f"{where}: {path or 'value'} is {len(obj):,} characters long; at most {limit:,} are "
                              f"allowed (it is stored in the study)")
    elif isinstance(obj, dict):
        for k, v in obj.items():
            key = f"{path}.{k}" if path else str(k)
            check_strings(k, where, limit, f"a key under {path or 'the top level'}")
            check_strings(v, where, limit, key)
    elif isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            check_strings(v, where, limit, f"{path}[{i}]")
