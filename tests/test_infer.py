"""infer_layouts on model code written the way public JAX LLM code is written, and wrap's layout check.

Each style below is a tiny model in the manner of a public JAX LLM implementation: einsum
kernels with the input axis first, in the middle or last (torch's ``(out, in)`` used
transposed), layers scanned on axis 0 or 1 (Linen and NNX), experts through a batched
einsum, ``ragged_dot`` and ``shard_map``, a tied embedding head, a kernel reshaped before use. For every
one: `infer_layouts` + `init` + `wrap` need no Rules, zero ``b`` reproduces the base,
factored equals merged, nothing falls back, and three jitted LoRA+ steps lower the loss.
Without `infer_layouts` each either works with the default split (and that split is the
real one) or raises the one listing `LayoutError`: never a silent swap of ``a`` and ``b``.
"""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from jax import lax

import jlora
from jlora._infer import kernel_uses
from jlora._plan import Plan

D, N, H, F, E, T, B, L = 8, 2, 4, 16, 3, 5, 2, 3
X = jax.random.normal(jax.random.key(5), (B, T, D))


def _init(shape, scale=0.3):
    return lambda key, *_: scale * jax.random.normal(key, shape)


class Attention(nn.Module):
    """q/k/v/o einsum kernels; ``layout`` names where the input axis sits (gemma, t5x, torch ports)."""

    layout: str

    @nn.compact
    def __call__(self, x):
        if self.layout == "first":  # (D, N, H), 'BTD,DNH->BTNH'; out (N, H, D)
            q, k, v = (self.param(n, _init((D, N, H))) for n in ("q_proj", "k_proj", "v_proj"))
            qh, kh, vh = (jnp.einsum("btd,dnh->btnh", x, w) for w in (q, k, v))
        elif self.layout == "middle":  # (N, D, H), 'BTD,NDH->BTNH'
            q, k, v = (self.param(n, _init((N, D, H))) for n in ("q_einsum", "k_einsum", "v_einsum"))
            qh, kh, vh = (jnp.einsum("btd,ndh->btnh", x, w) for w in (q, k, v))
        else:  # "last": torch's (out, in), used as x @ W.T, then split into heads
            q, k, v = (self.param(n, _init((N * H, D))) for n in ("wq", "wk", "wv"))
            qh, kh, vh = ((x @ w.T).reshape(B, T, N, H) for w in (q, k, v))
        att = jax.nn.softmax(jnp.einsum("btnh,bsnh->bnts", qh, kh) / H**0.5, axis=-1)
        ctx = jnp.einsum("bnts,bsnh->btnh", att, vh)
        if self.layout == "last":
            o = self.param("wo", _init((D, N * H)))
            return x + ctx.reshape(B, T, N * H) @ o.T
        o = self.param("o_proj" if self.layout == "first" else "attn_vec_einsum", _init((N, H, D)))
        return x + jnp.einsum("btnh,nhd->btd", ctx, o)


class Mlp(nn.Module):
    transposed: bool = False

    @nn.compact
    def __call__(self, x):
        if self.transposed:  # torch layout (out, in)
            up, down = self.param("w1", _init((F, D))), self.param("w2", _init((D, F)))
            return x + jax.nn.gelu(x @ up.T) @ down.T
        up, down = self.param("up", _init((D, F))), self.param("down", _init((F, D)))
        return x + jax.nn.gelu(x @ up) @ down


class Dense(nn.Module):
    layout: str

    @nn.compact
    def __call__(self, x):
        return Mlp(transposed=self.layout == "last")(Attention(self.layout)(x))


class Block(nn.Module):
    @nn.compact
    def __call__(self, h, _):
        return Mlp()(Attention("first")(h)), None


class Scanned(nn.Module):
    axis: int

    @nn.compact
    def __call__(self, x):
        stack = nn.scan(nn.remat(Block), variable_axes={"params": self.axis}, split_rngs={"params": True},
                        length=L)
        return stack(name="layers")(x, None)[0]


class BatchedMoe(nn.Module):
    """Experts as the batch axis of an einsum over capacity buffers: 'ECD,EDF->ECF'."""

    @nn.compact
    def __call__(self, x):
        up, down = self.param("wi", _init((E, D, F))), self.param("wo", _init((E, F, D)))
        tokens = x.reshape(-1, D)[: E * 3].reshape(E, 3, D)  # a fixed dispatch: 3 tokens per expert
        h = jax.nn.gelu(jnp.einsum("ecd,edf->ecf", tokens, up))
        return jnp.einsum("ecf,efd->ecd", h, down)


class RaggedMoe(nn.Module):
    """Tokens sorted by expert, experts applied with ragged_dot and the group sizes."""

    @nn.compact
    def __call__(self, x):
        gate, up, down = (self.param(n, _init(s)) for n, s in (("gate", (E, D, F)), ("up", (E, D, F)),
                                                                  ("down", (E, F, D))))
        tokens = x.reshape(-1, D)
        sizes = jnp.array([3, 2, 5], jnp.int32)
        h = jax.nn.silu(lax.ragged_dot(tokens, gate, sizes)) * lax.ragged_dot(tokens, up, sizes)
        return lax.ragged_dot(h, down, sizes)


class ShardMapMoe(nn.Module):
    """Expert parallelism: the experts' einsums inside shard_map, experts split over a mesh axis."""

    @nn.compact
    def __call__(self, x):
        up, down = self.param("wi", _init((E, D, F))), self.param("wo", _init((E, F, D)))
        tokens = x.reshape(-1, D)[: E * 3].reshape(E, 3, D)
        mesh = jax.sharding.Mesh(np.array(jax.devices()[:1]), ("expert",))

        def experts(t, up, down):
            return jnp.einsum("ecf,efd->ecd", jax.nn.gelu(jnp.einsum("ecd,edf->ecf", t, up)), down)

        spec = jax.sharding.PartitionSpec("expert")
        return jax.shard_map(experts, mesh=mesh, in_specs=(spec, spec, spec),
                             out_specs=spec)(tokens, up, down)


class Tied(nn.Module):
    @nn.compact
    def __call__(self, ids):
        embed = nn.Embed(40, D, name="embed")
        h = Mlp()(embed(ids))
        return embed.attend(h)


class Fused(nn.Module):
    """A (D, N, H) kernel reshaped to (D, N·H) before a plain matmul."""

    @nn.compact
    def __call__(self, x):
        w = self.param("qkv", _init((D, N, H)))
        return x @ w.reshape(D, N * H)


class NnxLayer(nnx.Module):
    def __init__(self, rngs):
        self.up = nnx.Linear(D, F, rngs=rngs)
        self.down = nnx.Linear(F, D, rngs=rngs)

    def __call__(self, h):
        return h + self.down(jax.nn.gelu(self.up(h)))


class NnxScanned(nnx.Module):
    def __init__(self, rngs):
        @nnx.vmap(in_axes=0, out_axes=0)
        def make(key):
            return NnxLayer(nnx.Rngs(key))

        self.layers = make(jax.random.split(rngs.params(), L))

    def __call__(self, x):
        @nnx.scan(in_axes=(nnx.Carry, 0), out_axes=nnx.Carry)
        def run(h, layer):
            return layer(h)

        return run(x, self.layers)


IDS = jnp.array([[1, 2, 3, 4, 5], [39, 0, 7, 7, 2]])

# style: (model, input, targets, the split every targeted kernel must get)
STYLES = {
    "einsum_in_first": (Dense("first"), X, r".*/(q_proj|k_proj|v_proj|o_proj|up|down)", None),
    "einsum_in_middle": (Dense("middle"), X, r".*(_einsum|/up|/down)", None),
    "out_in_transposed": (Dense("last"), X, r".*/(wq|wk|wv|wo|w1|w2)", None),
    "scan_axis_0": (Scanned(axis=0), X, r".*layers/.*/(q_proj|v_proj|o_proj|up|down)", None),
    "scan_axis_1": (Scanned(axis=1), X, r".*layers/.*/(q_proj|v_proj|o_proj|up|down)", None),
    "nnx_scan": ("nnx", X, r"layers/.*/kernel", None),
    "moe_batched_einsum": (BatchedMoe(), X, r".*/(wi|wo)", None),
    "moe_ragged_dot": (RaggedMoe(), X, r".*/(gate|up|down)", None),
    "moe_shard_map": (ShardMapMoe(), X, r".*/(wi|wo)", None),
    "tied_embedding": (Tied(), IDS, r".*/(embedding|up|down)", None),
    "reshaped_kernel": (Fused(), X, r".*/qkv", None),
}

# What the computation says, written out by hand: (in_axes, stack_axes) by kernel name.
EXPECTED = {
    "einsum_in_first": {"q_proj": ((0,), ()), "o_proj": ((0, 1), ()), "up": ((0,), ())},
    "einsum_in_middle": {"q_einsum": ((1,), ()), "attn_vec_einsum": ((0, 1), ())},
    "out_in_transposed": {"wq": ((1,), ()), "wo": ((1,), ()), "w1": ((1,), ()), "w2": ((1,), ())},
    "scan_axis_0": {"q_proj": ((1,), (0,)), "o_proj": ((1, 2), (0,)), "down": ((1,), (0,))},
    "scan_axis_1": {"q_proj": ((0,), (1,)), "o_proj": ((0, 2), (1,)), "down": ((0,), (1,))},
    "nnx_scan": {"kernel": ((1,), (0,))},
    "moe_batched_einsum": {"wi": ((1,), (0,)), "wo": ((1,), (0,))},
    "moe_ragged_dot": {"gate": ((1,), (0,)), "down": ((1,), (0,))},
    "moe_shard_map": {"wi": ((1,), (0,)), "wo": ((1,), (0,))},
    "tied_embedding": {"embedding": ((0,), ()), "up": ((0,), ())},
    "reshaped_kernel": {"qkv": ((0,), ())},
}


@functools.cache
def _model(style):
    model, x, targets, _ = STYLES[style]
    if model == "nnx":
        graphdef, state = nnx.split(NnxScanned(nnx.Rngs(0)))
        return (lambda state, x: nnx.merge(graphdef, state)(x)), state, x, targets
    return model.apply, model.init(jax.random.key(0), x), x, targets


def _config(targets):
    return jlora.LoraConfig(rank=2, alpha=4.0, targets=targets)


def _splits(cfg, params):
    return {path: (t.layout.in_axes, t.layout.stack_axes) for path, t in Plan.of_base(cfg, params).items()}


@pytest.mark.parametrize("style", sorted(STYLES))
def test_infer_layouts_reads_every_split_off_the_computation(style):
    apply_fn, params, x, targets = _model(style)
    cfg = jlora.infer_layouts(_config(targets), apply_fn, params, x)
    splits = _splits(cfg, params)
    for name, want in EXPECTED[style].items():
        hits = [split for path, split in splits.items() if path.split("/")[-1] == name or f"/{name}/" in path]
        assert hits and all(split == want for split in hits), (name, splits)
    assert jlora.LoraConfig.from_dict(cfg.to_dict()) == cfg  # an ordinary, serialisable config


@pytest.mark.standard_promotion  # optax's Adam
@pytest.mark.parametrize("style", sorted(STYLES))
def test_zero_configuration_training_on_every_style(style):
    apply_fn, params, x, targets = _model(style)
    cfg = jlora.infer_layouts(_config(targets), apply_fn, params, x)
    frozen, trainable = jlora.init(jax.random.key(1), params, cfg)
    lora = jlora.wrap(apply_fn, cfg, fallback="error")
    base = jax.jit(apply_fn)(params, x)
    np.testing.assert_allclose(lora(frozen, trainable, x), base, rtol=1e-6, atol=1e-6)  # b = 0: the base
    uses = lora.uses(frozen, trainable, x)
    assert uses and all(u.factored for u in uses), [u for u in uses if not u.factored]

    bumped = jax.tree.map(lambda v: v + 0.05 * jax.random.normal(jax.random.key(2), v.shape, v.dtype),
                          trainable)
    merged = jlora.wrap(apply_fn, cfg, strategy="merge")(frozen, bumped, x)
    factored = lora(frozen, bumped, x)
    assert float(jnp.max(jnp.abs(factored - base))) > 1e-4  # the adapter acts
    np.testing.assert_allclose(factored, merged, rtol=2e-5, atol=2e-5)

    y = jax.random.normal(jax.random.key(3), base.shape)
    tx = jlora.optimizer(cfg, 1e-2)

    @jax.jit
    def step(t, state):
        loss, grads = jax.value_and_grad(lambda t: jnp.mean((lora(frozen, t, x) - y) ** 2))(t)
        updates, state = tx.update(grads, state, t)
        return optax.apply_updates(t, updates), state, loss

    state, losses = tx.init(trainable), []
    for _ in range(3):
        trainable, state, loss = step(trainable, state)
        losses.append(float(loss))
    final = float(jnp.mean((lora(frozen, trainable, x) - y) ** 2))
    assert final < losses[0], (losses, final)


@pytest.mark.parametrize("style", sorted(STYLES))
def test_without_infer_layouts_the_default_is_right_or_one_error_lists_the_fix(style):
    """No silent swap: the default split either is the computation's, or wrap refuses with the fix."""
    apply_fn, params, x, targets = _model(style)
    default = _config(targets)
    frozen, trainable = jlora.init(jax.random.key(1), params, default)
    real = _splits(jlora.infer_layouts(default, apply_fn, params, x), params)
    try:
        jlora.wrap(apply_fn, default)(frozen, trainable, x)
    except jlora.LayoutError as e:
        wrong = {p for p, split in _splits(default, params).items() if split != real[p]}
        assert wrong, "refused although the default split is right"
        message = str(e)
        assert "jlora.infer_layouts(config, apply_fn, params" in message
        for path in wrong:  # every wrong kernel listed, each with its real split
            in_axes, stack = real[path]
            assert (f"{path}: configured" in message
                    and f"the real split is in_axes={in_axes}" in message), path
    else:
        assert _splits(default, params) == real  # it ran, so the default was the real split


def test_a_square_out_in_kernel_is_never_taken_transposed():
    """The old silent swap: a (d, d) kernel used as x @ W.T looked like a tied head."""
    params = {"wo": jax.random.normal(jax.random.key(0), (D, D))}
    apply_fn = lambda p, x: x @ p["wo"].T  # noqa: E731
    cfg = jlora.LoraConfig(rank=2, targets="wo")
    frozen, trainable = jlora.init(jax.random.key(1), params, cfg)
    with pytest.raises(jlora.LayoutError, match=r"wo: configured in_axes=\(0,\).*contracts axes \(1,\); "
                                                r"the real split is in_axes=\(1,\)"):
        jlora.wrap(apply_fn, cfg)(frozen, trainable, X)
    fixed = jlora.infer_layouts(cfg, apply_fn, params, X)
    _, trainable = jlora.init(jax.random.key(1), params, fixed)
    grads = jax.grad(lambda t: jnp.sum(jlora.wrap(apply_fn, fixed)(frozen, t, X) ** 2))(trainable)
    # b = 0 at init: the gradient reaches b (the output side), not a, as LoRA intends.
    assert float(jnp.max(jnp.abs(grads["wo"]["b"]))) > 0 and float(jnp.max(jnp.abs(grads["wo"]["a"]))) == 0


def test_one_error_lists_every_disagreeing_kernel():
    apply_fn, params, x, targets = _model("out_in_transposed")
    cfg = _config(targets)
    frozen, trainable = jlora.init(jax.random.key(1), params, cfg)
    with pytest.raises(jlora.LayoutError) as e:
        jlora.wrap(apply_fn, cfg)(frozen, trainable, x)
    assert str(e.value).startswith("the axis split of 6 adapted kernel(s) does not match")
    for name in ("wq", "wk", "wv", "wo", "w1", "w2"):
        assert f"/{name}: configured" in str(e.value), name


def test_an_expert_axis_sliced_one_at_a_time_needs_its_own_adapters():
    """A kernel of >= 3 axes whose leading axis is only indexed is a stack, never one shared adapter."""
    params = {"experts": jax.random.normal(jax.random.key(0), (E, D, F))}

    def apply_fn(p, x):
        return sum(x @ p["experts"][e] for e in range(E))

    cfg = jlora.LoraConfig(rank=2, targets=jlora.Rule(pattern="experts", in_axes=(1,)))
    frozen, trainable = jlora.init(jax.random.key(1), params, cfg)
    with pytest.raises(jlora.LayoutError, match=r"experts: configured in_axes=\(1,\).*one slice "
                                                r"of axes \(0,\) at a time; the real split is "
                                                r"in_axes=\(1,\), stack_axes=\(0,\)"):
        jlora.wrap(apply_fn, cfg)(frozen, trainable, X)
    fixed = jlora.infer_layouts(jlora.LoraConfig(rank=2, targets="experts"), apply_fn, params, X)
    assert fixed.targets[0].stack_axes == (0,) and fixed.targets[0].in_axes == (1,)


def test_uses_that_disagree_are_listed_by_infer_layouts():
    params = {"w": jax.random.normal(jax.random.key(0), (D, D))}
    apply_fn = lambda p, x: (x @ p["w"], x @ p["w"].T)  # noqa: E731  forward and transposed, no table
    with pytest.raises(ValueError, match=r"w: .*no single split fits: its uses contract different axes"):
        jlora.infer_layouts(jlora.LoraConfig(rank=2, targets="w"), apply_fn, params, X)


def test_an_explicit_rule_that_contradicts_the_computation_is_refused():
    params = {"w": jax.random.normal(jax.random.key(0), (D, F))}
    cfg = jlora.LoraConfig(rank=2, targets=jlora.Rule(pattern="w", in_axes=(1,)))
    with pytest.raises(jlora.LayoutError, match=r"w: configured in_axes=\(1,\).*the real "
                                                r"split is in_axes=\(0,\)"):
        jlora.infer_layouts(cfg, lambda p, x: x @ p["w"], params, X)


def test_infer_layouts_spends_no_flops_and_takes_shapes():
    apply_fn, params, x, targets = _model("scan_axis_1")
    shapes = jax.tree.map(lambda v: jax.ShapeDtypeStruct(v.shape, v.dtype), params)
    cfg = jlora.infer_layouts(_config(targets), apply_fn, shapes, jax.ShapeDtypeStruct(x.shape, x.dtype))
    assert cfg == jlora.infer_layouts(_config(targets), apply_fn, params, x)


def test_kernel_uses_follow_transposes_reshapes_and_scans():
    apply_fn, params, x, targets = _model("scan_axis_1")
    uses = kernel_uses(apply_fn, params, Plan.of_base(_config(targets), params), (x,), {})
    (q,) = [u for p, us in uses.items() if p.endswith("q_proj") for u in us]
    assert (q.kind, q.contracted, q.stacked, q.free) == ("dot", {0}, {1}, {2, 3})


def test_infer_layouts_refuses_what_is_not_a_config_or_a_function():
    with pytest.raises(TypeError, match=r"infer_layouts: expected a jlora.LoraConfig, got dict"):
        jlora.infer_layouts({}, lambda p: p, {})
    with pytest.raises(TypeError, match=r"infer_layouts: apply_fn must be callable, got int"):
        jlora.infer_layouts(jlora.LoraConfig(targets="w"), 3, {"w": jnp.ones((2, 2))})
