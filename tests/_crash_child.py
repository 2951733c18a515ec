"""Child process of test_checkpoint.py's crash test: one good checkpoint, then a large one to be killed.

Run as ``python _crash_child.py ROOT``. Saves step 1 (small) with an Orbax
``CheckpointManager`` exactly as the training recipe does, prints ``saving 2``,
then starts the asynchronous save of step 2 (64 MB), which the parent kills
with SIGKILL while it is being written.
"""

import sys

import numpy as np

RANK = 256


def config():
    from jlora import LoraConfig

    return LoraConfig(rank=RANK, alpha=16.0, targets=r".*/kernel")


def adapters(layers: int, width: int, seed: int) -> dict:
    """Deterministic adapters for ``layers`` (width, width) kernels, as numpy arrays."""
    rng = np.random.default_rng(seed)
    return {"params": {f"layer_{i}": {"kernel": {
        "a": rng.standard_normal((width, RANK), np.float32),
        "b": rng.standard_normal((RANK, width), np.float32),
    }} for i in range(layers)}}


SMALL = (1, 256, 1)  # layers, width, seed of step 1: 0.5 MB
LARGE = (8, 4096, 2)  # step 2: 64 MB


def main(root: str) -> None:
    import jax
    import orbax.checkpoint as ocp

    from jlora._checkpoint import save_args

    options = ocp.CheckpointManagerOptions(max_to_keep=2, enable_async_checkpointing=True)
    mngr = ocp.CheckpointManager(root, options=options)
    mngr.save(1, args=ocp.args.Composite(**save_args(jax.tree.map(jax.numpy.asarray, adapters(*SMALL)),
                                                     config())))
    mngr.wait_until_finished()
    large = jax.tree.map(jax.numpy.asarray, adapters(*LARGE))
    print("saving 2", flush=True)
    mngr.save(2, args=ocp.args.Composite(**save_args(large, config())))
    mngr.wait_until_finished()
    print("saved 2", flush=True)  # only reached if the parent was too slow
    mngr.close()


if __name__ == "__main__":
    main(sys.argv[1])
