"""Select, then act: resolve a `LoraConfig` against the leaves of a parameter tree.

`resolve` decides, for every leaf path, whether it is adapted (and with which rank,
scale and axis layout), trained in full, or frozen. `init`, `wrap` and `merge` all
call it, so they agree by construction. `check_trainable` checks a `trainable`
tree against that decision and reports every mismatch at once.
"""

from __future__ import annotations

import dataclasses
import difflib
import re

import jax
import jax.numpy as jnp
import numpy as np

from jlora._config import LoraConfig, Rule
from jlora._layout import Layout, default_layout, m_shape
from jlora._paths import adapter_of, flatten, leaf_paths, leaves


@dataclasses.dataclass(frozen=True)
class Target:
    """What happens to one leaf: an adapter (``layout`` set) or full training."""

    path: str
    shape: tuple[int, ...]
    rank: int = 0
    scale: float = 0.0
    layout: Layout | None = None
    embedding: bool = False
    dora: bool = False

    @property
    def is_lora(self) -> bool:
        return self.layout is not None


def _close(pattern: str, paths: list[str]) -> str:
    close = difflib.get_close_matches(pattern, paths, n=3, cutoff=0.3) or paths[:3]
    return ", ".join(close)


def _floating(x) -> bool:
    dtype = getattr(x, "dtype", None)
    return dtype is not None and jnp.issubdtype(dtype, jnp.floating)


def _lora_target(path, leaf, rule, config) -> tuple[Target | None, str | None]:
    shape = tuple(np.shape(leaf))
    where = f"rule {rule.pattern!r} matched {path} (shape {shape}"
    if not _floating(leaf):
        return None, f"{where}, dtype {getattr(leaf, 'dtype', type(leaf).__name__)}): LoRA adapts floating-point kernels only; narrow the pattern, e.g. '.*/kernel'."
    if any(ax >= len(shape) for ax in rule.stack_axes + (rule.in_axes or ())):
        return None, f"{where}): its axes {rule.in_axes or ()} / stack_axes {rule.stack_axes} do not exist on a {len(shape)}-D leaf."
    if len(shape) - len(rule.stack_axes) < 2:
        return None, f"{where}): LoRA cannot adapt a leaf with fewer than 2 axes (a bias or a scalar); narrow the pattern, e.g. '.*/kernel', or train it in full with train_in_full."
    layout = default_layout(path, len(shape), rule.in_axes, rule.stack_axes)
    if not layout.in_axes or not layout.out_axes:
        return None, f"{where}): in_axes={layout.in_axes} leave no input or no output axis; pick in_axes that split the kernel."
    rank = config.rank_for(rule)
    fan_in = layout.fan_in(shape)
    fan_out = int(np.prod([shape[i] for i in layout.out_axes]))
    if rank > min(fan_in, fan_out):
        return None, f"{where}): rank {rank} exceeds min(fan_in={fan_in}, fan_out={fan_out}); use rank <= {min(fan_in, fan_out)} via Rule({rule.pattern!r}, rank=...)."
    embedding = path.rsplit("/", 1)[-1] == "embedding"
    if embedding and config.dora:
        return None, f"{where}): DoRA rescales a layer's output units and is not defined here for embedding tables; exclude them from targets or set dora=False."
    return Target(path, shape, rank, config.scale_for(rule), layout, embedding, config.dora), None


def resolve(config: LoraConfig, tree) -> dict[str, Target]:
    """Map every adapted or fully-trained leaf path of ``tree`` to its `Target`.

    Raises:
      ValueError: listing every problem at once: a rule or ``train_in_full``
        pattern that matches nothing (with the paths that look closest), a rule
        that matches a leaf LoRA cannot adapt, a rank too large for a kernel, a
        leaf both adapted and trained in full.
    """
    if not isinstance(config, LoraConfig):
        raise TypeError(f"expected a jlora.LoraConfig, got {type(config).__name__}.")
    paths = leaf_paths(tree)
    errors: list[str] = []
    rule_hits = [0] * len(config.rules)
    full_hits = [0] * len(config.train_in_full)
    targets: dict[str, Target] = {}
    for path, leaf in zip(paths, leaves(tree), strict=True):
        rule_i = next((i for i, r in enumerate(config.rules) if re.fullmatch(r.pattern, path)), None)
        full_i = [i for i, p in enumerate(config.train_in_full) if re.fullmatch(p, path)]
        for i in full_i:
            full_hits[i] += 1
        if rule_i is not None:
            rule_hits[rule_i] += 1
            if full_i:
                errors.append(
                    f"{path} is both adapted (rule {config.rules[rule_i].pattern!r}) and trained in full "
                    f"(train_in_full {config.train_in_full[full_i[0]]!r}); drop it from one of them."
                )
                continue
            target, error = _lora_target(path, leaf, config.rules[rule_i], config)
            if error:
                errors.append(error)
            else:
                targets[path] = target
        elif full_i:
            if not _floating(leaf):
                errors.append(f"train_in_full matched {path} (dtype {getattr(leaf, 'dtype', None)}): only floating-point leaves can be trained.")
                continue
            targets[path] = Target(path, tuple(np.shape(leaf)))
    for rule, hits in zip(config.rules, rule_hits, strict=True):
        if not hits:
            errors.append(f"LoRA rule {rule.pattern!r} matched no parameter. Paths that look close: {_close(rule.pattern, paths)}")
    for pattern, hits in zip(config.train_in_full, full_hits, strict=True):
        if not hits:
            errors.append(f"train_in_full pattern {pattern!r} matched no parameter. Paths that look close: {_close(pattern, paths)}")
    if errors:
        raise ValueError("\n".join(errors))
    return targets


def check_trainable(targets: dict[str, Target], trainable) -> dict[str, jax.Array | tuple]:
    """Check ``trainable`` fits the targets; return ``{path: leaf or (a, b, m or None)}``.

    Raises:
      ValueError: naming every missing, unexpected or mis-shaped path.
    """
    flat = flatten(trainable)
    errors, out = [], {}
    expected = {}
    for path, t in targets.items():
        if t.is_lora:
            expected[f"{path}/a"] = t.layout.a_shape(t.shape, t.rank)
            expected[f"{path}/b"] = t.layout.b_shape(t.shape, t.rank)
            if t.dora:
                expected[f"{path}/m"] = m_shape(t.shape, t.layout)
        else:
            expected[path] = t.shape
    for path, shape in expected.items():
        if path not in flat:
            errors.append(f"missing {path} (expected shape {shape})")
        elif tuple(np.shape(flat[path])) != shape:
            errors.append(f"{path} has shape {tuple(np.shape(flat[path]))}, expected {shape}")
        elif not _floating(flat[path]):
            errors.append(f"{path} has dtype {jnp.result_type(flat[path]).name}; LoRA factors and leaves trained "
                          "in full are floating point (LoraConfig.dtype, float32 by default): cast with "
                          ".astype(jnp.float32)")
    for path in flat:
        if path not in expected:
            errors.append(f"unexpected {path} (shape {tuple(np.shape(flat[path]))}): no target of this config has that path")
    if errors:
        raise ValueError(
            "trainable does not fit frozen and config:\n  " + "\n  ".join(errors)
            + "\nMake trainable with jlora.init(key, params, config) using the same config."
        )
    for path, t in targets.items():
        out[path] = (flat[f"{path}/a"], flat[f"{path}/b"], flat.get(f"{path}/m")) if t.is_lora else flat[path]
    return out


@dataclasses.dataclass(frozen=True)
class Misfit:
    """An adapter of ``trainable`` that implies no kernel under the config (``rule`` None: no rule matches)."""

    kernel: str
    a_shape: tuple[int, ...]
    b_shape: tuple[int, ...]
    rule: Rule | None


def implied_base(trainable, config: LoraConfig, dtype) -> tuple[dict, list[Misfit]]:
    """Stand-ins for the base leaves that ``trainable`` implies, keyed by path, with the misfits.

    Each adapter ``{a: (*stack, *in, r), b: (*stack, r, *out)}`` implies its kernel's
    shape once its rule says which axes are stacked and which are inputs; the kernel
    stands as a zero-strided view of one zero of ``dtype`` (no memory). A leaf that is
    not an adapter stands for itself. `resolve` on ``nest(base)`` then checks the rest.
    """
    flat = flatten(trainable)
    base, misfits = {}, []
    for path, leaf in flat.items():
        hit = adapter_of(path, flat)
        if hit is None:
            base[path] = leaf
            continue
        kernel, factor = hit
        if factor != "a":
            continue
        a, b = tuple(np.shape(leaf)), tuple(np.shape(flat[f"{kernel}/b"]))
        rule = config.rule_for(kernel)
        shape = None if rule is None else _kernel_shape(kernel, a, b, rule)
        if shape is None:
            misfits.append(Misfit(kernel, a, b, rule))
        else:
            base[kernel] = np.broadcast_to(np.zeros((), dtype), shape)
    return base, misfits


def _kernel_shape(kernel: str, a: tuple, b: tuple, rule: Rule) -> tuple[int, ...] | None:
    ns = len(rule.stack_axes)
    ndim = len(a) + len(b) - 2 - ns
    if ndim - ns < 2 or any(ax >= ndim for ax in (*rule.stack_axes, *(rule.in_axes or ()))):
        return None
    layout = default_layout(kernel, ndim, rule.in_axes, rule.stack_axes)
    if len(a) != ns + len(layout.in_axes) + 1 or not layout.out_axes:
        return None
    shape = [0] * ndim
    for axis, size in zip((*layout.stack_axes, *layout.in_axes), a[:-1], strict=True):
        shape[axis] = size
    for axis, size in zip(layout.out_axes, b[ns + 1:], strict=True):
        shape[axis] = size
    return tuple(shape)
