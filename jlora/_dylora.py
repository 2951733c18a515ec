"""DyLoRA after training: cut an adapter to rank k, and measure a metric at every rank.

A DyLoRA adapter (``LoraConfig(dylora=...)``) is trained so that its first ``k``
components, scaled by ``alpha/k``, form a good rank-``k`` adapter for every ``k``.
``lora_apply(..., lora_rank=k)`` evaluates it at rank ``k`` without recompiling;
`truncate` exports the rank-``k`` adapter as a plain LoRA adapter of that rank.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable

import jax
import jax.numpy as jnp

from jlora._config import LoraConfig
from jlora._paths import flatten, nest
from jlora._plan import Plan


def _check_dylora_rank(rank, config: LoraConfig) -> int:
    top = max([config.rank, *(r.rank for r in config.targets if r.rank is not None)])
    if isinstance(rank, bool) or not isinstance(rank, int) or not 1 <= rank <= top:
        raise ValueError(f"rank must be an int in 1..{top} (the config's largest rank), got {rank!r}.")
    return rank


def truncate(trainable, config: LoraConfig, rank: int):
    """The rank-``rank`` adapter of a DyLoRA ``trainable``, as plain LoRA.

    Returns ``(trainable_k, config_k)``: each adapter keeps its first
    ``k = min(rank, its rank)`` components (DoRA's ``m`` and leaves trained in full
    are kept), and ``config_k`` has those ranks, the same alpha (so the scale is
    ``alpha/k``) and no DyLoRA. ``wrap(apply_fn, config_k)(frozen, trainable_k, x)``
    equals ``wrap(apply_fn, config)(frozen, trainable, x, lora_rank=rank)``.

    >>> import jax, jax.numpy as jnp
    >>> from jlora import LoraConfig, init
    >>> cfg = LoraConfig(rank=8, targets="w", dylora="frozen")
    >>> _, trainable = init(jax.random.key(0), {"w": jnp.ones((16, 16))}, cfg)
    >>> small, cfg2 = truncate(trainable, cfg, 2)
    >>> small["w"]["a"].shape, small["w"]["b"].shape, cfg2.rank, cfg2.dylora
    ((16, 2), (2, 16), 2, None)
    """
    if not isinstance(config, LoraConfig):
        raise TypeError(f"truncate: expected a jlora.LoraConfig, got {type(config).__name__}.")
    if config.dylora is None:
        raise ValueError("truncate: the config is not a DyLoRA config (dylora=None); only DyLoRA adapters "
                         "are trained to work at every rank.")
    rank = _check_dylora_rank(rank, config)
    plan = Plan.of_trainable(config, trainable, "truncate")
    out = {}
    for (t, factor), (path, leaf) in zip(plan.roles(trainable), flatten(trainable).items(), strict=True):
        if factor in ("a", "b"):
            k = min(rank, t.rank)
            rank_axis = leaf.ndim - 1 if factor == "a" else len(t.layout.stack_axes)
            leaf = jax.lax.slice_in_dim(leaf, 0, k, axis=rank_axis)
        out[path] = leaf
    rules = tuple(dataclasses.replace(r, rank=min(rank, r.rank)) if r.rank is not None else r
                  for r in config.targets)
    return nest(out), dataclasses.replace(config, rank=min(rank, config.rank), targets=rules, dylora=None)


def rank_sweep(evaluate: Callable[[jax.Array], jax.Array], config: LoraConfig,
               ranks: Iterable[int] | None = None) -> dict[int, float]:
    """``{k: evaluate(k)}`` for ``k`` in ``ranks`` (default ``1..config.rank``).

    ``evaluate`` receives ``k`` as an int32 scalar array: pass it on as
    ``lora_apply(..., lora_rank=k)`` and a jitted evaluation compiles once for
    every rank.

    >>> cfg = LoraConfig(rank=3, targets="w", dylora="plain")
    >>> rank_sweep(lambda k: k * 10, cfg)
    {1: 10.0, 2: 20.0, 3: 30.0}
    """
    ranks = range(1, config.rank + 1) if ranks is None else [_check_dylora_rank(k, config) for k in ranks]
    return {k: float(evaluate(jnp.int32(k))) for k in ranks}
