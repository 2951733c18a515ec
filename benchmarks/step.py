"""Cost of one LoRA training step on the reference GPT (DESIGN.md, "Performance model").

Four steps over the same model and batch, each ``value_and_grad`` of the next-token
loss plus an SGD update of what it trains:

* ``full_ft``      every parameter trained (no LoRA);
* ``jlora_factored`` ``jlora.wrap(model.apply, cfg)``: the delta kept factored;
* ``jlora_merge``  ``jlora.wrap(..., strategy="merge")``: W + s·a@b formed each step;
* ``hand_factored`` the LoRA branch written by hand into the model (the floor).

For each: XLA cost-analysis FLOPs and bytes accessed, memory-analysis argument and
temp bytes, and the median wall time of ``--repeats`` runs. Writes
``benchmarks/results/step-<platform>.json`` and ``.md`` and checks the targets:
factored FLOPs <= 1.01x hand-written and <= 0.69x full fine-tuning.

    python benchmarks/step.py [--repeats 10] [--out benchmarks/results]
"""

from __future__ import annotations

import argparse
import datetime
import json
import pathlib
import platform
import statistics
import sys
import time

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax

sys.path.insert(0, str(pathlib.Path(__file__).parent))
import gpt  # noqa: E402

import jlora  # noqa: E402

TARGETS = r".*/(query|key|value|out|up|down)/kernel"
LR = 1e-3


def sgd(params, grads):
    return jax.tree.map(lambda p, g: p - jnp.asarray(LR, p.dtype) * g.astype(p.dtype), params, grads)


def build(shape: gpt.Shape):
    model, params, tokens = gpt.init(shape, jax.random.key(0))
    cfg = jlora.LoraConfig(rank=8, alpha=16.0, targets=TARGETS)
    frozen, trainable = jlora.init(jax.random.key(1), params, cfg)
    # Non-zero b, so every variant computes a real delta (and the check below means something).
    trainable = jax.tree.map(lambda v: v + 0.01 * jax.random.normal(jax.random.key(2), v.shape, v.dtype), trainable)
    scale = cfg.scale_for(cfg.rules[0])

    def full_ft(params, tokens):
        loss, g = jax.value_and_grad(lambda p: gpt.next_token_loss(model.apply(p, tokens), tokens))(params)
        return loss, sgd(params, g)

    def lora_step(forward):
        def step(trainable, frozen, tokens):
            loss, g = jax.value_and_grad(lambda t: gpt.next_token_loss(forward(frozen, t, tokens), tokens))(trainable)
            return loss, sgd(trainable, g)

        return step

    factored = jlora.wrap(model.apply, cfg)
    merged = jlora.wrap(model.apply, cfg, strategy="merge")
    steps = {
        "full_ft": (full_ft, (params, tokens)),
        "jlora_factored": (lora_step(factored), (trainable, frozen, tokens)),
        "jlora_merge": (lora_step(merged), (trainable, frozen, tokens)),
        "hand_factored": (lora_step(lambda f, t, x: gpt.hand_forward(shape, f, t, x, scale)),
                          (trainable, frozen, tokens)),
    }
    # The hand-written model is the same maths: check before timing anything.
    want = factored(frozen, trainable, tokens)
    got = jax.jit(lambda f, t, x: gpt.hand_forward(shape, f, t, x, scale))(frozen, trainable, tokens)
    np.testing.assert_allclose(got, want, rtol=2e-3, atol=2e-3)
    uses = factored.uses(frozen, trainable, tokens)
    assert uses and all(u.factored for u in uses), "a kernel fell back to the merged weight"
    return steps


def measure(fn, args, repeats: int) -> dict:
    compiled = jax.jit(fn).lower(*args).compile()
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, list | tuple) else cost
    mem = compiled.memory_analysis()
    jax.block_until_ready(compiled(*args))  # warm-up
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(compiled(*args))
        times.append(time.perf_counter() - t0)
    return {
        "flops": float(cost["flops"]),
        "bytes_accessed": float(cost["bytes accessed"]),
        "argument_bytes": int(mem.argument_size_in_bytes),
        "temp_bytes": int(mem.temp_size_in_bytes),
        "median_ms": 1e3 * statistics.median(times),
    }


def table(results: dict) -> str:
    hand, full = results["hand_factored"], results["full_ft"]
    lines = [
        "| step | GFLOP | vs hand | vs full FT | GB accessed | arg MiB | temp MiB | median ms |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name, r in results.items():
        lines.append(
            f"| {name} | {r['flops'] / 1e9:.2f} | {r['flops'] / hand['flops']:.3f} | "
            f"{r['flops'] / full['flops']:.3f} | {r['bytes_accessed'] / 1e9:.2f} | "
            f"{r['argument_bytes'] / 2**20:.1f} | {r['temp_bytes'] / 2**20:.1f} | {r['median_ms']:.1f} |"
        )
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--out", type=pathlib.Path, default=pathlib.Path(__file__).parent / "results")
    args = parser.parse_args(argv)

    steps = build(gpt.Shape())
    results = {name: measure(fn, a, args.repeats) for name, (fn, a) in steps.items()}
    f = results["jlora_factored"]["flops"]
    checks = {
        "factored_vs_hand <= 1.01": f / results["hand_factored"]["flops"],
        "factored_vs_full_ft <= 0.69": f / results["full_ft"]["flops"],
    }
    ok = checks["factored_vs_hand <= 1.01"] <= 1.01 and checks["factored_vs_full_ft <= 0.69"] <= 0.69
    device = jax.devices()[0]
    record = {
        "date": datetime.date.today().isoformat(),
        "machine": f"{platform.machine()} {device.platform} ({device.device_kind}), {jax.device_count()} device(s)",
        "versions": {"python": platform.python_version(), "jax": jax.__version__, "flax": flax.__version__,
                     "optax": optax.__version__, "jlora": jlora.__version__},
        "command": "python benchmarks/step.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "model": vars(gpt.Shape()) | {"rank": 8, "targets": TARGETS},
        "results": results,
        "checks": checks,
        "pass": ok,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    stem = args.out / f"step-{device.platform}"
    stem.with_suffix(".json").write_text(json.dumps(record, indent=2) + "\n")
    md = (f"Reference LoRA step, {record['date']}, {record['machine']}, jax {jax.__version__}\n\n"
          + table(results) + "\n\n"
          + "\n".join(f"- {k}: {v:.3f}" for k, v in checks.items()) + f"\n- targets met: {ok}\n")
    stem.with_suffix(".md").write_text(md)
    print(md)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
