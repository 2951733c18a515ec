"""llama.cpp adapters: export_gguf / import_gguf against a small Llama base GGUF written here.

The base file is made the way llama.cpp's converter makes one: torch-layout ``(out, in)``
weights under llama.cpp's names, the rows of ``attn_q``/``attn_k`` permuted for its RoPE.
The adapter is checked by applying it as llama.cpp does (``W + alpha/r · B·A`` on the GGUF
tensors) and comparing with `jlora.merge` in the same layout.
"""

import dataclasses
import os
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import jlora
from jlora._gguf import permute_rows, unpermute_rows
from jlora._paths import flatten

gguf = pytest.importorskip("gguf", reason="pip install gguf (jlora[gguf]; make install does)")

D, N, K, H, F = 16, 4, 2, 4, 24  # d_model, heads, kv heads, head dim, MLP width
NAMES = {"q_proj": "attn_q", "k_proj": "attn_k", "v_proj": "attn_v", "o_proj": "attn_output",
         "up_proj": "ffn_up", "down_proj": "ffn_down"}
SHAPES = {"q_proj": (D, N, H), "k_proj": (D, K, H), "v_proj": (D, K, H), "o_proj": (N, H, D),
          "up_proj": (D, F), "down_proj": (F, D)}
IN_AXES = {"o_proj": (0, 1)}  # the rest: input axis 0
CONFIG = jlora.LoraConfig(rank=2, alpha=4.0, targets=tuple(
    jlora.Rule(pattern=rf".*/{m}/kernel", in_axes=IN_AXES.get(m, (0,))) for m in SHAPES))


def tensor_name(path: str) -> str | None:
    parts = path.split("/")
    if len(parts) == 4 and parts[3] == "kernel":
        return f"blk.{parts[1].removeprefix('layers_')}.{NAMES[parts[2]]}.weight"
    return None


def _params(seed=0, layers=2):
    rng = np.random.default_rng(seed)
    return {"params": {f"layers_{i}": {m: {"kernel": jnp.asarray(rng.normal(size=s), jnp.float32)}
                                       for m, s in SHAPES.items()} for i in range(layers)}}


def _torch_weight(module: str, kernel: np.ndarray) -> np.ndarray:
    """``(out, in)`` of an einsum kernel whose input axes lead."""
    n_in = len(IN_AXES.get(module, (0,)))
    return kernel.reshape(int(np.prod(kernel.shape[:n_in])), -1).T


def _write_base(path, params, arch="llama"):
    """A base GGUF as llama.cpp's converter writes one: torch layout, q/k rows permuted."""
    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_uint32(f"{arch}.attention.head_count", N)
    writer.add_uint32(f"{arch}.attention.head_count_kv", K)
    for path_, w in flatten(params).items():
        module = path_.split("/")[2]
        t = _torch_weight(module, np.asarray(w))
        heads = {"q_proj": N, "k_proj": K}.get(module)
        if heads and arch == "llama":
            t = permute_rows(t, heads)
        writer.add_tensor(tensor_name(path_), np.ascontiguousarray(t, np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def _trained(params, config=CONFIG, seed=1):
    _, trainable = jlora.init(jax.random.key(seed), params, config)
    noise = jax.random.key(seed + 100)
    return jax.tree.map(lambda x: x + 0.1 * jax.random.normal(noise, x.shape), trainable)


@pytest.fixture
def setup(tmp_path):
    params = _params()
    return params, _trained(params), _write_base(tmp_path / "base.gguf", params), tmp_path


def test_round_trip_is_bit_exact(setup):
    params, trainable, base, tmp = setup
    jlora.export_gguf(tmp / "adapter.gguf", trainable, CONFIG, base=base, tensor_name=tensor_name,
                      frozen=params)
    frozen, back, config = jlora.import_gguf(tmp / "adapter.gguf", params, base=base, tensor_name=tensor_name,
                                             layouts=CONFIG)
    assert frozen is params
    want, got = flatten(trainable), flatten(back)
    assert sorted(got) == sorted(want)
    for p, x in want.items():
        np.testing.assert_array_equal(got[p], x, err_msg=p)
    assert (config.rank, config.alpha) == (2, 4.0)
    for p, w in flatten(jlora.merge(params, trainable, CONFIG)).items():
        np.testing.assert_array_equal(flatten(jlora.merge(params, back, config))[p], w, err_msg=p)


def test_the_file_is_what_llama_cpp_reads_and_applies(setup):
    params, trainable, base, tmp = setup
    jlora.export_gguf(tmp / "adapter.gguf", trainable, CONFIG, base=base, tensor_name=tensor_name)
    reader = gguf.GGUFReader(tmp / "adapter.gguf")
    meta = {k: reader.fields[k].contents() for k in ("general.type", "general.architecture", "adapter.type",
                                                      "adapter.lora.alpha")}
    assert meta == {"general.type": "adapter", "general.architecture": "llama", "adapter.type": "lora",
                    "adapter.lora.alpha": 4.0}
    factors = {t.name: t for t in reader.tensors}
    assert sorted(factors) == sorted(f"blk.{i}.{n}.weight.lora_{x}" for i in range(2) for n in NAMES.values()
                                     for x in "ab")
    base_tensors = {t.name: np.asarray(t.data) for t in gguf.GGUFReader(base).tensors}
    merged = flatten(jlora.merge(params, trainable, CONFIG))
    for path_, w in merged.items():
        name, module = tensor_name(path_), path_.split("/")[2]
        a, b = factors[name + ".lora_a"], factors[name + ".lora_b"]
        want = _torch_weight(module, np.asarray(w))  # (out, in); its GGUF ne is (in, out)
        # llama.cpp's checks: a.ne[0] is the weight's ne[0] (in), b.ne[1] its ne[1] (out), a.ne[1] == b.ne[0]
        assert [int(n) for n in a.shape] == [want.shape[1], 2]
        assert [int(n) for n in b.shape] == [2, want.shape[0]]
        scale = meta["adapter.lora.alpha"] / int(b.shape[0])  # llama.cpp: alpha / b.ne[0]
        applied = base_tensors[name] + scale * (np.asarray(b.data) @ np.asarray(a.data))
        heads = {"q_proj": N, "k_proj": K}.get(module)
        if heads:
            want = permute_rows(want, heads)
        np.testing.assert_allclose(applied, want, atol=1e-5, rtol=1e-5, err_msg=path_)


def test_rows_are_not_permuted_for_other_architectures(setup):
    params, trainable, _, tmp = setup
    base = _write_base(tmp / "qwen.gguf", params, arch="qwen2")
    jlora.export_gguf(tmp / "adapter.gguf", trainable, CONFIG, base=base, tensor_name=tensor_name)
    tensors = {t.name: np.asarray(t.data) for t in gguf.GGUFReader(tmp / "adapter.gguf").tensors}
    b = tensors["blk.0.attn_q.weight.lora_b"]
    q = np.asarray(flatten(trainable)["params/layers_0/q_proj/kernel/b"])
    np.testing.assert_array_equal(b, q.reshape(2, -1).T)
    assert gguf.GGUFReader(tmp / "adapter.gguf").fields["general.architecture"].contents() == "qwen2"


def test_a_scanned_stack_writes_the_unrolled_file_and_reads_back(setup):
    """Layers stacked on axis 0 (nn.scan): one base tensor per layer, named by tensor_name(path, index)."""
    params, trainable, base, tmp = setup
    jlora.export_gguf(tmp / "flat.gguf", trainable, CONFIG, base=base, tensor_name=tensor_name)
    layers = [params["params"][f"layers_{i}"] for i in range(2)]
    stacked = {"params": {"layers": jax.tree.map(lambda *x: jnp.stack(x), *layers)}}
    stacked_trainable = {"params": {"layers": jax.tree.map(
        lambda *x: jnp.stack(x), *[trainable["params"][f"layers_{i}"] for i in range(2)])}}
    scanned = jlora.LoraConfig(rank=2, alpha=4.0, targets=tuple(
        jlora.Rule(pattern=rf".*/{m}/kernel", in_axes=tuple(1 + i for i in IN_AXES.get(m, (0,))),
                   stack_axes=(0,)) for m in SHAPES))

    def stacked_name(path, index):
        module = path.split("/")[2]
        return f"blk.{index[0]}.{NAMES[module]}.weight"

    jlora.export_gguf(tmp / "scan.gguf", stacked_trainable, scanned, base=base, tensor_name=stacked_name)
    flat, scan = ({t.name: np.asarray(t.data) for t in gguf.GGUFReader(tmp / f).tensors}
                  for f in ("flat.gguf", "scan.gguf"))
    assert sorted(flat) == sorted(scan) and len(flat) == 2 * 2 * len(SHAPES)
    for name, x in flat.items():
        np.testing.assert_array_equal(scan[name], x, err_msg=name)
    _, back, config = jlora.import_gguf(tmp / "scan.gguf", stacked, base=base, tensor_name=stacked_name,
                                        layouts=scanned)
    jax.tree.map(np.testing.assert_array_equal, back, stacked_trainable)
    assert {r.stack_axes for r in config.targets} == {(0,)}
    merged = flatten(jlora.merge(stacked, back, config))
    for i in range(2):
        for p, w in flatten(jlora.merge(params, trainable, CONFIG)).items():
            if f"layers_{i}/" in p:
                np.testing.assert_allclose(merged[p.replace(f"layers_{i}", "layers")][i], w, rtol=1e-6,
                                           atol=1e-6)
    with pytest.raises(ValueError, match=r"blk\.1\.attn_q\.weight: maps to no leaf of params.*\n.*"
                                         r"params/layers/q_proj/kernel: the file has 1 of its 2 layers; "
                                         r"missing layers \[\(1,\)\]"):
        jlora.import_gguf(tmp / "scan.gguf", stacked, base=base, layouts=scanned, tensor_name=lambda p, i: (
            None if i == (1,) and "q_proj" in p else stacked_name(p, i)))


def test_permutation_inverts():
    x = np.arange(48.0).reshape(24, 2)
    for heads in (1, 3, 6):
        np.testing.assert_array_equal(unpermute_rows(permute_rows(x, heads), heads), x)


@pytest.mark.parametrize("change, match", [
    (dict(dora=True), r"export_gguf: DoRA: llama\.cpp's adapters hold lora_a and lora_b only"),
    (dict(nonlinearity="gelu"), r"export_gguf: nonlinearity='gelu': .*llama\.cpp applies s·x·a·b"),
])
def test_variants_llama_cpp_cannot_hold_are_refused(setup, change, match):
    params, _, base, tmp = setup
    config = dataclasses.replace(CONFIG, **change)
    _, trainable = jlora.init(jax.random.key(0), params, config)
    with pytest.raises(ValueError, match=match):
        jlora.export_gguf(tmp / "a.gguf", trainable, config, base=base, tensor_name=tensor_name)
    assert not (tmp / "a.gguf").exists()


def test_every_problem_is_listed_at_once_and_nothing_is_written(setup):
    params, trainable, base, tmp = setup
    (tmp / "a.gguf").write_bytes(b"old")

    def names(path):
        if "layers_1/up_proj" in path:
            return "blk.7.ffn_up.weight"  # not in the base
        if "layers_1/down_proj" in path:
            return "blk.1.ffn_up.weight"  # in the base, other shape
        if "layers_1/v_proj" in path:
            return "blk.0.attn_v.weight"  # layer 0's v too
        return tensor_name(path)

    with pytest.raises(ValueError, match=r"export_gguf: cannot write a llama\.cpp adapter") as error:
        jlora.export_gguf(tmp / "a.gguf", trainable, CONFIG, base=base, tensor_name=names)
    for line in (r"layers_1/up_proj/kernel: 'blk\.7\.ffn_up\.weight' is no tensor of .*base\.gguf \(e\.g\. "
                 r"blk\.0\.ffn_up\.weight",
                 r"layers_1/down_proj/kernel: 'blk\.1\.ffn_up\.weight' is \(24, 16\) \(out, in\) in .*, the "
                 r"kernel is \(16, 24\)",
                 r"layers_0/v_proj/kernel and params/layers_1/v_proj/kernel both map to "
                 r"'blk\.0\.attn_v\.weight'"):
        assert re.search(line, str(error.value)), line
    assert (tmp / "a.gguf").read_bytes() == b"old" and sorted(os.listdir(tmp)) == ["a.gguf", "base.gguf"]


def test_scales_that_differ_and_leaves_trained_in_full_are_refused(setup):
    params, _, base, tmp = setup
    rules = CONFIG.targets[:-1] + (jlora.Rule(pattern=r".*/down_proj/kernel", rank=4),)
    config = jlora.LoraConfig(rank=2, alpha=4.0, targets=tuple(r for r in rules if "up_proj" not in r.pattern)
                              + (jlora.Rule(pattern=r".*/layers_1/up_proj/kernel"),),
                              train_in_full=(r".*/layers_0/up_proj/kernel",))
    _, trainable = jlora.init(jax.random.key(0), params, config)
    with pytest.raises(ValueError, match=r"(?s)layers_0/up_proj/kernel: trained in full.*the adapters' "
                                         r"scales differ"):
        jlora.export_gguf(tmp / "a.gguf", trainable, config, base=base, tensor_name=tensor_name)


def test_import_refuses_what_is_not_this_models_adapter(setup):
    params, trainable, base, tmp = setup
    with pytest.raises(FileNotFoundError, match=r"import_gguf: .*missing\.gguf does not exist"):
        jlora.import_gguf(tmp / "missing.gguf", params, base=base, tensor_name=tensor_name)
    (tmp / "junk.gguf").write_bytes(b"GGUF" + b"\x00" * 40)
    with pytest.raises(ValueError, match=r"import_gguf: .*junk\.gguf is not a readable GGUF file"):
        jlora.import_gguf(tmp / "junk.gguf", params, base=base, tensor_name=tensor_name)
    with pytest.raises(ValueError, match=r"import_gguf: .*base\.gguf: general\.type is .*not 'adapter'|no "
                                         r"'general\.type' field"):
        jlora.import_gguf(base, params, base=base, tensor_name=tensor_name)
    jlora.export_gguf(tmp / "a.gguf", trainable, CONFIG, base=base, tensor_name=tensor_name)
    other = _write_base(tmp / "qwen.gguf", params, arch="qwen2")
    with pytest.raises(ValueError, match=r"a\.gguf is for architecture 'llama', .*qwen\.gguf is 'qwen2'"):
        jlora.import_gguf(tmp / "a.gguf", params, base=other, tensor_name=tensor_name)
    with pytest.raises(ValueError, match=r"blk\.0\.attn_q\.weight: maps to no leaf of params; pass the "
                                         r"tensor_name the adapter was exported with"):
        jlora.import_gguf(tmp / "a.gguf", params, base=base,
                          tensor_name=lambda p: None if "layers_0/q_proj" in p else tensor_name(p))


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_fuzz_a_damaged_adapter_is_one_value_error(setup, data):
    params, trainable, base, tmp = setup
    good = tmp / "good.gguf"
    if not good.exists():
        jlora.export_gguf(good, trainable, CONFIG, base=base, tensor_name=tensor_name)
    raw = bytearray(good.read_bytes())
    if data.draw(st.booleans(), label="truncate"):
        raw = raw[: data.draw(st.integers(0, len(raw) - 1), label="length")]
    for _ in range(data.draw(st.integers(0, 8), label="flips")):
        if raw:
            raw[data.draw(st.integers(0, len(raw) - 1))] ^= 1 << data.draw(st.integers(0, 7))
    bad = tmp / "bad.gguf"
    bad.write_bytes(bytes(raw))
    try:
        jlora.import_gguf(bad, params, base=base, tensor_name=tensor_name, layouts=CONFIG)
    except ValueError as e:
        assert "bad.gguf" in str(e) or "blk." in str(e) or "ranks" in str(e), e


def test_export_replaces_a_file_atomically(setup, monkeypatch):
    params, trainable, base, tmp = setup
    path = tmp / "a.gguf"
    jlora.export_gguf(path, trainable, CONFIG, base=base, tensor_name=tensor_name)
    before = path.read_bytes()

    def boom(self, *args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(gguf.GGUFWriter, "write_tensors_to_file", boom)
    with pytest.raises(OSError, match="disk full"):
        jlora.export_gguf(path, _trained(params, seed=5), CONFIG, base=base, tensor_name=tensor_name)
    assert path.read_bytes() == before and sorted(os.listdir(tmp)) == ["a.gguf", "base.gguf"]
