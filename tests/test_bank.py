"""A bank of adapters on one base: weighted mixes, one adapter per example, hot swap."""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from models import STACK_CFG, LinenScan, NnxModel, bump, nnx_apply

import jlora


class Net(nn.Module):
    """Embed lookup, DenseGeneral attention, a Dense MLP: every layer a bank serves per example."""

    @nn.compact
    def __call__(self, tokens):
        h = nn.Embed(30, 16, name="embed")(tokens)
        h = h + nn.MultiHeadDotProductAttention(num_heads=2, name="attn")(h)
        return nn.Dense(5, name="out")(jax.nn.gelu(nn.Dense(32, name="up")(h)))


TOKENS = jax.random.randint(jax.random.key(9), (4, 6), 0, 30)
TARGETS = r".*(kernel|embedding)"


def _adapters():
    params = Net().init(jax.random.key(0), TOKENS)
    out = []
    for i, (rank, alpha, rs) in enumerate([(2, 4.0, False), (4, 2.0, True), (3, 3.0, False)]):
        cfg = jlora.LoraConfig(rank=rank, alpha=alpha, rslora=rs, targets=TARGETS)
        tr = jlora.init(jax.random.key(i + 1), params, cfg)[1]
        out.append((jax.tree.map(
            lambda v, i=i: v + 0.1 * (i + 1) * jax.random.normal(jax.random.key(i), v.shape), tr), cfg))
    return params, out


PARAMS, ADAPTERS = _adapters()


def _alone(i, x=TOKENS):
    tr, cfg = ADAPTERS[i]
    return jlora.wrap(Net().apply, cfg)(PARAMS, tr, x)


def test_stack_pads_ranks_and_folds_scales():
    bank, cfg = jlora.stack(ADAPTERS)
    a, b = bank["params"]["up"]["kernel"]["a"], bank["params"]["up"]["kernel"]["b"]
    assert a.shape == (3, 16, 4) and b.shape == (3, 4, 32)
    assert not a[0, :, 2:].any() and not b[0, 2:].any()
    assert cfg.scale_for(cfg.rule_for("params/up/kernel")) == 1.0
    tr0, cfg0 = ADAPTERS[0]
    np.testing.assert_allclose(b[0, :2], tr0["params"]["up"]["kernel"]["b"] * 2.0, rtol=1e-6)


def test_named_adapters_activate_by_name():
    names = ["formal", "casual", "terse"]
    bank, cfg = jlora.stack(dict(zip(names, ADAPTERS, strict=True)))
    assert cfg.adapters == tuple(names)
    lora_apply = jlora.wrap(Net().apply, cfg)
    got = lora_apply(PARAMS, bank, TOKENS, lora_weights={"casual": 1.0, "terse": 1.0})
    want = lora_apply(PARAMS, bank, TOKENS, lora_weights=jnp.array([0.0, 1.0, 1.0]))
    np.testing.assert_array_equal(got, want)


def test_names_serve_per_example_and_never_retrace():
    bank, cfg = jlora.stack(dict(zip(["formal", "casual", "terse"], ADAPTERS, strict=True)))
    lora_apply = jlora.wrap(Net().apply, cfg)
    traces = []
    inner = lora_apply._run

    def counting(*args, **kwargs):
        traces.append(1)
        return inner(*args, **kwargs)

    lora_apply._run = counting
    lora_apply._jitted = jax.jit(counting, static_argnames=("static",))
    got = lora_apply(PARAMS, bank, TOKENS, lora_index=["terse", None, "formal", "casual"])
    np.testing.assert_array_equal(got, lora_apply(PARAMS, bank, TOKENS, lora_index=jnp.array([2, -1, 0, 1])))
    lora_apply(PARAMS, bank, TOKENS, lora_index=["casual", "casual", None, "terse"])
    lora_apply(PARAMS, bank, TOKENS, lora_weights={"formal": 0.5})
    lora_apply(PARAMS, bank, TOKENS, lora_weights={"terse": 2.0})
    assert len(traces) == 2  # one trace for lora_index, one for lora_weights: names never retrace
    lora_apply(PARAMS, bank, TOKENS, lora_weights={"terse": 2.0, "casual": 1.0})
    assert len(traces) == 3  # how many adapters run is a shape (only the named ones run)
    base = jax.jit(Net().apply)(PARAMS, TOKENS)
    np.testing.assert_allclose(got[1], base[1], rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(got[0], _alone(2)[0], rtol=1e-5, atol=1e-5)


def test_put_and_unstack_by_name_round_trip():
    bank, cfg = jlora.stack(dict(zip(["formal", "casual"], ADAPTERS[:2], strict=True)))
    swapped = jlora.put(bank, cfg, "casual", *ADAPTERS[2])
    served = jlora.wrap(Net().apply, cfg)(PARAMS, swapped, TOKENS, lora_index=["casual"] * 4)
    np.testing.assert_allclose(served, _alone(2), rtol=1e-5, atol=1e-5)
    one, one_cfg = jlora.unstack(swapped, cfg, "casual")
    assert one_cfg.adapters == () and jax.tree.map(jnp.shape, one)["params"]["up"]["kernel"]["a"] == (16, 4)
    np.testing.assert_allclose(jlora.wrap(Net().apply, one_cfg)(PARAMS, one, TOKENS), _alone(2),
                               rtol=1e-5, atol=1e-5)
    formal, _ = jlora.unstack(swapped, cfg, 0)
    np.testing.assert_array_equal(formal["params"]["up"]["kernel"]["a"],
                                  bank["params"]["up"]["kernel"]["a"][0])


def test_names_survive_the_config_round_trip_and_are_checked():
    _, cfg = jlora.stack(dict(zip(["formal", "casual"], ADAPTERS[:2], strict=True)))
    assert jlora.LoraConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ValueError, match=r"adapters names a bank's slots with distinct non-empty strings"):
        jlora.LoraConfig(targets="w", adapters=("a", "a"))
    with pytest.raises(TypeError, match=r"stack: adapter names must be non-empty strings, got 3"):
        jlora.stack({3: ADAPTERS[0]})


def test_unknown_names_are_refused_with_the_names_there_are():
    bank, cfg = jlora.stack(dict(zip(["formal", "casual"], ADAPTERS[:2], strict=True)))
    lora_apply = jlora.wrap(Net().apply, cfg)
    with pytest.raises(ValueError, match=r"lora_index: no adapter named 'casaul' in this bank; its names are "
                                         r"\['formal', 'casual'\] \(closest: \['casual'"):
        lora_apply(PARAMS, bank, TOKENS, lora_index=["casaul", None, None, None])
    with pytest.raises(ValueError, match=r"lora_weights: no adapter named 'terse'"):
        lora_apply(PARAMS, bank, TOKENS, lora_weights={"terse": 1.0})
    with pytest.raises(ValueError, match=r"put: an adapter is a name of the bank or a slot in 0\.\.1, got 2"):
        jlora.put(bank, cfg, 2, *ADAPTERS[2])
    listed_bank, listed = jlora.stack(ADAPTERS[:2])
    assert listed.adapters == ("0", "1")
    with pytest.raises(ValueError, match=r"unstack: no adapter named 'formal' in this bank; its names are "
                                         r"\['0', '1'\]"):
        jlora.unstack(listed_bank, listed, "formal")
    three = jlora.wrap(Net().apply, jlora.stack(ADAPTERS)[1])
    with pytest.raises(ValueError, match=r"names 3 adapters \['0', '1', '2'\], but the bank holds 2"):
        three(PARAMS, listed_bank, TOKENS, lora_index=jnp.array([0, 1, 0, 1]))
    with pytest.raises(ValueError, match=r"unstack: 'formal' names an adapter, but this bank has no names"):
        jlora.unstack(listed_bank, ADAPTERS[0][1], "formal")


def test_capacity_is_capped_per_kernel():
    bank, cfg = jlora.stack(ADAPTERS, rank=6)
    assert bank["params"]["up"]["kernel"]["a"].shape == (3, 16, 6)
    assert bank["params"]["out"]["kernel"]["a"].shape == (3, 32, 5)  # min(fan_in, fan_out) = 5
    assert cfg.rank_for(cfg.rule_for("params/out/kernel")) == 5
    index = jnp.array([0, 1, 2, -1])
    got = jlora.wrap(Net().apply, cfg)(PARAMS, bank, TOKENS, lora_index=index)
    np.testing.assert_allclose(got[1], _alone(1)[1], rtol=1e-5, atol=1e-5)


def test_weights_select_mix_or_switch_off_without_retracing():
    bank, cfg = jlora.stack(ADAPTERS)
    lora_apply = jlora.wrap(Net().apply, cfg, fallback="error")
    traces = []

    @jax.jit
    def run(w):
        traces.append(1)
        return lora_apply(PARAMS, bank, TOKENS, lora_weights=w)

    for i in range(3):
        np.testing.assert_allclose(run(jnp.eye(3)[i]), _alone(i), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(run(jnp.zeros(3)), jax.jit(Net().apply)(PARAMS, TOKENS), rtol=1e-6, atol=1e-6)
    assert len(traces) == 1
    # Several at once: their deltas add, with any weights (negative too), as the merged sum of deltas.
    w = jnp.array([0.5, -1.0, 2.0])
    manual = jax.tree.map(lambda x: x, PARAMS)
    for (tr, c), wi in zip(ADAPTERS, w, strict=True):
        merged = jlora.merge(PARAMS, tr, c)
        manual = jax.tree.map(lambda m, p, q, wi=wi: m + wi * (q - p), manual, PARAMS, merged)
    np.testing.assert_allclose(run(w), Net().apply(manual, TOKENS), rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(jlora.wrap(Net().apply, cfg, "merge")(PARAMS, bank, TOKENS, lora_weights=w),
                               run(w), rtol=1e-4, atol=1e-4)


def test_one_adapter_per_example_equals_separate_calls():
    bank, cfg = jlora.stack(ADAPTERS)
    lora_apply = jlora.wrap(Net().apply, cfg, fallback="error")
    index = jnp.array([2, -1, 0, 1])
    uses = lora_apply.uses(PARAMS, bank, TOKENS, lora_index=index)
    assert uses and all(u.factored for u in uses)
    got = lora_apply(PARAMS, bank, TOKENS, lora_index=index)
    base = jax.jit(Net().apply)(PARAMS, TOKENS)
    for n, i in enumerate(index.tolist()):
        want = base[n] if i < 0 else _alone(i)[n]
        np.testing.assert_allclose(got[n], want, rtol=1e-5, atol=1e-5)


def test_hot_swap_into_a_compiled_step():
    bank, cfg = jlora.stack(ADAPTERS[:2])
    lora_apply = jlora.wrap(Net().apply, cfg)
    traces = []

    @jax.jit
    def serve(bank, index):
        traces.append(1)
        return lora_apply(PARAMS, bank, TOKENS, lora_index=index)

    index = jnp.array([1, 1, 0, -1])
    serve(bank, index)
    swapped = jlora.put(bank, cfg, 1, *ADAPTERS[2])  # rank 3 into a rank-4 slot
    got = serve(swapped, index)
    assert len(traces) == 1
    np.testing.assert_allclose(got[:2], _alone(2)[:2], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(got[2], _alone(0)[2], rtol=1e-5, atol=1e-5)


def test_errors():
    bank, cfg = jlora.stack(ADAPTERS[:2])
    lora_apply = jlora.wrap(Net().apply, cfg)
    with pytest.raises(ValueError, match=r"rank=2 is below the largest adapter rank 4"):
        jlora.stack(ADAPTERS, rank=2)
    big = jlora.LoraConfig(rank=5, targets=TARGETS)
    with pytest.raises(ValueError, match=r"rank 5 exceeds the bank's capacity 4"):
        jlora.put(bank, cfg, 0, bump(jlora.init(jax.random.key(0), PARAMS, big)[1]), big)
    with pytest.raises(ValueError, match=r"put: an adapter is a name of the bank or a slot in 0\.\.1, got 2"):
        jlora.put(bank, cfg, 2, *ADAPTERS[0])
    other = jlora.LoraConfig(rank=2, targets=r".*/up/kernel")
    with pytest.raises(ValueError, match=r"adapter 1 adapts .* differently from adapter 0"):
        jlora.stack([ADAPTERS[0], (jlora.init(jax.random.key(0), PARAMS, other)[1], other)])
    gelu = jlora.LoraConfig(rank=2, targets=TARGETS, nonlinearity="gelu")
    with pytest.raises(ValueError, match=r"different nonlinearities"):
        jlora.stack([ADAPTERS[0], (jlora.init(jax.random.key(0), PARAMS, gelu)[1], gelu)])
    dora = jlora.LoraConfig(rank=2, targets=r".*kernel", dora=True)
    with pytest.raises(ValueError, match=r"DoRA's magnitude .* cannot share a bank"):
        jlora.stack([(jlora.init(jax.random.key(0), PARAMS, dora)[1], dora)])
    with pytest.raises(ValueError, match=r"lora_weights has 3 weights for a bank of 2 adapters"):
        lora_apply(PARAMS, bank, TOKENS, lora_weights=jnp.ones(3))
    with pytest.raises(ValueError, match=r"not both"):
        lora_apply(PARAMS, bank, TOKENS, lora_weights=jnp.ones(2), lora_index=jnp.zeros(4, jnp.int32))
    with pytest.raises(ValueError, match=r"lora_index must be an integer array of shape \(batch,\)"):
        lora_apply(PARAMS, bank, TOKENS, lora_index=jnp.zeros(4))
    with pytest.raises(ValueError, match=r"need a bank of adapters made by jlora.stack"):
        lora_apply(PARAMS, ADAPTERS[0][0], TOKENS, lora_index=jnp.zeros(4, jnp.int32))
    with pytest.raises(ValueError, match=r"per-example adapters \(lora_index\) need strategy='factored'"):
        jlora.wrap(Net().apply, cfg, "merge")(PARAMS, bank, TOKENS, lora_index=jnp.zeros(4, jnp.int32))


# -------------------------------------------------------------------------- adapters that cannot share a bank


def _dense_adapter(width_in, width_out, rank=2, in_axes=None, key=0):
    params = {"params": {"dense": {"kernel": jnp.ones((width_in, width_out))}}}
    cfg = jlora.LoraConfig(rank=rank, targets=jlora.Rule(pattern=r".*/kernel", in_axes=in_axes))
    return bump(jlora.init(jax.random.key(key), params, cfg)[1]), cfg


def test_stack_names_the_path_and_the_widths_that_differ():
    with pytest.raises(ValueError, match=r"(?s)stack: the adapters do not fit one bank:\n  "
                                         r"params/dense/kernel: the kernels differ in width \(input -> "
                                         r"output shape, without the rank\): adapter 0: \(16,\) -> \(4,\), "
                                         r"adapter 1: \(16,\) -> \(8,\); a bank stacks"):
        jlora.stack([_dense_adapter(16, 4), _dense_adapter(16, 8)])
    with pytest.raises(ValueError, match=r"params/dense/kernel: the kernels differ in width .*adapter 0: "
                                         r"\(16,\) -> \(4,\), adapter 1: \(16,\) -> \(4,\), adapter 2: "
                                         r"\(12,\) -> \(4,\)"):
        jlora.stack({"x": _dense_adapter(16, 4), "y": _dense_adapter(16, 4, rank=3),
                     "z": _dense_adapter(12, 4)})


def test_stack_names_a_kernel_split_differently():
    params = {"params": {"proj": {"kernel": jnp.ones((4, 6, 8))}}}  # (in, in, out) or (in, out, out)
    pairs = []
    for in_axes in ((0, 1), (0,)):
        cfg = jlora.LoraConfig(rank=2, targets=jlora.Rule(pattern=r".*/kernel", in_axes=in_axes))
        pairs.append((jlora.init(jax.random.key(0), params, cfg)[1], cfg))
    with pytest.raises(ValueError, match=r"params/proj/kernel: the adapters split this kernel differently "
                                         r"\(in_axes, stack_axes\): "
                                         r"\['\(\(0, 1\), \(\)\)', '\(\(0,\), \(\)\)'\]"):
        jlora.stack(pairs)


def test_stack_refuses_what_is_not_a_pair():
    with pytest.raises(TypeError, match=r"stack: adapter 1 must be a \(trainable, config\) pair, got dict"):
        jlora.stack([_dense_adapter(16, 4), {"trainable": 1}])
    with pytest.raises(TypeError, match=r"stack: adapter 0: expected \(trainable, jlora.LoraConfig\) pairs, "
                                        r"got str"):
        jlora.stack([(_dense_adapter(16, 4)[0], "rank=2")])
    with pytest.raises(ValueError, match=r"stack: give at least one \(trainable, config\) pair"):
        jlora.stack({})


def test_put_names_the_path_whose_width_differs():
    bank, cfg = jlora.stack([_dense_adapter(16, 4), _dense_adapter(16, 4, key=1)])
    with pytest.raises(ValueError, match=r"(?s)put: the adapter does not fit the bank:\n  "
                                         r"params/dense/kernel/b: shape \(2, 8\), the bank holds \(2, 4\)"):
        jlora.put(bank, cfg, 0, *_dense_adapter(16, 8))
    with pytest.raises(ValueError, match=r"put: an adapter is a name of the bank or a "
                                         r"slot in 0\.\.1, got -1"):
        jlora.put(bank, cfg, -1, *_dense_adapter(16, 4))


# ---------------------------------------------------------------------------- an index the bank does not hold


@pytest.mark.parametrize("index,shown", [
    ([0, 2, 1, -1], r"2 \(example 1\)"),
    ([5, 0, 0, 0], r"5 \(example 0\)"),
    ([-2, 0, -1, 0], r"-2 \(example 0\)"),
    ([7, -5, 0, 1], r"7 \(example 0\), -5 \(example 1\)"),
])
def test_lora_index_out_of_range_is_refused(index, shown):
    bank, cfg = jlora.stack(ADAPTERS[:2])
    for strategy_index in (jnp.array(index), np.array(index, np.int32)):
        with pytest.raises(ValueError, match=rf"lora_index holds {shown}, outside -1\.\.1: the bank "
                                             r"has 2 adapters \(0\.\.1\) and -1 means the base model\."):
            jlora.wrap(Net().apply, cfg)(PARAMS, bank, TOKENS, lora_index=strategy_index)
    with pytest.raises(ValueError, match=rf"lora_index holds {shown}, outside -1\.\.1"):
        jlora.wrap(Net().apply, cfg).uses(PARAMS, bank, TOKENS, lora_index=jnp.array(index))


def test_traced_index_out_of_range_gives_nan_rows_never_another_adapter():
    bank, cfg = jlora.stack(ADAPTERS[:2])
    lora_apply = jlora.wrap(Net().apply, cfg, fallback="error")
    serve = jax.jit(lambda index: lora_apply(PARAMS, bank, TOKENS, lora_index=index))
    got = np.asarray(serve(jnp.array([1, 2, -2, 0])))  # examples 1 and 2 ask for adapters the bank lacks
    assert np.isnan(got[1]).all() and np.isnan(got[2]).all()
    np.testing.assert_allclose(got[0], _alone(1)[0], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(got[3], _alone(0)[3], rtol=1e-5, atol=1e-5)
    base = jax.jit(Net().apply)(PARAMS, TOKENS)
    got = np.asarray(serve(jnp.array([-1, 0, 1, -1])))  # in range: no NaN anywhere, -1 is the base
    np.testing.assert_allclose(got[0], base[0], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(got[2], _alone(1)[2], rtol=1e-5, atol=1e-5)


# ------------------------------------------------- one adapter per example, wherever an adapter acts


class TiedLM(nn.Module):
    """An embedding table read as rows (lookup) and used transposed as the output head (x·Wᵀ)."""

    @nn.compact
    def __call__(self, tokens):
        embed = nn.Embed(30, 16, name="embed")
        return embed.attend(jax.nn.gelu(nn.Dense(16, name="mix")(embed(tokens))))


class ConvNet(nn.Module):
    """Strided, padded and dilated 2-D convolutions, then a Dense head."""

    @nn.compact
    def __call__(self, x):
        h = nn.relu(nn.Conv(6, (3, 3), strides=2, padding="SAME", name="c1")(x))
        h = nn.Conv(5, (2, 2), padding="VALID", kernel_dilation=2, name="c2")(h)
        return nn.Dense(3, name="head")(h.mean(axis=(1, 2)))


def layer_loop(p, x):
    """An explicit stack of layers: ``w[i]`` in a Python loop (slice, squeeze), ``v[i]`` in a
    fori_loop (dynamic_slice, squeeze), and ``r`` reshaped to 2-D (its output axes merged)."""
    h = x
    for i in range(p["w"].shape[0]):
        h = jnp.tanh(h @ p["w"][i])
    h = jax.lax.fori_loop(0, p["v"].shape[0], lambda i, h: jnp.tanh(h @ p["v"][i]), h)
    return h @ p["r"].reshape(8, 6)


def dot_forms(p, z):
    """One kernel used as x·W and W·x (its input axis contracted), x·Wᵀ and Wᵀ·x (its output axis)."""
    x, y, w = z[:, :8], z[:, 8:], p["w"]

    def dot(lhs, rhs, contract):
        return jax.lax.dot_general(lhs, rhs, ((contract[:1], contract[1:]), ((), ())))

    forward = [x @ w, dot(w, x, (0, 1)).T]
    transposed = [y @ w.T, dot(w, y, (1, 1)).T, dot(y, w, (1, 1))]
    return jnp.concatenate(forward + transposed, axis=1)


def _linen_scan():
    x = jax.random.normal(jax.random.key(3), (4, 3, 16))
    wide = jlora.LoraConfig(rank=3, alpha=2.0,
                            targets=jlora.Rule(pattern=r".*layers/.*kernel", stack_axes=(0,)))
    return LinenScan().apply, jax.jit(LinenScan().init)(jax.random.key(0), x), [STACK_CFG, wide, STACK_CFG], x


def _nnx_stack():
    apply, state = nnx_apply(NnxModel(nnx.Rngs(0)))
    cfg = jlora.LoraConfig(rank=2, alpha=4.0, targets=(
        jlora.Rule(pattern=r"layers/.*/kernel", stack_axes=(0,)), r"attn/.*/kernel", r"conv/kernel",
        r"embed/embedding"))
    return apply, state, [cfg] * 3, jax.random.randint(jax.random.key(3), (4, 5), 0, 40)


def _conv_net():
    x = jax.random.normal(jax.random.key(3), (4, 6, 6, 3))
    cfg = jlora.LoraConfig(rank=2, alpha=4.0, targets=r".*kernel")
    wide = jlora.LoraConfig(rank=3, alpha=2.0, targets=r".*kernel")
    return ConvNet().apply, jax.jit(ConvNet().init)(jax.random.key(0), x), [cfg, wide, cfg], x


def _tied_lm():
    tokens = jax.random.randint(jax.random.key(3), (4, 5), 0, 30)
    cfg = jlora.LoraConfig(rank=2, alpha=4.0, targets=r".*(kernel|embedding)")
    return TiedLM().apply, jax.jit(TiedLM().init)(jax.random.key(0), tokens), [cfg] * 3, tokens


def _layer_loop():
    shapes = {"w": (3, 8, 8), "v": (2, 8, 8), "r": (8, 2, 3)}
    rng = np.random.default_rng(0)
    params = {name: jnp.asarray(rng.standard_normal(shape, np.float32) / 3) for name, shape in shapes.items()}
    cfg = jlora.LoraConfig(rank=2, alpha=4.0, targets=(jlora.Rule(pattern="w|v", stack_axes=(0,)),
                                                        jlora.Rule(pattern="r", in_axes=(0,))))
    return layer_loop, params, [cfg] * 3, jax.random.normal(jax.random.key(3), (4, 8))


def _dot_forms():
    w, z = (jnp.asarray(np.random.default_rng(i).standard_normal(shape, np.float32))
            for i, shape in enumerate([(8, 4), (4, 12)]))
    cfg = jlora.LoraConfig(rank=2, alpha=4.0, targets=jlora.Rule(pattern="w", in_axes=(0,)))
    return dot_forms, {"w": w}, [cfg] * 3, z


MODELS = {"linen_scan": _linen_scan, "nnx_stack": _nnx_stack, "conv": _conv_net, "tied_head": _tied_lm,
          "layer_loop": _layer_loop, "dot_forms": _dot_forms}
INDEX = [1, -1, 0, 1]  # slot 2 serves no example


def _bank(params, configs):
    """A bank of one adapter per config, each with distinct non-zero factors."""
    pairs = []
    for i, cfg in enumerate(configs):
        rng = np.random.default_rng(i)
        tr = jlora.init(jax.random.key(i + 1), params, cfg)[1]
        pairs.append((jax.tree.map(lambda v, rng=rng: v + 0.1 * rng.standard_normal(v.shape, np.float32), tr),
                      cfg))
    return jlora.stack(pairs)


def _kernels(bank):
    return {jax.tree_util.keystr(path[:-1], simple=True, separator="/")
            for path, _ in jax.tree_util.tree_leaves_with_path(bank)}


def _each_alone(apply_fn, params, bank, cfg, index, x):
    """Each example served on its own (a batch of one) with its slot's adapter; the base model for -1."""
    serve = {-1: functools.partial(jax.jit(apply_fn), params)}
    for k in set(index) - {-1}:  # one wrap per slot: it compiles once for a batch of one
        one, one_cfg = jlora.unstack(bank, cfg, k)
        serve[k] = functools.partial(jlora.wrap(apply_fn, one_cfg, fallback="error"), params, one)
    return jnp.concatenate([serve[k](x[n:n + 1]) for n, k in enumerate(index)])


@functools.cache
def _served(kind):
    """A model of ``MODELS``, its params, input, and a bank of three adapters on it with its config."""
    apply_fn, params, configs, x = MODELS[kind]()
    return apply_fn, params, x, *_bank(params, configs)


@pytest.mark.parametrize("kind", sorted(MODELS))
def test_per_example_equals_each_example_alone(kind):
    apply_fn, params, x, bank, cfg = _served(kind)
    lora_apply = jlora.wrap(apply_fn, cfg, fallback="error")
    index = jnp.array(INDEX)
    uses = lora_apply.uses(params, bank, x, lora_index=index)
    assert all(u.factored for u in uses) and {u.path for u in uses} == _kernels(bank), uses
    want = _each_alone(apply_fn, params, bank, cfg, INDEX, x)
    np.testing.assert_allclose(lora_apply(params, bank, x, lora_index=index), want, rtol=1e-5, atol=1e-5)
    serve = jax.jit(lambda bank, index: lora_apply(params, bank, x, lora_index=index))
    np.testing.assert_allclose(serve(bank, index), want, rtol=1e-5, atol=1e-5)
    other = [2, 0, -1, 2]  # another index runs the same compiled step
    want = _each_alone(apply_fn, params, bank, cfg, other, x)
    np.testing.assert_allclose(serve(bank, jnp.array(other)), want, rtol=1e-5, atol=1e-5)
    assert serve._cache_size() == 1


@pytest.mark.parametrize("kind", sorted(MODELS))
def test_per_example_gradients_reach_each_examples_slot_only(kind):
    apply_fn, params, x, bank, cfg = _served(kind)
    lora_apply = jlora.wrap(apply_fn, cfg, fallback="error")
    cotangent = jax.random.normal(jax.random.key(7), jax.eval_shape(apply_fn, params, x).shape)
    index = jnp.array(INDEX)

    def loss(bank):
        return jnp.sum(lora_apply(params, bank, x, lora_index=index) * cotangent)

    grads = jax.jit(jax.grad(loss))(bank)
    for k in range(len(cfg.adapters)):
        got = jax.tree.map(lambda g, k=k: g[k], grads)
        rows = np.flatnonzero(np.array(INDEX) == k)
        if not rows.size:
            assert not any(jnp.any(g) for g in jax.tree.leaves(got)), f"slot {k} serves no example"
            continue
        one, one_cfg = jlora.unstack(bank, cfg, k)
        alone = jlora.wrap(apply_fn, one_cfg, fallback="error")

        def loss_alone(one, alone=alone, rows=rows):
            return jnp.sum(alone(params, one, x[rows]) * cotangent[rows])

        want = jax.jit(jax.grad(loss_alone))(one)
        for (path, g), w in zip(jax.tree_util.tree_leaves_with_path(got), jax.tree.leaves(want), strict=True):
            np.testing.assert_allclose(g, w, rtol=1e-4, atol=1e-5, err_msg=f"slot {k} {path}")


def test_per_example_refuses_layers_applied_side_by_side():
    params = {"experts": jax.random.normal(jax.random.key(0), (3, 8, 4))}
    cfg = jlora.LoraConfig(rank=2, targets=jlora.Rule(pattern="experts", stack_axes=(0,)))
    bank, bank_cfg = _bank(params, [cfg, cfg])
    one, one_cfg = jlora.unstack(bank, bank_cfg, 1)
    for spec, x in (("bi,eio->ebo", jnp.ones((4, 8))), ("ebi,eio->ebo", jnp.ones((3, 4, 8)))):
        def every_expert(p, x, spec=spec):
            return jnp.einsum(spec, x, p["experts"])

        lora_apply = jlora.wrap(every_expert, bank_cfg)
        with pytest.raises(ValueError, match=r"experts: per-example adapters \(lora_index\) reach this "
                                             r"'dot_general' with the kernel's stack axes \(0,\) still in "
                                             r"place .* Serve this bank with lora_weights"):
            lora_apply(params, bank, x, lora_index=jnp.array([0, 1, -1, 0]))
        np.testing.assert_allclose(lora_apply(params, bank, x, lora_weights=jnp.array([0.0, 1.0])),
                                   jlora.wrap(every_expert, one_cfg)(params, one, x), rtol=1e-5, atol=1e-5)


def test_per_example_tied_head_refuses_a_nonlinearity():
    apply_fn, params, _, tokens = _tied_lm()
    gelu = jlora.LoraConfig(rank=2, targets=r".*(kernel|embedding)", nonlinearity="gelu")
    bank, cfg = _bank(params, [gelu, gelu])
    with pytest.raises(ValueError, match=r"embed/embedding: this dot_general uses the kernel transposed "
                                         r"\(contracting its output axes, as a tied embedding head does\) "
                                         r"and the bank's nonlinearity is 'gelu'; nonlinearity: with a "
                                         r"nonlinearity the adapter defines no transposed map"):
        jlora.wrap(apply_fn, cfg)(params, bank, tokens, lora_index=jnp.array([0, 1, -1, 0]))


def test_per_example_refuses_a_grouped_conv_and_a_batch_off_axis_0():
    conv = nn.Conv(4, (3,), feature_group_count=2)
    x = jnp.ones((4, 6, 4))
    params = conv.init(jax.random.key(0), x)
    cfg = jlora.LoraConfig(rank=2, targets=r".*kernel")
    bank, bank_cfg = _bank(params, [cfg, cfg])
    with pytest.raises(ValueError, match=r"params/kernel: per-example adapters need an ungrouped convolution "
                                         r".*got x of shape \(4, 6, 4\) with its batch on axis 0, "
                                         r"feature_group_count=2, batch_group_count=1, 4 adapter "
                                         r"indices\)\. Serve this bank with lora_weights"):
        jlora.wrap(conv.apply, bank_cfg)(params, bank, x, lora_index=jnp.array([0, 1, -1, 0]))
    dense = {"w": jnp.ones((8, 4))}
    cfg = jlora.LoraConfig(rank=2, targets="w")
    bank, bank_cfg = _bank(dense, [cfg, cfg])
    time_major = jlora.wrap(lambda p, x: jnp.einsum("tbi,io->bto", x, p["w"]), bank_cfg)
    with pytest.raises(ValueError, match=r"w: per-example adapters need x·W \(or x·Wᵀ\) with the batch as "
                                         r"axis 0 of x, .*got x of shape \(3, 4, 8\)"):
        time_major(dense, bank, jnp.ones((3, 4, 8)), lora_index=jnp.array([0, 1, -1, 0]))
