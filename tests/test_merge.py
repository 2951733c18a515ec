"""merge/unmerge: exact structure, hand-written maths, the inverse, and safe mode."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from flax.core import FrozenDict
from hypothesis import given, settings
from hypothesis import strategies as st
from models import NnxModel, bump, nnx_apply

import jlora


def _bn_params():
    model = nn.Sequential([nn.Dense(8), nn.BatchNorm(use_running_average=True), nn.Dense(3)])
    return FrozenDict(model.init(jax.random.key(0), jnp.ones((2, 4))))


def test_zero_adapter_merges_to_params_exactly_with_structure(key):
    params = _bn_params()
    cfg = jlora.LoraConfig(rank=2, targets=r".*/kernel", train_in_full=r"params/layers_2/bias")
    frozen, trainable = jlora.init(key, params, cfg)
    out = jlora.merge(frozen, trainable, cfg)
    assert type(out) is FrozenDict
    assert jax.tree.structure(out) == jax.tree.structure(params)
    for got, want in zip(jax.tree.leaves(out), jax.tree.leaves(params), strict=True):
        assert got.dtype == want.dtype
        np.testing.assert_array_equal(got, want)


def test_nnx_state_merges_back_into_a_model(key):
    model = NnxModel(nnx.Rngs(0))
    apply_fn, state = nnx_apply(model)
    cfg = jlora.LoraConfig(rank=2, targets=(jlora.Rule(pattern=r"layers/.*/kernel", stack_axes=(0,)),
                                            r"attn/.*/kernel"))
    frozen, trainable = jlora.init(key, state, cfg)
    trainable = bump(trainable)
    merged = jlora.merge(frozen, trainable, cfg)
    assert type(merged) is type(state) and jax.tree.structure(merged) == jax.tree.structure(state)
    tokens = jnp.array([[1, 2, 3]])
    np.testing.assert_allclose(apply_fn(merged, tokens), jlora.wrap(apply_fn, cfg)(frozen, trainable, tokens),
                               rtol=1e-5, atol=1e-5)
    graphdef, _ = nnx.split(model)
    nnx.merge(graphdef, merged)  # a usable model again


@settings(max_examples=10, deadline=None)
@given(fan_in=st.integers(2, 9), fan_out=st.integers(2, 9), rank=st.integers(1, 9), scale=st.floats(-2, 2),
       seed=st.integers(0, 999))
def test_merge_is_w_plus_scaled_a_b(fan_in, fan_out, rank, scale, seed):
    rank = min(rank, fan_in, fan_out)
    k1, k2, k3 = jax.random.split(jax.random.key(seed), 3)
    params = {"w": jax.random.normal(k1, (fan_in, fan_out))}
    cfg = jlora.LoraConfig(rank=rank, alpha=2.0, targets="w")
    frozen, tr = jlora.init(k2, params, cfg)
    np.testing.assert_array_equal(jlora.merge(frozen, tr, cfg, scale=scale)["w"], params["w"])  # zero b
    tr = {"w": {"a": tr["w"]["a"], "b": jax.random.normal(k3, tr["w"]["b"].shape)}}
    want = params["w"] + scale * (2.0 / rank) * (tr["w"]["a"] @ tr["w"]["b"])
    np.testing.assert_allclose(jlora.merge(frozen, tr, cfg, scale=scale)["w"], want, rtol=1e-5, atol=1e-5)
    back = jlora.unmerge(jlora.merge(frozen, tr, cfg, scale=scale), tr, cfg, scale=scale)
    np.testing.assert_allclose(back["w"], params["w"], rtol=1e-5, atol=1e-5)


def test_merge_under_jit_and_low_precision(key):
    params = {"dense": {"kernel": jnp.ones((8, 4), jnp.bfloat16)}}
    cfg = jlora.LoraConfig(rank=2, targets=r".*/kernel")
    frozen, tr = jlora.init(key, params, cfg)
    tr = bump(tr, 0.5)
    eager = jlora.merge(frozen, tr, cfg)
    jitted = jax.jit(lambda f, t: jlora.merge(f, t, cfg))(frozen, tr)
    assert eager["dense"]["kernel"].dtype == jnp.bfloat16
    np.testing.assert_array_equal(eager["dense"]["kernel"], jitted["dense"]["kernel"])
    want = 1.0 + 4.0 * (tr["dense"]["kernel"]["a"] @ tr["dense"]["kernel"]["b"])
    np.testing.assert_allclose(eager["dense"]["kernel"].astype(jnp.float32), want, rtol=1e-2)


def test_train_in_full_leaves_take_the_trained_value(key):
    params = _bn_params()
    cfg = jlora.LoraConfig(rank=2, targets=r"params/layers_0/kernel", train_in_full=r"params/layers_2/bias")
    frozen, tr = jlora.init(key, params, cfg)
    tr["params"]["layers_2"]["bias"] = tr["params"]["layers_2"]["bias"] + 2.0
    base = params["params"]["layers_2"]["bias"]
    np.testing.assert_allclose(jlora.merge(frozen, tr, cfg)["params"]["layers_2"]["bias"], base + 2.0)
    np.testing.assert_allclose(jlora.merge(frozen, tr, cfg, scale=0.25)["params"]["layers_2"]["bias"],
                               base + 0.5)


def test_safe_mode_names_every_non_finite_path(key):
    params = {"a": {"kernel": jnp.ones((4, 4))}, "b": {"kernel": jnp.ones((4, 4))},
              "c": {"kernel": jnp.ones((4, 4))}}
    cfg = jlora.LoraConfig(rank=2, targets=r".*/kernel")
    frozen, tr = jlora.init(key, params, cfg)
    tr["a"]["kernel"]["b"] = tr["a"]["kernel"]["b"].at[0, 0].set(jnp.nan)
    tr["c"]["kernel"]["a"] = tr["c"]["kernel"]["a"].at[1, 1].set(jnp.inf)
    tr["c"]["kernel"]["b"] = tr["c"]["kernel"]["b"] + 1.0
    with pytest.raises(ValueError, match=r"non-finite values \(nan/inf\) at: a/kernel, c/kernel\."):
        jlora.merge(frozen, tr, cfg, safe=True)
    assert jlora.merge(frozen, bump(jlora.init(key, params, cfg)[1]), cfg, safe=True) is not None
    with pytest.raises(ValueError, match=r"call it outside jax.jit"):
        jax.jit(lambda t: jlora.merge(frozen, t, cfg, safe=True))(tr)


def test_merge_rejects_a_mismatched_trainable(key):
    params = {"w": jnp.ones((4, 4))}
    cfg = jlora.LoraConfig(rank=2, targets="w")
    with pytest.raises(ValueError, match=r"(?s)missing w/a \(expected shape \(4, 2\)\).*unexpected v"):
        jlora.merge(params, {"w": {"b": jnp.zeros((2, 4))}, "v": jnp.ones(3)}, cfg)
    with pytest.raises(ValueError, match=r"missing w/a"):
        jlora.unmerge(params, {"w": {"b": jnp.zeros((2, 4))}}, cfg)


def test_nonlinear_adapters_have_no_merged_form(key):
    cfg = jlora.LoraConfig(rank=2, targets="w", nonlinearity="gelu")
    frozen, tr = jlora.init(key, {"w": jnp.ones((4, 4))}, cfg)
    with pytest.raises(ValueError, match=r"merge: nonlinearity='gelu': the delta .* no longer a linear map "
                                         r".*strategy='factored'"):
        jlora.merge(frozen, tr, cfg)
    with pytest.raises(ValueError, match=r"no longer a linear map"):
        jlora.wrap(lambda p, x: x @ p["w"], cfg, "merge")(frozen, tr, jnp.ones((1, 4)))


def test_dora_merge_is_the_paper_formula_and_unmerge_is_refused(key):
    w = jax.random.normal(key, (6, 4))
    cfg = jlora.LoraConfig(rank=2, alpha=4.0, targets="w", dora=True)
    frozen, tr = jlora.init(key, {"w": w}, cfg)
    np.testing.assert_allclose(jlora.merge(frozen, tr, cfg)["w"], w, rtol=1e-6)  # b = 0, m = ‖W‖
    tr = bump(tr, 0.2)
    v = w + 2.0 * tr["w"]["a"] @ tr["w"]["b"]
    want = tr["w"]["m"][None, :] * v / jnp.linalg.norm(v, axis=0)[None, :]
    merged = jlora.merge(frozen, tr, cfg)["w"]
    np.testing.assert_allclose(merged, want, rtol=1e-5)
    np.testing.assert_allclose(jnp.linalg.norm(merged, axis=0), tr["w"]["m"], rtol=1e-5)
    with pytest.raises(ValueError, match=r"unmerge: DoRA: a DoRA merge rescales every output unit"):
        jlora.unmerge(merged, tr, cfg)


def test_merge_refuses_integer_factors_and_a_rank_without_dylora():
    params = {"w": jnp.ones((4, 3))}
    cfg = jlora.LoraConfig(rank=2, targets="w")
    frozen, trainable = jlora.init(jax.random.key(0), params, cfg)
    ints = jax.tree.map(lambda v: v.astype(jnp.int32), trainable)
    with pytest.raises(ValueError, match=r"w/a has dtype int32; LoRA factors .* floating point"):
        jlora.merge(frozen, ints, cfg)
    with pytest.raises(ValueError, match=r"merge: rank=1 picks a DyLoRA rank, but this "
                                         r"config has dylora=None"):
        jlora.merge(frozen, trainable, cfg, rank=1)
