"""How an adapter's factors map onto the axes of the kernel they adapt.

A kernel ``W`` has three kinds of axes: *stack* axes (one layer of a scanned stack
each), *in* axes (contracted by the op that consumes ``W``) and *out* axes. Its
adapter holds ``a`` of shape ``(*stack, *in, r)`` and ``b`` of shape
``(*stack, r, *out)``; the delta is ``scale · a @ b`` laid back onto W's axes.
"""

from __future__ import annotations

import dataclasses
import math
import re

import jax
import jax.numpy as jnp
from jax import lax

_QKV = re.compile(r"(.*/)?(query|key|value)/kernel")


class LayoutError(ValueError):
    """A kernel's configured axis split disagrees with the ops that consume it."""


@dataclasses.dataclass(frozen=True)
class Layout:
    """Axis roles of one adapted kernel (positions are axes of ``W``)."""

    in_axes: tuple[int, ...]
    out_axes: tuple[int, ...]
    stack_axes: tuple[int, ...] = ()

    def a_shape(self, w_shape, rank: int) -> tuple[int, ...]:
        return (*(w_shape[i] for i in self.stack_axes), *(w_shape[i] for i in self.in_axes), rank)

    def b_shape(self, w_shape, rank: int) -> tuple[int, ...]:
        return (*(w_shape[i] for i in self.stack_axes), rank, *(w_shape[i] for i in self.out_axes))

    def fan_in(self, w_shape) -> int:
        return math.prod(w_shape[i] for i in self.in_axes)

    def factor_specs(self, spec, ndim: int) -> tuple[tuple, tuple, tuple]:
        """PartitionSpec entries of ``a``, ``b`` and DoRA's ``m`` that follow W's ``spec`` (rank axis whole).

        >>> Layout((0,), (1,)).factor_specs(("fsdp", "model"), 2)
        (('fsdp', None), (None, 'model'), ('model',))
        """
        s = tuple(spec) + (None,) * (ndim - len(tuple(spec)))
        stack = tuple(s[i] for i in self.stack_axes)
        ins, outs = tuple(s[i] for i in self.in_axes), tuple(s[i] for i in self.out_axes)
        return (*stack, *ins, None), (*stack, None, *outs), (*stack, *outs)


def default_layout(path: str, ndim: int, in_axes=None, stack_axes=()) -> Layout:
    """The documented default split of a kernel's axes.

    Stack axes are the user's. Of the rest, the input axes are all but the last
    (Dense ``(in, out)``, Conv ``(*window, in, out)``, attention out-projection
    ``(heads, head_dim, out)``, embedding ``(vocab, features)``), except the 3-D
    ``query``/``key``/``value`` kernels ``(in, heads, head_dim)`` of Flax attention,
    whose input is their first axis.

    >>> default_layout("params/attn/query/kernel", 3)
    Layout(in_axes=(0,), out_axes=(1, 2), stack_axes=())
    >>> default_layout("params/conv/kernel", 4)
    Layout(in_axes=(0, 1, 2), out_axes=(3,), stack_axes=())
    """
    rest = [i for i in range(ndim) if i not in stack_axes]
    if in_axes is None:
        if len(rest) == 3 and _QKV.fullmatch(path):
            in_axes = (rest[0],)
        else:
            in_axes = tuple(rest[:-1])
    out_axes = tuple(i for i in rest if i not in in_axes)
    return Layout(tuple(in_axes), out_axes, tuple(stack_axes))


def delta(a: jax.Array, b: jax.Array, layout: Layout) -> jax.Array:
    """``a @ b`` over the rank axis, laid out on W's axes (no scale applied)."""
    s = len(layout.stack_axes)
    stack = tuple(range(s))
    d = lax.dot_general(a, b, (((a.ndim - 1,), (s,)), (stack, stack)))
    order = (*layout.stack_axes, *layout.in_axes, *layout.out_axes)
    return lax.transpose(d, tuple(order.index(i) for i in range(len(order))))


def wider(x, y) -> jnp.dtype:
    """The wider of two float dtypes (float32 for bfloat16 vs float16).

    Spelled out rather than ``jnp.promote_types`` so it also holds under
    ``jax_numpy_dtype_promotion="strict"``.
    """
    x, y = jnp.dtype(x), jnp.dtype(y)
    if x == y:
        return x
    if x.itemsize != y.itemsize:
        return x if x.itemsize > y.itemsize else y
    return jnp.dtype(jnp.float32)


def merged(w: jax.Array, a: jax.Array, b: jax.Array, layout: Layout, scale) -> jax.Array:
    """``W + scale · a @ b`` in W's dtype, summed in the wider of W's and a's dtypes."""
    acc = wider(w.dtype, a.dtype)
    d = delta(a.astype(acc), b.astype(acc), layout)
    return (w.astype(acc) + jnp.asarray(scale, acc) * d).astype(w.dtype)


def _to_matrix(x, n_stack: int, n_rows: int):
    """``(*stack, *rows, *cols)`` -> ``(prod(stack), prod(rows), prod(cols))``."""
    s = x.shape
    stack, rows = math.prod(s[:n_stack]), math.prod(s[n_stack:n_stack + n_rows])
    return x.reshape(stack, rows, -1)


def _w_matrix(w, layout: Layout):
    """W as ``(prod(stack), fan_in, fan_out)`` with a's and b's axis orders."""
    order = (*layout.stack_axes, *layout.in_axes, *layout.out_axes)
    return _to_matrix(lax.transpose(w, order), len(layout.stack_axes), len(layout.in_axes))


def m_shape(w_shape, layout: Layout) -> tuple[int, ...]:
    """Shape of DoRA's magnitude: one per output unit (and stacked layer)."""
    return (*(w_shape[i] for i in layout.stack_axes), *(w_shape[i] for i in layout.out_axes))


def weight_norm(w, layout: Layout) -> jax.Array:
    """``‖W‖`` per output unit (over the input axes), float32, shape `m_shape`."""
    wm = _w_matrix(w, layout).astype(jnp.float32)
    return jnp.sqrt(jnp.sum(wm * wm, axis=1)).reshape(m_shape(w.shape, layout))


def column_norm(w, a, b, layout: Layout, scale) -> jax.Array:
    """``‖W + s·a@b‖`` per output unit, without forming ``W + s·a@b``.

    ``‖w + s·A b‖² = ‖w‖² + 2s·⟨Aᵀw, b⟩ + s²·bᵀ(AᵀA)b`` column by column: O(r·|W|)
    flops like the merged weight, but no |W|-sized temporary beyond W itself.
    Float32, shape `m_shape`, with no gradient (DoRA treats the norm as a constant).
    """
    w, a, b = (lax.stop_gradient(x).astype(jnp.float32) for x in (w, a, b))
    s = lax.stop_gradient(jnp.asarray(scale, jnp.float32))
    n_stack = len(layout.stack_axes)
    wm = _w_matrix(w, layout)  # (p, n, m)
    am = _to_matrix(a, n_stack, a.ndim - n_stack - 1)  # (p, n, r)
    bm = _to_matrix(b, n_stack, 1)  # (p, r, m)
    ww = jnp.sum(wm * wm, axis=1)
    cross = jnp.sum(jnp.einsum("pnr,pnm->prm", am, wm) * bm, axis=1)
    gram = jnp.einsum("pnr,pns->prs", am, am)
    bb = jnp.sum(bm * jnp.einsum("prs,psm->prm", gram, bm), axis=1)
    sq = ww + 2.0 * s * cross + s * s * bb
    return jnp.sqrt(jnp.maximum(sq, 0.0)).reshape(m_shape(w.shape, layout))


def dora_merged(w, a, b, m, layout: Layout, scale) -> jax.Array:
    """``m · V/‖V‖`` per output unit with ``V = W + scale·a@b``, in W's dtype."""
    acc = wider(w.dtype, a.dtype)
    v = merged(w.astype(acc), a, b, layout, scale)
    factor = m.astype(acc) / column_norm(w, a, b, layout, scale).astype(acc)
    return (v * _on_w_axes(factor, layout, w.ndim)).astype(w.dtype)


def _on_w_axes(factor, layout: Layout, ndim: int):
    """Broadcast a ``(*stack, *out)`` array against W's axes."""
    src = (*layout.stack_axes, *layout.out_axes)
    order = sorted(range(len(src)), key=lambda i: src[i])
    expanded = lax.transpose(factor, tuple(order))
    shape = [1] * ndim
    for axis in sorted(src):
        shape[axis] = factor.shape[src.index(axis)]
    return expanded.reshape(shape)


def reshape_runs(old, new) -> list[tuple[tuple[int, ...], tuple[int, ...]]]:
    """What a reshape from ``old`` to ``new`` does to axes: runs of old axes paired with runs of new ones.

    Each pair covers the same elements (merged, split, or kept); a size-1 axis that is only
    dropped or only added pairs with an empty run.

    >>> reshape_runs((4, 2, 3), (8, 3, 1))
    [((0, 1), (0,)), ((2,), (1,)), ((), (2,))]
    """
    pairs, i, j = [], 0, 0
    while i < len(old) or j < len(new):
        if i < len(old) and old[i] == 1 and (j >= len(new) or new[j] != 1):
            pairs.append(((i,), ()))
            i += 1
        elif j < len(new) and new[j] == 1 and (i >= len(old) or old[i] != 1):
            pairs.append(((), (j,)))
            j += 1
        else:
            run_old, run_new, n_old, n_new = [i], [j], old[i], new[j]
            while n_old != n_new:
                if n_old < n_new:
                    i += 1
                    n_old *= old[i]
                    run_old.append(i)
                else:
                    j += 1
                    n_new *= new[j]
                    run_new.append(j)
            pairs.append((tuple(run_old), tuple(run_new)))
            i, j = i + 1, j + 1
    return pairs
