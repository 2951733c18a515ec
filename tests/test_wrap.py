"""wrap: factored LoRA for whole Linen and NNX models, under jit, grad and vmap."""

import flax.linen as nn
import jax
import jax.extend
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from models import NNX_CFG, STACK_CFG, TOKENS, ZOO_CFG, LinenScan, LinenZoo, NnxModel, bump, nnx_apply

import jlora


def manual_merge(frozen, trainable, scale):
    """W + scale·a@b written out: every default layout here has its input axes first."""
    flat = {jax.tree_util.keystr(p, simple=True, separator="/"): v
            for p, v in jax.tree_util.tree_leaves_with_path(trainable)}

    def fold(path, w):
        key = jax.tree_util.keystr(path, simple=True, separator="/").removesuffix("/value")
        if f"{key}/a" not in flat:
            return w
        a, b = flat[f"{key}/a"], flat[f"{key}/b"]
        if "layers" in key:  # stacked: one adapter per layer
            d = jax.vmap(lambda a, b: jnp.tensordot(a, b, axes=1))(a, b)
        else:
            d = jnp.tensordot(a, b, axes=1)
        return w + scale * d

    return jax.tree_util.tree_map_with_path(fold, frozen)


def _models():
    zoo = LinenZoo()
    scan = LinenScan()
    nnx_fn, nnx_state = nnx_apply(NnxModel(nnx.Rngs(0)))
    x16 = jax.random.normal(jax.random.key(3), (2, 16))
    return {
        "linen_zoo": (zoo.apply, zoo.init(jax.random.key(0), TOKENS), ZOO_CFG, TOKENS),
        "linen_scan_remat": (scan.apply, scan.init(jax.random.key(0), x16), STACK_CFG, x16),
        "nnx_scan_remat": (nnx_fn, nnx_state, NNX_CFG, TOKENS),
    }


MODELS = _models()


@pytest.fixture(params=sorted(MODELS))
def model(request):
    return MODELS[request.param]


def test_no_fallback_and_equal_to_manual_maths(model):
    apply_fn, params, cfg, x = model
    frozen, trainable = jlora.init(jax.random.key(1), params, cfg)
    trainable = bump(trainable)
    lora_apply = jlora.wrap(apply_fn, cfg, fallback="error")
    uses = lora_apply.uses(frozen, trainable, x)
    assert uses and all(u.factored for u in uses), [u for u in uses if not u.factored]
    adapted = {p for p in jlora._paths.flatten(trainable)}
    assert {f"{u.path}/a" for u in uses} == {p for p in adapted if p.endswith("/a")}
    want = apply_fn(manual_merge(frozen, trainable, cfg.scale_for(cfg.targets[0])), x)
    np.testing.assert_allclose(lora_apply(frozen, trainable, x), want, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(jlora.wrap(apply_fn, cfg, "merge")(frozen, trainable, x), want,
                               rtol=1e-5, atol=1e-5)


def test_zero_b_is_the_base_model_exactly(model):
    apply_fn, params, cfg, x = model
    frozen, trainable = jlora.init(jax.random.key(1), params, cfg)
    # Compared with the jitted base: eager and jitted XLA differ in the last bit on their own.
    np.testing.assert_array_equal(jlora.wrap(apply_fn, cfg)(frozen, trainable, x),
                                  jax.jit(apply_fn)(params, x))


def test_gradients_reach_trainable_only_and_match_merge(model):
    apply_fn, params, cfg, x = model
    frozen, trainable = jlora.init(jax.random.key(1), params, cfg)
    trainable = bump(trainable, 0.05)

    def loss(strategy):
        lora_apply = jlora.wrap(apply_fn, cfg, strategy)
        return lambda f, t: jnp.mean(lora_apply(f, t, x) ** 2)

    g_factored = jax.grad(loss("factored"), argnums=1)(frozen, trainable)
    g_merge = jax.jit(jax.grad(loss("merge"), argnums=1))(frozen, trainable)
    assert jax.tree.structure(g_factored) == jax.tree.structure(trainable)
    for got, want in zip(jax.tree.leaves(g_factored), jax.tree.leaves(g_merge), strict=True):
        assert bool(jnp.any(got != 0))
        np.testing.assert_allclose(got, want, rtol=2e-4, atol=1e-6)


def test_runtime_scale_interpolates_without_retracing():
    model = nn.Dense(5)
    x = jax.random.normal(jax.random.key(0), (3, 4))
    params = model.init(jax.random.key(1), x)
    cfg = jlora.LoraConfig(rank=2, targets=".*/kernel")
    frozen, trainable = jlora.init(jax.random.key(2), params, cfg)
    trainable = bump(trainable)
    traces = []

    def apply_fn(p, x):
        traces.append(1)
        return model.apply(p, x)

    lora_apply = jlora.wrap(apply_fn, cfg)
    scales = (0.0, 0.5, 1.0, jnp.float32(0.25), np.float64(0.75))
    outs = {float(s): lora_apply(frozen, trainable, x, lora_scale=s) for s in scales}
    assert len(traces) == 1
    np.testing.assert_array_equal(outs[0.0], model.apply(params, x))
    for s in (0.25, 0.5, 0.75, 1.0):
        want = model.apply(manual_merge(frozen, trainable, s * cfg.scale_for(cfg.targets[0])), x)
        np.testing.assert_allclose(outs[s], want, rtol=1e-5, atol=1e-6)

    step_traces = []

    @jax.jit
    def step(trainable, s):
        step_traces.append(1)
        return lora_apply(frozen, trainable, x, lora_scale=s).sum()

    for s in (0.1, 0.2, 0.3):
        step(trainable, s)
    assert len(step_traces) == 1 and len(traces) <= 2


def test_vmap_over_inputs_and_adapters():
    model = nn.Dense(3)
    xs = jax.random.normal(jax.random.key(0), (4, 2, 6))
    params = model.init(jax.random.key(1), xs[0])
    cfg = jlora.LoraConfig(rank=2, targets=".*/kernel")
    frozen, trainable = jlora.init(jax.random.key(2), params, cfg)
    lora_apply = jlora.wrap(model.apply, cfg)
    many = jax.vmap(lambda i: jax.tree.map(lambda v: v + 0.1 * i.astype(v.dtype), trainable))(jnp.arange(4))
    got = jax.vmap(lambda t, x: lora_apply(frozen, t, x))(many, xs)
    for i in range(4):
        t_i = jax.tree.map(lambda v, i=i: v[i], many)
        np.testing.assert_allclose(got[i], lora_apply(frozen, t_i, xs[i]), rtol=1e-5, atol=1e-6)


def test_static_arguments_and_methods():
    class Net(nn.Module):
        @nn.compact
        def __call__(self, x, *, train: bool):
            h = nn.Dropout(0.5, deterministic=not train)(nn.Dense(8, name="d")(x))
            return nn.Dense(2, name="o")(h)

    net = Net()
    x = jnp.ones((2, 4))
    params = net.init(jax.random.key(0), x, train=False)
    cfg = jlora.LoraConfig(rank=2, targets=".*/kernel")
    frozen, trainable = jlora.init(jax.random.key(1), params, cfg)
    lora_apply = jlora.wrap(net.apply, cfg)
    eval_out = lora_apply(frozen, trainable, x, train=False)
    np.testing.assert_array_equal(eval_out, net.apply(params, x, train=False))
    train_out = lora_apply(frozen, trainable, x, train=True, rngs={"dropout": jax.random.key(5)})
    np.testing.assert_array_equal(train_out,
                                  net.apply(params, x, train=True, rngs={"dropout": jax.random.key(5)}))


def test_low_precision_base_keeps_its_dtype():
    model = nn.Dense(8, dtype=jnp.bfloat16, param_dtype=jnp.bfloat16)
    x = jnp.ones((2, 16), jnp.bfloat16)
    params = model.init(jax.random.key(0), x)
    cfg = jlora.LoraConfig(rank=4, targets=".*/kernel")
    frozen, trainable = jlora.init(jax.random.key(1), params, cfg)
    out = jlora.wrap(model.apply, cfg, fallback="error")(frozen, bump(trainable), x)
    assert out.dtype == jnp.bfloat16
    assert trainable["params"]["kernel"]["a"].dtype == jnp.float32
    g = jax.grad(lambda t: jlora.wrap(model.apply, cfg)(frozen, t, x).astype(jnp.float32).sum())(
        bump(trainable))
    assert g["params"]["kernel"]["a"].dtype == jnp.float32


class _Mlp(nn.Module):
    dtype: jnp.dtype
    param_dtype: jnp.dtype

    @nn.compact
    def __call__(self, x):
        dense = lambda n, name: nn.Dense(n, dtype=self.dtype, param_dtype=self.param_dtype, name=name)  # noqa: E731
        return dense(4, "out")(jax.nn.gelu(dense(32, "hidden")(x)))


def _dot_dtypes(fn, *args):
    """The operand dtypes of every dot_general in ``fn``'s jaxpr (nested jaxprs included)."""
    found = []

    def walk(jaxpr):
        for eqn in jaxpr.eqns:
            if eqn.primitive.name == "dot_general":
                found.append(tuple(str(v.aval.dtype) for v in eqn.invars))
            for sub in jax.extend.core.jaxprs_in_params(eqn.params):
                walk(sub)

    walk(jax.make_jaxpr(fn)(*args).jaxpr)
    return found


@pytest.mark.standard_promotion  # optax's Adam raises its int step count to a float power
@pytest.mark.parametrize("param_dtype", [jnp.bfloat16, jnp.float32], ids=["bf16-base", "f32-base"])
def test_mixed_precision_step(param_dtype):
    """bf16 compute (the model's own ``dtype``) over a bf16 or f32 base; f32 adapters and optimizer state.

    Every matmul, the low-rank ones included, runs in bf16; gradients, optimizer state
    and updated adapters stay float32; the loss tracks an all-float32 run.
    """
    x = jax.random.normal(jax.random.key(0), (8, 16))
    y = jax.random.normal(jax.random.key(1), (8, 4))
    reference = _Mlp(jnp.float32, jnp.float32)
    params32 = reference.init(jax.random.key(2), x)
    cfg = jlora.LoraConfig(rank=4, alpha=8.0, targets=".*/kernel")
    frozen32, trainable = jlora.init(jax.random.key(3), params32, cfg)
    trainable = bump(trainable, 0.05)
    tx = jlora.optimizer(cfg, 1e-2, lr_ratio=4.0)

    def make_step(model, frozen):
        lora_apply = jlora.wrap(model.apply, cfg, fallback="error")

        def loss(t):
            out = lora_apply(frozen, t, x.astype(model.dtype))
            return jnp.mean((out.astype(jnp.float32) - y) ** 2)

        @jax.jit
        def step(t, state):
            value, grads = jax.value_and_grad(loss)(t)
            updates, state = tx.update(grads, state, t)
            return optax.apply_updates(t, updates), state, value, grads

        return step, loss

    model = _Mlp(jnp.bfloat16, param_dtype)
    frozen = jax.tree.map(lambda w: w.astype(param_dtype), frozen32)
    step, loss = make_step(model, frozen)
    step32, _ = make_step(reference, frozen32)
    assert set(_dot_dtypes(loss, trainable)) == {("bfloat16", "bfloat16")}

    t, state, t32, state32 = trainable, tx.init(trainable), trainable, tx.init(trainable)
    for _ in range(3):
        t, state, value, grads = step(t, state)
        t32, state32, value32, _ = step32(t32, state32)
        np.testing.assert_allclose(value, value32, rtol=0.05)
    for tree in (t, grads, state):
        floats = [v for v in jax.tree.leaves(tree) if jnp.issubdtype(v.dtype, jnp.floating)]
        assert floats and {v.dtype for v in floats} == {jnp.dtype(jnp.float32)}
    assert all(v.dtype == jnp.dtype(param_dtype) for v in jax.tree.leaves(frozen))


def test_train_in_full_leaf_is_used_and_scaled():
    model = nn.Dense(3)
    x = jnp.ones((2, 4))
    params = model.init(jax.random.key(0), x)
    cfg = jlora.LoraConfig(rank=2, targets=".*/kernel", train_in_full=".*/bias")
    frozen, trainable = jlora.init(jax.random.key(1), params, cfg)
    trainable["params"]["bias"] = trainable["params"]["bias"] + 1.0
    lora_apply = jlora.wrap(model.apply, cfg)
    np.testing.assert_allclose(lora_apply(frozen, trainable, x), model.apply(params, x) + 1.0, rtol=1e-6)
    np.testing.assert_allclose(lora_apply(frozen, trainable, x, lora_scale=0.5), model.apply(params, x) + 0.5,
                               rtol=1e-6)


def test_errors():
    model = nn.Dense(3)
    x = jnp.ones((2, 4))
    params = model.init(jax.random.key(0), x)
    cfg = jlora.LoraConfig(rank=2, targets=".*/kernel")
    frozen, trainable = jlora.init(jax.random.key(1), params, cfg)
    with pytest.raises(ValueError, match=r"unknown strategy 'fast'; choose one of \('factored', 'merge'\)"):
        jlora.wrap(model.apply, cfg, "fast")
    with pytest.raises(ValueError, match=r"unknown fallback 'ignore'"):
        jlora.wrap(model.apply, cfg, fallback="ignore")
    with pytest.raises(TypeError, match=r"apply_fn must be callable, got dict"):
        jlora.wrap(params, cfg)
    with pytest.raises(TypeError, match=r"expected a jlora.LoraConfig, got dict"):
        jlora.wrap(model.apply, {"rank": 2})
    wrong = jlora.init(jax.random.key(1), params, jlora.LoraConfig(rank=3, targets=".*/kernel"))[1]
    for strategy in ("factored", "merge"):
        with pytest.raises(ValueError, match=r"(?s)params/kernel/a has shape \(4, 3\), expected \(4, 2\).*"
                                             r"params/kernel/b has shape \(3, 3\), expected \(2, 3\)"):
            jlora.wrap(model.apply, cfg, strategy)(frozen, wrong, x)


# ----------------------------------------------------------------------------- factors that are not float


@pytest.mark.parametrize("strategy", ["factored", "merge"])
@pytest.mark.parametrize("dtype", [jnp.int32, jnp.bool_])
def test_non_float_factors_are_refused_at_the_call(strategy, dtype):
    model = nn.Sequential([nn.Dense(8), nn.relu, nn.Dense(3)])
    x = jnp.ones((2, 4))
    params = model.init(jax.random.key(0), x)
    cfg = jlora.LoraConfig(rank=2, targets=".*/kernel")
    frozen, trainable = jlora.init(jax.random.key(1), params, cfg)
    trainable["params"]["layers_0"]["kernel"]["a"] = (
        trainable["params"]["layers_0"]["kernel"]["a"].astype(dtype))
    trainable["params"]["layers_2"]["kernel"]["b"] = (
        trainable["params"]["layers_2"]["kernel"]["b"].astype(dtype))
    name = jnp.dtype(dtype).name
    lora_apply = jlora.wrap(model.apply, cfg, strategy)
    message = (rf"trainable has adapter factors that are not floating point: params/layers_0/kernel/a "
               rf"\({name}\), params/layers_2/kernel/b \({name}\)\. LoRA factors are LoraConfig\.dtype "
               rf".*astype\(jnp\.float32\)")
    with pytest.raises(TypeError, match=message):
        lora_apply(frozen, trainable, x)
    with pytest.raises(TypeError, match=message):
        jax.jit(lambda t: lora_apply(frozen, t, x))(trainable)  # dtypes are known under jit too
    with pytest.raises(TypeError, match=message):
        lora_apply.uses(frozen, trainable, x)


class _Deep(nn.Module):
    @nn.compact
    def __call__(self, x):
        for i in range(3):
            x = nn.Dense(64, name=f"d{i}")(x)
        return x


def _flops(fn, *args) -> float:
    cost = jax.jit(fn).lower(*args).compile().cost_analysis()
    return (cost[0] if isinstance(cost, list | tuple) else cost)["flops"]


def test_adapters_chosen_by_name_cost_only_themselves():
    x = jax.random.normal(jax.random.key(0), (16, 64))
    params = _Deep().init(jax.random.key(1), x)
    cfg = jlora.LoraConfig(rank=4, targets=r".*/kernel")
    made = [jlora.init(jax.random.key(k), params, cfg)[1] for k in range(8)]
    bank, bank_cfg = jlora.stack({f"s{k}": (bump(t, 0.01 * (k + 1)), cfg) for k, t in enumerate(made)})
    serve = jlora.wrap(_Deep().apply, bank_cfg)
    one, one_cfg = jlora.unstack(bank, bank_cfg, "s3")
    alone = jlora.wrap(_Deep().apply, one_cfg)
    single = _flops(lambda f, t, x: alone(f, t, x), params, one, x)
    named = _flops(lambda f, b, x, w: serve(f, b, x, lora_weights={"s3": w}), params, bank, x, 1.0)
    dense = _flops(lambda f, b, x, w: serve(f, b, x, lora_weights=w), params, bank, x, jnp.eye(8)[3])
    b_size = 3 * 4 * 64  # the weight multiplies each named b once
    assert named == single + b_size
    assert dense > 1.5 * single  # a dense (K,) mix runs every slot, at rank K·R
    np.testing.assert_array_equal(serve(params, bank, x, lora_weights={"s3": 1.0}), alone(params, one, x))
    two = serve(params, bank, x, lora_weights={"s3": 0.25, "s6": 0.75})
    dense_two = 0.25 * jnp.eye(8)[3] + 0.75 * jnp.eye(8)[6]
    np.testing.assert_allclose(two, serve(params, bank, x, lora_weights=dense_two), rtol=1e-5, atol=1e-5)

    traces = []
    counted = jlora.wrap(lambda p, x: (traces.append(1), _Deep().apply(p, x))[1], bank_cfg)
    for names in ({"s1": 1.0}, {"s7": 0.5}, {2: 1.0}):
        counted(params, bank, x, lora_weights=names)
    assert len(traces) == 1  # which adapter, and its weight, are values: no retrace
    with pytest.raises(ValueError, match=r"lora_weights: an empty dict selects no adapter; name at least "
                                         r"one, e.g. \{'s0': 1.0\}"):
        serve(params, bank, x, lora_weights={})
    with pytest.raises(ValueError, match=r"weighs slot 3 twice \(by name and by number\)"):
        serve(params, bank, x, lora_weights={"s3": 0.5, 3: 0.5})
