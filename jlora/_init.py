"""`init`: split a parameter tree into frozen base and trainable adapters."""

from __future__ import annotations

import dataclasses
import functools
import zlib

import jax
import jax.numpy as jnp
from jax import lax

from jlora._config import LoraConfig
from jlora._layout import weight_norm
from jlora._paths import flatten, leaf_paths, nest
from jlora._plan import Plan, Target
from jlora._quant import dequantized, is_qarray
from jlora._sharding import on_mesh, placement, refuse_partitioned_svd
from jlora._variants import reason, refuse


def _adapter(key: jax.Array, t: Target, init: str, dtype) -> dict[str, jax.Array]:
    a_shape = t.layout.a_shape(t.shape, t.rank)
    if t.embedding:
        # PEFT draws its embedding factor from N(0, 1) (the other factor is zero);
        # here that factor is `a`, so a looked-up row of `a` is O(1).
        a = jax.random.normal(key, a_shape, dtype)
    elif init == "kaiming_uniform":
        # torch's kaiming_uniform_(a=sqrt(5)) on PEFT's (r, fan_in) lora_A weight.
        bound = 1.0 / t.layout.fan_in(t.shape) ** 0.5
        a = jax.random.uniform(key, a_shape, dtype, -bound, bound)
    else:  # "gaussian", as PEFT: std 1/r
        a = jax.random.normal(key, a_shape, dtype) / t.rank
    return {"a": a, "b": jnp.zeros(t.layout.b_shape(t.shape, t.rank), dtype)}


def _fresh(key: jax.Array, leaves, targets: dict[str, Target], config: LoraConfig) -> dict:
    """``trainable`` when nothing comes from an SVD: a random, b zero, DoRA's ‖W‖, copies of full leaves.

    ``leaves`` needs only the DoRA kernels and the leaves trained in full.
    """
    dtype = jnp.dtype(config.dtype)
    trainable = {}
    for path, t in targets.items():
        if not t.adapted:
            trainable[path] = jnp.array(leaves[path], copy=True)
            continue
        sub = jax.random.fold_in(key, zlib.crc32(path.encode()))
        trainable[path] = _adapter(sub, t, config.init, dtype)
        if t.dora:
            trainable[path]["m"] = weight_norm(dequantized(leaves[path]), t.layout).astype(dtype)
    return nest(trainable)


def _pissa(w, t: Target, dtype):
    """Top-r SVD of W split as ``scale·a@b`` (PEFT's PiSSA), and the residual W - scale·a@b."""
    lay = t.layout
    n_stack = len(lay.stack_axes)
    order = (*lay.stack_axes, *lay.in_axes, *lay.out_axes)
    wt = lax.transpose(w, order).astype(jnp.float32)
    shape = wt.shape
    fan_in = lay.fan_in(t.shape)
    wm = wt.reshape(*shape[:n_stack], fan_in, -1)
    u, s, vh = jnp.linalg.svd(wm, full_matrices=False)
    root = jnp.sqrt(s[..., : t.rank] / t.scale)
    a = u[..., : t.rank] * root[..., None, :]
    b = root[..., :, None] * vh[..., : t.rank, :]
    residual = (wm - t.scale * (a @ b)).reshape(shape)
    inverse = tuple(order.index(i) for i in range(w.ndim))
    a = a.reshape(lay.a_shape(t.shape, t.rank))
    b = b.reshape(lay.b_shape(t.shape, t.rank))
    return {"a": a.astype(dtype), "b": b.astype(dtype)}, lax.transpose(residual, inverse).astype(w.dtype)


def init(key: jax.Array, params, config: LoraConfig):
    """Split ``params`` into ``(frozen, trainable)``.

    ``frozen`` is ``params`` itself (same structure and values; leaves trained in
    full keep their original value there, so ``lora_scale=0`` is the base model).
    With ``init="pissa"`` it is a copy whose adapted kernels hold the SVD residual
    ``W - scale·a@b`` (``params`` is not changed), and ``lora_scale=0`` is that
    residual model.
    ``trainable`` is a plain nested dict: at each adapted kernel's path a dict with
    ``a`` of shape ``(*stack, *in, r)`` (random) and ``b`` of shape
    ``(*stack, r, *out)`` (zero); with DoRA also ``m`` of shape ``(*stack, *out)``
    (``‖W‖`` per output unit); at each leaf trained in full, a copy of it.

    Each adapter's key is ``fold_in(key, crc32(path))``: adding or removing a
    target never changes the initial value of another.

    A config naming several adapters (``LoraConfig(adapters=("fr", "de"))``) makes a
    bank to train together: every leaf of ``trainable`` leads with one slot per
    name, and slot ``k`` holds what ``init(jax.random.fold_in(key, k), params,
    config)`` gives one adapter. Serve and train it with ``lora_index`` (`wrap`);
    `optimizer` steps each slot on its own.

    On a mesh (the targeted leaves are ``jax.Array``s with ``NamedSharding``s) the
    adapters are created under ``jit`` directly with `jlora.shardings`' shardings:
    the same values as on one device, and no device ever holds a whole kernel it
    did not hold before (DoRA's norm is a sharded reduction). PiSSA refuses kernels
    split across devices, since its SVD needs each whole.

    Args:
      key: a JAX PRNG key.
      params: Linen variables (dict or FrozenDict) or NNX state from ``nnx.split``.
      config: the `LoraConfig`.

    Returns:
      ``(frozen, trainable)``.

    >>> import jax, jax.numpy as jnp
    >>> params = {"params": {"dense": {"kernel": jnp.ones((16, 4)), "bias": jnp.zeros(4)}}}
    >>> cfg = LoraConfig(rank=2, targets=r".*/kernel")
    >>> frozen, trainable = init(jax.random.key(0), params, cfg)
    >>> jax.tree.map(jnp.shape, trainable)
    {'params': {'dense': {'kernel': {'a': (16, 2), 'b': (2, 4)}}}}
    """
    if not isinstance(key, jax.Array):
        raise TypeError(f"init: key must be a JAX PRNG key (jax.random.key(0)), got {type(key).__name__}.")
    targets = Plan.of_base(dataclasses.replace(config, adapters=()), params)
    leaves = flatten(params)
    placed = placement(targets, leaves)
    if config.adapters:
        return params, _bank(key, targets, leaves, placed, config)
    if config.init != "pissa":
        return params, _made(key, targets, leaves, placed, config)
    if placed:
        refuse_partitioned_svd(targets, placed)
    quantized = [path for path, t in targets.items() if t.adapted and is_qarray(leaves[path])]
    if quantized:
        raise ValueError(f"init: {quantized[0]} is quantized (a jlora.QArray); "
                         f"{reason('quantized base', 'pissa_init')}")
    dtype = jnp.dtype(config.dtype)
    trainable, residuals = {}, {}
    for path, t in targets.items():
        if not t.adapted:
            trainable[path] = jnp.array(leaves[path], copy=True)
            continue
        trainable[path], residuals[path] = _pissa(leaves[path], t, dtype)
        if t.dora:
            trainable[path]["m"] = weight_norm(leaves[path], t.layout).astype(dtype)
    frozen = params
    if residuals:
        leaves = jax.tree_util.tree_leaves(params)
        new = [residuals.get(p, x) for p, x in zip(leaf_paths(params), leaves, strict=True)]
        frozen = jax.tree_util.tree_unflatten(jax.tree_util.tree_structure(params), new)
    return frozen, nest(trainable)


def _made(key: jax.Array, targets: Plan, leaves: dict, placed: dict, config: LoraConfig) -> dict:
    """`_fresh`'s ``trainable``, created under ``jit`` in the shardings that follow the base on a mesh."""
    make = functools.partial(_fresh, targets=targets, config=config)
    return on_mesh(make, key, targets, leaves, placed) if placed else make(key, leaves)


def _bank(key: jax.Array, targets: Plan, leaves: dict, placed: dict, config: LoraConfig) -> dict:
    """The bank: slot ``k`` is ``init(fold_in(key, k), params, config)``'s adapter, for each name.

    Every slot has the config's rank and scale (nothing is folded into ``b``, unlike
    `jlora.stack`), so training the bank steps each adapter exactly as training it alone.
    """
    refuse(config, "bank", "init")
    if config.init == "pissa":
        raise ValueError("init: a bank of adapters (LoraConfig.adapters) shares one frozen base, but "
                         "init='pissa' gives every adapter its own residual base; use "
                         "init='kaiming_uniform'.")
    full = [p for p, t in targets.items() if t.trained_in_full]
    if full:
        raise ValueError(f"init: {full[0]} is trained in full (LoraConfig.train_in_full), but a bank "
                         f"{list(config.adapters)} holds low-rank adapters only; target it with a low-rank "
                         "rule instead (each adapter then has its own delta of it), or train it outside the "
                         "bank.")
    slots = [_made(jax.random.fold_in(key, k), targets, leaves, placed, config)
             for k in range(len(config.adapters))]
    return jax.tree.map(lambda *xs: jnp.stack(xs), *slots)
