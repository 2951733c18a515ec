"""Leaf paths: Linen dicts, FrozenDicts and NNX state spell the same kernel alike."""

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax import nnx
from flax.core import FrozenDict

from jlora._paths import flatten, leaf_paths, nest


def test_dict_and_frozendict_paths():
    tree = {"params": {"b": {"kernel": 1}, "a": [2, 3]}}
    assert leaf_paths(tree) == ["params/a/0", "params/a/1", "params/b/kernel"]
    assert leaf_paths(FrozenDict(tree)) == leaf_paths(tree)


def test_nnx_state_drops_the_variable_value_key():
    attn = nnx.MultiHeadAttention(num_heads=2, in_features=4, decode=False, rngs=nnx.Rngs(0))
    _, state = nnx.split(attn)
    paths = leaf_paths(state)
    assert "value/kernel" in paths and "value/bias" in paths
    assert not any(p.endswith("/value") for p in paths)
    assert len(paths) == len(jax.tree_util.tree_leaves(state))


def test_nnx_and_linen_attention_paths_agree():
    linen = nn.MultiHeadDotProductAttention(num_heads=2).init(jax.random.key(0), jnp.ones((1, 3, 4)))
    _, state = nnx.split(nnx.MultiHeadAttention(num_heads=2, in_features=4, decode=False, rngs=nnx.Rngs(0)))
    linen_kernels = {p.removeprefix("params/") for p in leaf_paths(linen) if p.endswith("kernel")}
    nnx_kernels = {p for p in leaf_paths(state) if p.endswith("kernel")}
    assert linen_kernels == nnx_kernels == {"query/kernel", "key/kernel", "value/kernel", "out/kernel"}


def test_nest_inverts_flatten():
    tree = {"a": {"b": 1, "c": {"d": 2}}, "e": 3}
    assert nest(flatten(tree)) == tree
