"""summary: per-path rows and totals counted by hand."""

import flax.linen as nn
import jax.numpy as jnp
import pytest

import jlora


def test_table_and_totals(key):
    model = nn.Sequential([nn.Dense(32), nn.relu, nn.Dense(4)])
    params = model.init(key, jnp.ones((1, 16)))
    cfg = jlora.LoraConfig(rank=4, targets=r"params/layers_0/kernel", train_in_full=r"params/layers_2/.*")
    frozen, trainable = jlora.init(key, params, cfg)
    text = jlora.summary(frozen, trainable)
    lines = text.splitlines()
    assert lines[0].split() == ["path", "kind", "shape", "rank", "parameters"]
    assert lines[2].split() == ["params/layers_0/kernel", "lora", "(16,", "32)", "4", "192"]
    assert lines[3].split() == ["params/layers_2/bias", "full", "(4,)", "-", "4"]
    assert lines[4].split() == ["params/layers_2/kernel", "full", "(32,", "4)", "-", "128"]
    base = 16 * 32 + 32 + 32 * 4 + 4  # 676
    lora = 16 * 4 + 4 * 32  # 192
    trained = lora + 4 + 128
    total = base + lora
    assert lines[-1] == (f"Total parameters: {total:,}, thereof trainable: {trained:,} "
                         f"({100 * trained / total:.2f}%)")


def test_stacked_adapters_count_every_layer(key):
    params = {"layers": {"kernel": jnp.zeros((3, 8, 8))}}
    cfg = jlora.LoraConfig(rank=2, targets=jlora.Rule(pattern="layers/kernel", stack_axes=(0,)))
    text = jlora.summary(*jlora.init(key, params, cfg))
    assert "layers/kernel  lora  (3, 8, 8)     2          96" in text
    assert text.endswith("Total parameters: 288, thereof trainable: 96 (33.33%)")


def test_with_the_config_the_rows_come_from_the_plan(key):
    model = nn.Sequential([nn.Dense(32), nn.relu, nn.Dense(4)])
    params = model.init(key, jnp.ones((1, 16)))
    cfg = jlora.LoraConfig(rank=4, targets=r"params/layers_0/kernel", train_in_full=r"params/layers_2/.*",
                           dora=True)
    frozen, trainable = jlora.init(key, params, cfg)
    assert jlora.summary(frozen, trainable, cfg) == jlora.summary(frozen, trainable)
    assert "params/layers_0/kernel  lora  (16, 32)     4         224" in jlora.summary(frozen, trainable, cfg)
    other = jlora.LoraConfig(rank=2, targets=r"params/layers_0/kernel", train_in_full=r"params/layers_2/.*")
    with pytest.raises(ValueError, match=r"params/layers_0/kernel/a has shape \(16, 4\), expected \(16, 2\)"):
        jlora.summary(frozen, trainable, other)
