"""jlora's int8/NF4 kernels against qwix's on one 2048x2048 float32 kernel (CPU by default).

For each scheme: stored bytes, max |W - deq(q(W))|, and the median wall time of
20 runs of the jitted ``x(32x2048) · deq(W)`` (dequantize inside the jit, as the
QLoRA forward does). qwix (``pip install qwix``) is measured with its public
``qwix.quantize`` / ``qwix.dequantize`` (int8 per output channel; NF4 tiled 64
along the input axis); its column is skipped when qwix is not importable.
Writes ``benchmarks/results/quant.json`` and prints a markdown table.

    python benchmarks/quant.py [--repeats 20] [--out benchmarks/results]
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import platform
import statistics
import time

import jax
import jax.numpy as jnp

from jlora._quant import quantize_array

N, BATCH = 2048, 32


def _median_seconds(fn, *args, repeats: int) -> float:
    jax.block_until_ready(fn(*args))  # compile
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def _nbytes(tree) -> int:
    return int(sum(x.size * jnp.dtype(x.dtype).itemsize for x in jax.tree.leaves(tree)))


def _row(name, q, dequantize, w, x, repeats):
    err = float(jnp.max(jnp.abs(dequantize(q).astype(jnp.float32) - w)))
    matmul = jax.jit(lambda x, q: x @ dequantize(q))
    return {"scheme": name, "stored_bytes": _nbytes(q), "ratio_vs_f32": _nbytes(q) / w.nbytes,
            "max_abs_error": err, "median_ms": 1e3 * _median_seconds(matmul, x, q, repeats=repeats)}


def measure(repeats: int) -> list[dict]:
    w = jax.random.normal(jax.random.key(0), (N, N), jnp.float32) * 0.02
    x = jax.random.normal(jax.random.key(1), (BATCH, N), jnp.float32)
    rows = [_row("f32 (no quantization)", w, lambda q: q, w, x, repeats)]
    for name, kw in [("jlora int8", {"kind": "int8"}), ("jlora nf4", {"kind": "nf4"}),
                     ("jlora nf4 double", {"kind": "nf4", "double": True})]:
        rows.append(_row(name, quantize_array(w, **kw), lambda q: q.dequantize(), w, x, repeats))
    try:
        import qwix
    except ImportError:
        print("qwix not importable: its rows are skipped (pip install qwix).")
        return rows
    rows.append(_row("qwix int8", qwix.quantize(w, jnp.int8, channelwise_axes=(1,)),
                     qwix.dequantize, w, x, repeats))
    rows.append(_row("qwix nf4", qwix.quantize(w, "nf4", channelwise_axes=(1,), tiled_axes={0: 64}),
                     qwix.dequantize, w, x, repeats))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--out", type=pathlib.Path, default=pathlib.Path(__file__).parent / "results")
    args = parser.parse_args()
    rows = measure(args.repeats)
    meta = {"date": time.strftime("%Y-%m-%d"), "machine": platform.platform(), "devices": jax.device_count(),
            "cpus": os.cpu_count(), "backend": jax.default_backend(), "jax": jax.__version__,
            "kernel": [N, N], "batch": BATCH, "repeats": args.repeats}
    try:
        import qwix
        meta["qwix"] = qwix.__version__
    except ImportError:
        meta["qwix"] = None
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "quant.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2) + "\n")
    print("| scheme | stored bytes | x f32 | max abs error | x·deq(W) median ms |")
    print("|---|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['scheme']} | {r['stored_bytes']:,} | {r['ratio_vs_f32']:.3f} | {r['max_abs_error']:.2e} "
              f"| {r['median_ms']:.2f} |")


if __name__ == "__main__":
    main()
