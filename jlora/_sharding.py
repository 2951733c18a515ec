"""Shardings that follow the base weights: each adapter lives where its kernel lives.

For an adapted kernel ``W`` whose axes split into stack, in and out axes (its
`Layout`) and whose PartitionSpec is ``S``, the factors take their specs from ``S``:

    a  (*stack, *in, r)    P(*S[stack], *S[in], None)
    b  (*stack, r, *out)   P(*S[stack], None, *S[out])
    m  (*stack, *out)      P(*S[stack], *S[out])          DoRA's magnitude

and a leaf trained in full keeps ``S``. The rank axis is always replicated: it is
small, and keeping it whole means ``x·a`` is split exactly as ``x·W`` is. For a
column-parallel ``W`` (out axes sharded) ``a`` is replicated and ``b`` sharded like
``W``'s columns: the branch needs no communication. For a row-parallel ``W`` (in
axes sharded) ``x·a`` leaves partial sums that XLA reduces over an ``r``-wide
activation, where ``x·W`` reduces a ``d``-wide one. With FSDP (``W`` split along
one axis over every device) the factors are split the same way, so optimizer
state per device shrinks with the device count as the base's does.

`shardings` is the public face; `placement` and `on_mesh` let `jlora.init` create
adapters of a sharded model directly with these shardings, so no device ever holds
a whole kernel it did not hold before; `restore_shardings` tells `jlora.restore`
where to read each stored array (the same rule, never the layout that wrote it).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import numpy as np
from jax.sharding import AxisType, NamedSharding, PartitionSpec

from jlora._config import LoraConfig
from jlora._paths import flatten, nest
from jlora._plan import Plan, Target

Source = NamedSharding | PartitionSpec


def shardings(params, config: LoraConfig, *, specs=None):
    """The shardings of ``trainable`` (from `jlora.init`) that follow the base weights.

    See the module doc for the rule: ``a`` follows W's stack and input axes, ``b``
    W's stack and output axes, DoRA's ``m`` its output axes, the rank axis is
    replicated, and a leaf trained in full keeps W's sharding.

    Args:
      params: the parameter tree given to `jlora.init` (Linen variables or NNX
        state). Its leaves supply shapes, so ``jax.ShapeDtypeStruct`` leaves
        (``jax.eval_shape(model.init, ...)``, unboxed) do as well as arrays. With
        ``specs=None`` they also supply the shardings: each adapted or
        fully-trained leaf must then carry a ``NamedSharding`` (a ``jax.Array``
        placed on a mesh, or a ``ShapeDtypeStruct(..., sharding=...)``).
      config: the `LoraConfig` given to `jlora.init`.
      specs: optional tree with the structure of ``params`` whose leaves are
        ``NamedSharding``s or ``PartitionSpec``s, e.g. ``nn.get_partition_spec(variables)``
        (Linen) or ``nnx.get_partition_spec(state)`` (NNX). A spec shorter than its
        leaf's rank is padded with ``None``, as JAX does.

    Returns:
      a tree with the structure of ``trainable``: ``NamedSharding``s where the
      source was a NamedSharding (use as ``jax.jit`` in/out shardings or with
      ``jax.device_put``), ``PartitionSpec``s where it was a PartitionSpec (use
      with ``NamedSharding(mesh, spec)``, ``jax.lax.with_sharding_constraint`` or
      ``shard_map``).

    Raises:
      ValueError: naming every bad path at once: ``specs`` not shaped like
        ``params``, a spec with more entries than its leaf has axes, a leaf whose
        sharding is not a NamedSharding (or that has none).

    >>> import jax.numpy as jnp
    >>> from jax.sharding import PartitionSpec as P
    >>> from jlora import LoraConfig
    >>> params = {"up": {"kernel": jnp.zeros((8, 32))}, "down": {"kernel": jnp.zeros((32, 8))}}
    >>> specs = {"up": {"kernel": P(None, "model")}, "down": {"kernel": P("model", None)}}
    >>> out = shardings(params, LoraConfig(rank=2, targets=r".*/kernel"), specs=specs)
    >>> out["up"]["kernel"]
    {'a': P(None, None), 'b': P(None, 'model')}
    >>> out["down"]["kernel"]
    {'a': P('model', None), 'b': P(None, None)}
    """
    targets = Plan.of_base(config, params)
    leaves = flatten(params)
    if specs is None:
        return nest(follow(targets, _sources_of_leaves(leaves, targets)))
    return nest(follow(targets, _sources_of_specs(specs, leaves, targets)))


def follow(targets: dict[str, Target], sources: dict[str, Source]) -> dict[str, Source]:
    """``{path/a: …, path/b: …, path/m: …, full_path: …}`` from each target's own sharding."""
    out = {}
    for path, t in targets.items():
        src = sources[path]
        if not t.adapted:
            out[path] = src
            continue
        a, b, m = t.layout.factor_specs(src.spec if isinstance(src, NamedSharding) else src, len(t.shape))
        out[f"{path}/a"], out[f"{path}/b"] = _like(src, a), _like(src, b)
        if t.dora:
            out[f"{path}/m"] = _like(src, m)
    return out


def _like(src: Source, entries: tuple) -> Source:
    spec = PartitionSpec(*entries)
    if isinstance(src, NamedSharding):
        return NamedSharding(src.mesh, spec, memory_kind=src.memory_kind)
    return spec


def _raise(errors: list[str], fix: str) -> None:
    if errors:
        raise ValueError("jlora.shardings:\n  " + "\n  ".join(errors) + f"\n{fix}")


def _spec_length_problem(path: str, src: Source, shape: tuple[int, ...]) -> str | None:
    spec = src.spec if isinstance(src, NamedSharding) else src
    if len(spec) > len(shape):
        return (f"{path}: spec {spec} has {len(spec)} entries but the leaf has shape {shape} "
                f"({len(shape)} axes); give at most {len(shape)} entries, one per axis.")
    return None


def _sources_of_specs(specs, leaves: dict[str, Any], targets: dict[str, Target]) -> dict[str, Source]:
    flat = flatten(specs)
    missing = [p for p in leaves if p not in flat]
    extra = [p for p in flat if p not in leaves]
    errors = [f"{p}: in params but not in specs" for p in missing[:5]]
    errors += [f"{p}: in specs but not in params" for p in extra[:5]]
    if len(missing) + len(extra) > 10:
        errors.append(f"… {len(missing) + len(extra) - 10} more")
    _raise(errors, "specs must have the structure of params (a None leaf counts as no leaf; write P() for "
                   "'replicated').")
    for path, t in targets.items():
        src = flat[path]
        if not isinstance(src, NamedSharding | PartitionSpec):
            kind = type(src).__name__
            errors.append(f"{path}: spec {src!r} is a {kind}, not a NamedSharding or PartitionSpec")
        else:
            errors.append(_spec_length_problem(path, src, t.shape))
    _raise([e for e in errors if e], "Give one NamedSharding or PartitionSpec per leaf, e.g. "
                                     "nn.get_partition_spec(variables) or nnx.get_partition_spec(state).")
    return {path: flat[path] for path in targets}


def single_device(device: jax.Device | None = None) -> jax.sharding.Sharding:
    """The sharding that keeps an array whole on ``device`` (default: this process's first device).

    The one spelling that works on every supported jax: 0.12 deprecates naming
    ``jax.sharding.SingleDeviceSharding``, and ``make_single_device_sharding`` exists from 0.10.

    >>> single_device().num_devices
    1
    """
    return jax.sharding.make_single_device_sharding(jax.local_devices()[0] if device is None else device)


def is_single_device(sharding: Any) -> bool:
    """Whether ``sharding`` is what `single_device` makes (``False`` for ``None`` or any other sharding).

    >>> is_single_device(single_device()), is_single_device(None)
    (True, False)
    """
    check = getattr(jax.sharding, "is_single_device_sharding", None)  # jax >= 0.12
    if check is None:  # jax 0.10 and 0.11, where the class name is not deprecated
        return isinstance(sharding, jax.sharding.SingleDeviceSharding)
    return isinstance(sharding, jax.sharding.Sharding) and check(sharding)


def _sharding_of(leaf):
    """A concrete leaf's sharding; ``None`` for a tracer (``init`` under ``jit``) or a leaf without one."""
    return None if isinstance(leaf, jax.core.Tracer) else getattr(leaf, "sharding", None)


def _sources_of_leaves(leaves: dict[str, Any], targets: dict[str, Target]) -> dict[str, Source]:
    errors, out = [], {}
    for path in targets:
        leaf = leaves[path]
        sharding = _sharding_of(leaf)
        if isinstance(sharding, NamedSharding):
            out[path] = sharding
        elif sharding is None:
            errors.append(f"{path}: a {type(leaf).__name__} with no sharding")
        else:
            kind = type(sharding).__name__
            errors.append(f"{path}: its sharding is a {kind}, not a NamedSharding ({sharding})")
    _raise(errors, "Adapter shardings follow a mesh's axis names, so each adapted or fully-trained leaf "
                   "needs a NamedSharding: place params with jax.device_put(params, NamedSharding(mesh, "
                   "spec)) (or create them under jax.jit(..., out_shardings=...)), or pass specs= "
                   "(PartitionSpecs or NamedShardings).")
    return out


def placement(targets: dict[str, Target], leaves: dict[str, Any],
              who: str = "jlora.init") -> dict[str, NamedSharding]:
    """The NamedSharding of every target leaf when they lie on a mesh; ``{}`` when none does.

    Tracers (``init`` called inside ``jit``) and arrays on a single device count as
    not on a mesh. Half on a mesh and half not is refused: the adapters would be
    spread over two device sets.
    """
    placed, loose = {}, []
    for path in targets:
        leaf = leaves[path]
        sharding = _sharding_of(leaf)
        if isinstance(sharding, NamedSharding):
            placed[path] = sharding
        else:
            loose.append(f"{path} ({type(leaf if sharding is None else sharding).__name__})")
    if placed and loose:
        raise ValueError(
            f"{who}: {len(placed)} targeted leaves lie on a mesh (NamedSharding, e.g. "
            f"{next(iter(placed))}) but these do not: {', '.join(loose[:5])}. Place every adapted or "
            "fully-trained leaf on the mesh (jax.device_put(params, shardings)) or none of them."
        )
    return placed


def refuse_partitioned_svd(targets: dict[str, Target], placed: dict[str, NamedSharding]) -> None:
    """PiSSA's SVD needs each whole kernel: refuse kernels split across devices, naming them."""
    split = [f"{p} ({placed[p].spec})" for p, t in targets.items()
             if t.adapted and not placed[p].is_fully_replicated]
    if split:
        raise ValueError(
            "jlora.init: init='pissa' takes an SVD of each whole kernel, and these are split across devices: "
            f"{', '.join(split[:5])}. XLA would gather every one whole onto every device, which sharding "
            "is meant to avoid. Gather on purpose if they fit (jax.device_put(params, NamedSharding(mesh, "
            "P()))), init there, then jax.device_put(trainable, jlora.shardings(sharded_params, config)) and "
            "put the residual frozen back with the params' shardings; or use init='kaiming_uniform'."
        )


def restore_shardings(targets: dict[str, Target], leaves: dict[str, Any], stored: list[str],
                      given=None) -> dict[str, jax.sharding.Sharding]:
    """Where `jlora.restore` puts each stored leaf: ``{leaf path: Sharding}``.

    ``given`` (a tree shaped like ``trainable`` whose leaves are shardings) wins.
    Otherwise the adapters follow the base: `follow` when its targeted leaves lie
    on a mesh, else the one device they share (the first local device when they
    are NumPy arrays or spread out). Never the layout recorded in the checkpoint:
    that names the devices of whatever wrote it, another mesh or other processes.
    """
    if given is not None:
        flat = flatten(given)
        errors = [f"{p}: stored in the checkpoint, missing from shardings" for p in stored if p not in flat]
        errors += [f"{p}: in shardings, not stored in the checkpoint" for p in flat if p not in stored]
        errors += [f"{p}: {s!r} is a {type(s).__name__}, not a jax.sharding.Sharding"
                   for p, s in flat.items() if p in stored and not isinstance(s, jax.sharding.Sharding)]
        if len(errors) > 10:
            errors[10:] = [f"… {len(errors) - 10} more"]
        if errors:
            raise ValueError(
                "restore: shardings= does not fit the checkpoint:\n  " + "\n  ".join(errors)
                + "\nGive one jax.sharding.Sharding per leaf of trainable, nested like it, e.g. "
                "jlora.shardings(frozen, config), or NamedSharding(mesh, spec) for each PartitionSpec."
            )
        return {p: flat[p] for p in stored}
    placed = placement(targets, leaves, "restore")
    if placed:
        return follow(targets, placed)
    devices = {s for p in targets if is_single_device(s := _sharding_of(leaves[p]))}
    one = devices.pop() if len(devices) == 1 else single_device()
    return dict.fromkeys(stored, one)


def on_mesh(make: Callable, key: jax.Array, targets: dict[str, Target], leaves: dict[str, Any],
            placed: dict[str, NamedSharding]):
    """``make(key, needed)`` under ``jit``, each output created in the sharding that follows its kernel.

    ``needed`` holds only the leaves whose values ``make`` reads (DoRA kernels for
    their norm, leaves trained in full for their copy); a plain LoRA kernel never
    enters the computation, only its shape does. The key travels as host data, so
    a key committed to one device, or living on another process, works alike. On a
    mesh with explicit axes (``jax.make_mesh``'s default) the computation runs on
    the same devices with the axes made automatic, since DoRA's norm reshapes
    sharded axes, which explicit sharding refuses to guess; the results come back
    with the explicit shardings.
    """
    out_shardings = nest(follow(targets, placed))
    needed = {p: leaves[p] for p, t in targets.items() if not t.adapted or t.dora}
    explicit = any(not s.mesh.are_all_axes_auto for s in placed.values())
    if explicit:
        needed = {p: jax.device_put(x, _auto(x.sharding)) for p, x in needed.items()}
    if jax.dtypes.issubdtype(key.dtype, jax.dtypes.prng_key):
        data, impl = np.asarray(jax.random.key_data(key)), jax.random.key_impl(key)
    else:
        data, impl = np.asarray(key), None

    def run(data, needed):
        return make(data if impl is None else jax.random.wrap_key_data(data, impl=impl), needed)

    if not explicit:
        return jax.jit(run, out_shardings=out_shardings)(data, needed)
    made = jax.jit(run, out_shardings=jax.tree.map(_auto, out_shardings))(data, needed)
    return jax.device_put(made, out_shardings)


def _auto(s: NamedSharding) -> NamedSharding:
    """``s`` on the same devices with every mesh axis automatic."""
    mesh = s.mesh.update(axis_types=(AxisType.Auto,) * len(s.mesh.axis_names))
    return NamedSharding(mesh, s.spec, memory_kind=s.memory_kind)
