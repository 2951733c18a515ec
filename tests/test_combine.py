"""combine: every method against the weighted sum of deltas written out in numpy, and every refusal."""

import functools
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from models import LinenScan

import jlora
from jlora._combine import CombineReport, combine
from jlora._paths import flatten

WEIGHTS = (0.7, -1.3, 0.4)


# ---------------------------------------------------------------- hand-written maths


def hand_scale(rank, alpha, rslora):
    return alpha / math.sqrt(rank) if rslora else alpha / rank


def hand_delta(a, b, n_stack=0):
    """``a @ b`` over the rank axis, in float64, shaped ``(*stack, *in, *out)`` (W's axes in these models)."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    stack = a.shape[:n_stack]
    p = math.prod(stack)
    d = np.einsum("pir,pro->pio", a.reshape(p, -1, a.shape[-1]), b.reshape(p, b.shape[n_stack], -1))
    return d.reshape(*stack, *a.shape[n_stack:-1], *b.shape[n_stack + 1:])


def as_layers(d, n_stack, n_in):
    """``(*stack, *in, *out)`` -> ``(layers, fan_in, fan_out)``."""
    s = d.shape
    return d.reshape(math.prod(s[:n_stack]), math.prod(s[n_stack:n_stack + n_in]), -1)


def randomize(tree, seed, std=0.2):
    """Replace every leaf by Gaussian noise: every delta is non-zero and full rank."""
    rng = np.random.default_rng(seed)
    return jax.tree.map(lambda x: jnp.asarray(std * rng.standard_normal(x.shape), x.dtype), tree)


def model_case(model, x_shape, **kw):
    """A model's params (its init traced for the structure only, filled with noise: nothing compiles)
    and input."""
    x = jnp.asarray(np.random.default_rng(0).standard_normal(x_shape), jnp.float32)
    params = randomize(jax.eval_shape(model.init, jax.random.key(0), x), 1, std=0.1)
    return dict(apply=model.apply, x=x, params=params, **kw)


def adapter(params, cfg, seed):
    """``jlora.init``'s trainable tree (traced for its structure only: no compile) filled with noise."""
    return randomize(jax.eval_shape(lambda p: jlora.init(jax.random.key(0), p, cfg)[1], params), seed)


# ---------------------------------------------------------------- the three model cases


class Mlp(nn.Module):
    @nn.compact
    def __call__(self, x):
        return nn.Dense(8, name="out")(jax.nn.gelu(nn.Dense(16, name="hidden")(x)))


@functools.cache
def dense_case():
    return model_case(Mlp(), (4, 12), n_stack=0,
                      paths={"params/hidden/kernel": 1, "params/out/kernel": 1}, general=r".*/kernel",
                      stack=())


@functools.cache
def attention_case():
    model = nn.MultiHeadDotProductAttention(num_heads=2, qkv_features=8, out_features=8)
    return model_case(model, (2, 5, 8), n_stack=0, paths={"params/query/kernel": 1, "params/out/kernel": 2},
                      general=r".*/(query|out)/kernel", stack=())


@functools.cache
def stacked_case():
    return model_case(LinenScan(), (2, 16), n_stack=1,
                      paths={"params/layers/up/kernel": 1, "params/layers/down/kernel": 1},
                      general=r".*/kernel", stack=(0,))


CASES = {"dense": dense_case, "attention": attention_case, "stacked": stacked_case}

# (rank, alpha, rslora) of the general rule, and the first path's own (rank, alpha) override.
SPECS = [((2, 4.0, False), None), ((3, 2.0, True), (1, 5.0)), ((1, 3.0, False), None)]


def make_adapters(case, specs=SPECS, seed=10):
    """One (trainable, config) per spec on the case's base, with the hand-computed scale of every target."""
    first = next(iter(case["paths"]))
    out = []
    for j, ((rank, alpha, rslora), override) in enumerate(specs):
        rules = [jlora.Rule(pattern=case["general"], stack_axes=case["stack"])]
        scales = {p: hand_scale(rank, alpha, rslora) for p in case["paths"]}
        if override:
            rules.insert(0, jlora.Rule(pattern=first, rank=override[0], alpha=override[1],
                                       stack_axes=case["stack"]))
            scales[first] = hand_scale(override[0], override[1], rslora)
        cfg = jlora.LoraConfig(rank=rank, alpha=alpha, rslora=rslora, targets=tuple(rules))
        out.append((adapter(case["params"], cfg, seed + j), cfg, scales))
    return out


def exact_sum(case, adapters, weights):
    flat = [flatten(tr) for tr, _, _ in adapters]
    return {p: sum(w * sc[p] * hand_delta(f[f"{p}/a"], f[f"{p}/b"], case["n_stack"])
                   for w, f, (_, _, sc) in zip(weights, flat, adapters, strict=True) if f"{p}/a" in f)
            for p in case["paths"]}


def combined_delta(case, tr, cfg, path):
    f = flatten(tr)
    rule = cfg.rule_for(path)
    return cfg.scale_for(rule) * hand_delta(f[f"{path}/a"], f[f"{path}/b"], case["n_stack"])


def check_model(case, tr, cfg, deltas):
    """wrap with the combined config == model.apply with the deltas added to the weights by hand."""
    flat = flatten(case["params"])
    merged = {p: v + deltas[p].astype(np.float32) if p in deltas else v for p, v in flat.items()}
    tree = jax.tree.unflatten(jax.tree.structure(case["params"]), [merged[p] for p in flat])
    want = jax.jit(case["apply"])(tree, case["x"])
    got = jlora.wrap(case["apply"], cfg)(case["params"], tr, case["x"])
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def truncate_dense(d, n_stack, n_in, k):
    """numpy's SVD of the dense delta, per layer, cut to rank k; and the singular values."""
    m = as_layers(d, n_stack, n_in)
    u, s, vh = np.linalg.svd(m, full_matrices=False)
    return ((u[:, :, :k] * s[:, None, :k]) @ vh[:, :k, :]).reshape(d.shape), s


# ---------------------------------------------------------------- every method, every model case


@pytest.mark.parametrize("name", CASES)
def test_cat_is_the_exact_weighted_sum(name):
    case = CASES[name]()
    adapters = make_adapters(case)
    tr, cfg, report = combine([(t, c) for t, c, _ in adapters], WEIGHTS)
    want = exact_sum(case, adapters, WEIGHTS)
    first = next(iter(case["paths"]))
    for path in case["paths"]:
        assert cfg.scale_for(cfg.rule_for(path)) == 1.0
        rank = 2 + (1 if path == first else 3) + 1
        assert report[path] == CombineReport(path, rank, (0, 1, 2), dropped=0.0)
        np.testing.assert_allclose(combined_delta(case, tr, cfg, path), want[path], rtol=1e-5, atol=1e-5)
    check_model(case, tr, cfg, want)
    assert jlora.LoraConfig.from_dict(cfg.to_dict()) == cfg  # travels in checkpoint metadata


@pytest.mark.parametrize("name", CASES)
def test_linear_is_the_exact_weighted_sum_at_its_own_rank(name):
    case = CASES[name]()
    adapters = make_adapters(case)
    tr, cfg, report = combine([(t, c) for t, c, _ in adapters], WEIGHTS, method="linear")
    want = exact_sum(case, adapters, WEIGHTS)
    _, cat_cfg, _ = combine([(t, c) for t, c, _ in adapters], WEIGHTS)
    for path in case["paths"]:
        assert cfg.scale_for(cfg.rule_for(path)) == 1.0
        # random factors: the delta's rank is the concatenated rank, nothing is redundant
        assert report[path].rank == cat_cfg.rank_for(cat_cfg.rule_for(path))
        assert report[path].dropped < 1e-20
        np.testing.assert_allclose(combined_delta(case, tr, cfg, path), want[path], rtol=1e-5, atol=1e-5)
    check_model(case, tr, cfg, want)


@pytest.mark.parametrize("name", CASES)
def test_svd_is_the_eckart_young_optimum(name):
    case = CASES[name]()
    adapters = make_adapters(case)
    k = 2
    tr, cfg, report = combine([(t, c) for t, c, _ in adapters], WEIGHTS, method="svd", rank=k)
    want = exact_sum(case, adapters, WEIGHTS)
    best = {}
    for path in case["paths"]:
        n_in = case["paths"][path]
        best[path], s = truncate_dense(want[path], case["n_stack"], n_in, k)
        got = combined_delta(case, tr, cfg, path)
        assert report[path].rank == k and cfg.scale_for(cfg.rule_for(path)) == 1.0
        np.testing.assert_allclose(got, best[path], rtol=1e-5, atol=1e-5)
        # the error is the optimum sum of the dropped squared singular values, and the report says so
        error = np.sum((got - want[path]) ** 2)
        optimum = np.sum(s[:, k:] ** 2)
        np.testing.assert_allclose(error, optimum, rtol=1e-4)
        np.testing.assert_allclose(report[path].dropped, optimum / np.sum(s ** 2), rtol=1e-6)
        assert 0 < report[path].dropped < 1
    check_model(case, tr, cfg, best)


@pytest.mark.parametrize("name", CASES)
def test_average_means_the_factors_and_reports_the_gap(name):
    case = CASES[name]()
    spec = ((2, 4.0, True), (1, 3.0))
    adapters = make_adapters(case, [spec, spec, spec], seed=20)
    weights = (0.5, 0.25, 0.25)
    tr, cfg, report = combine([(t, c) for t, c, _ in adapters], weights, method="average")
    assert cfg is adapters[0][1]
    want = exact_sum(case, adapters, weights)
    flats = [flatten(t) for t, _, _ in adapters]
    got = flatten(tr)
    deltas = {}
    for path in case["paths"]:
        for name in ("a", "b"):
            mean = sum(w * np.asarray(f[f"{path}/{name}"], np.float64)
                       for w, f in zip(weights, flats, strict=True))
            np.testing.assert_allclose(got[f"{path}/{name}"], mean, rtol=1e-5, atol=1e-6)
        deltas[path] = adapters[0][2][path] * hand_delta(got[f"{path}/a"], got[f"{path}/b"], case["n_stack"])
        gap = np.linalg.norm(deltas[path] - want[path]) / np.linalg.norm(want[path])
        assert (report[path].dropped is None
                and report[path].rank == adapters[0][1].rank_for(cfg.rule_for(path)))
        np.testing.assert_allclose(report[path].gap, gap, rtol=1e-4)
        assert report[path].gap > 0.1  # the mean of the factors is not the mean of the deltas
    check_model(case, tr, cfg, deltas)


# ---------------------------------------------------------------- properties and special cases


@settings(max_examples=15, deadline=None)
@given(fan_in=st.integers(2, 9), fan_out=st.integers(2, 9), seed=st.integers(0, 10_000),
       specs=st.lists(st.tuples(st.integers(1, 3), st.floats(0.5, 8.0), st.booleans(), st.floats(-3.0, 3.0)),
                      min_size=1, max_size=3))
def test_cat_property(fan_in, fan_out, seed, specs):
    params = {"w": jnp.zeros((fan_in, fan_out))}
    adapters, want = [], np.zeros((fan_in, fan_out))
    for j, (rank, alpha, rslora, weight) in enumerate(specs):
        rank = min(rank, fan_in, fan_out)
        cfg = jlora.LoraConfig(rank=rank, alpha=alpha, rslora=rslora, targets="w")
        tr = adapter(params, cfg, seed + j)
        adapters.append((tr, cfg))
        want += weight * hand_scale(rank, alpha, rslora) * hand_delta(tr["w"]["a"], tr["w"]["b"])
    weights = [w for *_, w in specs]
    total = sum(c.rank for _, c in adapters)
    if total > min(fan_in, fan_out):
        with pytest.raises(ValueError, match=r"concatenated rank exceeds .* w \(rank \d+ > min"):
            combine(adapters, weights)
        tr, cfg, report = combine(adapters, weights, method="linear")
    else:
        tr, cfg, report = combine(adapters, weights)
        assert report["w"].rank == total
    assert cfg.scale_for(cfg.targets[0]) == 1.0
    np.testing.assert_allclose(hand_delta(tr["w"]["a"], tr["w"]["b"]), want, rtol=1e-5, atol=1e-5)


def test_negative_weights_subtract_an_adapter():
    case = dense_case()
    (t0, c0, _), (t1, c1, _) = make_adapters(case, SPECS[:2])
    for method in ("cat", "linear"):
        tr, cfg, _ = combine([(t0, c0), (t1, c1), (t1, c1)], [1.0, 1.0, -1.0], method=method)
        np.testing.assert_allclose(jlora.merge(case["params"], tr, cfg)["params"]["hidden"]["kernel"],
                                   jlora.merge(case["params"], t0, c0)["params"]["hidden"]["kernel"],
                                   rtol=1e-5, atol=1e-5)


def test_linear_drops_exact_redundancy():
    case = dense_case()
    (t0, c0, _), = make_adapters(case, SPECS[:1])
    tr, cfg, report = combine([(t0, c0), (t0, c0)], [0.5, 0.5], method="linear")
    assert report["params/hidden/kernel"].rank == c0.rank  # not 2r: the two copies are one direction
    np.testing.assert_allclose(jlora.merge(case["params"], tr, cfg)["params"]["hidden"]["kernel"],
                               jlora.merge(case["params"], t0, c0)["params"]["hidden"]["kernel"],
                               rtol=1e-5, atol=1e-5)
    zero, _, report = combine([(t0, c0), (t0, c0)], [1.0, -1.0], method="linear")
    assert report["params/hidden/kernel"].rank == 1
    np.testing.assert_allclose(hand_delta(zero["params"]["hidden"]["kernel"]["a"],
                                          zero["params"]["hidden"]["kernel"]["b"]), 0.0, atol=1e-6)


def test_svd_rank_above_the_delta_keeps_it_exact():
    case = dense_case()
    adapters = make_adapters(case, SPECS[:1])
    tr, cfg, report = combine([(t, c) for t, c, _ in adapters], [2.0], method="svd", rank=7)
    assert report["params/hidden/kernel"].rank == 2 and report["params/hidden/kernel"].dropped < 1e-20
    want = exact_sum(case, adapters, [2.0])
    np.testing.assert_allclose(combined_delta(case, tr, cfg, "params/hidden/kernel"),
                               want["params/hidden/kernel"], rtol=1e-5, atol=1e-5)


def test_missing_target_is_a_zero_delta():
    case = dense_case()
    (t0, c0, s0), (t1, c1, s1) = make_adapters(case, SPECS[:2])
    c1 = jlora.LoraConfig(rank=3, alpha=2.0, rslora=True, targets=r".*/out/kernel")
    t1 = adapter(case["params"], c1, 3)
    adapters = [(t0, c0, s0), (t1, c1, {"params/out/kernel": hand_scale(3, 2.0, True)})]
    for method in ("cat", "linear"):
        tr, cfg, report = combine([(t, c) for t, c, _ in adapters], [0.5, 2.0], method=method)
        assert (report["params/hidden/kernel"].sources == (0,)
                and report["params/out/kernel"].sources == (0, 1))
        check_model(case, tr, cfg, exact_sum(case, adapters, [0.5, 2.0]))


def test_train_in_full_leaves_combine_relative_to_frozen():
    case = dense_case()
    specs = []
    for j, rank in enumerate((2, 3)):
        cfg = jlora.LoraConfig(rank=rank, targets=r".*/kernel", train_in_full=r".*/out/bias")
        specs.append((adapter(case["params"], cfg, j), cfg))
    frozen = case["params"]
    with pytest.raises(ValueError, match=r"params/out/bias.* trained in full.*pass frozen="):
        combine(specs, [1.5, -0.5])
    tr, cfg, _ = combine(specs, [1.5, -0.5], frozen=frozen)
    base = np.asarray(case["params"]["params"]["out"]["bias"])
    want = base + sum(w * (np.asarray(t["params"]["out"]["bias"]) - base)
                      for w, (t, _) in zip([1.5, -0.5], specs, strict=True))
    np.testing.assert_allclose(tr["params"]["out"]["bias"], want, rtol=1e-6, atol=1e-6)
    merged = jlora.merge(frozen, tr, cfg)
    np.testing.assert_allclose(merged["params"]["out"]["bias"], want, rtol=1e-6, atol=1e-6)
    avg, _, _ = combine(specs[:1] * 2, [0.5, 0.5], method="average")
    np.testing.assert_allclose(avg["params"]["out"]["bias"], specs[0][0]["params"]["out"]["bias"], rtol=1e-6)


def test_dylora_enters_at_full_rank():
    case = dense_case()
    cfg = jlora.LoraConfig(rank=3, alpha=6.0, dylora="frozen", targets=r".*/kernel")
    tr = adapter(case["params"], cfg, 1)
    out, out_cfg, _ = combine([(tr, cfg)], [1.0], method="linear")
    assert out_cfg.dylora is None
    np.testing.assert_allclose(jlora.wrap(case["apply"], out_cfg)(case["params"], out, case["x"]),
                               jlora.wrap(case["apply"], cfg)(case["params"], tr, case["x"]),
                               rtol=1e-5, atol=1e-5)


def test_average_of_adapters_with_a_nonlinearity_or_dora():
    case = dense_case()
    for kw in ({"nonlinearity": "gelu"}, {"dora": True}):
        cfg = jlora.LoraConfig(rank=2, targets=r".*/kernel", **kw)
        ts = [adapter(case["params"], cfg, j) for j in range(2)]
        tr, out_cfg, report = combine([(t, cfg) for t in ts], [0.5, 0.5], method="average")
        assert out_cfg is cfg and report["params/out/kernel"].gap is None
        for leaf, x0, x1 in zip(jax.tree.leaves(tr), *map(jax.tree.leaves, ts), strict=True):
            np.testing.assert_allclose(leaf, 0.5 * (x0 + x1), rtol=1e-6)
        assert jax.tree.structure(tr) == jax.tree.structure(ts[0])  # an adapter of the same config


def test_low_precision_adapters():
    params = {"w": jnp.zeros((8, 6), jnp.bfloat16)}
    cfgs = [jlora.LoraConfig(rank=2, targets="w", dtype="bfloat16"), jlora.LoraConfig(rank=2, targets="w")]
    ts = [adapter(params, c, j) for j, c in enumerate(cfgs)]
    tr, cfg, _ = combine(list(zip(ts, cfgs, strict=True)), [1.0, 1.0], method="svd", rank=3)
    assert cfg.dtype == "float32" and tr["w"]["a"].dtype == jnp.float32
    assert jlora.merge(params, tr, cfg)["w"].dtype == jnp.bfloat16


# ---------------------------------------------------------------- refusals


def _pair(params=None, **kw):
    params = params or {"w": jnp.zeros((8, 6)), "v": jnp.zeros((4, 2, 3))}
    cfg = jlora.LoraConfig(**{"rank": 2, "targets": r"w|v", **kw})
    return adapter(params, cfg, 0), cfg


@pytest.mark.parametrize("args, kwargs, error, match", [
    ((), {"method": "ties"}, ValueError, r"unknown method 'ties'; choose one of"),
    ((), {"method": "svd"}, ValueError, r"method='svd' needs rank=k"),
    ((), {"method": "svd", "rank": 0}, ValueError, r"method='svd' needs rank=k, an int >= 1"),
    ((), {"rank": 4}, ValueError, r"rank= only applies to method='svd'"),
    ((1.0,), {}, ValueError, r"one weight per adapter \(2\)"),
    ((1.0, float("nan")), {}, ValueError, r"weights must be finite numbers"),
    ((1.0, True), {}, ValueError, r"weights must be finite numbers"),
    ((0.5, 0.6), {"method": "average"}, ValueError, r"weights must sum to 1; they sum to 1.1"),
])
def test_refuses_bad_arguments(args, kwargs, error, match):
    pair = _pair()
    with pytest.raises(error, match=match):
        combine([pair, pair], list(args) or [0.5, 0.5], **kwargs)


def test_refuses_bad_adapter_lists():
    tr, cfg = _pair()
    with pytest.raises(ValueError, match=r"non-empty sequence of \(trainable, config\) pairs"):
        combine([], [])
    with pytest.raises(ValueError, match=r"adapters\[0\] must be a \(trainable, config\) pair"):
        combine([tr], [1.0])
    with pytest.raises(TypeError, match=r"adapters\[1\]\[1\] must be a jlora.LoraConfig, got dict"):
        combine([(tr, cfg), (tr, {})], [1.0, 1.0])


@pytest.mark.parametrize("kw, match", [
    ({"nonlinearity": "relu"}, r"adapter 1, nonlinearity='relu': its branch s·f\(x·a\)·b is not a matrix"),
    ({"dora": True}, r"adapter 1, DoRA: .* full-rank matrix"),
    ({"init": "pissa"}, r"adapter 1, init='pissa': .* residual"),
])
@pytest.mark.parametrize("method", ["cat", "linear", "svd"])
def test_refuses_adapters_whose_delta_is_not_a_shared_low_rank_matrix(kw, match, method):
    with pytest.raises(ValueError, match=match):
        combine([_pair(), _pair(**kw)], [1.0, 1.0], method=method, rank=2 if method == "svd" else None)


def test_refuses_mismatched_layouts_listing_every_path():
    params = {"w": jnp.zeros((3, 8, 6)), "v": jnp.zeros((3, 8, 6))}
    flat_cfg = jlora.LoraConfig(rank=2, targets=r"w|v")
    stacked_cfg = jlora.LoraConfig(rank=2, targets=jlora.Rule(pattern=r"w|v", stack_axes=(0,)))
    pairs = [(adapter(params, c, 0), c) for c in (flat_cfg, stacked_cfg)]
    with pytest.raises(ValueError, match=r"(?s)v has different kernels or layouts: "
                                         r"adapter 0: .*stack_axes=\(\).*adapter 1: "
                                         r".*stack_axes=\(0,\).*\n  w has different"):
        combine(pairs, [1.0, 1.0])


def test_refuses_adapters_of_different_bases():
    small = _pair({"w": jnp.zeros((6, 6)), "v": jnp.zeros((4, 2, 3))})
    with pytest.raises(ValueError, match=r"w has different kernels or layouts: adapter 0: shape \(8, 6\).*"
                                         r"adapter 1: shape \(6, 6\)"):
        combine([_pair(), small], [1.0, 1.0])
    with pytest.raises(ValueError, match=r"(?s)adapter 1 does not fit frozen and its config:\n  .*w/a has "
                                         r"shape \(6, 2\), expected \(8, 2\)"):
        combine([_pair(), small], [1.0, 1.0], frozen={"w": jnp.zeros((8, 6)), "v": jnp.zeros((4, 2, 3))})


def test_refuses_a_trainable_that_does_not_fit_its_config():
    tr, _ = _pair()
    with pytest.raises(ValueError, match=r"(?s)combine: adapter 0: trainable does not fit config:\n  .*w/a "
                                         r"has shape \(8, 2\), expected \(8, 3\)"):
        combine([(tr, jlora.LoraConfig(rank=3, targets=r"w|v"))], [1.0])
    with pytest.raises(ValueError, match=r"adapter 0: trainable does not fit config:\n  trainable holds an "
                                         r"adapter at v, but no rule "):
        combine([(tr, jlora.LoraConfig(rank=2, targets=r"w"))], [1.0])


def test_refuses_a_leaf_adapted_by_one_and_trained_in_full_by_another():
    params = {"w": jnp.zeros((8, 6)), "v": jnp.zeros((4, 2, 3))}
    full = jlora.LoraConfig(rank=2, targets="v", train_in_full="w")
    pair = (adapter(params, full, 0), full)
    with pytest.raises(ValueError, match=r"w is adapted by some adapters and trained in full by others: "
                                         r"adapter 0: LoRA, adapter 1: full"):
        combine([_pair(), pair], [1.0, 1.0], frozen=params)


def test_refuses_cat_beyond_the_kernel_and_points_to_linear():
    pair = _pair(rank=2)
    with pytest.raises(ValueError, match=r"v \(rank 8 > min\(fan_in=8, fan_out=3\)\), w \(rank 8 > min.*"
                                         r"Use method='linear'"):
        combine([pair] * 4, [1.0] * 4)
    _, _, report = combine([pair] * 4, [1.0] * 4, method="linear")
    assert report["w"].rank == 2


def test_average_refuses_adapters_that_do_not_share_an_initialisation():
    tr, cfg = _pair()
    with pytest.raises(ValueError, match=r"v has different ranks or scales: adapter 0: rank 2, scale 4.0, "
                                         r"adapter 1: rank 3"):
        combine([(tr, cfg), _pair(rank=3)], [0.5, 0.5], method="average")
    only_w = jlora.LoraConfig(rank=2, targets="w")
    with pytest.raises(ValueError, match=r"v is held by adapters \[0\] only; averaging needs every adapter"):
        combine([(tr, cfg), (adapter({"w": jnp.zeros((8, 6))}, only_w, 0), only_w)],
                [0.5, 0.5], method="average")
    with pytest.raises(ValueError, match=r"must be the same kind of adapter .* adapter 1: \('gelu'"):
        combine([(tr, cfg), _pair(nonlinearity="gelu")], [0.5, 0.5], method="average")
