"""`merge` adapters into the base weights, and `unmerge` them out again."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jlora._config import LoraConfig
from jlora._knobs import call_factors
from jlora._layout import dora_merged, merged
from jlora._paths import leaf_paths, leaves, structure
from jlora._plan import Plan
from jlora._quant import QArray, dequantized, requantize_warning
from jlora._variants import reason, refuse


def interpolate(base, trained, scale):
    """``base + scale·(trained - base)``: the runtime scale for a leaf trained in full."""
    if scale is None:
        return trained.astype(base.dtype)
    s = jnp.asarray(scale, base.dtype)
    return base + s * (trained.astype(base.dtype) - base)


def _as_runtime_scale(scale):
    """``1`` (a Python number) means the adapter as trained: no arithmetic at all."""
    return None if isinstance(scale, int | float) and not isinstance(scale, bool) and scale == 1 else scale


def merged_leaves(frozen, trainable, config: LoraConfig, scale=None, rank=None, train=False) -> list:
    """Leaves of ``frozen`` with every adapter folded in."""
    return _folded_leaves(frozen, trainable, config, scale, 1, rank, train)


def unmerged_leaves(merged_params, trainable, config: LoraConfig, scale=None) -> list:
    """Leaves of ``merged_params`` with every adapter taken out again."""
    return _folded_leaves(merged_params, trainable, config, scale, -1, None, False)


def _folded_leaves(frozen, trainable, config: LoraConfig, scale, sign: int, rank, train) -> list:
    """Leaves of ``frozen`` with every adapter added (``sign=1``) or subtracted (``sign=-1``).

    Quantized kernels are dequantized: every leaf returned is a plain array.
    """
    refuse(config, "merge", "unmerge" if sign < 0 else "merge")
    if sign < 0:
        refuse(config, "unmerge", "unmerge")
    scale = _as_runtime_scale(scale)
    targets = Plan.of_base(config, frozen)
    values = targets.read(trainable)
    out = []
    for path, leaf in zip(leaf_paths(frozen), leaves(frozen), strict=True):
        leaf = dequantized(leaf)
        t = targets.get(path)
        if t is None:
            out.append(leaf)
        elif t.adapted:
            e = call_factors(t, config, leaf, *values[path], scale=scale, rank=rank, train=train)
            if e.m is not None:
                out.append(dora_merged(leaf, e.a, e.b, e.m, t.layout, e.scale))
            else:
                out.append(merged(leaf, e.a, e.b, t.layout, sign * e.scale))
        else:
            out.append(interpolate(leaf, values[path], scale) if sign > 0
                       else values[path].astype(leaf.dtype))
    return out


def _check_finite(tree, changed: set[str]) -> None:
    bad = []
    for path, leaf in zip(leaf_paths(tree), leaves(tree), strict=True):
        if path in changed:
            if isinstance(leaf, jax.core.Tracer):
                raise ValueError("merge(..., safe=True) checks values on the host; call it outside jax.jit.")
            if not bool(jnp.all(jnp.isfinite(leaf))):
                bad.append(path)
    if bad:
        raise ValueError(
            "merge produced non-finite values (nan/inf) at: " + ", ".join(bad)
            + ". The adapters or the base hold nan/inf; check the training run (learning rate, "
            "loss scale) before serving these weights."
        )


def _requantize(frozen, new: list, targets) -> list:
    """Quantize merged kernels again like their frozen `QArray`, warning with the rounding measured."""
    out, kinds, err, delta = [], set(), 0.0, 0.0
    host = not any(isinstance(x, jax.core.Tracer) for x in new)
    for path, old, w in zip(leaf_paths(frozen), leaves(frozen), new, strict=True):
        if not isinstance(old, QArray) or path not in targets:
            out.append(old)
            continue
        q = old.like(w)
        kinds.add(old.kind)
        if host:
            wf = w.astype(jnp.float32)
            err = max(err, float(jnp.max(jnp.abs(q.dequantize().astype(jnp.float32) - wf))))
            delta = max(delta, float(jnp.max(jnp.abs(wf - old.dequantize().astype(jnp.float32)))))
        out.append(q)
    if kinds:
        requantize_warning(kinds, err if host else None, delta if host else None)
    return out


def merge(frozen, trainable, config: LoraConfig, *, scale=1.0, rank=None, safe: bool = False,
          requantize: bool = False):
    """Fold the adapters into the base: plain parameters with the structure of ``params``.

    Each adapted kernel becomes ``W + scale·(alpha/r)·a@b`` in W's dtype (with DoRA,
    ``m·V/‖V‖`` per output unit); each leaf trained in full takes its trained value
    (``scale`` interpolates from the base). With ``b == 0`` the result equals the
    original ``params``. A config with a nonlinearity has no merged form: refused.

    A quantized base (`jlora.quantize`) is dequantized and merged, giving plain
    arrays. With ``requantize=True`` each merged kernel is quantized again with its
    kind, block and dtype, and a ``UserWarning`` reports the measured rounding next
    to the largest delta: rounding moves each value by up to absmax/254 (int8) or
    0.152·absmax of its block (NF4), so a delta smaller than that is lost (on the
    test model LinenZoo with every factor bumped by 0.01: deltas up to 0.054,
    rounding up to 0.068 with NF4 and 0.0035 with int8).

    Args:
      frozen, trainable: from `init`.
      config: the `LoraConfig` they were made with.
      scale: adapter strength: 0 is the base model, 1 the trained adapter.
      rank: for a DyLoRA adapter, the rank ``k`` to merge at (default: full rank).
      safe: check the merged leaves on the host and raise, naming every path, if
        any holds nan or inf (nothing is returned then).
      requantize: quantize the merged kernels of a quantized base again (lossy, warned).

    >>> import jax, jax.numpy as jnp
    >>> from jlora import LoraConfig, init
    >>> params = {"w": {"kernel": jnp.ones((4, 3))}}
    >>> cfg = LoraConfig(rank=2, targets="w/kernel")
    >>> frozen, trainable = init(jax.random.key(0), params, cfg)
    >>> bool((merge(frozen, trainable, cfg)["w"]["kernel"] == params["w"]["kernel"]).all())
    True
    """
    if rank is not None and config.dylora is None:
        raise ValueError(
            f"merge: rank={rank!r} picks a DyLoRA rank, but this config has dylora=None, so every adapter "
            "acts at its full rank; drop rank=, or cut a plain adapter with jlora.truncate only after DyLoRA "
            "training."
        )
    new = merged_leaves(frozen, trainable, config, scale, rank=rank)
    targets = Plan.of_base(config, frozen).targets if safe or requantize else {}
    if safe:
        _check_finite(jax.tree_util.tree_unflatten(structure(frozen), new), set(targets))
    if requantize:
        new = _requantize(frozen, new, targets)
    return jax.tree_util.tree_unflatten(structure(frozen), new)


def unmerge(merged_params, trainable, config: LoraConfig, *, scale=1.0):
    """The inverse of `merge`: subtract the adapters to recover the frozen base.

    Leaves trained in full keep their merged (trained) value: the base value they
    replaced is not recoverable from ``merged_params``.

    >>> import jax, jax.numpy as jnp
    >>> from jlora import LoraConfig, init
    >>> params = {"w": {"kernel": jnp.ones((4, 3))}}
    >>> cfg = LoraConfig(rank=2, targets="w/kernel")
    >>> frozen, trainable = init(jax.random.key(0), params, cfg)
    >>> trainable["w"]["kernel"]["b"] = jnp.ones((2, 3))
    >>> back = unmerge(merge(frozen, trainable, cfg), trainable, cfg)
    >>> bool(jnp.allclose(back["w"]["kernel"], params["w"]["kernel"], atol=1e-6))
    True
    """
    quantized = [p for p, x in zip(leaf_paths(merged_params), leaves(merged_params), strict=True)
                 if isinstance(x, QArray)]
    if quantized:
        why = reason("quantized base", "unmerge")
        raise ValueError(f"unmerge: {', '.join(quantized)} are quantized; {why}")
    new = unmerged_leaves(merged_params, trainable, config, scale)
    return jax.tree_util.tree_unflatten(structure(merged_params), new)
