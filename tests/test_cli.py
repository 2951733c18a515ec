"""python -m jlora: inspect, merge, export-peft, import-peft, and one-line errors."""

import json
import re
import subprocess
import sys
from pathlib import Path

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from models import bump
from safetensors.numpy import save_file

import jlora
from jlora._checkpoint import save
from jlora._cli import main
from jlora._paths import flatten


@pytest.fixture
def setup(tmp_path):
    model = nn.Sequential([nn.Dense(8, name="up"), nn.relu, nn.Dense(3, name="down")])
    x = jnp.ones((2, 4))
    params = model.init(jax.random.key(0), x)
    cfg = jlora.LoraConfig(rank=2, alpha=4.0, targets=r".*/kernel")
    frozen, trainable = jlora.init(jax.random.key(1), params, cfg)
    trainable = bump(trainable)
    base = tmp_path / "base.safetensors"
    save_file({k: np.asarray(v) for k, v in flatten(params).items()}, str(base))
    save(tmp_path / "adapter", trainable, cfg, frozen=frozen)
    return model, x, params, trainable, cfg, tmp_path, base


def test_help_and_bad_input_exit_nonzero_with_one_line(tmp_path):
    out = subprocess.run([sys.executable, "-m", "jlora", "merge", "--help"], capture_output=True, text=True)
    assert out.returncode == 0 and "adapter strength" in out.stdout
    out = subprocess.run([sys.executable, "-m", "jlora", "inspect", str(tmp_path / "nothing")],
                         capture_output=True, text=True)
    assert out.returncode != 0
    assert len(out.stderr.strip().splitlines()) == 1 and out.stderr.startswith("jlora inspect: error:")


def test_inspect_merge_and_peft_round_trip(setup, capsys):
    model, x, params, trainable, cfg, tmp, base = setup
    assert main(["inspect", str(tmp / "adapter")]) == 0
    assert '"rank": 2' in capsys.readouterr().out
    assert main(["merge", str(tmp / "adapter"), str(base), str(tmp / "merged.safetensors")]) == 0
    from safetensors.numpy import load_file

    merged = jlora._paths.nest({k: jnp.asarray(v)
                                for k, v in load_file(str(tmp / "merged.safetensors")).items()})
    want = jlora.wrap(model.apply, cfg)(params, trainable, x)
    np.testing.assert_allclose(model.apply(merged, x), want, rtol=1e-5, atol=1e-6)
    assert main(["export-peft", str(tmp / "adapter"), str(base), str(tmp / "peft")]) == 0
    assert json.loads((tmp / "peft" / "adapter_config.json").read_text())["r"] == 2
    assert main(["inspect", str(tmp / "peft")]) == 0
    assert "lora_A.weight" in capsys.readouterr().out
    assert main(["import-peft", str(tmp / "peft"), str(base), str(tmp / "back")]) == 0
    back, back_cfg = jlora._checkpoint.restore(tmp / "back", params)
    np.testing.assert_allclose(jlora.wrap(model.apply, back_cfg)(params, back, x), want, rtol=1e-6)


def test_merge_refuses_to_overwrite(setup, capsys):
    _, _, _, _, _, tmp, base = setup
    assert main(["merge", str(tmp / "adapter"), str(base), str(base)]) == 1
    assert "exists; choose a new output path" in capsys.readouterr().err


# ----------------------------------------------------------------------------- paths and bad input


def test_every_command_takes_relative_and_home_paths(setup, monkeypatch, capsys):
    model, x, params, trainable, cfg, tmp, base = setup
    monkeypatch.chdir(tmp)
    monkeypatch.setenv("HOME", str(tmp))
    assert main(["inspect", "adapter"]) == 0
    assert main(["merge", "adapter", "base.safetensors", "merged.safetensors"]) == 0
    assert main(["merge", "~/adapter", "~/base.safetensors", "~/merged2.safetensors", "--scale", "0.5"]) == 0
    assert main(["export-peft", "adapter", "~/base.safetensors", "peft"]) == 0
    assert main(["import-peft", "peft", "base.safetensors", "ckpt/back"]) == 0
    assert main(["inspect", "~/ckpt/back"]) == 0
    assert capsys.readouterr().err == ""
    assert {p.name for p in tmp.iterdir()} >= {"merged.safetensors", "merged2.safetensors", "peft", "ckpt"}
    back, back_cfg = jlora.restore(tmp / "ckpt" / "back", params)
    np.testing.assert_allclose(jlora.wrap(model.apply, back_cfg)(params, back, x),
                               jlora.wrap(model.apply, cfg)(params, trainable, x), rtol=1e-6)


def _one_line_error(argv, capsys, command):
    """``main(argv)`` fails: exit 1, nothing on stdout, exactly one line on stderr; that line."""
    assert main(argv) == 1
    out = capsys.readouterr()
    lines = out.err.strip().splitlines()
    assert out.out == "" and len(lines) == 1, out.err
    assert lines[0].startswith(f"jlora {command}: error: ")
    return lines[0]


def _breakers(tmp, base):
    """Name: (how to break the inputs, argv, what the one error line says)."""
    header_len = int.from_bytes(base.read_bytes()[:8], "little")
    return {
        "truncated-base": (
            lambda: (tmp / "b.safetensors").write_bytes(base.read_bytes()[:8 + header_len // 2]),
            ["merge", "adapter", "b.safetensors", "out.safetensors"],
            r"b\.safetensors: not a readable \.safetensors file \(.*header"),
        "garbage-base": (lambda: (tmp / "b.safetensors").write_bytes(b"definitely not tensors"),
                         ["export-peft", "adapter", "b.safetensors", "peft"],
                         r"b\.safetensors: not a readable \.safetensors file \("),
        "empty-base": (lambda: (tmp / "b.safetensors").write_bytes(b""),
                       ["import-peft", "adapter", "b.safetensors", "ckpt"],
                       r"b\.safetensors: not a readable \.safetensors file \("),
        "missing-base": (lambda: None, ["merge", "adapter", "nothing.safetensors", "out.safetensors"],
                         r"base parameters nothing\.safetensors: no such file or directory\.$"),
        "base-not-params": (lambda: (tmp / "b.npz").write_bytes(b"x"), ["merge", "adapter", "b.npz", "out"],
                            r"b\.npz: base parameters must be a \.safetensors file or an Orbax checkpoint"),
        "bad-orbax-base": (lambda: (tmp / "empty_dir").mkdir(), ["merge", "adapter", "empty_dir", "out"],
                           r"empty_dir"),
        "missing-adapter": (lambda: None, ["merge", "nowhere", "base.safetensors", "out.safetensors"],
                            r"restore: no checkpoint at .*nowhere\.$"),
        "adapter-is-file": (lambda: None, ["merge", "base.safetensors", "base.safetensors", "o.safetensors"],
                            r"restore: .*base\.safetensors is a file; a checkpoint is a directory"),
        "out-exists": (lambda: None, ["merge", "adapter", "base.safetensors", "base.safetensors"],
                       r"base\.safetensors exists; choose a new output path \(nothing was written\)"),
        "out-dir-missing": (lambda: None, ["merge", "adapter", "base.safetensors", "no/dir/out.safetensors"],
                            r"no/dir/out\.safetensors: the directory no/dir does not exist; create it first"),
        "conflicting-keys": (lambda: save_file({"params/up": np.ones(2, np.float32),
                                                "params/up/kernel": np.ones((4, 8), np.float32)},
                                               str(tmp / "b.safetensors")),
                             ["merge", "adapter", "b.safetensors", "out.safetensors"],
                             r"b\.safetensors: key 'params/up' is both a leaf and a prefix of other keys"),
        "empty-key-part": (lambda: save_file({"params//kernel": np.ones(2, np.float32)},
                                             str(tmp / "b.safetensors")),
                           ["merge", "adapter", "b.safetensors", "out.safetensors"],
                           r"b\.safetensors: key 'params//kernel' has an empty part"),
        "inspect-nothing": (lambda: None, ["inspect", "nowhere"],
                            r"read_metadata: no checkpoint at .*nowhere\.$"),
        "inspect-bad-peft-json": (lambda: ((tmp / "p").mkdir(),
                                           (tmp / "p" / "adapter_config.json").write_text("{")),
                                  ["inspect", "p"], r"p/adapter_config\.json: not readable JSON \("),
        "inspect-peft-list": (lambda: ((tmp / "p").mkdir(),
                                       (tmp / "p" / "adapter_config.json").write_text("[1]")),
                              ["inspect", "p"],
                              r"p/adapter_config\.json: expected a JSON object, got list\."),
        "inspect-peft-bad-weights": (
            lambda: ((tmp / "p").mkdir(), (tmp / "p" / "adapter_config.json").write_text("{}"),
                     (tmp / "p" / "adapter_model.safetensors").write_bytes(b"\x01" * 20)),
            ["inspect", "p"], r"p/adapter_model\.safetensors: not a readable \.safetensors"),
        "corrupt-metadata": (
            lambda: (tmp / "adapter" / "lora_metadata" / "metadata").write_text('{"format": 1}'),
            ["inspect", "adapter"], r"read_metadata: .*adapter has corrupt jlora metadata: \"format\""),
    }


BREAKERS = list(_breakers(Path("."), Path(__file__)))


@pytest.mark.parametrize("name", BREAKERS)
def test_every_failure_is_one_line_on_stderr(setup, name, monkeypatch, capsys):
    *_, tmp, base = setup
    monkeypatch.chdir(tmp)
    breaks, argv, says = _breakers(tmp, base)[name]
    breaks()
    before = sorted(str(p) for p in tmp.rglob("*"))
    line = _one_line_error(argv, capsys, argv[0])
    assert re.search(says, line), line
    assert sorted(str(p) for p in tmp.rglob("*")) == before, "a failed command wrote something"


def test_a_subprocess_failure_prints_no_traceback(setup):
    *_, tmp, base = setup
    (tmp / "trunc.safetensors").write_bytes(base.read_bytes()[:40])
    (tmp / "empty_dir").mkdir()
    for argv in (["merge", "adapter", "trunc.safetensors", "out.safetensors"],
                 ["merge", "adapter", "empty_dir", "out"]):
        out = subprocess.run([sys.executable, "-m", "jlora", *argv], capture_output=True, text=True, cwd=tmp)
        assert out.returncode == 1 and len(out.stderr.strip().splitlines()) == 1, out.stderr
        assert out.stderr.startswith(f"jlora {argv[0]}: error: ") and "Traceback" not in out.stderr


# ---------------------------------------------------------------------------- fuzzing the files the CLI reads

from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers(-3, 2**40) | st.text(max_size=6)
    | st.sampled_from(["F32", "BF16", "I64", "lora", "float32", "params/up/kernel"]),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner, max_size=2),
    max_leaves=5,
)


def _nodes(value, keys=()):
    yield keys, value
    items = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, list) else ()
    for k, v in items:
        yield from _nodes(v, (*keys, k))


def _edit_json(draw, doc):
    """``doc`` with one node replaced by a random JSON value or removed (the root only replaced)."""
    keys, _ = draw(st.sampled_from(list(_nodes(doc))))
    if not keys:
        return draw(JSON_VALUES)
    doc = json.loads(json.dumps(doc))
    inner = doc
    for k in keys[:-1]:
        inner = inner[k]
    if draw(st.booleans()):
        inner[keys[-1]] = draw(JSON_VALUES)
    elif isinstance(inner, dict):
        del inner[keys[-1]]
    else:
        inner.pop(keys[-1])
    return doc


@st.composite
def _mutated_safetensors(draw, original: bytes) -> bytes:
    """The base file with its header edited, its header length changed, or its bytes cut or garbled."""
    n = int.from_bytes(original[:8], "little")
    header, data = json.loads(original[8:8 + n]), original[8 + n:]
    how = draw(st.sampled_from(["header", "length", "truncate", "garble"]))
    if how == "header":
        text = json.dumps(_edit_json(draw, header)).encode()
        return len(text).to_bytes(8, "little") + text + data
    if how == "length":
        return draw(st.integers(0, 2**64 - 1)).to_bytes(8, "little") + original[8:]
    if how == "truncate":
        return original[:draw(st.integers(0, len(original) - 1))]
    at = draw(st.integers(0, len(original) - 1))
    return original[:at] + draw(st.binary(min_size=1, max_size=4)) + original[at + 1:]


@settings(max_examples=60, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(data=st.data())
def test_fuzzed_files_give_one_line_or_success(setup, capsys, data):
    *_, tmp, base = setup
    original_base = base.read_bytes()
    meta = tmp / "adapter" / "lora_metadata" / "metadata"
    original_meta = meta.read_bytes()
    new_base, new_meta = original_base, original_meta  # every draw before any write
    if data.draw(st.booleans(), label="mutate the base (else the adapter's metadata)"):
        new_base = data.draw(_mutated_safetensors(original_base))
        argv = ["merge", str(tmp / "adapter"), str(base), str(tmp / "out.safetensors")]
    else:
        new_meta = json.dumps(_edit_json(data.draw, json.loads(original_meta))).encode()
        argv = [data.draw(st.sampled_from(["inspect", "merge"])), str(tmp / "adapter")]
        argv += [str(base), str(tmp / "out.safetensors")] if argv[0] == "merge" else []
    capsys.readouterr()
    try:
        base.write_bytes(new_base)
        meta.write_bytes(new_meta)
        code = main(argv)
        out = capsys.readouterr()
        if code != 0:
            assert code == 1 and out.out == "", out
            assert (len(out.err.strip().splitlines()) == 1
                    and out.err.startswith(f"jlora {argv[0]}: error: ")), out.err
            assert not (tmp / "out.safetensors").exists()
        else:
            assert out.err == ""
    finally:
        base.write_bytes(original_base)
        meta.write_bytes(original_meta)
        (tmp / "out.safetensors").unlink(missing_ok=True)


def _base_gguf(params, path: Path) -> Path:
    """A base GGUF holding the setup model's two kernels as llama.cpp names and lays them out."""
    import gguf  # noqa: PLC0415  (jlora[gguf]: optional)

    writer = gguf.GGUFWriter(str(path), "llama")
    for name, kernel in (("blk.0.ffn_up.weight", "layers_0"), ("blk.0.ffn_down.weight", "layers_2")):
        writer.add_tensor(name, np.ascontiguousarray(np.asarray(params["params"][kernel]["kernel"]).T))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def test_export_gguf_writes_what_import_gguf_reads(setup, capsys):
    pytest.importorskip("gguf")
    model, x, params, trainable, cfg, tmp, base = setup
    names = {"params/layers_0/kernel": "blk.0.ffn_up.weight",
             "params/layers_2/kernel": "blk.0.ffn_down.weight"}
    (tmp / "names.json").write_text(json.dumps(names))
    gguf_base = _base_gguf(params, tmp / "base.gguf")
    argv = ["export-gguf", str(tmp / "adapter"), str(base), str(gguf_base), str(tmp / "a.gguf"),
            "--tensor-names", str(tmp / "names.json")]
    assert main(argv) == 0 and "llama.cpp adapter written" in capsys.readouterr().out
    _, back, config = jlora.import_gguf(tmp / "a.gguf", params, base=gguf_base, tensor_name=names)
    for path, value in flatten(trainable).items():
        np.testing.assert_array_equal(flatten(back)[path], value, err_msg=path)
    assert config.alpha == 4.0 and config.rank == 2


@pytest.mark.parametrize("names, match", [
    ({"params/layers_0/kernel": "blk.0.ffn_up.weight"}, r"params/layers_2/kernel: tensor_name gave None"),
    ({"params/layers_0/kernel": "blk.0.ffn_up.weight", "params/layers_2/kernel": "blk.9.ffn_down.weight"},
     r"params/layers_2/kernel: 'blk\.9\.ffn_down\.weight' is no tensor of"),
    ("not json", r"names\.json: not a readable JSON file of base GGUF tensor name"),
    (["a"], r"names\.json: expected a JSON object of strings"),
    (None, r"base\.gguf is not a readable GGUF file"),
])
def test_export_gguf_failures_are_one_line_and_write_nothing(setup, capsys, names, match):
    pytest.importorskip("gguf")
    model, x, params, trainable, cfg, tmp, base = setup
    gguf_base = _base_gguf(params, tmp / "base.gguf")
    if names is None:  # a damaged base file
        gguf_base.write_bytes(gguf_base.read_bytes()[:40])
        names = {"params/layers_0/kernel": "blk.0.ffn_up.weight",
                 "params/layers_2/kernel": "blk.0.ffn_down.weight"}
    (tmp / "names.json").write_text(names if isinstance(names, str) else json.dumps(names))
    argv = ["export-gguf", str(tmp / "adapter"), str(base), str(gguf_base), str(tmp / "a.gguf"),
            "--tensor-names", str(tmp / "names.json")]
    line = _one_line_error(argv, capsys, "export-gguf")
    assert re.search(match, line), line
    assert not (tmp / "a.gguf").exists()


def _saved_with_layouts(tmp_path, model, x, targets):
    """``model``'s parameters as base.safetensors and a bumped adapter with inferred layouts (stack
    axes included) saved under ``tmp_path / "adapter"``; returns the base file's path."""
    params = model.init(jax.random.key(0), x)
    cfg = jlora.infer_layouts(jlora.LoraConfig(rank=2, targets=targets), model.apply, params, x)
    frozen, trainable = jlora.init(jax.random.key(1), params, cfg)
    base = tmp_path / "base.safetensors"
    save_file({k: np.asarray(v) for k, v in flatten(params).items()}, str(base))
    save(tmp_path / "adapter", bump(trainable), cfg, frozen=frozen)
    return base


def test_export_peft_of_a_scanned_stack_takes_a_names_file(tmp_path, capsys):
    from models import LinenScan  # noqa: PLC0415

    base = _saved_with_layouts(tmp_path, LinenScan(), jnp.ones((2, 16)), r".*/kernel")
    names = {"params/layers/up/kernel": "model.layers.{}.mlp.up_proj"}
    (tmp_path / "names.json").write_text(json.dumps(names))
    assert main(["export-peft", str(tmp_path / "adapter"), str(base), str(tmp_path / "peft"),
                 "--module-names", str(tmp_path / "names.json")]) == 0
    keys = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())["target_modules"]
    assert "model.layers.2.mlp.up_proj" in keys and "layers.2.down" in keys  # the rest take the default


def test_export_peft_writes_expert_stacks_as_target_parameters(tmp_path, capsys):
    class Experts(nn.Module):  # an expert stack consumed by a batched einsum, as in a MoE layer
        @nn.compact
        def __call__(self, x):
            w = self.param("gate_up_proj", nn.initializers.normal(), (3, 4, 6))
            return jnp.einsum("ETD,EDF->ETF", jnp.broadcast_to(x, (3, *x.shape)), w)

    base = _saved_with_layouts(tmp_path, Experts(), jnp.ones((5, 4)), r".*gate_up_proj")
    for name, experts in (("model.mlp.experts", ["--experts", ".*gate_up_proj"]),
                          ("model.mlp.experts.{}.gate_up_proj", [])):  # without: one Linear per expert
        (tmp_path / "names.json").write_text(json.dumps({"params/gate_up_proj": name}))
        assert main(["export-peft", str(tmp_path / "adapter"), str(base), str(tmp_path / "peft"),
                     "--module-names", str(tmp_path / "names.json"), *experts]) == 0
        config = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
        if experts:
            assert config["target_parameters"] == ["model.mlp.experts.gate_up_proj"]
            assert config["target_modules"] == []
        else:
            assert config["target_parameters"] is None
            assert config["target_modules"] == [f"model.mlp.experts.{e}.gate_up_proj" for e in range(3)]

