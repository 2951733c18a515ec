"""Many adapters on one base: a bank of K adapters stacked along a leading axis.

A bank is made in one of two ways. `stack` puts K adapters trained on the same
base (ranks and alphas may differ) into one `trainable` whose factors carry a
leading adapter axis, ranks zero-padded to a common capacity and each adapter's
scale folded into its ``b``; the returned config has scale 1 for every target.
`jlora.init` with ``LoraConfig(adapters=names)`` makes K fresh adapters of one
config to train together (`jlora.optimizer` steps each on its own). Either way the
config names the slots, and one compiled step serves any of them:

* ``lora_apply(frozen, bank, x, lora_weights={"fr": 0.7, "de": 0.3})``: the named
  adapters' deltas weighted and added, gathered first so that only they run (rank
  ``n·r`` for ``n`` names). A dense ``w`` of shape ``(K,)`` weighs every slot and
  runs all of them, as one adapter of rank ``K·r``. Exact either way.
* ``lora_apply(frozen, bank, x, lora_index=i)``: adapter ``i[n]`` for example
  ``n`` of the batch (``-1``: the base model alone), in the same call.
* `put` writes another adapter (rank <= the capacity) into a slot: same shapes,
  so a compiled step takes it without recompiling (hot swap).

Zero padding is exact: the padded components have ``a = b = 0`` and add nothing.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import re
from collections.abc import Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jlora._config import LoraConfig, Rule
from jlora._paths import flatten, nest
from jlora._plan import Plan, Target
from jlora._variants import refuse


def _check_plain(config: LoraConfig, where: str) -> None:
    if not isinstance(config, LoraConfig):
        raise TypeError(f"{where}: expected (trainable, jlora.LoraConfig) pairs, got "
                        f"{type(config).__name__}.")
    refuse(config, "bank", where)


def _entries(trainable, config: LoraConfig, where: str) -> dict[str, tuple]:
    """``{kernel_path: (a, b, layout)}`` of one adapter, its scale folded into ``b``."""
    plan = Plan.of_trainable(config, trainable, where)
    full = [p for p, t in plan.items() if t.trained_in_full]
    if full:
        raise ValueError(
            f"{where}: {full[0]} is trained in full; a bank holds low-rank adapters only (serve leaves "
            "trained in full by merging them into the frozen base)."
        )
    out = {}
    for path, (a, b, _) in plan.read(trainable).items():
        out[path] = (a, b * jnp.asarray(plan[path].scale, b.dtype), plan[path].layout)
    return out


def _pad_rank(x, axis: int, rank: int):
    pad = [(0, 0)] * x.ndim
    pad[axis] = (0, rank - x.shape[axis])
    return jnp.pad(x, pad)


def stack(adapters: Sequence[tuple] | Mapping[str, tuple], *, rank: int | None = None):
    """Stack K ``(trainable, config)`` adapters made on one base into a bank.

    Args:
      adapters: ``(trainable, config)`` pairs from `init` (or `restore`) on the same
        frozen base, or a dict of them by name (slot ``k`` holds the ``k``-th name; a
        sequence's slots are named ``"0"``, ``"1"``, ...), all adapting the same kernels with
        the same axis split and the same nonlinearity; ranks and alphas may differ.
      rank: the rank capacity (default: the largest rank at each kernel), capped
        per kernel at ``min(fan_in, fan_out)``; a bank compiled at capacity ``R``
        takes any adapter of rank ``<= R`` through `put`.

    Returns:
      ``(bank, config)``: ``bank`` holds at each adapted path ``a`` of shape
      ``(K, *stack, *in, R)`` and ``b`` of shape ``(K, *stack, R, *out)``;
      ``config`` adapts the same paths at rank ``R`` with scale 1, and names the slots
      (``config.adapters``): serving, `put`, `unstack`, `save` and `restore` read them.

    >>> import jax, jax.numpy as jnp
    >>> from jlora import LoraConfig, init
    >>> params = {"w": jnp.ones((8, 4))}
    >>> one = init(jax.random.key(0), params, LoraConfig(rank=2, targets="w"))[1]
    >>> two = init(jax.random.key(1), params, LoraConfig(rank=3, targets="w"))[1]
    >>> bank, cfg = stack([(one, LoraConfig(rank=2, targets="w")), (two, LoraConfig(rank=3, targets="w"))])
    >>> bank["w"]["a"].shape, bank["w"]["b"].shape, cfg.rank
    ((2, 8, 3), (2, 3, 4), 3)
    """
    if isinstance(adapters, Mapping):  # named adapters: slot k is the k-th name
        names = tuple(adapters)
        bad = [n for n in names if not isinstance(n, str) or not n]
        if bad:
            raise TypeError(f"stack: adapter names must be non-empty strings, got {bad[0]!r}.")
        adapters = list(adapters.values())
    else:  # a sequence: its slots are named "0", "1", ...
        adapters = list(adapters)
        names = tuple(str(k) for k in range(len(adapters)))
    if not adapters:
        raise ValueError("stack: give at least one (trainable, config) pair.")
    entries = []
    for i, pair in enumerate(adapters):
        if not (isinstance(pair, tuple | list) and len(pair) == 2):
            raise TypeError(f"stack: adapter {i} must be a (trainable, config) pair, got "
                            f"{type(pair).__name__}.")
        _check_plain(pair[1], f"stack: adapter {i}")
        entries.append(_entries(pair[0], pair[1], f"stack: adapter {i}"))
    configs = [c for _, c in adapters]
    if len({c.nonlinearity for c in configs}) != 1:
        raise ValueError(
            "stack: the adapters use different nonlinearities "
            f"{sorted({c.nonlinearity for c in configs})}; a bank applies one f to all of them."
        )
    paths = set(entries[0])
    errors = [f"adapter {i} adapts {sorted(set(e) ^ paths)} differently from adapter 0"
              for i, e in enumerate(entries) if set(e) != paths]
    top = max(e[p][0].shape[-1] for e in entries for p in e)
    if rank is not None and (isinstance(rank, bool) or not isinstance(rank, int) or rank < top):
        errors.append(f"rank={rank!r} is below the largest adapter rank {top}; use rank >= {top}.")
    for path in sorted(paths) if not errors else ():
        splits = {(e[path][2].in_axes, e[path][2].stack_axes) for e in entries}  # layouts
        if len(splits) > 1:
            errors.append(f"{path}: the adapters split this kernel differently (in_axes, stack_axes): "
                          f"{sorted(map(str, splits))}")
            continue
        n_stack = len(entries[0][path][2].stack_axes)
        widths = [(e[path][0].shape[:-1], e[path][1].shape[:n_stack] + e[path][1].shape[n_stack + 1:])
                  for e in entries]
        if len(set(widths)) > 1:
            each = ", ".join(f"adapter {i}: {ins} -> {outs}" for i, (ins, outs) in enumerate(widths))
            errors.append(f"{path}: the kernels differ in width (input -> output shape, without the rank): "
                          f"{each}; a bank stacks adapters trained on one base")
    if errors:
        raise ValueError("stack: the adapters do not fit one bank:\n  " + "\n  ".join(errors))
    bank, rules = {}, []
    for path in sorted(paths):
        layout = entries[0][path][2]
        n_stack = len(layout.stack_axes)
        a0, b0 = entries[0][path][0], entries[0][path][1]
        most = min(math.prod(a0.shape[n_stack:-1]), math.prod(b0.shape[n_stack + 1:]))  # min(fan_in, fan_out)
        cap = min(max(e[path][0].shape[-1] for e in entries) if rank is None else rank, most)
        a = jnp.stack([_pad_rank(e[path][0], e[path][0].ndim - 1, cap) for e in entries])
        b = jnp.stack([_pad_rank(e[path][1], n_stack, cap) for e in entries])
        bank[f"{path}/a"], bank[f"{path}/b"] = a, b
        rules.append(Rule(pattern=re.escape(path), rank=cap, alpha=float(cap), in_axes=layout.in_axes,
                          stack_axes=layout.stack_axes))
    rank = max(r.rank for r in rules)
    config = LoraConfig(rank=rank, alpha=float(rank), targets=tuple(rules),
                        nonlinearity=configs[0].nonlinearity, dtype=configs[0].dtype, adapters=names)
    return nest(bank), config


def _size(bank) -> int:
    return next(iter(flatten(bank).values())).shape[0]


def slot(config: LoraConfig, adapter, size: int, who: str) -> int:
    """The slot of ``adapter`` (a name of ``config.adapters`` or a slot number) in a bank of ``size``."""
    if isinstance(adapter, str):
        if adapter in config.adapters:
            return config.adapters.index(adapter)
        if not config.adapters:
            raise ValueError(f"{who}: {adapter!r} names an adapter, but this bank has no names; stack a dict "
                             "{name: (trainable, config)} to name its slots, or give a slot number.")
        close = difflib.get_close_matches(adapter, config.adapters, n=3, cutoff=0.3)
        raise ValueError(f"{who}: no adapter named {adapter!r} in this bank; its names are "
                         f"{list(config.adapters)} (closest: {close}).")
    if isinstance(adapter, bool) or not isinstance(adapter, int | np.integer) or not 0 <= adapter < size:
        raise ValueError(f"{who}: an adapter is a name of the bank or a slot in 0..{size - 1}, got "
                         f"{adapter!r}.")
    return int(adapter)


def slots(config: LoraConfig, adapters, size: int, who: str) -> np.ndarray:
    """``lora_index`` given by name: one name (or ``None``, the base model) per example, as int32 slots."""
    return np.array([-1 if a is None else slot(config, a, size, who) for a in adapters], np.int32)


def mix(config: LoraConfig, weights: Mapping, size: int, who: str) -> tuple[np.ndarray, jax.Array]:
    """``lora_weights`` given as ``{name or slot: weight}``: the named slots (int32) and their weights.

    Only these adapters are gathered and run (rank ``n·R`` for ``n`` of them, not ``K·R``);
    the others weigh 0 and cost nothing.
    """
    if not weights:
        first = (config.adapters or ("0",))[0]
        raise ValueError(f"{who}: an empty dict selects no adapter; name at least one, e.g. "
                         f"{{{first!r}: 1.0}}, or pass lora_scale=0 for the base model.")
    picked = [slot(config, adapter, size, who) for adapter in weights]
    twice = sorted({k for k in picked if picked.count(k) > 1})
    if twice:
        raise ValueError(f"{who}: {dict(weights)!r} weighs slot {twice[0]} twice (by name and by number); "
                         "give each adapter once.")
    return np.array(picked, np.int32), jnp.stack([jnp.asarray(w, jnp.float32) for w in weights.values()])


def _one_adapter(config: LoraConfig) -> LoraConfig:
    """The config of one slot of a bank."""
    return dataclasses.replace(config, adapters=())


def unstack(bank, config: LoraConfig, adapter):
    """One adapter of a bank, as ``(trainable, config)`` of a single adapter: e.g. to export to PEFT.

    ``adapter`` is a name of the bank or a slot number. The factors are the bank's (rank
    the bank's capacity; from `stack`, the adapter's scale folded into ``b`` and a config of
    scale 1), and the config is the bank's without its names, so
    ``wrap(apply_fn, config)(frozen, trainable, x)`` equals serving that slot.

    >>> import jax, jax.numpy as jnp
    >>> from jlora import init
    >>> params = {"w": jnp.ones((8, 4))}
    >>> make = lambda seed: init(jax.random.key(seed), params, LoraConfig(rank=2, targets="w"))[1]
    >>> bank, cfg = stack({"fr": (make(0), LoraConfig(rank=2, targets="w")),
    ...                    "de": (make(1), LoraConfig(rank=2, targets="w"))})
    >>> de, de_cfg = unstack(bank, cfg, "de")
    >>> de["w"]["a"].shape, de_cfg.adapters, cfg.adapters
    ((8, 2), (), ('fr', 'de'))
    """
    if not isinstance(config, LoraConfig):
        raise TypeError(f"unstack: expected the bank's jlora.LoraConfig, got {type(config).__name__}.")
    k = slot(config, adapter, _size(bank), "unstack")
    one = nest({path: x[k] for path, x in flatten(bank).items()})
    return one, _one_adapter(config)


def put(bank, config: LoraConfig, adapter: str | int, trainable, adapter_config: LoraConfig):
    """``bank`` with the adapter at ``adapter`` (a name of the bank or a slot) replaced by ``trainable``.

    ``trainable`` may have any rank up to the bank's.

    Shapes and dtypes do not change, so a step compiled for the bank runs the new
    adapter without recompiling.
    """
    _check_plain(adapter_config, "put")
    flat = flatten(bank)
    k = slot(config, adapter, _size(bank), "put")
    new = _entries(trainable, adapter_config, "put")
    bank_paths = {p.rpartition("/")[0] for p in flat}
    # A bank from `stack` has scale 1 (the scales are folded into b); one from `init` keeps its config's.
    one = nest({p: x[0] for p, x in flat.items()})
    bank_scale = {p: t.scale for p, t in Plan.of_trainable(_one_adapter(config), one, "put").items()}
    errors = [f"{p}: not in the bank" for p in sorted(set(new) - bank_paths)]
    errors += [f"{p}: missing from the new adapter" for p in sorted(bank_paths - set(new))]
    out = dict(flat)
    for path, (a, b, layout) in sorted(new.items()):
        if path not in bank_paths:
            continue
        cap = flat[f"{path}/a"].shape[-1]
        if a.shape[-1] > cap:
            errors.append(f"{path}: rank {a.shape[-1]} exceeds the bank's capacity {cap}; stack with rank >= "
                          "it")
            continue
        a = _pad_rank(a, a.ndim - 1, cap)
        b = _pad_rank(b / jnp.asarray(bank_scale[path], b.dtype), len(layout.stack_axes), cap)
        for name, x in (("a", a), ("b", b)):
            want = flat[f"{path}/{name}"]
            if x.shape != want.shape[1:]:
                errors.append(f"{path}/{name}: shape {x.shape}, the bank holds {want.shape[1:]}")
            else:
                out[f"{path}/{name}"] = want.at[k].set(x.astype(want.dtype))
    if errors:
        raise ValueError("put: the adapter does not fit the bank:\n  " + "\n  ".join(errors))
    return nest(out)



def weighted(t: Target, a, b, weights):
    """The bank's weighted sum as one adapter of rank ``K·R`` (exact; scales are in ``b``)."""
    n_stack = len(t.layout.stack_axes)
    k, rank = a.shape[0], a.shape[-1]
    a_cat = jnp.moveaxis(a, 0, -2).reshape(*a.shape[1:-1], k * rank)
    w = weights.astype(b.dtype).reshape((k,) + (1,) * (b.ndim - 1))
    b_w = jnp.moveaxis(b * w, 0, n_stack)
    b_cat = b_w.reshape(*b_w.shape[:n_stack], k * rank, *b_w.shape[n_stack + 2:])
    return a_cat, b_cat


