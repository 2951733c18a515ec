"""`quantize`/`dequantize`: a parameter tree with the kernels a config adapts held as `QArray`s."""

from __future__ import annotations

import jax

from jlora._paths import leaf_paths
from jlora._plan import Plan
from jlora._quant import check_options, dequantized, is_qarray, leaf_problem, quantize_array


def quantize(params, config, kind: str = "nf4", *, block: int = 64, double: bool = False, dtype=None):
    """Replace every kernel ``config`` adapts by a `QArray`; nothing else changes.

    Args:
      params: the parameter tree (Linen variables or NNX state).
      config: the `LoraConfig` that `init` and `wrap` will be given; its LoRA
        targets, with their `Layout`, are the kernels quantized.
      kind: ``"int8"`` (per-output-unit absmax, error <= absmax/254 per element)
        or ``"nf4"`` (blockwise absmax, error <= absmax_block · 0.1519).
      block: NF4 values per block, a positive even int dividing each kernel's
        per-layer size (a kernel that does not split is refused, with a block
        that works; nothing is padded).
      double: NF4 only: store the absmaxes in 8 bits too (about 0.127 bytes per
        value instead of 0.188 at block 64).
      dtype: what the kernels dequantize to (default: each kernel's own dtype).

    Returns:
      ``params`` with the adapted kernels replaced by `QArray`s.

    Raises:
      ValueError/TypeError: for a bad option, or naming every kernel that cannot be
        quantized (already quantized, stack axes not leading, size not a multiple
        of ``block``); the plan's own errors for targets that are not float kernels.

    >>> import jax, jax.numpy as jnp
    >>> from jlora import LoraConfig
    >>> params = {"dense": {"kernel": jnp.ones((64, 32)), "bias": jnp.zeros(32)}}
    >>> q = quantize(params, LoraConfig(rank=4, targets="dense/kernel"))
    >>> q["dense"]["kernel"], q["dense"]["kernel"].nbytes, q["dense"]["bias"].shape
    (QArray(nf4, shape=(64, 32), dtype=float32, block=64, double=False), 1152, (32,))
    """
    check_options(kind, block, double, dtype)
    targets = Plan.of_base(config, params)
    leaves, treedef = jax.tree_util.tree_flatten(params, is_leaf=is_qarray)
    out, errors = [], []
    for path, leaf in zip(leaf_paths(params), leaves, strict=True):
        t = targets.get(path)
        if t is None or not t.adapted:
            out.append(leaf)
            continue
        problem = leaf_problem(path, leaf, t.layout, kind, block)
        if problem:
            errors.append(problem)
            continue
        out.append(quantize_array(leaf, kind, layout=t.layout, block=block, double=double, dtype=dtype))
    if errors:
        raise ValueError("quantize: cannot quantize:\n  " + "\n  ".join(errors))
    return jax.tree_util.tree_unflatten(treedef, out)


def dequantize(params):
    """``params`` with every `QArray` replaced by its dequantized array (a plain tree).

    >>> import jax.numpy as jnp
    >>> from jlora import LoraConfig
    >>> params = {"dense": {"kernel": jnp.eye(64)}}
    >>> q = quantize(params, LoraConfig(rank=2, targets="dense/kernel"), "int8")
    >>> w = dequantize(q)["dense"]["kernel"]
    >>> bool((w == params["dense"]["kernel"]).all())
    True
    """
    return jax.tree_util.tree_map(dequantized, params, is_leaf=is_qarray)
