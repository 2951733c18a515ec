"""Axis roles of adapted kernels and the delta laid back onto W."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jlora._layout import Layout, default_layout, delta, merged


@pytest.mark.parametrize(
    ("path", "ndim", "kw", "want"),
    [
        ("params/dense/kernel", 2, {}, Layout((0,), (1,))),
        ("params/attn/query/kernel", 3, {}, Layout((0,), (1, 2))),
        ("params/attn/value/kernel", 3, {}, Layout((0,), (1, 2))),
        ("params/attn/out/kernel", 3, {}, Layout((0, 1), (2,))),
        ("params/conv/kernel", 4, {}, Layout((0, 1, 2), (3,))),
        ("params/embed/embedding", 2, {}, Layout((0,), (1,))),
        ("layers/up/kernel", 3, {"stack_axes": (0,)}, Layout((1,), (2,), (0,))),
        ("layers/attn/key/kernel", 4, {"stack_axes": (0,)}, Layout((1,), (2, 3), (0,))),
        ("w", 3, {"in_axes": (1,)}, Layout((1,), (0, 2))),
    ],
)
def test_default_layout(path, ndim, kw, want):
    assert default_layout(path, ndim, **kw) == want


def test_shapes_and_fan_in():
    lay = Layout((1, 2), (3,), (0,))
    shape = (5, 2, 3, 7)
    assert lay.a_shape(shape, 4) == (5, 2, 3, 4)
    assert lay.b_shape(shape, 4) == (5, 4, 7)
    assert lay.fan_in(shape) == 6


def test_delta_matches_einsum_for_every_layout():
    a = jax.random.normal(jax.random.key(0), (5, 3, 2))  # (stack, in, r)
    b = jax.random.normal(jax.random.key(1), (5, 2, 4, 6))  # (stack, r, out...)
    lay = Layout(in_axes=(2,), out_axes=(0, 3), stack_axes=(1,))  # W: (out0, stack, in, out1)
    want = jnp.einsum("sir,srpq->psiq", a, b)
    np.testing.assert_allclose(delta(a, b, lay), want, rtol=1e-5, atol=1e-6)


def test_merged_keeps_w_dtype_and_sums_wide():
    w = jnp.ones((4, 3), jnp.bfloat16)
    a, b = jnp.full((4, 2), 1e-3), jnp.ones((2, 3))
    out = merged(w, a, b, Layout((0,), (1,)), 2.0)
    assert out.dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(out, np.float32), np.full((4, 3), 1.0 + 4e-3, np.float32),
                               rtol=1e-2)


def test_column_norm_without_forming_the_merged_weight():
    from jlora._layout import column_norm, dora_merged, m_shape

    w = jax.random.normal(jax.random.key(0), (3, 5, 4, 2))
    lay = Layout(in_axes=(1,), out_axes=(0, 3), stack_axes=(2,))
    a = jax.random.normal(jax.random.key(1), (4, 5, 3))
    b = jax.random.normal(jax.random.key(2), (4, 3, 3, 2))
    v = merged(w, a, b, lay, 0.7)
    want = jnp.transpose(jnp.sqrt(jnp.sum(v * v, axis=1)), (1, 0, 2))  # (stack, out0, out1)
    assert m_shape(w.shape, lay) == (4, 3, 2)
    np.testing.assert_allclose(column_norm(w, a, b, lay, 0.7), want, rtol=1e-5)
    m = jnp.full((4, 3, 2), 2.0)
    out = dora_merged(w, a, b, m, lay, 0.7)
    np.testing.assert_allclose(jnp.sqrt(jnp.sum(out * out, axis=1)), 2.0, rtol=1e-5)
