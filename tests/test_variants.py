"""The variant table: which config has which variant, and every refusal worded once."""

import re

import pytest

import jlora
from jlora._variants import OPERATIONS, VARIANTS, Variant, active, allowed, reason, refusals, refuse

CONFIGS = {
    "nonlinearity": dict(nonlinearity="gelu"),
    "DoRA": dict(dora=True),
    "DyLoRA": dict(dylora="plain"),
    "PiSSA": dict(init="pissa"),
    "rsLoRA": dict(rslora=True),
}


def _config(**kw):
    return jlora.LoraConfig(rank=2, targets="w", **kw)


TREE_VARIANTS = {"quantized base"}  # a property of the params: no config turns it on


def test_every_variant_has_a_config_that_turns_it_on_alone():
    assert set(CONFIGS) == {v.name for v in VARIANTS} - TREE_VARIANTS
    assert active(_config()) == []
    for name, kw in CONFIGS.items():
        assert [v.name for v in active(_config(**kw))] == [name]


FIX = re.compile(r"(use|set|merge|keep|exclude|serve|save|cut|export|adapt|truncate|train|initialise)\b",
                 re.IGNORECASE)


def test_tree_variants_word_their_refusals_with_a_fix():
    for variant in (v for v in VARIANTS if v.name in TREE_VARIANTS):
        assert variant.refuses and not active(_config())
        for op in variant.refuses:
            why = reason(variant.name, op)
            assert why.startswith(f"{variant.name}: ") and FIX.search(why), why


CONFIG_VARIANTS = [v for v in VARIANTS if v.name not in TREE_VARIANTS]


@pytest.mark.parametrize("variant", CONFIG_VARIANTS, ids=lambda v: v.name)
def test_each_refusal_names_the_variant_and_a_fix(variant):
    config = _config(**CONFIGS[variant.name])
    for op in OPERATIONS:
        if op in variant.refuses:
            (why,) = refusals(config, op)
            with pytest.raises(ValueError, match=rf"^verb: {re.escape(why)}$"):
                refuse(config, op, "verb")
            assert FIX.search(why), why
        else:
            assert allowed(config, op)
            refuse(config, op, "verb")  # no error


def test_several_variants_refuse_together():
    config = _config(dora=True, init="pissa")
    assert len(refusals(config, "combine")) == 2
    assert allowed(_config(dora=True, rslora=True), "merge")


def test_unknown_operations_are_errors():
    with pytest.raises(ValueError, match=r"unknown operation 'fly'"):
        refusals(_config(), "fly")
    with pytest.raises(ValueError, match=r"variant X: unknown operations \['fly'\]"):
        Variant("X", lambda c: True, {"fly": "no"})
