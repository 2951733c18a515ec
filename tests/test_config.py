"""LoraConfig and Rule: defaults, scales, and every validation error."""

import math

import pytest

import jlora


def test_defaults_and_scale():
    cfg = jlora.LoraConfig(targets=".*/kernel")
    assert (cfg.rank, cfg.alpha, cfg.init, cfg.dtype, cfg.rslora) == (
        8, 8.0, "kaiming_uniform", "float32", False)
    assert cfg.targets == (jlora.Rule(pattern=".*/kernel"),)
    assert cfg.scale_for(cfg.targets[0]) == 1.0


def test_rslora_scale_is_alpha_over_sqrt_rank():
    cfg = jlora.LoraConfig(rank=16, alpha=8.0, rslora=True, targets=".*")
    assert cfg.scale_for(cfg.targets[0]) == pytest.approx(8.0 / math.sqrt(16))


def test_rule_overrides_rank_and_alpha():
    cfg = jlora.LoraConfig(rank=8, alpha=16.0, targets=(jlora.Rule(pattern="a", rank=2, alpha=1.0), "b"))
    a, b = cfg.targets
    assert (cfg.rank_for(a), cfg.scale_for(a)) == (2, 0.5)
    assert (cfg.rank_for(b), cfg.scale_for(b)) == (8, 2.0)


def test_config_is_frozen_and_keyword_only():
    cfg = jlora.LoraConfig(targets="x")
    with pytest.raises(AttributeError):
        cfg.rank = 4
    with pytest.raises(TypeError):
        jlora.LoraConfig(8, 8.0, "x")


def test_dtype_is_normalised():
    import jax.numpy as jnp

    assert jlora.LoraConfig(targets="x", dtype=jnp.bfloat16).dtype == "bfloat16"


@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        ({"rank": 0}, ValueError, r"rank must be > 0, got 0"),
        ({"rank": -3}, ValueError, r"rank must be > 0, got -3"),
        ({"rank": 2.5}, TypeError, r"rank must be an int, got 2.5"),
        ({"alpha": 0.0}, ValueError, r"alpha must be a finite number > 0, got 0.0.*lora_scale=0"),
        ({"alpha": float("nan")}, ValueError, r"alpha must be a finite number > 0"),
        ({"alpha": "16"}, TypeError, r"alpha must be a number, got '16'"),
        ({"init": "xavier"}, ValueError, r"unknown init scheme 'xavier'.*kaiming_uniform.*gaussian"),
        ({"dtype": "int8"}, ValueError, r"adapter dtype must be floating, got int8"),
        ({"dtype": "nope"}, TypeError, r"dtype 'nope' is not a dtype"),
        ({"targets": "("}, ValueError, r"pattern '\(' is not a valid regex"),
        ({"targets": [3]}, TypeError, r"each target must be a regex string or a jlora.Rule, got 3"),
        ({"targets": ()}, ValueError, r"nothing to train; set targets"),
        ({"rslora": 1}, TypeError, r"rslora must be a bool"),
        ({"train_in_full": "["}, ValueError, r"train_in_full: pattern '\[' is not a valid regex"),
        ({"dropout": 1.0}, ValueError, r"dropout must be a rate in \[0, 1\), got 1.0"),
        ({"nonlinearity": "swish"}, ValueError, r"unknown nonlinearity 'swish'; choose one of \('identity'"),
        ({"dylora": "on"}, ValueError,
         r"unknown dylora mode 'on'; choose None or one of \('frozen', 'plain'\)"),
        ({"dora": 1}, TypeError, r"dora must be a bool"),
        ({"dora": True, "nonlinearity": "relu"}, ValueError, r"dora=True needs the merged weight"),
        ({"init": "pissa", "dylora": "plain"}, ValueError, r"init='pissa' .* cannot be combined"),
    ],
)
def test_config_errors(kwargs, error, message):
    kwargs = {"targets": ".*/kernel", **kwargs}
    with pytest.raises(error, match=message):
        jlora.LoraConfig(**kwargs)


@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        ({"rank": 0}, ValueError, r"Rule\('k'\): rank must be > 0"),
        ({"alpha": -1.0}, ValueError, r"Rule\('k'\): alpha must be a finite number > 0"),
        ({"in_axes": (0, 0)}, ValueError, r"in_axes=\(0, 0\) repeats an axis"),
        ({"in_axes": (-1,)}, TypeError, r"in_axes must be a tuple of non-negative axis numbers"),
        ({"in_axes": (0,), "stack_axes": (0,)}, ValueError, r"both in in_axes and stack_axes"),
        ({"stack_axes": None}, TypeError,
         r"stack_axes must be a tuple of axis numbers \(\(\) for none\), got None"),
    ],
)
def test_rule_errors(kwargs, error, message):
    with pytest.raises(error, match=message):
        jlora.Rule(pattern="k", **kwargs)


def test_rule_accepts_a_single_axis():
    assert jlora.Rule(pattern="k", in_axes=1, stack_axes=0).in_axes == (1,)


def test_rules_is_a_deprecated_alias_of_targets():
    cfg = jlora.LoraConfig(rank=2, targets=(".*/a", jlora.Rule(pattern=".*/b", rank=1)))
    with pytest.warns(DeprecationWarning, match=r"LoraConfig\.rules is deprecated; read LoraConfig\.targets"):
        assert cfg.rules == cfg.targets == (jlora.Rule(pattern=".*/a"), jlora.Rule(pattern=".*/b", rank=1))
