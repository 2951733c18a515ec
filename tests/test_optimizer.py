"""optimizer: LoRA+ ratios per group, schedules, auto ratios, no state for frozen leaves."""

import dataclasses
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jlora
from jlora._optimizer import auto_ratio, labels


class Net(nn.Module):
    @nn.compact
    def __call__(self, tokens):
        h = nn.Embed(50, 16, name="embed")(tokens)
        h = nn.Dense(64, name="up")(h)
        h = nn.Dense(16, name="down")(jax.nn.relu(h))
        return nn.Dense(3, name="head")(h.mean(1))


TOKENS = jnp.array([[1, 2, 3], [4, 5, 6]])
CFG = jlora.LoraConfig(rank=4, targets=(r".*/(up|down)/kernel", r".*/embedding"), train_in_full=r".*/head/.*")


def _setup():
    params = Net().init(jax.random.key(0), TOKENS)
    return jlora.init(jax.random.key(1), params, CFG)


def _ones(tree):
    return jax.tree.map(jnp.ones_like, tree)


def test_labels_follow_the_tree():
    _, trainable = _setup()
    lab = labels(trainable, CFG)["params"]
    assert lab["up"]["kernel"] == {"a": "a", "b": "b"}
    assert lab["embed"]["embedding"] == {"a": "embedding", "b": "embedding"}
    assert lab["head"] == {"bias": "full", "kernel": "full"}


@pytest.mark.parametrize("ratio", [1.0, 16.0, 2.5])
def test_sgd_b_update_is_ratio_times_a_update(ratio):
    _, trainable = _setup()
    tx = jlora.optimizer(CFG, 0.01, lr_ratio=ratio, embedding_lr=0.003, full_lr=0.5, base=optax.sgd)
    updates, _ = jax.jit(tx.update)(_ones(trainable), tx.init(trainable), trainable)
    u = updates["params"]
    for name in ("up", "down"):
        np.testing.assert_allclose(u[name]["kernel"]["a"], -0.01, rtol=1e-6)
        np.testing.assert_allclose(u[name]["kernel"]["b"], -0.01 * ratio, rtol=1e-6)
    np.testing.assert_allclose(u["embed"]["embedding"]["a"], -0.003, rtol=1e-6)
    np.testing.assert_allclose(u["embed"]["embedding"]["b"], -0.003, rtol=1e-6)
    np.testing.assert_allclose(u["head"]["kernel"], -0.5, rtol=1e-6)


def test_schedule_learning_rate():
    _, trainable = _setup()
    schedule = optax.linear_schedule(0.1, 0.0, 10)
    tx = jlora.optimizer(CFG, schedule, lr_ratio=4.0, base=optax.sgd)
    state = tx.init(trainable)
    step = jax.jit(tx.update)
    for k in range(3):
        updates, state = step(_ones(trainable), state, trainable)
        # optax schedules count the updates already applied
        want = schedule(k)
        np.testing.assert_allclose(updates["params"]["up"]["kernel"]["a"], -want, rtol=1e-5)
        np.testing.assert_allclose(updates["params"]["up"]["kernel"]["b"], -4 * want, rtol=1e-5)


def test_auto_ratio_per_adapter():
    _, trainable = _setup()
    tx = jlora.optimizer(CFG, 0.01, lr_ratio="auto", base=optax.sgd)
    updates, _ = tx.update(_ones(trainable), tx.init(trainable), trainable)
    u = updates["params"]
    up, down = auto_ratio(16, 64, 4), auto_ratio(64, 16, 4)
    assert (up, down) == (1.0, min(4 * math.sqrt(16), 64.0))  # (16/64)·sqrt(4) = 0.5 clipped to 1; 4·4 = 16
    np.testing.assert_allclose(u["up"]["kernel"]["b"], -0.01 * up, rtol=1e-6)
    np.testing.assert_allclose(u["down"]["kernel"]["b"], -0.01 * down, rtol=1e-6)
    np.testing.assert_allclose(u["down"]["kernel"]["a"], -0.01, rtol=1e-6)
    np.testing.assert_allclose(u["embed"]["embedding"]["b"], -0.01, rtol=1e-6)


def test_auto_ratio_of_stacked_adapters_ignores_the_layer_axis():
    cfg = jlora.LoraConfig(rank=2, targets=jlora.Rule(pattern="w", stack_axes=(0,)))
    _, trainable = jlora.init(jax.random.key(0), {"w": jnp.ones((3, 32, 8))}, cfg)
    tx = jlora.optimizer(cfg, 1.0, lr_ratio="auto", base=optax.sgd)
    updates, _ = tx.update(_ones(trainable), tx.init(trainable), trainable)
    np.testing.assert_allclose(updates["w"]["b"], -auto_ratio(32, 8, 2), rtol=1e-6)


@pytest.mark.standard_promotion
def test_frozen_leaves_hold_no_state_and_adam_state_is_two_moments():
    frozen, trainable = _setup()
    state = jlora.optimizer(CFG, 1e-3).init(trainable)
    n_trainable = sum(x.size for x in jax.tree.leaves(trainable))
    n_state = sum(x.size for x in jax.tree.leaves(state) if x.ndim > 0)
    assert n_state == 2 * n_trainable
    assert n_trainable < sum(x.size for x in jax.tree.leaves(frozen))


@pytest.mark.standard_promotion
def test_adamw_weight_decay_scales_with_the_group_rate():
    _, trainable = _setup()
    trainable = jax.tree.map(lambda v: jnp.full_like(v, 2.0), trainable)
    tx = jlora.optimizer(CFG, 0.1, lr_ratio=4.0, weight_decay=0.01)
    zeros = jax.tree.map(jnp.zeros_like, trainable)
    updates, _ = tx.update(zeros, tx.init(trainable), trainable)
    np.testing.assert_allclose(updates["params"]["up"]["kernel"]["a"], -0.1 * 0.01 * 2.0, rtol=1e-5)
    np.testing.assert_allclose(updates["params"]["up"]["kernel"]["b"], -0.4 * 0.01 * 2.0, rtol=1e-5)


@pytest.mark.standard_promotion
def test_training_with_wrap_lowers_the_loss():
    frozen, trainable = _setup()
    lora_apply = jlora.wrap(Net().apply, CFG)
    labels_ = jnp.array([0, 2])
    tx = jlora.optimizer(CFG, 3e-2)

    def loss_fn(t):
        return optax.softmax_cross_entropy_with_integer_labels(lora_apply(frozen, t, TOKENS), labels_).mean()

    @jax.jit
    def step(t, s):
        loss, g = jax.value_and_grad(loss_fn)(t)
        u, s = tx.update(g, s, t)
        return optax.apply_updates(t, u), s, loss

    state = tx.init(trainable)
    first = None
    for _ in range(20):
        trainable, state, loss = step(trainable, state)
        first = loss if first is None else first
    assert float(loss) < 0.5 * float(first)


@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        ({"lr_ratio": 0.0}, ValueError, r"lr_ratio must be a finite number > 0 or 'auto', got 0.0"),
        ({"lr_ratio": "fast"}, ValueError, r"lr_ratio must be .* got 'fast'"),
        ({"learning_rate": -1.0}, ValueError,
         r"learning_rate must be a finite number >= 0 or an optax schedule"),
        ({"full_lr": float("inf")}, ValueError, r"full_lr must be a finite number"),
        ({"base": "adam"}, TypeError, r"base must be an optax optimizer factory"),
    ],
)
def test_errors(kwargs, error, message):
    kwargs = {"learning_rate": 1e-3, **kwargs}
    with pytest.raises(error, match=message):
        jlora.optimizer(CFG, **kwargs)


def test_auto_needs_the_config_that_made_trainable():
    _, trainable = _setup()
    other = jlora.LoraConfig(rank=4, targets=r".*/up/kernel")
    with pytest.raises(ValueError, match=r"optimizer: .*\n  trainable holds an adapter at "
                                         r"params/down/kernel, but no rule of the config matches"):
        jlora.optimizer(other, 1e-3, lr_ratio="auto").init(trainable)
    with pytest.raises(TypeError, match=r"expected a jlora.LoraConfig"):
        jlora.optimizer({}, 1e-3)


# ----------------------------------------------------------- a bank trained together

NAMES = ("fr", "de", "es")
ONE_CFG = jlora.LoraConfig(rank=4, alpha=8.0, targets=(r".*/(up|down)/kernel", r".*/embedding",
                                                      jlora.Rule(pattern=r".*/head/kernel", rank=3)))
BANK_CFG = dataclasses.replace(ONE_CFG, adapters=NAMES)
BATCH = jax.random.randint(jax.random.key(5), (9, 3), 0, 50)
LABELS = jax.random.randint(jax.random.key(6), (9,), 0, 3)
INDEX = jnp.array([0, 1, 2, 2, 0, 1, 0, 0, 1])
RATES = {"fr": 1e-2, "de": 3e-2, "es": optax.linear_schedule(2e-2, 0.0, 10)}
RATIOS = {"fr": 1.0, "de": 4.0, "es": 16.0}


def _bank_step(tx, lora_apply, frozen):
    def loss(bank, index):
        per_example = optax.softmax_cross_entropy_with_integer_labels(
            lora_apply(frozen, bank, BATCH, lora_index=index), LABELS)
        onehot = (index[:, None] == jnp.arange(len(NAMES))[None, :]).astype(per_example.dtype)
        return (onehot.T @ per_example / jnp.maximum(onehot.sum(0), 1)).sum()  # each adapter's mean loss

    @jax.jit
    def step(bank, state, index):
        updates, state = tx.update(jax.grad(loss)(bank, index), state, bank, lora_index=index)
        return optax.apply_updates(bank, updates), state

    return step


def _alone(frozen, adapter, rate, ratio, examples, steps):
    """One adapter trained alone on its own examples of the batch (the reference)."""
    tx = jlora.optimizer(ONE_CFG, rate, lr_ratio=ratio, max_grad_norm=0.5)
    lora_apply = jlora.wrap(Net().apply, ONE_CFG)

    def loss(t):
        logits = lora_apply(frozen, t, BATCH[examples])
        return optax.softmax_cross_entropy_with_integer_labels(logits, LABELS[examples]).mean()

    @jax.jit
    def step(adapter, state):
        updates, state = tx.update(jax.grad(loss)(adapter), state, adapter)
        return optax.apply_updates(adapter, updates), state

    state = tx.init(adapter)
    for _ in range(steps):
        adapter, state = step(adapter, state)
    return adapter


@pytest.mark.standard_promotion  # optax's Adam
def test_a_bank_trained_together_equals_each_adapter_trained_alone():
    params = Net().init(jax.random.key(0), TOKENS)
    frozen, bank = jlora.init(jax.random.key(1), params, BANK_CFG)
    tx = jlora.optimizer(BANK_CFG, RATES, lr_ratio=RATIOS, max_grad_norm=0.5)
    step = _bank_step(tx, jlora.wrap(Net().apply, BANK_CFG), frozen)
    state, trained = tx.init(bank), bank
    for _ in range(4):
        trained, state = step(trained, state, INDEX)
    for k, name in enumerate(NAMES):
        start, _ = jlora.unstack(bank, BANK_CFG, name)
        want = _alone(frozen, start, RATES[name], RATIOS[name], np.flatnonzero(INDEX == k), 4)
        got, _ = jlora.unstack(trained, BANK_CFG, name)
        moved = max(float(jnp.abs(w - s).max()) for w, s in zip(jax.tree.leaves(want), jax.tree.leaves(start),
                                                                  strict=True))
        assert moved > 1e-3  # every adapter learned something
        jax.tree.map(lambda g, w: np.testing.assert_allclose(g, w, rtol=2e-5, atol=2e-6), got, want)


@pytest.mark.standard_promotion  # optax's Adam
def test_an_adapter_without_examples_in_the_batch_is_left_as_it_was():
    params = Net().init(jax.random.key(0), TOKENS)
    frozen, bank = jlora.init(jax.random.key(1), params, BANK_CFG)
    tx = jlora.optimizer(BANK_CFG, 1e-2)
    step = _bank_step(tx, jlora.wrap(Net().apply, BANK_CFG), frozen)
    state0 = tx.init(bank)
    trained, state = step(bank, state0, jnp.array([0, 0, 2, 2, 0, -1, 0, 0, 2]))  # "de" has no example
    for new, old in zip(jax.tree.leaves((trained, state)), jax.tree.leaves((bank, state0)), strict=True):
        np.testing.assert_array_equal(new[1], old[1])  # params, both moments and the step count
    assert float(jnp.abs(trained["params"]["up"]["kernel"]["b"][0]).max()) > 0
    counts = [x for x in jax.tree.leaves(state) if x.dtype == jnp.int32]
    assert counts and all(c.tolist() == [1, 0, 1] for c in counts)
    grads = jax.tree.map(jnp.ones_like, bank)
    by_name = tx.update(grads, state0, bank, lora_index=["fr", "es", None])
    by_slot = tx.update(grads, state0, bank, lora_index=jnp.array([0, 2, -1]))
    jax.tree.map(np.testing.assert_array_equal, by_name, by_slot)
    with pytest.raises(ValueError, match=r"optimizer: lora_index: no adapter named 'it' in this bank; its "
                                         r"names are \['fr', 'de', 'es'\]"):
        tx.update(grads, state0, bank, lora_index=["it"])


def test_bank_optimizer_state_leads_with_the_adapters_and_auto_ratios_apply_per_slot():
    params = Net().init(jax.random.key(0), TOKENS)
    _, bank = jlora.init(jax.random.key(1), params, BANK_CFG)
    tx = jlora.optimizer(BANK_CFG, 0.1, lr_ratio="auto", base=optax.sgd)
    state = tx.init(bank)
    assert {x.shape[0] for x in jax.tree.leaves(state)} == {3}
    updates, _ = tx.update(_ones(bank), state, bank)
    one = jlora.optimizer(ONE_CFG, 0.1, lr_ratio="auto", base=optax.sgd)
    slot = jax.tree.map(lambda x: x[1], bank)
    want, _ = one.update(_ones(slot), one.init(slot), slot)
    jax.tree.map(lambda u, w: np.testing.assert_allclose(u[1], w, rtol=1e-6), updates, want)


def test_max_grad_norm_clips_one_adapter_to_that_norm():
    _, trainable = _setup()
    tx = jlora.optimizer(CFG, 1.0, lr_ratio=1.0, base=optax.sgd, max_grad_norm=0.5)
    grads = jax.tree.map(lambda x: 3.0 * jnp.ones_like(x), trainable)
    updates, _ = tx.update(grads, tx.init(trainable), trainable)
    norm = math.sqrt(sum(float(jnp.sum(u * u)) for u in jax.tree.leaves(updates)))
    np.testing.assert_allclose(norm, 0.5, rtol=1e-5)


@pytest.mark.parametrize(
    ("config", "kwargs", "error", "message"),
    [
        (CFG, {"learning_rate": {"fr": 1e-3}}, TypeError,
         r"optimizer: learning_rate is a dict \['fr'\], but the config is one adapter, not a bank"),
        (BANK_CFG, {"learning_rate": {"fr": 1e-3, "it": 1e-3}}, ValueError,
         r"learning_rate gives \['fr', 'it'\], but the bank's adapters are \['fr', 'de', 'es'\] "
         r"\(missing \['de', 'es'\], unknown \['it'\]\)"),
        (BANK_CFG, {"lr_ratio": {"fr": 4.0, "de": "auto", "es": 1.0}}, ValueError,
         r"lr_ratio='auto' for some adapters of a bank and a number for others"),
        (BANK_CFG, {"lr_ratio": {"fr": 4.0, "de": -1.0, "es": 1.0}}, ValueError,
         r"lr_ratio must be a finite number > 0 or 'auto', got -1.0"),
        (BANK_CFG, {"embedding_lr": {"fr": 1.0, "de": float("nan"), "es": 1.0}}, ValueError,
         r"embedding_lr must be a finite number >= 0"),
        (CFG, {"max_grad_norm": 0.0}, ValueError,
         r"max_grad_norm must be a finite number > 0 or None, got 0.0"),
    ],
)
def test_per_adapter_errors(config, kwargs, error, message):
    with pytest.raises(error, match=message):
        jlora.optimizer(config, **{"learning_rate": 1e-3, **kwargs})


def test_a_bank_optimizer_refuses_a_tree_that_is_not_its_bank():
    _, one = _setup()
    tx = jlora.optimizer(BANK_CFG, 1e-3)
    with pytest.raises(ValueError, match=r"the config names a bank of 3 adapters, so every leaf must lead "
                                         r"with 3 slots; got leading sizes"):
        tx.init(one)
    params = Net().init(jax.random.key(0), TOKENS)
    _, bank = jlora.init(jax.random.key(1), params, BANK_CFG)
    with pytest.raises(ValueError, match=r"lora_index must be the batch's integer adapter indices, shape "
                                         r"\(batch,\), got shape \(9, 1\)"):
        tx.update(_ones(bank), tx.init(bank), bank, lora_index=INDEX[:, None])


def test_put_into_a_bank_of_its_own_scale_serves_the_adapter_as_trained():
    params = Net().init(jax.random.key(0), TOKENS)
    frozen, bank = jlora.init(jax.random.key(1), params, BANK_CFG)  # scale alpha/r = 2, kept in the config
    _, trained = jlora.init(jax.random.key(2), params, ONE_CFG)
    trained = jax.tree.map(lambda x: x + 0.05, trained)
    swapped = jlora.put(bank, BANK_CFG, "de", trained, ONE_CFG)
    got = jlora.wrap(Net().apply, BANK_CFG)(frozen, swapped, TOKENS, lora_index=["de", "de"])
    np.testing.assert_allclose(got, jlora.wrap(Net().apply, ONE_CFG)(frozen, trained, TOKENS), rtol=1e-5,
                               atol=1e-6)
