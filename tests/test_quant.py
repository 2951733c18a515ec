"""quantize: int8/NF4 frozen bases, their error bounds, and LoRA on top of them (QLoRA)."""

import contextlib
import functools
import io

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from jax import ad_checkpoint
from models import NNX_CFG, STACK_CFG, TOKENS, ZOO_CFG, LinenScan, LinenZoo, NnxModel, bump, nnx_apply

import jlora
from jlora._quant import DOUBLE_BLOCK, NF4, NF4_HALF_GAP, QArray, quantize_array
from jlora._quantize import dequantize, quantize

# ------------------------------------------------------------------ error bounds

finite = st.floats(-1e4, 1e4, width=32, allow_subnormal=False)
adversarial = st.sampled_from(["random", "outlier", "constant", "zeros", "midpoints", "tiny"])


def _weights(values: np.ndarray, how: str) -> np.ndarray:
    """Random values, or a shape that stresses absmax scaling."""
    w = values.astype(np.float32)
    if how == "outlier":  # one huge value per block squeezes the rest into few codes
        w = w.copy()
        w.reshape(-1)[::64] = 1e4
    elif how == "constant":
        w = np.full_like(w, 3.25)
    elif how == "zeros":
        w = np.zeros_like(w)
    elif how == "midpoints":  # every value exactly between two NF4 codes (the worst case)
        mids = (NF4[1:] + NF4[:-1]) / 2
        w = np.resize(np.concatenate([[1.0], mids]), w.shape).astype(np.float32)
    elif how == "tiny":
        w = w * np.float32(1e-30)
    return w


def nf4_bound(w: np.ndarray, block: int, double: bool) -> np.ndarray:
    """Per element: absmax_block · NF4_HALF_GAP, plus the absmax's own rounding with double quantization."""
    blocks = np.abs(w.reshape(-1, block)).max(axis=1)
    bound = blocks * NF4_HALF_GAP
    if double:
        centered = blocks - blocks.mean()
        pad = -len(centered) % DOUBLE_BLOCK
        step = np.abs(np.pad(centered, (0, pad)).reshape(-1, DOUBLE_BLOCK)).max(axis=1) / 127
        bound = bound + np.repeat(step / 2, DOUBLE_BLOCK)[: len(blocks)]
    slack = 1e-6 * blocks + 1e-6 * np.abs(blocks).max() + 1e-38
    return np.repeat(bound + slack, block).reshape(w.shape)


@settings(max_examples=25, deadline=None)
@given(hnp.arrays(np.float32, (16, 8), elements=finite), adversarial)
def test_int8_error_is_at_most_half_a_step_per_output_channel(values, how):
    w = _weights(values, how)
    q = quantize_array(jnp.asarray(w), "int8")
    err = np.abs(np.asarray(q.dequantize()) - w)
    half_step = np.abs(w).max(axis=0, keepdims=True) / 254  # one scale per output column
    # A scale below float32's smallest normal is flushed to zero by XLA: channels under 127·tiny read as 0.
    assert (err <= half_step * (1 + 1e-6) + 127 * np.finfo(np.float32).tiny).all(), err.max()


@settings(max_examples=25, deadline=None)
@given(hnp.arrays(np.float32, (32, 16), elements=finite), adversarial, st.sampled_from([16, 64, 128]),
       st.booleans())
def test_nf4_error_is_at_most_half_the_widest_code_gap(values, how, block, double):
    w = _weights(values, how)
    q = quantize_array(jnp.asarray(w), "nf4", block=block, double=double)
    err = np.abs(np.asarray(q.dequantize()) - w)
    assert (err <= nf4_bound(w, block, double)).all(), err.max()


def test_nf4_half_gap_is_computed_from_the_code_book():
    assert NF4.shape == (16,) and NF4[0] == -1 and NF4[7] == 0 and NF4[-1] == 1
    assert NF4_HALF_GAP == pytest.approx((1 - 0.6961928009986877) / 2)


def test_double_quantization_over_many_blocks_stays_in_bound(key):
    w = np.asarray(jax.random.normal(key, (600, 128))) * np.linspace(0.01, 3, 128, dtype=np.float32)
    q = quantize_array(jnp.asarray(w), "nf4", double=True)  # 1200 blocks: 5 absmax blocks, the last padded
    assert q.scale.shape == (1280,) and q.scale_scale.shape == (5,)
    err = np.abs(np.asarray(q.dequantize()) - w)
    assert (err <= nf4_bound(w, 64, True)).all()


def test_stacked_kernel_is_quantized_per_layer(key):
    w = jax.random.normal(key, (3, 16, 8)) * jnp.array([1.0, 10.0, 100.0])[:, None, None]
    layout = jlora.Layout(in_axes=(1,), out_axes=(2,), stack_axes=(0,))
    for kind in ("int8", "nf4"):
        q = quantize_array(w, kind, layout=layout)
        assert q.shape == (3, 16, 8) and q.ndim == 3 and q.dtype == jnp.float32
        for i in range(3):  # each layer alone, as lax.scan slices it, is that layer quantized alone
            layer = jax.tree.map(lambda c, i=i: c[i], q)
            assert layer.shape == (16, 8)
            np.testing.assert_array_equal(layer.dequantize(), quantize_array(w[i], kind).dequantize())


# ---------------------------------------------------------------- stored bytes


@pytest.mark.parametrize("shape,stack", [((768, 768), ()), ((4, 256, 512), (0,))])
@pytest.mark.parametrize("kind,double,ratio",
                         [("int8", False, 0.27), ("nf4", False, 0.15), ("nf4", True, 0.15)])
def test_stored_bytes(key, shape, stack, kind, double, ratio):
    w = jax.random.normal(key, shape)
    layout = jlora.Layout(tuple(range(len(stack), len(shape) - 1)), (len(shape) - 1,), stack)
    q = quantize_array(w, kind, layout=layout, double=double)
    assert q.nbytes <= ratio * w.nbytes, q.nbytes / w.nbytes
    assert q.shape == w.shape and q.size == w.size


# ------------------------------------------------------------------------ API


def test_quantize_replaces_only_adapted_kernels():
    params = _params("zoo")[1]
    cfg = jlora.LoraConfig(rank=2, targets=r".*/(query|dense)/kernel")
    q = quantize(params, cfg, "int8", dtype=jnp.bfloat16)
    flat, qflat = jlora._paths.flatten(params), jlora._paths.flatten(q)
    assert flat.keys() == qflat.keys()
    quantized = {p for p, x in qflat.items() if isinstance(x, QArray)}
    assert quantized == {"params/attn/query/kernel", "params/dense/kernel"}
    for p in quantized:
        assert qflat[p].shape == flat[p].shape and qflat[p].dtype == jnp.bfloat16
    for p in flat.keys() - quantized:
        assert qflat[p] is flat[p]
    plain = jlora._paths.flatten(dequantize(q))
    assert not any(isinstance(x, QArray) for x in plain.values())
    assert plain["params/dense/kernel"].dtype == jnp.bfloat16


def test_resolve_and_summary_read_the_logical_kernel():
    params = _params("zoo")[1]
    q = quantize(params, ZOO_CFG, "nf4")
    targets = jlora._plan.Plan.of_base(ZOO_CFG, q)
    assert targets == jlora._plan.Plan.of_base(ZOO_CFG, params)
    frozen, trainable = jlora.init(jax.random.key(1), q, ZOO_CFG)
    assert jlora.summary(frozen, trainable) == jlora.summary(params, trainable)


@functools.cache
def _params(name):
    if name == "nnx":
        fn, state = nnx_apply(NnxModel(nnx.Rngs(0)))
        return fn, state, NNX_CFG, TOKENS
    model = LinenZoo() if name == "zoo" else LinenScan()
    x = TOKENS if name == "zoo" else jax.random.normal(jax.random.key(3), (2, 16))
    return model.apply, model.init(jax.random.key(0), x), ZOO_CFG if name == "zoo" else STACK_CFG, x


@pytest.mark.parametrize("name,kind,double",
                         [("zoo", "int8", False), ("scan", "nf4", True), ("nnx", "nf4", False)])
def test_wrap_on_a_quantized_base_equals_wrap_on_its_dequantized_copy(name, kind, double):
    apply_fn, params, cfg, x = _params(name)
    q = quantize(params, cfg, kind, double=double)
    plain = dequantize(q)
    frozen, trainable = jlora.init(jax.random.key(1), q, cfg)
    trainable = bump(trainable)
    lora_apply = jlora.wrap(apply_fn, cfg, fallback="error")
    uses = lora_apply.uses(frozen, trainable, x)
    assert uses and all(u.factored for u in uses)
    np.testing.assert_allclose(lora_apply(frozen, trainable, x), lora_apply(plain, trainable, x),
                               rtol=1e-5, atol=1e-5)


def test_grad_jit_nojit_and_merge_strategy_on_a_quantized_stack():
    apply_fn, params, cfg, x = _params("scan")
    q = quantize(params, cfg, "nf4", double=True)
    plain = dequantize(q)
    frozen, trainable = jlora.init(jax.random.key(1), q, cfg)
    trainable = bump(trainable)
    lora_apply = jlora.wrap(apply_fn, cfg)
    want = lora_apply(plain, trainable, x)
    np.testing.assert_allclose(jax.jit(lora_apply)(frozen, trainable, x), want, rtol=1e-5, atol=1e-5)
    with jax.disable_jit():
        np.testing.assert_allclose(lora_apply(frozen, trainable, x), want, rtol=1e-5, atol=1e-5)
    merged = jlora.wrap(apply_fn, cfg, "merge")(frozen, trainable, x)
    np.testing.assert_allclose(merged, want, rtol=1e-5, atol=1e-5)

    def loss(t, base):
        return jnp.sum(lora_apply(base, t, x) ** 2)

    got, ref = jax.grad(loss)(trainable, frozen), jax.grad(loss)(trainable, plain)
    jax.tree.map(lambda g, r: np.testing.assert_allclose(g, r, rtol=1e-5, atol=1e-5), got, ref)


# -------------------------------------------------------------------- memory


class _Block(nn.Module):
    @nn.compact
    def __call__(self, h, _):
        return jax.nn.gelu(nn.Dense(128, name="dense")(h)) + h, None


class _Stack(nn.Module):
    @nn.compact
    def __call__(self, x):
        stack = nn.scan(_Block, variable_axes={"params": 0}, split_rngs={"params": True}, length=6)
        return stack(name="layers")(x, None)[0]


def _grad_step(lora_apply, x):
    return lambda t, base: jax.grad(lambda t: jnp.sum(lora_apply(base, t, x) ** 2))(t)


def test_backward_keeps_no_dequantized_kernel(kind="nf4"):
    model, x = _Stack(), jnp.ones((4, 128))
    cfg = jlora.LoraConfig(rank=4, targets=jlora.Rule(pattern=r".*layers/.*kernel", stack_axes=(0,)))
    q = quantize(model.init(jax.random.key(0), x), cfg, kind)
    _, trainable = jlora.init(jax.random.key(1), q, cfg)
    lora_apply = jlora.wrap(model.apply, cfg)
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        ad_checkpoint.print_saved_residuals(lambda t: jnp.sum(lora_apply(q, t, x) ** 2), trainable)
    saved = out.getvalue()
    assert "f32[6,128,128]" not in saved and "f32[128,128]" not in saved, saved
    # XLA's own figures: the step on the quantized stack needs far less scratch than one that
    # dequantizes the base up front (which keeps the whole f32 stack alive).
    step = _grad_step(lora_apply, x)
    upfront = jax.jit(lambda t, b: step(t, dequantize(b))).lower(trainable, q).compile().memory_analysis()
    quant = jax.jit(step).lower(trainable, q).compile().memory_analysis()
    assert quant.temp_size_in_bytes < 0.5 * upfront.temp_size_in_bytes


# ---------------------------------------------------------------------- merge


def test_merge_dequantizes_and_requantize_warns_with_the_measured_error():
    apply_fn, params, cfg, x = _params("zoo")
    q = quantize(params, cfg, "nf4")
    frozen, trainable = jlora.init(jax.random.key(1), q, cfg)
    trainable = bump(trainable, 0.01)
    merged = jlora.merge(frozen, trainable, cfg)
    reference = jlora.merge(dequantize(q), trainable, cfg)
    jax.tree.map(np.testing.assert_array_equal, merged, reference)
    with pytest.warns(UserWarning, match=r"rounds the adapter's delta .* by up to \d.*deltas reach \d"):
        requantized = jlora.merge(frozen, trainable, cfg, requantize=True)
    flat = jlora._paths.flatten(requantized)
    assert isinstance(flat["params/dense/kernel"], QArray) and flat["params/dense/kernel"].kind == "nf4"
    assert jax.tree.structure(requantized, is_leaf=lambda v: isinstance(v, QArray)) == \
        jax.tree.structure(q, is_leaf=lambda v: isinstance(v, QArray))
    with pytest.raises(ValueError, match=r"unmerge: .*params/dense/kernel.* are quantized"):
        jlora.unmerge(requantized, trainable, cfg)


def test_requantize_int8_keeps_kind_and_layout():
    params = {"w": {"kernel": jax.random.normal(jax.random.key(0), (3, 16, 8))}}
    cfg = jlora.LoraConfig(rank=2, targets=jlora.Rule(pattern="w/kernel", stack_axes=(0,)))
    frozen, trainable = jlora.init(jax.random.key(1), quantize(params, cfg, "int8"), cfg)
    with pytest.warns(UserWarning, match=r"quantized \(int8\) base rounds"):
        out = jlora.merge(frozen, bump(trainable), cfg, requantize=True)["w"]["kernel"]
    want = jlora.merge(frozen, bump(trainable), cfg)["w"]["kernel"]
    assert out.kind == "int8" and out.scale.shape == (3, 8)
    assert float(jnp.max(jnp.abs(out.dequantize() - want))) <= float(jnp.max(jnp.abs(want))) / 254 + 1e-6


# --------------------------------------------------------------------- errors


@pytest.mark.parametrize("kwargs,error,match", [
    ({"kind": "int4"}, ValueError, r"unknown kind 'int4'; choose one of \('int8', 'nf4'\)"),
    ({"block": 63}, ValueError, r"block must be a positive even int .* got 63; e.g. block=64"),
    ({"block": 0}, ValueError, r"block must be a positive even int"),
    ({"block": True}, ValueError, r"block must be a positive even int"),
    ({"kind": "int8", "double": True}, ValueError, r"double=True quantizes NF4's per-block absmax"),
    ({"dtype": jnp.int8}, TypeError, r"must be a float dtype, got int8"),
])
def test_option_errors(kwargs, error, match):
    params = {"dense": {"kernel": jnp.ones((64, 8))}}
    with pytest.raises(error, match=match):
        quantize(params, jlora.LoraConfig(rank=2, targets="dense/kernel"), **kwargs)


def test_kernel_errors_name_path_size_and_fix():
    params = {"a": {"kernel": jnp.ones((10, 7))}, "b": {"kernel": jnp.ones((3, 5))},
              "c": {"kernel": jnp.ones((8, 2, 4))}, "ids": {"kernel": jnp.ones((4, 4), jnp.int32)}}
    cfg = jlora.LoraConfig(rank=1, targets=r"(a|b)/kernel")
    with pytest.raises(ValueError, match=r"a/kernel: its 70 values .*blocks of 64; use block=14 "
                       r"\(divides 70\)"
                       r"(.|\n)*b/kernel: its 15 values .*no even block divides 15; use kind='int8'"):
        quantize(params, cfg)
    stacked = jlora.LoraConfig(rank=1, targets=jlora.Rule(pattern="c/kernel", stack_axes=(1,)))
    with pytest.raises(ValueError, match=r"c/kernel: stack_axes \(1,\) .* not its leading axes"):
        quantize(params, stacked, "int8")
    with pytest.raises(ValueError, match=r"rule 'ids/kernel' matched ids/kernel "
                                         r".*floating-point kernels only"):
        quantize(params, jlora.LoraConfig(rank=1, targets="ids/kernel"))
    q = quantize(params, jlora.LoraConfig(rank=1, targets="a/kernel"), "int8")
    with pytest.raises(ValueError, match=r"a/kernel is already quantized \(QArray\(int8, shape=\(10, 7\)"):
        quantize(q, jlora.LoraConfig(rank=1, targets="a/kernel"), "int8")
