"""The adapter that acts in one call: runtime knobs applied to the stored factors.

Three knobs change values, never shapes, so none of them recompiles:

* the adapter scale ``s`` (0 = base model, 1 = trained adapter): multiplies the
  delta; DoRA's magnitude moves from ``‖W‖`` to ``m`` with it;
* the DyLoRA rank ``k``: components ``k..r`` are masked out and the scale becomes
  ``alpha/k`` (``alpha/sqrt(k)`` with rsLoRA); in the ``"frozen"`` mode, during
  training, components below ``k - 1`` also get no gradient;
* training (``lora_rng`` given): dropout keys, and DyLoRA's sampled rank.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax

from jlora._config import LoraConfig
from jlora._layout import weight_norm
from jlora._plan import Target


@dataclasses.dataclass(frozen=True)
class CallFactors:
    a: Any
    b: Any
    scale: Any  # alpha/r (or alpha/k), times the runtime scale
    m: Any = None  # DoRA magnitude in effect, or None


def _rank_mask(t: Target, config: LoraConfig, a, b, rank, train: bool):
    """Components ``k..r`` of ``t`` masked out, and the scale at rank ``k``.

    ``k`` ranges over ``1..top`` (``top``: the config's largest rank; a target of a
    smaller rank uses all its components above its own rank). A concrete ``k`` outside
    that range is a ValueError; a traced one makes the scale NaN, so the output is NaN
    rather than the adapter at some other rank.
    """
    n_stack = len(t.layout.stack_axes)
    top = max(config.rank_for(r) for r in config.targets)
    if not isinstance(rank, jax.core.Tracer) and not 1 <= int(rank) <= top:
        raise ValueError(f"rank={int(rank)} is out of range for this DyLoRA adapter of rank {top}; choose 1 "
                         f"<= rank <= {top}.")
    in_range = (jnp.asarray(rank) >= 1) & (jnp.asarray(rank) <= top)
    k = jnp.clip(jnp.asarray(rank, jnp.int32), 1, t.rank)
    idx = jnp.arange(t.rank)

    def on_a(v):  # (r,) against a's last axis
        return v.reshape((1,) * (a.ndim - 1) + (t.rank,))

    def on_b(v):  # (r,) against b's rank axis
        return v.reshape((1,) * n_stack + (t.rank,) + (1,) * (b.ndim - n_stack - 1))

    if train and config.dylora == "frozen":
        below = idx < k - 1
        a = jnp.where(on_a(below), lax.stop_gradient(a), a)
        b = jnp.where(on_b(below), lax.stop_gradient(b), b)
    keep = idx < k
    a = a * on_a(keep).astype(a.dtype)
    b = b * on_b(keep).astype(b.dtype)
    kf = k.astype(jnp.float32)
    ratio = jnp.sqrt(t.rank / kf) if config.rslora else t.rank / kf
    return a, b, jnp.where(in_range, t.scale * ratio, jnp.float32(jnp.nan))


def call_factors(t: Target, config: LoraConfig, w, a, b, m, *, scale=None, rank=None,
                 train=False) -> CallFactors:
    """The factors, scale and DoRA magnitude of target ``t`` for one call.

    Args:
      scale: the runtime adapter scale, or ``None`` for the adapter as trained.
      rank: the DyLoRA rank ``k`` (an int or int32 scalar, traced), or ``None`` for
        the full rank.
      train: whether this call trains (DyLoRA's frozen mode stops gradients then).
    """
    s = t.scale
    if rank is not None and config.dylora is not None:
        a, b, s = _rank_mask(t, config, a, b, rank, train)
    if scale is not None:
        s = s * scale
        if m is not None:
            base = weight_norm(lax.stop_gradient(w), t.layout)
            m = base + jnp.asarray(scale, jnp.float32) * (m.astype(jnp.float32) - base)
    return CallFactors(a, b, s, m)


def sample_rank(rng: jax.Array, config: LoraConfig, targets: dict[str, Target]) -> jax.Array:
    """DyLoRA's ``k ~ U{1..r}`` for one training step (``r``: the largest adapter rank)."""
    top = max((t.rank for t in targets.values() if t.adapted), default=1)
    return jax.random.randint(jax.random.fold_in(rng, 0x44594C52), (), 1, top + 1)  # "DYLR"
