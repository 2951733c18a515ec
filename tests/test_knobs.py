"""Runtime knobs on one adapter: DyLoRA rank masks and scales, DoRA under a runtime scale."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jlora
from jlora._knobs import call_factors, sample_rank
from jlora._plan import Plan


def _target(**cfg):
    cfg = jlora.LoraConfig(rank=4, alpha=8.0, targets="w", **cfg)
    params = {"w": jax.random.normal(jax.random.key(0), (6, 5))}
    frozen, tr = jlora.init(jax.random.key(1), params, cfg)
    tr = jax.tree.map(lambda v: v + 0.3, tr)
    return cfg, Plan.of_base(cfg, params)["w"], params["w"], tr["w"]


@pytest.mark.parametrize(("rslora", "k"), [(False, 1), (False, 3), (True, 2), (False, 4)])
def test_dylora_rank_masks_components_and_rescales(rslora, k):
    cfg, t, w, tr = _target(dylora="plain", rslora=rslora)
    e = call_factors(t, cfg, w, tr["a"], tr["b"], None, rank=k)
    np.testing.assert_array_equal(e.a[:, k:], 0)
    np.testing.assert_array_equal(e.b[k:], 0)
    np.testing.assert_array_equal(e.a[:, :k], tr["a"][:, :k])
    want = 8.0 / np.sqrt(k) if rslora else 8.0 / k
    np.testing.assert_allclose(e.scale, want, rtol=1e-6)


def test_rank_out_of_range_is_refused_or_nan_never_clipped():
    cfg, t, w, tr = _target(dylora="plain")
    e = call_factors(t, cfg, w, tr["a"], tr["b"], None, rank=4)
    np.testing.assert_array_equal(e.a, tr["a"])
    np.testing.assert_allclose(e.scale, 2.0)
    with pytest.raises(ValueError, match=r"rank=99 is out of range for this DyLoRA adapter of rank 4"):
        call_factors(t, cfg, w, tr["a"], tr["b"], None, rank=99)
    scale = jax.jit(lambda k: call_factors(t, cfg, w, tr["a"], tr["b"], None, rank=k).scale)
    assert np.isnan(scale(99)) and np.isnan(scale(0)) and float(scale(4)) == 2.0


def test_frozen_mode_trains_only_the_kth_component():
    cfg, t, w, tr = _target(dylora="frozen")
    x = jnp.ones((2, 6))

    def out(a, b, train):
        e = call_factors(t, cfg, w, a, b, None, rank=3, train=train)
        return jnp.sum(x @ (e.a @ e.b) * e.scale)

    ga, gb = jax.grad(out, argnums=(0, 1))(tr["a"], tr["b"], True)
    assert not ga[:, :2].any() and not gb[:2].any()  # below k - 1: frozen this step
    assert ga[:, 2].any() and gb[2].any()  # the k-th component learns
    assert not ga[:, 3:].any() and not gb[3:].any()  # above k: not used
    ga, _ = jax.grad(out, argnums=(0, 1))(tr["a"], tr["b"], False)
    assert ga[:, :3].all()  # "plain" behaviour when not training


def test_dora_magnitude_follows_the_runtime_scale():
    cfg, t, w, tr = _target(dora=True)
    norm = jnp.linalg.norm(w, axis=0)
    np.testing.assert_allclose(call_factors(t, cfg, w, tr["a"], tr["b"], tr["m"], scale=0.0).m, norm,
                               rtol=1e-6)
    e = call_factors(t, cfg, w, tr["a"], tr["b"], tr["m"], scale=0.5)
    np.testing.assert_allclose(e.m, norm + 0.5 * (tr["m"] - norm), rtol=1e-6)
    np.testing.assert_allclose(e.scale, 0.5 * 2.0)
    assert call_factors(t, cfg, w, tr["a"], tr["b"], tr["m"]).m is tr["m"]


def test_sampled_rank_covers_one_to_r():
    cfg, t, _, _ = _target(dylora="plain")
    ks = {int(sample_rank(jax.random.key(i), cfg, {"w": t})) for i in range(60)}
    assert ks == {1, 2, 3, 4}
