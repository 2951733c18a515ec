"""What the format modules share: the leaf-to-name mapping, one layer of a stack, atomic files."""

import os

import numpy as np
import pytest

import jlora
from jlora._foreign import name_mapping, one_layer, restack, stack_shape, with_index, write_file
from jlora._layout import Layout


def default(path, index):
    return "default." + path.replace("/", ".") + "".join(f".{i}" for i in index)


def test_every_form_of_mapping_is_one_function_of_path_and_index():
    two = name_mapping(lambda path, index: f"two.{index}", default, "arg", "name")
    assert two("a/kernel", ()) == "two.()" and two("a/kernel", (2,)) == "two.(2,)"
    one = name_mapping(lambda path: "model.layers.q", default, "arg", "name")
    assert one("a/kernel", ()) == "model.layers.q" and one("a/kernel", (4,)) == "model.layers.4.q"
    table = name_mapping({"a/kernel": "m.blocks.{}.a", "b/kernel": "m.blocks.b", "c/kernel": None}, default,
                         "arg", "name")
    assert table("a/kernel", (1,)) == "m.blocks.1.a" and table("b/kernel", (1,)) == "m.blocks.1.b"
    assert table("a/kernel", ()) == "m.blocks.{}.a"  # unstacked: the name as given
    assert table("z/kernel", (0,)) == "default.z.kernel.0"  # missing: the default
    assert name_mapping(None, default, "arg", "name") is default
    assert name_mapping(None, None, "arg", "name")("a/kernel", ()) is None
    with pytest.raises(TypeError, match=r"module_name must be a callable \(leaf path, and for a stacked "
                                        r"kernel its layer index -> PEFT module name\) or a dict "
                                        r"\{path: name\}, got int"):
        name_mapping(3, default, "module_name", "PEFT module name")


def test_the_index_follows_the_layer_container():
    assert with_index("model.layers.mlp.up", (3,)) == "model.layers.3.mlp.up"
    assert with_index("transformer.h.attn", (0,)) == "transformer.h.0.attn"
    assert with_index("encoder.mlp", (1, 2)) == "encoder.1.2.mlp"  # no container: after the first part
    assert with_index("model.layers.q", ()) == "model.layers.q"


def test_stack_shape_reads_the_layouts_stack_axes():
    layouts = jlora.LoraConfig(rank=2, targets=jlora.Rule(pattern=r".*/scan/.*", stack_axes=(1, 0)))
    assert stack_shape(layouts, "p/scan/kernel", (3, 5, 8, 4)) == (5, 3)
    assert stack_shape(layouts, "p/other/kernel", (3, 5, 8, 4)) == ()
    assert stack_shape(None, "p/scan/kernel", (3, 5, 8, 4)) == ()


def test_restack_orders_layers_row_major_and_names_the_missing():
    got = {(i, j): {"a": np.full((2, 1), 10 * i + j), "b": np.full((1, 3), -(10 * i + j))}
           for i in range(2) for j in range(3)}
    factors, missing = restack(got, (2, 3))
    assert missing == [] and factors["a"].shape == (2, 3, 2, 1) and factors["b"].shape == (2, 3, 1, 3)
    assert factors["a"][1, 2, 0, 0] == 12 and factors["b"][0, 1, 0, 2] == -1
    del got[1, 0], got[0, 2]
    assert restack(got, (2, 3)) == ({}, [(0, 2), (1, 0)])
    one, none_missing = restack({(): {"a": np.ones(2)}}, ())
    assert none_missing == [] and one["a"].shape == (2,)


def test_one_layer_takes_the_stack_axes_out():
    assert one_layer(Layout(in_axes=(1,), out_axes=(2, 3), stack_axes=(0,)), (30, 576, 9, 64)) == (
        (30,), (576, 9, 64), (0,))
    layout = Layout(in_axes=(0,), out_axes=(2,), stack_axes=(1,))
    assert one_layer(layout, (8, 4, 16)) == ((4,), (8, 16), (0,))


def test_write_file_replaces_whole_or_not_at_all(tmp_path):
    path = tmp_path / "sub" / "x.bin"
    def write(tmp):
        with open(tmp, "wb") as f:
            f.write(b"one")

    write_file(path, write)
    assert path.read_bytes() == b"one"

    def half_then_fail(tmp):
        with open(tmp, "wb") as f:
            f.write(b"tw")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        write_file(path, half_then_fail)
    assert path.read_bytes() == b"one" and os.listdir(path.parent) == ["x.bin"]
