"""Small Flax models covering every layer kind jlora rewrites."""

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax import nnx

import jlora

# Inputs and configs shared by the modules that test whole models.
TOKENS = jnp.array([[1, 2, 3, 4, 5], [39, 0, 7, 7, 2]])
ZOO_CFG = jlora.LoraConfig(rank=2, alpha=4.0, targets=r".*(kernel|embedding)")
STACK_CFG = jlora.LoraConfig(rank=2, alpha=4.0,
                             targets=jlora.Rule(pattern=r".*layers/.*kernel", stack_axes=(0,)))
NNX_CFG = jlora.LoraConfig(
    rank=2, alpha=4.0,
    targets=(jlora.Rule(pattern=r"layers/.*/kernel", stack_axes=(0,)), r"attn/.*/kernel", r"conv/kernel",
             r"embed/embedding"),
)


def bump(trainable, value=0.1):
    """Make every adapter non-zero so deltas are visible."""
    return jax.tree.map(lambda v: v + jnp.asarray(value, v.dtype), trainable)


class LinenZoo(nn.Module):
    """Embed lookup, DenseGeneral attention, Conv, Dense, and a tied Embed head."""

    @nn.compact
    def __call__(self, tokens):
        embed = nn.Embed(40, 16, name="embed")
        h = embed(tokens)
        h = h + nn.MultiHeadDotProductAttention(num_heads=2, name="attn")(h)
        h = nn.Conv(16, (3,), name="conv")(h)
        h = nn.Dense(16, name="dense")(jax.nn.gelu(h))
        return embed.attend(h)


class Block(nn.Module):
    @nn.compact
    def __call__(self, h, _):
        return nn.Dense(16, name="down")(jax.nn.gelu(nn.Dense(32, name="up")(h))) + h, None


class LinenScan(nn.Module):
    """nn.scan over nn.remat blocks: kernels stacked on axis 0."""

    @nn.compact
    def __call__(self, x):
        stack = nn.scan(nn.remat(Block), variable_axes={"params": 0}, split_rngs={"params": True}, length=3)
        h, _ = stack(name="layers")(x, None)
        return h


class NnxBlock(nnx.Module):
    def __init__(self, rngs):
        self.up = nnx.Linear(16, 32, rngs=rngs)
        self.down = nnx.Linear(32, 16, rngs=rngs)

    def __call__(self, h):
        return self.down(jax.nn.gelu(self.up(h))) + h


class NnxModel(nnx.Module):
    """NNX attention (a module named `value` inside), Conv, Embed, and a scanned, remat'd stack."""

    def __init__(self, rngs):
        self.embed = nnx.Embed(40, 16, rngs=rngs)
        self.attn = nnx.MultiHeadAttention(num_heads=2, in_features=16, decode=False, rngs=rngs)
        self.conv = nnx.Conv(16, 16, kernel_size=(3,), rngs=rngs)

        @nnx.vmap(in_axes=0, out_axes=0)
        def make(key):
            return NnxBlock(nnx.Rngs(key))

        self.layers = make(jax.random.split(rngs.params(), 3))

    def __call__(self, tokens):
        h = self.embed(tokens)
        h = h + self.attn(h)
        h = self.conv(h)

        @nnx.scan(in_axes=(nnx.Carry, 0), out_axes=nnx.Carry)
        @nnx.remat
        def run(h, layer):
            return layer(h)

        return run(h, self.layers)


def nnx_apply(model):
    graphdef, state = nnx.split(model)

    def apply(state, *args):
        return nnx.merge(graphdef, state)(*args)

    return apply, state
