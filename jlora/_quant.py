"""A quantized frozen base (QLoRA): adapted kernels stored in int8 or NF4.

`quantize` replaces every kernel a `LoraConfig` adapts by a `QArray`; `init`,
`wrap` and `merge` take such a tree as they take a plain one. Under `wrap`, the
base term ``x·W`` dequantizes W inside a ``jax.checkpoint``, so the backward
pass recomputes the dequantization instead of keeping a full-precision copy of W
alive from forward to backward: the frozen base costs its quantized bytes, and
one dequantized kernel at a time.

Two kinds:

* ``"int8"``: symmetric, one float32 scale per output unit (absmax over the
  kernel's input axes / 127). Elementwise error <= ``absmax_channel / 254``
  (a channel whose absmax is below ``127 ×`` float32's smallest normal, 1.5e-36,
  reads back as zeros: XLA flushes the subnormal scale).
* ``"nf4"``: QLoRA's 4-bit NormalFloat, blockwise (default 64 values per block)
  over the flattened non-stack part of each kernel, two codes per byte, one
  float32 absmax per block. Error per block <= ``absmax_block · NF4_HALF_GAP``.
  With ``double=True`` the absmaxes are themselves stored as int8 in blocks of
  256 (mean subtracted, one float32 scale per block, as in QLoRA's double
  quantization); the error bound grows by that absmax's own rounding error,
  ``<= scale2 / 2``.

Stacked kernels (``Rule(stack_axes=...)``) keep their stack axes leading in every
stored array, so ``lax.scan`` over a layer stack slices a `QArray` like any array.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import warnings
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from jlora._layout import Layout, default_layout

KINDS = ("int8", "nf4")
DOUBLE_BLOCK = 256  # absmax values per block of QLoRA's double quantization

# The 16 NormalFloat-4 values of QLoRA (Dettmers et al. 2023, arXiv:2305.14314,
# Appendix E), as bitsandbytes ships them (`bitsandbytes.functional.get_4bit_type("nf4")`).
NF4 = np.array([
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
    -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
    0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
    0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
], dtype=np.float32)
_NF4_MIDPOINTS = (NF4[1:] + NF4[:-1]) / 2
# Largest rounding error of a value in [-1, 1], in units of its block's absmax:
# half the widest gap between adjacent code values (between -1 and -0.696).
NF4_HALF_GAP = float(np.max(np.diff(NF4)) / 2)
_NF4_PAIRS = np.stack([np.repeat(NF4, 16), np.tile(NF4, 16)],
                      axis=1)  # byte -> (NF4[byte >> 4], NF4[byte & 15])


@dataclasses.dataclass(frozen=True)
class QArray:
    """A quantized kernel, a JAX pytree whose children all lead with the kernel's stack axes.

    ``shape``/``dtype``/``ndim``/``size`` describe the logical (dequantized) weight;
    ``nbytes`` counts what is stored. The logical shape is derived from the
    children's shapes and the static non-stack shape, so slicing every child along
    its leading (stack) axes, as ``lax.scan`` does, yields a valid `QArray` of one layer.

    Children: ``codes`` (int8 of W's shape, or uint8 ``(*stack, n/2)`` with two
    NF4 codes per byte, the first in the high nibble), ``scale`` (float32
    ``(*stack, *out)`` for int8; float32 absmax ``(*stack, n/block)`` for NF4, or
    int8 codes of it padded to a multiple of 256 with double quantization), and
    for double quantization ``scale_scale`` ``(*stack, blocks/256)`` and
    ``scale_mean`` ``(*stack,)``, float32.
    """

    codes: Any
    scale: Any
    scale_scale: Any = None
    scale_mean: Any = None
    kind: str = "nf4"
    inner_shape: tuple[int, ...] = ()  # logical shape without the stack axes
    in_axes: tuple[int, ...] = ()  # int8: axes of inner_shape sharing one scale
    dtype: Any = np.dtype(np.float32)  # the dtype `dequantize` returns
    block: int = 64

    @property
    def n_stack(self) -> int:
        return self.codes.ndim - (len(self.inner_shape) if self.kind == "int8" else 1)

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.codes.shape[:self.n_stack]) + self.inner_shape

    @property
    def ndim(self) -> int:
        return len(self.shape)

    @property
    def size(self) -> int:
        return math.prod(self.shape)

    @property
    def double(self) -> bool:
        return self.scale_scale is not None

    @property
    def nbytes(self) -> int:
        """Bytes stored (codes and scales), not the dequantized size."""
        children = jax.tree_util.tree_leaves(self)
        return int(sum(math.prod(c.shape) * jnp.dtype(c.dtype).itemsize for c in children))

    def __repr__(self) -> str:
        extra = f", block={self.block}, double={self.double}" if self.kind == "nf4" else ""
        return f"QArray({self.kind}, shape={self.shape}, dtype={jnp.dtype(self.dtype).name}{extra})"

    def astype(self, dtype) -> QArray:
        """The same codes, dequantizing to ``dtype``."""
        return dataclasses.replace(self, dtype=jnp.dtype(dtype))

    def dequantize(self) -> jax.Array:
        """The logical weight: jit-friendly, static shapes, in ``self.dtype``."""
        return _decode(self)

    def like(self, w) -> QArray:
        """``w`` (of this shape) quantized with this array's kind, block and dtype."""
        layout = Layout(tuple(self.n_stack + i for i in self.in_axes), (), tuple(range(self.n_stack)))
        block = self.block if self.kind == "nf4" else 64  # int8 has no blocks
        return quantize_array(w, self.kind, layout=layout, block=block, double=self.double, dtype=self.dtype)


jax.tree_util.register_dataclass(
    QArray,
    data_fields=["codes", "scale", "scale_scale", "scale_mean"],
    meta_fields=["kind", "inner_shape", "in_axes", "dtype", "block"],
)


@jax.jit
def _decode(q: QArray) -> jax.Array:
    # Jitted so that eager calls compile once per kernel shape instead of once per small op.
    w = _int8_decode(q) if q.kind == "int8" else _nf4_decode(q)
    return w.astype(q.dtype)


def is_qarray(x) -> bool:
    return isinstance(x, QArray)


def dequantized(x):
    """``x.dequantize()`` for a `QArray`, ``x`` itself otherwise."""
    return x.dequantize() if isinstance(x, QArray) else x


# ------------------------------------------------------------------ int8


@functools.partial(jax.jit, static_argnums=(1, 2, 3))
def _int8_encode(w, n_stack: int, in_axes: tuple[int, ...], dtype) -> QArray:
    """Per output unit: ``scale = absmax / 127`` over the input axes, ``codes = round(W / scale)``."""
    axes = tuple(n_stack + i for i in in_axes)
    wf = w.astype(jnp.float32)
    scale = jnp.max(jnp.abs(wf), axis=axes) / jnp.float32(127.0)
    safe = jnp.where(scale > 0, scale, jnp.ones((), jnp.float32))
    codes = jnp.clip(jnp.round(wf / jnp.expand_dims(safe, axes)), -127, 127).astype(jnp.int8)
    return QArray(codes, scale, kind="int8", inner_shape=tuple(w.shape[n_stack:]), in_axes=in_axes,
                  dtype=dtype, block=0)


def _int8_decode(q: QArray) -> jax.Array:
    axes = tuple(q.n_stack + i for i in q.in_axes)
    return q.codes.astype(jnp.float32) * jnp.expand_dims(q.scale, axes)


# ------------------------------------------------------------------- nf4


@functools.partial(jax.jit, static_argnums=(1, 2, 3, 4))
def _nf4_encode(w, n_stack: int, block: int, double: bool, dtype) -> QArray:
    """Blockwise absmax over the flattened non-stack part, nearest NF4 value, two codes per byte."""
    stack = tuple(w.shape[:n_stack])
    x = w.astype(jnp.float32).reshape(*stack, -1, block)
    absmax = jnp.max(jnp.abs(x), axis=-1)
    safe = jnp.where(absmax > 0, absmax, jnp.ones((), jnp.float32))
    idx = jnp.searchsorted(jnp.asarray(_NF4_MIDPOINTS), x / safe[..., None]).astype(jnp.uint8)
    pairs = idx.reshape(*stack, -1, 2)
    codes = lax.shift_left(pairs[..., 0], jnp.uint8(4)) | pairs[..., 1]
    q = QArray(codes, absmax, kind="nf4", inner_shape=tuple(w.shape[n_stack:]), dtype=dtype, block=block)
    return _double(q) if double else q


def _double(q: QArray) -> QArray:
    """QLoRA's double quantization: absmax - mean as int8, one float32 scale per 256 values."""
    absmax = q.scale
    stack, nb = absmax.shape[:-1], absmax.shape[-1]
    mean = jnp.mean(absmax, axis=-1)
    centered = absmax - mean[..., None]
    pad = -nb % DOUBLE_BLOCK
    centered = jnp.pad(centered, [(0, 0)] * len(stack) + [(0, pad)]).reshape(*stack, -1, DOUBLE_BLOCK)
    scale2 = jnp.max(jnp.abs(centered), axis=-1) / jnp.float32(127.0)
    safe = jnp.where(scale2 > 0, scale2, jnp.ones((), jnp.float32))
    codes2 = jnp.round(centered / safe[..., None]).astype(jnp.int8).reshape(*stack, -1)
    return dataclasses.replace(q, scale=codes2, scale_scale=scale2, scale_mean=mean)


def _absmax(q: QArray) -> jax.Array:
    """Each block's absmax, float32 ``(*stack, n/block)`` (decoded from int8 with double quantization)."""
    if not q.double:
        return q.scale
    stack = q.scale.shape[:-1]
    nb = q.codes.shape[-1] * 2 // q.block
    blocks = q.scale.astype(jnp.float32).reshape(*stack, -1, DOUBLE_BLOCK) * q.scale_scale[..., None]
    return blocks.reshape(*stack, -1)[..., :nb] + q.scale_mean[..., None]


def _nf4_decode(q: QArray) -> jax.Array:
    # One lookup per byte in a 256 x 2 table of (high nibble, low nibble) values.
    stack = tuple(q.codes.shape[:-1])
    values = jnp.take(jnp.asarray(_NF4_PAIRS), q.codes.astype(jnp.int32), axis=0)  # (*stack, n/2, 2)
    values = values.reshape(*stack, -1, q.block)
    return (values * _absmax(q)[..., None]).reshape(*stack, *q.inner_shape)


# ------------------------------------------------------------------- API


def check_options(kind, block, double, dtype) -> None:
    if kind not in KINDS:
        raise ValueError(f"quantize: unknown kind {kind!r}; choose one of {KINDS}.")
    if isinstance(block, bool) or not isinstance(block, int | np.integer) or block <= 0 or block % 2:
        raise ValueError("quantize: block must be a positive even int (two NF4 codes share a byte), got "
                         f"{block!r}; e.g. block=64.")
    if double and kind != "nf4":
        raise ValueError(f"quantize: double=True quantizes NF4's per-block absmax; kind {kind!r} has one "
                         "scale per output unit. Use kind='nf4' or double=False.")
    if dtype is not None and not jnp.issubdtype(jnp.dtype(dtype), jnp.floating):
        raise TypeError(f"quantize: dtype is what the kernels dequantize to and must be a float dtype, got "
                        f"{jnp.dtype(dtype).name}; e.g. dtype=jnp.bfloat16, or None for each kernel's own.")


def _suggest_block(n: int, block: int) -> str:
    even = [d for d in range(2, block + 1, 2) if n % d == 0]
    if not even:
        return f"no even block divides {n}; use kind='int8' for this kernel"
    return f"use block={even[-1]} (divides {n})"


def leaf_problem(path: str, leaf, layout: Layout, kind: str, block: int) -> str | None:
    if isinstance(leaf, QArray):
        return f"{path} is already quantized ({leaf!r}); quantize the full-precision params once."
    ns = len(layout.stack_axes)
    if sorted(layout.stack_axes) != list(range(ns)):
        return (f"{path}: stack_axes {layout.stack_axes} of shape {tuple(leaf.shape)} are not its leading "
                "axes; quantize stores the layers of a stack first. Move the layer axis to the front "
                "(Rule(stack_axes=(0,))).")
    n = math.prod(leaf.shape[ns:])
    if kind == "nf4" and n % block:
        return (f"{path}: its {n} values per layer (shape {tuple(leaf.shape)}) do not split into NF4 blocks "
                f"of {block}; {_suggest_block(n, block)}.")
    return None


def quantize_array(w, kind: str = "nf4", *, layout: Layout | None = None, block: int = 64,
                   double: bool = False,
                   dtype=None) -> QArray:
    """Quantize one kernel.

    Args:
      w: a float array.
      kind: ``"int8"`` or ``"nf4"``.
      layout: which axes of ``w`` are stack and input axes (default: no stack
        axes, all but the last axis are input axes). Stack axes must lead.
      block: NF4 values per absmax block; must divide the non-stack size.
      double: NF4 only: quantize the absmaxes too (QLoRA's double quantization).
      dtype: what `QArray.dequantize` returns (default: ``w.dtype``).

    >>> q = quantize_array(jnp.linspace(-1.0, 1.0, 128).reshape(16, 8), "int8")
    >>> q, q.nbytes
    (QArray(int8, shape=(16, 8), dtype=float32), 160)
    """
    check_options(kind, block, double, dtype)
    if not jnp.issubdtype(w.dtype, jnp.floating):
        raise TypeError(f"quantize_array: w must be a float array, got {w.dtype}.")
    layout = layout or default_layout("", w.ndim)
    problem = leaf_problem("quantize_array", w, layout, kind, block)
    if problem:
        raise ValueError(problem)
    dtype = jnp.dtype(w.dtype if dtype is None else dtype)
    ns = len(layout.stack_axes)
    if kind == "int8":
        return _int8_encode(w, ns, tuple(sorted(i - ns for i in layout.in_axes)), dtype)
    return _nf4_encode(w, ns, int(block), bool(double), dtype)


def requantize_warning(kinds: set[str], err: float | None, delta: float | None) -> None:
    """Warn that re-quantizing a merged kernel rounds the adapter's delta away, with measured sizes."""
    measured = ""
    if err is not None:
        measured = (f" Measured here: rounding changes the merged kernels by up to {err:.3g}, while the "
                    f"adapters' deltas reach {delta:.3g}.")
    warnings.warn(
        f"merge(requantize=True): merging into a quantized ({'/'.join(sorted(kinds))}) base rounds the "
        f"adapter's delta to the quantization grid, so deltas smaller than a step are lost.{measured} "
        "Merge with requantize=False to keep the delta exact.",
        UserWarning, stacklevel=3,
    )
