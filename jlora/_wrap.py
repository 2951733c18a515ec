"""`wrap`: run any Flax apply function with the adapters added on the fly."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jlora._config import LoraConfig
from jlora._merge import interpolate, merged_leaves
from jlora._paths import leaf_paths
from jlora._rewrite import Context, Lora, Use, eval_jaxpr
from jlora._targets import check_trainable, resolve

STRATEGIES = ("factored", "merge")
FALLBACKS = ("merge", "error")


class _Static:
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
        if not isinstance(other, _Static) or self.treedef != other.treedef:
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
    return isinstance(x, jax.Array | np.ndarray | np.generic)


def _split(args, kwargs):
    leaves, treedef = jax.tree_util.tree_flatten((args, kwargs))
    dynamic = [x for x in leaves if _is_dynamic(x)]
    static = {i: x for i, x in enumerate(leaves) if not _is_dynamic(x)}
    return dynamic, _Static(treedef, static)


def _as_scale(lora_scale):
    """Any number or scalar array as one float32 value, so no value or type retraces.

    ``None`` (the adapter as trained) stays static: leaves trained in full then take
    their trained value exactly rather than ``base + 1·(trained - base)``.
    """
    if lora_scale is None:
        return None
    if np.ndim(lora_scale) != 0:
        raise ValueError(f"lora_scale must be a scalar, got shape {np.shape(lora_scale)}.")
    return jnp.asarray(lora_scale, jnp.float32)


class LoraApply:
    """``lora_apply(frozen, trainable, *args, lora_scale=None, **kwargs)``.

    Calls ``apply_fn(params, *args, **kwargs)`` with the adapters of ``trainable``
    added. ``lora_scale`` (a value, not a shape: changing it never recompiles)
    multiplies every adapter: 0 gives the base model, 1 the trained adapter.
    Array arguments are traced; every other argument (flags such as
    ``train=False``, strings, methods) is static, as with ``jax.jit``'s
    ``static_argnames``.
    """

    def __init__(self, apply_fn, config: LoraConfig, strategy: str, fallback: str):
        self.apply_fn, self.config, self.strategy, self.fallback = apply_fn, config, strategy, fallback
        self._jitted = jax.jit(self._run, static_argnames=("static",))

    def __call__(self, frozen, trainable, *args, lora_scale=None, **kwargs):
        dynamic, static = _split(args, kwargs)
        return self._jitted(frozen, trainable, dynamic, _as_scale(lora_scale), static=static)

    def uses(self, frozen, trainable, *args, lora_scale=None, **kwargs) -> list[Use]:
        """Trace once (abstractly) and report how each adapted kernel was consumed.

        Each `Use` names the path, the primitive and whether it stayed factored, so
        ``assert all(u.factored for u in lora_apply.uses(...))`` checks that no
        equation fell back to the merged weight.
        """
        dynamic, static = _split(args, kwargs)
        ctx = Context(fallback=self.fallback, uses=[])
        jax.make_jaxpr(lambda f, t, d, s: self._run(f, t, d, s, static=static, ctx=ctx))(
            frozen, trainable, dynamic, _as_scale(lora_scale)
        )
        return ctx.uses

    def _run(self, frozen, trainable, dynamic, lora_scale, *, static: _Static, ctx: Context | None = None):
        scale = 1.0 if lora_scale is None else lora_scale
        if self.strategy == "merge":
            leaves = merged_leaves(frozen, trainable, self.config, scale)
            params = jax.tree_util.tree_unflatten(jax.tree_util.tree_structure(frozen), leaves)
            args, kwargs = static.rebuild(dynamic)
            return self.apply_fn(params, *args, **kwargs)

        targets = resolve(self.config, frozen)
        values = check_trainable(targets, trainable)
        leaves, treedef = jax.tree_util.tree_flatten(frozen)

        def traced(param_leaves, dyn):
            args, kwargs = static.rebuild(dyn)
            return self.apply_fn(jax.tree_util.tree_unflatten(treedef, param_leaves), *args, **kwargs)

        closed, out_shape = jax.make_jaxpr(traced, return_shape=True)(leaves, dynamic)
        invals = []
        for path, leaf in zip(leaf_paths(frozen), leaves, strict=True):
            t = targets.get(path)
            if t is None:
                invals.append(leaf)
            elif t.is_lora:
                a, b = values[path]
                invals.append(Lora(path, leaf, a, b, t.scale * scale, t.layout))
            else:
                invals.append(interpolate(leaf, values[path], scale))
        invals.extend(jax.tree_util.tree_leaves(dynamic))
        outs = eval_jaxpr(ctx or Context(self.fallback), closed.jaxpr, closed.consts, invals)
        outs = [o.materialize() if isinstance(o, Lora) else o for o in outs]
        return jax.tree_util.tree_unflatten(jax.tree_util.tree_structure(out_shape), outs)


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
      a `LoraApply`: ``lora_apply(frozen, trainable, *args, lora_scale=None, **kwargs)``.

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
