"""Each factored rule against hand-written maths (and never a fallback)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from jax import lax

import jlora

RTOL = 1e-5


def _setup(params, targets, rank=2, key=1, **rule):
    cfg = jlora.LoraConfig(rank=rank, alpha=3.0, targets=jlora.Rule(pattern=targets, **rule))
    frozen, trainable = jlora.init(jax.random.key(key), params, cfg)
    trainable = jax.tree.map(lambda v: v + jax.random.normal(jax.random.key(7), v.shape, v.dtype), trainable)
    return cfg, frozen, trainable


def _run_both(fn, cfg, frozen, trainable, *args):
    factored = jlora.wrap(fn, cfg, fallback="error")
    out = factored(frozen, trainable, *args)
    uses = factored.uses(frozen, trainable, *args)
    assert uses and all(u.factored for u in uses), uses
    return out, jlora.wrap(fn, cfg, strategy="merge")(frozen, trainable, *args)


@settings(max_examples=20, deadline=None)
@given(
    batch=st.integers(1, 4), fan_in=st.integers(2, 12), fan_out=st.integers(2, 12),
    rank=st.integers(1, 12), seed=st.integers(0, 2**16),
)
def test_dense_factored_equals_merge_equals_manual(batch, fan_in, fan_out, rank, seed):
    rank = min(rank, fan_in, fan_out)
    k1, k2 = jax.random.split(jax.random.key(seed))
    params = {"w": jax.random.normal(k1, (fan_in, fan_out))}
    x = jax.random.normal(k2, (batch, fan_in))
    cfg, frozen, tr = _setup(params, "w", rank=rank, key=seed)
    factored, merged = _run_both(lambda p, x: x @ p["w"], cfg, frozen, tr, x)
    manual = x @ (params["w"] + (3.0 / rank) * tr["w"]["a"] @ tr["w"]["b"])
    np.testing.assert_allclose(factored, manual, rtol=RTOL, atol=1e-5)
    np.testing.assert_allclose(merged, manual, rtol=RTOL, atol=1e-5)


@settings(max_examples=10, deadline=None)
@given(n_in=st.integers(1, 2), n_out=st.integers(1, 2), rank=st.integers(1, 3), seed=st.integers(0, 999))
def test_multi_axis_kernel_matches_einsum(n_in, n_out, rank, seed):
    in_shape, out_shape = (3, 2)[:n_in], (2, 4)[:n_out]
    rank = min(rank, int(np.prod(in_shape)), int(np.prod(out_shape)))
    w = jax.random.normal(jax.random.key(seed), in_shape + out_shape)
    x = jax.random.normal(jax.random.key(seed + 1), (5,) + in_shape)
    in_axes = tuple(range(n_in))
    cfg, frozen, tr = _setup({"w": w}, "w", rank=rank, in_axes=in_axes)
    contract = tuple(range(1, 1 + n_in))
    fn = lambda p, x: lax.dot_general(x, p["w"], ((contract, in_axes), ((), ())))  # noqa: E731
    factored, merged = _run_both(fn, cfg, frozen, tr, x)
    a = tr["w"]["a"].reshape(-1, rank)
    b = tr["w"]["b"].reshape(rank, -1)
    manual = (x.reshape(5, -1) @ (w.reshape(a.shape[0], -1) + 3.0 / rank * a @ b)).reshape((5,) + out_shape)
    np.testing.assert_allclose(factored, manual, rtol=RTOL, atol=1e-5)
    np.testing.assert_allclose(merged, manual, rtol=RTOL, atol=1e-5)


def test_kernel_as_lhs_and_transposed_use():
    w = jax.random.normal(jax.random.key(0), (6, 4))
    x = jax.random.normal(jax.random.key(1), (3, 6))
    y = jax.random.normal(jax.random.key(2), (3, 4))
    cfg, frozen, tr = _setup({"w": w}, "w")
    d = 1.5 * tr["w"]["a"] @ tr["w"]["b"]
    fn = lambda p, x, y: (p["w"].T @ x.T, y @ p["w"].T, jnp.einsum("oi,bi->bo", p["w"].T, x))  # noqa: E731
    factored, merged = _run_both(fn, cfg, frozen, tr, x, y)
    for got, want in zip(factored, ((w + d).T @ x.T, y @ (w + d).T, x @ (w + d)), strict=True):
        np.testing.assert_allclose(got, want, rtol=RTOL, atol=1e-5)


def test_conv_2d_with_strides_and_dilation():
    w = jax.random.normal(jax.random.key(0), (3, 3, 4, 6))  # HWIO
    x = jax.random.normal(jax.random.key(1), (2, 9, 9, 4))
    cfg, frozen, tr = _setup({"w": w}, "w", rank=3)

    def conv(p, x):
        return lax.conv_general_dilated(x, p["w"], (2, 1), "SAME", rhs_dilation=(1, 2),
                                        dimension_numbers=("NHWC", "HWIO", "NHWC"))

    factored, merged = _run_both(conv, cfg, frozen, tr, x)
    manual = conv({"w": w + 1.0 * jnp.einsum("hwir,ro->hwio", tr["w"]["a"], tr["w"]["b"])}, x)
    np.testing.assert_allclose(factored, manual, rtol=RTOL, atol=1e-4)
    np.testing.assert_allclose(merged, manual, rtol=RTOL, atol=1e-4)


def test_embedding_lookup_and_tied_head():
    table = jax.random.normal(jax.random.key(0), (30, 8))
    tokens = jnp.array([[0, 5, 29], [3, 3, 1]])
    cfg, frozen, tr = _setup({"embedding": table}, "embedding", rank=2)
    full = table + 1.5 * tr["embedding"]["a"] @ tr["embedding"]["b"]

    def fn(p, tokens):
        h = jnp.take(p["embedding"], tokens, axis=0)
        return h, h @ p["embedding"].T

    (h, logits), _ = _run_both(fn, cfg, frozen, tr, tokens)
    np.testing.assert_allclose(h, full[tokens], rtol=RTOL, atol=1e-5)
    np.testing.assert_allclose(logits, full[tokens] @ full.T, rtol=RTOL, atol=1e-4)


def test_stacked_kernel_batched_and_sliced():
    w = jax.random.normal(jax.random.key(0), (3, 5, 4))  # (layers, in, out)
    x = jax.random.normal(jax.random.key(1), (3, 2, 5))
    cfg, frozen, tr = _setup({"w": w}, "w", stack_axes=(0,))
    full = w + 1.5 * jnp.einsum("lir,lro->lio", tr["w"]["a"], tr["w"]["b"])

    def fn(p, x, i):
        batched = jnp.einsum("lbi,lio->lbo", x, p["w"])
        return batched, x[1] @ p["w"][1], x[2] @ lax.dynamic_index_in_dim(p["w"], i, keepdims=False)

    (batched, one, dyn), _ = _run_both(fn, cfg, frozen, tr, x, jnp.array(2))
    np.testing.assert_allclose(batched, jnp.einsum("lbi,lio->lbo", x, full), rtol=RTOL, atol=1e-5)
    np.testing.assert_allclose(one, x[1] @ full[1], rtol=RTOL, atol=1e-5)
    np.testing.assert_allclose(dyn, x[2] @ full[2], rtol=RTOL, atol=1e-5)


def test_scan_over_stack_and_cond_and_while():
    w = jax.random.normal(jax.random.key(0), (4, 6, 6)) * 0.3
    x = jax.random.normal(jax.random.key(1), (2, 6))
    cfg, frozen, tr = _setup({"w": w, "v": w[0]}, "w|v", stack_axes=())
    cfg = jlora.LoraConfig(rank=2, alpha=3.0, targets=(jlora.Rule(pattern="w", stack_axes=(0,)), "v"))
    frozen, tr = jlora.init(jax.random.key(1), {"w": w, "v": w[0]}, cfg)
    tr = jax.tree.map(lambda t: t + 0.2, tr)

    def fn(p, x):
        h, _ = lax.scan(lambda h, wl: (jnp.tanh(h @ wl), None), x, p["w"])
        h = lax.cond(h.sum() > 0, lambda h: h @ p["v"], lambda h: -(h @ p["v"]), h)
        return lax.while_loop(lambda c: c[0] < 2, lambda c: (c[0] + 1, c[1] @ p["v"]), (0, h))[1]

    factored, merged = _run_both(fn, cfg, frozen, tr, x)
    full = {"w": w + 1.5 * jnp.einsum("lir,lro->lio", tr["w"]["a"], tr["w"]["b"]),
            "v": w[0] + 1.5 * tr["v"]["a"] @ tr["v"]["b"]}
    np.testing.assert_allclose(factored, fn(full, x), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(merged, fn(full, x), rtol=1e-4, atol=1e-5)


def test_unsupported_op_falls_back_to_merge_and_is_recorded():
    w = jax.random.normal(jax.random.key(0), (4, 3))
    x = jnp.ones((2, 4))
    cfg, frozen, tr = _setup({"w": w}, "w")
    fn = lambda p, x: x @ (p["w"] * 2.0)  # noqa: E731  (`mul` has no factored rule)
    lora_apply = jlora.wrap(fn, cfg)
    uses = lora_apply.uses(frozen, tr, x)
    assert uses == [jlora.Use("w", "mul", False)]
    np.testing.assert_allclose(lora_apply(frozen, tr, x), x @ ((w + 1.5 * tr["w"]["a"] @ tr["w"]["b"]) * 2),
                               rtol=RTOL)
    with pytest.raises(ValueError, match=r"w: no factored rule for 'mul'.*fallback='merge'"):
        jlora.wrap(fn, cfg, fallback="error")(frozen, tr, x)


def test_wrong_split_names_the_fix():
    w = jax.random.normal(jax.random.key(0), (2, 4, 6))  # contracted on (0, 1), default in = (0, 1)
    x = jnp.ones((3, 4))
    cfg, frozen, tr = _setup({"w": w}, "w")
    fn = lambda p, x: jnp.einsum("bi,lio->blo", x, p["w"])  # noqa: E731  contracts axis 1 only
    with pytest.raises(ValueError, match=r"w: 'dot_general' contracts kernel axes \(1,\).*in_axes=\(1,\)"):
        jlora.wrap(fn, cfg)(frozen, tr, x)


def test_scan_over_kernel_without_stack_axes_names_the_fix():
    w = jnp.ones((3, 4, 4))
    cfg, frozen, tr = _setup({"w": w}, "w")
    fn = lambda p, x: lax.scan(lambda h, wl: (h @ wl, None), x, p["w"])[0]  # noqa: E731
    with pytest.raises(ValueError, match=r"w: 'scan.*stack_axes=\(0,\)"):
        jlora.wrap(fn, cfg)(frozen, tr, jnp.ones((2, 4)))
