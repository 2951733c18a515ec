"""DyLoRA: evaluation at any rank without recompiling, truncate, rank_sweep."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from models import LinenScan, bump

import jlora


def _mlp():
    model = nn.Sequential([nn.Dense(16), nn.relu, nn.Dense(4)])
    x = jax.random.normal(jax.random.key(0), (3, 8))
    return model, x, model.init(jax.random.key(1), x)


@pytest.mark.parametrize("mode", ["frozen", "plain"])
def test_lora_rank_equals_truncated_adapter(mode):
    model, x, params = _mlp()
    cfg = jlora.LoraConfig(rank=4, alpha=8.0, dylora=mode,
                           targets=(jlora.Rule(pattern=r".*_0/kernel", rank=3), r".*_2/kernel"))
    frozen, trainable = jlora.init(jax.random.key(2), params, cfg)
    trainable = bump(trainable, 0.2)
    lora_apply = jlora.wrap(model.apply, cfg)
    for k in (1, 2, 3, 4):
        small, cfg_k = jlora.truncate(trainable, cfg, k)
        assert small["params"]["layers_0"]["kernel"]["a"].shape == (8, min(k, 3))
        want = jlora.wrap(model.apply, cfg_k)(frozen, small, x)
        np.testing.assert_allclose(lora_apply(frozen, trainable, x, lora_rank=k), want, rtol=1e-6, atol=1e-6)
        merged = model.apply(jlora.merge(frozen, trainable, cfg, rank=k), x)
        np.testing.assert_allclose(merged, want, rtol=1e-5, atol=1e-5)
    full = lora_apply(frozen, trainable, x)
    np.testing.assert_allclose(lora_apply(frozen, trainable, x, lora_rank=4), full, rtol=1e-6)


def test_truncate_stacked_adapters():
    model = LinenScan()
    x = jax.random.normal(jax.random.key(0), (2, 16))
    params = model.init(jax.random.key(1), x)
    cfg = jlora.LoraConfig(rank=4, dylora="plain", targets=jlora.Rule(pattern=r".*/kernel", stack_axes=(0,)))
    frozen, trainable = jlora.init(jax.random.key(2), params, cfg)
    trainable = bump(trainable, 0.1)
    small, cfg_k = jlora.truncate(trainable, cfg, 2)
    assert small["params"]["layers"]["up"]["kernel"]["b"].shape == (3, 2, 32)
    np.testing.assert_allclose(jlora.wrap(model.apply, cfg)(frozen, trainable, x, lora_rank=2),
                               jlora.wrap(model.apply, cfg_k)(frozen, small, x), rtol=1e-5, atol=1e-6)


def test_rank_sweep_compiles_once():
    model, x, params = _mlp()
    cfg = jlora.LoraConfig(rank=4, dylora="frozen", targets=r".*/kernel")
    frozen, trainable = jlora.init(jax.random.key(2), params, cfg)
    trainable = bump(trainable, 0.2)
    lora_apply = jlora.wrap(model.apply, cfg)
    traces = []

    @jax.jit
    def metric(k):
        traces.append(k)
        return jnp.mean(lora_apply(frozen, trainable, x, lora_rank=k) ** 2)

    result = jlora.rank_sweep(metric, cfg)
    assert list(result) == [1, 2, 3, 4] and len(traces) == 1
    assert len(set(result.values())) == 4
    assert jlora.rank_sweep(metric, cfg, ranks=[2]) == {2: result[2]}


def test_training_call_samples_a_rank_per_key():
    model, x, params = _mlp()
    cfg = jlora.LoraConfig(rank=4, dylora="plain", targets=r".*/kernel")
    frozen, trainable = jlora.init(jax.random.key(2), params, cfg)
    trainable = bump(trainable, 0.2)
    lora_apply = jlora.wrap(model.apply, cfg)
    at_rank = [lora_apply(frozen, trainable, x, lora_rank=k) for k in (1, 2, 3, 4)]
    for i in range(6):
        y = lora_apply(frozen, trainable, x, lora_rng=jax.random.key(i))
        assert any(np.allclose(y, r, rtol=1e-6, atol=1e-6) for r in at_rank)


def test_errors():
    cfg = jlora.LoraConfig(rank=4, targets="w", dylora="plain")
    tr = {"w": {"a": jnp.ones((4, 4)), "b": jnp.ones((4, 4))}}
    with pytest.raises(ValueError, match=r"rank must be an int in 1\.\.4 .* got 5"):
        jlora.truncate(tr, cfg, 5)
    with pytest.raises(ValueError, match=r"rank must be an int in 1\.\.4 .* got 0"):
        jlora.rank_sweep(lambda k: k, cfg, ranks=[0])
    with pytest.raises(ValueError, match=r"not a DyLoRA config"):
        jlora.truncate(tr, jlora.LoraConfig(rank=4, targets="w"), 2)
    with pytest.raises(ValueError, match=r"truncate: .*\n  trainable holds an adapter at v, but no rule "
                                         r"of the config matches"):
        jlora.truncate({"v": tr["w"]}, cfg, 2)
    model, x, params = _mlp()
    cfg = jlora.LoraConfig(rank=4, dylora="plain", targets=r".*/kernel")
    frozen, trainable = jlora.init(jax.random.key(2), params, cfg)
    with pytest.raises(ValueError, match=r"lora_rank must be an integer scalar, got 2.5"):
        jlora.wrap(model.apply, cfg)(frozen, trainable, x, lora_rank=2.5)


# ----------------------------------------------------------------------------- a rank that does not exist


@pytest.mark.parametrize("strategy", ["factored", "merge"])
@pytest.mark.parametrize("rank", [0, 5, -1])
def test_lora_rank_out_of_range_is_refused(strategy, rank):
    model, x, params = _mlp()
    cfg = jlora.LoraConfig(rank=4, dylora="plain",
                           targets=(jlora.Rule(pattern=r".*_0/kernel", rank=3), r".*/kernel"))
    frozen, trainable = jlora.init(jax.random.key(2), params, cfg)
    with pytest.raises(ValueError, match=rf"lora_rank={rank} is out of range for this DyLoRA adapter "
                                         r"of rank 4; choose 1 <= lora_rank <= 4\."):
        jlora.wrap(model.apply, cfg, strategy)(frozen, trainable, x, lora_rank=rank)
    with pytest.raises(ValueError, match=rf"lora_rank={rank} is out of range"):
        jlora.wrap(model.apply, cfg, strategy).uses(frozen, trainable, x, lora_rank=jnp.int32(rank))


@pytest.mark.parametrize("rank", [0, 5])
def test_merge_at_a_rank_out_of_range_is_refused(rank):
    model, x, params = _mlp()
    cfg = jlora.LoraConfig(rank=4, dylora="frozen", targets=r".*/kernel")
    frozen, trainable = jlora.init(jax.random.key(2), params, cfg)
    with pytest.raises(ValueError, match=rf"rank={rank} is out of range for this DyLoRA adapter of rank 4; "
                                         r"choose 1 <= rank <= 4\."):
        jlora.merge(frozen, trainable, cfg, rank=rank)


@pytest.mark.parametrize("jit", [False, True])
def test_lora_rank_on_a_plain_adapter_is_refused(jit):
    model, x, params = _mlp()
    cfg = jlora.LoraConfig(rank=4, targets=r".*/kernel")
    frozen, trainable = jlora.init(jax.random.key(2), params, cfg)
    lora_apply = jlora.wrap(model.apply, cfg)
    call = jax.jit(lambda k: lora_apply(frozen, trainable, x, lora_rank=k)) if jit else (
        lambda k: lora_apply(frozen, trainable, x, lora_rank=k))
    with pytest.raises(ValueError, match=r"lora_rank=.* is given, but this adapter is not "
                                         r"DyLoRA \(LoraConfig\(dylora=None\)\): its rank is "
                                         r"fixed\. Drop lora_rank"):
        call(1)


@pytest.mark.parametrize("strategy", ["factored", "merge"])
def test_traced_rank_out_of_range_gives_nan_never_another_rank(strategy):
    model, x, params = _mlp()
    cfg = jlora.LoraConfig(rank=4, alpha=8.0, dylora="plain", targets=r".*/kernel")
    frozen, trainable = jlora.init(jax.random.key(2), params, cfg)
    trainable = bump(trainable, 0.2)
    lora_apply = jlora.wrap(model.apply, cfg, strategy)
    serve = jax.jit(lambda k: lora_apply(frozen, trainable, x, lora_rank=k))
    for k in (1, 4):  # in range: the adapter at rank k, as a truncated adapter computes it
        small, cfg_k = jlora.truncate(trainable, cfg, k)
        np.testing.assert_allclose(serve(k), jlora.wrap(model.apply, cfg_k)(frozen, small, x),
                                   rtol=1e-5, atol=1e-5)
    for k in (0, 5, -3):
        assert np.isnan(np.asarray(serve(k))).all(), k
