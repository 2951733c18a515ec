"""Leaf paths of parameter trees (Linen dicts, FrozenDicts, NNX state) and nested dicts."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax
from flax import nnx

from jlora._quant import QArray, is_qarray


def _is_variable(x) -> bool:
    return isinstance(x, nnx.Variable)


def _is_node(x) -> bool:
    return isinstance(x, nnx.Variable | QArray)


def leaves(tree) -> list:
    """``jax.tree_util.tree_leaves`` with each quantized kernel (`QArray`) as one leaf."""
    return jax.tree_util.tree_leaves(tree, is_leaf=is_qarray)


def structure(tree):
    """The treedef matching `leaves`."""
    return jax.tree_util.tree_structure(tree, is_leaf=is_qarray)


def leaf_paths(tree) -> list[str]:
    """'/'-joined paths aligned with ``jax.tree_util.tree_leaves(tree)``.

    An NNX ``Variable`` holding one array is named by the Variable's own path: the
    trailing ``value`` key of its pytree child is dropped, so ``attn/value/kernel``
    (the kernel of a module named ``value``) reads the same in NNX and Linen. A
    quantized kernel (`QArray`) is one leaf, as in `leaves`.

    >>> leaf_paths({"params": {"dense": {"kernel": 1, "bias": 2}}})
    ['params/dense/bias', 'params/dense/kernel']
    """
    paths = []
    entries, _ = jax.tree_util.tree_flatten_with_path(tree, is_leaf=_is_node)
    for key_path, node in entries:
        if _is_variable(node):
            inner, _ = jax.tree_util.tree_flatten_with_path(node, is_leaf=is_qarray)
            if len(inner) == 1:
                paths.append(_keystr(key_path))
            else:
                paths.extend(_keystr(key_path + sub) for sub, _ in inner)
        else:
            paths.append(_keystr(key_path))
    return paths


def _keystr(key_path) -> str:
    return jax.tree_util.keystr(key_path, simple=True, separator="/")


def nest(flat: Mapping[str, Any]) -> dict:
    """``{'a/b': x}`` -> ``{'a': {'b': x}}`` (plain dicts, string keys)."""
    out: dict = {}
    for path, value in flat.items():
        node = out
        *parents, last = path.split("/")
        for p in parents:
            node = node.setdefault(p, {})
        node[last] = value
    return out


def flatten(tree) -> dict[str, Any]:
    """Leaves of any pytree keyed by their '/'-joined path."""
    return dict(zip(leaf_paths(tree), leaves(tree), strict=True))


ADAPTER_KEYS = ("a", "b", "m")  # m: DoRA's magnitude


def adapter_of(path: str, flat: Mapping[str, Any]) -> tuple[str, str] | None:
    """``(kernel_path, factor)`` if ``path`` is a factor of an adapter in ``flat``.

    An adapter is recognised by structure alone: a node holding leaves ``a`` and
    ``b`` (and DoRA's ``m``) and nothing else.

    >>> flat = {"dense/kernel/a": 1, "dense/kernel/b": 2, "head/bias": 3}
    >>> adapter_of("dense/kernel/b", flat), adapter_of("head/bias", flat)
    (('dense/kernel', 'b'), None)
    """
    parent, _, name = path.rpartition("/")
    if name not in ADAPTER_KEYS or f"{parent}/a" not in flat or f"{parent}/b" not in flat:
        return None
    siblings = [p for p in flat if p.rpartition("/")[0] == parent]
    if not all(p.rpartition("/")[2] in ADAPTER_KEYS for p in siblings):
        return None
    return parent, name
