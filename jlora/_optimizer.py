"""`optimizer`: one optax transformation over `trainable`, LoRA+ learning rates per factor.

LoRA+ (Hayou, Ghosh & Yu, 2024) trains ``b`` (the output-side factor, zero at
init) with a learning rate ``lr_ratio`` times that of ``a``. The tree is split with
``optax.partition`` into labelled groups, each with its own copy of the base
optimizer:

=============  ==============================================  =========================
label          leaves                                          learning rate
=============  ==============================================  =========================
``a``          ``a`` of every non-embedding adapter            ``learning_rate``
``b``          ``b`` (and DoRA's ``m``) of those adapters      ``learning_rate · ratio``
``embedding``  ``a`` and ``b`` of embedding-table adapters     ``embedding_lr``
``full``       leaves trained in full (``train_in_full``)      ``full_lr``
=============  ==============================================  =========================

Frozen leaves are not in `trainable`, so they never hold optimizer state.

``lr_ratio="auto"`` gives each adapter its own ratio from its shape,

    ratio = clip((n / m) · sqrt(n / r), 1, 64),   n = fan-in, m = fan-out, r = rank.

Why this shape. ``a`` starts at ``U(±1/sqrt(n))``, so each of the ``r`` entries of
``z = x·a`` is O(1) for O(1) inputs, and an Adam-type step (entries of size ~η
whatever the gradient's scale) moves ``z`` by up to ``η_A·n``: ``a`` feels the
fan-in. ``b`` maps ``z`` to ``m`` outputs and its step moves each output by up to
``η_B·r``; keeping the two contributions balanced per output *unit* gives
``η_B / η_A ~ n/r`` for a square kernel, divided by ``m/n`` when the output is wider
than the input (a wide output spreads the same feature change over more units)
and with the square root taken on the ``n/r`` part because, with random signs,
``r`` and ``n`` terms add in quadrature rather than linearly. It is a heuristic,
not a theorem: it reproduces the LoRA+ recommendation (16 for ``n = m = 2048``,
``r = 8``) and grows with width as LoRA+ says it must. The clip keeps a thin kernel
(``m ≫ n``) from training ``b`` slower than ``a`` and a very wide one from
taking steps LoRA+ never tested (its sweeps go up to 2⁶).

Weight decay (the default base is ``optax.adamw``) is decoupled and acts on every
group with that group's learning rate: it pulls ``a`` and ``b`` towards zero, that
is the adapted model towards the base model, and a leaf trained in full towards
zero (not towards its pretrained value). Pass ``weight_decay=0.0`` to switch it
off, or use another ``base``.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jlora._bank import slots
from jlora._config import LoraConfig
from jlora._plan import Plan

LABELS = ("a", "b", "embedding", "full")
MAX_AUTO_RATIO = 64.0


def auto_ratio(fan_in: int, fan_out: int, rank: int) -> float:
    """``clip((n/m)·sqrt(n/r), 1, 64)``: LoRA+'s ``η_B/η_A`` from an adapter's shape.

    >>> round(auto_ratio(2048, 2048, 8), 2)
    16.0
    >>> auto_ratio(384, 1536, 8), auto_ratio(1536, 384, 8)
    (1.7320508075688772, 55.42562584220407)
    """
    return float(min(max((fan_in / fan_out) * math.sqrt(fan_in / rank), 1.0), MAX_AUTO_RATIO))


def labels(trainable, config: LoraConfig) -> Any:
    """The label of every leaf of ``trainable`` (a tree of strings, same structure): a, b, embedding or full.

    DoRA's magnitude ``m`` moves with ``b`` (it is an output-side parameter).
    """
    out = []
    for t, factor in Plan.of_trainable(config, trainable, "optimizer").roles(trainable):
        out.append("full" if factor is None else "embedding" if t.embedding else "a" if factor == "a"
                   else "b")
    return jax.tree_util.tree_unflatten(jax.tree_util.tree_structure(trainable), out)


def _auto_ratios(config: LoraConfig, trainable) -> Any:
    """One float32 scalar per leaf: the auto ratio on ``b`` (and ``m``) leaves, 1 elsewhere."""
    out = []
    for t, factor in Plan.of_trainable(config, trainable, "optimizer").roles(trainable):
        ratio = 1.0
        if factor in ("b", "m") and not t.embedding:
            fan_out = math.prod(t.shape[i] for i in t.layout.out_axes)
            ratio = auto_ratio(t.layout.fan_in(t.shape), fan_out, t.rank)
        out.append(jnp.float32(ratio))
    return jax.tree_util.tree_unflatten(jax.tree_util.tree_structure(trainable), out)


class _RatioState(NamedTuple):
    ratios: Any


def _scale_by_auto_ratio(config: LoraConfig) -> optax.GradientTransformation:
    """Multiply each leaf's update by its auto ratio (held in the state: static values)."""

    def init(params):
        return _RatioState(_auto_ratios(config, params))

    def update(updates, state, params=None):
        del params
        return jax.tree.map(lambda u, r: u * r.astype(u.dtype), updates, state.ratios), state

    return optax.GradientTransformation(init, update)


def _times(learning_rate, factor):
    if isinstance(factor, int | float) and factor == 1:
        return learning_rate
    if callable(learning_rate):
        return lambda step: learning_rate(step) * factor
    return learning_rate * factor


def _check_rate(name: str, value) -> None:
    if callable(value):
        return
    number = isinstance(value, int | float) and not isinstance(value, bool)
    if not number or not (value >= 0 and math.isfinite(value)):
        raise ValueError(f"optimizer: {name} must be a finite number >= 0 or an optax schedule, got "
                         f"{value!r}.")


def optimizer(
    config: LoraConfig,
    learning_rate: float | Callable | Mapping[str, float | Callable],
    *,
    lr_ratio: float | str | Mapping[str, float | str] = 16.0,
    embedding_lr: float | Callable | Mapping[str, float | Callable] | None = None,
    full_lr: float | Callable | None = None,
    max_grad_norm: float | None = None,
    base: Callable[..., optax.GradientTransformation] = optax.adamw,
    **base_kwargs,
) -> optax.GradientTransformation:
    """An optax optimizer over `trainable` with LoRA+ learning rates (see the module doc).

    Args:
      config: the `LoraConfig` given to `init`.
      learning_rate: ``a``'s learning rate, a number or an optax schedule.
      lr_ratio: ``b``'s learning rate over ``a``'s: 16 (LoRA+'s recommendation) by
        default, 1 for plain LoRA, or ``"auto"`` for a ratio per adapter from its shape.
        The ratio multiplies ``b``'s step, so it is safe only while
        ``learning_rate · lr_ratio`` is a rate ``b`` tolerates. Measured on MiniLM-L6
        (BUILD_NOTES.md, "Real-task results", 3 training seeds, AdamW, 120 steps):
        with ``a`` at 5e-4, 16 lowered the mean training loss below plain LoRA's in
        every seed on both tweets and single-word valence, and its test accuracy was
        within one standard error of plain LoRA's (tweets +0.5 ± 1.4 points, words
        +0.9 ± 0.7), while 4 and ``"auto"`` gained +2.4 points on the tweets in every seed
        (words +1.3 and +0.5); with ``a`` at 1.5e-3 (plain LoRA's best rate in a validation
        sweep) 16 put ``b`` at 2.4e-2 and diverged to chance in 3 of 3 seeds; with
        DyLoRA's ``alpha/k`` scale it drove the low ranks to chance (one seed). So: raise the ratio only
        with a moderate ``learning_rate`` (or lower the rate when raising it), use 1
        with DyLoRA or after tuning ``learning_rate`` for plain LoRA, and compare
        with 1 over seeds before claiming a gain: on these tasks the gain in
        accuracy was not larger than the noise. No overfitting from the ratio was
        seen: averaged over seeds, test accuracy did not fall where the training
        loss fell faster.
      embedding_lr: for both factors of embedding-table adapters (default
        ``learning_rate``): a looked-up row of ``a`` is already O(1), so the LoRA+
        argument for a faster ``b`` does not carry over.
      full_lr: for leaves trained in full (default ``learning_rate``).
      max_grad_norm: clip the gradient to this global norm before the step (default:
        no clipping); in a bank each adapter's gradient is clipped on its own.
      base: the optimizer each group runs, called as ``base(lr, **base_kwargs)``;
        ``optax.adamw`` by default.
      **base_kwargs: passed to ``base`` (e.g. ``weight_decay=0.0``, ``b2=0.99``).

    A bank (a config naming several ``adapters``, from `init` or `stack`) gets one
    optimizer per adapter, run side by side on the bank's leading axis: independent
    moments and step counts, gradients clipped per adapter, and ``learning_rate``,
    ``lr_ratio`` and ``embedding_lr`` either shared or given per adapter as
    ``{name: value}``. Its ``update`` also takes ``lora_index`` (the batch's adapter
    per example, as given to the wrapped apply function): an adapter with no example
    in the batch is left exactly as it was, moments and step count included, so
    training K adapters in one batch equals K separate runs.

    Returns:
      an ``optax.GradientTransformation`` built with ``optax.partition``
      (``optax.GradientTransformationExtraArgs`` for a bank).

    >>> import jax, jax.numpy as jnp, optax
    >>> from jlora import LoraConfig, init
    >>> cfg = LoraConfig(rank=2, targets="w")
    >>> _, trainable = init(jax.random.key(0), {"w": jnp.ones((8, 4))}, cfg)
    >>> tx = optimizer(cfg, 0.1, lr_ratio=4.0, base=optax.sgd)
    >>> grads = jax.tree.map(jnp.ones_like, trainable)
    >>> updates, _ = tx.update(grads, tx.init(trainable), trainable)
    >>> print(updates["w"]["a"][0, 0], updates["w"]["b"][0, 0])
    -0.1 -0.4
    """
    if not isinstance(config, LoraConfig):
        raise TypeError(f"optimizer: expected a jlora.LoraConfig, got {type(config).__name__}.")
    if not callable(base):
        raise TypeError("optimizer: base must be an optax optimizer factory such as optax.adamw, got "
                        f"{base!r}.")
    norm = max_grad_norm
    if norm is not None and (isinstance(norm, bool) or not isinstance(norm, int | float)
                             or not (norm > 0 and math.isfinite(norm))):
        raise ValueError(f"optimizer: max_grad_norm must be a finite number > 0 or None, got {norm!r}.")
    names = config.adapters
    embedding_lr = learning_rate if embedding_lr is None else embedding_lr
    full_lr = learning_rate if full_lr is None else full_lr
    rates = {"learning_rate": learning_rate, "lr_ratio": lr_ratio, "embedding_lr": embedding_lr}
    per_slot = {name: _per_adapter(name, value, names) for name, value in rates.items()}
    for knob in ("learning_rate", "embedding_lr"):
        for value in per_slot[knob]:
            _check_rate(knob, value)
    for ratio in per_slot["lr_ratio"]:
        _check_ratio(ratio)
    if not names:  # one adapter; a bank trains nothing in full, so full_lr is its alone
        _check_rate("full_lr", full_lr)
        return _one(config, learning_rate, lr_ratio, embedding_lr, full_lr, max_grad_norm, base, base_kwargs)
    if len({r == "auto" for r in per_slot["lr_ratio"]}) > 1:
        raise ValueError("optimizer: lr_ratio='auto' for some adapters of a bank and a number for others; "
                         "give every adapter a number, or 'auto' for all.")
    return _bank(config, per_slot, max_grad_norm, base, base_kwargs)


def _check_ratio(lr_ratio) -> None:
    if lr_ratio == "auto":
        return
    if isinstance(lr_ratio, bool) or not isinstance(lr_ratio, int | float) \
            or not (lr_ratio > 0 and math.isfinite(lr_ratio)):
        raise ValueError(
            f"optimizer: lr_ratio must be a finite number > 0 or 'auto', got {lr_ratio!r}; "
            "16 is LoRA+'s recommendation, 1 is plain LoRA."
        )


def _per_adapter(knob: str, value, names: tuple[str, ...]) -> list:
    """``value`` for each adapter of a bank (a ``{name: value}`` dict, or one value for all)."""
    if not isinstance(value, Mapping):
        return [value] * max(len(names), 1)
    if not names:
        raise TypeError(f"optimizer: {knob} is a dict {sorted(value)}, but the config is one adapter, not a "
                        "bank (LoraConfig.adapters is empty); give one value.")
    missing, unknown = [n for n in names if n not in value], sorted(set(value) - set(names))
    if missing or unknown:
        raise ValueError(f"optimizer: {knob} gives {sorted(value)}, but the bank's adapters are "
                         f"{list(names)} (missing {missing}, unknown {unknown}); give one value per adapter.")
    return [value[n] for n in names]


def _one(config, learning_rate, lr_ratio, embedding_lr, full_lr, max_grad_norm, base, base_kwargs):
    """One adapter's transformation; the rates may be traced (one slot of a bank)."""
    auto = isinstance(lr_ratio, str)
    transforms = {
        "a": base(learning_rate, **base_kwargs),
        "b": base(learning_rate if auto else _times(learning_rate, lr_ratio), **base_kwargs),
        "embedding": base(embedding_lr, **base_kwargs),
        "full": base(full_lr, **base_kwargs),
    }
    tx = optax.partition(transforms, functools.partial(labels, config=config))
    if auto:
        tx = optax.chain(tx, _scale_by_auto_ratio(config))
    if max_grad_norm is not None:
        tx = optax.chain(optax.clip_by_global_norm(max_grad_norm), tx)
    return tx


def _slot_rate(values: list, k):
    """Slot ``k``'s (traced) rate from one per adapter: a number, or a schedule if any of them is one."""
    if not any(callable(v) for v in values):
        return jnp.asarray(values, jnp.float32)[k]
    return lambda count: jnp.stack([jnp.asarray(v(count) if callable(v) else v, jnp.float32)
                                    for v in values])[k]


def _bank(bank_config: LoraConfig, per_slot: dict, max_grad_norm, base, base_kwargs):
    """One `_one` per adapter of the bank, vmapped over its leading axis (see `optimizer`)."""
    config, size = dataclasses.replace(bank_config, adapters=()), len(bank_config.adapters)
    ratios = per_slot["lr_ratio"]

    def slot(k):
        ratio = "auto" if ratios[0] == "auto" else jnp.asarray(ratios, jnp.float32)[k]
        lr = _slot_rate(per_slot["learning_rate"], k)
        return _one(config, lr, ratio, _slot_rate(per_slot["embedding_lr"], k), lr, max_grad_norm, base,
                    base_kwargs)

    every = jnp.arange(size)

    def init(params):
        _check_slots(params, size)
        return jax.vmap(lambda p, k: slot(k).init(p))(params, every)

    def update(updates, state, params=None, *, lora_index=None, **extra_args):
        del extra_args
        _check_slots(updates, size)
        if isinstance(lora_index, list | tuple):  # by name, as the wrapped apply function takes it
            lora_index = slots(bank_config, lora_index, size, "optimizer: lora_index")
        if lora_index is not None:
            index = jnp.asarray(lora_index)
            if index.ndim != 1 or not jnp.issubdtype(index.dtype, jnp.integer):
                raise ValueError("optimizer: lora_index must be the batch's integer adapter indices, shape "
                                 f"(batch,), got shape {index.shape} and dtype {index.dtype}.")
        new_updates, new_state = jax.vmap(lambda u, s, p, k: slot(k).update(u, s, p),
                                          in_axes=(0, 0, None if params is None else 0, 0))(
            updates, state, params, every)
        if lora_index is None:
            return new_updates, new_state
        seen = jnp.any(index[:, None] == every[None, :], axis=0)  # (K,): the adapters this batch trained

        def keep(new, old):
            return jnp.where(seen.reshape((size,) + (1,) * (jnp.ndim(new) - 1)), new, old)

        return (jax.tree.map(lambda u: keep(u, jnp.zeros_like(u)), new_updates),
                jax.tree.map(keep, new_state, state))

    return optax.GradientTransformationExtraArgs(init, update)


def _check_slots(tree, size: int) -> None:
    leads = {np.shape(x)[0] if np.ndim(x) else None for x in jax.tree_util.tree_leaves(tree)}
    if leads != {size}:
        raise ValueError(f"optimizer: the config names a bank of {size} adapters, so every leaf must lead "
                         f"with {size} slots; got leading sizes {sorted(map(str, leads))}. Make the bank "
                         "with jlora.init(key, params, config) (config.adapters set) or jlora.stack.")
