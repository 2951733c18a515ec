"""init: pure, deterministic, PEFT's initialisation, Linen and NNX trees."""

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from flax.core import FrozenDict
from models import LinenScan, LinenZoo, NnxModel, nnx_apply

import jlora

TOKENS = jnp.array([[1, 2, 3, 4]])


def _linen_zoo():
    return LinenZoo().init(jax.random.key(0), TOKENS)


def test_shapes_and_b_zero(key):
    params = _linen_zoo()
    cfg = jlora.LoraConfig(rank=2, targets=r".*(kernel|embedding)")
    frozen, trainable = jlora.init(key, params, cfg)
    assert frozen is params
    p = trainable["params"]
    assert p["attn"]["query"]["kernel"]["a"].shape == (16, 2)
    assert p["attn"]["query"]["kernel"]["b"].shape == (2, 2, 8)
    assert p["attn"]["out"]["kernel"]["a"].shape == (2, 8, 2)
    assert p["conv"]["kernel"]["a"].shape == (3, 16, 2)
    assert p["embed"]["embedding"]["a"].shape == (40, 2)
    for leaf_path, leaf in jax.tree_util.tree_leaves_with_path(trainable):
        if jax.tree_util.keystr(leaf_path).endswith("['b']"):
            assert not leaf.any()
        assert leaf.dtype == jnp.float32


def test_deterministic_and_key_dependent(key):
    params = _linen_zoo()
    cfg = jlora.LoraConfig(rank=2, targets=r".*kernel")
    t1 = jlora.init(key, params, cfg)[1]
    t2 = jlora.init(key, params, cfg)[1]
    t3 = jlora.init(jax.random.key(1), params, cfg)[1]
    assert jax.tree.all(jax.tree.map(lambda a, b: bool((a == b).all()), t1, t2))
    assert not (t1["params"]["dense"]["kernel"]["a"] == t3["params"]["dense"]["kernel"]["a"]).all()


def test_adding_a_target_leaves_the_others_unchanged(key):
    params = _linen_zoo()
    small = jlora.init(key, params, jlora.LoraConfig(rank=2, targets=r".*/dense/kernel"))[1]
    big = jlora.init(key, params, jlora.LoraConfig(rank=2, targets=r".*kernel"))[1]
    np.testing.assert_array_equal(small["params"]["dense"]["kernel"]["a"],
                                  big["params"]["dense"]["kernel"]["a"])


def test_kaiming_uniform_bound_is_one_over_sqrt_fan_in(key):
    params = {"w": jnp.zeros((400, 300))}
    a = jlora.init(key, params, jlora.LoraConfig(rank=64, targets="w"))[1]["w"]["a"]
    bound = 1 / np.sqrt(400)
    assert float(jnp.abs(a).max()) <= bound
    assert float(jnp.abs(a).max()) > 0.99 * bound
    assert abs(float(a.std()) - bound / np.sqrt(3)) < 0.02 * bound


def test_gaussian_std_is_one_over_rank(key):
    params = {"w": jnp.zeros((400, 300))}
    a = jlora.init(key, params, jlora.LoraConfig(rank=16, targets="w", init="gaussian"))[1]["w"]["a"]
    assert abs(float(a.std()) - 1 / 16) < 0.04 / 16  # 6,400 draws: ~0.9% std error


def test_embedding_a_is_standard_normal(key):
    params = {"embed": {"embedding": jnp.zeros((1000, 64))}}
    a = jlora.init(key, params, jlora.LoraConfig(rank=8, targets=".*embedding"))[1]["embed"]["embedding"]["a"]
    assert abs(float(a.std()) - 1.0) < 0.03


def test_adapter_dtype_is_the_configs(key):
    params = {"w": jnp.zeros((8, 8), jnp.bfloat16)}
    t = jlora.init(key, params, jlora.LoraConfig(rank=2, targets="w", dtype="bfloat16"))[1]
    assert t["w"]["a"].dtype == t["w"]["b"].dtype == jnp.bfloat16


def test_train_in_full_copies_and_extra_collections_pass_through(key):
    model = nn.Sequential([nn.Dense(8), nn.BatchNorm(use_running_average=True), nn.Dense(3)])
    params = FrozenDict(model.init(key, jnp.ones((2, 4))))
    cfg = jlora.LoraConfig(rank=2, targets=r"params/layers_0/kernel", train_in_full=r"params/layers_2/.*")
    frozen, trainable = jlora.init(key, params, cfg)
    assert frozen is params and "batch_stats" in frozen
    assert set(trainable["params"]) == {"layers_0", "layers_2"}
    head = trainable["params"]["layers_2"]["kernel"]
    np.testing.assert_array_equal(head, params["params"]["layers_2"]["kernel"])
    assert head is not params["params"]["layers_2"]["kernel"]


def test_nnx_state(key):
    _, state = nnx_apply(NnxModel(nnx.Rngs(0)))
    cfg = jlora.LoraConfig(rank=2, targets=(jlora.Rule(pattern=r"layers/.*/kernel", stack_axes=(0,)),
                                            r"attn/value/kernel", r"embed/embedding"))
    frozen, trainable = jlora.init(key, state, cfg)
    assert trainable["attn"]["value"]["kernel"]["b"].shape == (2, 2, 8)
    assert trainable["layers"]["up"]["kernel"]["a"].shape == (3, 16, 2)
    assert trainable["layers"]["up"]["kernel"]["b"].shape == (3, 2, 32)


def test_scanned_linen_stack_needs_stack_axes(key):
    params = LinenScan().init(key, jnp.ones((2, 16)))
    cfg = jlora.LoraConfig(rank=2, targets=jlora.Rule(pattern=r".*/kernel", stack_axes=(0,)))
    trainable = jlora.init(key, params, cfg)[1]
    assert trainable["params"]["layers"]["up"]["kernel"]["a"].shape == (3, 16, 2)


def test_key_must_be_a_jax_key():
    with pytest.raises(TypeError, match=r"key must be a JAX PRNG key"):
        jlora.init(0, {"w": jnp.zeros((2, 2))}, jlora.LoraConfig(rank=1, targets="w"))


@pytest.mark.parametrize("stacked", [False, True])
def test_pissa_keeps_the_function_and_freezes_the_residual(key, stacked):
    w = jax.random.normal(key, (3, 12, 8) if stacked else (12, 8))
    x = jax.random.normal(jax.random.key(1), (5, 12))
    rule = jlora.Rule(pattern="w", stack_axes=(0,) if stacked else ())
    cfg = jlora.LoraConfig(rank=3, alpha=6.0, targets=rule, init="pissa")
    frozen, trainable = jlora.init(key, {"w": w}, cfg)
    a, b = trainable["w"]["a"], trainable["w"]["b"]
    top = jnp.einsum("...ir,...ro->...io", a, b) * 2.0
    np.testing.assert_allclose(frozen["w"] + top, w, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(jlora.merge(frozen, trainable, cfg)["w"], w, rtol=1e-5, atol=1e-5)
    # scale·a@b is the best rank-3 approximation: its singular values are W's top three.
    s_w = np.linalg.svd(np.asarray(w), compute_uv=False)[..., :3]
    np.testing.assert_allclose(np.linalg.svd(np.asarray(top), compute_uv=False)[..., :3], s_w, rtol=1e-4)
    fn = (lambda p, x: jnp.einsum("bi,lio->lbo", x, p["w"])) if stacked else (lambda p, x: x @ p["w"])
    np.testing.assert_allclose(jlora.wrap(fn, cfg)(frozen, trainable, x), fn({"w": w}, x),
                               rtol=1e-4, atol=1e-4)


def test_pissa_on_a_linen_attention_model(key):
    params = _linen_zoo()
    cfg = jlora.LoraConfig(rank=2, targets=r".*attn/.*/kernel", init="pissa")
    frozen, trainable = jlora.init(key, params, cfg)
    assert frozen is not params
    assert (frozen["params"]["dense"]["kernel"] == params["params"]["dense"]["kernel"]).all()
    out = jlora.wrap(LinenZoo().apply, cfg)(frozen, trainable, TOKENS)
    np.testing.assert_allclose(out, LinenZoo().apply(params, TOKENS), rtol=1e-4, atol=1e-4)


def test_dora_magnitude_starts_at_the_weight_norm(key):
    params = _linen_zoo()
    cfg = jlora.LoraConfig(rank=2, targets=r".*attn/(query|out)/kernel", dora=True)
    _, trainable = jlora.init(key, params, cfg)
    q, o = params["params"]["attn"]["query"]["kernel"], params["params"]["attn"]["out"]["kernel"]
    np.testing.assert_allclose(trainable["params"]["attn"]["query"]["kernel"]["m"],
                               jnp.linalg.norm(q, axis=0), rtol=1e-6)
    np.testing.assert_allclose(trainable["params"]["attn"]["out"]["kernel"]["m"],
                               jnp.sqrt(jnp.sum(o * o, axis=(0, 1))), rtol=1e-6)
    out = jlora.wrap(LinenZoo().apply, cfg, fallback="error")(*jlora.init(key, params, cfg), TOKENS)
    np.testing.assert_allclose(out, LinenZoo().apply(params, TOKENS), rtol=1e-5, atol=1e-5)


def test_dora_is_refused_on_embedding_tables(key):
    cfg = jlora.LoraConfig(rank=2, targets=r".*embedding", dora=True)
    with pytest.raises(ValueError, match=r"params/embed/embedding .*DoRA .* not defined here "
                                         r"for embedding tables"):
        jlora.init(key, _linen_zoo(), cfg)


def test_quantized_base(key):
    """DoRA's magnitude is read off the dequantized kernel; PiSSA needs the full-precision one."""
    params = {"d": {"kernel": jax.random.normal(key, (64, 32))}}
    dora = jlora.LoraConfig(rank=2, targets=".*/kernel", dora=True)
    q = jlora.quantize(params, dora, "int8")
    m = jlora.init(key, q, dora)[1]["d"]["kernel"]["m"]
    np.testing.assert_array_equal(m, jlora.init(key, jlora.dequantize(q), dora)[1]["d"]["kernel"]["m"])
    pissa = jlora.LoraConfig(rank=2, targets=".*/kernel", init="pissa")
    with pytest.raises(ValueError, match=r"init: .*d/kernel is quantized .* init='pissa' takes the SVD .* "
                                         r"then quantize the residual"):
        jlora.init(key, jlora.quantize(params, pissa, "int8"), pissa)


def test_a_bank_holds_one_fresh_adapter_per_name(key):
    params = _linen_zoo()
    one = jlora.LoraConfig(rank=2, alpha=4.0, targets=r".*kernel")
    bank_cfg = dataclasses.replace(one, adapters=("fr", "de", "es"))
    frozen, bank = jlora.init(key, params, bank_cfg)
    assert frozen is params
    for k, name in enumerate(bank_cfg.adapters):
        want = jlora.init(jax.random.fold_in(key, k), params, one)[1]
        got, got_cfg = jlora.unstack(bank, bank_cfg, name)
        assert got_cfg == one  # the config's own scale: nothing folded into b
        jax.tree.map(np.testing.assert_array_equal, got, want)
    assert not (bank["params"]["dense"]["kernel"]["a"][0] == bank["params"]["dense"]["kernel"]["a"][1]).all()


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"train_in_full": r".*/bias"}, r"init: params/[\w/]+/bias is trained in full "
                                        r"\(LoraConfig.train_in_full\), but a bank \['fr', 'de'\] holds "
                                        r"low-rank adapters only"),
        ({"dora": True}, r"init: DoRA: DoRA's magnitude rescales the whole output of its own adapter"),
        ({"dylora": "frozen"}, r"init: DyLoRA \(dylora='frozen'\): .* cannot share a bank"),
        ({"init": "pissa"}, r"init='pissa' gives every adapter its own residual base"),
    ],
)
def test_a_bank_refuses_what_cannot_share_it(key, changes, message):
    cfg = jlora.LoraConfig(rank=2, targets=r".*/dense/kernel", adapters=("fr", "de"), **changes)
    with pytest.raises(ValueError, match=message):
        jlora.init(key, _linen_zoo(), cfg)
