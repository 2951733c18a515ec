"""The reference LoRA step with the base sharded FSDP over 8 host devices.

Every base parameter is split along its largest axis that 8 divides (replicated if
none does); the adapters follow their kernel (``a`` W's input axes, ``b`` W's output
axes, the rank axis replicated) through ``jlora.shardings`` when it exists, by hand
otherwise. Reports per-device XLA figures, the median wall time, and whether the
loss equals the single-device step's. The 8 devices share this machine's cores, so
the wall time says nothing about scaling; the memory per device does.

    python benchmarks/sharded.py [--repeats 5] [--json out.json]

Sets ``XLA_FLAGS=--xla_force_host_platform_device_count=8`` itself when run directly.
"""

from __future__ import annotations

import os

DEVICES = 8
if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (f"{os.environ.get('XLA_FLAGS', '')} "
                               f"--xla_force_host_platform_device_count={DEVICES}")

import argparse  # noqa: E402
import json  # noqa: E402
import pathlib  # noqa: E402
import sys  # noqa: E402

import jax  # noqa: E402
import numpy as np  # noqa: E402
from jax.sharding import NamedSharding  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

sys.path.insert(0, str(pathlib.Path(__file__).parent))
import gpt  # noqa: E402
import harness  # noqa: E402
import step  # noqa: E402

import jlora  # noqa: E402


def fsdp_spec(shape: tuple[int, ...]) -> P:
    """Split the largest axis that the device count divides; replicate otherwise."""
    axes = [i for i, n in enumerate(shape) if n % DEVICES == 0]
    if not axes:
        return P()
    big = max(axes, key=lambda i: shape[i])
    return P(*("fsdp" if i == big else None for i in range(len(shape))))


def adapter_specs_by_hand(params, trainable):
    """``a (*in, r)`` takes W's input-axis entries, ``b (r, *out)`` its output-axis ones."""

    def follow(w, ab):
        spec = tuple(w.sharding.spec) + (None,) * (w.ndim - len(w.sharding.spec))
        n_in = ab["a"].ndim - 1
        return {"a": NamedSharding(w.sharding.mesh, P(*spec[:n_in], None)),
                "b": NamedSharding(w.sharding.mesh, P(None, *spec[n_in:]))}

    def walk(p, t):
        return {k: follow(p[k], v) if set(v) == {"a", "b"} else walk(p[k], v) for k, v in t.items()}

    return walk(params, trainable)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--json", type=pathlib.Path)
    args = parser.parse_args(argv)
    if jax.device_count() != DEVICES:
        raise SystemExit(f"need {DEVICES} devices, got {jax.device_count()}: "
                         "set XLA_FLAGS before importing jax")

    s = step.setup(gpt.Shape())
    steps = step.build(s)
    mesh = jax.make_mesh((DEVICES,), ("fsdp",), axis_types=(jax.sharding.AxisType.Auto,))
    params = jax.tree.map(lambda x: jax.device_put(x, NamedSharding(mesh, fsdp_spec(x.shape))), s.params)
    frozen = jax.tree.map(lambda x: jax.device_put(x, NamedSharding(mesh, fsdp_spec(x.shape))), s.frozen)
    if hasattr(jlora, "shardings"):
        how, specs = "jlora.shardings", jlora.shardings(params, s.cfg)
    else:
        how, specs = ("hand (a follows W's input axes, b its output axes)",
                      adapter_specs_by_hand(params, s.trainable))
    trainable = jax.device_put(s.trainable, specs)
    tokens = jax.device_put(s.tokens, NamedSharding(mesh, P()))

    runs = {
        "jlora_factored": (steps["jlora_factored"][0], (trainable, frozen, tokens)),
        "hand_factored": (steps["hand_factored"][0], (trainable, frozen, tokens)),
        "full_ft": (steps["full_ft"][0], (params, tokens)),
    }
    results = harness.measure_all(runs, args.repeats)
    for name, (fn, a) in runs.items():
        want = jax.jit(fn)(*steps[name][1])[0]
        results[name]["matches_single_device"] = bool(np.allclose(jax.jit(fn)(*a)[0], want, rtol=1e-4))
    out = {"devices": DEVICES, "adapter_shardings": how, "results": results}
    if args.json:
        args.json.write_text(json.dumps(out, indent=2) + "\n")
    print(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
