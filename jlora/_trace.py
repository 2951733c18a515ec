"""Trace an apply function once, abstractly: array arguments traced, everything else static.

`wrap` and `infer_layouts` both turn ``apply_fn(params, *args, **kwargs)`` into a
jaxpr whose first inputs are the leaves of ``params``: `split` decides which call
arguments are traced, `trace` makes the jaxpr without computing anything.
"""

from __future__ import annotations

from typing import Any

import jax
import numpy as np

from jlora._quant import QArray, is_qarray


class Static:
    """Non-array call arguments (flags, strings, methods) as a hashable jit static."""

    def __init__(self, treedef, leaves: dict[int, Any]):
        self.treedef, self.leaves = treedef, leaves

    def _key(self):
        return (self.treedef, tuple(self.leaves.items()))

    def __hash__(self):
        try:
            return hash(self._key())
        except TypeError:
            return hash((self.treedef, tuple(self.leaves)))

    def __eq__(self, other):
        if not isinstance(other, Static) or self.treedef != other.treedef:
            return False
        if self.leaves.keys() != other.leaves.keys():
            return False
        return all(v is other.leaves[k] or _safe_eq(v, other.leaves[k]) for k, v in self.leaves.items())

    def rebuild(self, dynamic: list):
        it = iter(dynamic)
        n = self.treedef.num_leaves
        leaves = [self.leaves[i] if i in self.leaves else next(it) for i in range(n)]
        return jax.tree_util.tree_unflatten(self.treedef, leaves)


def _safe_eq(a, b) -> bool:
    try:
        return bool(a == b)
    except Exception:
        return False


def _is_dynamic(x) -> bool:
    return isinstance(x, jax.Array | np.ndarray | np.generic | jax.ShapeDtypeStruct)


def split(args, kwargs) -> tuple[list, Static]:
    """The array leaves of ``(args, kwargs)`` (traced) and the rest (static)."""
    leaves, treedef = jax.tree_util.tree_flatten((args, kwargs))
    dynamic = [x for x in leaves if _is_dynamic(x)]
    static = {i: x for i, x in enumerate(leaves) if not _is_dynamic(x)}
    return dynamic, Static(treedef, static)


def trace(apply_fn, params, dynamic: list, static: Static):
    """``(closed_jaxpr, out_shape)`` of ``apply_fn(params, *args, **kwargs)``; no FLOPs are spent.

    The jaxpr's inputs are the leaves of ``params`` (a quantized kernel as one input of
    its logical shape and dtype), then ``dynamic``.
    """
    flat, treedef = jax.tree_util.tree_flatten(params, is_leaf=is_qarray)
    avals = [jax.ShapeDtypeStruct(x.shape, x.dtype) if isinstance(x, QArray) else x for x in flat]

    def traced(param_leaves, dyn):
        args, kwargs = static.rebuild(dyn)
        return apply_fn(jax.tree_util.tree_unflatten(treedef, param_leaves), *args, **kwargs)

    return jax.make_jaxpr(traced, return_shape=True)(avals, dynamic)
