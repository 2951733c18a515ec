"""Each factored rule against hand-written maths (and never a fallback)."""

import zlib

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


@settings(max_examples=12, deadline=None)
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


@pytest.mark.parametrize("in_shape,out_shape,in_axes", [
    ((6,), (4,), (0,)), ((3, 2), (2, 4), (0, 1)), ((6,), (2, 4), (0,)), ((6,), (4,), (1,)),
], ids=["dense", "multi-in-multi-out", "dense-general-out", "kernel-out-by-in"])
def test_token_axes_make_the_branch_two_matmuls_of_2d_operands(in_shape, out_shape, in_axes):
    """An input with several token axes (batch, sequence) takes the branch as (n, k)·(k, r)·(r, out).

    Each factor's gradient then contracts one token axis, so XLA needs no transposed copy of
    the cotangent (benchmarks/speed.py: 0.73x the step's wall time). Same values as the maths.
    """
    w_shape = in_shape + out_shape if in_axes[0] == 0 else out_shape + in_shape
    w = jax.random.normal(jax.random.key(0), w_shape)
    x = jax.random.normal(jax.random.key(1), (2, 5, *in_shape))
    cfg, frozen, tr = _setup({"w": w}, "w", rank=2, in_axes=in_axes)
    n = len(in_shape)
    x_axes = tuple(range(2, 2 + n))
    fn = lambda p, x: lax.dot_general(x, p["w"], ((x_axes, in_axes), ((), ())))  # noqa: E731
    factored, merged = _run_both(fn, cfg, frozen, tr, x)
    a, b = tr["w"]["a"].reshape(-1, 2), tr["w"]["b"].reshape(2, -1)
    w2 = w.reshape(a.shape[0], -1) if in_axes[0] == 0 else w.reshape(-1, a.shape[0]).T
    manual = (x.reshape(10, -1) @ (w2 + 1.5 * a @ b)).reshape(2, 5, *out_shape)
    np.testing.assert_allclose(factored, manual, rtol=RTOL, atol=1e-5)
    np.testing.assert_allclose(merged, manual, rtol=RTOL, atol=1e-5)

    jaxpr = jax.make_jaxpr(lambda t: jlora.wrap(fn, cfg)(frozen, t, x))(tr)
    dots = [e for e in jaxpr.eqns if e.primitive.name == "dot_general"]  # inside a trace: evaluated in place
    branch = [e for e in dots if e.outvars[0].aval.shape[0] == 10]  # the 2 x 5 tokens, flattened
    assert len(dots) == 3 and len(branch) == 2, dots
    assert all(v.aval.ndim == 2 for e in branch for v in e.invars), branch


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
    with pytest.raises(ValueError, match=r"w: configured in_axes=\(0, 1\).*dot_general "
                                         r"contracts axes \(1,\); the real split is "
                                         r"in_axes=\(1,\)(.|\n)*jlora.infer_layouts\(config"):
        jlora.wrap(fn, cfg)(frozen, tr, x)


def test_scan_over_kernel_without_stack_axes_names_the_fix():
    w = jnp.ones((3, 4, 4))
    cfg, frozen, tr = _setup({"w": w}, "w")
    fn = lambda p, x: lax.scan(lambda h, wl: (h @ wl, None), x, p["w"])[0]  # noqa: E731
    with pytest.raises(ValueError, match=r"w: configured in_axes=\(0, 1\).*one slice of axes \(0,\) at a "
                                         r"time; the real split is in_axes=\(1,\), stack_axes=\(0,\)"):
        jlora.wrap(fn, cfg)(frozen, tr, jnp.ones((2, 4)))


# ------------------------------------------------------------------ variants


def _variant(params, targets, **cfg):
    cfg = jlora.LoraConfig(rank=2, alpha=3.0, targets=targets, **cfg)
    frozen, tr = jlora.init(jax.random.key(1), params, cfg)
    tr = jax.tree.map(lambda v: v + 0.3 * jax.random.normal(jax.random.key(7), v.shape, v.dtype), tr)
    return cfg, frozen, tr


@pytest.mark.parametrize("name", sorted(jlora.NONLINEARITIES))
def test_nonlinearity_is_f_of_x_a_then_b(name):
    w = jax.random.normal(jax.random.key(0), (6, 4))
    x = jax.random.normal(jax.random.key(1), (3, 6))
    cfg, frozen, tr = _variant({"w": w}, "w", nonlinearity=name)
    lora_apply = jlora.wrap(lambda p, x: x @ p["w"], cfg, fallback="error")
    f = jlora.NONLINEARITIES[name]
    want = x @ w + 1.5 * f(x @ tr["w"]["a"]) @ tr["w"]["b"]
    np.testing.assert_allclose(lora_apply(frozen, tr, x), want, rtol=1e-5, atol=1e-6)


def test_nonlinearity_in_conv_and_embedding_lookup():
    conv_w = jax.random.normal(jax.random.key(0), (3, 4, 5))  # (window, in, out)
    table = jax.random.normal(jax.random.key(1), (10, 4))
    x = jax.random.normal(jax.random.key(2), (2, 7, 4))
    tokens = jnp.array([[1, 9, 3]])
    cfg, frozen, tr = _variant({"conv": conv_w, "embedding": table}, "conv|embedding", nonlinearity="tanh")

    def conv(x, k):
        return lax.conv_general_dilated(x, k, (1,), "SAME", dimension_numbers=("NWC", "WIO", "NWC"))

    fn = lambda p, x, t: (conv(x, p["conv"]), jnp.take(p["embedding"], t, axis=0))  # noqa: E731
    got_conv, got_emb = jlora.wrap(fn, cfg, fallback="error")(frozen, tr, x, tokens)
    a_kernel = tr["conv"]["a"]  # (window, in, r): a conv kernel with W's window
    want_conv = conv(x, conv_w) + 1.5 * jnp.tanh(conv(x, a_kernel)) @ tr["conv"]["b"]
    want_emb = table[tokens] + 1.5 * jnp.tanh(tr["embedding"]["a"][tokens]) @ tr["embedding"]["b"]
    np.testing.assert_allclose(got_conv, want_conv, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(got_emb, want_emb, rtol=1e-5, atol=1e-6)


def test_nonlinearity_refuses_a_transposed_use_and_a_fallback():
    table = jax.random.normal(jax.random.key(1), (10, 4))
    cfg, frozen, tr = _variant({"embedding": table}, "embedding", nonlinearity="relu")
    tied = lambda p, h: (jnp.take(p["embedding"], jnp.array([1, 2]), axis=0), h @ p["embedding"].T)  # noqa: E731
    with pytest.raises(ValueError, match=r"embedding: this dot_general uses the kernel transposed"):
        jlora.wrap(tied, cfg)(frozen, tr, jnp.ones((2, 4)))
    head_only = lambda p, h: h @ p["embedding"].T  # noqa: E731  only transposed: the split is swapped
    with pytest.raises(ValueError, match=r"embedding: configured in_axes=\(0,\).*the real "
                                         r"split is in_axes=\(1,\)"):
        jlora.wrap(head_only, cfg)(frozen, tr, jnp.ones((2, 4)))
    doubled = lambda p, h: h @ (2.0 * p["embedding"]).T  # noqa: E731
    with pytest.raises(ValueError, match=r"embedding: an op with no factored rule .* no "
                                         r"merged weight W' .* exists"):
        jlora.wrap(doubled, cfg)(frozen, tr, jnp.ones((2, 4)))


def test_dropout_only_with_a_key_and_with_the_documented_mask():
    w = jax.random.normal(jax.random.key(0), (6, 4))
    x = jax.random.normal(jax.random.key(1), (3, 6))
    cfg, frozen, tr = _variant({"w": w}, "w", dropout=0.5)
    lora_apply = jlora.wrap(lambda p, x: x @ p["w"], cfg, fallback="error")
    clean = x @ w + 1.5 * (x @ tr["w"]["a"]) @ tr["w"]["b"]
    np.testing.assert_allclose(lora_apply(frozen, tr, x), clean, rtol=1e-5)  # eval: no dropout
    rng = jax.random.key(3)
    keep = jax.random.bernoulli(jax.random.fold_in(rng, zlib.crc32(b"w")), 0.5, x.shape)
    dropped = jnp.where(keep, x / 0.5, 0.0)
    want = x @ w + 1.5 * (dropped @ tr["w"]["a"]) @ tr["w"]["b"]
    np.testing.assert_allclose(lora_apply(frozen, tr, x, lora_rng=rng), want, rtol=1e-5, atol=1e-6)
    assert not np.allclose(lora_apply(frozen, tr, x, lora_rng=jax.random.key(4)), want)
    with pytest.raises(ValueError, match=r"strategy='merge' .* cannot drop out"):
        jlora.wrap(lambda p, x: x @ p["w"], cfg, strategy="merge")(frozen, tr, x, lora_rng=rng)


def test_dropout_masks_differ_per_scanned_layer():
    w = jax.random.normal(jax.random.key(0), (2, 5, 5)) * 0.1
    x = jnp.ones((1, 5))
    cfg = jlora.LoraConfig(rank=2, targets=jlora.Rule(pattern="w", stack_axes=(0,)), dropout=0.5)
    tr = jax.tree.map(lambda v: v + 1.0, jlora.init(jax.random.key(1), {"w": w}, cfg)[1])

    def fn(p, x):
        _, ys = lax.scan(lambda h, wl: (h, h @ wl), x, p["w"])
        return ys

    # Both layers see the same input and the same adapter values; only the mask differs.
    tr_same = {"w": {"a": jnp.broadcast_to(tr["w"]["a"][:1], tr["w"]["a"].shape),
                     "b": jnp.broadcast_to(tr["w"]["b"][:1], tr["w"]["b"].shape)}}
    frozen_same = {"w": jnp.broadcast_to(w[:1], w.shape)}
    ys = jlora.wrap(fn, cfg, fallback="error")(frozen_same, tr_same, x, lora_rng=jax.random.key(0))
    assert not np.allclose(ys[0], ys[1])


def _dora_manual(w, a, b, m, scale, in_axes):
    """The DoRA paper: W' = m · V/‖V‖_c, V = W + s·a@b, norm over the input axes."""
    v = w + scale * jnp.tensordot(a, b, axes=1)
    norm = jnp.sqrt(jnp.sum(v * v, axis=in_axes, keepdims=True))
    return m.reshape(norm.shape) * v / norm


@pytest.mark.parametrize(
    ("shape", "in_axes", "spec"),
    [((6, 4), (0,), "bi,io->bo"), ((6, 2, 3), (0,), "bi,ihk->bhk"), ((2, 3, 5), (0, 1), "bhk,hko->bo")],
)
def test_dora_equals_the_paper_formula(shape, in_axes, spec):
    w = jax.random.normal(jax.random.key(0), shape)
    x = jax.random.normal(jax.random.key(1), (4,) + shape[: len(in_axes)])
    cfg, frozen, tr = _variant({"w": w}, jlora.Rule(pattern="w", in_axes=in_axes), dora=True)
    fn = lambda p, x: jnp.einsum(spec, x, p["w"])  # noqa: E731
    factored, merged = _run_both(fn, cfg, frozen, tr, x)
    want = fn({"w": _dora_manual(w, tr["w"]["a"], tr["w"]["b"], tr["w"]["m"], 1.5, in_axes)}, x)
    np.testing.assert_allclose(factored, want, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(merged, want, rtol=1e-5, atol=1e-5)


def test_dora_conv_and_gradients_match_merge():
    w = jax.random.normal(jax.random.key(0), (3, 4, 5))
    x = jax.random.normal(jax.random.key(1), (2, 7, 4))
    cfg, frozen, tr = _variant({"w": w}, "w", dora=True)

    def fn(p, x):
        return lax.conv_general_dilated(x, p["w"], (1,), "SAME", dimension_numbers=("NWC", "WIO", "NWC"))

    factored, merged = _run_both(fn, cfg, frozen, tr, x)
    np.testing.assert_allclose(factored, merged, rtol=1e-5, atol=1e-5)
    want = fn({"w": _dora_manual(w, tr["w"]["a"], tr["w"]["b"], tr["w"]["m"], 1.5, (0, 1))}, x)
    np.testing.assert_allclose(factored, want, rtol=1e-5, atol=1e-5)
    grads = [jax.grad(lambda t, s=s: jnp.sum(jlora.wrap(fn, cfg, s)(frozen, t, x) ** 2))(tr)
             for s in ("factored", "merge")]
    for got, want in zip(jax.tree.leaves(grads[0]), jax.tree.leaves(grads[1]), strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)


def test_dora_in_a_scanned_stack():
    w = jax.random.normal(jax.random.key(0), (3, 5, 5)) * 0.5
    x = jax.random.normal(jax.random.key(1), (2, 5))
    cfg, frozen, tr = _variant({"w": w}, jlora.Rule(pattern="w", stack_axes=(0,)), dora=True)
    fn = lambda p, x: lax.scan(lambda h, wl: (jnp.tanh(h @ wl), None), x, p["w"])[0]  # noqa: E731
    factored, merged = _run_both(fn, cfg, frozen, tr, x)
    layers = [_dora_manual(w[i], tr["w"]["a"][i], tr["w"]["b"][i], tr["w"]["m"][i], 1.5, (0,))
              for i in range(3)]
    np.testing.assert_allclose(factored, fn({"w": jnp.stack(layers)}, x), rtol=1e-5, atol=1e-5)


def test_a_renamed_primitive_parameter_names_the_primitive_and_the_jax_version():
    from jlora._rewrite import UnsupportedJax, _param

    eqn = jax.make_jaxpr(lambda x: x.T)(jnp.ones((2, 3))).eqns[0]
    with pytest.raises(UnsupportedJax, match=rf"'transpose' primitive of jax {jax.__version__}: it has no "
                                             r"parameter 'permutation'.*strategy='merge'"):
        _param(eqn.replace(params={}), "permutation")


def test_scan_operand_groups_are_read_on_every_supported_jax():
    """jax <= 0.10 says num_consts/num_carry; jax >= 0.11 packs (consts, carry, xs) into ft_in."""
    from jlora._rewrite import _scan_counts

    c = jnp.arange(3.0)
    jaxpr = jax.make_jaxpr(lambda h, xs: lax.scan(lambda h, x: (h * x + c, h), h, xs))(
        jnp.ones(3), jnp.ones((4, 3)))
    scan = next(e for e in jaxpr.eqns if e.primitive.name == "scan")
    assert _scan_counts(scan) == (1, 1)


def test_stack_axes_left_free_by_the_op_keep_one_adapter_each():
    """'bi,lio->lbo': every layer applied to the same input; layer l uses its own a[l], b[l]."""
    w = jax.random.normal(jax.random.key(0), (3, 6, 4))
    x = jax.random.normal(jax.random.key(1), (5, 6))
    cfg, frozen, tr = _setup({"w": w}, "w", rank=2, stack_axes=(0,))
    fn = lambda p, x: jnp.einsum("bi,lio->lbo", x, p["w"])  # noqa: E731
    factored, merged = _run_both(fn, cfg, frozen, tr, x)
    manual = jnp.stack([x @ (w[i] + 1.5 * tr["w"]["a"][i] @ tr["w"]["b"][i]) for i in range(3)])
    np.testing.assert_allclose(factored, manual, rtol=RTOL, atol=1e-5)
    np.testing.assert_allclose(merged, manual, rtol=RTOL, atol=1e-5)
