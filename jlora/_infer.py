"""Read every adapted kernel's layout off the model's own computation.

Which axes of a kernel are its input, output, layer-stack or expert axes is a fact of
the ops that consume it, not of its name or shape. `analyse` follows each kernel
through a jaxpr, symbolically (nothing is computed): through transposes, dtype
casts, reshapes that merge or split axes, slices that pick a layer or an expert,
``scan`` (the scanned axis is a layer axis), and into the bodies of ``jit``,
``remat``, ``cond``, ``while``, ``custom_jvp``/``custom_vjp`` and ``shard_map``. At
each consuming op it records which kernel axes the op contracts, which it batches
over, and which it leaves free:

* ``dot_general`` (Dense, einsum): contracted axes are the input, batch axes are
  experts (or layers), the rest the output; contracting the output axes instead is
  a transposed use (a tied embedding head);
* ``ragged_dot_general`` (MoE experts by group): the group axis is an expert axis;
* ``conv_general_dilated``: input features and the window are the input;
* ``gather`` of whole rows (an embedding lookup): the looked-up axis is the input.

`derive` turns a kernel's uses into a `Layout`; `infer_layouts` writes them into a
config; `check` compares a config's layouts with the uses (what `wrap` does on every
trace, so a wrong split is an error and never a silent swap of ``a`` and ``b``).
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Sequence

from jax.extend.core import Literal

from jlora._config import LoraConfig, Rule
from jlora._layout import Layout, LayoutError, reshape_runs
from jlora._paths import leaf_paths
from jlora._plan import Plan
from jlora._primitives import param, scan_counts
from jlora._trace import split, trace

Axes = frozenset  # of kernel axis numbers


@dataclasses.dataclass(frozen=True)
class View:
    """A value derived from one kernel: the kernel axes each of its axes carries."""

    path: str
    axes: tuple[Axes, ...]
    peeled: Axes = Axes()  # kernel axes sliced away on the way here (scanned over, indexed)


@dataclasses.dataclass(frozen=True)
class KernelUse:
    """One op that consumes a kernel, in kernel axes."""

    kind: str  # "dot", "ragged", "conv", "gather" or "other"
    primitive: str
    contracted: Axes = Axes()
    batch: Axes = Axes()  # batch axes of dot_general, group axes of ragged_dot
    free: Axes = Axes()
    peeled: Axes = Axes()

    @property
    def stacked(self) -> Axes:
        """Kernel axes this use takes one slice of at a time: layers and experts."""
        return self.peeled | self.batch

    def describe(self) -> str:
        if self.kind == "other":
            return f"{self.primitive} (no factored rule; the merged weight is used)"
        words = f"{self.primitive} contracts {_fmt(self.contracted)}"
        if self.stacked:
            words += f" one slice of {_fmt(self.stacked)} at a time"
        return words


def _fmt(axes) -> str:
    return "axes (" + ", ".join(str(a) for a in sorted(axes)) + (",)" if len(axes) == 1 else ")")


def _union(sets) -> Axes:
    out = Axes()
    for s in sets:
        out |= s
    return out


def _open(jaxpr):
    """The open jaxpr of a ClosedJaxpr (jax <= 0.10) or of a jaxpr that holds its consts (>= 0.11)."""
    inner = getattr(jaxpr, "jaxpr", jaxpr)
    return jaxpr if inner is jaxpr else inner


# ------------------------------------------------------------------ the walk

_SAME_AXES = {
    "convert_element_type", "copy", "copy_p", "sharding_constraint", "reduce_precision", "pvary", "reshard",
    "mesh_cast", "device_put", "optimization_barrier", "stop_gradient",
}
_CALLS = {"pjit": "jaxpr", "jit": "jaxpr", "closed_call": "jaxpr", "core_call": "jaxpr",
          "checkpoint": "jaxpr", "remat": "jaxpr", "remat2": "jaxpr", "shard_map": "jaxpr",
          "custom_jvp_call": "call_jaxpr", "custom_vjp_call": "call_jaxpr",
          "custom_vjp_call_jaxpr": "fun_jaxpr"}


def analyse(jaxpr, views: dict) -> dict[str, list[KernelUse]]:
    """``{path: [KernelUse, ...]}`` for the kernels ``views`` (``{invar: View}``) names."""
    uses: dict[str, list[KernelUse]] = {v.path: [] for v in views.values()}
    _walk(_open(jaxpr), dict(views), uses)
    return uses


def _walk(jaxpr, env: dict, uses: dict) -> list:
    def read(v):
        return None if isinstance(v, Literal) else env.get(v)

    for eqn in jaxpr.eqns:
        invals = [read(v) for v in eqn.invars]
        if not any(invals):
            continue
        outs = _step(eqn, invals, uses)
        for v, out in zip(eqn.outvars, outs, strict=True):
            if out is not None:
                env[v] = out
    return [read(v) for v in jaxpr.outvars]


def _record(uses, view: View, use: KernelUse) -> None:
    uses[view.path].append(use)


def _other(eqn, invals, uses) -> list:
    for x in invals:
        if x is not None:
            _record(uses, x, KernelUse("other", eqn.primitive.name, peeled=x.peeled))
    return [None] * len(eqn.outvars)


def _step(eqn, invals: list, uses) -> list:
    name = eqn.primitive.name
    p = eqn.params
    x = invals[0]
    if name in _SAME_AXES and len(invals) == len(eqn.outvars):
        return list(invals)
    if name == "transpose" and x is not None:
        return [dataclasses.replace(x, axes=tuple(x.axes[i] for i in param(eqn, "permutation")))]
    if name == "reshape" and x is not None and len(invals) == 1:
        return [_reshape(x, eqn.invars[0].aval.shape, eqn.outvars[0].aval.shape)]
    if name == "squeeze" and x is not None:
        dims = {d % len(x.axes) for d in param(eqn, "dimensions")}
        kept = tuple(a for i, a in enumerate(x.axes) if i not in dims)
        return [View(x.path, kept, x.peeled | _union(x.axes[d] for d in dims))]
    if name == "broadcast_in_dim" and x is not None and len(invals) == 1:
        return [_broadcast(x, eqn, uses)]
    if name in ("slice", "dynamic_slice") and x is not None and not any(invals[1:]):
        return [_slice(x, eqn, uses)]
    if name == "dot_general":
        return [_dot(eqn, invals, uses)]
    if name == "ragged_dot_general":
        return [_ragged(eqn, invals, uses)]
    if name == "conv_general_dilated":
        return [_conv(eqn, invals, uses)]
    if name == "gather" and x is not None and not any(invals[1:]):
        return [_gather(x, eqn, uses)]
    if name in _CALLS and _CALLS[name] in p:
        body = _open(param(eqn, _CALLS[name]))
        return _walk(body, dict(zip(body.invars, invals, strict=False)), uses)
    if name == "scan":
        return _scan(eqn, invals, uses)
    if name == "while":
        return _while(eqn, invals, uses)
    if name == "cond":
        for branch in param(eqn, "branches"):
            _walk(_open(branch), dict(zip(_open(branch).invars, invals[1:], strict=True)), uses)
        return [None] * len(eqn.outvars)
    return _other(eqn, invals, uses)


def _reshape(x: View, old: Sequence[int], new: Sequence[int]) -> View:
    """Each new axis carries the kernel axes of the old axes it is made of."""
    out, peeled = [Axes()] * len(new), x.peeled
    for run_old, run_new in reshape_runs(old, new):
        carried = _union(x.axes[k] for k in run_old)
        if not run_new:
            peeled |= carried  # a size-1 axis dropped: a layer or expert picked out before
        for j in run_new:
            out[j] = carried
    return View(x.path, tuple(out), peeled)


def _broadcast(x: View, eqn, uses) -> View | None:
    shape, dims = param(eqn, "shape"), param(eqn, "broadcast_dimensions")
    in_shape = eqn.invars[0].aval.shape
    if any(shape[d] != n for d, n in zip(dims, in_shape, strict=True)):
        _other(eqn, [x], uses)  # a real broadcast of the kernel's values
        return None
    axes = [Axes()] * len(shape)
    for i, d in enumerate(dims):
        axes[d] = x.axes[i]
    return View(x.path, tuple(axes), x.peeled)


def _slice(x: View, eqn, uses) -> View | None:
    in_shape, out_shape = eqn.invars[0].aval.shape, eqn.outvars[0].aval.shape
    axes, peeled = list(x.axes), x.peeled
    for i, (n_in, n_out) in enumerate(zip(in_shape, out_shape, strict=True)):
        if n_in == n_out:
            continue
        if n_out != 1:
            _other(eqn, [x], uses)  # a part of a kernel axis: no layout holds it
            return None
        peeled |= axes[i]
        axes[i] = Axes()
    return View(x.path, tuple(axes), peeled)


def _classify(kind: str, name: str, view: View, contracting, batch) -> KernelUse:
    rest = [i for i in range(len(view.axes)) if i not in contracting and i not in batch]
    def axes(positions):
        return _union(view.axes[i] for i in positions)

    return KernelUse(kind, name, axes(contracting), axes(batch), axes(rest), view.peeled)


def _dot(eqn, invals, uses) -> None:
    (lc, rc), (lb, rb) = param(eqn, "dimension_numbers")
    lhs, rhs = invals[:2]
    if (lhs is None) == (rhs is None) or any(invals[2:]):  # no kernel, or two: no factored rule
        _other(eqn, invals, uses)
        return None
    view, contracting, batch = (rhs, rc, rb) if rhs is not None else (lhs, lc, lb)
    _record(uses, view, _classify("dot", "dot_general", view, contracting, batch))
    return None


def _ragged(eqn, invals, uses) -> None:
    dn = param(eqn, "ragged_dot_dimension_numbers")
    (lc, rc), (lb, rb) = dn.dot_dimension_numbers
    rhs = invals[1]
    if invals[0] is not None or rhs is None or any(invals[2:]) or not dn.rhs_group_dimensions:
        _other(eqn, invals, uses)
        return None
    _record(uses, rhs, _classify("ragged", "ragged_dot_general", rhs, rc, (*rb, *dn.rhs_group_dimensions)))
    return None


def _conv(eqn, invals, uses) -> None:
    rhs = invals[1]
    groups = param(eqn, "feature_group_count"), param(eqn, "batch_group_count")
    if invals[0] is not None or rhs is None or groups != (1, 1):
        _other(eqn, invals, uses)
        return None
    out_dim, in_dim, *spatial = param(eqn, "dimension_numbers").rhs_spec
    _record(uses, rhs, _classify("conv", "conv_general_dilated", rhs, (in_dim, *spatial), ()))
    return None


def _gather(x: View, eqn, uses) -> None:
    dn, sizes = param(eqn, "dimension_numbers"), param(eqn, "slice_sizes")
    shape = eqn.invars[0].aval.shape
    rows = tuple(dn.collapsed_slice_dims)
    whole = all(sizes[i] == shape[i] for i in range(len(shape)) if i not in rows)
    if rows and tuple(dn.start_index_map) == rows and not dn.operand_batching_dims and whole:
        _record(uses, x, _classify("gather", "gather", x, rows, ()))
    else:
        _other(eqn, [x], uses)
    return None


def _scan(eqn, invals, uses) -> list:
    n_consts, n_carry = scan_counts(eqn)
    body = _open(param(eqn, "jaxpr"))
    inner = []
    for k, x in enumerate(invals):
        if x is None:
            inner.append(None)
        elif k < n_consts:
            inner.append(x)
        elif k < n_consts + n_carry:
            _record(uses, x, KernelUse("other", "scan carry", peeled=x.peeled))
            inner.append(None)
        else:  # scanned over its leading axis: a layer of a stack per step
            inner.append(View(x.path, x.axes[1:], x.peeled | x.axes[0]))
    _walk(body, dict(zip(body.invars, inner, strict=True)), uses)
    return [None] * len(eqn.outvars)


def _while(eqn, invals, uses) -> list:
    nc, nb = param(eqn, "cond_nconsts"), param(eqn, "body_nconsts")
    for x in invals[nc + nb:]:
        if x is not None:
            _record(uses, x, KernelUse("other", "while carry", peeled=x.peeled))
    cond, body = _open(param(eqn, "cond_jaxpr")), _open(param(eqn, "body_jaxpr"))
    carry = [None] * (len(invals) - nc - nb)
    _walk(cond, dict(zip(cond.invars, [*invals[:nc], *carry], strict=True)), uses)
    _walk(body, dict(zip(body.invars, [*invals[nc:nc + nb], *carry], strict=True)), uses)
    return [None] * len(eqn.outvars)


# ------------------------------------------------------------ from uses to layouts


@dataclasses.dataclass(frozen=True)
class Derived:
    """A kernel's layout as its uses say (``layout`` None: they say nothing, or disagree: ``problem``)."""

    layout: Layout | None
    problem: str | None = None


def derive(path: str, ndim: int, uses: Sequence[KernelUse]) -> Derived:
    """The one layout every consuming use of a kernel agrees with."""
    consuming = [u for u in uses if u.kind != "other"]
    if not consuming:
        return Derived(None)
    mixed = [u for u in consuming if u.contracted & (u.free | u.stacked) or u.free & u.stacked]
    if mixed:
        return Derived(None, f"{mixed[0].describe()}, splitting a kernel axis between input and output; no "
                             "low-rank layout holds that")
    stacks = {u.stacked for u in consuming}
    if len(stacks) > 1:
        return Derived(None, "its uses take slices of different axes: "
                             + "; ".join(sorted({u.describe() for u in consuming})))
    stack = stacks.pop()
    gathered = {u.contracted for u in consuming if u.kind == "gather"}
    contracted = {u.contracted for u in consuming if u.kind != "gather"}
    if len(gathered) > 1:
        return Derived(None, "it is looked up along different axes")
    if gathered:
        in_axes = gathered.pop()  # a table: rows are its input; contracting the rest is a tied head
    elif len(contracted) == 1:
        in_axes = contracted.pop()
    else:
        rest = Axes(range(ndim)) - stack
        first, second = sorted(contracted, key=min) if len(contracted) == 2 else (None, None)
        if first is not None and first | second == rest and not first & second \
                and path.rsplit("/", 1)[-1] == "embedding":
            in_axes = first  # a table used as one-hot·W and as a tied head: rows are its input
        else:
            return Derived(None, "its uses contract different axes: "
                                 + "; ".join(sorted({u.describe() for u in consuming}))
                                 + "; adapt one of them, or give Rule(in_axes=...) for the one you mean")
    out_axes = Axes(range(ndim)) - stack - in_axes
    if not in_axes or not out_axes:
        return Derived(None, f"its uses contract {_fmt(in_axes)} of a kernel with stack {_fmt(stack)}, "
                             "leaving no input or no output axis")
    return Derived(Layout(tuple(sorted(in_axes)), tuple(sorted(out_axes)), tuple(sorted(stack))))


def _agrees(layout: Layout, use: KernelUse, forward_elsewhere: bool) -> bool:
    """Whether ``use`` is one the factored rules serve with ``layout``."""
    stack = set(layout.stack_axes)
    if use.kind == "other":
        return use.peeled <= stack
    # A dot may leave stack axes free (every layer or expert applied to one input): each keeps its adapter.
    free_stack = stack - use.stacked if use.kind == "dot" else set()
    if not use.stacked <= stack or not free_stack <= use.free or (stack - use.stacked) - free_stack:
        return False
    use = dataclasses.replace(use, free=use.free - free_stack)
    if use.contracted == set(layout.in_axes):
        return True
    # A transposed use (x·Wᵀ, contracting the output axes): a tied embedding head, served with b
    # first. Only where the kernel is also used forward; alone it means the split is swapped.
    return use.kind == "dot" and use.contracted == set(layout.out_axes) and forward_elsewhere


def check(layout: Layout, uses: Sequence[KernelUse]) -> bool:
    """Whether every use of a kernel agrees with ``layout`` (transposed uses only beside a forward one)."""
    forward = any(u.kind != "other" and u.stacked <= set(layout.stack_axes)
                  and u.contracted == set(layout.in_axes) for u in uses)
    return all(_agrees(layout, u, forward) for u in uses)


def _rule_text(layout: Layout) -> str:
    stack = f", stack_axes={layout.stack_axes}" if layout.stack_axes else ""
    return f"in_axes={layout.in_axes}{stack}"


def mismatch_error(problems: dict[str, tuple[Layout, Derived, list[KernelUse]]]) -> ValueError:
    """One error listing every kernel whose configured split disagrees with the computation."""
    lines = []
    for path, (layout, derived, uses) in problems.items():
        seen = "; ".join(sorted({u.describe() for u in uses if u.kind != "other"})) or "no factored use"
        if derived.layout is not None:
            real = f"the real split is {_rule_text(derived.layout)}"
        else:
            real = f"no single split fits: {derived.problem}"
        lines.append(f"{path}: configured {_rule_text(layout)} (out_axes={layout.out_axes}), but the model's "
                     f"{seen}; {real}")
    return LayoutError(
        f"the axis split of {len(lines)} adapted kernel(s) does not match how the model uses them "
        "(a wrong split would swap a and b, or share one adapter between layers or experts):\n  "
        + "\n  ".join(lines)
        + "\nFix every one at once by reading the splits off the model: "
        "config = jlora.infer_layouts(config, apply_fn, params, *args, **kwargs) before jlora.init, "
        "or give each kernel jlora.Rule(pattern=..., in_axes=..., stack_axes=...)."
    )


def kernel_views(params, targets) -> tuple[list[str], dict]:
    """Leaf paths of ``params`` and ``{index of the jaxpr input: View}`` for the adapted kernels."""
    paths = leaf_paths(params)
    views = {}
    for i, path in enumerate(paths):
        t = targets.get(path)
        if t is not None and t.adapted:
            views[i] = View(path, tuple(Axes({k}) for k in range(len(t.shape))))
    return paths, views


def uses_in(closed, views_by_index: dict) -> dict[str, list[KernelUse]]:
    invars = _open(closed).invars
    return analyse(closed, {invars[i]: v for i, v in views_by_index.items()})


# ------------------------------------------------------------------ public


def infer_layouts(config: LoraConfig, apply_fn, params, *args, **kwargs) -> LoraConfig:
    """``config`` with every targeted kernel's axis split read off ``apply_fn``'s computation.

    Traces ``apply_fn(params, *args, **kwargs)`` once, abstractly (no FLOPs: arrays may
    be ``jax.ShapeDtypeStruct``s), and follows each kernel the config targets to the ops
    that consume it. The axes an op contracts are the kernel's input (``a`` side), the
    axes it batches over or slices one at a time (``nn.scan``/``nnx.scan`` layers at any
    position, MoE experts of a batched einsum or ``ragged_dot``) are stack axes (one
    adapter each), the rest its output (``b`` side). A table that is looked up
    (an embedding) has its rows as input, so contracting its features too is a tied
    head. The result is an ordinary config: one `Rule` per group of kernels sharing a
    rule and a split, its pattern the escaped paths, keeping each rule's rank and
    alpha; it serialises with `LoraConfig.to_dict` and goes into checkpoints and PEFT
    exports as any config does.

    Args:
      config: which kernels to adapt (its rules' explicit ``in_axes``/``stack_axes`` are
        checked against the computation, and must agree).
      apply_fn: ``apply_fn(params, *args, **kwargs)``, as given to `jlora.wrap`.
      params: the parameters (arrays or ``jax.ShapeDtypeStruct``s; Linen variables or NNX state).
      *args, **kwargs: example inputs; array leaves are traced, the rest static.

    Returns:
      a `LoraConfig` whose every rule names its kernels and their split.

    Raises:
      ValueError: one error listing every kernel whose uses disagree with each other
        (or with an explicit rule), and `Plan.of_base`'s errors (a rule matching nothing).

    >>> import jax, jax.numpy as jnp
    >>> from jlora import LoraConfig
    >>> params = {"wo": jnp.zeros((16, 4))}  # stored (out, in), used as x @ wo.T
    >>> apply_fn = lambda p, x: x @ p["wo"].T
    >>> cfg = infer_layouts(LoraConfig(rank=2, targets="wo"), apply_fn, params, jnp.ones((3, 4)))
    >>> cfg.targets[0].in_axes, cfg.targets[0].stack_axes
    ((1,), ())
    """
    if not isinstance(config, LoraConfig):
        raise TypeError(f"infer_layouts: expected a jlora.LoraConfig, got {type(config).__name__}.")
    if not callable(apply_fn):
        raise TypeError(f"infer_layouts: apply_fn must be callable, got {type(apply_fn).__name__}.")
    targets = Plan.of_base(config, params)
    dynamic, static = split(args, kwargs)
    closed, _ = trace(apply_fn, params, dynamic, static)
    _, views = kernel_views(params, targets)
    uses = uses_in(closed, views)
    layouts, problems = {}, {}
    for path, t in targets.items():
        if not t.adapted:
            continue
        derived = derive(path, len(t.shape), uses[path])
        rule = config.rule_for(path)
        explicit = rule.in_axes is not None or rule.stack_axes
        if derived.layout is None and derived.problem is None:
            layouts[path] = t.layout  # no consuming op: keep the configured split
        elif derived.problem is not None or (explicit and not check(t.layout, uses[path])):
            problems[path] = (t.layout, derived, uses[path])
        else:
            layouts[path] = derived.layout
    if problems:
        raise mismatch_error(problems)
    return _with_layouts(config, layouts)


def _with_layouts(config: LoraConfig, layouts: dict[str, Layout]) -> LoraConfig:
    groups: dict[tuple[int, Layout], list[str]] = {}
    for path, layout in layouts.items():
        index = next(i for i, r in enumerate(config.targets) if re.fullmatch(r.pattern, path))
        groups.setdefault((index, layout), []).append(path)
    rules = tuple(
        Rule(pattern="|".join(re.escape(p) for p in paths), rank=config.targets[i].rank,
             alpha=config.targets[i].alpha,
             in_axes=layout.in_axes, stack_axes=layout.stack_axes)
        for (i, layout), paths in sorted(groups.items(), key=lambda kv: (kv[0][0], kv[1][0]))
    )
    return dataclasses.replace(config, targets=rules)


def kernel_uses(apply_fn, params, targets, args, kwargs) -> dict[str, list[KernelUse]]:
    """Every use of the adapted kernels in ``apply_fn``'s computation (for tests and `wrap`)."""
    dynamic, static = split(args, kwargs)
    closed, _ = trace(apply_fn, params, dynamic, static)
    return uses_in(closed, kernel_views(params, targets)[1])

