"""`wrap`: run any Flax apply function with the adapters added on the fly."""

from __future__ import annotations

import zlib
from collections.abc import Mapping

import jax
import jax.numpy as jnp
import numpy as np

from jlora._bank import mix, slots, weighted
from jlora._config import LoraConfig
from jlora._infer import check, derive, kernel_views, mismatch_error, uses_in
from jlora._knobs import call_factors, sample_rank
from jlora._layout import merged
from jlora._merge import interpolate, merged_leaves
from jlora._paths import adapter_of, flatten, leaf_paths, leaves, structure
from jlora._plan import Plan
from jlora._quant import dequantized
from jlora._rewrite import Context, Lora, Use, eval_jaxpr
from jlora._trace import Static as _Static
from jlora._trace import split as _split
from jlora._trace import trace
from jlora._variants import refuse

STRATEGIES = ("factored", "merge")
FALLBACKS = ("merge", "error")


def _knobs(lora_scale, lora_rank, lora_rng, lora_weights=None, lora_index=None, lora_slots=None) -> dict:
    """The runtime knobs as traced values of fixed type, so no value of them retraces.

    ``None`` stays static: no scale means the adapter as trained (leaves trained in
    full then take their trained value exactly), no rank the full rank, no key an
    evaluation call (no dropout, no DyLoRA sampling).
    """
    knobs = {}
    if lora_scale is not None:
        if np.ndim(lora_scale) != 0:
            raise ValueError(f"lora_scale must be a scalar, got shape {np.shape(lora_scale)}; e.g. "
                             "lora_scale=0.5.")
        knobs["scale"] = jnp.asarray(lora_scale, jnp.float32)
    if lora_rank is not None:
        if np.ndim(lora_rank) != 0 or not jnp.issubdtype(jnp.result_type(lora_rank), jnp.integer):
            raise ValueError(f"lora_rank must be an integer scalar, got {lora_rank!r}; e.g. lora_rank=4.")
        knobs["rank"] = jnp.asarray(lora_rank, jnp.int32)
    if lora_rng is not None:
        if not (isinstance(lora_rng, jax.Array) and jnp.issubdtype(lora_rng.dtype, jax.dtypes.prng_key)):
            raise TypeError("lora_rng must be a JAX PRNG key (jax.random.key(0)), got "
                            f"{type(lora_rng).__name__}.")
        knobs["rng"] = lora_rng
    if lora_weights is not None and lora_index is not None:
        raise ValueError("give lora_weights (one mix of the bank for the whole batch) or lora_index (one "
                         "adapter per example), not both.")
    if lora_weights is not None:
        if np.ndim(lora_weights) != 1:
            raise ValueError("lora_weights must have shape (K,), one weight per adapter of the bank, got "
                             f"shape {np.shape(lora_weights)}.")
        knobs["weights"] = jnp.asarray(lora_weights, jnp.float32)
        if lora_slots is not None:  # the slots the weights belong to (a dict by name): only they run
            knobs["slots"] = jnp.asarray(lora_slots, jnp.int32)
    if lora_index is not None:
        if np.ndim(lora_index) != 1 or not jnp.issubdtype(jnp.result_type(lora_index), jnp.integer):
            raise ValueError(f"lora_index must be an integer array of shape (batch,), got {lora_index!r}; "
                             "-1 means the base model for that example.")
        knobs["index"] = jnp.asarray(lora_index, jnp.int32)
    return knobs


def _by_name(config: LoraConfig, trainable, lora_weights, lora_index):
    """Adapters named at the Python boundary, turned into slots: the traced knobs keep one shape and dtype.

    ``lora_weights`` may be ``{name or slot: weight}`` (the others weigh 0 and are not
    run: the knobs become those slots and their weights) and ``lora_index`` a list of
    names (``None``: the base model for that example). Returns ``(weights, index, slots)``.
    """
    if not isinstance(lora_weights, Mapping) and not isinstance(lora_index, list | tuple):
        return lora_weights, lora_index, None  # the common call: nothing named, no tree walk
    leaves = jax.tree_util.tree_leaves(trainable)
    size = np.shape(leaves[0])[0] if leaves and np.ndim(leaves[0]) else 0
    picked = None
    if isinstance(lora_weights, Mapping):
        picked, lora_weights = mix(config, lora_weights, size, "lora_weights")
    if isinstance(lora_index, list | tuple):
        lora_index = slots(config, lora_index, size, "lora_index")
    return lora_weights, lora_index, picked


def _concrete(x) -> bool:
    """Whether ``x`` has a value here (not a tracer of an enclosing ``jax.jit``)."""
    return not any(isinstance(v, jax.core.Tracer) for v in jax.tree_util.tree_leaves(x))


def _floating(x) -> bool:
    return jnp.issubdtype(jnp.result_type(x), jnp.floating)


def _check_factors(trainable) -> None:
    """Adapter factors (``a``, ``b``, DoRA's ``m``) are floating point; one TypeError names every other.

    Cheap on every call: the paths are only spelled out when some leaf is not a float.
    """
    if all(_floating(x) for x in jax.tree_util.tree_leaves(trainable)):
        return
    flat = flatten(trainable)
    bad = [f"{p} ({jnp.result_type(x).name})" for p, x in flat.items()
           if adapter_of(p, flat) is not None and not _floating(x)]
    if bad:
        raise TypeError(
            "trainable has adapter factors that are not floating point: " + ", ".join(bad)
            + ". LoRA factors are LoraConfig.dtype (float32 by default); make them with jlora.init, or cast "
            "them back with .astype(jnp.float32)."
        )


def _check_knob_values(config: LoraConfig, trainable, lora_rank, lora_index) -> None:
    """Refuse a ``lora_rank`` / ``lora_index`` that would serve the wrong adapter, when its value is known.

    Traced values (the call inside the user's own ``jax.jit``) cannot be read here; the
    rewrite turns them into NaN outputs instead (see `LoraApply`).
    """
    if lora_rank is not None:
        if config.dylora is None:
            raise ValueError(
                f"lora_rank={lora_rank!r} is given, but this adapter is not DyLoRA "
                f"(LoraConfig(dylora=None)): its "
                "rank is fixed. Drop lora_rank, export a lower rank with jlora.truncate, or train with "
                "dylora='frozen' to choose the rank at run time."
            )
        top = max(config.rank_for(r) for r in config.targets)
        if _concrete(lora_rank) and not 1 <= int(np.asarray(lora_rank)) <= top:
            raise ValueError(f"lora_rank={int(np.asarray(lora_rank))} is out of range for this DyLoRA "
                             f"adapter of rank {top}; choose 1 <= lora_rank <= {top}.")
    if lora_index is not None and _concrete(lora_index):
        sizes = {np.shape(x)[0] for x in jax.tree_util.tree_leaves(trainable) if np.ndim(x)}
        if len(sizes) != 1:
            return  # not a bank: _check_bank says so
        k = sizes.pop()
        index = np.asarray(lora_index)
        bad = np.flatnonzero((index < -1) | (index >= k))
        if bad.size:
            shown = ", ".join(f"{int(index[n])} (example {n})" for n in bad[:5])
            shown += ", ..." if bad.size > 5 else ""
            raise ValueError(f"lora_index holds {shown}, outside -1..{k - 1}: the bank has {k} adapters "
                             f"(0..{k - 1}) and -1 means the base model. Index the adapters the bank holds.")


def _check_bank(targets, trainable) -> dict:
    """Like `Plan.read`, for a bank (`stack`): every leaf leads with the same K."""
    leaves = jax.tree_util.tree_leaves(trainable)
    sizes = {np.shape(x)[0] if np.ndim(x) else None for x in leaves}
    if len(sizes) != 1 or None in sizes:
        raise ValueError(
            "lora_weights/lora_index need a bank of adapters made by jlora.stack (every leaf leading with "
            f"the same adapter axis K); got leading sizes {sorted(map(str, sizes))}."
        )
    if any(not t.adapted for t in targets.values()):
        raise ValueError("a bank holds low-rank adapters only; its config trains nothing in full.")
    targets.read(jax.tree.map(lambda x: x[0], trainable))
    flat = flatten(trainable)
    return {path: (flat[f"{path}/a"], flat[f"{path}/b"]) for path in targets}


def _verify(closed, frozen, targets) -> None:
    """Every use of every adapted kernel in ``closed`` agrees with its configured split; else one error.

    Runs once per trace. A kernel contracted on the axes the config calls its output
    (and never used forward) would get ``a`` and ``b`` swapped, and a layer or expert axis
    sliced one at a time but not declared a stack axis would share one adapter: both are
    listed, each with the split its uses imply, in one `LayoutError`.
    """
    _, views = kernel_views(frozen, targets)
    if not views:
        return
    uses = uses_in(closed, views)
    problems = {}
    for path, found in uses.items():
        t = targets[path]
        if not check(t.layout, found):
            problems[path] = (t.layout, derive(path, len(t.shape), found), found)
    if problems:
        raise mismatch_error(problems)


class LoraApply:
    """``lora_apply(frozen, trainable, *args, lora_scale=None, lora_rank=None, lora_rng=None, **kwargs)``.

    Calls ``apply_fn(params, *args, **kwargs)`` with the adapters of ``trainable``
    added. Array arguments are traced; every other argument (flags such as
    ``train=False``, strings, methods) is static, as with ``jax.jit``'s
    ``static_argnames``. The three knobs are values, not shapes: changing them
    never recompiles.

    * ``lora_scale``: multiplies every adapter; 0 gives the base model, 1 the
      trained adapter, values between interpolate.
    * ``lora_rank``: a DyLoRA adapter evaluated at rank ``k`` (default: full rank).
    * ``lora_rng``: a key marks a training call: it draws the dropout masks of the
      LoRA branches and, with DyLoRA, the rank ``k`` of this step.
    * ``lora_weights`` (shape ``(K,)``) / ``lora_index`` (shape ``(batch,)``, ``-1`` for
      the base): for a bank of K adapters made by `jlora.stack`, their weighted sum,
      or one adapter per example. A bank's names work too: ``lora_weights={"fr": 1.0}``
      (only the named adapters run, so one of K costs one adapter) and
      ``lora_index=["fr", "de", None]`` (``None``: the base); names become slots before
      tracing, so changing them never recompiles (the number of names in a
      ``lora_weights`` dict is part of the compiled shape).

    Values that would serve the wrong adapter are refused, never clipped: a
    ``lora_index`` outside ``-1..K-1``, a ``lora_rank`` outside ``1..r`` (``r``: the
    largest rank of the config), a ``lora_rank`` for an adapter that is not DyLoRA
    (``ValueError``) and adapter factors that are not floating point (``TypeError``).
    When the call runs inside your own ``jax.jit``, ``lora_index`` and ``lora_rank``
    are traced and cannot be checked before it runs; then an out-of-range index
    makes that example's output NaN (its row of the batch; the other examples are
    served as asked), and an out-of-range rank makes the whole output NaN, so a bad
    value shows up in the result instead of silently serving another adapter or rank.
    Checking concrete ``lora_index`` values reads them on the host (a tiny transfer).
    """

    def __init__(self, apply_fn, config: LoraConfig, strategy: str, fallback: str):
        self.apply_fn, self.config, self.strategy, self.fallback = apply_fn, config, strategy, fallback
        self._jitted = jax.jit(self._run, static_argnames=("static",))
        self._plans: dict = {}  # one plan per structure, shapes and dtypes of frozen

    def plan(self, frozen) -> Plan:
        """The config resolved on ``frozen``: once per structure, shapes and dtypes of it."""
        key = (structure(frozen), tuple((np.shape(x), getattr(x, "dtype", None)) for x in leaves(frozen)))
        plan = self._plans.get(key)
        if plan is None:
            plan = self._plans[key] = Plan.of_base(self.config, frozen)
        return plan

    def __call__(self, frozen, trainable, *args, lora_scale=None, lora_rank=None, lora_rng=None,
                 lora_weights=None, lora_index=None, **kwargs):
        dynamic, static = _split(args, kwargs)
        lora_weights, lora_index, picked = _by_name(self.config, trainable, lora_weights, lora_index)
        knobs = _knobs(lora_scale, lora_rank, lora_rng, lora_weights, lora_index, picked)
        _check_factors(trainable)
        _check_knob_values(self.config, trainable, lora_rank, lora_index)
        if not _concrete((frozen, trainable, dynamic, knobs)):
            # Inside the caller's own trace (a jitted or differentiated step): evaluate in place.
            # A nested jit would make JAX differentiate and lower a second copy of the model's
            # jaxpr, which costs trace time (benchmarks/compile.py) and buys no caching there.
            return self._run(frozen, trainable, dynamic, knobs, static=static)
        return self._jitted(frozen, trainable, dynamic, knobs, static=static)

    def uses(self, frozen, trainable, *args, lora_scale=None, lora_rank=None, lora_rng=None,
             lora_weights=None, lora_index=None, **kwargs) -> list[Use]:
        """Trace once (abstractly) and report how each adapted kernel was consumed.

        Each `Use` names the path, the primitive and whether it stayed factored, so
        ``assert all(u.factored for u in lora_apply.uses(...))`` checks that no
        equation fell back to the merged weight.
        """
        dynamic, static = _split(args, kwargs)
        lora_weights, lora_index, picked = _by_name(self.config, trainable, lora_weights, lora_index)
        _check_factors(trainable)
        _check_knob_values(self.config, trainable, lora_rank, lora_index)
        ctx = Context(fallback=self.fallback, uses=[])
        knobs = _knobs(lora_scale, lora_rank, lora_rng, lora_weights, lora_index, picked)
        jax.make_jaxpr(lambda f, t, d, k: self._run(f, t, d, k, static=static, ctx=ctx))(
            frozen, trainable, dynamic, knobs
        )
        return ctx.uses

    def _run(self, frozen, trainable, dynamic, knobs, *, static: _Static, ctx: Context | None = None):
        config = self.config
        scale, rank, rng = knobs.get("scale"), knobs.get("rank"), knobs.get("rng")
        targets = self.plan(frozen)
        weights, index = knobs.get("weights"), knobs.get("index")
        if weights is not None or index is not None:
            return self._run_bank(frozen, trainable, dynamic, knobs, targets, static, ctx)
        values = targets.read(trainable)
        train = rng is not None
        if train and config.dylora is not None and rank is None:
            rank = sample_rank(rng, config, targets)

        if self.strategy == "merge":
            if train and config.dropout > 0:
                raise ValueError(
                    "strategy='merge' folds the adapter into W, so it cannot drop out the LoRA branch's "
                    "input; train with strategy='factored', or set dropout=0."
                )
            _verify(trace(self.apply_fn, frozen, dynamic, static)[0], frozen, targets)
            new = merged_leaves(frozen, trainable, config, scale, rank=rank, train=train)
            params = jax.tree_util.tree_unflatten(structure(frozen), new)
            args, kwargs = static.rebuild(dynamic)
            return self.apply_fn(params, *args, **kwargs)

        def in_flight(path, leaf, t):
            # Only DoRA at a runtime scale reads W here (its norm); a quantized W stays quantized otherwise.
            w = dequantized(leaf) if t.dora else leaf
            e = call_factors(t, config, w, *values[path], scale=scale, rank=rank, train=train)
            return Lora(path, leaf, e.a, e.b, e.scale, t.layout, key=self._key(rng, path), m=e.m,
                        f=config.nonlinearity, rate=config.dropout)

        return self._factored(frozen, dynamic, targets, static, ctx, in_flight,
                              lambda path, leaf: interpolate(leaf, values[path], scale))

    def _key(self, rng, path):
        if rng is None or self.config.dropout == 0:
            return None
        return jax.random.fold_in(rng, zlib.crc32(path.encode()))

    def _factored(self, frozen, dynamic, targets, static, ctx, in_flight, full):
        """Trace ``apply_fn`` and evaluate it with ``in_flight(...)`` for every adapted kernel.

        A quantized kernel is traced as a ``ShapeDtypeStruct`` of its logical weight and
        handed to the rewrite quantized (the in_flight's ``w``).
        """
        closed, out_shape = trace(self.apply_fn, frozen, dynamic, static)
        _verify(closed, frozen, targets)
        flat = leaves(frozen)
        invals = []
        for path, leaf in zip(leaf_paths(frozen), flat, strict=True):
            t = targets.get(path)
            if t is None:
                invals.append(dequantized(leaf))
            elif t.adapted:
                invals.append(in_flight(path, leaf, t))
            else:
                invals.append(full(path, dequantized(leaf)))
        invals.extend(jax.tree_util.tree_leaves(dynamic))
        outs = eval_jaxpr(ctx or Context(self.fallback), closed.jaxpr, closed.consts, invals)
        outs = [o.materialize() if isinstance(o, Lora) else o for o in outs]
        return jax.tree_util.tree_unflatten(jax.tree_util.tree_structure(out_shape), outs)

    def _run_bank(self, frozen, trainable, dynamic, knobs, targets, static, ctx):
        """A bank of K adapters (`jlora.stack`): weighted together, or one per example."""
        config = self.config
        refuse(config, "bank", "lora_weights/lora_index")
        values = _check_bank(targets, trainable)
        weights, index, rng = knobs.get("weights"), knobs.get("index"), knobs.get("rng")
        s = knobs.get("scale", 1.0)
        k = next(iter(values.values()))[0].shape[0]
        if config.adapters and k != len(config.adapters):
            raise ValueError(f"the config names {len(config.adapters)} adapters {list(config.adapters)}, but "
                             f"the bank holds {k}; serve the bank with the config jlora.stack returned.")
        picked = knobs.get("slots")
        if weights is not None and picked is None and weights.shape[0] != k:
            raise ValueError(f"lora_weights has {weights.shape[0]} weights for a bank of {k} adapters.")
        if picked is not None:  # adapters chosen by name: run those alone, at rank n·R
            values = {p: (jnp.take(a, picked, axis=0), jnp.take(b, picked, axis=0))
                      for p, (a, b) in values.items()}
        if weights is not None and self.strategy == "merge":
            new = []
            for path, leaf in zip(leaf_paths(frozen), leaves(frozen), strict=True):
                t = targets.get(path)
                if t is None:
                    new.append(dequantized(leaf))
                else:
                    a_cat, b_cat = weighted(t, *values[path], weights)
                    new.append(merged(dequantized(leaf), a_cat, b_cat, t.layout, t.scale * s))
            args, kwargs = static.rebuild(dynamic)
            return self.apply_fn(jax.tree_util.tree_unflatten(structure(frozen), new), *args, **kwargs)
        if index is not None and self.strategy == "merge":
            raise ValueError("per-example adapters (lora_index) need strategy='factored': a merged weight is "
                             "one adapter for the whole batch.")

        def in_flight(path, leaf, t):
            a, b = values[path]
            if weights is not None:
                a, b = weighted(t, a, b, weights)
            return Lora(path, leaf, a, b, t.scale * s, t.layout, key=self._key(rng, path),
                        f=config.nonlinearity,
                        rate=config.dropout, index=index)

        return self._factored(frozen, dynamic, targets, static, ctx, in_flight, None)


def wrap(apply_fn, config: LoraConfig, strategy: str = "factored", *, fallback: str = "merge") -> LoraApply:
    """Wrap a Flax apply function (Linen ``model.apply`` or an NNX ``merge``-and-call).

    Args:
      apply_fn: ``apply_fn(params, *args, **kwargs)``; ``params`` has the structure
        of ``frozen``.
      config: the `LoraConfig` given to `init`.
      strategy: ``"factored"`` (default) traces ``apply_fn`` to a jaxpr and adds
        ``s·(x·a)·b`` beside every op that consumes an adapted kernel, never forming
        ``W + s·a@b``; ``"merge"`` applies ``apply_fn`` to `merge`'s output.
      fallback: what a factored trace does with an op that has no factored rule:
        ``"merge"`` uses the merged weight for that op (correct, recorded in
        ``uses``), ``"error"`` raises.

    Returns:
      a `LoraApply`: ``lora_apply(frozen, trainable, *args, lora_scale=None, lora_rank=None,
      lora_rng=None, **kwargs)``.

    >>> import jax, jax.numpy as jnp, flax.linen as nn
    >>> from jlora import LoraConfig, init
    >>> model = nn.Dense(3)
    >>> x = jnp.ones((2, 4))
    >>> params = model.init(jax.random.key(0), x)
    >>> cfg = LoraConfig(rank=2, targets=r".*/kernel")
    >>> frozen, trainable = init(jax.random.key(1), params, cfg)
    >>> lora_apply = wrap(model.apply, cfg)
    >>> bool(jnp.allclose(lora_apply(frozen, trainable, x), model.apply(params, x)))
    True
    >>> [u.factored for u in lora_apply.uses(frozen, trainable, x)]
    [True]
    """
    if strategy not in STRATEGIES:
        raise ValueError(f"wrap: unknown strategy {strategy!r}; choose one of {STRATEGIES}.")
    if fallback not in FALLBACKS:
        raise ValueError(f"wrap: unknown fallback {fallback!r}; choose one of {FALLBACKS}.")
    if not callable(apply_fn):
        raise TypeError(f"wrap: apply_fn must be callable, got {type(apply_fn).__name__}.")
    if not isinstance(config, LoraConfig):
        raise TypeError(f"wrap: expected a jlora.LoraConfig, got {type(config).__name__}.")
    return LoraApply(apply_fn, config, strategy, fallback)
