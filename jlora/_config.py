"""What to adapt and how: `LoraConfig` and its per-target `Rule`s."""

from __future__ import annotations

import dataclasses
import math
import re
import warnings
from collections.abc import Sequence

import jax
import jax.numpy as jnp

INIT_SCHEMES = ("kaiming_uniform", "gaussian", "pissa")
DYLORA_MODES = ("frozen", "plain")
# The function f in the branch ``s·f(x·a)·b``: named so it can travel in checkpoint metadata.
NONLINEARITIES = {
    "identity": lambda u: u,
    "relu": jax.nn.relu,
    "gelu": lambda u: jax.nn.gelu(u, approximate=False),
    "gelu_tanh": lambda u: jax.nn.gelu(u, approximate=True),
    "silu": jax.nn.silu,
    "tanh": jnp.tanh,
    "sigmoid": jax.nn.sigmoid,
    "softplus": jax.nn.softplus,
    "elu": jax.nn.elu,
}


def _check_axes(name: str, value, owner: str) -> tuple[int, ...] | None:
    if value is None:
        return None
    if isinstance(value, int):
        value = (value,)
    if not (isinstance(value, tuple | list) and all(isinstance(v, int) and v >= 0 for v in value)):
        raise TypeError(
            f"{owner}: {name} must be a tuple of non-negative axis numbers, got {value!r}; "
            f"e.g. {name}=(0,)."
        )
    if len(set(value)) != len(value):
        raise ValueError(f"{owner}: {name}={tuple(value)!r} repeats an axis.")
    return tuple(value)


def _compile(pattern: str, owner: str) -> re.Pattern:
    if not isinstance(pattern, str):
        raise TypeError(f"{owner}: pattern must be a regex string, got {pattern!r}.")
    try:
        return re.compile(pattern)
    except re.error as e:
        raise ValueError(f"{owner}: pattern {pattern!r} is not a valid regex ({e}).") from None


def _check_config_rank(rank, owner: str) -> None:
    if isinstance(rank, bool) or not isinstance(rank, int):
        raise TypeError(f"{owner}: rank must be an int, got {rank!r}.")
    if rank <= 0:
        raise ValueError(f"{owner}: rank must be > 0, got {rank}; use rank=8 as a start.")


def _check_alpha(alpha, owner: str) -> None:
    if isinstance(alpha, bool) or not isinstance(alpha, int | float):
        raise TypeError(f"{owner}: alpha must be a number, got {alpha!r}.")
    if not (alpha > 0 and math.isfinite(alpha)):
        raise ValueError(
            f"{owner}: alpha must be a finite number > 0, got {alpha}; "
            "to switch an adapter off at run time pass lora_scale=0 instead."
        )


@dataclasses.dataclass(frozen=True, kw_only=True)
class Rule:
    """One target rule: a regex over '/'-joined leaf paths and its own settings.

    Fields left as ``None`` take the value of the enclosing `LoraConfig`.

    Args:
      pattern: regex matched with ``re.fullmatch`` against leaf paths such as
        ``params/encoder/layer_0/attention/query/kernel``.
      rank: rank ``r`` of the adapters this rule creates.
      alpha: scale numerator; the delta is ``alpha / r · a @ b`` (``alpha / sqrt(r)``
        with rsLoRA).
      in_axes: the kernel axes the consuming op contracts (its input side), as
        axis numbers of the kernel. ``None`` picks them by the documented default:
        all axes but the last, except the 3-D ``query``/``key``/``value`` kernels
        of Flax attention, whose input is axis 0.
      stack_axes: axes that index a stack of layers (``nn.scan``/``nnx.scan``);
        each layer gets its own adapter.

    >>> Rule(pattern=r".*/out/kernel", rank=4).rank
    4
    """

    pattern: str
    rank: int | None = None
    alpha: float | None = None
    in_axes: tuple[int, ...] | None = None
    stack_axes: tuple[int, ...] = ()

    def __post_init__(self):
        owner = f"Rule({self.pattern!r})"
        _compile(self.pattern, owner)
        if self.rank is not None:
            _check_config_rank(self.rank, owner)
        if self.alpha is not None:
            _check_alpha(self.alpha, owner)
        object.__setattr__(self, "in_axes", _check_axes("in_axes", self.in_axes, owner))
        if self.stack_axes is None:
            raise TypeError(f"{owner}: stack_axes must be a tuple of axis numbers (() for none), got None.")
        object.__setattr__(self, "stack_axes", _check_axes("stack_axes", self.stack_axes, owner))
        if self.in_axes is not None and set(self.in_axes) & set(self.stack_axes):
            raise ValueError(f"{owner}: an axis cannot be both in in_axes and stack_axes.")


@dataclasses.dataclass(frozen=True, kw_only=True)
class LoraConfig:
    """Which leaves get low-rank adapters, and how they are built.

    Args:
      rank: default adapter rank ``r``.
      alpha: default scale numerator (PEFT's ``lora_alpha``, default 8).
      targets: a regex, or a sequence of regexes and `Rule`s; the first rule whose
        pattern fully matches a leaf path adapts that leaf. Every rule must match
        at least one leaf.
      rslora: use ``alpha / sqrt(r)`` instead of ``alpha / r`` (rank-stabilised LoRA).
      train_in_full: regexes of leaves trained in full (PEFT's ``modules_to_save``),
        e.g. a freshly initialised classifier head.
      init: ``"kaiming_uniform"`` (PEFT's default: ``a ~ U(±1/sqrt(fan_in))``) or
        ``"gaussian"`` (``a ~ N(0, 1/r²)``); ``b`` starts at zero either way, and
        embedding tables get ``a ~ N(0, 1)``, mirroring PEFT's embedding init.
        ``"pissa"``: ``scale·a@b`` is the top-r SVD part of W and ``frozen`` holds
        the residual, so the model's function at init is unchanged.
      dtype: dtype of the adapter factors (default float32, whatever the base).
      dropout: rate of dropout on the LoRA branch's input (``s·(drop(x)·a)·b``),
        active only in calls given ``lora_rng``; embedding lookups take none (as PEFT).
      nonlinearity: ``f`` in ``s·f(x·a)·b``, one of `NONLINEARITIES`. Anything but
        ``"identity"`` makes the delta non-linear: `merge` refuses it, the factored
        forward computes it.
      dora: weight-decomposed LoRA (DoRA): each output unit's weight vector is
        ``m · V/‖V‖`` with ``V = W + s·a@b``, ``m`` trainable (init ``‖W‖``) and the
        norm treated as a constant in backprop, as in the DoRA paper.
      dylora: ``None``, ``"frozen"`` or ``"plain"``. DyLoRA trains every rank at once:
        each training call samples ``k ~ U{1..r}``, only the first ``k`` components act
        and the scale is ``alpha/k``. ``"frozen"`` (the paper's mode) also holds the
        components below ``k`` fixed that step, so only the ``k``-th one learns.
      adapters: the names of a bank's slots, in slot order; empty for one adapter.
        `jlora.stack` sets them (a dict's keys, or ``"0"``, ``"1"``, ... for a list);
        given to `jlora.init`, they make a bank of fresh adapters to train together
        (`jlora.optimizer` then steps each on its own). Serving, `jlora.put`,
        `jlora.unstack`, `jlora.save` and `jlora.restore` take these names.

    >>> cfg = LoraConfig(rank=8, alpha=16.0, targets=r".*/(query|value)/kernel")
    >>> cfg.scale_for(cfg.targets[0])
    2.0
    """

    rank: int = 8
    alpha: float = 8.0
    targets: str | Sequence[str | Rule] = ()
    rslora: bool = False
    train_in_full: str | Sequence[str] = ()
    init: str = "kaiming_uniform"
    dtype: str = "float32"
    dropout: float = 0.0
    nonlinearity: str = "identity"
    dora: bool = False
    dylora: str | None = None
    adapters: Sequence[str] = ()

    def __post_init__(self):
        _check_config_rank(self.rank, "LoraConfig")
        _check_alpha(self.alpha, "LoraConfig")
        targets = (self.targets,) if isinstance(self.targets, str | Rule) else tuple(self.targets)
        rules = []
        for t in targets:
            if isinstance(t, str):
                rules.append(Rule(pattern=t))
            elif isinstance(t, Rule):
                rules.append(t)
            else:
                raise TypeError(
                    f"LoraConfig: each target must be a regex string or a jlora.Rule, got {t!r}."
                )
        object.__setattr__(self, "targets", tuple(rules))
        full = (self.train_in_full,) if isinstance(self.train_in_full, str) else tuple(self.train_in_full)
        for p in full:
            _compile(p, "LoraConfig.train_in_full")
        object.__setattr__(self, "train_in_full", full)
        if not rules and not full:
            raise ValueError(
                "LoraConfig: nothing to train; set targets, e.g. targets=r'.*/(query|value)/kernel'."
            )
        if self.init not in INIT_SCHEMES:
            raise ValueError(
                f"LoraConfig: unknown init scheme {self.init!r}; choose one of {INIT_SCHEMES}."
            )
        try:
            dtype = jnp.dtype(self.dtype)
        except TypeError:
            raise TypeError(f"LoraConfig: dtype {self.dtype!r} is not a dtype; e.g. 'float32'.") from None
        if not jnp.issubdtype(dtype, jnp.floating):
            raise ValueError(f"LoraConfig: adapter dtype must be floating, got {dtype.name}.")
        object.__setattr__(self, "dtype", dtype.name)
        if not isinstance(self.rslora, bool):
            raise TypeError(f"LoraConfig: rslora must be a bool, got {self.rslora!r}.")
        if not isinstance(self.dora, bool):
            raise TypeError(f"LoraConfig: dora must be a bool, got {self.dora!r}.")
        rate = self.dropout
        if isinstance(rate, bool) or not isinstance(rate, int | float) or not 0 <= rate < 1:
            raise ValueError(f"LoraConfig: dropout must be a rate in [0, 1), got {self.dropout!r}.")
        if self.nonlinearity not in NONLINEARITIES:
            raise ValueError(
                f"LoraConfig: unknown nonlinearity {self.nonlinearity!r}; choose one of "
                f"{tuple(NONLINEARITIES)}."
            )
        if self.dylora is not None and self.dylora not in DYLORA_MODES:
            raise ValueError(
                f"LoraConfig: unknown dylora mode {self.dylora!r}; choose None or one of {DYLORA_MODES}."
            )
        if self.dora and self.nonlinearity != "identity":
            raise ValueError(
                "LoraConfig: dora=True needs the merged weight W + s·a@b for its norm, which does not exist "
                f"with nonlinearity={self.nonlinearity!r}; use one or the other."
            )
        names = (self.adapters,) if isinstance(self.adapters, str) else tuple(self.adapters)
        if not all(isinstance(n, str) and n for n in names) or len(set(names)) != len(names):
            raise ValueError(f"LoraConfig: adapters names a bank's slots with distinct non-empty strings, "
                             f"got {self.adapters!r}.")
        object.__setattr__(self, "adapters", names)
        if self.init == "pissa" and (self.nonlinearity != "identity" or self.dylora is not None):
            raise ValueError(
                "LoraConfig: init='pissa' splits W into a@b plus a residual, which needs a linear delta at "
                "full rank; it cannot be combined with a nonlinearity or dylora."
            )

    @property
    def linear(self) -> bool:
        """Whether the delta is the linear map ``s·a@b`` (so a merged weight exists)."""
        return self.nonlinearity == "identity"

    @property
    def rules(self) -> tuple[Rule, ...]:
        """Deprecated: ``targets`` (already the tuple of `Rule`s in match order)."""
        warnings.warn("LoraConfig.rules is deprecated; read LoraConfig.targets (the same tuple of Rules).",
                      DeprecationWarning, stacklevel=2)
        return self.targets

    def to_dict(self) -> dict:
        """Plain JSON-ready values (rules as dicts, tuples as lists); `from_dict` inverts it.

        >>> cfg = LoraConfig(rank=4, targets=(Rule(pattern="q", rank=2), "v"))
        >>> LoraConfig.from_dict(cfg.to_dict()) == cfg
        True
        """
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        out["targets"] = [
            {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(r).items()}
            for r in self.targets
        ]
        out["train_in_full"] = list(self.train_in_full)
        out["adapters"] = list(self.adapters)
        return out

    @classmethod
    def from_dict(cls, data: dict) -> LoraConfig:
        """The config `to_dict` wrote; unknown keys are an error (a newer jlora wrote them)."""
        if not isinstance(data, dict):
            raise TypeError(f"LoraConfig.from_dict: expected a dict, got {type(data).__name__}.")
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise ValueError(
                f"LoraConfig.from_dict: unknown fields {unknown}; they were written by a newer jlora "
                "or by hand. Upgrade jlora or remove them."
            )
        data = dict(data)
        rule_fields = {f.name for f in dataclasses.fields(Rule)}
        rules = []
        for r in data.get("targets", ()):
            if isinstance(r, str):
                rules.append(r)
                continue
            if not isinstance(r, dict) or set(r) - rule_fields:
                raise ValueError("LoraConfig.from_dict: a target must be a regex or a Rule's fields, got "
                                 f"{r!r}.")
            r = {k: tuple(v) if isinstance(v, list) else v for k, v in r.items()}
            rules.append(Rule(**r))
        data["targets"] = tuple(rules)
        for name in ("train_in_full", "adapters"):
            if isinstance(data.get(name), list):
                data[name] = tuple(data[name])
        return cls(**data)

    def rule_for(self, path: str) -> Rule | None:
        """The first rule whose pattern fully matches ``path``, or None."""
        return next((r for r in self.targets if re.fullmatch(r.pattern, path)), None)

    def rank_for(self, rule: Rule) -> int:
        return self.rank if rule.rank is None else rule.rank

    def scale_for(self, rule: Rule) -> float:
        """``alpha / r`` (or ``alpha / sqrt(r)`` with rsLoRA) for one rule."""
        r = self.rank_for(rule)
        alpha = self.alpha if rule.alpha is None else rule.alpha
        return float(alpha / math.sqrt(r) if self.rslora else alpha / r)
