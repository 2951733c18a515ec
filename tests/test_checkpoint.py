"""save / restore with Orbax: round trips, metadata, every refusal, training resume, a real crash."""

import dataclasses
import functools
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import _crash_child as child
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest
from flax import nnx
from models import LinenScan, LinenZoo, NnxModel, nnx_apply

import jlora
from jlora._checkpoint import FORMAT_VERSION, read_metadata, restore, save, save_args
from jlora._paths import flatten, nest

TOKENS = jnp.array([[1, 2, 3, 4, 5], [39, 0, 7, 7, 2]])
X16 = jax.random.normal(jax.random.key(3), (2, 16))


class Mlp(nn.Module):
    @nn.compact
    def __call__(self, x):
        h = jax.nn.relu(nn.Dense(32)(x))  # Dense_0: (16, 32)
        return nn.Dense(8)(h)  # Dense_1: (32, 8)


def _mlp(**kw):
    return "mlp", jlora.LoraConfig(rank=4, alpha=3.0, **kw)


CASES = {  # name: (model, config)
    "plain": ("zoo", jlora.LoraConfig(
        rank=4, alpha=3.0,
        targets=(r".*/attn/(query|value)/kernel", r".*/(conv|dense)/kernel", r".*/embedding"))),
    "dora": _mlp(targets=r".*/kernel", dora=True),
    "stacked": ("scan", jlora.LoraConfig(
        rank=4, alpha=3.0, targets=jlora.Rule(pattern=r".*/layers/(up|down)/kernel", rank=2, alpha=5.0,
                                              stack_axes=(0,)))),
    "nnx": ("nnx", jlora.LoraConfig(
        rank=2, alpha=3.0, targets=(jlora.Rule(pattern=r"layers/.*/kernel", stack_axes=(0,)),
                                    r"attn/(query|value)/kernel", r"conv/kernel", r"embed/embedding"))),
    "train_in_full": _mlp(targets=r".*/Dense_0/kernel", train_in_full=r".*/Dense_1/.*"),
    "rslora": _mlp(targets=(jlora.Rule(pattern=r".*/Dense_0/kernel", rank=2, alpha=6.0),
                            r".*/Dense_1/kernel"),
                   rslora=True),
    "nonlinearity": _mlp(targets=r".*/kernel", nonlinearity="gelu"),
    "dylora": _mlp(targets=r".*/kernel", dylora="plain"),
}


def _random_like(shapes, seed, std):
    rng = np.random.default_rng(seed)
    return jax.tree.map(lambda s: jnp.asarray(std * rng.standard_normal(s.shape), s.dtype), shapes)


@functools.cache
def _model(name):
    """``(apply_fn, abstract params, input)`` of a test model; the parameters are shapes only."""
    if name == "nnx":
        apply_fn, state = nnx_apply(nnx.eval_shape(lambda: NnxModel(nnx.Rngs(0))))
        return apply_fn, state, TOKENS
    model, x = {"zoo": (LinenZoo(), TOKENS), "scan": (LinenScan(), X16), "mlp": (Mlp(), X16)}[name]
    return model.apply, jax.eval_shape(model.init, jax.random.key(0), x), x


# Trees are built from their shapes (jax.eval_shape of the real init) and filled with random numbers:
# the structure is exactly what model.init and jlora.init make, every factor is non-zero (the adapters
# small beside the base, as after training), and nothing compiles.
@functools.cache  # arrays are immutable: the tests share one setup per case
def _setup(case):
    """Apply function, input, config, frozen and a trained-looking trainable."""
    name, cfg = CASES[case]
    apply_fn, abstract, x = _model(name)
    frozen = _random_like(abstract, seed=0, std=0.3)
    trainable = _random_like(jax.eval_shape(lambda p: jlora.init(jax.random.key(1), p, cfg)[1], frozen),
                             seed=1, std=0.05)
    return apply_fn, x, cfg, frozen, trainable


@functools.cache  # one compiled LoraApply per (model, config): an equal restored config reuses it
def _lora_apply(apply_fn, cfg):
    return jlora.wrap(apply_fn, cfg)


def _output(case):
    apply_fn, x, cfg, frozen, trainable = _setup(case)
    return _lora_apply(apply_fn, cfg)(frozen, trainable, x)


def _equal(x, y):
    assert jax.tree.structure(x) == jax.tree.structure(y)
    for u, v in zip(jax.tree.leaves(x), jax.tree.leaves(y), strict=True):
        assert isinstance(v, jax.Array) and u.dtype == v.dtype
        np.testing.assert_array_equal(u, v)


def _snapshot(root: Path) -> dict:
    """Every path under ``root`` with the bytes of every file: what "unchanged on disk" means here."""
    return {str(p.relative_to(root)): p.read_bytes() if p.is_file() else None
            for p in sorted(root.rglob("*"))}


@pytest.mark.parametrize("case,fold", [
    pytest.param(case, fold, id=f"{case}-{'folded' if fold else 'stored'}")
    for case in CASES for fold in (False, True) if not (fold and CASES[case][1].dylora)  # refused, see below
])
def test_round_trip_keeps_outputs(case, fold, tmp_path):
    apply_fn, x, cfg, frozen, trainable = _setup(case)
    before = _output(case)
    save(tmp_path / "ckpt", trainable, cfg, frozen=frozen, fold_scale=fold)
    restored, cfg2 = restore(tmp_path / "ckpt", frozen)
    after = _lora_apply(apply_fn, cfg2)(frozen, restored, x)
    if fold:
        # s·(h·b) and h·(s·b) round differently in float32: equal to rtol 1e-6 of the output's scale.
        np.testing.assert_allclose(after, before, rtol=1e-6, atol=1e-6 * float(jnp.abs(before).max()))
        assert all(cfg2.scale_for(r) == 1.0 for r in cfg2.targets)
        assert [cfg2.rank_for(r) for r in cfg2.targets] == [cfg.rank_for(r) for r in cfg.targets]
        assert read_metadata(tmp_path / "ckpt")["fold_scale"] is True
    else:
        np.testing.assert_array_equal(after, before)
        assert cfg2 == cfg
        _equal(trainable, restored)


def test_metadata_content(tmp_path):
    _, _, cfg, frozen, trainable = _setup("plain")
    save(tmp_path / "ckpt", trainable, cfg, frozen=frozen)
    meta = read_metadata(tmp_path / "ckpt")
    assert meta["format"] == "jlora-adapters"
    assert meta["format_version"] == FORMAT_VERSION == 1
    assert meta["jlora_version"] == jlora.__version__
    assert meta["fold_scale"] is False
    assert jlora.LoraConfig.from_dict(meta["config"]) == cfg
    assert meta["targets"]["params/attn/query/kernel"] == {
        "kind": "lora", "rank": 4, "alpha": 3.0, "scale": 0.75,
        "in_axes": [0], "out_axes": [1, 2], "stack_axes": [], "embedding": False, "dora": False,
        "base": {"shape": [16, 2, 8], "dtype": "float32"},
    }
    assert meta["targets"]["params/embed/embedding"]["embedding"] is True
    assert meta["leaves"]["params/attn/query/kernel/a"] == {"shape": [16, 4], "dtype": "float32"}
    assert meta["leaves"]["params/attn/query/kernel/b"] == {"shape": [4, 2, 8], "dtype": "float32"}
    assert set(meta["targets"]) == {"params/attn/query/kernel", "params/attn/value/kernel",
                                    "params/conv/kernel", "params/dense/kernel", "params/embed/embedding"}
    assert len(meta["leaves"]) == 2 * len(meta["targets"])


def test_metadata_of_full_leaves_and_folded_rules(tmp_path):
    _, _, cfg, frozen, trainable = _setup("rslora")
    save(tmp_path / "ckpt", trainable, cfg, frozen=frozen, fold_scale=True)
    meta = read_metadata(tmp_path / "ckpt")
    assert [(r["rank"], r["alpha"]) for r in meta["config"]["targets"]] == [(2, 2 ** 0.5), (4, 2.0)]
    assert {t["scale"] for t in meta["targets"].values()} == {1.0}
    _, _, cfg, frozen, trainable = _setup("train_in_full")
    save(tmp_path / "full", trainable, cfg, frozen=frozen)
    meta = read_metadata(tmp_path / "full")
    assert meta["targets"]["params/Dense_1/kernel"] == {"kind": "full",
                                                        "base": {"shape": [32, 8], "dtype": "float32"}}
    assert meta["leaves"]["params/Dense_1/bias"] == {"shape": [8], "dtype": "float32"}


@pytest.mark.parametrize("case", list(CASES))
def test_metadata_without_frozen_matches_except_base(case, tmp_path):
    """Without frozen, save infers the kernels from the adapters and the config: same targets."""
    _, _, cfg, frozen, trainable = _setup(case)
    save(tmp_path / "with", trainable, cfg, frozen=frozen)
    save(tmp_path / "without", trainable, cfg)
    with_, without = read_metadata(tmp_path / "with"), read_metadata(tmp_path / "without")
    assert all(t["base"] is None for t in without["targets"].values())
    for t in with_["targets"].values():
        t["base"] = None
    assert with_ == without


def test_save_refuses_to_overwrite(tmp_path):
    _, _, cfg, frozen, trainable = _setup("dora")
    path = tmp_path / "ckpt"
    save(path, trainable, cfg)
    before = _snapshot(tmp_path)
    with pytest.raises(FileExistsError, match=r"ckpt already exists; pass overwrite=True"):
        save(path, trainable, cfg)
    assert _snapshot(tmp_path) == before
    doubled = jax.tree.map(lambda v: 2 * v, trainable)
    save(path, doubled, cfg, overwrite=True)
    _equal(doubled, restore(path, frozen)[0])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]


def test_overwrite_never_deletes_a_directory_that_is_not_a_checkpoint(tmp_path):
    _, _, cfg, _, trainable = _setup("dora")
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "keep.txt").write_text("precious")
    with pytest.raises(ValueError, match=r"refusing to overwrite .*notes: it is not a jlora checkpoint"):
        save(tmp_path / "notes", trainable, cfg, overwrite=True)
    assert (tmp_path / "notes" / "keep.txt").read_text() == "precious"


def test_save_validates_before_writing(tmp_path):
    _, _, cfg, frozen, trainable = _setup("train_in_full")
    path = tmp_path / "ckpt"
    missing = {"params": {"Dense_0": trainable["params"]["Dense_0"]}}
    with pytest.raises(ValueError, match=r"missing params/Dense_1/bias \(expected shape \(8,\)\)"):
        save(path, missing, cfg, frozen=frozen)
    bad_dtype = jax.tree.map(lambda v: v.astype(jnp.bfloat16), trainable)
    with pytest.raises(ValueError, match=r"(?s)params/Dense_0/kernel/a has dtype bfloat16, expected float32.*"
                                         r"params/Dense_1/bias has dtype bfloat16, expected float32.*astype"):
        save(path, bad_dtype, cfg, frozen=frozen)
    with pytest.raises(ValueError, match=r"params/Dense_0/kernel/a has dtype bfloat16"):
        save(path, bad_dtype, cfg)  # adapters are checked without frozen too
    other_rank = jlora.LoraConfig(rank=2, alpha=3.0, targets=r".*/Dense_0/kernel",
                                  train_in_full=r".*/Dense_1/.*")
    with pytest.raises(ValueError, match=r"params/Dense_0/kernel/a has shape \(16, 4\), expected \(16, 2\)"):
        save(path, trainable, other_rank)
    with pytest.raises(ValueError, match=r"save: trainable does not fit config:\n  trainable holds "
                                         r"an adapter at params/Dense_0/kernel, but no rule of the "
                                         r"config matches that path"):
        save(path, trainable, jlora.LoraConfig(train_in_full=r".*/Dense_1/.*"))
    with pytest.raises(ValueError, match=r"(?s)trainable does not fit config.*train_in_full "
                                         r"pattern 'nothing' matched"):
        save(path, trainable, jlora.LoraConfig(rank=4, targets=r".*/Dense_0/kernel", train_in_full="nothing"))
    with pytest.raises(TypeError, match=r"expected a jlora.LoraConfig, got dict"):
        save(path, trainable, cfg.to_dict())
    assert not path.exists() and list(tmp_path.iterdir()) == []


def test_save_without_frozen_checks_stacked_adapter_axes(tmp_path):
    _, _, cfg, _, trainable = _setup("stacked")
    unstacked = jlora.LoraConfig(rank=4, alpha=3.0,
                                 targets=jlora.Rule(pattern=r".*/layers/(up|down)/kernel", rank=2))
    with pytest.raises(ValueError, match=r"(?s)params/layers/down/kernel: a \(3, 32, 2\) and "
                                         r"b \(3, 2, 16\) do not form an adapter for rule .* "
                                         r"\(stack_axes=\(\), in_axes=None\).*layers/up"):
        save(tmp_path / "ckpt", trainable, unstacked)
    flat_b = {"params": {"layers": {"up": {"kernel": {"a": jnp.zeros((3, 16, 2)), "b": jnp.zeros((3, 2))}}}}}
    with pytest.raises(ValueError, match=r"params/layers/up/kernel: a \(3, 16, 2\) and b \(3, 2\) "
                                         r"do not form an adapter .*pass the config the adapter was "
                                         r"made with \(and frozen="):
        save(tmp_path / "ckpt", flat_b, cfg)


def test_fold_scale_refuses_dylora(tmp_path):
    _, _, cfg, frozen, trainable = _setup("dylora")
    with pytest.raises(ValueError, match=r"save\(fold_scale=True\): DyLoRA \(dylora='plain'\): "
                                         r"its scale alpha/k depends on the rank"):
        save(tmp_path / "ckpt", trainable, cfg, frozen=frozen, fold_scale=True)
    assert not (tmp_path / "ckpt").exists()
    fixed, cfg_k = jlora.truncate(trainable, cfg, 2)  # the fix the message suggests
    save(tmp_path / "ckpt", fixed, cfg_k, frozen=frozen, fold_scale=True)
    assert {t["scale"] for t in read_metadata(tmp_path / "ckpt")["targets"].values()} == {1.0}


def test_folded_adapter_merges_with_scale_one(tmp_path):
    """A loader that knows no alpha and applies W + a@b gets the trained model (per-rule ranks, rsLoRA)."""
    apply_fn, x, cfg, frozen, trainable = _setup("rslora")
    save(tmp_path / "ckpt", trainable, cfg, frozen=frozen, fold_scale=True)
    restored, cfg2 = restore(tmp_path / "ckpt", frozen)
    flat = flatten(restored)
    delta = {p[:-2]: flat[p] @ flat[p[:-2] + "/b"] for p in flat if p.endswith("/a")}  # a@b, no scale
    merged = nest({p: w + delta[p] if p in delta else w for p, w in flatten(frozen).items()})
    expected = _output("rslora")
    np.testing.assert_allclose(jax.jit(apply_fn)(merged, x), expected, rtol=1e-6,
                               atol=1e-6 * float(jnp.abs(expected).max()))


@pytest.fixture
def saved(tmp_path):
    """A checkpoint of the "train_in_full" case, its frozen and config; checked unchanged at the end."""
    _, _, cfg, frozen, trainable = _setup("train_in_full")
    path = tmp_path / "ckpt"
    save(path, trainable, cfg, frozen=frozen)
    before = _snapshot(path)
    yield path, frozen, cfg
    assert _snapshot(path) == before, "restore changed the checkpoint"


def _refused(path, frozen, error, match):
    """``restore`` raises ``error`` matching ``match`` and leaves every file beside ``path`` as it was."""
    before = _snapshot(path.parent)
    with pytest.raises(error, match=match):
        restore(path, frozen)
    assert _snapshot(path.parent) == before, "a failed restore changed something on disk"


def _meta_file(path):
    return path / "lora_metadata" / "metadata"


def _copy(path, name, edit=None):
    """A copy of the checkpoint beside it, its metadata put through ``edit``; the original is left alone."""
    copy = path.with_name(name)
    shutil.copytree(path, copy)
    if edit is not None:
        _meta_file(copy).write_text(json.dumps(edit(json.loads(_meta_file(copy).read_text()))))
    return copy


def test_restore_missing_checkpoint(saved):
    path, frozen, _ = saved
    _refused(path.with_name("nowhere"), frozen, FileNotFoundError, r"no checkpoint at .*nowhere\.$")


def test_restore_missing_metadata(saved):
    path, frozen, _ = saved
    copy = _copy(path, "no_meta")
    shutil.rmtree(copy / "lora_metadata")
    _refused(copy, frozen, ValueError, r"no_meta has no readable jlora metadata "
                                       r"\(KeyError: .*not a checkpoint")
    (copy / "lora_metadata").mkdir()
    _refused(copy, frozen, ValueError, r"no_meta has no readable jlora metadata \(FileNotFoundError")


def test_restore_corrupt_metadata(saved):
    path, frozen, _ = saved
    copy = _copy(path, "truncated")
    _meta_file(copy).write_text('{"format": "jlora-adap')
    _refused(copy, frozen, ValueError, r"truncated has no readable jlora metadata \(JSONDecodeError")
    for i, (edit, why) in enumerate([
        (lambda m: [m], r"the document is list, not a JSON object"),
        (lambda m: {**m, "format_version": "1"}, r"\"format_version\" is \"1\", not an int >= 1"),
        (lambda m: {**m, "leaves": {"x": {"shape": "(2,)", "dtype": "float32"}}},
         r"leaves\['x'\]\.shape is \"\(2,\)\", not a list of non-negative ints"),
        (lambda m: {k: v for k, v in m.items() if k != "targets"}, r"field 'targets' is missing"),
        (lambda m: {**m, "config": {**m["config"], "rank": -1}},
         r"its config is unreadable \(LoraConfig: rank"),
    ]):
        _refused(_copy(path, f"edited{i}", edit), frozen, ValueError,
                 rf"edited{i} has corrupt jlora metadata: {why}")


def test_restore_refuses_a_newer_format(saved):
    path, frozen, _ = saved
    newer = _copy(path, "newer",
                  lambda m: {**m, "format_version": FORMAT_VERSION + 1, "jlora_version": "9.0"})
    _refused(newer, frozen, ValueError,
             r"format version 2 \(written by jlora 9\.0\); this jlora reads versions up to 1\. Upgrade jlora")


def test_restore_lists_every_mismatch_before_loading(saved):
    path, _, _ = saved
    wider = _random_like(jax.eval_shape(Mlp().init, jax.random.key(0), jnp.ones((2, 12))), seed=0, std=0.3)
    # Dense_0 kernel (12, 32), so a is (12, 4)
    wider["params"]["Dense_1"]["bias"] = wider["params"]["Dense_1"]["bias"].astype(jnp.bfloat16)
    _refused(path, wider, ValueError,
             r"(?s)does not fit frozen:\n"
             r"  params/Dense_0/kernel/a: stored shape \(16, 4\), float32; expected \(12, 4\), float32\n"
             r"  params/Dense_1/bias: stored shape \(8,\), float32; expected \(8,\), bfloat16\n"
             r"  params/Dense_0/kernel: frozen has shape \(12, 32\); "
             r"the adapters were trained on shape \(16, 32\)\n"
             r"Restore with the base parameters")


def test_restore_reports_a_config_that_does_not_fit_frozen(saved):
    path, _, _ = saved
    other = {"params": {"proj": {"kernel": jnp.ones((16, 8))}}}
    _refused(path, other, ValueError,
             r"(?s)the config stored in .*ckpt does not fit frozen:\nLoRA rule "
             r"'\.\*/Dense_0/kernel' matched no")


def test_restore_succeeds_without_touching_the_disk(saved):
    path, frozen, cfg = saved
    before = _snapshot(path.parent)
    _, cfg2 = restore(path, frozen)
    assert cfg2 == cfg and _snapshot(path.parent) == before


def test_restore_keeps_stored_dtypes(tmp_path):
    _, _, cfg, frozen, trainable = _setup("dora")
    cfg = dataclasses.replace(cfg, dtype="bfloat16")
    trainable = jax.tree.map(lambda v: v.astype(jnp.bfloat16), trainable)
    save(tmp_path / "ckpt", trainable, cfg, frozen=frozen)
    restored, cfg2 = restore(tmp_path / "ckpt", frozen)
    assert cfg2.dtype == "bfloat16"
    _equal(trainable, restored)


# ----------------------------------------------------------------------------- training resume


RESUME_CFG = jlora.LoraConfig(rank=2, alpha=4.0, targets=r".*/Dense_0/kernel", train_in_full=r".*/Dense_1/.*",
                              dropout=0.25)


@functools.cache  # one jitted step for all runs: compiled once
def _trainer():
    model = Mlp()
    params = _random_like(jax.eval_shape(model.init, jax.random.key(0), X16), seed=0, std=0.3)
    frozen, trainable = jlora.init(jax.random.key(1), params, RESUME_CFG)
    lora_apply = jlora.wrap(model.apply, RESUME_CFG)
    tx = jlora.optimizer(RESUME_CFG, learning_rate=1e-2)

    def loss(trainable, x, y, key):
        return jnp.mean((lora_apply(frozen, trainable, x, lora_rng=key) - y) ** 2)

    @jax.jit
    def train_step(trainable, opt_state, key, x, y):
        key, sub = jax.random.split(key)
        grads = jax.grad(loss)(trainable, x, y, sub)
        updates, opt_state = tx.update(grads, opt_state, trainable)
        return optax.apply_updates(trainable, updates), opt_state, key

    def batch(step):
        kx, ky = jax.random.split(jax.random.key(1000 + step))
        return jax.random.normal(kx, (4, 16)), jax.random.normal(ky, (4, 8))

    return frozen, trainable, tx, train_step, batch


def _train(ckpt_dir, num_steps, crash_after=None):
    """The module docstring's recipe, verbatim but for the crash."""
    frozen, trainable, tx, train_step, batch = _trainer()
    options = ocp.CheckpointManagerOptions(max_to_keep=2, enable_async_checkpointing=True)
    mngr = ocp.CheckpointManager(ckpt_dir, options=options)
    opt_state, key, start = tx.init(trainable), jax.random.key(7), 0
    if (last := mngr.latest_step()) is not None:
        abstract = lambda tree: jax.tree.map(ocp.utils.to_shape_dtype_struct, tree)  # noqa: E731
        restored = mngr.restore(last, args=ocp.args.Composite(
            adapters=ocp.args.StandardRestore(abstract(trainable)),
            train_state=ocp.args.StandardRestore(abstract({"opt_state": opt_state, "key": key})),
        ))
        trainable = restored.adapters
        opt_state, key = restored.train_state["opt_state"], restored.train_state["key"]
        start = last
    for step in range(start + 1, num_steps + 1):
        trainable, opt_state, key = train_step(trainable, opt_state, key, *batch(step))
        mngr.save(step, args=ocp.args.Composite(
            **save_args(trainable, RESUME_CFG),
            train_state=ocp.args.StandardSave({"opt_state": opt_state, "key": key}),
        ))
        if step == crash_after:
            mngr.wait_until_finished()  # a crash after this commit: the manager is dropped, never closed
            return mngr.all_steps()
    mngr.wait_until_finished()
    mngr.close()
    return frozen, trainable, opt_state, key


@pytest.mark.standard_promotion  # optax's Adam raises its int step count to a float power
def test_resumed_training_equals_uninterrupted_bit_for_bit(tmp_path):
    reference = _train(tmp_path / "straight", 6)
    assert _train(tmp_path / "run", 6, crash_after=4) == [3, 4]  # max_to_keep=2
    frozen, trainable, opt_state, key = _train(tmp_path / "run", 6)
    _equal(reference[1:3], (trainable, opt_state))
    np.testing.assert_array_equal(jax.random.key_data(reference[3]), jax.random.key_data(key))
    assert sorted(p.name for p in (tmp_path / "run").iterdir() if p.is_dir()) == ["5", "6"]
    adapters, cfg = restore(tmp_path / "run" / "6", frozen)  # every step is a jlora checkpoint too
    assert cfg == RESUME_CFG
    _equal(trainable, adapters)


# ----------------------------------------------------------------------------- crash safety


def test_sigkill_mid_save_leaves_the_previous_checkpoint_intact(tmp_path):
    root = tmp_path / "run"
    # Orbax writes step 2 into 2.orbax-checkpoint-tmp/, each item into <item>.orbax-checkpoint-tmp/ inside
    # it, and renames them when complete; 64 MB of adapters take about half a second to write.
    partial = root / ("2" + ocp.step.TMP_DIR_SUFFIX)
    writing = partial / ("adapters" + ocp.step.TMP_DIR_SUFFIX)
    with open(tmp_path / "child.log", "w") as log, subprocess.Popen(
        [sys.executable, child.__file__, str(root)], stdout=subprocess.PIPE, stderr=log, text=True
    ) as proc:
        try:
            assert proc.stdout.readline() == "saving 2\n", (tmp_path / "child.log").read_text()[-3000:]
            deadline = time.monotonic() + 30
            while not writing.exists() and proc.poll() is None and time.monotonic() < deadline:
                time.sleep(0.001)
            time.sleep(0.05)  # let some array data reach the disk
        finally:
            proc.kill()  # SIGKILL: no cleanup, no finally blocks, no atexit in the child
    assert writing.is_dir() and not (root / "2").exists(), "the kill missed the save; make child.LARGE larger"

    mngr = ocp.CheckpointManager(root, options=ocp.CheckpointManagerOptions(read_only=True))
    assert mngr.all_steps() == [1] and mngr.latest_step() == 1
    expected = jax.tree.map(jnp.asarray, child.adapters(*child.SMALL))
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, expected)
    _equal(expected,
           mngr.restore(1, args=ocp.args.Composite(adapters=ocp.args.StandardRestore(abstract))).adapters)
    mngr.close()

    layers, width, _ = child.SMALL
    frozen = {"params": {f"layer_{i}": {"kernel": np.zeros((width, width), np.float32)}
                         for i in range(layers)}}
    adapters, cfg = restore(root / "1", frozen)
    assert cfg == child.config()
    _equal(expected, adapters)
    with pytest.raises(FileNotFoundError, match=r"no checkpoint at .*run/2; .*2\.orbax-checkpoint-tmp is "
                                                r"what an interrupted save left behind"):
        restore(root / "2", frozen)
    with pytest.raises(ValueError, match=r"2\.orbax-checkpoint-tmp is an unfinished save"):
        restore(partial, frozen)

    mngr = ocp.CheckpointManager(root)  # the next run saves step 2 over the debris
    mngr.save(2, args=ocp.args.Composite(**save_args(expected, child.config())))
    mngr.wait_until_finished()
    assert mngr.all_steps() == [1, 2]
    mngr.close()


# ----------------------------------------------------------------------------- paths as users type them


def test_relative_home_and_pathlib_paths(tmp_path, monkeypatch):
    _, _, cfg, frozen, trainable = _setup("train_in_full")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    (tmp_path / "home").mkdir()
    save("ckpt/rel", trainable, cfg, frozen=frozen)  # a parent that does not exist yet is made
    save("~/in_home", trainable, cfg, frozen=frozen)
    save(Path("ckpt") / "pathlib", trainable, cfg)
    assert sorted(p.name for p in (tmp_path / "ckpt").iterdir()) == ["pathlib", "rel"]
    assert (tmp_path / "home" / "in_home" / "lora_metadata").is_dir()
    for where in ("ckpt/rel", "~/in_home", Path("ckpt/rel"), "./ckpt/../ckpt/rel"):
        restored, cfg2 = restore(where, frozen)
        assert cfg2 == cfg
        _equal(trainable, restored)
        assert read_metadata(where)["config"] == cfg.to_dict()
    with pytest.raises(FileExistsError, match=r"save: .*/ckpt/rel already exists; pass overwrite=True"):
        save("ckpt/rel", trainable, cfg, frozen=frozen)
    save("ckpt/rel", trainable, cfg, frozen=frozen, overwrite=True)


def test_paths_are_made_absolute_and_urls_kept(tmp_path, monkeypatch):
    from jlora._checkpoint import absolute_path

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HOME", "/home/someone")
    assert str(absolute_path("ckpt/a", "save")) == str(tmp_path / "ckpt" / "a")
    assert str(absolute_path(Path("x/../y"), "save")) == str(tmp_path / "y")
    assert str(absolute_path("~/runs/a", "save")) == "/home/someone/runs/a"
    assert str(absolute_path("gs://bucket/runs/a", "save")) == "gs://bucket/runs/a"  # never joined to the cwd


@pytest.mark.parametrize("bad,error,match", [
    (None, TypeError, r"save: expected a directory path \(str or pathlib.Path\), got NoneType None"),
    (3, TypeError, r"save: expected a directory path \(str or pathlib.Path\), got int 3"),
    ("", ValueError, r"save: expected a directory path, got ''"),
])
def test_save_refuses_what_is_not_a_path(bad, error, match, tmp_path, monkeypatch):
    _, _, cfg, frozen, trainable = _setup("train_in_full")
    monkeypatch.chdir(tmp_path)
    with pytest.raises(error, match=match):
        save(bad, trainable, cfg, frozen=frozen)
    assert list(tmp_path.iterdir()) == []


def test_restore_refuses_what_is_not_a_path():
    with pytest.raises(TypeError, match=r"restore: expected a directory path "
                                        r"\(str or pathlib.Path\), got dict"):
        restore({"params": {}}, {})
    with pytest.raises(TypeError, match=r"read_metadata: expected a directory path .*got bytes"):
        read_metadata(b"ckpt")


def test_save_under_a_file_is_refused_before_orbax_runs(tmp_path, capfd):
    _, _, cfg, frozen, trainable = _setup("train_in_full")
    (tmp_path / "a_file").write_text("not a directory")
    with pytest.raises(FileExistsError, match=r"save: cannot write a checkpoint at .*a_file/ckpt: .*a_file "
                                              r"is a file, not a directory\. Choose another directory\."):
        save(tmp_path / "a_file" / "ckpt", trainable, cfg, frozen=frozen)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a_file"]
    assert "Traceback" not in capfd.readouterr().err


def test_restore_of_a_file_is_refused(tmp_path):
    (tmp_path / "adapter.safetensors").write_bytes(b"\0" * 8)
    with pytest.raises(ValueError, match=r"restore: .*adapter\.safetensors is a file; "
                                         r"a checkpoint is a directory"):
        restore(tmp_path / "adapter.safetensors", {})


def test_a_failed_save_leaves_nothing_restore_misreads(tmp_path, monkeypatch):
    _, _, cfg, frozen, trainable = _setup("train_in_full")
    path = tmp_path / "ckpt"

    def failing_save(self, directory, *args, **kwargs):  # Orbax dies half-way through writing
        (Path(directory).parent / (Path(directory).name + ocp.step.TMP_DIR_SUFFIX) / "adapters").mkdir(
            parents=True)
        raise OSError("No space left on device")

    monkeypatch.setattr(ocp.Checkpointer, "save", failing_save)
    with pytest.raises(OSError, match="No space left on device"):
        save(path, trainable, cfg, frozen=frozen)
    monkeypatch.undo()
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(FileNotFoundError, match=r"restore: no checkpoint at .*ckpt\.$"):  # not "interrupted"
        restore(path, frozen)
    save(path, trainable, cfg, frozen=frozen)
    _equal(trainable, restore(path, frozen)[0])


# ----------------------------------------------------------------------------- metadata, field by field


def _targets_entry(m, kind="lora"):
    return next(p for p, e in m["targets"].items() if e["kind"] == kind)


def _leaf(m):
    return next(iter(m["leaves"]))


def _set(m, *keys, value=None, drop=False):
    """A deep copy of ``m`` with ``m[keys...]`` set to ``value`` (or removed)."""
    m = json.loads(json.dumps(m))
    inner = m
    for k in keys[:-1]:
        inner = inner[k]
    if drop:
        del inner[keys[-1]]
    else:
        inner[keys[-1]] = value
    return m


META_EDITS = {  # id: (edit of the metadata, what the error says)
    "leaf-without-shape": (lambda m: _set(m, "leaves", _leaf(m), "shape", drop=True),
                           r"leaves\['params/Dense_0/kernel/a'\] has no 'shape' field"),
    "leaf-shape-not-list": (lambda m: _set(m, "leaves", _leaf(m), "shape", value=16),
                            r"leaves\['params/Dense_0/kernel/a'\]\.shape is 16, not a list "
                            r"of non-negative ints"),
    "leaf-negative-dim": (lambda m: _set(m, "leaves", _leaf(m), "shape", value=[16, -4]),
                          r"leaves\['params/Dense_0/kernel/a'\]\.shape is \[16, -4\], not a list "
                          r"of non-negative ints"),
    "leaf-bad-dtype": (lambda m: _set(m, "leaves", _leaf(m), "dtype", value="float33"),
                       r"leaves\[.*\]\.dtype is \"float33\", not a numeric dtype name such as \"float32\""),
    "leaf-object-dtype": (lambda m: _set(m, "leaves", _leaf(m), "dtype", value="object"),
                          r"leaves\[.*\]\.dtype is \"object\", not a numeric dtype name"),
    "leaf-not-object": (lambda m: _set(m, "leaves", _leaf(m), value=[16, 4]),
                        r"leaves\['params/Dense_0/kernel/a'\] is \[16, 4\], not an object with "
                        r"\"shape\" and \"dtype\""),
    "target-without-base": (lambda m: _set(m, "targets", _targets_entry(m), "base", drop=True),
                            r"targets\['params/Dense_0/kernel'\] has no 'base' field "
                            r"\(null when saved without"),
    "base-shape-not-list": (lambda m: _set(m, "targets", _targets_entry(m), "base", "shape", value="16x32"),
                            r"targets\['params/Dense_0/kernel'\]\.base\.shape is \"16x32\", not a list"),
    "target-bad-kind": (lambda m: _set(m, "targets", _targets_entry(m), "kind", value="LoRA"),
                        r"targets\['params/Dense_0/kernel'\]\.kind is \"LoRA\", not \"lora\" or \"full\""),
    "target-rank-string": (lambda m: _set(m, "targets", _targets_entry(m), "rank", value="4"),
                           r"targets\['params/Dense_0/kernel'\]\.rank is \"4\", not an int >= 1"),
    "target-without-in-axes": (lambda m: _set(m, "targets", _targets_entry(m), "in_axes", drop=True),
                               r"targets\['params/Dense_0/kernel'\] has no 'in_axes' field"),
    "target-not-object": (lambda m: _set(m, "targets", _targets_entry(m), value=None),
                          r"targets\['params/Dense_0/kernel'\] is null, not an object"),
    "config-not-object": (lambda m: _set(m, "config", value=["rank", 4]),
                          r"'config' is \[\"rank\", 4\], not an object"),
    "config-missing": (lambda m: _set(m, "config", drop=True), r"field 'config' is missing"),
    "fold-scale-string": (lambda m: _set(m, "fold_scale", value="no"), r"'fold_scale' is \"no\", not bool"),
    "config-bad-regex": (lambda m: _set(m, "config", "targets", value=["(unclosed"]),
                         r"its config is unreadable \(.*\) \(in lora_metadata/metadata\)"),
    "config-targets-int": (lambda m: _set(m, "config", "targets", value=7), r"its config is unreadable \("),
}


@pytest.mark.parametrize("edit,why", list(META_EDITS.values()), ids=list(META_EDITS))
def test_corrupt_metadata_names_the_field(saved, edit, why):
    path, frozen, _ = saved
    copy = _copy(path, "edited", edit)
    _refused(copy, frozen, ValueError, rf"restore: .*edited has corrupt jlora metadata: {why}")
    if "config is unreadable" not in why:  # read_metadata does not build the config
        with pytest.raises(ValueError, match=rf"read_metadata: .*edited has corrupt jlora metadata: {why}"):
            read_metadata(copy)


def test_restore_without_the_arrays(saved):
    path, frozen, _ = saved
    copy = _copy(path, "no_arrays")
    shutil.rmtree(copy / "adapters")
    _refused(copy, frozen, ValueError, r"restore: .*no_arrays has jlora metadata but no 'adapters' item "
                                       r"\(the arrays\); the checkpoint is incomplete or damaged")
    assert read_metadata(copy)["format"] == "jlora-adapters"  # the metadata alone is still readable


def test_metadata_item_that_is_a_directory(saved):
    path, frozen, _ = saved
    copy = _copy(path, "dir_meta")
    _meta_file(copy).unlink()
    _meta_file(copy).mkdir()
    _refused(copy, frozen, ValueError, r"dir_meta has no readable jlora metadata "
                                       r"\((IsADirectoryError|[A-Za-z]+Error)")


# ----------------------------------------------------------------------------- fuzzing the metadata file

from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers(-3, 40) | st.floats(allow_nan=False) | st.text(max_size=8)
    | st.sampled_from(["float32", "bfloat16", "int8", "lora", "full", "params/Dense_0/kernel/a"]),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3),
    max_leaves=6,
)


def _nodes(value, keys=()):
    """Every (keys, value) inside a JSON document, the root first."""
    yield keys, value
    items = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, list) else ()
    for k, v in items:
        yield from _nodes(v, (*keys, k))


@st.composite
def _mutated(draw, original: bytes) -> bytes:
    """The metadata file with one random edit: a value replaced or removed, or its bytes cut or garbled."""
    how = draw(st.sampled_from(["replace", "remove", "truncate", "garble"]))
    if how == "truncate":
        return original[:draw(st.integers(0, len(original) - 1))]
    if how == "garble":
        at = draw(st.integers(0, len(original) - 1))
        return original[:at] + draw(st.binary(min_size=1, max_size=4)) + original[at + 1:]
    meta = json.loads(original)
    keys, _ = draw(st.sampled_from(list(_nodes(meta))[1:] if how == "remove" else list(_nodes(meta))))
    new = draw(JSON_VALUES) if how == "replace" else None
    if not keys:
        return json.dumps(new).encode()
    return json.dumps(_set(meta, *keys, value=new, drop=how == "remove")).encode()


@pytest.fixture(scope="module")
def fuzz_checkpoint(tmp_path_factory):
    _, _, cfg, frozen, trainable = _setup("train_in_full")
    path = tmp_path_factory.mktemp("fuzz") / "ckpt"
    save(path, trainable, cfg, frozen=frozen)
    return path, frozen, _meta_file(path).read_bytes()


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_fuzzed_metadata_raises_only_documented_errors(fuzz_checkpoint, data):
    path, frozen, original = fuzz_checkpoint
    _meta_file(path).write_bytes(data.draw(_mutated(original)))
    try:
        for read in (lambda: restore(path, frozen), lambda: read_metadata(path)):
            try:
                read()
            except (ValueError, TypeError) as e:  # the documented refusals, each naming the checkpoint
                assert str(path) in str(e), e
    finally:
        _meta_file(path).write_bytes(original)


def test_a_named_bank_round_trips_with_its_names(tmp_path):
    apply_fn, x, cfg, frozen, one = _setup("stacked")
    two = jax.tree.map(lambda v: v * -0.5, one)
    bank, bank_cfg = jlora.stack({"fr": (one, cfg), "de": (two, cfg)})
    save(tmp_path / "bank", bank, bank_cfg, frozen=frozen)
    save(tmp_path / "bank_no_frozen", bank, bank_cfg)
    meta = read_metadata(tmp_path / "bank")
    assert meta["config"]["adapters"] == ["fr", "de"]
    assert meta["leaves"]["params/layers/up/kernel/a"]["shape"][0] == 2
    restored, restored_cfg = restore(tmp_path / "bank", frozen)
    assert restored_cfg == bank_cfg and restored_cfg.adapters == ("fr", "de")
    jax.tree.map(_equal, restored, bank)
    serve = jlora.wrap(apply_fn, restored_cfg)
    want = jlora.wrap(apply_fn, cfg)(frozen, two, x)
    got = serve(frozen, restored, x, lora_weights={"de": 1.0})
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_a_bank_config_refuses_a_trainable_that_is_not_its_bank(tmp_path):
    _, _, cfg, frozen, one = _setup("stacked")
    bank, bank_cfg = jlora.stack({"fr": (one, cfg), "de": (one, cfg)})
    with pytest.raises(ValueError, match=r"save: the config names a bank of 2 adapters \['fr', 'de'\], so "
                                         r"every leaf of trainable leads with 2; got shapes \[.*\]"):
        save(tmp_path / "x", one, bank_cfg)
    assert not (tmp_path / "x").exists()


# ----------------------------------------------------------------------------- a bank trained together

BANK_CFG = jlora.LoraConfig(rank=4, alpha=3.0, targets=r".*/kernel", adapters=("fr", "de", "es"))
BANK_INDEX = jnp.array([0, 1, 2, 0, 1, 2])
BANK_X = jax.random.normal(jax.random.key(7), (6, 16))


def _bank_steps(frozen, bank, state, tx, steps):
    lora_apply = _lora_apply(Mlp().apply, BANK_CFG)

    def loss(bank):
        out = lora_apply(frozen, bank, BANK_X, lora_index=BANK_INDEX)
        return jnp.sum(jnp.mean(out ** 2, axis=1))  # each adapter has 2 examples: the sum of its 3 means x2

    @jax.jit
    def step(bank, state):
        updates, state = tx.update(jax.grad(loss)(bank), state, bank, lora_index=BANK_INDEX)
        return optax.apply_updates(bank, updates), state

    for _ in range(steps):
        bank, state = step(bank, state)
    return bank, state


@pytest.mark.standard_promotion  # optax's Adam
def test_a_bank_trained_together_resumes_and_exports_one_adapter(tmp_path):
    frozen = _random_like(_model("mlp")[1], seed=0, std=0.3)
    _, bank0 = jlora.init(jax.random.key(1), frozen, BANK_CFG)
    tx = jlora.optimizer(BANK_CFG, 1e-2, lr_ratio=4.0)
    straight = _bank_steps(frozen, bank0, tx.init(bank0), tx, 4)

    bank, state = _bank_steps(frozen, bank0, tx.init(bank0), tx, 2)
    mngr = ocp.CheckpointManager(tmp_path / "run")
    mngr.save(2, args=ocp.args.Composite(**save_args(bank, BANK_CFG, frozen=frozen),
                                         opt_state=ocp.args.StandardSave(state)))
    mngr.wait_until_finished()
    mngr.close()
    bank, cfg = restore(tmp_path / "run" / "2", frozen)
    assert cfg == BANK_CFG
    mngr = ocp.CheckpointManager(tmp_path / "run")
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, tx.init(bank))
    state = mngr.restore(2, args=ocp.args.Composite(opt_state=ocp.args.StandardRestore(abstract))).opt_state
    mngr.close()
    _equal(straight, _bank_steps(frozen, bank, state, tx, 2))

    de, de_cfg = jlora.unstack(straight[0], BANK_CFG, "de")
    jlora.export_peft(tmp_path / "de", de, de_cfg, frozen=frozen)
    _, imported, imported_cfg = jlora.import_peft(tmp_path / "de", frozen)
    want = _lora_apply(Mlp().apply, BANK_CFG)(frozen, straight[0], BANK_X, lora_index=jnp.ones(6, jnp.int32))
    got = jlora.wrap(Mlp().apply, imported_cfg)(frozen, imported, BANK_X)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
