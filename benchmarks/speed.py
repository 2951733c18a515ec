"""Where the factored LoRA step loses time on CPU, and which levers move it.

Three investigations of the hand-written factored step (the floor jlora compiles to):

* ``profile``: a ``jax.profiler`` trace of the compiled step, each XLA op's time joined
  with its FLOPs (parsed from the compiled HLO), grouped into big matmuls, attention
  matmuls, low-rank matmuls, layout copies and elementwise/reduction work.
* ``layouts``: variants of the same maths side by side in one process (round-robin
  timings): einsum on 3-D kernels (as written), 2-D ``(batch*seq, in) @ (in, out)``
  matmuls, one fused ``x @ [W | a]`` matmul, bf16 compute, and a plain 2048^2 matmul
  as the machine's reference throughput.
* ``flags``: the baseline step and the 2048^2 matmul under XLA CPU flags, each in its
  own process (``XLA_FLAGS`` is read at start-up), baseline runs first and last.

    python benchmarks/speed.py [profile] [layouts] [flags] [--repeats 7]  (all three by default)
"""

from __future__ import annotations

import argparse
import collections
import glob
import json
import os
import pathlib
import re
import subprocess
import sys
import tempfile

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn

sys.path.insert(0, str(pathlib.Path(__file__).parent))
import gpt  # noqa: E402
import harness  # noqa: E402
import step  # noqa: E402

MATMUL_N = 2048
FLAGS = {
    "baseline": "",
    "fast_math": "--xla_cpu_enable_fast_math=true",
    "no_multi_thread_eigen": "--xla_cpu_multi_thread_eigen=false",
    "no_thunk_runtime": "--xla_cpu_use_thunk_runtime=false",
    "xnnpack": "--xla_cpu_use_xnnpack=true",
    "no_ynn_fusions": "--xla_cpu_experimental_ynn_fusion_type=",
    "onednn": "--xla_cpu_use_onednn=true",
    "concurrency_scheduler": "--xla_cpu_enable_concurrency_optimized_scheduler=true",
    "prefer_vector_256": "--xla_cpu_prefer_vector_width=256",
}


def matmul_reference():
    x = jax.random.normal(jax.random.key(0), (MATMUL_N, MATMUL_N))
    return (lambda a, b: a @ b), (x, x)


# --------------------------------------------------------------------- profile

SHAPE_RE = r"(?:f32|bf16|f16|s32)\[([\d,]*)\]"


def dot_flops(hlo: str) -> dict[str, float]:
    """FLOPs of the dots in each fusion (and of top-level dots), by op name."""
    comps, current = {}, None
    for line in hlo.splitlines():
        head = re.match(r"^(?:ENTRY )?%?([\w.\-]+) .*\{$", line)
        if head:
            current = head.group(1)
            comps[current] = []
        elif current:
            comps[current].append(line)

    def dots(lines) -> dict[str, float]:
        shapes, found = {}, {}
        for ln in lines:
            m = re.match(rf"\s*(?:ROOT )?%?([\w.\-]+) = {SHAPE_RE}", ln)
            if not m:
                continue
            shapes[m.group(1)] = [int(d) for d in m.group(2).split(",") if d]
            d = re.search(r" dot\(%?([\w.\-]+), .*lhs_contracting_dims=\{([\d,]*)\}", ln)
            if d:
                lhs = shapes[d.group(1)]
                k = np.prod([lhs[int(i)] for i in d.group(2).split(",") if i])
                found[m.group(1)] = 2.0 * np.prod(shapes[m.group(1)]) * k
        return found

    out = {}
    for lines in comps.values():
        out |= dots(lines)
        for ln in lines:
            m = re.match(r"\s*(?:ROOT )?%?([\w.\-]+) = .* calls=%?([\w.\-]+)", ln)
            if m and m.group(2) in comps:
                out[m.group(1)] = sum(dots(comps[m.group(2)]).values())
    return out


def category(name: str, flops: float) -> str:
    if flops >= 100e6:
        return "big matmuls (>= 100 MFLOP)"
    if flops >= 20e6:
        return "attention-size matmuls (20-100 MFLOP)"
    if flops > 0:
        return "low-rank matmuls (< 20 MFLOP)"
    if "copy" in name or "transpose" in name:
        return "layout copies / transposes"
    return "elementwise, reductions, other"


def profile(repeats: int) -> dict:
    """The per-op breakdown of the hand-written step as written (3-D einsums) and in 2-D."""
    s = step.setup(gpt.Shape())
    args = (s.trainable, s.frozen, s.tokens)
    flat = step.lora_step(lambda f, t, x: flat_forward(s.shape, f, t, x, s.scale))
    return {"einsum_3d": profile_one(step.lora_step(s.hand_forward), args, repeats),
            "flat_2d": profile_one(flat, args, repeats)}


def profile_one(fn, args, repeats: int) -> dict:
    compiled, stats = harness.compile_with_costs(fn, args)
    flops = dot_flops(compiled.as_text())
    jax.block_until_ready(compiled(*args))
    with tempfile.TemporaryDirectory() as tmp:
        jax.profiler.start_trace(tmp)
        for _ in range(repeats):
            jax.block_until_ready(compiled(*args))
        jax.profiler.stop_trace()
        data = jax.profiler.ProfileData.from_file(glob.glob(f"{tmp}/**/*.xplane.pb", recursive=True)[-1])
    ms, gf = collections.Counter(), collections.Counter()
    per_op = collections.Counter()
    for plane in data.planes:
        for line in plane.lines:
            if "Eigen" not in line.name and "XLA" not in line.name:
                continue
            for ev in line.events:
                name = ev.name
                if name.startswith(("ThunkExecutor", "SlinkyThreadPool")) or " " in name:
                    continue
                cat = category(name, flops.get(name, 0.0))
                ms[cat] += ev.duration_ns / 1e6 / repeats
                gf[cat] += flops.get(name, 0.0) / 1e9 / repeats
                per_op[name] += ev.duration_ns / 1e6 / repeats
    total = sum(ms.values())
    rows = {cat: {"ms": ms[cat], "share": ms[cat] / total, "gflop": gf[cat],
                  "gflop_per_s": gf[cat] / ms[cat] * 1e3 if ms[cat] else 0.0}
            for cat in sorted(ms, key=ms.get)[::-1]}
    top = [{"op": n, "ms": t, "mflop": flops.get(n, 0.0) / 1e6} for n, t in per_op.most_common(15)]
    return {"step_flops": stats["flops"], "op_ms_total": total, "categories": rows, "top_ops": top}


# --------------------------------------------------------------------- layouts


def flat_forward(shape: gpt.Shape, frozen, trainable, tokens, scale, *, fused=False, dtype=jnp.float32):
    """The hand-written model with every kernel as a 2-D ``(in, out)`` matrix and 2-D activations.

    ``fused``: ``x @ concat([W, a], 1)`` in one matmul, then split (x read once).
    ``dtype``: the matmul operand dtype (accumulating in float32).
    """
    p, t = frozen["params"], trainable["params"]
    n = shape.batch * shape.seq

    def mm(x, w):
        return jnp.matmul(x.astype(dtype), w.astype(dtype), preferred_element_type=jnp.float32)

    def dense(x, wp, wt):
        w = wp["kernel"]
        fan_in = int(np.prod(x.shape[1:]))
        w2, x2 = w.reshape(fan_in, -1), x.reshape(n, fan_in)
        a, b = wt["kernel"]["a"].reshape(fan_in, -1), wt["kernel"]["b"]
        r = a.shape[1]
        b2 = b.reshape(r, -1)
        if fused:
            y = mm(x2, jnp.concatenate([w2, a], axis=1))
            out, u = y[:, : w2.shape[1]], y[:, w2.shape[1]:]
        else:
            out, u = mm(x2, w2), mm(x2, a)
        out = out + mm(u * scale, b2)
        return out + wp["bias"].reshape(-1)

    def ln(x, q):
        return nn.LayerNorm().apply({"params": q}, x)

    x = (jnp.take(p["embed"]["embedding"], tokens, axis=0) + p["pos"][: tokens.shape[1]]).reshape(n, -1)
    mask = nn.make_causal_mask(tokens)
    heads = (shape.batch, shape.seq, shape.heads, shape.d_model // shape.heads)
    for i in range(shape.layers):
        bp, bt = p[f"block_{i}"], t[f"block_{i}"]
        h = ln(x, bp["ln1"])
        q, k, v = (dense(h, bp["attn"][m], bt["attn"][m]).reshape(heads) for m in ("query", "key", "value"))
        o = nn.dot_product_attention(q, k, v, mask=mask).reshape(n, -1)
        x = x + dense(o, bp["attn"]["out"], bt["attn"]["out"])
        h = ln(x, bp["ln2"])
        x = x + dense(nn.gelu(dense(h, bp["up"], bt["up"])), bp["down"], bt["down"])
    x = ln(x, p["ln_f"])
    return mm(x, p["head"]["kernel"]).reshape(shape.batch, shape.seq, -1)


def layouts(repeats: int) -> dict:
    s = step.setup(gpt.Shape())
    args = (s.trainable, s.frozen, s.tokens)

    def variant(**kw):
        return step.lora_step(lambda f, t, x: flat_forward(s.shape, f, t, x, s.scale, **kw))

    def with_precision(fn, precision):
        def run(*a):
            with jax.default_matmul_precision(precision):
                return fn(*a)
        return run

    hand = step.lora_step(s.hand_forward)
    runs = {
        "einsum_3d (baseline)": (hand, args),
        "einsum_3d, LoRA branch 2-D": (
            step.lora_step(lambda f, t, x: s.hand_forward(f, t, x, flat_lora=True)), args),
        "flat_2d": (variant(), args),
        "flat_2d_fused_wa": (variant(fused=True), args),
        "flat_2d_bf16": (variant(dtype=jnp.bfloat16), args),
        "einsum_3d precision=bfloat16": (with_precision(hand, "bfloat16"), args),
        "einsum_3d precision=highest": (with_precision(hand, "highest"), args),
        f"matmul_{MATMUL_N}": matmul_reference(),
    }
    want = jax.jit(s.hand_forward)(s.frozen, s.trainable, s.tokens)
    for fused in (False, True):
        got = jax.jit(lambda f, t, x, fused=fused: flat_forward(s.shape, f, t, x, s.scale, fused=fused))(
            s.frozen, s.trainable, s.tokens)
        np.testing.assert_allclose(got, want, rtol=2e-3, atol=2e-3)
    results = harness.measure_all(runs, repeats)
    base = results["einsum_3d (baseline)"]["median_ms"]
    for r in results.values():
        r["vs_baseline_wall"] = r["median_ms"] / base
        r["gflop_per_s"] = r["flops"] / r["median_ms"] / 1e6
    return results


# ----------------------------------------------------------------------- flags


def flag_worker(repeats: int) -> dict:
    s = step.setup(gpt.Shape())
    runs = {"hand_factored": step.build(s)["hand_factored"], f"matmul_{MATMUL_N}": matmul_reference()}
    out = harness.measure_all(runs, repeats)
    return {k: {"median_ms": v["median_ms"], "gflop_per_s": v["flops"] / v["median_ms"] / 1e6}
            for k, v in out.items()}


def flags(repeats: int, names: list[str]) -> dict:
    order = ["baseline"] + [n for n in names if n != "baseline"] + ["baseline"]
    results = {}
    for i, name in enumerate(order):
        env = os.environ | {"XLA_FLAGS": FLAGS[name]}
        proc = subprocess.run([sys.executable, __file__, "flag-worker", "--repeats", str(repeats)],
                              env=env, capture_output=True, text=True)
        key = f"{name} (run {i})" if name == "baseline" else name
        if proc.returncode != 0:
            results[key] = {"error": (proc.stderr.strip().splitlines() or ["?"])[-1]}
        else:
            results[key] = json.loads(proc.stdout.strip().splitlines()[-1])
        print(key, results[key], file=sys.stderr)
    return results


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("what", nargs="*", default=["profile", "layouts", "flags"])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--flags", nargs="*", default=list(FLAGS))
    parser.add_argument("--out", type=pathlib.Path, help="default: results/speed-<what>-cpu.json")
    args = parser.parse_args(argv)
    args.out = args.out or harness.RESULTS / f"speed-{'-'.join(args.what)}-{jax.default_backend()}.json"
    if args.what == ["flag-worker"]:
        print(json.dumps(flag_worker(args.repeats)))
        return 0
    jobs = {"profile": lambda: profile(args.repeats), "layouts": lambda: layouts(args.repeats),
            "flags": lambda: flags(args.repeats, args.flags)}
    record = harness.machine() | {"results": {w: jobs[w]() for w in args.what}}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(record, indent=2) + "\n")
    print(json.dumps(record["results"], indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
