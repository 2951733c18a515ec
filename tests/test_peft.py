"""PEFT exchange: real PEFT's files and outputs, exact round trips, and every refusal.

The fixtures under ``fixtures/peft/`` were written by real PyTorch + PEFT
(``fixtures/make_peft_fixtures.py``); these tests read them without torch. Only the
``test_live_*`` tests need torch and peft (they skip without them) and load jlora's
export into real PEFT in-process.
"""

import functools
import json
import os
import pathlib
import re
import shutil
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from jax import lax
from models import LinenScan, LinenZoo, NnxModel, bump, nnx_apply
from safetensors.numpy import load_file, save_file

import jlora
from jlora._paths import flatten, leaf_paths, nest
from jlora._peft import _pattern_value, default_module_name, export_peft, import_peft
from jlora._plan import Plan

FIXTURES = pathlib.Path(__file__).parent / "fixtures" / "peft"
sys.path.insert(0, str(pathlib.Path(__file__).parent.parent / "examples"))
import minilm  # noqa: E402

BERT = minilm.BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                         intermediate_size=32, max_position_embeddings=16)
CONV = r".*/conv\d?/kernel"  # the conv kernels of TinyConv and LinenZoo


class BertClassifier(nn.Module):
    """Hugging Face's BertForSequenceClassification: BERT, tanh pooler on [CLS], a Linear head."""

    @nn.compact
    def __call__(self, input_ids, attention_mask):
        hidden, pooled = minilm.BertModel(BERT, name="bert")(input_ids, attention_mask)
        return nn.Dense(3, name="classifier")(pooled), hidden


class TinyConv(nn.Module):
    """The fixture script's TinyConv (NCHW in, like torch)."""

    @nn.compact
    def __call__(self, x):
        h = nn.Conv(6, (3, 3), padding=1, name="conv1")(jnp.transpose(x, (0, 2, 3, 1)))
        h = nn.Conv(5, (3, 3), strides=2, padding="VALID", name="conv2")(jax.nn.relu(h))
        return nn.Dense(4, name="head")(h.mean(axis=(1, 2)))


def torch_to_flax(state: dict) -> dict:
    """A torch state dict as Linen params: Linear (out, in) -> (in, out),
    conv (out, in, *k) -> (*k, in, out)."""
    flat = {}
    for key, value in state.items():
        *module, name = key.split(".")
        if name == "weight" and module[-1] == "LayerNorm":
            name = "scale"
        elif name == "weight" and module[-1].endswith("embeddings"):
            name = "embedding"
        elif name == "weight":
            name, value = "kernel", np.transpose(value, (*range(2, value.ndim), 1, 0))
        flat["/".join(["params", *module, name])] = jnp.asarray(value)
    return nest(flat)


GPT2 = dict(vocab=50, positions=16, d=16, layers=2, heads=2)  # the fixture script's GPT2Config


class Conv1D(nn.Module):
    """Hugging Face's FlaxConv1D: a kernel ``(out, in)`` (torch Conv1D's ``(in, out)`` weight, transposed),
    used transposed."""

    features: int

    @nn.compact
    def __call__(self, x):
        kernel = self.param("kernel", nn.initializers.normal(0.02), (self.features, x.shape[-1]))
        bias = self.param("bias", nn.initializers.zeros, (self.features,))
        y = lax.dot_general(x, kernel, (((x.ndim - 1,), (1,)), ((), ())))
        return y + bias.reshape((1,) * (y.ndim - 1) + (-1,))


class GPT2Attention(nn.Module):
    @nn.compact
    def __call__(self, x):
        b, t, d = x.shape
        heads = GPT2["heads"]
        q, k, v = (y.reshape(b, t, heads, d // heads)
                   for y in jnp.split(Conv1D(3 * d, name="c_attn")(x), 3, axis=-1))
        scores = jnp.einsum("bqhd,bkhd->bhqk", q, k) * (d // heads) ** -0.5
        causal = jnp.tril(jnp.ones((t, t), bool))[None, None]
        probs = jax.nn.softmax(jnp.where(causal, scores, jnp.finfo(scores.dtype).min), axis=-1)
        return Conv1D(d, name="c_proj")(jnp.einsum("bhqk,bkhd->bqhd", probs, v).reshape(b, t, d))


class GPT2MLP(nn.Module):
    @nn.compact
    def __call__(self, x):
        h = jax.nn.gelu(Conv1D(4 * x.shape[-1], name="c_fc")(x), approximate=True)  # gelu_new
        return Conv1D(x.shape[-1], name="c_proj")(h)


class GPT2Block(nn.Module):
    @nn.compact
    def __call__(self, h):
        h = h + GPT2Attention(name="attn")(nn.LayerNorm(1e-5, name="ln_1")(h))
        return h + GPT2MLP(name="mlp")(nn.LayerNorm(1e-5, name="ln_2")(h))


class GPT2Layers(nn.Module):
    @nn.compact
    def __call__(self, h):
        for i in range(GPT2["layers"]):
            h = GPT2Block(name=str(i))(h)
        return h


class GPT2Transformer(nn.Module):
    @nn.compact
    def __call__(self, ids):
        wte = nn.Embed(GPT2["vocab"], GPT2["d"], name="wte")
        h = wte(ids) + nn.Embed(GPT2["positions"], GPT2["d"], name="wpe")(jnp.arange(ids.shape[1])[None])
        return wte.attend(nn.LayerNorm(1e-5, name="ln_f")(GPT2Layers(name="h")(h)))  # tied head


class GPT2LM(nn.Module):
    """GPT2LMHeadModel in the manner of Hugging Face's FlaxGPT2 (its parameter names, (out, in) kernels)."""

    @nn.compact
    def __call__(self, ids):
        return GPT2Transformer(name="transformer")(ids)


def gpt2_to_flax(state: dict) -> dict:
    """A torch GPT-2 state dict as FlaxGPT2 params: Conv1D ``(in, out)`` -> kernel ``(out, in)``."""
    flat = {}
    for key, value in state.items():
        *module, name = key.split(".")
        if name == "weight" and module[-1] in ("wte", "wpe"):
            name = "embedding"
        elif name == "weight" and module[-1].startswith("ln_"):
            name = "scale"
        elif name == "weight":
            name, value = "kernel", value.T
        flat["/".join(["params", *module, name])] = jnp.asarray(value)
    return nest(flat)


# The FlaxGPT2 layout, as a Rule: jlora.infer_layouts derives the same in_axes=(1,) from the model's
# dot_generals.
GPT2_LAYOUTS = jlora.LoraConfig(targets=jlora.Rule(pattern=r".*/(c_attn|c_proj|c_fc)/kernel", in_axes=(1,)))


def _fixture(name: str):
    """``(model, params, inputs, expected outputs, folder)`` of one fixture variant."""
    folder = FIXTURES / name
    kind = name.split("_")[0]
    state = load_file(FIXTURES / f"{kind}_base.safetensors")
    params = gpt2_to_flax(state) if kind == "gpt2" else torch_to_flax(state)
    inputs = load_file(FIXTURES / f"{kind}_inputs.safetensors")
    if kind == "bert":
        model = BertClassifier()
        args = (inputs["input_ids"].astype(np.int32), inputs["attention_mask"].astype(np.int32))
    elif kind == "gpt2":
        model, args = GPT2LM(), (inputs["input_ids"].astype(np.int32),)
    else:
        model, args = TinyConv(), (inputs["x"],)
    return model, params, args, load_file(folder / "expected.safetensors"), folder


def _outputs(out) -> dict:
    return {"logits": out[0], "hidden": out[1]} if isinstance(out, tuple) else {"logits": out}


VARIANTS = ["bert_lora", "bert_rslora", "bert_dora", "conv_lora", "conv_dora", "gpt2_lora", "gpt2_save"]


# --------------------------------------------------------------------------- against PEFT's own files


@pytest.mark.parametrize("name", VARIANTS)
def test_imported_adapter_reproduces_peft_outputs(name):
    model, params, args, expected, folder = _fixture(name)
    frozen, trainable, config = import_peft(folder, params)
    assert frozen is params
    lora_apply = jlora.wrap(model.apply, config)
    got = _outputs(lora_apply(frozen, trainable, *args))
    for key, want in expected.items():
        np.testing.assert_allclose(got[key], want, rtol=0, atol=1e-5, err_msg=f"{name}: {key}")
    assert all(u.factored for u in lora_apply.uses(frozen, trainable, *args))
    # the merged weights too (a BERT compile more is not worth its seconds)
    if name in ("conv_lora", "gpt2_lora"):
        merged = model.apply(jlora.merge(frozen, trainable, config), *args)
        np.testing.assert_allclose(merged, expected["logits"], rtol=0, atol=1e-5)


@pytest.mark.parametrize("name", VARIANTS)
def test_fixture_adapters_change_the_outputs_visibly(name):
    """Else the comparison above would pass with the adapter ignored."""
    expected = load_file(FIXTURES / name / "expected.safetensors")
    base = load_file(FIXTURES / f"{name.split('_')[0]}_base_outputs.safetensors")
    assert max(np.max(np.abs(expected[k] - base[k])) for k in expected) > 1e-2


def test_import_reads_ranks_alphas_dropout_and_modules_to_save():
    _, params, _, _, folder = _fixture("bert_lora")
    _, trainable, config = import_peft(folder, params)
    assert (config.rank, config.alpha, config.dropout, config.rslora, config.dora) == (
        4, 8.0, 0.1, False, False)
    targets = Plan.of_base(config, params)
    layer = "params/bert/encoder/layer/{}/attention/self/{}/kernel"
    want = {  # rank_pattern {layer.1...query: 2, word_embeddings: 3}, alpha_pattern {value: 3}
        layer.format(0, "query"): (4, 8 / 4), layer.format(1, "query"): (2, 8 / 2),
        layer.format(0, "value"): (4, 3 / 4), layer.format(1, "value"): (4, 3 / 4),
        "params/bert/embeddings/word_embeddings/embedding": (3, 8 / 3),
    }
    assert {p: t.rank for p, t in targets.items() if t.adapted} == {p: r for p, (r, _) in want.items()}
    assert {p: t.scale for p, t in targets.items() if t.adapted} == pytest.approx(
        {p: s for p, (_, s) in want.items()})
    assert targets["params/bert/embeddings/word_embeddings/embedding"].embedding
    assert sorted(p for p, t in targets.items() if not t.adapted) == ["params/classifier/bias",
                                                                      "params/classifier/kernel"]
    peft = load_file(folder / "adapter_model.safetensors")
    np.testing.assert_array_equal(trainable["params"]["classifier"]["kernel"],
                                  peft["base_model.model.classifier.weight"].T)
    a = trainable["params"]["bert"]["encoder"]["layer"]["1"]["attention"]["self"]["query"]["kernel"]["a"]
    np.testing.assert_array_equal(
        a, peft["base_model.model.bert.encoder.layer.1.attention.self.query.lora_A.weight"].T)
    assert a.dtype == jnp.float32


def _random(abstract, seed: int = 0, std: float = 0.1):
    """Arrays of an abstract tree's shapes and dtypes: N(0, std²); DoRA magnitudes ``m`` in U(0.5, 1.5)."""
    rng = np.random.default_rng(seed)
    leaves, treedef = jax.tree_util.tree_flatten(abstract)
    new = [(rng.uniform(0.5, 1.5, s.shape) if path.endswith("/m")
            else rng.normal(0, std, s.shape)).astype(s.dtype)
           for path, s in zip(leaf_paths(abstract), leaves, strict=True)]
    return jax.tree_util.tree_unflatten(treedef, new)


def _init(params, config: jlora.LoraConfig, seed: int = 0):
    """``(params, trainable)`` with jlora.init's structure but random values (b != 0), and nothing
    compiled."""
    _, abstract = jax.eval_shape(lambda p: jlora.init(jax.random.key(0), p, config), params)
    return params, _random(abstract, seed)


def _modules(params) -> list[str]:
    return sorted({default_module_name(p) for p in leaf_paths(params)})


def _peft_targets(peft_config: dict, modules: list[str]) -> dict[str, tuple]:
    """Which modules PEFT adapts under a config, and each one's (r, alpha): PEFT's own matching rules."""
    targets = peft_config["target_modules"]
    chosen = [m for m in modules if any(m == t or m.endswith(f".{t}") for t in targets)]
    return {m: (_pattern_value(peft_config["rank_pattern"], m, peft_config["r"]),
                _pattern_value(peft_config["alpha_pattern"], m, peft_config["lora_alpha"])) for m in chosen}


@pytest.mark.parametrize("name", VARIANTS)
def test_export_of_import_reproduces_peft_files(name, tmp_path):
    _, params, _, _, folder = _fixture(name)
    frozen, trainable, config = import_peft(folder, params)
    export_peft(tmp_path, trainable, config, frozen=frozen, conv=CONV)

    theirs, ours = (load_file(folder / "adapter_model.safetensors"),
                    load_file(tmp_path / "adapter_model.safetensors"))
    assert sorted(ours) == sorted(theirs)
    for key in theirs:
        assert ours[key].dtype == theirs[key].dtype and ours[key].shape == theirs[key].shape, key
        np.testing.assert_array_equal(ours[key], theirs[key], err_msg=key)

    their_cfg = json.loads((folder / "adapter_config.json").read_text())
    our_cfg = json.loads((tmp_path / "adapter_config.json").read_text())
    assert set(our_cfg) == set(their_cfg) - {"peft_version"}
    differ = {"target_modules", "rank_pattern", "alpha_pattern", "auto_mapping", "lora_alpha",
              "modules_to_save"}
    for field in set(our_cfg) - differ:
        assert our_cfg[field] == their_cfg[field], field
    assert our_cfg["lora_alpha"] == their_cfg["lora_alpha"]  # also the int type
    modules = _modules(params)
    assert _peft_targets(our_cfg, modules) == _peft_targets(their_cfg, modules)

    def saved(cfg):  # PEFT matches modules_to_save entries as module-name suffixes
        return sorted(m for m in modules
                      if any(m == t or m.endswith(f".{t}") for t in cfg["modules_to_save"] or ()))

    assert saved(our_cfg) == saved(their_cfg)


# --------------------------------------------------------------------------- jlora -> PEFT -> jlora


@functools.cache
def _zoo():
    """``(jitted apply, params, tokens)`` of LinenZoo: one compile for every round trip below."""
    model = LinenZoo()
    tokens = jnp.array([[1, 5, 7, 3, 9], [2, 2, 8, 0, 4]])
    return (jax.jit(model.apply), _random(jax.eval_shape(model.init, jax.random.key(0), tokens), std=0.3),
            tokens)


ZOO_CONFIGS = {
    "patterns": jlora.LoraConfig(rank=3, alpha=6.0, dropout=0.05, train_in_full=r"params/dense/.*", targets=(
        jlora.Rule(pattern=r".*/attn/(query|key)/kernel", rank=2),  # 3-D (in, heads, head_dim)
        jlora.Rule(pattern=r".*/attn/value/kernel", alpha=2.5),
        r".*/attn/out/kernel",  # 3-D (heads, head_dim, out)
        jlora.Rule(pattern=r".*/conv/kernel", rank=4, alpha=1.0),  # 1-D conv (3, in, out)
        jlora.Rule(pattern=r".*/embed/embedding", rank=5),
    )),
    "rslora": jlora.LoraConfig(rank=4, alpha=3.0, rslora=True, targets=(r".*/kernel", r".*/embedding")),
    "dora": jlora.LoraConfig(rank=2, alpha=4.0, dora=True, targets=r".*/kernel"),
}


@pytest.mark.parametrize("name", ZOO_CONFIGS)
def test_round_trip_keeps_outputs_factors_and_config(name, tmp_path):
    config = ZOO_CONFIGS[name]
    apply, params, tokens = _zoo()
    frozen, trainable = _init(params, config, seed=1)
    export_peft(tmp_path, trainable, config, conv=CONV)
    frozen2, trainable2, config2 = import_peft(tmp_path, params)

    for (p1, x1), (p2, x2) in zip(jax.tree_util.tree_leaves_with_path(trainable),
                                  jax.tree_util.tree_leaves_with_path(trainable2), strict=True):
        assert p1 == p2 and x1.dtype == x2.dtype
        np.testing.assert_array_equal(x1, x2)
    before, after = Plan.of_base(config, params), Plan.of_base(config2, params)
    assert before.keys() == after.keys()
    for path, t in before.items():
        u = after[path]
        assert (t.rank, t.layout, t.embedding, t.dora) == (u.rank, u.layout, u.embedding, u.dora), path
        assert t.scale == pytest.approx(u.scale, rel=1e-12), path
    assert (config2.rslora, config2.dora, config2.dropout) == (config.rslora, config.dora, config.dropout)
    # jlora's factored forward is checked against PEFT above; here both sides are merged, to compile once.
    want = apply(jlora.merge(frozen, trainable, config), tokens)
    got = apply(jlora.merge(frozen2, trainable2, config2), tokens)
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=0)
    assert np.max(np.abs(want - apply(params, tokens))) > 1e-3


def test_zoo_keys_and_layouts(tmp_path):
    _, params, _ = _zoo()
    config = ZOO_CONFIGS["patterns"]
    _, trainable = _init(params, config)
    export_peft(tmp_path, trainable, config, conv=CONV)
    shapes = {k: v.shape for k, v in load_file(tmp_path / "adapter_model.safetensors").items()}
    p = "base_model.model."
    assert shapes[p + "attn.query.lora_A.weight"] == (2, 16)  # (r, in)
    assert shapes[p + "attn.query.lora_B.weight"] == (16, 2)  # (heads·head_dim, r)
    assert shapes[p + "attn.out.lora_A.weight"] == (3, 16)  # (r, heads·head_dim)
    assert shapes[p + "conv.lora_A.weight"] == (4, 16, 3)  # torch Conv1d (r, in, k)
    assert shapes[p + "conv.lora_B.weight"] == (16, 4, 1)
    assert shapes[p + "embed.lora_embedding_A"] == (5, 40)  # (r, vocab)
    assert shapes[p + "embed.lora_embedding_B"] == (16, 5)  # (dim, r)
    assert shapes[p + "dense.weight"] == (16, 16) and shapes[p + "dense.bias"] == (16,)
    peft = json.loads((tmp_path / "adapter_config.json").read_text())
    assert peft["modules_to_save"] == ["dense"]
    assert peft["rank_pattern"] == {"attn.query": 2, "attn.key": 2, "conv": 4, "embed": 5}
    assert peft["alpha_pattern"] == {"attn.value": 2.5, "conv": 1}
    assert (peft["r"], peft["lora_alpha"], peft["lora_dropout"], peft["peft_type"]) == (3, 6, 0.05, "LORA")


def test_nnx_state_round_trip(tmp_path):
    apply_fn, abstract = nnx_apply(nnx.eval_shape(lambda: NnxModel(nnx.Rngs(0))))
    state = _random(abstract, std=0.3)
    config = jlora.LoraConfig(rank=2, targets=(r"attn/.*/kernel", r"embed/embedding"))
    frozen, trainable = _init(state, config, seed=1)
    export_peft(tmp_path, trainable, config, frozen=frozen, conv=r"conv/kernel")
    assert "base_model.model.attn.query.lora_A.weight" in load_file(tmp_path / "adapter_model.safetensors")
    frozen2, trainable2, config2 = import_peft(tmp_path, state)
    tokens = jnp.array([[1, 2, 3]])
    apply = jax.jit(apply_fn)
    np.testing.assert_allclose(apply(jlora.merge(frozen2, trainable2, config2), tokens),
                               apply(jlora.merge(frozen, trainable, config), tokens), rtol=1e-6)


def test_module_name_override_and_dtype(tmp_path):
    params = {"params": {"blocks_0": {"attn": {"q": {"kernel": jnp.ones((8, 8), jnp.bfloat16)}}}}}
    config = jlora.LoraConfig(rank=2, targets=r".*/kernel", dtype="bfloat16")
    _, trainable = _init(params, config)

    def name(path):
        return "model." + default_module_name(path).replace("blocks_", "layers.").replace(".q", ".q_proj")

    export_peft(tmp_path, trainable, config, module_name=name, base_model_name_or_path="org/model")
    tensors = load_file(tmp_path / "adapter_model.safetensors")
    assert sorted(tensors) == ["base_model.model.model.layers.0.attn.q_proj.lora_A.weight",
                               "base_model.model.model.layers.0.attn.q_proj.lora_B.weight"]
    assert tensors["base_model.model.model.layers.0.attn.q_proj.lora_A.weight"].dtype == jnp.bfloat16
    assert (json.loads((tmp_path / "adapter_config.json").read_text())["base_model_name_or_path"]
            == "org/model")
    with pytest.raises(ValueError, match=r"2 adapter keys map to no leaf"):
        import_peft(tmp_path, params)
    table = {"params/blocks_0/attn/q/kernel": "model.layers.0.attn.q_proj"}
    _, back, config2 = import_peft(tmp_path, params, module_name=table)
    assert (config2.dtype == "bfloat16"
            and back["params"]["blocks_0"]["attn"]["q"]["kernel"]["a"].dtype == jnp.bfloat16)


def _tunix_like():
    """tunix's Llama naming: attention einsum kernels are leaves named ``w``, MLP kernels ``kernel``,
    a norm's scale ``w`` too."""
    rng = np.random.default_rng(0)
    shapes = {"attn": {"q_proj": {"w": (8, 2, 4)}, "o_proj": {"w": (2, 4, 8)}},
              "mlp": {"gate_proj": {"kernel": (8, 16)}, "down_proj": {"kernel": (16, 8)}},
              "input_layernorm": {"w": (8,)}, "out": {"bias": (8,)}}
    layer = jax.tree.map(lambda s: rng.normal(size=s), shapes, is_leaf=lambda x: isinstance(x, tuple))
    params = jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), {"layers": {"0": layer, "1": layer}})
    config = jlora.LoraConfig(rank=2, targets=(jlora.Rule(pattern=r".*/q_proj/w", in_axes=(0,)),
                                               jlora.Rule(pattern=r".*/o_proj/w", in_axes=(0, 1)),
                                               jlora.Rule(pattern=r".*/(gate|down)_proj/kernel")),
                              train_in_full=(r".*/input_layernorm/w", r".*/out/bias"))
    return params, config


def test_any_leaf_name_round_trips_bit_exact_with_the_same_module_name(tmp_path):
    params, config = _tunix_like()
    _, trainable = _init(params, config)

    def name(path):  # what a user writes for tunix: torch's names, the leaf's own name not needed
        return "model." + default_module_name(path).replace("attn", "self_attn")

    export_peft(tmp_path, trainable, config, module_name=name)
    keys = sorted(load_file(tmp_path / "adapter_model.safetensors"))
    assert "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight" in keys
    assert "base_model.model.model.layers.1.input_layernorm.weight" in keys  # torch's name, not `.w`
    assert "base_model.model.model.layers.1.out.bias" in keys
    assert not [k for k in keys if k.endswith(".w")], keys
    _, back, config2 = import_peft(tmp_path, params, module_name=name, layouts=config)
    want, got = flatten(trainable), flatten(back)
    assert sorted(got) == sorted(want)
    for path, x in want.items():
        np.testing.assert_array_equal(got[path], x, err_msg=path)
    merged, merged_back = flatten(jlora.merge(params, trainable, config)), flatten(jlora.merge(params, back,
                                                                                                config2))
    for path, w in merged.items():
        np.testing.assert_array_equal(merged_back[path], w, err_msg=path)


def test_unmapped_keys_name_the_fix_that_works(tmp_path):
    params, config = _tunix_like()
    _, trainable = _init(params, config)
    export_peft(tmp_path, trainable, config, module_name=lambda p: "model." + default_module_name(p))
    with pytest.raises(ValueError, match=r"keys map to no leaf of params(.|\n)*pass module_name \(leaf path "
                                         r"-> PEFT module name\)"):
        import_peft(tmp_path, params, layouts=config)
    import_peft(tmp_path, params, layouts=config, module_name=lambda p: "model." + default_module_name(p))


# ------------------------------------------------------------------------ transposed kernels (fan_in_fan_out)


def _gpt2_params():
    return gpt2_to_flax(load_file(FIXTURES / "gpt2_base.safetensors"))


C_PROJ = "params/transformer/h/0/attn/c_proj/kernel"  # square (16, 16): shapes cannot catch a swap of a and b


def test_gpt2_import_reads_fan_in_fan_out_as_in_axes_1():
    _, params, _, _, folder = _fixture("gpt2_lora")
    _, trainable, config = import_peft(folder, params)
    targets = Plan.of_base(config, params)
    assert {t.layout.in_axes for t in targets.values() if t.adapted} == {(1,)}
    assert len([t for t in targets.values() if t.adapted]) == 8
    # The square kernel, by hand: PEFT adds (B @ A)ᵀ·s to the torch (in, out) weight, i.e. s·B @ A to
    # the (out, in) kernel.
    peft = load_file(folder / "adapter_model.safetensors")
    big_a, big_b = (peft[f"base_model.model.transformer.h.0.attn.c_proj.lora_{x}.weight"] for x in "AB")
    adapter = trainable["params"]["transformer"]["h"]["0"]["attn"]["c_proj"]["kernel"]
    np.testing.assert_array_equal(adapter["a"], big_a.T)
    np.testing.assert_array_equal(adapter["b"], big_b.T)
    merged = jlora.merge(params, trainable, config)["params"]["transformer"]["h"]["0"]["attn"]["c_proj"][
        "kernel"]
    kernel = params["params"]["transformer"]["h"]["0"]["attn"]["c_proj"]["kernel"]
    # alpha_pattern 3, r 4
    np.testing.assert_allclose(merged, kernel + 3 / 4 * big_b @ big_a, rtol=0, atol=1e-6)
    # The same file read with explicit layouts (what jlora.infer_layouts gives) is the same config.
    _, trainable2, config2 = import_peft(folder, params, layouts=GPT2_LAYOUTS)
    assert config2 == config
    jax.tree.map(np.testing.assert_array_equal, trainable2, trainable)


def test_gpt2_import_without_fan_in_fan_out_is_an_error_not_a_swap(tmp_path):
    folder = _copy("gpt2_lora", tmp_path)
    _edit_config(folder, fan_in_fan_out=False)
    with pytest.raises(ValueError, match=r"(?s)c_attn -> params/transformer/h/0/attn/c_attn/kernel: "
                                         r"lora_A \(4, 16\) / lora_B \(48, 4\) do not fit the kernel's "
                                         r"\(48, 16\).*They fit the kernel used transposed, \(out, in\) with "
                                         r"in_axes=\(1,\).*layouts=jlora\.infer_layouts"):
        import_peft(folder, _gpt2_params())
    # Told the layout, the same file reads right, the square kernel included.
    _, trainable, config = import_peft(folder, _gpt2_params(), layouts=GPT2_LAYOUTS)
    assert Plan.of_base(config, _gpt2_params())[C_PROJ].layout.in_axes == (1,)


def test_gpt2_import_layouts_win_over_fan_in_fan_out_and_are_checked():
    _, params, _, _, folder = _fixture("gpt2_lora")
    # PEFT sets fan_in_fan_out per module from its type; explicit layouts say which kernels are (in, out).
    wrong = jlora.LoraConfig(targets=(jlora.Rule(pattern=r".*/c_(attn|fc)/kernel", in_axes=(0,)),
                                      r".*/kernel"))
    with pytest.raises(ValueError, match=r"c_attn -> params/transformer/h/0/attn/c_attn/kernel: "
                                         r"lora_A \(4, 16\) / lora_B \(48, 4\) do not fit the kernel's "
                                         r"\(48, 16\).*They fit the kernel used transposed"):
        import_peft(folder, params, layouts=wrong)
    with pytest.raises(TypeError, match=r"layouts must be a jlora\.LoraConfig .*got dict"):
        import_peft(folder, params, layouts={"c_proj": (1,)})
    # layouts that call an unrolled kernel a stack: its rows become layers, whose names the file lacks
    stacked = jlora.LoraConfig(targets=jlora.Rule(pattern=r".*c_fc/kernel", stack_axes=(0,)))
    with pytest.raises(ValueError, match=r"4 adapter keys map to no leaf of params: .*h\.0\.mlp\.c_fc\.lora_A"
                                         r"(.|\n)*e\.g\. transformer\.h\.\d+\.0\.mlp\.c_fc\.weight"):
        import_peft(folder, params, layouts=stacked)


def _square(in_axes):
    """A kernel (16, 16) with a jlora adapter whose a and b differ, under a rule of ``in_axes``."""
    params = {"params": {"attn": {"c_proj": {"kernel": jnp.asarray(
        np.random.default_rng(3).normal(size=(16, 16)), jnp.float32)}}}}
    config = jlora.LoraConfig(rank=2, alpha=4.0, targets=jlora.Rule(pattern=r".*/kernel", in_axes=in_axes))
    return (*_init(params, config, seed=5), config)


@pytest.mark.parametrize("in_axes", [(0,), (1,)], ids=["in-out", "out-in"])
def test_square_kernel_exports_with_its_input_side(in_axes, tmp_path):
    """PEFT's delta from the files, (B @ A) on torch's (out, in), is jlora's merged delta on the Flax
    kernel."""
    params, trainable, config = _square(in_axes)
    export_peft(tmp_path, trainable, config)
    assert json.loads((tmp_path / "adapter_config.json").read_text())["fan_in_fan_out"] is (in_axes == (1,))
    peft = load_file(tmp_path / "adapter_model.safetensors")
    big_a, big_b = (peft["base_model.model.attn.c_proj.lora_A.weight"],
                    peft["base_model.model.attn.c_proj.lora_B.weight"])
    adapter = trainable["params"]["attn"]["c_proj"]["kernel"]
    np.testing.assert_array_equal(big_a, adapter["a"].T)
    np.testing.assert_array_equal(big_b, adapter["b"].T)
    delta = (jlora.merge(params, trainable, config)["params"]["attn"]["c_proj"]["kernel"]
             - params["params"]["attn"]["c_proj"]["kernel"])
    torch_delta = 2.0 * big_b @ big_a  # (out, in)
    np.testing.assert_allclose(delta, torch_delta.T if in_axes == (0,) else torch_delta, rtol=0, atol=1e-6)
    assert np.max(np.abs(torch_delta - torch_delta.T)) > 1e-2  # a swap would show
    _, back, config2 = import_peft(tmp_path, params)
    jax.tree.map(np.testing.assert_array_equal, back, trainable)
    assert Plan.of_base(config2, params)["params/attn/c_proj/kernel"].layout.in_axes == in_axes


def test_export_refuses_a_mix_of_transposed_kernels_unless_told(tmp_path):
    params = {"params": {"c_attn": {"kernel": jnp.ones((12, 4))}, "dense": {"kernel": jnp.ones((4, 6))}}}
    config = jlora.LoraConfig(rank=2, targets=(jlora.Rule(pattern=r".*/c_attn/kernel", in_axes=(1,)),
                                               r".*/kernel"))
    _, trainable = _init(params, config)
    with pytest.raises(ValueError, match=r"2-D kernels used transposed \(in_axes=\(1,\)\): "
                                         r"\['params/c_attn/kernel'\], beside kernels that are not: "
                                         r"\['params/dense/kernel'\].*pass fan_in_fan_out=True"):
        export_peft(tmp_path / "mixed", trainable, config)
    assert not (tmp_path / "mixed").exists()
    with pytest.raises(TypeError, match=r"fan_in_fan_out must be True, False or None, got 'yes'"):
        export_peft(tmp_path / "mixed", trainable, config, fan_in_fan_out="yes")
    export_peft(tmp_path / "told", trainable, config, fan_in_fan_out=True)
    assert json.loads((tmp_path / "told" / "adapter_config.json").read_text())["fan_in_fan_out"] is True
    with pytest.raises(ValueError, match=r"dense -> params/dense/kernel: lora_A \(2, 4\) / lora_B \(6, 2\) "
                                         r"do not fit the kernel's \(4, 6\).*fit the kernel as \(in, out\), "
                                         r"in_axes=\(0,\): fan_in_fan_out: true makes 2-D kernels "
                                         r"\(out, in\) unless layouts say"):
        import_peft(tmp_path / "told", params)
    layouts = jlora.LoraConfig(targets=(jlora.Rule(pattern=r".*/c_attn/kernel", in_axes=(1,)),
                                        jlora.Rule(pattern=r".*/kernel", in_axes=(0,))))
    _, back, config2 = import_peft(tmp_path / "told", params, layouts=layouts)
    jax.tree.map(np.testing.assert_array_equal, back, trainable)


def test_gpt2_round_trip_of_jlora_adapters(tmp_path):
    """jlora adapters on FlaxGPT2 kernels -> PEFT files (fan_in_fan_out) -> jlora: same factors, same
    logits."""
    params = _gpt2_params()
    config = jlora.LoraConfig(rank=2, alpha=4.0, train_in_full=r".*/ln_f/.*", targets=(
        # = jlora.infer_layouts' result
        jlora.Rule(pattern=r".*/(c_attn|c_proj|c_fc)/kernel", in_axes=(1,)),))
    frozen, trainable = _init(params, config, seed=2)
    export_peft(tmp_path, trainable, config, frozen=frozen)
    assert json.loads((tmp_path / "adapter_config.json").read_text())["fan_in_fan_out"] is True
    frozen2, trainable2, config2 = import_peft(tmp_path, params)
    jax.tree.map(np.testing.assert_array_equal, trainable2, trainable)
    ids = jnp.asarray(load_file(FIXTURES / "gpt2_inputs.safetensors")["input_ids"], jnp.int32)
    apply = jax.jit(GPT2LM().apply)
    np.testing.assert_allclose(apply(jlora.merge(frozen2, trainable2, config2), ids),
                               apply(jlora.merge(frozen, trainable, config), ids), rtol=1e-6)


# --------------------------------------------------------------------------- what PEFT cannot hold (export)


def _dense():
    params = {"params": {"dense": {"kernel": jnp.ones((4, 6)), "bias": jnp.zeros(6)}}}
    return params


@pytest.mark.parametrize("kwargs, match", [
    (dict(nonlinearity="relu"), r"nonlinearity='relu'.*PEFT's LoRA is linear"),
    (dict(dylora="frozen"), r"export_peft: DyLoRA \(dylora='frozen'\): PEFT has no DyLoRA.*jlora\.truncate"),
    (dict(init="pissa"), r"init='pissa'.*SVD residual.*jlora\.merge"),
])
def test_export_refuses_variants_peft_lacks(kwargs, match, tmp_path):
    config = jlora.LoraConfig(rank=2, targets=r".*/kernel", **kwargs)
    frozen, trainable = _init(_dense(), config)
    with pytest.raises(ValueError, match=match):
        export_peft(tmp_path, trainable, config, frozen=frozen)
    assert not list(tmp_path.iterdir())


SCANNED = jlora.LoraConfig(rank=2, targets=jlora.Rule(pattern=r".*/kernel", stack_axes=(0,)))


def _scanned_and_unrolled():
    """LinenScan's params and adapters (3 layers stacked on axis 0), and the same values unrolled into
    ``layers_0`` .. ``layers_2`` as an unscanned model holds them."""
    params = _random(jax.eval_shape(LinenScan().init, jax.random.key(0), jnp.ones((2, 16))))
    _, trainable = _init(params, SCANNED)
    layer = lambda tree, i: jax.tree.map(lambda x: x[i], tree["params"]["layers"])  # noqa: E731
    unrolled = {"params": {f"layers_{i}": layer(params, i) for i in range(3)}}
    unrolled_trainable = {"params": {f"layers_{i}": layer(trainable, i) for i in range(3)}}
    return params, trainable, unrolled, unrolled_trainable


def test_a_scanned_stack_exports_one_module_per_layer_as_the_unrolled_model_does(tmp_path):
    params, trainable, unrolled, unrolled_trainable = _scanned_and_unrolled()
    export_peft(tmp_path / "scanned", trainable, SCANNED)
    export_peft(tmp_path / "unrolled", unrolled_trainable, jlora.LoraConfig(rank=2, targets=r".*/kernel"),
                module_name=lambda p: default_module_name(p).replace("layers_", "layers."))
    for name in ("adapter_model.safetensors", "adapter_config.json"):
        assert (tmp_path / "scanned" / name).read_bytes() == (tmp_path / "unrolled" / name).read_bytes(), name
    keys = sorted(load_file(tmp_path / "scanned" / "adapter_model.safetensors"))
    assert keys[:2] == [f"base_model.model.layers.0.down.lora_{x}.weight" for x in "AB"]
    assert len(keys) == 3 * 2 * 2
    frozen, back, config = import_peft(tmp_path / "scanned", params, layouts=SCANNED)
    for path, x in flatten(trainable).items():
        np.testing.assert_array_equal(flatten(back)[path], x, err_msg=path)
    assert config.rule_for("params/layers/up/kernel").stack_axes == (0,)
    x = jnp.asarray(np.random.default_rng(0).normal(size=(2, 16)), jnp.float32)
    np.testing.assert_allclose(jlora.wrap(LinenScan().apply, config)(frozen, back, x),
                               jlora.wrap(LinenScan().apply, SCANNED)(params, trainable, x), rtol=1e-6)


@pytest.mark.parametrize("module_name", [
    lambda path, index: f"model.blocks.{index[0]}.{path.split('/')[-2]}" if index else None,
    {"params/layers/up/kernel": "model.blocks.{}.up", "params/layers/down/kernel": "model.blocks.{}.down"},
    lambda path: f"model.blocks.{path.split('/')[-2]}",  # one argument: the index follows 'blocks'
], ids=["path-and-index", "dict-with-placeholder", "one-argument"])
def test_module_name_names_each_layer_and_reads_back(module_name, tmp_path):
    params, trainable, _, _ = _scanned_and_unrolled()
    export_peft(tmp_path, trainable, SCANNED, module_name=module_name)
    keys = load_file(tmp_path / "adapter_model.safetensors")
    assert "base_model.model.model.blocks.2.up.lora_B.weight" in keys and len(keys) == 12
    _, back, _ = import_peft(tmp_path, params, layouts=SCANNED, module_name=module_name)
    for path, x in flatten(trainable).items():
        np.testing.assert_array_equal(flatten(back)[path], x, err_msg=path)


def test_a_mapping_that_sends_two_layers_to_one_module_is_refused_naming_both(tmp_path):
    _, trainable, _, _ = _scanned_and_unrolled()
    with pytest.raises(ValueError, match=r"params/layers/down/kernel layer \(0,\) and "
                                         r"params/layers/down/kernel layer \(1,\) both map to the PEFT key "
                                         r"'base_model\.model\.blocks\.down\.lora_A\.weight'"):
        export_peft(tmp_path, trainable, SCANNED,
                    module_name=lambda path, index: f"blocks.{path.split('/')[-2]}")
    assert not list(tmp_path.iterdir())


def test_import_names_the_layers_a_file_lacks(tmp_path):
    params, trainable, _, _ = _scanned_and_unrolled()
    export_peft(tmp_path, trainable, SCANNED)
    tensors = load_file(tmp_path / "adapter_model.safetensors")
    save_file({k: v for k, v in tensors.items() if ".2.up." not in k}, tmp_path / "adapter_model.safetensors",
              metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"params/layers/up/kernel: the file has 2 of its 3 layers; missing "
                                         r"layers \[\(2,\)\] \(their PEFT modules, e\.g\. layers\.2\.up\)"):
        import_peft(tmp_path, params, layouts=SCANNED)


@pytest.mark.parametrize("config,kwargs,match", [
    (jlora.LoraConfig(rank=2, targets=jlora.Rule(pattern=r".*/kernel", in_axes=(1,))),
     {"params": {"params": {"dense": {"kernel": jnp.ones((3, 4, 6))}}}},
     r"params/dense/kernel has in_axes=\(1,\), not its leading axes.*a 2-D \(out, in\) kernel with "
     r"in_axes=\(1,\) exports as it is"),
    (jlora.LoraConfig(rank=2, targets=r".*/kernel"), {"conv": r".*"},
     r"params/dense/kernel \(shape \(4, 6\).*was marked conv"),
    (jlora.LoraConfig(rank=2, targets=r".*/kernel", train_in_full=r".*/bias"), {},
     r"modules \['dense'\] are both adapted and \(partly\) trained in full"),
], ids=["input-axes-not-leading", "conv-mark-on-dense", "adapted-and-trained-in-full"])
def test_export_refuses_a_dense_layout_peft_cannot_hold(tmp_path, config, kwargs, match):
    kwargs = dict(kwargs)
    _, trainable = _init(kwargs.pop("params", None) or _dense(), config)
    with pytest.raises(ValueError, match=match):
        export_peft(tmp_path, trainable, config, **kwargs)


def test_export_refuses_names_peft_cannot_tell_apart(tmp_path):
    params = {"params": {"a": {"kernel": jnp.ones((4, 4))}, "b": {"kernel": jnp.ones((4, 4))}}}
    config = jlora.LoraConfig(rank=2, targets=r".*/kernel")
    _, trainable = _init(params, config)
    with pytest.raises(ValueError, match=r"params/a/kernel and params/b/kernel both map to the PEFT key "
                                         r"'base_model\.model\.same\.lora_A\.weight'"):
        export_peft(tmp_path, trainable, config, module_name=lambda path: "same")
    with pytest.raises(ValueError, match=r"no PEFT module name for w .*module_name="):
        w = {"w": jnp.ones((4, 4))}
        cfg = jlora.LoraConfig(rank=2, targets="w")
        export_peft(tmp_path, _init(w, cfg)[1], cfg)
    with pytest.raises(TypeError, match=r"module_name must be a callable .* got int"):
        export_peft(tmp_path, trainable, config, module_name=3)


def test_export_checks_trainable_against_config_and_frozen(tmp_path):
    config = jlora.LoraConfig(rank=2, targets=r".*/kernel")
    frozen, trainable = _init(_dense(), config)
    other = jlora.LoraConfig(rank=2, targets=r".*/other")
    with pytest.raises(ValueError, match=r"export_peft: .*\n  trainable holds an adapter at "
                                         r"params/dense/kernel, but no rule"):
        export_peft(tmp_path, trainable, other)
    wrong = {"params": {"dense": {"kernel": jnp.ones((5, 6)), "bias": jnp.zeros(6)}}}
    with pytest.raises(ValueError, match=r"params/dense/kernel/a has shape \(4, 2\), expected \(5, 2\)"):
        export_peft(tmp_path, trainable, config, frozen=wrong)


# --------------------------------------------------------------------------- what jlora cannot read (import)


def _copy(name: str, tmp_path) -> pathlib.Path:
    folder = tmp_path / name
    shutil.copytree(FIXTURES / name, folder)
    return folder


def _edit_config(folder: pathlib.Path, **fields) -> None:
    path = folder / "adapter_config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), **fields}))


def test_import_refuses_pickled_weights(tmp_path):
    folder = _copy("conv_lora", tmp_path)
    (folder / "adapter_model.safetensors").rename(folder / "adapter_model.bin")
    with pytest.raises(ValueError, match=r"(?s)adapter_model\.bin, a pickled torch file.*Unpickling "
                                         r"can run arbitrary code.*safetensors\.torch import "
                                         r"save_file.*weights_only=True"):
        import_peft(folder, {})
    (folder / "adapter_model.bin").unlink()
    with pytest.raises(FileNotFoundError, match=r"adapter_model\.safetensors does not exist"):
        import_peft(folder, {})
    with pytest.raises(FileNotFoundError, match=r"adapter_config\.json does not exist"):
        import_peft(tmp_path / "nowhere", {})


def test_import_lists_every_key_that_maps_to_no_leaf():
    _, conv_params, _, _, _ = _fixture("conv_lora")
    with pytest.raises(ValueError, match=r"12 adapter keys map to no leaf of params: "
                                         r"base_model\.model\.bert\.embeddings\.word_embeddings\."
                                         r"lora_embedding_A, .*base_model\.model\.classifier\.weight\. "
                                         r".*pass module_name") as err:
        import_peft(FIXTURES / "bert_lora", conv_params)
    assert "base_model.model.bert.encoder.layer.1.attention.self.value.lora_B.weight" in str(err.value)


@pytest.mark.parametrize("fields, match", [
    (dict(peft_type="IA3"), r"peft_type='IA3'; jlora reads LoRA adapters"),
    (dict(lora_bias=True, use_qalora=True),
     r"features jlora does not implement: lora_bias=True, use_qalora=True"),
    (dict(init_lora_weights="pissa_niter_4"),
     r"init_lora_weights='pissa_niter_4' \(it changed the base weights"),
    (dict(r=2), r"base_model\.model\.conv1: lora_A has rank 3, but r/rank_pattern give 2"),
    (dict(rank_pattern={}), r"conv2: lora_A has rank 2, but r/rank_pattern give 3"),
    (dict(use_dora=True), r"base_model\.model\.conv1: no lora_magnitude_vector, but use_dora=True"),
])
def test_import_refuses_configs_it_cannot_honour(fields, match, tmp_path):
    folder = _copy("conv_lora", tmp_path)
    _edit_config(folder, **fields)
    _, params, _, _, _ = _fixture("conv_lora")
    with pytest.raises(ValueError, match=match):
        import_peft(folder, params)


def test_import_refuses_tensors_that_do_not_fit(tmp_path):
    _, params, _, _, _ = _fixture("conv_lora")
    folder = _copy("conv_lora", tmp_path)
    tensors = load_file(folder / "adapter_model.safetensors")
    tensors["base_model.model.head.lora_A.weight"] = np.zeros((3, 7), np.float32)
    tensors["base_model.model.conv2.lora_B.bias"] = np.zeros((5,), np.float32)
    del tensors["base_model.model.conv1.lora_B.weight"]
    save_file(tensors, folder / "adapter_model.safetensors")
    with pytest.raises(ValueError) as err:
        import_peft(folder, params)
    message = str(err.value)
    assert re.search(r"conv1: has \['a'\] of PEFT's factors, needs both lora_A and lora_B", message)
    assert re.search(r"conv2\.lora_B\.bias: a tensor of a LoRA variant jlora does not implement", message)
    assert re.search(r"base_model\.model\.head -> params/head/kernel: lora_A \(3, 7\) / lora_B \(4, 3\) do "
                     r"not fit the kernel's \(5, 4\) \(expected \(3, 5\) / \(4, 3\)\)", message)


def _write_adapter(folder: pathlib.Path, tensors: dict, **fields) -> pathlib.Path:
    folder.mkdir()
    save_file({f"base_model.model.{k}": np.asarray(v, np.float32) for k, v in tensors.items()},
              folder / "adapter_model.safetensors")
    (folder / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 2, "lora_alpha": 4,
                                                            **fields}))
    return folder


def test_import_reads_trained_biases_as_leaves_trained_in_full(tmp_path):
    params = {"params": {"fc": {"kernel": np.ones((4, 3), np.float32), "bias": np.zeros(3, np.float32)}}}
    folder = _write_adapter(tmp_path / "a", {"fc.lora_A.weight": np.ones((2, 4)),
                                             "fc.lora_B.weight": np.ones((3, 2)),
                                             "fc.bias": [1, 2, 3]}, bias="lora_only")
    _, trainable, config = import_peft(folder, params)
    assert config.train_in_full == (r"params/fc/bias",)
    np.testing.assert_array_equal(trainable["params"]["fc"]["bias"], [1, 2, 3])


def test_import_refuses_what_jlora_adapters_cannot_be(tmp_path):
    params = {"params": {"emb": {"embedding": np.ones((10, 4), np.float32)},
                         "fc": {"kernel": np.ones((4, 3), np.float32)}}}
    dora = _write_adapter(tmp_path / "dora", {"emb.lora_embedding_A": np.ones((2, 10)),
                                              "emb.lora_embedding_B": np.ones((4, 2)),
                                              "emb.lora_magnitude_vector": np.ones(4)}, use_dora=True)
    with pytest.raises(ValueError, match=r"base_model\.model\.emb: DoRA on an embedding; jlora implements "
                                         r"DoRA for Linear and Conv kernels only"):
        import_peft(dora, params)
    big = _write_adapter(tmp_path / "big", {"fc.lora_A.weight": np.ones((4, 4)),
                                            "fc.lora_B.weight": np.ones((3, 4))}, r=4)
    with pytest.raises(ValueError, match=r"(?s)big does not fit jlora's adapters on params:.*rank 4 exceeds "
                                         r"min\(fan_in=4, fan_out=3\)"):
        import_peft(big, params)


def test_import_refuses_leaves_it_cannot_tell_apart():
    _, params, _, _, folder = _fixture("conv_lora")
    with pytest.raises(ValueError, match=r"conv1\.weight: the leaves "
                                         r"\['params/conv1/kernel', 'params/conv2/kernel'\] all map to "
                                         r"'conv1\.weight'; tell them apart with module_name"):
        import_peft(folder, params,
                    module_name=lambda path: default_module_name(path).replace("conv2", "conv1"))


# --------------------------------------------------------------------------- broken files (import)


def _raw_config(folder: pathlib.Path, text) -> None:
    (folder / "adapter_config.json").write_bytes(text if isinstance(text, bytes) else text.encode())


@pytest.mark.parametrize("text, match", [
    ("{\"peft_type\": \"LORA\", \"r\": ", r"adapter_config\.json is not valid JSON \(Expecting value"),
    (b"\xff\xfe{}", r"adapter_config\.json is not valid JSON \(.*utf-8"),
    ("[1, 2]", r"adapter_config\.json holds a JSON list, not an object of PEFT's LoraConfig fields"),
    ("\"LORA\"", r"adapter_config\.json holds a JSON str, not an object"),
], ids=["truncated", "not-utf8", "list", "string"])
def test_import_names_a_config_that_is_no_json_object(text, match, tmp_path):
    folder = _copy("conv_lora", tmp_path)
    _raw_config(folder, text)
    with pytest.raises(ValueError, match=match):
        import_peft(folder, {})


@pytest.mark.parametrize("fields, match", [
    (dict(r="eight"),
     r"adapter_config\.json: field 'r' is \"eight\", expected a positive integer \(the rank\); fix"),
    (dict(r=0), r"field 'r' is 0, expected a positive integer"),
    (dict(r=True), r"field 'r' is true, expected a positive integer"),
    (dict(r=2.5), r"field 'r' is 2\.5, expected a positive integer"),
    (dict(r=None), r"field 'r' is null, expected a positive integer"),
    (dict(lora_alpha=None), r"field 'lora_alpha' is null, expected a finite number > 0"),
    (dict(lora_alpha="8"), r"field 'lora_alpha' is \"8\", expected a finite number > 0"),
    (dict(lora_alpha=float("inf")), r"field 'lora_alpha' is Infinity, expected a finite number > 0"),
    (dict(peft_type=3), r"field 'peft_type' is 3, expected a string"),
    (dict(use_dora="yes"), r"field 'use_dora' is \"yes\", expected true or false"),
    (dict(fan_in_fan_out="true"), r"field 'fan_in_fan_out' is \"true\", expected true or false"),
    (dict(lora_dropout=1.5), r"field 'lora_dropout' is 1\.5, expected a rate in \[0, 1\)"),
    (dict(init_lora_weights=3), r"field 'init_lora_weights' is 3, expected true, false or a scheme name"),
    (dict(rank_pattern=["conv1"]),
     r"field 'rank_pattern' is \[\"conv1\"\], expected an object \{module name pattern: value\} "
     r"of positive integers"),
    (dict(rank_pattern={"conv2": "2"}),
     r"field \"rank_pattern\['conv2'\]\" is \"2\", expected positive integers"),
    (dict(alpha_pattern={"conv2": -1}),
     r"field \"alpha_pattern\['conv2'\]\" is -1, expected finite numbers > 0"),
    (dict(rank_pattern={"conv(": 2}), r"rank_pattern key 'conv\(' is not a valid regex \(missing \)"),
])
def test_import_names_the_file_and_the_bad_field(fields, match, tmp_path):
    folder = _copy("conv_lora", tmp_path)
    _edit_config(folder, **fields)
    _, params, _, _, _ = _fixture("conv_lora")
    with pytest.raises(ValueError, match=match) as err:
        import_peft(folder, params)
    assert str(folder / "adapter_config.json") in str(err.value)


def _weights(folder: pathlib.Path) -> pathlib.Path:
    return folder / "adapter_model.safetensors"


@pytest.mark.parametrize("damage, match", [
    (lambda raw: raw[: len(raw) // 2],
     r"is not a valid safetensors file \(SafetensorError: .*truncated or corrupt"),
    (lambda raw: b"", r"is not a valid safetensors file \(SafetensorError"),
    (lambda raw: b"\x00garbage" * 40, r"is not a valid safetensors file \(SafetensorError"),
    (lambda raw: raw[:9] + b"!" + raw[10:], r"is not a valid safetensors file \(SafetensorError: .*header"),
], ids=["truncated", "empty", "garbage", "header-json"])
def test_import_names_a_broken_safetensors_file(damage, match, tmp_path):
    folder = _copy("conv_lora", tmp_path)
    _weights(folder).write_bytes(damage(_weights(folder).read_bytes()))
    _, params, _, _, _ = _fixture("conv_lora")
    with pytest.raises(ValueError, match=r"import_peft: .*adapter_model\.safetensors " + match):
        import_peft(folder, params)


def test_import_refuses_tensors_that_are_no_factors(tmp_path):
    params = {"params": {"fc": {"kernel": np.ones((4, 3), np.float32)}}}
    folder = tmp_path / "int"
    folder.mkdir()
    save_file({"base_model.model.fc.lora_A.weight": np.ones((2, 4), np.int32),
               "base_model.model.fc.lora_B.weight": np.ones((3, 2), np.float32)}, _weights(folder))
    (folder / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 2}))
    with pytest.raises(ValueError, match=r"adapter_model\.safetensors holds tensors that are not "
                                         r"floating point: base_model\.model\.fc\.lora_A\.weight "
                                         r"\(int32, shape \(2, 4\)\)"):
        import_peft(folder, params)
    flat = _write_adapter(tmp_path / "flat", {"fc.lora_A.weight": np.ones(4),
                                              "fc.lora_B.weight": np.ones((3, 2))})
    with pytest.raises(ValueError, match=r"base_model\.model\.fc: lora_A has shape \(4,\); PEFT's factors "
                                         r"have a rank axis and an input axis"):
        import_peft(flat, params)
    flat_b = _write_adapter(tmp_path / "flat_b", {"fc.lora_A.weight": np.ones((2, 4)),
                                                  "fc.lora_B.weight": np.ones(3)})
    with pytest.raises(ValueError, match=r"fc -> params/fc/kernel: lora_A \(2, 4\) / lora_B \(3,\) are no "
                                         r"pair of Linear \(2-D\) or conv factors"):
        import_peft(flat_b, params)


# The documented failures of import_peft on any file content; nothing else may escape.
DOCUMENTED = (ValueError, FileNotFoundError)
_JUNK = st.one_of(st.none(), st.booleans(), st.integers(-3, 10**20), st.floats(allow_nan=True),
                  st.text(max_size=4), st.lists(st.integers(-1, 3), max_size=2),
                  st.dictionaries(st.text(max_size=3), st.one_of(st.integers(-1, 5), st.text(max_size=2),
                                                                 st.floats(-1, 5)), max_size=2))
_FIELDS = ["peft_type", "r", "lora_alpha", "rank_pattern", "alpha_pattern", "use_rslora", "use_dora",
           "fan_in_fan_out", "lora_dropout", "init_lora_weights", "target_modules", "modules_to_save", "bias",
           "lora_bias", "use_qalora", "layers_to_transform", "target_parameters", "some_future_field"]


def _fuzz_folder(tmp: pathlib.Path) -> tuple[pathlib.Path, dict]:
    params = {"params": {"fc": {"kernel": np.ones((4, 3), np.float32), "bias": np.zeros(3, np.float32)},
                         "conv": {"kernel": np.ones((3, 3, 2, 4), np.float32)}}}
    folder = tmp / "adapter"
    shutil.rmtree(folder, ignore_errors=True)
    _write_adapter(folder, {"fc.lora_A.weight": np.ones((2, 4)), "fc.lora_B.weight": np.ones((3, 2)),
                            "conv.lora_A.weight": np.ones((3, 2, 3, 3)),
                            "conv.lora_B.weight": np.ones((4, 3, 1, 1)),
                            "fc.bias": np.ones(3)}, rank_pattern={"conv": 3}, alpha_pattern={"fc": 2.0})
    return folder, params


def _import_or_documented_error(folder, params) -> None:
    try:
        import_peft(folder, params)
    except DOCUMENTED as e:
        assert str(folder) in str(e) or "import_peft" in str(e), e


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.data())
def test_fuzz_adapter_config_only_documented_errors_escape(tmp_path, data):
    folder, params = _fuzz_folder(tmp_path)
    config = json.loads((folder / "adapter_config.json").read_text())
    for _ in range(data.draw(st.integers(1, 3))):
        field = data.draw(st.sampled_from(_FIELDS))
        if data.draw(st.booleans()):
            config.pop(field, None)
        else:
            config[field] = data.draw(_JUNK)
    text = json.dumps(config)
    if data.draw(st.booleans()):
        text = text[: data.draw(st.integers(0, len(text)))]
    _raw_config(folder, text)
    _import_or_documented_error(folder, params)


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.data())
def test_fuzz_safetensors_only_documented_errors_escape(tmp_path, data):
    folder, params = _fuzz_folder(tmp_path)
    raw = bytearray(_weights(folder).read_bytes())
    header = 8 + int.from_bytes(raw[:8], "little")
    if data.draw(st.booleans()):
        raw = raw[: data.draw(st.integers(0, len(raw)))]
    else:
        for _ in range(data.draw(st.integers(1, 4))):
            i = data.draw(st.integers(0, header - 1))
            raw[i] = data.draw(st.integers(0, 255))
    _weights(folder).write_bytes(bytes(raw))
    _import_or_documented_error(folder, params)


# --------------------------------------------------------------------------- writing files (export)


def _two_adapters():
    """``(params, (trainable, config) rank 2, (trainable, config) rank 3)`` on one kernel."""
    params = {"params": {"fc": {"kernel": jnp.ones((4, 6))}}}
    out = [params]
    for rank in (2, 3):
        config = jlora.LoraConfig(rank=rank, targets=r".*/kernel")
        out.append((_init(params, config, seed=rank)[1], config))
    return out


def _rank_in(folder) -> int:
    return json.loads((folder / "adapter_config.json").read_text())["r"]


@pytest.mark.parametrize("swap", [True, False], ids=["exchange", "file-by-file"])
def test_export_replaces_an_older_adapter_and_keeps_other_files(swap, tmp_path, monkeypatch):
    if not swap:  # a system without renameat2(RENAME_EXCHANGE)
        monkeypatch.setattr("jlora._foreign.exchange", lambda a, b: False)
    params, (old, old_cfg), (new, new_cfg) = _two_adapters()
    target = tmp_path / "adapter"
    export_peft(target, old, old_cfg)
    (target / "README.md").write_text("model card")
    (target / "other").mkdir()
    (target / "other" / "adapter_config.json").write_text("{}")
    export_peft(target, new, new_cfg)
    _, back, config = import_peft(target, params)
    assert config.rank == 3
    jax.tree.map(np.testing.assert_array_equal, back, new)
    assert (target / "README.md").read_text() == "model card"
    assert (target / "other" / "adapter_config.json").read_text() == "{}"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter"]  # no temporary folder left beside it


@pytest.mark.parametrize("fail_at", ["_exchange", "fsync"])
def test_a_failed_export_leaves_the_old_pair_and_nothing_else(fail_at, tmp_path, monkeypatch):
    params, (old, old_cfg), (new, new_cfg) = _two_adapters()
    target = tmp_path / "adapter"
    export_peft(target, old, old_cfg)
    before = {p.name: p.read_bytes() for p in target.iterdir()}

    def crash(*args):
        raise OSError("disk gone")

    monkeypatch.setattr("jlora._foreign.exchange" if fail_at == "_exchange" else "jlora._foreign.os.fsync",
                        crash)
    with pytest.raises(OSError, match="disk gone"):
        export_peft(target, new, new_cfg)
    assert {p.name: p.read_bytes() for p in target.iterdir()} == before
    if fail_at == "fsync":  # a new folder appears whole or not at all
        with pytest.raises(OSError, match="disk gone"):
            export_peft(tmp_path / "fresh", new, new_cfg)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter"]


def test_export_never_deletes_a_subfolder_it_could_not_move_back(tmp_path, monkeypatch):
    params, (old, old_cfg), (new, new_cfg) = _two_adapters()
    target = tmp_path / "adapter"
    export_peft(target, old, old_cfg)
    (target / "other").mkdir()
    (target / "other" / "keep.txt").write_text("mine")
    rename = os.rename

    def failing(src, dst):
        if pathlib.Path(src).name == "other":
            raise OSError("busy")
        return rename(src, dst)

    monkeypatch.setattr("jlora._foreign.os.rename", failing)
    with pytest.raises(OSError, match=r"wrote the new adapter to .*adapter, but could not move other back "
                                      r"into it \(busy\); it is in .*\.adapter\..*\.tmp: move it by hand"):
        export_peft(target, new, new_cfg)
    monkeypatch.undo()
    assert _rank_in(target) == 3
    (hidden,) = [p for p in tmp_path.iterdir() if p.name != "adapter"]
    assert (hidden / "other" / "keep.txt").read_text() == "mine"


def test_export_and_import_take_relative_home_and_pathlib_paths(tmp_path, monkeypatch):
    params, (trainable, config), _ = _two_adapters()
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    export_peft("rel/adapter", trainable, config)
    assert (tmp_path / "rel" / "adapter" / "adapter_model.safetensors").is_file()
    assert (tmp_path / "rel" / "adapter").stat().st_mode & 0o777 == 0o755
    export_peft(pathlib.Path("~/adapter"), trainable, config)
    assert (tmp_path / "home" / "adapter" / "adapter_config.json").is_file()
    for where in ("rel/adapter", pathlib.Path("rel/adapter"), "~/adapter", pathlib.Path("~") / "adapter"):
        _, back, _ = import_peft(where, params)
        jax.tree.map(np.testing.assert_array_equal, back, trainable)
    (tmp_path / "file").write_text("")
    with pytest.raises(FileExistsError, match=r"export_peft: .*file is a file; give a folder path"):
        export_peft("file", trainable, config)
    with pytest.raises(TypeError, match=r"expected a folder path \(str or pathlib\.Path\), got int"):
        export_peft(3, trainable, config)
    with pytest.raises(FileNotFoundError, match=r"rel/none/adapter_config\.json does not exist"):
        import_peft("rel/none", params)
    assert os.path.isdir(tmp_path / "rel")


# --------------------------------------------------------------------------- experts (target_parameters)

MOE = pathlib.Path(__file__).parent / "fixtures" / "moe"
EXPERTS = (r".*/experts/gate_up_proj", r".*/experts/down_proj")  # MixtralExperts defines them in this order
MOE_TARGETS = r".*/(experts/.*|self_attn/(q_proj|v_proj)/kernel)"


@functools.cache
def _moe():
    """The fixtures' Mixtral in Flax (`smollm2.Llama` with experts), its inputs and layouts."""
    import smollm2
    cfg = smollm2.LlamaConfig(vocab=64, d_model=16, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=12,
                              rope_theta=1e4, norm_eps=1e-5, max_len=32, n_experts=4, experts_per_token=2)
    params = smollm2.from_hf(cfg, load_file(MOE / "base.safetensors"))
    ids = jnp.asarray(load_file(MOE / "inputs.safetensors")["input_ids"], jnp.int32)
    pos = jnp.broadcast_to(jnp.arange(ids.shape[1], dtype=jnp.int32), ids.shape)
    layouts = jlora.infer_layouts(jlora.LoraConfig(rank=2, targets=MOE_TARGETS), smollm2.Llama(cfg).apply,
                                  params, ids, pos)
    return smollm2, cfg, params, ids, pos, layouts


def test_moe_model_equals_transformers_mixtral():
    smollm2, cfg, params, ids, pos, layouts = _moe()
    logits, _ = smollm2.Llama(cfg).apply(params, ids, pos)
    base = load_file(MOE / "base_outputs.safetensors")["logits"]
    np.testing.assert_allclose(logits, base, rtol=0, atol=1e-5)
    expert_rules = [r for r in layouts.targets if "experts" in r.pattern]
    assert [r.stack_axes for r in expert_rules] == [(0,)]  # the experts' einsum batch axis


@pytest.mark.parametrize("name", ["experts", "experts_attention"])
@pytest.mark.parametrize("jit", [False, True])
def test_moe_import_reproduces_peft_logits_factored_and_merged(name, jit):
    smollm2, cfg, params, ids, pos, layouts = _moe()
    frozen, trainable, config = import_peft(MOE / name, params, module_name=smollm2.hf_module_name,
                                            layouts=layouts, experts=EXPERTS)
    expected = load_file(MOE / name / "expected.safetensors")
    apply = jlora.wrap(smollm2.Llama(cfg).apply, config)
    apply = jax.jit(apply) if jit else apply
    logits, _ = apply(frozen, trainable, ids, pos)
    np.testing.assert_allclose(logits, expected["logits"], rtol=0, atol=2e-5)
    merged, _ = smollm2.Llama(cfg).apply(jlora.merge(frozen, trainable, config), ids, pos)
    np.testing.assert_allclose(merged, expected["merged_logits"], rtol=0, atol=2e-5)
    base = load_file(MOE / "base_outputs.safetensors")["logits"]
    assert np.max(np.abs(expected["logits"] - base)) > 0.5  # every delta is visible
    gate_up = trainable["params"]["layers_0"]["mlp"]["experts"]["gate_up_proj"]
    rank = 2 if name == "experts" else 4
    assert gate_up["a"].shape == (4, 16, rank) and gate_up["b"].shape == (4, rank, 24)
    if name == "experts_attention":  # rank_pattern {"mlp.experts.down_proj": 3}, rsLoRA
        assert trainable["params"]["layers_1"]["mlp"]["experts"]["down_proj"]["a"].shape == (4, 12, 3)
        assert config.rslora


def test_moe_expert_factors_by_hand():
    """PEFT's layout, read off its ParamWrapper: lora_A rows e·r + k, lora_B columns k·E + e."""
    smollm2, cfg, params, ids, pos, layouts = _moe()
    _, trainable, config = import_peft(MOE / "experts", params, module_name=smollm2.hf_module_name,
                                       layouts=layouts, experts=EXPERTS)
    tensors = load_file(MOE / "experts" / "adapter_model.safetensors")
    key = "base_model.model.model.layers.1.mlp.experts.lora_{}.weight"  # the outer wrapper: down_proj
    big_a, big_b = tensors[key.format("A")], tensors[key.format("B")]
    ad = trainable["params"]["layers_1"]["mlp"]["experts"]["down_proj"]
    E, r = 4, 2
    for e in range(E):
        a_e = big_a[e * r:(e + 1) * r]  # (r, in)
        b_e = big_b[:, [k * E + e for k in range(r)]]  # (out, r)
        np.testing.assert_array_equal(ad["a"][e], a_e.T)
        np.testing.assert_array_equal(ad["b"][e], b_e.T)
    merged = jlora.merge(params, trainable, config)
    delta = merged["params"]["layers_1"]["mlp"]["experts"]["down_proj"] - params["params"]["layers_1"]["mlp"][
        "experts"]["down_proj"]
    np.testing.assert_allclose(delta[2], (6 / 2) * (big_b[:, [2, 6]] @ big_a[4:6]).T, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", ["experts", "experts_attention"])
def test_moe_export_of_import_reproduces_peft_files(name, tmp_path):
    smollm2, cfg, params, ids, pos, layouts = _moe()
    _, trainable, config = import_peft(MOE / name, params, module_name=smollm2.hf_module_name,
                                       layouts=layouts, experts=EXPERTS)
    export_peft(tmp_path, trainable, config, module_name=smollm2.hf_module_name, experts=EXPERTS)
    got, want = (load_file(d / "adapter_model.safetensors") for d in (tmp_path, MOE / name))
    assert sorted(got) == sorted(want)
    for key in want:
        np.testing.assert_array_equal(got[key], want[key], err_msg=key)
    ours, peft = (json.loads((d / "adapter_config.json").read_text()) for d in (tmp_path, MOE / name))
    params_written = ours["target_parameters"]
    assert all(any(p.endswith("." + t) for t in peft["target_parameters"]) for p in params_written)
    assert len(params_written) == 2 * cfg.n_layers and ours["lora_dropout"] == 0.0
    for p in params_written:  # the ranks PEFT resolves for each parameter are the same
        rank = _pattern_value(ours["rank_pattern"], p, ours["r"])
        assert rank == _pattern_value(peft["rank_pattern"], p, peft["r"])


def test_moe_scanned_stack_writes_the_unrolled_file_and_reads_back(tmp_path):
    smollm2, cfg, params, ids, pos, layouts = _moe()
    config = jlora.LoraConfig(rank=2, alpha=4.0, targets=layouts.targets)
    frozen, trainable = jlora.init(jax.random.key(0), params, config)
    trainable = bump(trainable, 0.3)
    export_peft(tmp_path / "flat", trainable, config, module_name=smollm2.hf_module_name, experts=EXPERTS)

    scfg, sparams = smollm2.scanned(cfg, params)
    slay = jlora.infer_layouts(jlora.LoraConfig(rank=2, alpha=4.0, targets=MOE_TARGETS),
                               smollm2.Llama(scfg).apply, sparams, ids, pos)
    assert {r.stack_axes for r in slay.targets if "experts" in r.pattern} == {(0, 1)}  # layers, experts
    _, strain = smollm2.scanned(cfg, trainable)
    export_peft(tmp_path / "scan", strain, slay, module_name=smollm2.hf_module_name, experts=EXPERTS)
    flat, scan = (load_file(tmp_path / d / "adapter_model.safetensors") for d in ("flat", "scan"))
    assert sorted(flat) == sorted(scan)
    for key in flat:
        np.testing.assert_array_equal(flat[key], scan[key], err_msg=key)

    _, back, bcfg = import_peft(tmp_path / "scan", sparams, module_name=smollm2.hf_module_name, layouts=slay,
                                experts=EXPERTS)
    jax.tree.map(np.testing.assert_array_equal, back, strain)
    want, _ = jlora.wrap(smollm2.Llama(cfg).apply, config)(frozen, trainable, ids, pos)
    got, _ = jlora.wrap(smollm2.Llama(scfg).apply, bcfg)(sparams, back, ids, pos)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_moe_refusals_name_the_kernels_and_the_fix(tmp_path):
    smollm2, cfg, params, ids, pos, layouts = _moe()
    config = jlora.LoraConfig(rank=2, targets=layouts.targets)
    _, trainable = jlora.init(jax.random.key(0), params, config)
    with pytest.raises(ValueError, match=r"params/layers_0/mlp/experts/down_proj and params/layers_0/mlp/"
                                         r"experts/gate_up_proj .* matched by one experts pattern "
                                         r"'\.\*/experts/\.\*'; give one pattern per parameter"):
        export_peft(tmp_path / "x", trainable, config, module_name=smollm2.hf_module_name,
                    experts=r".*/experts/.*")
    no_stack = jlora.LoraConfig(rank=2, targets=r".*/experts/.*")  # layouts unknown: no expert axis
    _, plain = jlora.init(jax.random.key(0), params, no_stack)
    with pytest.raises(ValueError, match=r"params/layers_0/mlp/experts/down_proj \(shape \(4, 12, 16\)\) is "
                                         r"no expert kernel PEFT can adapt: it has no stack axis"):
        export_peft(tmp_path / "y", plain, no_stack, module_name=smollm2.hf_module_name, experts=EXPERTS)
    with pytest.raises(ValueError, match=r"map to no leaf of params.*the file adapts the parameters "
                                         r"\['mlp\.experts\.gate_up_proj'.*pass experts="):
        import_peft(MOE / "experts", params, module_name=smollm2.hf_module_name, layouts=layouts)
    with pytest.raises(ValueError, match=r"experts pattern matches it, but layouts give it no stack axis"):
        import_peft(MOE / "experts", params, module_name=smollm2.hf_module_name, experts=EXPERTS)
    with pytest.raises(ValueError, match=r"fan_in_fan_out \(passed, or read off 2-D kernels used "
                                         r"transposed\) beside expert kernels: PEFT refuses it"):
        export_peft(tmp_path / "w", trainable, config, module_name=smollm2.hf_module_name, experts=EXPERTS,
                    fan_in_fan_out=True)
    with pytest.raises(TypeError, match=r"experts must be a regex"):
        export_peft(tmp_path / "z", trainable, config, experts=3)
    assert not any((tmp_path / d).exists() for d in "wxyz")


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.data())
def test_fuzz_expert_files_only_documented_errors_escape(tmp_path, data):
    """PEFT's expert factors with shape lies, dropped keys and junk config fields: one ValueError."""
    smollm2, cfg, params, ids, pos, layouts = _moe()
    folder = tmp_path / "experts"
    shutil.rmtree(folder, ignore_errors=True)
    shutil.copytree(MOE / "experts", folder)
    tensors = load_file(folder / "adapter_model.safetensors")
    for _ in range(data.draw(st.integers(1, 3))):
        key = data.draw(st.sampled_from(sorted(tensors)))
        action = data.draw(st.sampled_from(["shape", "drop", "rank"]))
        if action == "drop":
            tensors.pop(key, None)
        elif action == "shape":
            shape = tuple(data.draw(st.lists(st.integers(0, 40), min_size=1, max_size=3)))
            tensors[key] = np.ones(shape, np.float32)
        else:
            config = json.loads((folder / "adapter_config.json").read_text())
            config[data.draw(st.sampled_from(["r", "target_parameters", "rank_pattern"]))] = data.draw(_JUNK)
            (folder / "adapter_config.json").write_text(json.dumps(config))
    if tensors:
        save_file(tensors, folder / "adapter_model.safetensors")
    try:
        import_peft(folder, params, module_name=smollm2.hf_module_name, layouts=layouts, experts=EXPERTS)
    except DOCUMENTED as e:
        assert str(folder) in str(e) or "import_peft" in str(e), e


# --------------------------------------------------------------------------- live, with torch and peft


def test_live_round_trip_through_peft(tmp_path):
    """jlora -> PEFT (PeftModel.from_pretrained) -> outputs equal -> PEFT save_pretrained -> jlora."""
    torch = pytest.importorskip("torch")
    peft = pytest.importorskip("peft")
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    torch_config = transformers.BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=2,
                                           num_attention_heads=2, intermediate_size=32,
                                           max_position_embeddings=16, num_labels=3)
    torch_model = transformers.BertForSequenceClassification(torch_config).eval()
    params = torch_to_flax({k: v.numpy() for k, v in torch_model.state_dict().items()})
    config = jlora.LoraConfig(rank=4, alpha=8.0, train_in_full=r"params/classifier/.*", targets=(
        jlora.Rule(pattern=r".*/layer/0/.*/(query|value)/kernel", rank=2, alpha=3.0),
        r".*/(query|key|value|dense)/kernel", r".*/word_embeddings/embedding"))
    frozen, trainable = jlora.init(jax.random.key(0), params, config)
    trainable = bump(trainable, 0.1)
    ids = np.array([[3, 7, 1, 9, 4], [2, 8, 8, 5, 0]], np.int32)
    mask = np.array([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]], np.int32)
    want = jlora.wrap(BertClassifier().apply, config)(frozen, trainable, ids, mask)
    assert np.max(np.abs(want[1] - BertClassifier().apply(params, ids, mask)[1])) > 1e-2

    export_peft(tmp_path / "jlora", trainable, config)
    peft_model = peft.PeftModel.from_pretrained(torch_model, tmp_path / "jlora").eval()
    with torch.no_grad():
        out = peft_model(input_ids=torch.tensor(ids, dtype=torch.long),
                         attention_mask=torch.tensor(mask, dtype=torch.long), output_hidden_states=True)
    np.testing.assert_allclose(out.logits.numpy(), want[0], rtol=0, atol=1e-5)
    np.testing.assert_allclose(out.hidden_states[-1].numpy(), want[1], rtol=0, atol=1e-5)

    peft_model.save_pretrained(tmp_path / "peft")
    frozen2, trainable2, config2 = import_peft(tmp_path / "peft", params)
    got = jlora.wrap(BertClassifier().apply, config2)(frozen2, trainable2, ids, mask)
    for g, w in zip(got, want, strict=True):
        np.testing.assert_allclose(g, w, rtol=1e-6, atol=1e-7)


def test_live_conv_dora_through_peft(tmp_path):
    """A jlora DoRA adapter on Conv2d + Linear loads into PEFT and computes the same."""
    torch = pytest.importorskip("torch")
    peft = pytest.importorskip("peft")
    sys.path.insert(0, str(FIXTURES.parent))
    import make_peft_fixtures

    torch.manual_seed(0)
    torch_model = make_peft_fixtures.tiny_conv().eval()
    params = torch_to_flax({k: v.numpy() for k, v in torch_model.state_dict().items()})
    config = jlora.LoraConfig(rank=2, alpha=3.0, dora=True, targets=(
        jlora.Rule(pattern=r".*/conv1/kernel", rank=3), r".*/(conv2|head)/kernel"))
    frozen, trainable = jlora.init(jax.random.key(0), params, config)
    trainable = bump(trainable, 0.1)
    x = np.random.default_rng(0).normal(size=(2, 3, 8, 8)).astype(np.float32)
    want = jlora.wrap(TinyConv().apply, config)(frozen, trainable, x)
    assert np.max(np.abs(want - TinyConv().apply(params, x))) > 1e-2

    export_peft(tmp_path, trainable, config, conv=CONV)
    peft_model = peft.PeftModel.from_pretrained(torch_model, tmp_path).eval()
    with torch.no_grad():
        got = peft_model(torch.tensor(x)).numpy()
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-5)


def test_live_gpt2_conv1d_through_peft(tmp_path):
    """jlora adapters on FlaxGPT2's (out, in) kernels load into PEFT's Conv1D GPT-2 and compute the same,
    both ways."""
    torch = pytest.importorskip("torch")
    peft = pytest.importorskip("peft")
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    torch_model = transformers.GPT2LMHeadModel(transformers.GPT2Config(
        vocab_size=GPT2["vocab"], n_positions=GPT2["positions"], n_embd=GPT2["d"], n_layer=GPT2["layers"],
        n_head=GPT2["heads"])).eval()
    params = gpt2_to_flax({k: v.numpy() for k, v in torch_model.state_dict().items()
                           if k != "lm_head.weight"})
    config = jlora.LoraConfig(rank=4, alpha=8.0, targets=(  # jlora.infer_layouts gives these in_axes
        jlora.Rule(pattern=r".*/attn/c_proj/kernel", rank=2, alpha=3.0, in_axes=(1,)),  # the square one
        jlora.Rule(pattern=r".*/(c_attn|c_proj|c_fc)/kernel", in_axes=(1,))))
    frozen, trainable = jlora.init(jax.random.key(0), params, config)
    trainable = _random(jax.eval_shape(lambda: trainable), seed=4)
    ids = np.array([[3, 7, 1, 9, 4, 11], [2, 8, 8, 5, 0, 49]], np.int32)
    want = jlora.wrap(GPT2LM().apply, config)(frozen, trainable, ids)
    assert np.max(np.abs(want - GPT2LM().apply(params, ids))) > 1e-2

    export_peft(tmp_path / "jlora", trainable, config)
    peft_model = peft.PeftModel.from_pretrained(torch_model, tmp_path / "jlora").eval()
    with torch.no_grad():
        got = peft_model(input_ids=torch.tensor(ids, dtype=torch.long)).logits.numpy()
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-5)

    peft_model.save_pretrained(tmp_path / "peft")
    frozen2, trainable2, config2 = import_peft(tmp_path / "peft", params)
    np.testing.assert_allclose(jlora.wrap(GPT2LM().apply, config2)(frozen2, trainable2, ids), want,
                               rtol=0, atol=1e-6)


def test_live_moe_through_peft(tmp_path):
    """A jlora adapter on a Mixtral's experts and attention loads into PEFT and computes the same."""
    torch = pytest.importorskip("torch")
    peft = pytest.importorskip("peft")
    transformers = pytest.importorskip("transformers")
    smollm2, cfg, params, ids, pos, layouts = _moe()
    config = jlora.LoraConfig(rank=3, alpha=5.0, targets=layouts.targets)
    frozen, trainable = jlora.init(jax.random.key(1), params, config)
    trainable = bump(trainable, 0.3)
    want, _ = jlora.wrap(smollm2.Llama(cfg).apply, config)(frozen, trainable, ids, pos)
    export_peft(tmp_path, trainable, config, module_name=smollm2.hf_module_name, experts=EXPERTS)
    model = transformers.MixtralForCausalLM(transformers.MixtralConfig.from_json_file(MOE / "config.json"))
    state = {k: torch.from_numpy(np.array(v)) for k, v in smollm2.to_hf(params).items()}
    model.load_state_dict(state, strict=False)
    model.tie_weights()
    peft_model = peft.PeftModel.from_pretrained(model.eval(), tmp_path).eval()
    with torch.no_grad():
        got = peft_model(torch.tensor(np.asarray(ids), dtype=torch.long)).logits.numpy()
    np.testing.assert_allclose(got, want, rtol=0, atol=2e-5)
