"""Serving several adapters in one batch on the reference GPT (DESIGN.md).

Forward passes over a batch of 8 sequences of 128 tokens:

* ``single``: one adapter for the whole batch (the reference cost);
* ``per_example``: a bank of 8 adapters, a different one for each sequence,
  in one call (``lora_index``);
* ``separate``: the same 8 adapters served by 8 calls of one sequence each
  (what looping over sub-batches costs).

Reports XLA cost-analysis FLOPs and median wall time; writes
``benchmarks/results/bank-<platform>.json`` and ``.md`` and checks the target:
per-example <= 1.2x single (FLOPs and wall time).

    python benchmarks/bank.py [--repeats 5]
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

import jax
import jax.numpy as jnp

sys.path.insert(0, str(pathlib.Path(__file__).parent))
import gpt  # noqa: E402

import jlora  # noqa: E402

K = 8
TARGETS = r".*/(query|key|value|out|up|down)/kernel"


def timed(fn, args, repeats):
    compiled = jax.jit(fn).lower(*args).compile()
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, list | tuple) else cost
    jax.block_until_ready(compiled(*args))
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(compiled(*args))
        times.append(time.perf_counter() - t0)
    return float(cost["flops"]), statistics.median(times), compiled


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", type=pathlib.Path, default=pathlib.Path(__file__).parent / "results")
    args = parser.parse_args(argv)

    shape = gpt.Shape(batch=K)
    model, params, tokens = gpt.init(shape, jax.random.key(0))
    adapters = []
    for i in range(K):
        cfg = jlora.LoraConfig(rank=8, alpha=16.0, targets=TARGETS)
        tr = jlora.init(jax.random.key(i + 1), params, cfg)[1]
        adapters.append((jax.tree.map(lambda v, i=i: v + 0.01 * (i + 1), tr), cfg))
    bank, bank_cfg = jlora.stack(adapters)
    one, cfg = adapters[0]
    single_apply = jlora.wrap(model.apply, cfg)
    bank_apply = jlora.wrap(model.apply, bank_cfg)
    index = jnp.arange(K, dtype=jnp.int32)

    f_single, t_single, _ = timed(lambda t, x: single_apply(params, t, x), (one, tokens), args.repeats)
    f_bank, t_bank, run_bank = timed(lambda b, x, i: bank_apply(params, b, x, lora_index=i),
                                     (bank, tokens, index), args.repeats)
    f_one, t_one, run_one = timed(lambda t, x: single_apply(params, t, x), (one, tokens[:1]), args.repeats)
    # Check: the mixed batch equals separate calls.
    mixed = run_bank(bank, tokens, index)
    for i, (tr, _) in enumerate(adapters):
        want = run_one(tr, tokens[i:i + 1])
        assert jnp.allclose(mixed[i], want[0], rtol=1e-4, atol=1e-4), i
    results = {
        "single": {"flops": f_single, "median_ms": 1e3 * t_single},
        "per_example": {"flops": f_bank, "median_ms": 1e3 * t_bank},
        "separate": {"flops": K * f_one, "median_ms": 1e3 * K * t_one},
    }
    checks = {"per_example_vs_single_flops": f_bank / f_single,
              "per_example_vs_single_time": t_bank / t_single}
    ok = all(v <= 1.2 for v in checks.values())
    device = jax.devices()[0]
    record = {
        "date": datetime.date.today().isoformat(),
        "machine": f"{platform.machine()} {device.platform} ({device.device_kind})",
        "versions": {"jax": jax.__version__, "jlora": jlora.__version__},
        "command": "python benchmarks/bank.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "adapters": K, "batch": K, "seq": shape.seq, "rank": 8,
        "results": results, "checks": checks, "pass": ok,
    }
    lines = ["| serving | GFLOP | vs single | median ms | vs single |", "|---|---:|---:|---:|---:|"]
    for name, r in results.items():
        lines.append(f"| {name} | {r['flops'] / 1e9:.2f} | {r['flops'] / f_single:.3f} | "
                     f"{r['median_ms']:.1f} | {r['median_ms'] / results['single']['median_ms']:.2f} |")
    md = (f"{K} adapters, batch {K}x{shape.seq}, {record['date']}, {record['machine']}, "
          f"jax {jax.__version__}\n\n"
          + "\n".join(lines) + f"\n\n- targets (per-example <= 1.2x single) met: {ok}\n")
    args.out.mkdir(parents=True, exist_ok=True)
    stem = args.out / f"bank-{device.platform}"
    stem.with_suffix(".json").write_text(json.dumps(record, indent=2) + "\n")
    stem.with_suffix(".md").write_text(md)
    print(md)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
