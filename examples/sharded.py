"""LoRA on a model sharded over 8 devices: the adapters follow the base weights.

    python examples/sharded.py --layout fsdp    # every weight split along its largest axis
    python examples/sharded.py --layout tp      # Megatron: column- then row-parallel, batch over 'data'

Builds a ('data', 'model') = (2, 4) mesh, places a small decoder's weights on it,
creates adapters with `jlora.init` (each created in place: a follows W's input
axes, b its output axes, the rank axis replicated), prints where they live, trains
a few steps and checks that every step's loss equals the same step on one device.
"""

import os

# Eight fake CPU devices (and quick, lightly optimised CPU compiles), so this runs on a
# laptop. On real hardware drop this line; with several hosts call
# jax.distributed.initialize() first (see the README).
os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                           + " --xla_force_host_platform_device_count=8 --xla_backend_optimization_level=0")

import argparse  # noqa: E402
import re  # noqa: E402

import flax.linen as nn  # noqa: E402
import jax  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from jax.sharding import Mesh, NamedSharding  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

import jlora  # noqa: E402

VOCAB, D, HEADS, HIDDEN, LAYERS = 64, 32, 4, 64, 2
BATCH, SEQ = 8, 16

CONFIG = jlora.LoraConfig(
    rank=4, alpha=8.0,
    targets=(jlora.Rule(pattern=r"params/layers/.*/kernel", stack_axes=(0,)), r"params/embed/embedding"),
    train_in_full=r"params/head/.*",
)


class Layer(nn.Module):
    """Pre-norm attention and MLP; scanned, so every kernel gains a leading layer axis."""

    @nn.compact
    def __call__(self, h, _):
        h = h + nn.MultiHeadDotProductAttention(num_heads=HEADS, name="attn")(nn.LayerNorm(name="ln1")(h))
        up = nn.Dense(HIDDEN, name="up")(nn.LayerNorm(name="ln2")(h))
        return h + nn.Dense(D, name="down")(jax.nn.gelu(up)), None


class Decoder(nn.Module):
    @nn.compact
    def __call__(self, tokens):
        h = nn.Embed(VOCAB, D, name="embed")(tokens)
        layers = nn.scan(Layer, variable_axes={"params": 0}, split_rngs={"params": True}, length=LAYERS)
        h, _ = layers(name="layers")(h, None)
        return nn.Dense(VOCAB, name="head")(h)


def make_mesh() -> Mesh:
    return Mesh(np.array(jax.devices()[:8]).reshape(2, 4), ("data", "model"))


def fsdp_spec(path: str, shape: tuple[int, ...]) -> P:
    """FSDP: a matrix's largest axis split over all 8 devices; vectors replicated."""
    if len(shape) < 2 or path.endswith("bias") or "ln" in path:
        return P()
    axis = max(range(len(shape)), key=lambda i: (shape[i] % 8 == 0, shape[i]))
    return P(*(("data", "model") if i == axis else None for i in range(len(shape))))


TP_RULES = (  # Megatron over 'model'; under layers/ every leaf leads with the layer axis
    (r".*/(query|key|value)/kernel", P(None, None, "model", None)),  # (L, d, heads, hd): column-parallel
    (r".*/(query|key|value)/bias", P(None, "model", None)),
    (r".*/out/kernel", P(None, "model", None, None)),  # (L, heads, hd, d): row-parallel
    (r".*/up/kernel", P(None, None, "model")),  # column-parallel
    (r".*/up/bias", P(None, "model")),
    (r".*/down/kernel", P(None, "model", None)),  # row-parallel
    (r".*/embed/embedding", P("model", None)),  # vocabulary-parallel
    (r".*/head/kernel", P(None, "model")),
    (r".*/head/bias", P("model")),
)


def tp_spec(path: str, shape: tuple[int, ...]) -> P:
    del shape
    return next((spec for pattern, spec in TP_RULES if re.fullmatch(pattern, path)), P())


LAYOUTS = {"fsdp": (fsdp_spec, P(("data", "model"))), "tp": (tp_spec, P("data"))}


def param_specs(params, layout: str):
    """One PartitionSpec per leaf, chosen by path and shape."""
    rule = LAYOUTS[layout][0]
    return jax.tree_util.tree_map_with_path(
        lambda path, x: rule(jax.tree_util.keystr(path, simple=True, separator="/"), x.shape), params
    )


def batch(key):
    """Tokens and a fixed per-token target map the adapters can learn."""
    tokens = jax.random.randint(key, (BATCH, SEQ), 0, VOCAB)
    return tokens, (tokens * 7 + 3) % VOCAB


def make_step(config, tx, keep):
    """A jitted LoRA step whose new ``(trainable, opt_state)`` keep the shardings ``keep``.

    Without ``out_shardings`` XLA may hand back other shardings, and the next call
    would compile again for them.
    """
    lora_apply = jlora.wrap(Decoder().apply, config)

    def loss_fn(trainable, frozen, tokens, targets):
        logits = lora_apply(frozen, trainable, tokens)
        return optax.softmax_cross_entropy_with_integer_labels(logits, targets).mean()

    def step(frozen, trainable, opt_state, tokens, targets):
        loss, grads = jax.value_and_grad(loss_fn)(trainable, frozen, tokens, targets)
        updates, opt_state = tx.update(grads, opt_state, trainable)
        return optax.apply_updates(trainable, updates), opt_state, loss

    return jax.jit(step, out_shardings=(*keep, None))


def replicate_scalars(opt_state, mesh: Mesh):
    """optax's step counts are scalars on one device: replicate them on the mesh."""
    return jax.tree.map(lambda x: x if x.ndim else jax.device_put(x, NamedSharding(mesh, P())), opt_state)


def train(params, key, steps: int, mesh=None, data_spec=None):
    """``steps`` LoRA steps from ``params`` (on ``mesh``, or on one device); the adapters and losses."""
    frozen, trainable = jlora.init(jax.random.key(1), params, CONFIG)
    tx = jlora.optimizer(CONFIG, 3e-3, lr_ratio=4.0)
    opt_state = tx.init(trainable)  # moments take the adapters' shardings
    data_sharding = None
    if mesh is not None:
        opt_state = replicate_scalars(opt_state, mesh)
        data_sharding = NamedSharding(mesh, data_spec)
    step = make_step(CONFIG, tx, jax.tree.map(lambda x: x.sharding, (trainable, opt_state)))
    losses = []
    for i in range(steps):
        tokens, targets = batch(jax.random.fold_in(key, i))
        if data_sharding is not None:
            tokens, targets = jax.device_put((tokens, targets), data_sharding)
        trainable, opt_state, loss = step(frozen, trainable, opt_state, tokens, targets)
        losses.append(float(loss))
    return trainable, losses


def show(sharded, trainable) -> None:
    """Each adapted kernel's spec, and the specs its adapter took from it."""
    w = jlora._paths.flatten(sharded)
    for path, x in jlora._paths.flatten(trainable).items():
        kernel, _, factor = path.rpartition("/")
        if factor in ("a", "b"):
            print(f"  {path:34s} {str(x.sharding.spec):34s} from W {w[kernel].sharding.spec}")


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layout", choices=sorted(LAYOUTS), default="fsdp")
    parser.add_argument("--steps", type=int, default=30)
    args = parser.parse_args(argv)

    mesh = make_mesh()
    key = jax.random.key(0)
    params = jax.jit(Decoder().init)(key, batch(key)[0])
    specs = param_specs(params, args.layout)
    sharded = jax.device_put(params, jax.tree.map(lambda spec: NamedSharding(mesh, spec), specs))

    print(f"{args.layout}: adapters on a {dict(mesh.shape)} mesh, each following its kernel")
    trainable, losses = train(sharded, key, args.steps, mesh, LAYOUTS[args.layout][1])
    show(sharded, trainable)
    planned = jlora.shardings(params, CONFIG, specs=specs)  # the same, from specs alone
    assert jax.tree.map(lambda x: x.sharding.spec, trainable) == planned
    print(f"loss {losses[0]:.3f} -> {losses[-1]:.3f} in {args.steps} steps")

    _, single = train(jax.device_put(params, jax.devices()[0]), key, args.steps)
    gap = float(np.max(np.abs(np.array(losses) - np.array(single))))
    print(f"largest loss gap to the same steps on one device: {gap:.2e}")
    assert losses[-1] < losses[0], losses
    assert np.allclose(losses, single, rtol=1e-4, atol=1e-5), (losses, single)
    return {"losses": losses, "single": single, "gap": gap}


if __name__ == "__main__":
    main()
