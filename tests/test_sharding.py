"""shardings: adapters follow the base weights; init on a mesh; the 8-device checks in a child process."""

import os
import pathlib
import subprocess
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import AxisType, Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

import jlora
from jlora._sharding import is_single_device, single_device

HERE = pathlib.Path(__file__).parent
MESH = Mesh(np.array(jax.devices()[:1]).reshape(1, 1), ("data", "model"))  # the names matter, not the size
CFG = jlora.LoraConfig(rank=2, targets=r".*/kernel")


def _eight_devices_env() -> dict:
    return {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=8", "JAX_PLATFORMS": "cpu"}


def _shapes():
    """A stacked MLP kernel, a Flax attention q kernel (in, heads, hd), a transposed (out, in) kernel."""
    return {
        "layers": {"up": {"kernel": jnp.zeros((3, 8, 16)), "bias": jnp.zeros((3, 16))}},
        "attn": {"query": {"kernel": jnp.zeros((8, 2, 4))}},
        "torch": {"weight": jnp.zeros((16, 8))},
    }


def _specs():
    return {
        "layers": {"up": {"kernel": P("data", None, "model"), "bias": P("data", "model")}},
        "attn": {"query": {"kernel": P("data", "model")}},  # shorter than the rank: padded with None
        "torch": {"weight": P("model", "data")},
    }


def test_specs_follow_the_rule_written_out():
    cfg = jlora.LoraConfig(
        rank=2, dora=True,
        targets=(jlora.Rule(pattern=r"layers/.*/kernel", stack_axes=(0,)), r"attn/.*/kernel",
                 jlora.Rule(pattern=r"torch/weight", in_axes=(1,))),
        train_in_full=r"layers/up/bias",
    )
    got = jlora.shardings(_shapes(), cfg, specs=_specs())
    assert got == {
        # W (L, in, out) = P(data, None, model): a (L, in, r), b (L, r, out), m (L, out)
        "layers": {"up": {"kernel": {"a": P("data", None, None), "b": P("data", None, "model"),
                                     "m": P("data", "model")},
                          "bias": P("data", "model")}},
        # W (in, heads, hd) = P(data, model, None): in axis 0, out axes (1, 2)
        "attn": {"query": {"kernel": {"a": P("data", None), "b": P(None, "model", None),
                                      "m": P("model", None)}}},
        # W (out, in) = P(model, data) with in_axes=(1,): a takes axis 1's entry, b axis 0's
        "torch": {"weight": {"a": P("data", None), "b": P(None, "model"), "m": P("model")}},
    }


def test_trainable_structure_matches_init():
    params = {"params": {"dense": {"kernel": jnp.ones((8, 4)), "bias": jnp.zeros(4)}}}
    cfg = jlora.LoraConfig(rank=2, targets=r".*/kernel", train_in_full=r".*/bias")
    _, trainable = jlora.init(jax.random.key(0), params, cfg)
    specs = jax.tree.map(lambda _: P(), params)
    got = jlora.shardings(params, cfg, specs=specs)
    assert jax.tree.structure(got) == jax.tree.structure(trainable)


def test_named_shardings_from_arrays_place_and_jit():
    params = jax.device_put(_shapes(), jax.tree.map(lambda s: NamedSharding(MESH, s), _specs()))
    cfg = jlora.LoraConfig(rank=2, targets=(jlora.Rule(pattern=r"layers/.*/kernel", stack_axes=(0,)),
                                            r"attn/.*/kernel"))
    out = jlora.shardings(params, cfg)
    assert out["layers"]["up"]["kernel"]["b"] == NamedSharding(MESH, P("data", None, "model"))
    assert out["attn"]["query"]["kernel"]["a"] == NamedSharding(MESH, P("data", None))
    _, trainable = jlora.init(jax.random.key(0), _shapes(), cfg)
    placed = jax.device_put(trainable, out)
    doubled = jax.jit(lambda t: jax.tree.map(lambda x: 2 * x, t), out_shardings=out)(placed)
    assert jax.tree.map(lambda x: x.sharding, doubled) == out


@pytest.mark.parametrize("axis_type", [AxisType.Auto, AxisType.Explicit])
def test_init_on_a_mesh_creates_adapters_in_place_with_the_same_values(axis_type):
    mesh = jax.make_mesh((1, 1), ("data", "model"), axis_types=(axis_type, axis_type))
    stacked = jlora.Rule(pattern=r"layers/.*/kernel", stack_axes=(0,))
    cfg = jlora.LoraConfig(rank=2, dora=True, train_in_full=r"layers/up/bias",
                           targets=(stacked, r"attn/.*/kernel"))
    params = jax.tree.map(lambda x: x + 0.5, _shapes())
    sharded = jax.device_put(params, jax.tree.map(lambda s: NamedSharding(mesh, s), _specs()))
    frozen, trainable = jlora.init(jax.random.key(3), sharded, cfg)
    _, want = jlora.init(jax.random.key(3), params, cfg)
    assert frozen is sharded
    assert jax.tree.map(lambda x: x.sharding, trainable) == jlora.shardings(sharded, cfg)
    for got, expected in zip(jax.tree.leaves(trainable), jax.tree.leaves(want), strict=True):
        np.testing.assert_array_equal(got, expected)


def test_linen_get_partition_spec():
    class Net(nn.Module):
        @nn.compact
        def __call__(self, x):
            def split(*names):
                return nn.with_partitioning(nn.initializers.lecun_normal(), names)

            h = nn.Dense(16, kernel_init=split(None, "model"))(x)
            return nn.Dense(4, kernel_init=split("model", None))(h)

    abstract = jax.eval_shape(Net().init, jax.random.key(0), jnp.ones((2, 8)))
    got = jlora.shardings(nn.unbox(abstract), CFG, specs=nn.get_partition_spec(abstract))
    assert got == {"params": {"Dense_0": {"kernel": {"a": P(None, None), "b": P(None, "model")}},
                              "Dense_1": {"kernel": {"a": P("model", None), "b": P(None, None)}}}}


def test_nnx_get_partition_spec_and_sharded_state():
    class Net(nnx.Module):
        def __init__(self, rngs):
            init = nnx.with_partitioning(nnx.initializers.lecun_normal(), ("data", "model"))
            self.up = nnx.Linear(8, 16, kernel_init=init, rngs=rngs)

    with jax.set_mesh(MESH):
        _, state = nnx.split(Net(nnx.Rngs(0)))
    want = {"up": {"kernel": {"a": P("data", None), "b": P(None, "model")}}}
    assert jlora.shardings(state, CFG, specs=nnx.get_partition_spec(state)) == want
    assert jax.tree.map(lambda s: s.spec, jlora.shardings(state, CFG)) == want


def test_single_device_is_made_and_recognised_alike_on_every_jax():
    device = jax.devices()[0]
    one = single_device(device)
    assert one.device_set == {device} and single_device() == one
    assert is_single_device(one) and is_single_device(jnp.zeros(3).sharding)
    assert is_single_device(jax.device_put(jnp.zeros(3), device).sharding)
    assert not is_single_device(NamedSharding(MESH, P()))
    assert not is_single_device(None) and not is_single_device("cpu:0")
    assert jax.device_put(jnp.zeros(2), one).sharding == one


def test_no_deprecated_sharding_name_in_the_package():
    package = pathlib.Path(jlora.__file__).parent
    users = [p.name for p in package.glob("*.py") if "jax.sharding.SingleDeviceSharding" in p.read_text()
             and p.name != "_sharding.py"]
    assert not users, f"{users}: make or recognise it with _sharding.single_device / is_single_device"


def test_errors_name_the_path_and_the_fix():
    params = {"w": {"kernel": jnp.zeros((8, 4))}}
    with pytest.raises(ValueError, match=r"w/kernel: spec P\(None, None, 'model'\) has 3 entries but the "
                                         r"leaf has shape \(8, 4\) \(2 axes\); give at most 2 entries"):
        jlora.shardings(params, CFG, specs={"w": {"kernel": P(None, None, "model")}})
    with pytest.raises(ValueError, match=r"w/kernel: its sharding is a SingleDeviceSharding, not a "
                                         r"NamedSharding \(SingleDeviceSharding\(.*\)\)(.|\n)*"
                                         r"jax.device_put\(params, NamedSharding"):
        jlora.shardings(params, CFG)
    with pytest.raises(ValueError, match=r"w/kernel: a ndarray with no sharding(.|\n)*or pass specs="):
        jlora.shardings({"w": {"kernel": np.zeros((8, 4), np.float32)}}, CFG)
    with pytest.raises(ValueError, match=r"w/kernel: spec 'model' is a str, not a NamedSharding or "
                                         r"PartitionSpec"):
        jlora.shardings(params, CFG, specs={"w": {"kernel": "model"}})


def test_mismatched_spec_tree_is_named():
    params = {"w": {"kernel": jnp.zeros((8, 4)), "bias": jnp.zeros(4)}}
    specs = {"w": {"kernel": P(), "scale": P()}}
    with pytest.raises(ValueError, match=r"w/bias: in params but not in specs\n  "
                                         r"w/scale: in specs but not in params\n"
                                         r"specs must have the structure of params"):
        jlora.shardings(params, CFG, specs=specs)


def test_init_refuses_half_a_mesh():
    params = {"a": {"kernel": jax.device_put(jnp.zeros((8, 4)), NamedSharding(MESH, P("model"))),
                    "bias": jnp.zeros(4)},
              "b": {"kernel": jnp.zeros((8, 4))}}
    with pytest.raises(ValueError, match=r"1 targeted leaves lie on a mesh .*a/kernel.* but these do not: "
                                         r"b/kernel \(SingleDeviceSharding\)"):
        jlora.init(jax.random.key(0), params, CFG)


def test_init_inside_jit_takes_the_plain_path():
    params = {"w": {"kernel": jnp.ones((8, 4))}}
    out = jlora.shardings(jax.device_put(params, NamedSharding(MESH, P("data"))), CFG)
    jitted = jax.jit(lambda p: jlora.init(jax.random.key(0), p, CFG)[1], out_shardings=out)(params)
    eager = jlora.init(jax.random.key(0), params, CFG)[1]
    np.testing.assert_array_equal(jitted["w"]["kernel"]["a"], eager["w"]["kernel"]["a"])
    assert jitted["w"]["kernel"]["a"].sharding == out["w"]["kernel"]["a"]


def test_restore_follows_the_base_or_shardings(tmp_path):
    params = {"w": {"kernel": jnp.ones((8, 4)), "bias": jnp.zeros(4)}}
    cfg = jlora.LoraConfig(rank=2, targets=r".*/kernel", train_in_full=r".*/bias")
    _, trainable = jlora.init(jax.random.key(0), params, cfg)
    jlora.save(tmp_path / "ckpt", trainable, cfg, frozen=params)
    sharded = jax.device_put(params, {"w": {"kernel": NamedSharding(MESH, P("data", "model")),
                                            "bias": NamedSharding(MESH, P("model"))}})
    restored, _ = jlora.restore(tmp_path / "ckpt", sharded)
    assert jax.tree.map(lambda x: x.sharding, restored) == jlora.shardings(sharded, cfg)
    replicated = jax.tree.map(lambda _: NamedSharding(MESH, P()), trainable)
    restored, _ = jlora.restore(tmp_path / "ckpt", params, shardings=replicated)
    assert jax.tree.map(lambda x: x.sharding, restored) == replicated
    for got, want in zip(jax.tree.leaves(restored), jax.tree.leaves(trainable), strict=True):
        np.testing.assert_array_equal(got, want)


def test_restore_refuses_shardings_that_do_not_fit(tmp_path):
    params = {"w": {"kernel": jnp.ones((8, 4))}}
    _, trainable = jlora.init(jax.random.key(0), params, CFG)
    jlora.save(tmp_path / "ckpt", trainable, CFG, frozen=params)
    bad = {"w": {"kernel": {"a": P(), "c": NamedSharding(MESH, P())}}}
    with pytest.raises(ValueError, match=r"restore: shardings= does not fit the checkpoint:\n"
                                         r"  w/kernel/b: stored in the checkpoint, missing from shardings\n"
                                         r"  w/kernel/c: in shardings, not stored in the checkpoint\n"
                                         r"  w/kernel/a: P(artitionSpec)?\(\) is a P(artitionSpec)?, not a "
                                         r"jax.sharding.Sharding\n.*NamedSharding\(mesh, spec\)"):
        jlora.restore(tmp_path / "ckpt", params, shardings=bad)
    sharded = {"w": {"kernel": jax.device_put(params["w"]["kernel"], NamedSharding(MESH, P("model")))},
               "v": {"kernel": jnp.ones((8, 4))}}
    jlora.save(tmp_path / "two", {**trainable, "v": trainable["w"]}, CFG)
    with pytest.raises(ValueError, match=r"restore: 1 targeted leaves lie on a mesh .* but these do not: "
                                         r"v/kernel \(SingleDeviceSharding\)"):
        jlora.restore(tmp_path / "two", sharded)


def _run(*args, timeout=600):
    proc = subprocess.run([sys.executable, *args], capture_output=True, text=True, env=_eight_devices_env(),
                          cwd=HERE.parent, timeout=timeout)
    assert proc.returncode == 0, (
        f"exit {proc.returncode}\n--- stdout\n{proc.stdout}\n--- stderr\n{proc.stderr}")
    return proc.stdout


def test_on_eight_devices_fsdp_and_tensor_parallel():
    out = _run(str(HERE / "_sharded_child.py"))
    assert "all passed" in out, out


def test_example_runs():
    out = _run(str(HERE.parent / "examples" / "sharded.py"), "--layout", "tp", "--steps", "4")
    assert "largest loss gap to the same steps on one device" in out, out
