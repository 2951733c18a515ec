"""`combine`: several adapters trained on one frozen base, folded into one ordinary adapter.

Every adapter ``i`` adds ``Δ_i = s_i · a_i @ b_i`` to a kernel (``s_i`` its own
``alpha/r`` or ``alpha/sqrt(r)``). The exact methods return one adapter whose delta
is ``Σ w_i Δ_i``; ``svd`` returns the best rank-``k`` approximation of it; and
``average`` is federated averaging of the factors themselves.

The result's config has scale exactly 1 (``alpha = rank``, no rsLoRA) and one
`Rule` per group of kernels sharing a rank and layout, its pattern the escaped
paths, so ``wrap``/``merge`` with it reproduce the combination.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jlora._config import LoraConfig, Rule
from jlora._layout import Layout, wider
from jlora._paths import flatten, nest
from jlora._plan import Plan, Target
from jlora._variants import refusals

METHODS = ("cat", "linear", "svd", "average")


@dataclasses.dataclass(frozen=True)
class CombineReport:
    """What `combine` did to one adapted kernel.

    Attributes:
      path: the kernel's path.
      rank: the rank of the combined adapter there.
      sources: indices of the adapters that adapt this kernel; the others count as
        a zero delta (``cat``/``linear``/``svd``).
      dropped: the fraction of the combined delta's energy (squared Frobenius
        norm, summed over the layers of a stack) that the result leaves out:
        ``Σ_{i>k} σ_i² / Σ σ_i²``. Exactly 0 for ``cat``, rounding level for
        ``linear``, the Eckart–Young loss for ``svd``; ``None`` for ``average``.
      gap: ``average`` only: ``‖Δ(mean factors) − Σ w_i Δ_i‖_F / ‖Σ w_i Δ_i‖_F``,
        how far averaging the factors is from averaging the deltas (``None`` where
        the delta is not a matrix: a nonlinearity or DoRA; ``inf`` if the mean of
        the deltas is zero but the other is not).
    """

    path: str
    rank: int
    sources: tuple[int, ...]
    dropped: float | None = None
    gap: float | None = None


def _finite(w) -> bool:
    try:
        return math.isfinite(float(w))
    except (TypeError, ValueError):
        return False


def _check_args(adapters, weights, method, rank):
    if method not in METHODS:
        raise ValueError(f"combine: unknown method {method!r}; choose one of {METHODS}.")
    if isinstance(adapters, dict) or not isinstance(adapters, Sequence) or not adapters:
        raise ValueError("combine: adapters must be a non-empty sequence of (trainable, config) pairs, "
                         "e.g. [(trainable_1, config_1), (trainable_2, config_2)].")
    for i, pair in enumerate(adapters):
        if not (isinstance(pair, tuple | list) and len(pair) == 2):
            raise ValueError(f"combine: adapters[{i}] must be a (trainable, config) pair, got "
                             f"{type(pair).__name__}.")
        if not isinstance(pair[1], LoraConfig):
            raise TypeError(f"combine: adapters[{i}][1] must be a jlora.LoraConfig, got "
                            f"{type(pair[1]).__name__}.")
    if isinstance(weights, str) or not hasattr(weights, "__len__") or len(weights) != len(adapters):
        raise ValueError(f"combine: give one weight per adapter ({len(adapters)}), got {weights!r}.")
    weights = list(weights)
    bad = [w for w in weights if isinstance(w, bool) or np.ndim(w) != 0 or not _finite(w)]
    if bad:
        raise ValueError(f"combine: weights must be finite numbers, got {bad!r}.")
    weights = [float(w) for w in weights]
    if method == "svd":
        if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
            raise ValueError("combine: method='svd' needs rank=k, an int >= 1 (the rank to compress to), "
                             f"got {rank!r}.")
    elif rank is not None:
        raise ValueError(f"combine: rank= only applies to method='svd'; method={method!r} decides the rank "
                         "itself.")
    if method == "average" and abs(sum(weights) - 1.0) > 1e-6:
        raise ValueError("combine: method='average' is a weighted mean, so the weights must sum to 1; they "
                         f"sum to {sum(weights)!r}. Divide them by their sum, e.g. [1/n] * n.")
    return weights


def _check_variants(configs, method):
    if method == "average":
        kinds = {(c.nonlinearity, c.dora, c.dylora, c.init == "pissa") for c in configs}
        if len(kinds) > 1:
            raise ValueError(
                "combine(method='average'): the adapters must be the same kind of adapter to average their "
                "factors; they differ in (nonlinearity, dora, dylora, pissa): "
                + ", ".join(f"adapter {i}: {(c.nonlinearity, c.dora, c.dylora, c.init == 'pissa')}"
                            for i, c in enumerate(configs)) + ".")
        return
    errors = [f"adapter {i}, {why}" for i, c in enumerate(configs) for why in refusals(c, "combine")]
    if errors:
        raise ValueError(f"combine(method={method!r}) cannot combine these adapters:\n  "
                         + "\n  ".join(errors))


def _read(i: int, trainable, config: LoraConfig, frozen):
    """``(targets, values)`` of adapter ``i``, checked against ``frozen`` when given."""
    if frozen is None:
        plan = Plan.of_trainable(config, trainable, f"combine: adapter {i}")
        return plan, plan.read(trainable)
    try:
        plan = Plan.of_base(config, frozen)
        return plan, plan.read(trainable)
    except ValueError as e:
        raise ValueError(f"combine: adapter {i} does not fit frozen and its config:\n  {e}") from None


def _host(x) -> np.ndarray:
    return np.asarray(x).astype(np.float64)


def _device(x: np.ndarray, dtype) -> jax.Array:
    return jnp.asarray(x.astype(jnp.dtype(dtype)))


def _matrices(parts, layout: Layout):
    """``A (p, fan_in, R)`` and ``B (p, R, fan_out)`` in float64, ``Δ = A @ B`` per layer."""
    n_stack = len(layout.stack_axes)
    a = np.concatenate([_host(x) for x, _, _ in parts], axis=-1)
    b = np.concatenate([c * _host(y) for _, y, c in parts], axis=n_stack)
    p = math.prod(a.shape[:n_stack])
    return a.reshape(p, -1, a.shape[-1]), b.reshape(p, b.shape[n_stack], -1)


def _svd(a, b):
    """SVD of ``a @ b`` per layer without forming it: QR of both factors, SVD of the small core.

    ``a = Qa Ra``, ``bᵀ = Qb Rb`` give ``a @ b = Qa (Ra Rbᵀ) Qbᵀ``; with ``Ra Rbᵀ = U S Vᵀ``
    the singular vectors of ``a @ b`` are ``Qa U`` and ``Qb V``, its singular values ``S``.
    """
    qa, ra = np.linalg.qr(a)
    qb, rb = np.linalg.qr(np.swapaxes(b, 1, 2))
    u, s, vh = np.linalg.svd(ra @ np.swapaxes(rb, 1, 2), full_matrices=False)
    return qa @ u, s, vh @ np.swapaxes(qb, 1, 2)


def _refactor(parts, layout: Layout, rank: int | None):
    """The delta of ``parts`` at rank ``rank`` (``None``: its numerical rank), factors split by √σ."""
    a, b = _matrices(parts, layout)
    left, s, right = _svd(a, b)
    if rank is None:  # below the float64 rounding of forming a @ b: zero up to rounding
        size = np.linalg.norm(a, axis=(1, 2)) * np.linalg.norm(b, axis=(1, 2))
        tol = (max(a.shape[1], a.shape[2], b.shape[2]) * np.finfo(np.float64).eps * size)[:, None]
        rank = max(1, int(np.max(np.sum(s > tol, axis=1))))
    k = min(rank, s.shape[1])
    root = np.sqrt(s[:, :k])
    total = float(np.sum(s * s))
    dropped = float(np.sum(s[:, k:] ** 2)) / total if total > 0 else 0.0
    return left[:, :, :k] * root[:, None, :], root[:, :, None] * right[:, :k, :], k, dropped


def _gap(t: Target, mean_a, mean_b, parts) -> float:
    """``‖s·ā@b̄ − Σ w_i s·a_i@b_i‖ / ‖Σ w_i s·a_i@b_i‖`` from the factors alone."""
    exact = _svd(*_matrices(parts, t.layout))[1]
    both = _svd(*_matrices([(mean_a, mean_b, t.scale), *((a, b, -c) for a, b, c in parts)], t.layout))[1]
    num, den = float(np.sqrt(np.sum(both ** 2))), float(np.sqrt(np.sum(exact ** 2)))
    if den == 0:
        return 0.0 if num == 0 else math.inf
    return num / den


def _rules(chosen: dict[str, tuple[int, Layout]]) -> tuple[Rule, ...]:
    """One rule per (rank, layout), its pattern the escaped paths: scale ``rank/rank = 1``."""
    groups: dict[tuple[int, Layout], list[str]] = {}
    for path, key in chosen.items():
        groups.setdefault(key, []).append(path)
    return tuple(
        Rule(pattern="|".join(re.escape(p) for p in paths), rank=r, alpha=float(r),
             in_axes=lay.in_axes, stack_axes=lay.stack_axes)
        for (r, lay), paths in groups.items()
    )


def _collect(reads, method):
    """Per path, the adapters holding it; every disagreement between them, listed at once."""
    paths: dict[str, list[int]] = {}
    for i, (targets, _) in enumerate(reads):
        for path in targets:
            paths.setdefault(path, []).append(i)
    errors = []
    for path in sorted(paths):
        owners = paths[path]
        ts = [reads[i][0][path] for i in owners]
        if len({t.adapted for t in ts}) > 1:
            errors.append(f"{path} is adapted by some adapters and trained in full by others: "
                          + ", ".join(f"adapter {i}: {'LoRA' if t.adapted else 'full'}"
                                      for i, t in zip(owners, ts, strict=True)))
        elif len({(t.shape, t.layout) for t in ts}) > 1:
            errors.append(f"{path} has different kernels or layouts: " + ", ".join(
                f"adapter {i}: shape {t.shape}, {t.layout}" for i, t in zip(owners, ts, strict=True)))
        elif method == "average" and len(owners) != len(reads):
            errors.append(f"{path} is held by adapters {owners} only; averaging needs every adapter to hold "
                          "it")
        elif method == "average" and len({(t.rank, t.scale) for t in ts}) > 1:
            errors.append(f"{path} has different ranks or scales: " + ", ".join(
                f"adapter {i}: rank {t.rank}, scale {t.scale}" for i, t in zip(owners, ts, strict=True)))
    if errors:
        fix = ("averaging factors needs adapters from one config and one initialisation"
               if method == "average" else "combine adapters made by jlora.init on one base with matching "
                                           "rules")
        raise ValueError("combine: the adapters do not agree:\n  " + "\n  ".join(errors) + f"\n{fix}.")
    return {p: paths[p] for p in sorted(paths)}


def combine(adapters, weights, *, method: str = "cat", rank: int | None = None, frozen=None):
    """Combine adapters trained on one frozen base into one ordinary adapter.

    Adapter ``i`` adds ``Δ_i = s_i·a_i@b_i`` to a kernel, ``s_i`` its own scale
    (``alpha/r``, or ``alpha/sqrt(r)`` with rsLoRA; ranks and alphas may differ per
    adapter and per rule). A kernel an adapter does not adapt counts as ``Δ_i = 0``.

    * ``"cat"`` (exact): ``Σ w_i Δ_i`` as one adapter of rank ``Σ r_i``:
      ``a = [a_1 … a_n]`` along the rank axis, ``b = [w_1 s_1 b_1; …; w_n s_n b_n]``.
      The adapters' factors are kept as they are, so each one's part can be read
      back; refused where ``Σ r_i`` exceeds the kernel's ``min(fan_in, fan_out)``.
    * ``"linear"`` (exact): the same ``Σ w_i Δ_i`` re-factored at its own rank: the
      SVD of the delta (computed from the factors in float64, never the dense
      matrix) keeps every singular value above the rounding error of forming it,
      ``ε₆₄·max(fan_in, fan_out, Σ r_i)·‖A‖_F·‖B‖_F`` with ``A``, ``B`` the
      concatenated factors of ``cat``, and splits ``√σ`` between ``a`` and ``b``.
      Unlike ``cat`` it drops exact redundancy (the same adapter twice gives rank
      ``r``, not ``2r``), never exceeds ``min(fan_in, fan_out)``, and gives
      balanced, orthogonal factors. Unlike PEFT's ``linear``, which forms
      ``(Σ w_i a_i)(Σ w_i b_i)`` and so adds the cross terms ``w_i w_j a_i b_j``,
      it is the weighted sum of the deltas.
    * ``"svd"``: the best rank-``k`` approximation of ``Σ w_i Δ_i`` (Eckart–Young),
      ``k = min(rank, the delta's size)``, per layer of a stack; the report gives
      the fraction of the energy it drops.
    * ``"average"`` (federated averaging): ``a = Σ w_i a_i``, ``b = Σ w_i b_i`` for
      adapters of one config trained from the same initialisation; the weights
      must sum to 1. That is not the mean of the deltas: the report's ``gap`` says
      how far it is (the exact mean of the deltas is ``"cat"`` or ``"linear"`` with
      weights ``1/n``, at a larger rank). Any adapter kind (nonlinearity, DoRA's ``m``, DyLoRA, PiSSA)
      is allowed as long as all adapters share it; the config returned is the
      first adapter's.

    The arithmetic runs on the host in float64 (adapters are small; ``svd`` and
    ``linear`` never form a ``fan_in × fan_out`` matrix: QR of the concatenated
    factors, then the SVD of an ``R × R`` core, ``R = Σ r_i``); the results are
    cast to the widest of the adapters' dtypes.

    Leaves trained in full become ``base + Σ w_i (x_i − base)`` (``Σ w_i x_i`` for
    ``average``); ``cat``/``linear``/``svd`` need ``frozen`` for the base then. A
    DyLoRA adapter enters at its full rank (its default); cut it first with
    `truncate` to combine it at rank ``k``. Adapters with a nonlinearity (the
    delta is not a matrix), DoRA (its weight differs from ``W`` by a full-rank
    matrix) or PiSSA (its base is its own residual) are refused except by
    ``average``.

    Args:
      adapters: ``(trainable, config)`` pairs from `init` on the same base.
      weights: one number per adapter, negative allowed (task-vector negation).
      method: ``"cat"``, ``"linear"``, ``"svd"`` or ``"average"``.
      rank: the rank ``k`` for ``"svd"`` (required there, refused otherwise).
      frozen: the shared frozen base; when given every adapter is checked against
        it, and leaves trained in full are combined relative to it.

    Returns:
      ``(trainable, config, report)``: an ordinary adapter and its `LoraConfig`
      (scale exactly 1: ``alpha = rank`` per rule, one rule per group of kernels
      sharing a rank and layout), and ``{path: CombineReport}`` per adapted kernel.

    Raises:
      ValueError: naming every offending adapter or path at once.

    >>> import numpy as np
    >>> from jlora import LoraConfig
    >>> rng = np.random.default_rng(0)
    >>> def trained(r):  # stands in for an adapter from jlora.init, after training
    ...     return {"w": {"a": rng.normal(size=(6, r)).astype("float32"),
    ...                   "b": rng.normal(size=(r, 5)).astype("float32")}}
    >>> cfg1, cfg2 = LoraConfig(rank=2, alpha=4.0, targets="w"), LoraConfig(rank=3, targets="w", rslora=True)
    >>> t1, t2 = trained(2), trained(3)
    >>> tr, cfg, report = combine([(t1, cfg1), (t2, cfg2)], [0.5, -1.0])
    >>> tr["w"]["a"].shape, cfg.scale_for(cfg.targets[0]), report["w"].rank
    ((6, 5), 1.0, 5)
    >>> def delta(t, s):
    ...     return s * np.asarray(t["w"]["a"]) @ np.asarray(t["w"]["b"])
    >>> want = 0.5 * delta(t1, 4.0 / 2) - delta(t2, 8.0 / 3 ** 0.5)
    >>> bool(np.allclose(delta(tr, 1.0), want, atol=1e-5))
    True
    >>> tr, cfg, report = combine([(t1, cfg1), (t2, cfg2)], [0.5, -1.0], method="svd", rank=1)
    >>> report["w"].rank, 0 < report["w"].dropped < 1
    (1, True)
    """
    weights = _check_args(adapters, weights, method, rank)
    configs = [c for _, c in adapters]
    _check_variants(configs, method)
    reads = [_read(i, tr, c, frozen) for i, (tr, c) in enumerate(adapters)]
    owners = _collect(reads, method)
    dtype = configs[0].dtype
    for c in configs[1:]:
        dtype = wider(dtype, c.dtype).name
    if method == "average":
        return _average(reads, owners, weights, configs[0])

    full = [p for p in owners if not reads[owners[p][0]][0][p].adapted]
    base = flatten(frozen) if frozen is not None else {}
    if full and frozen is None:
        raise ValueError(
            f"combine(method={method!r}): the leaves {full} are trained in full; their combination is "
            "base + Σ w_i (x_i − base), which needs the base: pass frozen=<the frozen tree from jlora.init>.")
    too_big = []
    out, chosen, report = {}, {}, {}
    for path, idx in owners.items():
        t = reads[idx[0]][0][path]
        if not t.adapted:
            w0 = _host(base[path])
            out[path] = _device(w0 + sum(weights[i] * (_host(reads[i][1][path]) - w0) for i in idx),
                                base[path].dtype)
            continue
        parts = [(reads[i][1][path][0], reads[i][1][path][1], weights[i] * reads[i][0][path].scale)
                 for i in idx]
        fan_in = t.layout.fan_in(t.shape)
        fan_out = math.prod(t.shape[ax] for ax in t.layout.out_axes)
        if method == "cat":
            r = sum(reads[i][0][path].rank for i in idx)
            if r > min(fan_in, fan_out):
                too_big.append(f"{path} (rank {r} > min(fan_in={fan_in}, fan_out={fan_out}))")
                continue
            a = np.concatenate([_host(x) for x, _, _ in parts], axis=-1)
            b = np.concatenate([c * _host(y) for _, y, c in parts], axis=len(t.layout.stack_axes))
            dropped = 0.0
        else:
            a, b, r, dropped = _refactor(parts, t.layout, rank if method == "svd" else None)
        out[f"{path}/a"] = _device(a.reshape(t.layout.a_shape(t.shape, r)), dtype)
        out[f"{path}/b"] = _device(b.reshape(t.layout.b_shape(t.shape, r)), dtype)
        chosen[path] = (r, t.layout)
        report[path] = CombineReport(path, r, tuple(idx), dropped=dropped)
    if too_big:
        raise ValueError(
            "combine(method='cat'): the concatenated rank exceeds what these kernels can hold: "
            + ", ".join(too_big) + ". Use method='linear' (exact, at the delta's own rank) or method='svd'.")
    top = max((r for r, _ in chosen.values()), default=configs[0].rank)
    config = dataclasses.replace(
        configs[0], rank=top, alpha=float(top), targets=_rules(chosen), rslora=False,
        train_in_full=tuple(re.escape(p) for p in full), dtype=dtype, dylora=None)
    return nest(out), config, report


def _average(reads, owners, weights, config: LoraConfig):
    out, report = {}, {}
    for path, idx in owners.items():
        t = reads[0][0][path]
        values = [reads[i][1][path] for i in idx]
        if not t.adapted:
            out[path] = _device(sum(w * _host(v) for w, v in zip(weights, values, strict=True)),
                                values[0].dtype)
            continue
        mean = {}
        for k, name in enumerate(("a", "b", "m")):
            if values[0][k] is not None:
                mean[name] = sum(w * _host(v[k]) for w, v in zip(weights, values, strict=True))
                out[f"{path}/{name}"] = _device(mean[name], values[0][k].dtype)
        gap = None
        if config.linear and not config.dora:
            parts = [(v[0], v[1], w * t.scale) for w, v in zip(weights, values, strict=True)]
            gap = _gap(t, mean["a"], mean["b"], parts)
        report[path] = CombineReport(path, t.rank, tuple(idx), gap=gap)
    return nest(out), config, report
