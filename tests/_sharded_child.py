"""Child process of test_sharding.py: the checks that need 8 devices.

XLA fixes its device count when JAX first starts, and the test workers have
started it already, so these run here, as ``python tests/_sharded_child.py``.
Each check prints ``ok …`` or what failed; the exit status is the number of
failures. It uses the decoder and the FSDP and Megatron layouts of
``examples/sharded.py`` on a ('data', 'model') = (2, 4) mesh and checks, per layout:

* `jlora.init` on the sharded params gives adapters with the shardings that
  `jlora.shardings` derives (some spelled out here), the same values as `init`
  on one device, and compiles no collective large enough to move a whole kernel
  (read from XLA's own optimised HLO, dumped during the call);
* a jitted training step on the sharded arrays equals the step on one device
  and keeps the adapters' shardings without compiling twice;
* on explicit axes, the factored forward and gradient equal merge's;
* `jlora.restore` puts adapters saved under FSDP where the base it is given
  says (Megatron, explicit axes, one device) or where ``shardings=`` says.
"""

import os
import pathlib
import re
import shutil
import sys
import tempfile
import time
import traceback

import jax
import numpy as np
import optax
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import jlora
from jlora._paths import flatten
from jlora._sharding import single_device

EXAMPLES = pathlib.Path(__file__).resolve().parent.parent / "examples"
DUMP = pathlib.Path()  # set by `main`, like `ex`: importing this file (pytest collects it) changes nothing
ex = None

DORA = jlora.LoraConfig(rank=4, alpha=8.0, dora=True, train_in_full=r"params/head/.*",
                        targets=jlora.Rule(pattern=r"params/layers/.*/kernel", stack_axes=(0,)))
DM = ("data", "model")
EXPECTED = {  # path -> spec, written out by hand from the rule a: (stack, in, r), b: (stack, r, out)
    "fsdp": {
        "params/layers/attn/query/kernel/a": P(None, DM, None),  # W (L, d, heads, hd) split on d
        "params/layers/attn/query/kernel/b": P(None, None, None, None),
        "params/layers/attn/out/kernel/a": P(None, None, None, None),  # W (L, heads, hd, d) split on d (out)
        "params/layers/attn/out/kernel/b": P(None, None, DM),
        "params/layers/up/kernel/b": P(None, None, DM),
        "params/embed/embedding/a": P(DM, None),
        "params/head/kernel": P(None, DM),
    },
    "tp": {
        "params/layers/attn/query/kernel/a": P(None, None, None),  # column-parallel: a replicated
        "params/layers/attn/query/kernel/b": P(None, None, "model", None),  # b split by heads
        "params/layers/attn/out/kernel/a": P(None, "model", None, None),  # row-parallel: a split by heads
        "params/layers/attn/out/kernel/b": P(None, None, None),
        "params/layers/up/kernel/a": P(None, None, None),
        "params/layers/up/kernel/b": P(None, None, "model"),
        "params/layers/down/kernel/a": P(None, "model", None),
        "params/layers/down/kernel/b": P(None, None, None),
        "params/embed/embedding/a": P("model", None),
        "params/head/kernel": P(None, "model"),
        "params/head/bias": P("model"),
    },
}
DORA_EXPECTED = {"fsdp": {"params/layers/attn/out/kernel/m": P(None, DM),
                          "params/layers/up/kernel/m": P(None, DM)},
                 "tp": {"params/layers/attn/query/kernel/m": P(None, "model", None),
                        "params/layers/down/kernel/m": P(None, None)}}
COLLECTIVE = re.compile(r"=\s*(.*?)\s(all-gather|all-reduce|all-to-all|collective-permute|reduce-scatter)"
                        r"(?:-start)?\(")
FAILURES = []


def check(name, fn, *args):
    start = time.perf_counter()
    try:
        fn(*args)
        print(f"ok   {name} ({time.perf_counter() - start:.1f} s)", flush=True)
    except Exception:
        FAILURES.append(name)
        print(f"FAIL {name}\n{traceback.format_exc()}", file=sys.stderr, flush=True)


def largest_collective(files) -> tuple[int, str]:
    """The most elements one collective moves in these optimised HLO modules (tuples summed), and its line."""
    best = (0, "")
    for f in files:
        for line in f.read_text().splitlines():
            m = COLLECTIVE.search(line)
            if m:
                sizes = [int(np.prod([int(d) for d in dims.split(",") if d]))
                         for dims in re.findall(r"\w+\[([\d,]*)\]", m.group(1))]
                best = max(best, (sum(sizes), line.strip()))
    return best


def compiled_during(fn):
    """``fn()``'s result and the optimised HLO files XLA compiled while it ran."""
    before = set(DUMP.glob("*after_optimizations.txt"))
    out = jax.block_until_ready(fn())
    return out, sorted(set(DUMP.glob("*after_optimizations.txt")) - before)


def smallest_split_kernel(sharded, config) -> int:
    """Elements of the smallest adapted kernel that is split across devices."""
    leaves = flatten(sharded)
    targets = jlora._plan.Plan.of_base(config, sharded)
    return min(int(np.prod(leaves[p].shape)) for p, t in targets.items()
               if t.adapted and not leaves[p].sharding.is_fully_replicated)


def check_init(layout, config, expected, sharded, single):
    whole = smallest_split_kernel(sharded, config)
    (_, trainable), files = compiled_during(lambda: jlora.init(jax.random.key(1), sharded, config))
    assert files, "init compiled nothing: the no-gather check would be empty"
    size, line = largest_collective(files)
    assert size < whole, f"init moves {size} elements in one collective (a kernel has {whole}): {line}"

    specs = jax.tree.map(lambda x: x.sharding.spec, trainable)
    assert specs == jax.tree.map(lambda s: s.spec, jlora.shardings(sharded, config)), specs
    flat = flatten(specs)
    for path, spec in expected.items():
        assert flat[path] == spec, (path, flat[path], spec)

    _, want = jlora.init(jax.random.key(1), single, config)
    for path, got in flatten(trainable).items():
        if path.endswith("/m"):  # a sum over a split axis: the partial sums add in another order
            np.testing.assert_allclose(got, flatten(want)[path], rtol=1e-6, err_msg=path)
        else:
            np.testing.assert_array_equal(got, flatten(want)[path], err_msg=path)


def check_detector_sees_a_gather(sharded):
    w = flatten(sharded)["params/layers/up/kernel"]
    replicate = jax.jit(lambda w: w * 2.0, out_shardings=NamedSharding(w.sharding.mesh, P()))
    _, files = compiled_during(lambda: replicate(w))
    size, line = largest_collective(files)
    assert size >= w.size, f"gathering {w.shape} whole showed no collective of {w.size} elements ({line!r})"


def step_fn(config, tx, keep):
    lora_apply = jlora.wrap(ex.Decoder().apply, config)

    def step(frozen, trainable, opt_state, tokens, targets):
        def loss_fn(t):
            logits = lora_apply(frozen, t, tokens)
            return optax.softmax_cross_entropy_with_integer_labels(logits, targets).mean()

        loss, grads = jax.value_and_grad(loss_fn)(trainable)
        updates, opt_state = tx.update(grads, opt_state, trainable)
        return optax.apply_updates(trainable, updates), opt_state, loss, grads

    return jax.jit(step, out_shardings=(*keep, None, keep[0]))


def run_steps(params, mesh, data_spec, n=2):
    """``n`` SGD steps from non-zero adapters; everything each step returns, and the jitted step."""
    config = ex.CONFIG
    frozen, trainable = jlora.init(jax.random.key(1), params, config)
    trainable = jax.tree.map(lambda v: v + 0.05, trainable)  # b = 0 would make a's gradient exactly 0
    # SGD: Adam's first step is ±lr wherever a gradient is nonzero, so a gradient at rounding level
    # could flip sign between the two reduction orders; SGD's update is the gradient, compared tightly.
    tx = jlora.optimizer(config, 0.1, base=optax.sgd, momentum=0.9)
    opt_state = tx.init(trainable)
    if mesh is not None:
        opt_state = ex.replicate_scalars(opt_state, mesh)
        keep = (jlora.shardings(params, config), jax.tree.map(lambda x: x.sharding, opt_state))
    else:
        keep = jax.tree.map(lambda x: x.sharding, (trainable, opt_state))
    step, outs = step_fn(config, tx, keep), []
    for i in range(n):
        tokens, targets = ex.batch(jax.random.fold_in(jax.random.key(2), i))
        if mesh is not None:
            tokens, targets = jax.device_put((tokens, targets), NamedSharding(mesh, data_spec))
        trainable, opt_state, loss, grads = step(frozen, trainable, opt_state, tokens, targets)
        outs.append((trainable, loss, grads))
    return outs, step


def check_step(sharded, mesh, data_spec, single_outs):
    outs, step = run_steps(sharded, mesh, data_spec)
    assert step._cache_size() == 1, f"the step compiled {step._cache_size()} times"
    derived = jax.tree.map(lambda s: s.spec, jlora.shardings(sharded, ex.CONFIG))
    for (trainable, loss, grads), (want_t, want_loss, want_g) in zip(outs, single_outs, strict=True):
        assert jax.tree.map(lambda x: x.sharding.spec, trainable) == derived
        np.testing.assert_allclose(loss, want_loss, rtol=1e-6)
        for tree, want in ((grads, want_g), (trainable, want_t)):
            for path, got in flatten(tree).items():
                close(got, flatten(want)[path], path)


def close(got, want, path):
    """Equal up to float32 summation order: rtol 1e-5, atol 1e-5 of the leaf's largest entry."""
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * float(np.max(np.abs(want))), err_msg=path)


def check_pissa(sharded, mesh):
    cfg = jlora.LoraConfig(rank=2, targets=r"params/head/kernel", init="pissa")
    try:
        jlora.init(jax.random.key(0), sharded, cfg)
    except ValueError as e:
        assert re.search(r"init='pissa' takes an SVD of each whole kernel.*params/head/kernel", str(e)), e
    else:
        raise AssertionError("PiSSA on a split kernel did not refuse")
    replicated = jax.device_put(sharded, NamedSharding(mesh, P()))
    frozen, trainable = jlora.init(jax.random.key(0), replicated, cfg)
    _, want = jlora.init(jax.random.key(0), jax.device_put(sharded, jax.devices()[0]), cfg)
    got, want = trainable["params"]["head"]["kernel"], want["params"]["head"]["kernel"]
    np.testing.assert_allclose(got["a"], want["a"], rtol=1e-5, atol=1e-6)


def check_restore(bases, mesh):
    """Saved under FSDP, restored onto each base: the base's layout, the same values; or ``shardings=``."""
    directory = tempfile.mkdtemp(prefix="jlora_ckpt_")
    try:
        _, trainable = jlora.init(jax.random.key(1), bases["fsdp"], DORA)
        jlora.save(f"{directory}/fsdp", trainable, DORA, frozen=bases["fsdp"])
        want = flatten(trainable)
        for name, base in bases.items():
            restored, _ = jlora.restore(f"{directory}/fsdp", base)
            where = jax.tree.map(lambda x: x.sharding, restored)
            if name == "one device":
                assert set(jax.tree.leaves(where)) == {
                    single_device(jax.devices()[0])}, where
            else:
                assert where == jlora.shardings(base, DORA), (name, where)
            for path, got in flatten(restored).items():
                np.testing.assert_array_equal(got, want[path], err_msg=f"{name}: {path}")
        replicated = jax.tree.map(lambda _: NamedSharding(mesh, P()), trainable)
        restored, _ = jlora.restore(f"{directory}/fsdp", bases["tp"], shardings=replicated)
        assert jax.tree.map(lambda x: x.sharding, restored) == replicated
    finally:
        shutil.rmtree(directory, ignore_errors=True)


def check_explicit_forward(mesh):
    """On explicit axes (``jax.make_mesh``'s default), the factored forward and gradient equal merge's.

    Attention's query/key/value kernels split by heads on 'model', the batch on 'data': the
    branch's token axes must not be flattened and split again (explicit sharding refuses that
    reshape), so the rewrite keeps them as they are there.
    """
    import flax.linen as nn

    class Model(nn.Module):
        @nn.compact
        def __call__(self, x):
            h = nn.MultiHeadDotProductAttention(num_heads=4, qkv_features=16, name="attn")(x)
            return nn.Dense(8, name="head")(h)

    model, x = Model(), jax.random.normal(jax.random.key(1), (4, 5, 16))
    params = model.init(jax.random.key(0), x)

    def spec(path, leaf):
        name = jax.tree_util.keystr(path)
        return P(None, "model", None) if leaf.ndim == 3 and re.search("query|key|value", name) else P()

    with jax.set_mesh(mesh):
        params = jax.tree_util.tree_map_with_path(
            lambda p, v: jax.device_put(v, NamedSharding(mesh, spec(p, v))), params)
        xs = jax.device_put(x, NamedSharding(mesh, P("data")))
        config = jlora.infer_layouts(jlora.LoraConfig(rank=2, targets=r".*/kernel"), model.apply, params, xs)
        frozen, trainable = jlora.init(jax.random.key(2), params, config)
        trainable = jax.tree.map(lambda v: v + 0.1, trainable)
        for strategy in ("factored", "merge"):
            fn = jlora.wrap(model.apply, config, strategy)
            out = fn(frozen, trainable, xs)
            grads = jax.jit(jax.grad(lambda t, fn=fn: (fn(frozen, t, xs) ** 2).sum()))(trainable)
            if strategy == "factored":
                want_out, want_grads = out, grads
        np.testing.assert_allclose(want_out, out, rtol=1e-5, atol=1e-5)
        for path, g in flatten(want_grads).items():
            close(g, flatten(grads)[path], path)


def setup() -> None:
    """Before JAX starts its backend: 8 CPU devices, HLO dumps, and the example's model."""
    global DUMP, ex
    DUMP = pathlib.Path(tempfile.mkdtemp(prefix="jlora_hlo_"))
    # Light LLVM optimisation: 5x quicker CPU compiles; every comparison is within this process.
    flags = ("--xla_force_host_platform_device_count=8", "--xla_backend_optimization_level=0",
             f"--xla_dump_to={DUMP}", "--xla_dump_hlo_as_text")
    os.environ["XLA_FLAGS"] = " ".join((os.environ.get("XLA_FLAGS", ""), *flags))
    sys.path.insert(0, str(EXAMPLES))
    import sharded

    ex = sharded
    if len(jax.devices()) != 8:
        raise RuntimeError(f"expected 8 CPU devices, got {jax.devices()}: JAX started before XLA_FLAGS")


def main() -> int:
    setup()
    mesh = ex.make_mesh()
    key = jax.random.key(0)
    params = jax.jit(ex.Decoder().init)(key, ex.batch(key)[0])
    single = jax.device_put(params, jax.devices()[0])
    start = time.perf_counter()
    single_outs, _ = run_steps(single, None, None)
    print(f"     the steps on one device ({time.perf_counter() - start:.1f} s)", flush=True)
    for layout in ("fsdp", "tp"):
        specs = ex.param_specs(params, layout)
        sharded = jax.device_put(params, jax.tree.map(lambda s: NamedSharding(mesh, s), specs))
        check(f"{layout}: init (LoRA) follows W, equals one device, gathers nothing", check_init, layout,
              ex.CONFIG, EXPECTED[layout], sharded, single)
        check(f"{layout}: init (DoRA) follows W, equals one device, gathers nothing", check_init, layout,
              DORA, DORA_EXPECTED[layout], sharded, single)
        check(f"{layout}: train step equals one device, keeps shardings, compiles once", check_step, sharded,
              mesh, ex.LAYOUTS[layout][1], single_outs)
        if layout == "fsdp":
            check("the gather detector sees a gather", check_detector_sees_a_gather, sharded)
            check("PiSSA refuses split kernels, runs on replicated ones", check_pissa, sharded, mesh)
    explicit = jax.make_mesh((2, 4), ("data", "model"), axis_types=(jax.sharding.AxisType.Explicit,) * 2)
    specs = ex.param_specs(params, "tp")
    sharded = jax.device_put(params, jax.tree.map(lambda s: NamedSharding(explicit, s), specs))
    check("tp, explicit axes: init (DoRA) follows W, equals one device, gathers nothing", check_init, "tp",
          DORA, DORA_EXPECTED["tp"], sharded, single)
    check("explicit axes: the factored forward and gradient equal merge's", check_explicit_forward, explicit)
    bases = {layout: jax.device_put(params, jax.tree.map(lambda s: NamedSharding(mesh, s),
                                                         ex.param_specs(params, layout)))
             for layout in ("fsdp", "tp")}
    check("restore puts adapters saved under FSDP where the base or shardings= says", check_restore,
          {**bases, "tp, explicit axes": sharded, "one device": single}, mesh)
    print(f"{len(FAILURES)} failed: {FAILURES}" if FAILURES else "all passed")
    shutil.rmtree(DUMP, ignore_errors=True)
    return len(FAILURES)


if __name__ == "__main__":
    sys.exit(main())
