"""The plan: a `LoraConfig` resolved once against a tree, read by every verb.

`Plan.of_base(config, params)` decides, for every leaf path, whether it is adapted
(with which rank, scale and axis layout), trained in full, or frozen;
`Plan.of_trainable(config, trainable, who)` reaches the same decision from the adapters
alone (each implies its kernel's shape), for the verbs that hold no base:
checkpoint, PEFT export, DyLoRA, banks, combine and the optimizer. A plan is a
read-only mapping ``{path: Target}``; `Plan.read` checks a ``trainable`` against
it and reports every mismatch at once. Because every verb reads a plan, they agree
by construction, and "no rule matches" is worded in one place (`no_rule`).
"""

from __future__ import annotations

import dataclasses
import difflib
import re
from collections.abc import Iterator, Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jlora._config import LoraConfig, Rule
from jlora._layout import Layout, default_layout, m_shape
from jlora._paths import ADAPTER_KEYS, adapter_of, flatten, leaf_paths, leaves, nest
from jlora._variants import refusals


@dataclasses.dataclass(frozen=True)
class Target:
    """What happens to one leaf: an adapter (``layout`` set) or full training (``layout`` None)."""

    path: str
    shape: tuple[int, ...]
    rank: int = 0
    scale: float = 0.0
    layout: Layout | None = None
    embedding: bool = False
    dora: bool = False
    alpha: float = 0.0

    @property
    def adapted(self) -> bool:
        return self.layout is not None

    @property
    def trained_in_full(self) -> bool:
        return self.layout is None

    def factor_shapes(self) -> dict[str, tuple[int, ...]]:
        """``{leaf path in trainable: shape}`` of this target's trainable leaves."""
        if self.layout is None:
            return {self.path: self.shape}
        shapes = {f"{self.path}/a": self.layout.a_shape(self.shape, self.rank),
                  f"{self.path}/b": self.layout.b_shape(self.shape, self.rank)}
        if self.dora:
            shapes[f"{self.path}/m"] = m_shape(self.shape, self.layout)
        return shapes


class Factors(NamedTuple):
    """One adapter's stored factors (``m``: DoRA's magnitude, or None)."""

    a: Any
    b: Any
    m: Any = None


def no_rule(kernel: str) -> str:
    """The one wording of "this adapter has no rule in the config"."""
    return (f"trainable holds an adapter at {kernel}, but no rule of the config matches that path; pass the "
            "config the adapter was made with (the one given to jlora.init)")


def _close(pattern: str, paths: list[str]) -> str:
    close = difflib.get_close_matches(pattern, paths, n=3, cutoff=0.3) or paths[:3]
    return ", ".join(close)


def _floating(x) -> bool:
    dtype = getattr(x, "dtype", None)
    return dtype is not None and jnp.issubdtype(dtype, jnp.floating)


def _bank_hint(config: LoraConfig) -> str:
    """For a bank's config, how to reach one adapter (a verb that takes one was given a bank)."""
    if not config.adapters:
        return ""
    return (f"\nThis config names a bank of {len(config.adapters)} adapters {list(config.adapters)}, whose "
            "leaves lead with one slot per adapter: serve it with lora_index= or lora_weights=, or take one "
            "adapter out with jlora.unstack(bank, config, name).")


def _lora_target(path, leaf, rule, config) -> tuple[Target | None, str | None]:
    shape = tuple(np.shape(leaf))
    where = f"rule {rule.pattern!r} matched {path} (shape {shape}"
    if not _floating(leaf):
        return None, (f"{where}, dtype {getattr(leaf, 'dtype', type(leaf).__name__)}): LoRA adapts "
                      "floating-point kernels only; narrow the pattern, e.g. '.*/kernel'.")
    if any(ax >= len(shape) for ax in rule.stack_axes + (rule.in_axes or ())):
        return None, (f"{where}): its axes {rule.in_axes or ()} / stack_axes {rule.stack_axes} do not exist "
                      f"on a {len(shape)}-D leaf.")
    if len(shape) - len(rule.stack_axes) < 2:
        return None, (f"{where}): LoRA cannot adapt a leaf with fewer than 2 axes (a bias or a scalar); "
                      "narrow the pattern, e.g. '.*/kernel', or train it in full with train_in_full.")
    layout = default_layout(path, len(shape), rule.in_axes, rule.stack_axes)
    if not layout.in_axes or not layout.out_axes:
        return None, (f"{where}): in_axes={layout.in_axes} leave no input or no output axis; pick in_axes "
                      "that split the kernel.")
    rank = config.rank_for(rule)
    fan_in = layout.fan_in(shape)
    fan_out = int(np.prod([shape[i] for i in layout.out_axes]))
    if rank > min(fan_in, fan_out):
        return None, (f"{where}): rank {rank} exceeds min(fan_in={fan_in}, fan_out={fan_out}); use rank <= "
                      f"{min(fan_in, fan_out)} via Rule({rule.pattern!r}, rank=...).")
    embedding = path.rsplit("/", 1)[-1] == "embedding"
    if embedding and refusals(config, "embedding"):
        return None, f"{where}): " + "; ".join(refusals(config, "embedding"))
    alpha = config.alpha if rule.alpha is None else rule.alpha
    return Target(path, shape, rank, config.scale_for(rule), layout, embedding, config.dora, alpha), None


def _kernel_shape(kernel: str, a: tuple, b: tuple, rule: Rule) -> tuple[int, ...] | None:
    """The shape of the kernel an adapter ``(a, b)`` implies under ``rule``, or None if they do not fit it."""
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


@dataclasses.dataclass(frozen=True, eq=False)
class Plan(Mapping[str, Target]):
    """``{path: Target}`` for every adapted or fully-trained leaf, with the config it came from."""

    config: LoraConfig
    targets: Mapping[str, Target]

    def __getitem__(self, path: str) -> Target:
        return self.targets[path]

    def __iter__(self) -> Iterator[str]:
        return iter(self.targets)

    def __len__(self) -> int:
        return len(self.targets)

    @property
    def adapters(self) -> dict[str, Target]:
        """The adapted targets only."""
        return {p: t for p, t in self.targets.items() if t.adapted}

    @classmethod
    def of_base(cls, config: LoraConfig, tree) -> Plan:
        """Resolve ``config`` against the leaves of the base ``tree``.

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
        rule_hits = [0] * len(config.targets)
        full_hits = [0] * len(config.train_in_full)
        targets: dict[str, Target] = {}
        for path, leaf in zip(paths, leaves(tree), strict=True):
            rule_i = next((i for i, r in enumerate(config.targets) if re.fullmatch(r.pattern, path)), None)
            full_i = [i for i, p in enumerate(config.train_in_full) if re.fullmatch(p, path)]
            for i in full_i:
                full_hits[i] += 1
            if rule_i is not None:
                rule_hits[rule_i] += 1
                if full_i:
                    errors.append(
                        f"{path} is both adapted (rule {config.targets[rule_i].pattern!r}) and trained in "
                        f"full (train_in_full {config.train_in_full[full_i[0]]!r}); drop it from one of them."
                    )
                    continue
                target, error = _lora_target(path, leaf, config.targets[rule_i], config)
                if error:
                    errors.append(error)
                else:
                    targets[path] = target
            elif full_i:
                if not _floating(leaf):
                    errors.append(f"train_in_full matched {path} (dtype {getattr(leaf, 'dtype', None)}): "
                                  "only floating-point leaves can be trained.")
                    continue
                targets[path] = Target(path, tuple(np.shape(leaf)))
        for rule, hits in zip(config.targets, rule_hits, strict=True):
            if not hits:
                errors.append(f"LoRA rule {rule.pattern!r} matched no parameter. Paths that look close: "
                              f"{_close(rule.pattern, paths)}")
        for pattern, hits in zip(config.train_in_full, full_hits, strict=True):
            if not hits:
                errors.append(f"train_in_full pattern {pattern!r} matched no parameter. Paths that look "
                              f"close: {_close(pattern, paths)}")
        if errors:
            raise ValueError("\n".join(errors))
        return cls(config, targets)

    @classmethod
    def of_trainable(cls, config: LoraConfig, trainable, who: str) -> Plan:
        """Resolve ``config`` against the kernels ``trainable``'s adapters imply (no base needed).

        Each adapter ``{a: (*stack, *in, r), b: (*stack, r, *out)}`` implies its kernel's
        shape once its rule says which axes are stacked and which are inputs; that
        kernel stands as a ``ShapeDtypeStruct`` (no memory), a leaf that is not an
        adapter stands for itself, and `of_base` and `read` check the rest.

        Raises:
          ValueError: starting with ``who``, naming every adapter no rule matches, every
            adapter whose factors do not fit its rule's axes, and `of_base`'s and
            `read`' errors.
        """
        if not isinstance(config, LoraConfig):
            raise TypeError(f"{who}: expected a jlora.LoraConfig, got {type(config).__name__}.")
        flat = flatten(trainable)
        base, errors = {}, []
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
            if rule is None:
                errors.append(no_rule(kernel))
            elif shape is None:
                errors.append(f"{kernel}: a {a} and b {b} do not form an adapter for rule {rule.pattern!r} "
                              f"(stack_axes={rule.stack_axes}, in_axes={rule.in_axes}); pass the config the "
                              "adapter was made with (and frozen=, where the verb takes it, to check "
                              "against the real kernels)")
            else:
                base[kernel] = jax.ShapeDtypeStruct(shape, jnp.dtype(config.dtype))
        if not errors:
            try:
                plan = cls.of_base(config, nest(base))
            except ValueError as e:
                errors = str(e).splitlines()
            else:
                errors = plan.problems(trainable)
                if not errors:
                    return plan
        raise ValueError(f"{who}: trainable does not fit config:\n  " + "\n  ".join(errors)
                         + _bank_hint(config))

    def read(self, trainable) -> dict[str, Any]:
        """Check ``trainable`` fits the plan; return ``{path: leaf (trained in full) or Factors}``.

        Raises:
          ValueError: naming every missing, unexpected, mis-shaped or non-float path.
        """
        errors = self.problems(trainable)
        if errors:
            raise ValueError(
                "trainable does not fit frozen and config:\n  " + "\n  ".join(errors)
                + "\nMake trainable with jlora.init(key, params, config) using the same config."
                + _bank_hint(self.config)
            )
        flat = flatten(trainable)
        return {path: Factors(*(flat.get(f"{path}/{k}") for k in ADAPTER_KEYS)) if t.adapted else flat[path]
                for path, t in self.targets.items()}

    def problems(self, trainable) -> list[str]:
        """Every missing, unexpected, mis-shaped or non-float leaf of ``trainable``, one line each."""
        flat = flatten(trainable)
        errors = []
        expected = {p: s for t in self.targets.values() for p, s in t.factor_shapes().items()}
        for path, shape in expected.items():
            if path not in flat:
                errors.append(f"missing {path} (expected shape {shape})")
            elif tuple(np.shape(flat[path])) != shape:
                errors.append(f"{path} has shape {tuple(np.shape(flat[path]))}, expected {shape}")
            elif not _floating(flat[path]):
                errors.append(f"{path} has dtype {jnp.result_type(flat[path]).name}; LoRA factors and leaves "
                              "trained in full are floating point (LoraConfig.dtype, float32 by default): "
                              "cast with .astype(jnp.float32)")
        for path in flat:
            if path not in expected:
                errors.append(f"unexpected {path} (shape {tuple(np.shape(flat[path]))}): no target of this "
                              "config has that path")
        return errors

    def roles(self, trainable) -> list[tuple[Target, str | None]]:
        """``(target, factor)`` of each leaf of ``trainable`` in leaf order (factor None: trained in full)."""
        out = []
        for path in leaf_paths(trainable):
            if path in self.targets:
                out.append((self.targets[path], None))
            else:
                kernel, _, factor = path.rpartition("/")
                out.append((self.targets[kernel], factor))
        return out
