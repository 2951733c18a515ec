"""The plan: which leaves are adapted, trained in full or frozen — and every error at once."""

import re

import jax
import jax.numpy as jnp
import pytest

import jlora
from jlora._layout import Layout
from jlora._plan import Plan

PARAMS = {
    "params": {
        "encoder": {
            "query": {"kernel": jnp.ones((8, 2, 4)), "bias": jnp.ones((2, 4))},
            "out": {"kernel": jnp.ones((2, 4, 8)), "bias": jnp.ones(8)},
        },
        "head": {"kernel": jnp.ones((8, 3)), "bias": jnp.ones(3)},
        "step": jnp.array(3),
    }
}


def test_first_rule_wins_and_full_training():
    cfg = jlora.LoraConfig(
        rank=2,
        targets=(jlora.Rule(pattern=".*/query/kernel", rank=1), ".*/kernel"),
        train_in_full=r"params/head/bias",
    )
    t = Plan.of_base(cfg, PARAMS)
    assert set(t) == {"params/encoder/query/kernel", "params/encoder/out/kernel", "params/head/kernel",
                      "params/head/bias"}
    assert t["params/encoder/query/kernel"].rank == 1
    assert t["params/encoder/query/kernel"].layout == Layout((0,), (1, 2))
    assert t["params/encoder/out/kernel"].layout == Layout((0, 1), (2,))
    assert not t["params/head/bias"].adapted


def test_fullmatch_not_search():
    cfg = jlora.LoraConfig(rank=2, targets="kernel")
    with pytest.raises(ValueError, match=r"'kernel' matched no parameter"):
        Plan.of_base(cfg, PARAMS)


def test_unmatched_rule_shows_close_paths():
    cfg = jlora.LoraConfig(rank=2, targets=r"params/encoder/qurey/kernel")
    with pytest.raises(ValueError, match=r"matched no parameter\. Paths that look close: "
                                         r"params/encoder/query/kernel"):
        Plan.of_base(cfg, PARAMS)


@pytest.mark.parametrize(
    ("cfg", "message"),
    [
        (dict(targets=r".*/bias"),
         r"rule '\.\*/bias' matched params/encoder/out/bias \(shape \(8,\)\): LoRA cannot adapt a leaf "
         r"with fewer than 2 axes"),
        (dict(targets=r"params/step"), r"matched params/step .*dtype int32.*floating-point kernels only"),
        (dict(rank=4, targets=r"params/head/kernel"),
         r"params/head/kernel \(shape \(8, 3\)\): rank 4 exceeds min\(fan_in=8, fan_out=3\); use rank <= 3"),
        (dict(targets=r".*/kernel", train_in_full=r"params/head/kernel"),
         r"params/head/kernel is both adapted .* and trained in full"),
        (dict(targets=r"params/head/kernel", train_in_full="nothing"),
         r"train_in_full pattern 'nothing' matched no parameter"),
        (dict(targets=jlora.Rule(pattern="params/head/kernel", in_axes=(0, 1))),
         r"leave no input or no output axis"),
        (dict(targets=jlora.Rule(pattern="params/head/kernel", stack_axes=(2,))),
         r"do not exist on a 2-D leaf"),
    ],
)
def test_resolve_errors(cfg, message):
    cfg = jlora.LoraConfig(**{"rank": 2, **cfg})
    with pytest.raises(ValueError, match=message):
        Plan.of_base(cfg, PARAMS)


def test_every_error_is_reported_at_once():
    cfg = jlora.LoraConfig(rank=2, targets=(r".*/bias", r"nope"))
    with pytest.raises(ValueError) as info:
        Plan.of_base(cfg, PARAMS)
    msg = str(info.value)
    assert msg.count("fewer than 2 axes") == 2 and "nope" in msg  # two 1-D biases (query's is 2-D)


def test_check_trainable_lists_every_bad_path():
    cfg = jlora.LoraConfig(rank=2, targets=r".*/out/kernel", train_in_full="params/head/bias")
    targets = Plan.of_base(cfg, PARAMS)
    bad = {"params": {"encoder": {"out": {"kernel": {"a": jnp.ones((2, 4, 3))}}}, "extra": jnp.ones(2),
                      "head": {"bias": jnp.ones(4)}}}
    with pytest.raises(ValueError) as info:
        targets.read(bad)
    msg = str(info.value)
    assert "params/encoder/out/kernel/a has shape (2, 4, 3), expected (2, 4, 2)" in msg
    assert "missing params/encoder/out/kernel/b (expected shape (2, 8))" in msg
    assert "unexpected params/extra (shape (2,))" in msg
    assert "params/head/bias has shape (4,), expected (3,)" in msg
    assert "jlora.init(key, params, config)" in msg


def test_resolve_rejects_a_non_config():
    with pytest.raises(TypeError, match=r"expected a jlora.LoraConfig, got dict"):
        Plan.of_base({"rank": 2}, PARAMS)


def test_of_trainable_rebuilds_kernel_shapes_from_the_factors():
    params = {"layers": {"kernel": jnp.zeros((3, 8, 2, 4))},
              "attn": {"query": {"kernel": jnp.zeros((8, 2, 4))}}, "head": {"bias": jnp.zeros(5)}}
    cfg = jlora.LoraConfig(rank=2, targets=(jlora.Rule(pattern="layers/kernel", stack_axes=(0,)),
                                            "attn/query/kernel"),
                           train_in_full="head/bias")
    trainable = jlora.init(jax.random.key(0), params, cfg)[1]
    plan = Plan.of_trainable(cfg, trainable, "test")
    assert plan.targets == Plan.of_base(cfg, params).targets
    assert {p: t.shape for p, t in plan.items()} == {
        "layers/kernel": (3, 8, 2, 4), "attn/query/kernel": (8, 2, 4), "head/bias": (5,)}


def test_of_trainable_names_every_adapter_without_a_fitting_rule():
    params = {"layers": {"kernel": jnp.zeros((3, 8, 2, 4))},
              "attn": {"query": {"kernel": jnp.zeros((8, 2, 4))}}}
    cfg = jlora.LoraConfig(rank=2, targets=(jlora.Rule(pattern="layers/kernel", stack_axes=(0,)),
                                            "attn/query/kernel"))
    trainable = jlora.init(jax.random.key(0), params, cfg)[1]
    other = jlora.LoraConfig(rank=2, targets=(jlora.Rule(pattern="layers/kernel", stack_axes=(0, 1, 2)),))
    with pytest.raises(ValueError) as info:
        Plan.of_trainable(other, trainable, "who")
    msg = str(info.value)
    assert msg.startswith("who: trainable does not fit config:")
    assert re.search(r"layers/kernel: a \(3, 8, 2, 2\) and b \(3, 2, 4\) do not form an adapter for rule "
                     r"'layers/kernel' \(stack_axes=\(0, 1, 2\)", msg)
    assert re.search(r"adapter at attn/query/kernel, but no rule of the config matches that path", msg)


def test_roles_follow_the_trainable_leaf_order():
    cfg = jlora.LoraConfig(rank=2, targets=r".*/out/kernel", train_in_full="params/head/bias", dora=True)
    plan = Plan.of_base(cfg, PARAMS)
    _, trainable = jlora.init(jax.random.key(0), PARAMS, cfg)
    roles = [(t.path, f) for t, f in plan.roles(trainable)]
    assert roles == [("params/encoder/out/kernel", "a"), ("params/encoder/out/kernel", "b"),
                     ("params/encoder/out/kernel", "m"), ("params/head/bias", None)]


def test_a_bank_given_where_one_adapter_is_expected_says_how_to_take_one_out():
    params = {"w": jnp.ones((8, 4))}
    cfg = jlora.LoraConfig(rank=2, targets="w", adapters=("fr", "de"))
    frozen, bank = jlora.init(jax.random.key(0), params, cfg)
    hint = (r"w/a has shape \(2, 8, 2\), expected \(8, 2\)[\s\S]*This config names a bank of 2 adapters "
            r"\['fr', 'de'\], whose leaves lead with one slot per adapter: serve it with lora_index= or "
            r"lora_weights=, or take one adapter out with jlora.unstack\(bank, config, name\)")
    with pytest.raises(ValueError, match=hint):
        jlora.merge(frozen, bank, cfg)
    with pytest.raises(ValueError, match=r"export_peft: trainable does not fit config:[\s\S]*This config "
                                         r"names a bank of 2 adapters"):
        jlora.export_peft("/nonexistent/never-written", bank, cfg)
