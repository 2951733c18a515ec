"""Child process of test_multiprocess.py: one of two JAX processes, or the one-device reader after them.

    python tests/_multiprocess_child.py pair PROCESS_ID PORT WORKDIR   # twice: PROCESS_ID 0 and 1
    python tests/_multiprocess_child.py single WORKDIR                 # then once, on one device

The pair: two processes of 4 CPU devices each, joined by ``jax.distributed`` on
127.0.0.1 (CPU collectives over gloo), share one ('data', 'model') = (2, 4) mesh
whose 'model' axis spans both processes. With a tiny model (embedding, MLP,
head) in an FSDP and a Megatron layout, each process checks:

* the params come sharded from ``jax.jit(model.init, out_shardings=...)``;
  `jlora.init` on them gives adapters that follow W (`jlora.shardings`), some
  split across both processes, with the values `init` gives on one device;
* three jitted SGD steps equal the same steps on one local device, keep the
  adapters' shardings and compile once;
* `jlora.save` / `jlora.restore` (both processes write one checkpoint) give the
  same arrays in the base's layout; the FSDP checkpoint restores onto the
  Megatron base in the Megatron layout;
* the resume recipe of ``jlora/_checkpoint.py`` (``CheckpointManager``, Adam,
  step counts and key created on the mesh): stopped after step 2 and resumed,
  step 3 equals an uninterrupted run bit for bit;
* `jlora.merge` on the mesh equals the merge on one device;
* `jlora.export_peft` of the trained adapters, split across processes, writes
  the same files as on one device.

Process 0 leaves the expected values in WORKDIR. The single reader then restores
the two-process checkpoint on one device with `jlora.restore`, and merges it into
the two-process Orbax base with ``python -m jlora merge`` (a child of its own).
Each check prints ``ok …``; the first failure prints its traceback and exits 1
at once (the other process, stuck in a collective, is killed by the test).
"""

import os
import pathlib
import re
import subprocess
import sys
import time
import traceback

# Light LLVM optimisation: 5x quicker CPU compiles; every comparison is within one run.
FLAGS = "--xla_backend_optimization_level=0"
VOCAB, D, HIDDEN, BATCH, SEQ = 64, 16, 32, 8, 8
DM = ("data", "model")
SPECS = {  # path regex -> PartitionSpec entries, first match wins; anything else replicated
    "fsdp": ((r".*/embed/embedding", (DM, None)), (r".*/up/kernel", (None, DM)),
             (r".*/down/kernel", (DM, None)), (r".*/head/kernel", (None, DM))),
    "tp": ((r".*/embed/embedding", ("model", None)),  # vocabulary-parallel
           (r".*/up/kernel", (None, "model")), (r".*/up/bias", ("model",)),  # column-parallel
           (r".*/down/kernel", ("model", None)),  # row-parallel
           (r".*/head/kernel", (None, "model")), (r".*/head/bias", ("model",))),
}
BATCH_SPEC = {"fsdp": (DM,), "tp": ("data",)}


def check(name, fn, *args):
    start = time.perf_counter()
    try:
        out = fn(*args)
    except Exception:
        print(f"FAIL {name}\n{traceback.format_exc()}", file=sys.stderr, flush=True)
        os._exit(1)  # no clean shutdown: the other process may wait in a collective forever
    print(f"ok   {name} ({time.perf_counter() - start:.1f} s)", flush=True)
    return out


def model_and_config():
    import flax.linen as nn
    import jax

    import jlora

    class Net(nn.Module):
        @nn.compact
        def __call__(self, tokens):
            h = nn.Embed(VOCAB, D, name="embed")(tokens)
            h = h + nn.Dense(D, name="down")(jax.nn.gelu(nn.Dense(HIDDEN, name="up")(h)))
            return nn.Dense(VOCAB, name="head")(h)

    config = jlora.LoraConfig(rank=4, alpha=8.0, targets=r"params/(embed/embedding|(up|down)/kernel)",
                              train_in_full=r"params/head/.*")
    return Net(), config


def batch(step: int):
    """Tokens and a fixed per-token target map, as NumPy (the same in every process)."""
    rng = __import__("numpy").random.default_rng(step)
    tokens = rng.integers(0, VOCAB, (BATCH, SEQ)).astype("int32")
    return tokens, (tokens * 7 + 3) % VOCAB


def pair(process_id: int, port: int, work: pathlib.Path) -> None:
    os.environ["XLA_FLAGS"] = f"--xla_force_host_platform_device_count=4 {FLAGS}"
    import jax

    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(f"127.0.0.1:{port}", num_processes=2, process_id=process_id,
                               coordinator_bind_address=f"127.0.0.1:{port}", initialization_timeout=60)
    try:
        Pair(process_id, work).run()
    finally:
        jax.distributed.shutdown()


class Pair:
    def __init__(self, process_id: int, work: pathlib.Path):
        import jax
        import numpy as np
        from jax.sharding import Mesh, NamedSharding
        from jax.sharding import PartitionSpec as P

        assert len(jax.devices()) == 8 and len(jax.local_devices()) == 4, jax.devices()
        self.work, self.process_id = work, process_id
        self.model, self.config = model_and_config()
        mine, theirs = ([d for d in jax.devices() if d.process_index == i] for i in (0, 1))
        # 'data' within a process, 'model' across both: a Megatron-split b lives on both processes.
        self.mesh = Mesh(np.array([mine[:2] + theirs[:2], mine[2:] + theirs[2:]]), DM)
        self.replicated = NamedSharding(self.mesh, P())
        self.one = jax.local_devices()[0]
        self._everywhere = jax.jit(lambda tree: tree, out_shardings=self.replicated)

    # ------------------------------------------------------------------ helpers

    def gather(self, tree):
        """Global values of a tree of arrays on the mesh, as NumPy, in every process (a collective)."""
        import jax
        import numpy as np

        return jax.tree.map(lambda x: np.asarray(x.addressable_data(0)), self._everywhere(tree))

    @staticmethod
    def equal(got, want, where):
        import numpy as np

        from jlora._paths import flatten

        want = flatten(want)
        for path, x in flatten(got).items():
            np.testing.assert_array_equal(x, want[path], err_msg=f"{where}: {path}")

    @staticmethod
    def close(got, want, where):
        """Equal up to float32 summation order: rtol 1e-5, atol 1e-5 of each leaf's largest entry."""
        import numpy as np

        from jlora._paths import flatten

        want = flatten(want)
        for path, x in flatten(got).items():
            w = np.asarray(want[path])
            np.testing.assert_allclose(x, w, rtol=1e-5, atol=1e-5 * float(np.max(np.abs(w))),
                                       err_msg=f"{where}: {path}")

    def shardings_of(self, tree):
        import jax

        return jax.tree.map(lambda x: x.sharding, tree)

    def step_fn(self, tx, keep=None):
        """The recipe's ``train_step``: one jitted step that also splits the key."""
        import jax
        import optax

        import jlora

        lora_apply = jlora.wrap(self.model.apply, self.config)

        def train_step(frozen, trainable, opt_state, key, tokens, targets):
            key, _ = jax.random.split(key)  # where dropout would draw its masks

            def loss_fn(t):
                logits = lora_apply(frozen, t, tokens)
                return optax.softmax_cross_entropy_with_integer_labels(logits, targets).mean()

            loss, grads = jax.value_and_grad(loss_fn)(trainable)
            updates, opt_state = tx.update(grads, opt_state, trainable)
            return optax.apply_updates(trainable, updates), opt_state, key, loss

        return jax.jit(train_step, out_shardings=None if keep is None else (*keep, None))

    def data(self, layout, step):
        import jax
        from jax.sharding import NamedSharding
        from jax.sharding import PartitionSpec as P

        return jax.device_put(batch(step), NamedSharding(self.mesh, P(*BATCH_SPEC[layout])))

    # ------------------------------------------------------------------ checks

    def sharded_params(self, layout):
        """``jax.jit(model.init, out_shardings=...)`` on the mesh; the same values on one local device."""
        import jax
        from jax.sharding import NamedSharding
        from jax.sharding import PartitionSpec as P

        def spec(path, _):
            name = jax.tree_util.keystr(path, simple=True, separator="/")
            return next((P(*s) for pattern, s in SPECS[layout] if re.fullmatch(pattern, name)), P())

        key, tokens = jax.random.key(0), batch(0)[0]
        specs = jax.tree_util.tree_map_with_path(spec, jax.eval_shape(self.model.init, key, tokens))
        sharded = jax.jit(self.model.init, out_shardings=jax.tree.map(
            lambda s: NamedSharding(self.mesh, s), specs))(key, tokens)
        return sharded, jax.device_put(self.gather(sharded), self.one)

    def check_init(self, sharded, single):
        import jax

        import jlora
        from jlora._paths import flatten

        _, trainable = jlora.init(jax.random.key(1), sharded, self.config)
        _, want = jlora.init(jax.random.key(1), single, self.config)
        assert self.shardings_of(trainable) == jlora.shardings(sharded, self.config)
        spanning = [p for p, x in flatten(trainable).items()
                    if {d.process_index for d in x.sharding.device_set} == {0, 1}
                    and not x.sharding.is_fully_replicated
                    and len(x.addressable_shards) < x.sharding.num_devices]
        assert spanning, "no adapter is split across the two processes: the test would prove little"
        self.equal(self.gather(trainable), want, "init")
        return trainable

    def check_steps(self, layout, sharded, single, trainable):
        """Three SGD steps on the mesh equal three on one local device."""
        import jax
        import numpy as np
        import optax

        import jlora

        tx = jlora.optimizer(self.config, 0.1, base=optax.sgd, momentum=0.9)  # no Adam sign flips near 0
        opt_state = tx.init(trainable)
        key = jax.jit(lambda: jax.random.key(1), out_shardings=self.replicated)()
        keep = (jlora.shardings(sharded, self.config), self.shardings_of(opt_state), key.sharding)
        # Compiled once, ahead of time: an input in any other sharding would be refused.
        step = self.step_fn(tx, keep).lower(sharded, trainable, opt_state, key,
                                            *self.data(layout, 1)).compile()
        _, local = jlora.init(jax.random.key(1), single, self.config)
        local, local_state, local_key = jax.device_put((local, tx.init(local), jax.random.key(1)), self.one)
        local_step = self.step_fn(tx)
        for i in range(1, 4):
            trainable, opt_state, key, loss = step(sharded, trainable, opt_state, key, *self.data(layout, i))
            local, local_state, local_key, want = local_step(single, local, local_state, local_key, *batch(i))
            np.testing.assert_allclose(float(loss), float(want), rtol=1e-6, err_msg=f"loss of step {i}")
        assert self.shardings_of(trainable) == keep[0]
        self.close(self.gather(trainable), local, f"{layout} after 3 steps")
        return trainable, local

    def check_save_restore(self, layout, sharded, trainable):
        import jlora

        path = self.work / layout / "adapters"
        jlora.save(path, trainable, self.config, frozen=sharded)
        restored, config = jlora.restore(path, sharded)
        assert config == self.config
        assert self.shardings_of(restored) == jlora.shardings(sharded, self.config)
        self.equal(self.gather(restored), self.gather(trainable), "restored")

    def check_restore_across_layouts(self, bases, trained):
        """The FSDP checkpoint, restored onto the Megatron base, comes back in the Megatron layout."""
        import jlora

        restored, _ = jlora.restore(self.work / "fsdp" / "adapters", bases["tp"])
        assert self.shardings_of(restored) == jlora.shardings(bases["tp"], self.config)
        self.equal(self.gather(restored), self.gather(trained["fsdp"]), "FSDP onto Megatron")

    def train(self, layout, ckpt_dir, frozen, trainable, num_steps, crash_after=None):
        """The resume recipe of jlora/_checkpoint.py's docstring, as written there, but for the crash."""
        import jax
        import orbax.checkpoint as ocp
        from jax.sharding import NamedSharding
        from jax.sharding import PartitionSpec as P

        import jlora

        config, mesh = self.config, self.mesh
        options = ocp.CheckpointManagerOptions(max_to_keep=2, enable_async_checkpointing=True)
        mngr = ocp.CheckpointManager(ckpt_dir, options=options)

        tx = jlora.optimizer(config, learning_rate=1e-3)
        # Several processes save, so every array saved must live on the mesh: step counts and key too.
        replicated = NamedSharding(mesh, P())
        opt_state = jax.tree.map(lambda x: x if x.ndim else jax.device_put(x, replicated), tx.init(trainable))
        key, start = jax.jit(lambda: jax.random.key(1), out_shardings=replicated)(), 0

        if (last := mngr.latest_step()) is not None:  # resume from the newest complete step
            abstract = lambda tree: jax.tree.map(ocp.utils.to_shape_dtype_struct, tree)  # noqa: E731
            restored = mngr.restore(last, args=ocp.args.Composite(
                adapters=ocp.args.StandardRestore(abstract(trainable)),
                train_state=ocp.args.StandardRestore(abstract({"opt_state": opt_state, "key": key})),
            ))
            trainable = restored.adapters
            opt_state, key = restored.train_state["opt_state"], restored.train_state["key"]
            start = last

        if layout not in self._recipe_steps:  # one jitted step per layout for the three runs
            keep = self.shardings_of((trainable, opt_state, key))
            self._recipe_steps[layout] = self.step_fn(tx, keep)
        train_step = self._recipe_steps[layout]
        for step in range(start + 1, num_steps + 1):
            trainable, opt_state, key, _ = train_step(frozen, trainable, opt_state, key,
                                                      *self.data(layout, step))
            mngr.save(step, args=ocp.args.Composite(
                **jlora.save_args(trainable, config),
                train_state=ocp.args.StandardSave({"opt_state": opt_state, "key": key}),
            ))
            if step == crash_after:
                break
        mngr.wait_until_finished()
        mngr.close()
        return trainable, opt_state, key

    def check_resume(self, layout, sharded, initial):
        import jax

        import jlora

        self.train(layout, self.work / layout / "resumed", sharded, initial, 3, crash_after=2)
        resumed = self.train(layout, self.work / layout / "resumed", sharded, initial, 3)
        train_step = self._recipe_steps[layout]  # the same three steps, uninterrupted, nothing saved
        tx = jlora.optimizer(self.config, learning_rate=1e-3)
        opt_state = jax.tree.map(lambda x: x if x.ndim else jax.device_put(x, self.replicated),
                                 tx.init(initial))
        straight = (initial, opt_state, jax.jit(lambda: jax.random.key(1), out_shardings=self.replicated)())
        for step in range(1, 4):
            straight = train_step(sharded, *straight, *self.data(layout, step))[:3]
        keys = [jax.random.key_data(k) for k in (straight[2], resumed[2])]
        straight, resumed = self.gather((*straight[:2], keys[0])), self.gather((*resumed[:2], keys[1]))
        self.equal(resumed, straight, "resumed")
        # a step is a jlora checkpoint
        step3, _ = jlora.restore(self.work / layout / "resumed" / "3", sharded)
        self.equal(self.gather(step3), resumed[0], "step 3")

    def check_merge(self, sharded, single, trainable, local):
        import jlora

        merged = jlora.merge(sharded, trainable, self.config)
        assert self.shardings_of(merged) == self.shardings_of(sharded)
        self.close(self.gather(merged), jlora.merge(single, local, self.config), "merge")

    def check_export(self, layout, sharded, single, trainable, local):
        """Trained adapters split across both processes export as the same files as on one device."""
        from safetensors.numpy import load_file

        import jlora

        # Every process calls export_peft (gathering is a collective), each into a folder of its own.
        here = self.work / layout / f"peft_{self.process_id}"
        there = self.work / layout / f"peft_one_device_{self.process_id}"
        jlora.export_peft(here, trainable, self.config, frozen=sharded)
        jlora.export_peft(there, local, self.config, frozen=single)
        got, want = (load_file(str(d / "adapter_model.safetensors")) for d in (here, there))
        assert sorted(got) == sorted(want), (sorted(got), sorted(want))
        self.close(got, want, "export_peft")
        assert (here / "adapter_config.json").read_text() == (there / "adapter_config.json").read_text()

    def run(self):
        import numpy as np
        import orbax.checkpoint as ocp

        from jlora._paths import flatten

        self._recipe_steps = {}
        bases, trained = {}, {}
        for layout in ("fsdp", "tp"):
            sharded, single = check(f"{layout}: params from jax.jit(model.init, out_shardings=...)",
                                    self.sharded_params, layout)
            bases[layout] = sharded
            initial = check(f"{layout}: init follows W, splits adapters across both processes, equals one "
                            "device", self.check_init, sharded, single)
            trained[layout], local = check(f"{layout}: 3 training steps equal one device, keep shardings, "
                                           "compile once", self.check_steps, layout, sharded, single, initial)
            check(f"{layout}: save and restore by both processes, in the base's layout",
                  self.check_save_restore, layout, sharded, trained[layout])
            check(f"{layout}: CheckpointManager recipe stopped after step 2 and resumed equals "
                  "3 steps straight", self.check_resume, layout, sharded, initial)
            check(f"{layout}: merge on the mesh equals merge on one device", self.check_merge, sharded,
                  single, trained[layout], local)
            check(f"{layout}: export_peft of adapters split across processes equals one device",
                  self.check_export, layout, sharded, single, trained[layout], local)
        check("restore: the FSDP checkpoint onto the Megatron base comes back in the Megatron layout",
              self.check_restore_across_layouts, bases, trained)

        def base_checkpoint():
            with ocp.StandardCheckpointer() as ckptr:
                ckptr.save(self.work / "fsdp" / "base", bases["fsdp"])
            return self.gather(bases["fsdp"]), self.gather(trained["fsdp"])

        base, adapters = check("the FSDP base saved as an Orbax checkpoint by both processes",
                               base_checkpoint)
        if self.process_id == 0:
            np.savez(self.work / "expected.npz", **{f"base:{p}": x for p, x in flatten(base).items()},
                     **{f"adapters:{p}": x for p, x in flatten(adapters).items()})
        print("all passed", flush=True)


def single(work: pathlib.Path) -> None:
    """On one device: the two-process adapters and base, read by `jlora.restore` and
    ``python -m jlora merge``."""
    os.environ["XLA_FLAGS"] = FLAGS
    import jax
    import numpy as np

    import jlora
    from jlora import _cli
    from jlora._paths import flatten, nest
    from jlora._sharding import single_device

    assert len(jax.devices()) == 1, jax.devices()
    expected = np.load(work / "expected.npz")
    base = nest({k.removeprefix("base:"): expected[k] for k in expected.files if k.startswith("base:")})
    want = {k.removeprefix("adapters:"): expected[k] for k in expected.files if k.startswith("adapters:")}

    def restore_on_one_device():
        trainable, config = jlora.restore(work / "fsdp" / "adapters", jax.device_put(base, jax.devices()[0]))
        assert {x.sharding for x in jax.tree.leaves(trainable)} == {
            single_device(jax.devices()[0])}
        for p, x in flatten(trainable).items():
            np.testing.assert_array_equal(x, want[p], err_msg=p)
        return config

    config = check("restore reads the two-process checkpoint on one device", restore_on_one_device)

    def cli_merge():
        out = work / "merged"
        command = [sys.executable, "-m", "jlora", "merge", str(work / "fsdp" / "adapters"),
                   str(work / "fsdp" / "base"), str(out)]
        proc = subprocess.run(command, capture_output=True, text=True, timeout=120)  # same process group
        assert proc.returncode == 0, f"python -m jlora merge exited {proc.returncode}:\n{proc.stderr}"
        merged = flatten(_cli._load_params(str(out)))
        reference = flatten(jlora.merge(base, nest(want), config))
        for p, x in reference.items():
            np.testing.assert_allclose(merged[p], x, rtol=1e-6, atol=1e-6, err_msg=p)

    check("python -m jlora merge: two-process adapters into a two-process Orbax base, on one device",
          cli_merge)
    print("all passed", flush=True)


def main(argv: list[str]) -> None:
    if argv[0] == "pair":
        pair(int(argv[1]), int(argv[2]), pathlib.Path(argv[3]))
    elif argv[0] == "single":
        single(pathlib.Path(argv[1]))
    else:
        raise SystemExit(__doc__)


if __name__ == "__main__":
    main(sys.argv[1:])
