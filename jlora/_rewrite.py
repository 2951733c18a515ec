"""Evaluate a jaxpr with adapted kernels kept factored.

The model's apply function is traced to a jaxpr with the base parameters, then
evaluated equation by equation. An adapted kernel travels as a `Lora` value: its
base array ``w`` plus factors ``a``/``b`` and the `Layout` saying which of W's
axes are input, output and stack axes. Ops that consume the kernel get a rule
that adds the low-rank branch instead of forming ``W + s·a@b``:

* ``dot_general``: ``x·W + s·(x·a)·b``; a transposed use (a tied embedding head,
  ``x·Wᵀ``) contracts the output axes, so b is applied first and a second;
* ``conv_general_dilated``: a is a conv with W's window, b a 1x1 over features;
* ``gather`` of whole rows (an embedding lookup): ``W[i] + s·a[i]·b``;
* ``transpose``/``convert_element_type``/``copy``/``sharding_constraint``/``reshape``
  move the kernel (its factors follow), and ``slice``/``dynamic_slice``/``squeeze`` of
  stack axes pick layers out of a scanned stack;
* ``jit`` (pjit) and ``custom_jvp_call`` are inlined; ``scan``, ``checkpoint``
  (remat), ``cond`` and ``while`` are rebuilt around a rewritten body.

Any other equation that consumes an adapted kernel gets the merged weight, which
is correct but forms W + s·a@b; each such use is recorded as a fallback.

A bank served per example (``lora_index``) carries its K adapters in front of the
factors' axes (`Lora.lead`): the moving ops pass K along, and each consuming op
(``dot_general`` forward or transposed, ``conv_general_dilated``, the embedding
``gather``) picks every example's adapter and runs the branch batched over the
examples. A merged weight is one adapter for the whole batch, so there the
fallback refuses instead.

A quantized base (``w`` a `QArray`) travels through control flow and stack
slicing as its codes. Where an op needs W itself (the base term of a consuming
op), W is dequantized inside a ``jax.checkpoint``: the backward pass recomputes
it instead of keeping a full-precision W alive between forward and backward.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jax import lax
from jax.extend.core import Literal
from jax.sharding import PartitionSpec

from jlora._config import NONLINEARITIES
from jlora._layout import Layout, LayoutError, column_norm, dora_merged, merged, reshape_runs
from jlora._primitives import UnsupportedJax as UnsupportedJax
from jlora._primitives import param as _param
from jlora._primitives import scan_counts as _scan_counts
from jlora._quant import QArray, dequantized
from jlora._variants import reason


@dataclasses.dataclass(frozen=True)
class Lora:
    """An adapted kernel in flight: base ``w``, factors and their axis roles.

    ``key`` (dropout on the branch input) and ``m`` (DoRA's magnitude in effect) are
    ``None`` when not in use; ``f`` names the nonlinearity between ``a`` and ``b``.
    ``w`` is an array or a quantized `QArray` (see `weight`).
    """

    path: str
    w: Any
    a: Any
    b: Any
    scale: Any  # scalar; alpha/r times the runtime adapter scale
    layout: Layout
    key: Any = None
    m: Any = None
    f: str = "identity"
    rate: float = 0.0
    index: Any = None  # per-example adapter of a bank: (batch,) int32, -1 = none; a, b lead with K

    @property
    def lead(self) -> int:
        """Factor axes before the stack axes: 1 for a bank served per example (its K), else 0.

        A bank's ``a`` is ``(K, *stack, *in, r)`` and its ``b`` ``(K, *stack, r, *out)``; the
        ops that move a stacked kernel address the factors' stack axes past this offset, so
        K rides along untouched until the consuming op picks each example's adapter.
        """
        return 0 if self.index is None else 1

    def weight(self):
        """W as an array (a quantized W dequantized)."""
        return dequantized(self.w)

    def materialize(self):
        if self.index is not None:
            raise ValueError(
                f"{self.path}: an op with no per-example rule consumes this kernel; per-example adapters "
                "(lora_index) act on Dense/attention projections (also used transposed, as a tied "
                "embedding head), convolutions and embedding lookups, in scanned stacks too. Use "
                "lora_weights, or exclude the kernel from the bank's targets."
            )
        if self.f != "identity":
            raise ValueError(f"{self.path}: an op with no factored rule consumes this kernel; exclude it "
                             f"from targets, or: {reason('nonlinearity', 'merge')}")
        if self.m is not None:
            return dora_merged(self.weight(), self.a, self.b, self.m, self.layout, self.scale)
        return merged(self.weight(), self.a, self.b, self.layout, self.scale)

    def drop(self, x):
        """Dropout on the branch input (identity without a key)."""
        if self.key is None or self.rate == 0:
            return x
        keep = jax.random.bernoulli(self.key, 1.0 - self.rate, x.shape)
        return jnp.where(keep, x / jnp.asarray(1.0 - self.rate, x.dtype), jnp.zeros((), x.dtype))

    def nonlinear(self, u):
        return NONLINEARITIES[self.f](u)

    def dora_factor(self):
        """``m/‖W + s·a@b‖`` per output unit (float32, shape ``(*stack, *out)``), or None."""
        if self.m is None:
            return None
        norm = column_norm(self.weight(), self.a, self.b, self.layout, self.scale)
        return self.m.astype(jnp.float32) / norm


# A pytree: control flow (scan, cond, while, remat, shard_map) carries a Lora as its arrays,
# whatever fields it has; path, layout, nonlinearity and dropout rate are static.
jax.tree_util.register_dataclass(
    Lora, data_fields=["w", "a", "b", "scale", "key", "m", "index"],
    meta_fields=["path", "layout", "f", "rate"],
)


class Use(NamedTuple):
    """How one equation consumed an adapted kernel."""

    path: str
    primitive: str
    factored: bool


@dataclasses.dataclass
class Context:
    fallback: str = "merge"  # or "error"
    uses: list[Use] | None = None
    live: frozenset = frozenset()  # the variables the jaxpr being evaluated reads (see `_leaving`)

    def record(self, lora: Lora, primitive: str, factored: bool):
        if self.uses is not None:
            self.uses.append(Use(lora.path, primitive, factored))


# --------------------------------------------------------------------------- eval


def eval_jaxpr(ctx: Context, jaxpr, consts: Sequence, args: Sequence) -> list:
    env: dict = {}
    read_later = [v for eqn in jaxpr.eqns for v in eqn.invars] + list(jaxpr.outvars)
    ctx = dataclasses.replace(ctx, live=frozenset(v for v in read_later if not isinstance(v, Literal)))

    def read(v):
        return v.val if isinstance(v, Literal) else env[v]

    for v, x in zip(jaxpr.constvars, consts, strict=True):
        env[v] = x
    for v, x in zip(jaxpr.invars, args, strict=True):
        env[v] = x
    for eqn in jaxpr.eqns:
        invals = [read(v) for v in eqn.invars]
        with eqn.ctx.manager:
            if any(isinstance(x, Lora) for x in invals):
                per_example = any(isinstance(x, Lora) and x.index is not None for x in invals)
                rule = (_PER_EXAMPLE_RULES if per_example else _RULES).get(eqn.primitive.name, _fallback)
                outs = rule(ctx, eqn, invals)
            else:
                outs = _bind(eqn, invals)
        for v, x in zip(eqn.outvars, outs, strict=True):
            env[v] = x
    return [read(v) for v in jaxpr.outvars]


def _bind(eqn, invals, **override):
    params = eqn.primitive.get_bind_params({**eqn.params, **override})
    out = eqn.primitive.bind(*invals, **params)
    return out if eqn.primitive.multiple_results else [out]


def _bind_base(eqn, invals):
    """The equation on the base weights; a quantized one is dequantized inside a checkpoint.

    Under ``jax.grad`` the checkpoint saves its inputs (the codes) rather than the
    dequantized W, and the backward pass dequantizes again: QLoRA's memory saving.
    """
    if not any(isinstance(x, QArray) for x in invals):
        return _bind(eqn, invals)
    return jax.checkpoint(lambda *xs: _bind(eqn, [dequantized(x) for x in xs]))(*invals)


def _plain(x):
    return x.materialize() if isinstance(x, Lora) else x


def _leaving(ctx: Context, outer_vars, body_vars, outs) -> list:
    """A control-flow body's results as arrays, bound to ``outer_vars`` of the enclosing jaxpr.

    An adapted kernel is merged where the enclosing jaxpr reads it afterwards. Where
    nothing does (Flax's ``nn.scan`` and NNX's ``nnx.scan`` hand the variables back out),
    it leaves as zeros of its shape: no W + s·a@b is formed for nothing, and a bank served
    per example, which has no merged form, passes.
    """
    return [jnp.zeros(b.aval.shape, b.aval.dtype) if isinstance(o, Lora) and v not in ctx.live else _plain(o)
            for o, v, b in zip(outs, outer_vars, body_vars, strict=True)]


def _fallback(ctx: Context, eqn, invals):
    for x in invals:
        if isinstance(x, Lora):
            if ctx.fallback == "error":
                raise ValueError(
                    f"{x.path}: no factored rule for '{eqn.primitive.name}', which consumes this "
                    "adapted kernel; the merged weight would be formed. Use fallback='merge' to "
                    "allow it, or exclude the kernel from targets."
                )
            ctx.record(x, eqn.primitive.name, False)
    return _bind(eqn, [_plain(x) for x in invals])


# ---------------------------------------------------------------- consuming ops


def _factor_maps(lora: Lora):
    """Axis maps W-axis -> factor-axis for a and b, and their rank axes."""
    lay, s = lora.layout, len(lora.layout.stack_axes)
    a_map = {w: i for i, w in enumerate(lay.stack_axes)} | {w: s + i for i, w in enumerate(lay.in_axes)}
    b_map = {w: i for i, w in enumerate(lay.stack_axes)} | {w: s + 1 + i for i, w in enumerate(lay.out_axes)}
    return (lora.a, a_map, s + len(lay.in_axes)), (lora.b, b_map, s)


def _layout_error(lora: Lora, op: str, axes) -> LayoutError:
    lay = lora.layout
    return LayoutError(
        f"{lora.path}: '{op}' contracts kernel axes {tuple(sorted(axes))}, but the adapter treats "
        f"{lay.in_axes} as input and {lay.out_axes} as output axes (stack axes {lay.stack_axes}). "
        f"Set the split for this kernel: jlora.Rule(pattern=..., in_axes={tuple(sorted(axes))}), "
        "and declare layer axes of scanned stacks with stack_axes=(0,)."
    )


def _dot_general(ctx: Context, eqn, invals):
    lhs, rhs = invals
    if isinstance(lhs, Lora) and isinstance(rhs, Lora):
        return _fallback(ctx, eqn, invals)
    (lc, rc), (lb, rb) = _param(eqn, "dimension_numbers")
    w_is_rhs = isinstance(rhs, Lora)
    lora, x = (rhs, lhs) if w_is_rhs else (lhs, rhs)
    xc, wc, xb, wb = (lc, rc, lb, rb) if w_is_rhs else (rc, lc, rb, lb)
    lay = lora.layout
    # Stack axes the op batches over, or leaves free (every layer or expert applied to the same
    # input, 'bi,lio->lbo'): each of those slices gets its own a and b.
    free_stack = tuple(w for w in lay.stack_axes if w not in wb)
    if not set(wb) <= set(lay.stack_axes) or set(free_stack) & set(wc) or (free_stack and lora.m is not None):
        return _fallback(ctx, eqn, invals)
    a_side, b_side = _factor_maps(lora)
    if set(wc) == set(lay.in_axes):
        first, second, free, forward = a_side, b_side, lay.out_axes, True
    elif set(wc) == set(lay.out_axes):
        first, second, free, forward = b_side, a_side, lay.in_axes, False
    else:
        raise _layout_error(lora, "dot_general", wc)
    if not forward and (lora.f != "identity" or lora.m is not None):
        variant = "DoRA" if lora.m is not None else "nonlinearity"
        raise ValueError(f"{lora.path}: this dot_general uses the kernel transposed (contracting its output "
                         f"axes, as a tied embedding head does); {reason(variant, 'transposed')}")

    base = _bind_base(eqn, [x, lora.w] if w_is_rhs else [lora.w, x])[0]
    dt = lora.w.dtype
    precision, pet = eqn.params.get("precision"), eqn.params.get("preferred_element_type")
    f_arr, f_map, f_r = first
    s_arr, s_map, s_r = second
    nb = len(xb)
    n_tokens = x.ndim - len(xc) - nb  # x's free axes
    n_fs = len(free_stack)
    if not xb and not n_fs and n_tokens > 1 and sorted(xc) == list(range(n_tokens, x.ndim)) \
            and not _explicitly_sharded(x):
        v = _branch_2d(lora, x, xc, wc, first, second, free, precision, pet)
    else:
        # u = x · first over W's contracted axes, batched over the stack axes:
        # (*batch, *x_free, *free_stack, r)
        u = lax.dot_general(
            lora.drop(x), f_arr.astype(dt),
            ((tuple(xc), tuple(f_map[w] for w in wc)), (tuple(xb), tuple(f_map[w] for w in wb))),
            precision=precision, preferred_element_type=pet,
        )
        u = lora.nonlinear(u) * jnp.asarray(lora.scale).astype(u.dtype)
        # v = u · second over r: (*batch, *free_stack, *x_free, *free in factor order)
        u_fs = tuple(range(u.ndim - 1 - n_fs, u.ndim - 1))
        v = lax.dot_general(
            u, s_arr.astype(dt),
            (((u.ndim - 1,), (s_r,)),
             ((*range(nb), *u_fs), (*(s_map[w] for w in wb), *(s_map[w] for w in free_stack)))),
            precision=precision, preferred_element_type=pet,
        )
    # Reorder to dot_general's output: batch, lhs free, rhs free (free W axes ascending).
    n_xfree = v.ndim - nb - n_fs - len(free)
    batch = list(range(nb))
    x_free = list(range(nb + n_fs, nb + n_fs + n_xfree))
    position = {w: nb + i for i, w in enumerate(free_stack)}
    position |= {w: nb + n_fs + n_xfree + free.index(w) for w in free}
    w_free = [position[w] for w in sorted(position)]
    perm = batch + (x_free + w_free if w_is_rhs else w_free + x_free)
    out = base + lax.transpose(v, tuple(perm)).astype(base.dtype)
    factor = lora.dora_factor()
    if factor is not None:
        # (*stack, *out) -> the output's batch and W-free positions, 1 on x's free axes.
        ns = len(lay.stack_axes)
        src = [lay.stack_axes.index(w) for w in wb] + [ns + lay.out_axes.index(w) for w in sorted(free)]
        factor = lax.transpose(factor, tuple(src))
        shape = list(factor.shape[:nb]) + (
            [1] * n_xfree + list(factor.shape[nb:]) if w_is_rhs else list(factor.shape[nb:]) + [1] * n_xfree
        )
        out = (out * factor.reshape(shape).astype(out.dtype)).astype(base.dtype)
    ctx.record(lora, "dot_general", True)
    return [out]


def _explicitly_sharded(x) -> bool:
    """Whether ``x`` carries an explicit sharding in its type (explicit mesh axes, ``jax.make_mesh``).

    Flattening its token axes into one and splitting them back is a reshape explicit
    sharding refuses to guess; the N-D ``dot_general`` form lets JAX infer every sharding.
    """
    sharding = getattr(jax.typeof(x), "sharding", None)
    return sharding is not None and any(entry is not None for entry in getattr(sharding, "spec", ()))


def _branch_2d(lora: Lora, x, xc, wc, first, second, free, precision, pet):
    """The branch as two 2-D matmuls, ``(n, k)·(k, r)`` then ``(n, r)·(r, out)``: ``(*x_free, *free)``.

    For an input whose free axes lead (tokens: batch, sequence, ...) and whose contracted
    axes trail. The result equals the N-D ``dot_general`` form, but each factor's
    gradient then contracts one token axis instead of several, which spares XLA a
    transposed copy of an activation-sized cotangent per adapted kernel (0.73x the
    wall time of a CPU training step in ``benchmarks/speed.py``, with the same FLOPs).
    """
    (f_arr, f_map, f_r), (s_arr, s_map, s_r) = first, second
    dt = lora.w.dtype
    pairs = sorted(zip(xc, wc, strict=True))  # x's contracted axes in order: reshape is free
    x_free_shape = x.shape[:x.ndim - len(pairs)]
    x2 = lora.drop(x).reshape(math.prod(x_free_shape), -1)
    f2 = lax.transpose(f_arr, (*(f_map[w] for _, w in pairs), f_r)).reshape(x2.shape[1], -1)
    u = jnp.dot(x2, f2.astype(dt), precision=precision, preferred_element_type=pet)
    u = lora.nonlinear(u) * jnp.asarray(lora.scale).astype(u.dtype)
    s2 = lax.transpose(s_arr, (s_r, *(s_map[w] for w in free))).reshape(u.shape[1], -1)
    v = jnp.dot(u, s2.astype(dt), precision=precision, preferred_element_type=pet)
    return v.reshape(*x_free_shape, *(lora.w.shape[w] for w in free))


def _ragged_dot(ctx: Context, eqn, invals):
    """Experts by group (``ragged_dot``): ``x_g·W_g + s·f(x_g·a_g)·b_g`` for every group ``g``.

    W's group axis is a stack axis of the layout, so each expert has its own ``a``/``b``;
    both factors are applied with ``ragged_dot`` and the same group sizes, so each row of
    ``x`` meets exactly its expert's adapter.
    """
    x, lora, *rest = invals
    dn = _param(eqn, "ragged_dot_dimension_numbers")
    (xc, wc), (xb, wb) = dn.dot_dimension_numbers
    groups = tuple(dn.rhs_group_dimensions)
    if isinstance(x, Lora) or any(isinstance(v, Lora) for v in rest):
        return _fallback(ctx, eqn, invals)
    lay = lora.layout
    if xb or wb or len(groups) != 1 or set(groups) != set(lay.stack_axes) or set(wc) != set(lay.in_axes):
        return _fallback(ctx, eqn, invals)
    if lora.m is not None:
        raise ValueError(f"{lora.path}: {reason('DoRA', 'ragged_dot')}")
    base = _bind_base(eqn, [x, lora.w, *rest])[0]
    (a, a_map, _), (b, b_map, b_r) = _factor_maps(lora)
    dt = lora.w.dtype
    options = {k: _param(eqn, k) for k in ("precision", "preferred_element_type", "group_offset")}
    x_free = [i for i in range(x.ndim) if i not in xc]
    (ragged,) = dn.lhs_ragged_dimensions
    u = lax.ragged_dot_general(
        lora.drop(x), a.astype(dt), *rest,
        lax.RaggedDotDimensionNumbers(((tuple(xc), tuple(a_map[w] for w in wc)), ((), ())), (ragged,),
                                      (a_map[groups[0]],)),
        **options,
    )  # (*x_free, r)
    u = lora.nonlinear(u) * jnp.asarray(lora.scale).astype(u.dtype)
    v = lax.ragged_dot_general(
        u, b.astype(dt), *rest,
        lax.RaggedDotDimensionNumbers((((u.ndim - 1,), (b_r,)), ((), ())), (x_free.index(ragged),),
                                      (b_map[groups[0]],)),
        **options,
    )  # (*x_free, *out in b's order)
    n_free = len(x_free)
    perm = list(range(n_free)) + [n_free + lay.out_axes.index(w) for w in sorted(lay.out_axes)]
    ctx.record(lora, "ragged_dot_general", True)
    return [base + lax.transpose(v, tuple(perm)).astype(base.dtype)]


def _conv(ctx: Context, eqn, invals):
    x, lora = invals
    grouped = _param(eqn, "feature_group_count") != 1 or _param(eqn, "batch_group_count") != 1
    if isinstance(x, Lora) or grouped:
        return _fallback(ctx, eqn, invals)
    lhs_spec, rhs_spec, out_spec = _param(eqn, "dimension_numbers")
    out_dim, in_dim, *spatial = rhs_spec
    lay = lora.layout
    if lay.stack_axes or lay.out_axes != (out_dim,) or set(lay.in_axes) != {in_dim, *spatial}:
        raise _layout_error(lora, "conv_general_dilated", (in_dim, *spatial))
    base = _bind_base(eqn, [x, lora.w])[0]
    dt = lora.w.dtype
    # a as a conv kernel in W's layout: W's output-feature axis carries the rank.
    src = {w: i for i, w in enumerate(lay.in_axes)} | {out_dim: len(lay.in_axes)}
    a_kernel = lax.transpose(lora.a.astype(dt), tuple(src[i] for i in range(lora.w.ndim)))
    u = _bind(eqn, [lora.drop(x), a_kernel])[0]
    feat = out_spec[1]
    u = lora.nonlinear(u) * jnp.asarray(lora.scale).astype(u.dtype)
    v = lax.dot_general(u, lora.b.astype(dt), (((feat,), (0,)), ((), ())),
                        precision=_param(eqn, "precision"),
                        preferred_element_type=_param(eqn, "preferred_element_type"))
    out = base + jnp.moveaxis(v, -1, feat).astype(base.dtype)
    factor = lora.dora_factor()
    if factor is not None:
        shape = [1] * out.ndim
        shape[feat] = factor.shape[0]
        out = (out * factor.reshape(shape).astype(out.dtype)).astype(base.dtype)
    ctx.record(lora, "conv_general_dilated", True)
    return [out]


def _row_lookup(eqn, invals) -> bool:
    """Whether this gather looks up whole rows of a 2-D table (an embedding lookup) we can factor."""
    lora, idx = invals
    dn = _param(eqn, "dimension_numbers")
    lay = lora.layout
    return not (
        isinstance(idx, Lora) or lora.w.ndim != 2 or lay.in_axes != (0,) or lay.stack_axes
        or lora.m is not None
        or tuple(dn.collapsed_slice_dims) != (0,) or tuple(dn.start_index_map) != (0,)
        or dn.operand_batching_dims or tuple(_param(eqn, "slice_sizes")) != (1, lora.w.shape[1])
    )


def _gather(ctx: Context, eqn, invals):
    if not _row_lookup(eqn, invals):
        return _fallback(ctx, eqn, invals)
    lora, idx = invals
    dn = _param(eqn, "dimension_numbers")
    base = _bind_base(eqn, [lora.w, idx])[0]
    dt = lora.w.dtype
    rank = lora.a.shape[-1]
    u = _bind(eqn, [lora.a.astype(dt), idx], slice_sizes=(1, rank))[0]
    feat = dn.offset_dims[0]
    # No dropout on a lookup (as PEFT's embedding layer): x is one-hot.
    u = lora.nonlinear(u) * jnp.asarray(lora.scale).astype(u.dtype)
    v = lax.dot_general(u, lora.b.astype(dt), (((feat,), (0,)), ((), ())))
    v = jnp.moveaxis(v, -1, feat)
    ctx.record(lora, "gather", True)
    return [base + v.astype(base.dtype)]


# ------------------------------------------------------------ ops that move W


def _transpose(ctx: Context, eqn, invals):
    (lora,) = invals
    perm = _param(eqn, "permutation")
    new = {old: i for i, old in enumerate(perm)}
    lay = lora.layout
    layout = Layout(tuple(new[i] for i in lay.in_axes), tuple(new[i] for i in lay.out_axes),
                    tuple(new[i] for i in lay.stack_axes))
    return [dataclasses.replace(lora, w=_bind(eqn, [lora.weight()])[0], layout=layout)]


def _same_axes(ctx: Context, eqn, invals):
    """Ops that change W's values or placement but not its axes (dtype, copy, sharding)."""
    lora, *rest = invals
    if any(isinstance(x, Lora) for x in rest):
        return _fallback(ctx, eqn, invals)
    if isinstance(lora.w, QArray) and eqn.primitive.name == "convert_element_type":
        return [dataclasses.replace(lora, w=lora.w.astype(_param(eqn, "new_dtype")))]
    if isinstance(lora.w, QArray) and eqn.primitive.name in ("copy", "copy_p"):
        return [lora]
    return [dataclasses.replace(lora, w=_bind(eqn, [lora.weight(), *rest])[0])]


def _reshape(ctx: Context, eqn, invals):
    """Merge or split axes within the input side or within the output side: the factors follow.

    ``a``'s input axes (in W's order) are reshaped like W's, and so are ``b``'s output
    axes; a reshape that mixes input with output or stack axes, or changes a stack
    axis, has no factored form and falls back.
    """
    lora = invals[0]
    if len(invals) != 1 or isinstance(lora.w, QArray):
        return _fallback(ctx, eqn, invals)
    lay = lora.layout
    old, new = lora.w.shape, eqn.outvars[0].aval.shape
    role = {**{w: "stack" for w in lay.stack_axes}, **{w: "in" for w in lay.in_axes},
            **{w: "out" for w in lay.out_axes}}
    new_role = {}
    for run_old, run_new in reshape_runs(old, new):
        roles = {role[w] for w in run_old}
        if len(roles) != 1:
            return _fallback(ctx, eqn, invals)  # an added axis, or input mixed with output or stack axes
        (kind,) = roles
        if kind == "stack" and (len(run_old), len(run_new)) != (1, 1):
            return _fallback(ctx, eqn, invals)  # a layer axis merged, split or dropped
        new_role.update({w: kind for w in run_new})
    if list(lay.stack_axes) != sorted(lay.stack_axes):
        return _fallback(ctx, eqn, invals)
    n_stack = len(lay.stack_axes)
    new_in = tuple(w for w in range(len(new)) if new_role[w] == "in")
    new_out = tuple(w for w in range(len(new)) if new_role[w] == "out")
    new_stack = tuple(w for w in range(len(new)) if new_role[w] == "stack")
    if len(new_stack) != n_stack or not new_in or not new_out:
        return _fallback(ctx, eqn, invals)
    n_lead = lora.lead + n_stack  # a bank's K (per example) rides along in front of the stack axes
    lead_shape = lora.a.shape[:n_lead]
    rank = lora.a.shape[-1]
    # a: (*lead, *in in layout order, r) -> in axes in W's order -> the new in shape.
    in_order = (n_lead + lay.in_axes.index(w) for w in sorted(lay.in_axes))
    a = lax.transpose(lora.a, (*range(n_lead), *in_order, lora.a.ndim - 1))
    a = a.reshape(*lead_shape, *(new[w] for w in new_in), rank)
    b = lax.transpose(lora.b, (*range(n_lead + 1),
                               *(n_lead + 1 + lay.out_axes.index(w) for w in sorted(lay.out_axes))))
    b = b.reshape(*lead_shape, rank, *(new[w] for w in new_out))
    m = None if lora.m is None else lax.transpose(
        lora.m, (*range(n_stack), *(n_stack + lay.out_axes.index(w) for w in sorted(lay.out_axes)))
    ).reshape(*lora.m.shape[:n_stack], *(new[w] for w in new_out))
    w = _bind(eqn, [lora.w])[0]
    return [dataclasses.replace(lora, w=w, a=a, b=b, m=m, layout=Layout(new_in, new_out, new_stack))]


def _drop_axes(layout: Layout, dropped: Sequence[int]) -> Layout:
    def shift(axes):
        return tuple(a - sum(d < a for d in dropped) for a in axes if a not in dropped)

    return Layout(shift(layout.in_axes), shift(layout.out_axes), shift(layout.stack_axes))


def _stack_index(lora: Lora, axis: int) -> int:
    return lora.layout.stack_axes.index(axis)


def _slice_stack(ctx: Context, eqn, invals, starts, sizes):
    """Narrow W along stack axes only; a and b are narrowed the same way."""
    lora = invals[0]
    lay = lora.layout
    changed = [i for i, n in enumerate(sizes) if n != lora.w.shape[i]]
    if not set(changed) <= set(lay.stack_axes):
        return _fallback(ctx, eqn, invals)
    ns = len(lay.stack_axes)
    if isinstance(lora.w, QArray):  # its children lead with W's stack axes: narrow each the same way
        w = jax.tree.map(lambda c: lax.dynamic_slice(c, [*starts[:ns]] + [0] * (c.ndim - ns),
                                                     [*sizes[:ns], *c.shape[ns:]]), lora.w)
    else:
        w = _bind(eqn, [lora.w, *invals[1:]])[0]

    def narrow(f, lead):  # f: (*lead, *stack, ...), its lead axes (a bank's K) whole
        if f is None:
            return None
        f_starts = [0] * lead + [starts[w_ax] for w_ax in lay.stack_axes] + [0] * (f.ndim - lead - ns)
        f_sizes = [*f.shape[:lead], *(sizes[w_ax] for w_ax in lay.stack_axes), *f.shape[lead + ns:]]
        return lax.dynamic_slice(f, f_starts, f_sizes)

    key = lora.key
    if key is not None:  # each layer picked out of a stack draws its own dropout mask
        for w_ax in lay.stack_axes:
            key = jax.random.fold_in(key, starts[w_ax])
    return [dataclasses.replace(lora, w=w, a=narrow(lora.a, lora.lead), b=narrow(lora.b, lora.lead),
                                m=narrow(lora.m, 0), key=key)]


def _slice(ctx: Context, eqn, invals):
    p = eqn.params
    if p.get("strides") not in (None, (1,) * invals[0].w.ndim):
        return _fallback(ctx, eqn, invals)
    sizes = [hi - lo for lo, hi in zip(_param(eqn, "start_indices"), _param(eqn, "limit_indices"),
                                       strict=True)]
    return _slice_stack(ctx, eqn, invals, list(_param(eqn, "start_indices")), sizes)


def _dynamic_slice(ctx: Context, eqn, invals):
    lora, *idx = invals
    if any(isinstance(i, Lora) for i in idx) or len(idx) != lora.w.ndim:
        return _fallback(ctx, eqn, invals)
    return _slice_stack(ctx, eqn, invals, idx, list(_param(eqn, "slice_sizes")))


def _squeeze(ctx: Context, eqn, invals):
    (lora,) = invals
    dims = tuple(d % lora.w.ndim for d in _param(eqn, "dimensions"))
    if not set(dims) <= set(lora.layout.stack_axes):
        return _fallback(ctx, eqn, invals)
    mdims = tuple(_stack_index(lora, d) for d in dims)  # DoRA's m: (*stack, *out)
    fdims = tuple(lora.lead + d for d in mdims)  # a and b: past a bank's K
    # A QArray's children lead with W's stack axes, in W's order: squeeze the same positions.
    if isinstance(lora.w, QArray):
        w = jax.tree.map(lambda c: lax.squeeze(c, dims), lora.w)
    else:
        w = _bind(eqn, [lora.w])[0]
    return [dataclasses.replace(
        lora, w=w, a=lax.squeeze(lora.a, fdims), b=lax.squeeze(lora.b, fdims),
        m=None if lora.m is None else lax.squeeze(lora.m, mdims), layout=_drop_axes(lora.layout, dims),
    )]


# ------------------------------------------------------------ control flow


def _pjit(ctx: Context, eqn, invals):
    closed = _param(eqn, "jaxpr")
    return eval_jaxpr(ctx, closed.jaxpr, closed.consts, invals)


def _shard_map(ctx: Context, eqn, invals):
    """``shard_map`` rebuilt around a rewritten body: each adapted kernel enters as its factors.

    ``a`` and ``b`` are split the way W is split along the axes they share with it (the
    rank axis whole), so inside the body every shard sees the factors of its own block
    of W and the branch is computed per shard like ``x·W``. DoRA's norm needs whole
    columns, a quantized W and per-example adapters are not carried in: those kernels
    enter merged, as any op without a rule.
    """
    if any(isinstance(x, Lora) and (x.m is not None or isinstance(x.w, QArray)) for x in invals):
        return _fallback(ctx, eqn, invals)
    args, specs = [], []
    for x, spec in zip(invals, _param(eqn, "in_specs"), strict=True):
        if isinstance(x, Lora):  # a spec per field, in a Lora of the same structure
            x = dataclasses.replace(x, scale=jnp.asarray(x.scale))
            a_spec, b_spec, _ = (PartitionSpec(*e) for e in x.layout.factor_specs(spec, x.w.ndim))
            whole = PartitionSpec()
            spec = dataclasses.replace(x, w=spec, a=a_spec, b=b_spec, scale=whole,
                                       key=None if x.key is None else whole)
        args.append(x)
        specs.append(spec)
    jaxpr = _param(eqn, "jaxpr")

    def body(*vals):
        return tuple(_plain(o) for o in eval_jaxpr(ctx, jaxpr, getattr(jaxpr, "consts", ()), list(vals)))

    out = jax.shard_map(body, mesh=_param(eqn, "mesh"), in_specs=tuple(specs),
                        out_specs=tuple(_param(eqn, "out_specs")),
                        axis_names=_param(eqn, "newly_manual_axes"),
                        check_vma=_param(eqn, "check_vma"))(*args)
    return list(out)


def _custom_jvp(ctx: Context, eqn, invals):
    # Inlined: the custom derivative rule is dropped for this call, the primal is kept.
    closed = _param(eqn, "call_jaxpr")
    return eval_jaxpr(ctx, closed.jaxpr, closed.consts, invals)


def _checkpoint(ctx: Context, eqn, invals):
    jaxpr = _param(eqn, "jaxpr")

    def body(*vals):
        # Flax's lifted remat hands the variables back out: kernels leave as factors too.
        return eval_jaxpr(ctx, jaxpr, (), list(vals))

    return jax.checkpoint(body, prevent_cse=_param(eqn, "prevent_cse"), policy=_param(eqn, "policy"))(*invals)


def _scan(ctx: Context, eqn, invals):
    nc, ncarry = _scan_counts(eqn)
    consts, carry, xs = invals[:nc], invals[nc:nc + ncarry], invals[nc + ncarry:]
    carry = [_plain(c) for c in carry]  # a kernel in the loop carry is rare: merge it
    for c in invals[nc:nc + ncarry]:
        if isinstance(c, Lora):
            ctx.record(c, "scan carry", False)
    xs_in = []
    for x in xs:
        if isinstance(x, Lora):
            if 0 not in x.layout.stack_axes:
                raise _layout_error(x, "scan (slicing axis 0 per step)", x.layout.in_axes)
            j = _stack_index(x, 0)
            n = x.w.shape[0]
            # Every array leads with the layer axis, so scan slices one layer per step; the
            # layout is already the step's: W without axis 0, a and b without their stack axis.
            # A bank's K (after the layer axis) and the examples' index are whole at every step.
            x = dataclasses.replace(
                x, a=jnp.moveaxis(x.a, x.lead + j, 0), b=jnp.moveaxis(x.b, x.lead + j, 0),
                scale=jnp.broadcast_to(jnp.asarray(x.scale), (n,)),
                m=None if x.m is None else jnp.moveaxis(x.m, j, 0),
                key=None if x.key is None else jax.random.split(x.key, n),
                index=None if x.index is None else jnp.broadcast_to(x.index, (n, *x.index.shape)),
                layout=_drop_axes(x.layout, (0,)),
            )
        xs_in.append(x)
    closed = _param(eqn, "jaxpr")

    def body(carry_vals, x_vals):
        outs = eval_jaxpr(ctx, closed.jaxpr, closed.consts, [*consts, *carry_vals, *x_vals])
        ys = _leaving(ctx, eqn.outvars[ncarry:], closed.jaxpr.outvars[ncarry:], outs[ncarry:])
        return [_plain(o) for o in outs[:ncarry]], ys

    carry_out, ys = lax.scan(body, list(carry), xs_in, length=_param(eqn, "length"),
                             reverse=_param(eqn, "reverse"), unroll=_param(eqn, "unroll"))
    return [*carry_out, *ys]


def _cond(ctx: Context, eqn, invals):
    index, *ops = invals

    def branch(closed):
        return lambda *vals: _leaving(ctx, eqn.outvars, closed.jaxpr.outvars,
                                      eval_jaxpr(ctx, closed.jaxpr, closed.consts, list(vals)))

    return lax.switch(_plain(index), [branch(b) for b in _param(eqn, "branches")], *ops)


def _while(ctx: Context, eqn, invals):
    cn, bn = _param(eqn, "cond_nconsts"), _param(eqn, "body_nconsts")
    cconsts, bconsts, init = invals[:cn], invals[cn:cn + bn], invals[cn + bn:]
    for c in init:
        if isinstance(c, Lora):
            ctx.record(c, "while carry", False)
    init = [_plain(c) for c in init]
    cj, bj = _param(eqn, "cond_jaxpr"), _param(eqn, "body_jaxpr")

    def cond_fn(carry):
        return eval_jaxpr(ctx, cj.jaxpr, cj.consts, [*cconsts, *carry])[0]

    def body_fn(carry):
        return [_plain(o) for o in eval_jaxpr(ctx, bj.jaxpr, bj.consts, [*bconsts, *carry])]

    return lax.while_loop(cond_fn, body_fn, init)


# ------------------------------------------------- per-example adapters (a bank)


def _per_example(lora: Lora):
    """Each example's factors ``(B, ...)``, and its gate ``(B,)`` float32 that multiplies its branch.

    The gate is 1 for an adapter of the bank, 0 for index -1 (the base alone) and NaN for an
    index outside ``-1..K-1`` (only a traced index gets here; `LoraApply` refuses concrete
    ones): that example's output becomes NaN, never another adapter's.
    """
    k = lora.a.shape[0]
    sel = jnp.clip(lora.index, 0, k - 1)
    valid = (lora.index >= -1) & (lora.index < k)
    gate = jnp.where(valid, (lora.index >= 0).astype(jnp.float32), jnp.float32(jnp.nan))
    return jnp.take(lora.a, sel, axis=0), jnp.take(lora.b, sel, axis=0), gate


def _gated(lora: Lora, u, gate, axis: int = 0):
    """``f(u)`` times the scale and each example's gate, ``u``'s batch on ``axis``."""
    shape = [1] * u.ndim
    shape[axis] = -1
    return lora.nonlinear(u) * (gate.astype(u.dtype) * jnp.asarray(lora.scale).astype(u.dtype)).reshape(shape)


def _stacked_use(lora: Lora, op: str) -> ValueError:
    return ValueError(
        f"{lora.path}: per-example adapters (lora_index) reach this '{op}' with the kernel's stack axes "
        f"{lora.layout.stack_axes} still in place (layers or experts applied side by side, batched or "
        "broadcast over the input, as in a mixture of experts), so each slice would need its own "
        "adapter per example. Serve this bank with lora_weights, exclude the kernel from the bank's "
        "targets, or apply the layers one at a time (nn.scan, nnx.scan, w[i])."
    )


def _per_example_dot_general(ctx: Context, eqn, invals):
    """``x[n]·W + s·f(x[n]·a_i)·b_i`` with ``i = index[n]``, for ``x·W`` or ``W·x`` with x's batch first.

    A transposed use (contracting W's output axes: a tied embedding head, ``x·Wᵀ``) swaps
    the factors' roles as `_dot_general` does: ``x[n]·Wᵀ + s·(x[n]·b_iᵀ)·a_iᵀ``, for the
    identity nonlinearity only.
    """
    lhs, rhs = invals
    if isinstance(lhs, Lora) and isinstance(rhs, Lora):
        return _fallback(ctx, eqn, invals)
    (lc, rc), (lb, rb) = _param(eqn, "dimension_numbers")
    w_is_rhs = isinstance(rhs, Lora)
    lora, x = (rhs, lhs) if w_is_rhs else (lhs, rhs)
    xc, wc, xb = (lc, rc, lb) if w_is_rhs else (rc, lc, rb)
    lay = lora.layout
    if lay.stack_axes:
        raise _stacked_use(lora, "dot_general")
    forward = set(wc) == set(lay.in_axes)
    if xb or 0 in xc or x.shape[0] != lora.index.shape[0] or not (forward or set(wc) == set(lay.out_axes)):
        raise ValueError(
            f"{lora.path}: per-example adapters need x·W (or x·Wᵀ) with the batch as axis 0 of x, "
            f"uncontracted and not batched, and W's input (or output) axes contracted; got x of shape "
            f"{x.shape} (contracting {tuple(xc)}, batching {tuple(xb)}), kernel axes {tuple(wc)} "
            f"contracted (input {lay.in_axes}, output {lay.out_axes}), {lora.index.shape[0]} adapter "
            "indices. Serve this bank with lora_weights, or exclude the kernel from the bank's targets."
        )
    if not forward and lora.f != "identity":
        raise ValueError(f"{lora.path}: this dot_general uses the kernel transposed (contracting its output "
                         f"axes, as a tied embedding head does) and the bank's nonlinearity is {lora.f!r}; "
                         f"{reason('nonlinearity', 'transposed')}")
    base = _bind_base(eqn, [x, lora.w] if w_is_rhs else [lora.w, x])[0]
    ctx.record(lora, "dot_general", True)
    return [base + _per_example_dot(lora, x, xc, wc, forward, w_is_rhs, eqn.params).astype(base.dtype)]


def _per_example_dot(lora: Lora, x, xc, wc, forward: bool, w_is_rhs: bool, params):
    """The branch of each example with its own factors: two products batched over the examples.

    Laid out as dot_general lays out ``x·W`` (or ``W·x``): x's free axes, then W's free
    axes ascending (the other way round when W is the left operand).
    """
    lay = lora.layout
    dt = lora.w.dtype
    a_sel, b_sel, on = _per_example(lora)  # (B, *in, r), (B, r, *out)
    a_side = (a_sel, {w: 1 + i for i, w in enumerate(lay.in_axes)}, a_sel.ndim - 1)
    b_side = (b_sel, {w: 2 + i for i, w in enumerate(lay.out_axes)}, 1)
    (f_arr, f_map, _), (s_arr, _, s_r) = (a_side, b_side) if forward else (b_side, a_side)
    free = lay.out_axes if forward else lay.in_axes  # W's axes left in the output, in factor order
    precision = params.get("precision")
    contract = (tuple(xc), tuple(f_map[w] for w in wc))
    u = lax.dot_general(lora.drop(x), f_arr.astype(dt), (contract, ((0,), (0,))),
                        precision=precision)  # (B, *x_free, r)
    u = _gated(lora, u, on)
    v = lax.dot_general(u, s_arr.astype(dt), (((u.ndim - 1,), (s_r,)), ((0,), (0,))),
                        precision=precision)  # (B, *x_free, *free)
    n_x = v.ndim - len(free)
    w_free = [n_x + free.index(w) for w in sorted(free)]
    x_free = list(range(n_x))
    return lax.transpose(v, tuple(x_free + w_free if w_is_rhs else w_free + x_free))


def _per_example_conv(ctx: Context, eqn, invals):
    """``conv(x[n], W) + s·f(conv(x[n], a_i))·b_i`` with ``i = index[n]``, ``a_i`` a conv with W's window.

    Each example is convolved with its own ``a_i`` by ``jax.vmap`` over the batch, which
    XLA runs as one grouped convolution (one group per example, the batch folded into the
    feature axis): the same FLOPs as one adapter's branch for the whole batch, whatever
    the bank's size K, plus a relayout of x. Then ``b_i`` is a batched 1x1 product.
    """
    x, lora = invals
    if isinstance(x, Lora):
        return _fallback(ctx, eqn, invals)
    lhs_spec, rhs_spec, out_spec = _param(eqn, "dimension_numbers")
    groups = _param(eqn, "feature_group_count"), _param(eqn, "batch_group_count")
    if groups != (1, 1) or x.shape[lhs_spec[0]] != lora.index.shape[0]:
        raise ValueError(
            f"{lora.path}: per-example adapters need an ungrouped convolution of an input whose batch axis "
            f"holds one example per adapter index (got x of shape {x.shape} with its batch on axis "
            f"{lhs_spec[0]}, feature_group_count={groups[0]}, batch_group_count={groups[1]}, "
            f"{lora.index.shape[0]} adapter indices). Serve this bank with lora_weights, or exclude the "
            "kernel from the bank's targets."
        )
    out_dim, in_dim, *spatial = rhs_spec
    lay = lora.layout
    if lay.stack_axes:
        raise _stacked_use(lora, "conv_general_dilated")
    if lay.out_axes != (out_dim,) or set(lay.in_axes) != {in_dim, *spatial}:
        raise _layout_error(lora, "conv_general_dilated", (in_dim, *spatial))
    base = _bind_base(eqn, [x, lora.w])[0]
    dt = lora.w.dtype
    a_sel, b_sel, on = _per_example(lora)  # (B, *in, r), (B, r, out)
    src = {w: i for i, w in enumerate(lay.in_axes)} | {out_dim: len(lay.in_axes)}
    to_kernel = tuple(src[i] for i in range(lora.w.ndim))  # a as W's layout, the rank on W's out axis
    x_batch, batch, feat = lhs_spec[0], out_spec[0], out_spec[1]

    def branch(x_n, a_n):  # one example, as a batch of one, and its adapter's a
        u = _bind(eqn, [jnp.expand_dims(x_n, x_batch), lax.transpose(a_n.astype(dt), to_kernel)])[0]
        return lax.squeeze(u, (batch,))

    u = jax.vmap(branch, in_axes=(x_batch, 0), out_axes=batch)(lora.drop(x), a_sel)
    u = jnp.moveaxis(_gated(lora, u, on, batch), (batch, feat), (0, -1))  # (B, *spatial, r)
    v = lax.dot_general(u, b_sel.astype(dt), (((u.ndim - 1,), (1,)), ((0,), (0,))),
                        precision=_param(eqn, "precision"))
    ctx.record(lora, "conv_general_dilated", True)
    return [base + jnp.moveaxis(v, (0, v.ndim - 1), (batch, feat)).astype(base.dtype)]


def _per_example_gather(ctx: Context, eqn, invals):
    """``W[t] + s·f(a_i[t])·b_i`` for the token ids ``t`` of example ``n``, ``i = index[n]``."""
    if not _row_lookup(eqn, invals):
        return _fallback(ctx, eqn, invals)
    lora, idx = invals
    if idx.shape[-1] != 1 or idx.shape[0] != lora.index.shape[0]:
        raise ValueError(f"{lora.path}: per-example adapters need the batch as axis 0 of the token ids "
                         f"(got ids of shape {idx.shape}, {lora.index.shape[0]} adapter indices).")
    base = _bind_base(eqn, [lora.w, idx])[0]
    dt = lora.w.dtype
    a_sel, b_sel, on = _per_example(lora)
    u = jax.vmap(lambda a, t: jnp.take(a, t, axis=0))(a_sel.astype(dt), idx[..., 0])  # (B, ..., r)
    v = jax.vmap(jnp.matmul)(_gated(lora, u, on), b_sel.astype(dt))
    ctx.record(lora, "gather", True)
    return [base + jnp.moveaxis(v, -1, _param(eqn, "dimension_numbers").offset_dims[0]).astype(base.dtype)]


_RULES: dict[str, Callable] = {
    "dot_general": _dot_general,
    "ragged_dot_general": _ragged_dot,
    "conv_general_dilated": _conv,
    "reshape": _reshape,
    "gather": _gather,
    "transpose": _transpose,
    "convert_element_type": _same_axes,
    "copy": _same_axes,
    "copy_p": _same_axes,
    "sharding_constraint": _same_axes,
    "slice": _slice,
    "dynamic_slice": _dynamic_slice,
    "squeeze": _squeeze,
    "pjit": _pjit,
    "jit": _pjit,
    "closed_call": _pjit,
    "custom_jvp_call": _custom_jvp,
    "shard_map": _shard_map,
    "checkpoint": _checkpoint,
    "remat": _checkpoint,
    "remat2": _checkpoint,
    "scan": _scan,
    "cond": _cond,
    "while": _while,
}

# A kernel carrying per-example adapters: the ops that move W move them too; the consuming ops
# with a per-example form use it; every other op falls back, and the fallback refuses (a merged
# weight is one adapter for the whole batch).
_PER_EXAMPLE_RULES: dict[str, Callable] = {
    **_RULES,
    "dot_general": _per_example_dot_general,
    "gather": _per_example_gather,
    "conv_general_dilated": _per_example_conv,
    "ragged_dot_general": _fallback,
    "shard_map": _fallback,
}
