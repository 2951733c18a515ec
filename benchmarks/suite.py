"""The benchmark suite: every LoRA step on the reference GPT side by side, and what serving costs.

Sections (one run, one model: ``gpt.Shape()`` with rank 8 on q/k/v/out/up/down):

1. **train steps**: full fine-tuning, hand-written factored, jlora factored, jlora merge,
   qwix LoRA (when ``qwix`` imports), PEFT on PyTorch eager (``peft_step.py`` run by
   ``--torch-python``; an earlier ``peft-step-cpu.json`` is merged when present).
   XLA FLOPs, bytes accessed, argument/temp memory, median wall time.
2. **inference**: forward of the base model, of the merged params, of jlora unmerged
   (factored) and of the hand-written factored model. Target: unmerged <= 1.05x base wall.
3. **compile time**: trace + lower + compile of the jlora step vs the base model's
   (full fine-tuning) step, from cold caches. Target: <= 1.3x.
4. **quantized base** (hook, runs when ``jlora.quantize`` exists): stored bytes of the
   adapted kernels vs float32 (targets <= 0.27x int8, <= 0.15x nf4) and the factored step
   on the quantized base.
5. **sharded step** (``sharded.py`` in a subprocess with 8 host devices): FSDP base,
   adapters following it (``jlora.shardings`` when it exists, by hand otherwise).

Writes ``benchmarks/results/suite-<platform>.json`` and ``.md``.

    python benchmarks/suite.py [--quick] [--repeats 10] [--torch-python /tmp/refvenv/bin/python]
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import subprocess
import sys
import tempfile

import jax
import numpy as np
from flax import traverse_util

sys.path.insert(0, str(pathlib.Path(__file__).parent))
import gpt  # noqa: E402
import harness  # noqa: E402
import step  # noqa: E402

import jlora  # noqa: E402

HERE = pathlib.Path(__file__).parent
QWIX_MODULES = r".*/(query|key|value|out|up|down)"  # qwix matches module paths, jlora parameter paths
TARGET_LIMITS = {
    "inference: unmerged / base wall": 1.05,
    "compile: jlora / base step": 1.3,
    "quantized int8 / f32 bytes": 0.27,
    "quantized nf4 / f32 bytes": 0.15,
}


def skipped(note: str) -> dict:
    print(f"[suite] skipped: {note}", file=sys.stderr)
    return {"skipped": note}


# ---------------------------------------------------------------------- qwix LoRA


def qwix_step(s: step.Setup):
    """qwix's LoRA on the same Linen model, with jlora's adapter values copied in.

    qwix keeps ``kernel_lora_a`` ``(prod(in), r)`` and ``kernel_lora_b`` ``(r, prod(out))``
    beside each kernel; jlora's ``a (*in, r)``, ``b (r, *out)`` reshape onto them.
    Returns ``(step, args)``, after checking the forward equals jlora's.
    """
    import qwix

    provider = qwix.LoraProvider(module_path=QWIX_MODULES, rank=s.cfg.rank, alpha=s.cfg.alpha)
    model = qwix.apply_lora_to_model(s.model, provider)
    shapes = traverse_util.flatten_dict(jax.eval_shape(model.init, jax.random.key(0), s.tokens), sep="/")
    base = traverse_util.flatten_dict(s.params, sep="/")
    adapters = traverse_util.flatten_dict(s.trainable, sep="/")
    lora = {p: adapters[p.replace("_lora_", "/")].reshape(shapes[p].shape)
            for p in shapes if p.endswith(("_lora_a", "_lora_b"))}
    if set(base) | set(lora) != set(shapes):
        raise RuntimeError("qwix's parameters differ from the base model's plus jlora's adapters: "
                           f"{sorted(shapes)}")

    def forward(frozen, trainable, tokens):
        return model.apply(traverse_util.unflatten_dict(frozen | trainable, sep="/"), tokens)

    want = jlora.wrap(s.model.apply, s.cfg)(s.frozen, s.trainable, s.tokens)
    np.testing.assert_allclose(jax.jit(forward)(base, lora, s.tokens), want, rtol=2e-3, atol=2e-3)
    return step.lora_step(forward), (lora, base, s.tokens)


# ------------------------------------------------------------------ PEFT (PyTorch)


def peft_results(s: step.Setup, torch_python: str | None, repeats: int, out: pathlib.Path) -> dict:
    """Run ``peft_step.py`` with ``torch_python`` on this model's values, or read its last JSON."""
    path = out / "peft-step-cpu.json"
    if torch_python:
        with tempfile.TemporaryDirectory() as tmp:
            weights = pathlib.Path(tmp) / "weights.npz"
            flat = (traverse_util.flatten_dict(s.params, sep="/")
                    | traverse_util.flatten_dict(s.trainable, sep="/"))
            np.savez(weights, tokens=np.asarray(s.tokens), **{k: np.asarray(v) for k, v in flat.items()})
            subprocess.run([torch_python, str(HERE / "peft_step.py"), "--repeats", str(repeats),
                            "--weights", str(weights), "--out", str(path)],
                           check=True, stdout=subprocess.DEVNULL)
    if not path.exists():
        return skipped("PEFT: no --torch-python given and no earlier peft-step-cpu.json")
    record = json.loads(path.read_text())
    record["fresh"] = bool(torch_python)
    loss = record.get("loss_before_step")
    if loss is not None:
        want = float(gpt.next_token_loss(jlora.wrap(s.model.apply, s.cfg)(s.frozen, s.trainable, s.tokens),
                                         s.tokens))
        record["loss_matches_jlora"] = abs(loss - want) <= 1e-3 * abs(want)
        record["jlora_loss"] = want
    return record


# -------------------------------------------------------------------- inference


def inference(s: step.Setup, repeats: int) -> dict:
    unmerged = jlora.wrap(s.model.apply, s.cfg)
    merged_params = jax.jit(jlora.merge, static_argnums=2)(s.frozen, s.trainable, s.cfg)
    forwards = {
        "base": (s.model.apply, (s.params, s.tokens)),
        "merged": (s.model.apply, (merged_params, s.tokens)),
        "jlora_unmerged": (unmerged, (s.frozen, s.trainable, s.tokens)),
        "hand_unmerged": (s.hand_forward, (s.frozen, s.trainable, s.tokens)),
        "jlora_merge_each_call": (jlora.wrap(s.model.apply, s.cfg, strategy="merge"),
                                  (s.frozen, s.trainable, s.tokens)),
    }
    np.testing.assert_allclose(jax.jit(s.model.apply)(merged_params, s.tokens),
                               unmerged(s.frozen, s.trainable, s.tokens), rtol=2e-3, atol=2e-3)
    return harness.measure_all(forwards, repeats)


# ------------------------------------------------------------------ compile time


def compile_times(steps: dict, repeats: int) -> dict:
    names = [n for n in ("full_ft", "jlora_factored", "hand_factored", "qwix_lora") if n in steps]
    return harness.compile_seconds({n: steps[n] for n in names}, repeats)


# ------------------------------------------------- quantized base (hook for jlora.quantize)


def quantized(s: step.Setup, repeats: int) -> dict:
    if not hasattr(jlora, "quantize"):
        return skipped("quantized base: jlora.quantize does not exist yet")
    adapted = set(traverse_util.flatten_dict(s.trainable, sep="/"))
    kernels = {p.rsplit("/", 1)[0] for p in adapted}
    f32_bytes = sum(int(np.prod(v.shape)) * 4
                    for p, v in traverse_util.flatten_dict(s.params, sep="/").items() if p in kernels)
    out = {"f32_bytes": f32_bytes}
    for kind in ("int8", "nf4"):
        qparams = jlora.quantize(s.params, s.cfg, kind=kind)
        stored = traverse_util.flatten_dict(qparams, sep="/", is_leaf=lambda _, v: hasattr(v, "nbytes"))
        q_bytes = sum(int(v.nbytes) for p, v in stored.items() if p in kernels)
        frozen, _ = jlora.init(jax.random.key(1), qparams, s.cfg)
        lora_step = step.lora_step(jlora.wrap(s.model.apply, s.cfg))
        measured = harness.measure_all({kind: (lora_step, (s.trainable, frozen, s.tokens))}, repeats)[kind]
        out[kind] = {"stored_bytes": q_bytes, "vs_f32": q_bytes / f32_bytes, "step": measured}
    return out


# ------------------------------------------------------------------ sharded step


def sharded(repeats: int) -> dict:
    """``sharded.py`` in a subprocess: XLA_FLAGS must be set before jax is imported."""
    env = os.environ | {"XLA_FLAGS": (os.environ.get("XLA_FLAGS", "")
                                      + " --xla_force_host_platform_device_count=8")}
    with tempfile.TemporaryDirectory() as tmp:
        path = pathlib.Path(tmp) / "sharded.json"
        proc = subprocess.run([sys.executable, str(HERE / "sharded.py"), "--repeats", str(repeats),
                               "--json", str(path)],
                              env=env, capture_output=True, text=True)
        if proc.returncode != 0:
            errors = [line for line in proc.stderr.splitlines() if "Error" in line]
            return skipped(f"sharded.py failed: {(errors or proc.stderr.splitlines() or ['?'])[-1]}")
        return json.loads(path.read_text())


# ---------------------------------------------------------------------- report


def train_rows(results: dict, peft: dict) -> list[list]:
    hand, full = results["hand_factored"], results["full_ft"]
    rows = [[name, f"{r['flops'] / 1e9:.2f}", f"{r['flops'] / hand['flops']:.3f}",
             f"{r['flops'] / full['flops']:.3f}", f"{r['bytes_accessed'] / 1e9:.2f}",
             f"{r['argument_bytes'] / 2**20:.1f}", f"{r['temp_bytes'] / 2**20:.1f}",
             f"{r['median_ms']:.1f}", f"{r['flops'] / r['median_ms'] / 1e6:.1f}"]
            for name, r in results.items()]
    for name, r in peft.get("results", {}).items():
        rows.append([f"{name} (torch {peft['versions']['torch']})", f"{r['flops'] / 1e9:.2f}*", "", "", "n/a",
                     f"{r['parameter_bytes'] / 2**20:.1f}", "n/a", f"{r['median_ms']:.1f}",
                     f"{r['flops'] / r['median_ms'] / 1e6:.1f}*"])
    return rows


def report(record: dict) -> str:
    r = record["results"]
    parts = [f"# jlora benchmark suite\n\n{record['date']} · {record['machine']} · "
             + ", ".join(f"{k} {v}" for k, v in record["versions"].items())
             + f" · `{record['command']}`\n\nWall times are medians of {record['repeats']} round-robin runs; "
             "compare ratios within one run, not across runs. FLOPs and bytes are XLA's own figures.\n"]
    parts.append("## Training step\n\n" + harness.md_table(
        ["step", "GFLOP", "vs hand", "vs full FT", "GB accessed", "arg MiB", "temp MiB", "median ms",
         "GFLOP/s"],
        train_rows(r["train"], r["peft"])))
    if "results" in r["peft"]:
        p = r["peft"]
        parts.append(f"\\* PyTorch FLOPs as `torch.utils.flop_counter` counts them "
                     f"(matmuls and attention only); "
                     f"PEFT run {'now' if p['fresh'] else 'earlier, on ' + p['date']}"
                     + (f"; its loss matches jlora's: {p['loss_matches_jlora']}"
                        if "loss_matches_jlora" in p else "")
                     + ".")
    base = r["inference"]["base"]
    parts.append("## Inference forward\n\n" + harness.md_table(
        ["forward", "GFLOP", "vs base", "temp MiB", "median ms", "vs base"],
        [[n, f"{v['flops'] / 1e9:.2f}", f"{v['flops'] / base['flops']:.3f}", f"{v['temp_bytes'] / 2**20:.1f}",
          f"{v['median_ms']:.1f}", f"{v['median_ms'] / base['median_ms']:.3f}"]
         for n, v in r["inference"].items()]))
    c = r["compile"]
    parts.append("## Compile time (trace + lower + compile, cold caches)\n\n" + harness.md_table(
        ["step", "median s", "vs full FT"],
        [[n, f"{t:.2f}", f"{t / c['full_ft']:.2f}"] for n, t in c.items()]))
    q = r["quantized"]
    if "skipped" in q:
        parts.append(f"## Quantized base\n\nSkipped: {q['skipped']}.")
    else:
        parts.append("## Quantized base\n\n" + harness.md_table(
            ["kind", "adapted kernels MiB", "vs f32", "step GFLOP", "temp MiB", "median ms"],
            [["f32", f"{q['f32_bytes'] / 2**20:.2f}", "1.000", "", "", ""]]
            + [[k, f"{q[k]['stored_bytes'] / 2**20:.2f}", f"{q[k]['vs_f32']:.3f}",
                f"{q[k]['step']['flops'] / 1e9:.2f}", f"{q[k]['step']['temp_bytes'] / 2**20:.1f}",
                f"{q[k]['step']['median_ms']:.1f}"] for k in ("int8", "nf4")]))
    sh = r["sharded"]
    if "skipped" in sh:
        parts.append(f"## Sharded step\n\nSkipped: {sh['skipped']}.")
    else:
        parts.append(f"## Sharded step ({sh['devices']} host devices, FSDP; "
                     f"adapters placed by {sh['adapter_shardings']})"
                     "\n\n" + harness.md_table(
                         ["step", "GFLOP/device", "arg MiB/device", "temp MiB/device", "median ms",
                          "loss = 1 device"],
                         [[n, f"{v['flops'] / 1e9:.2f}", f"{v['argument_bytes'] / 2**20:.1f}",
                           f"{v['temp_bytes'] / 2**20:.1f}", f"{v['median_ms']:.1f}",
                           v["matches_single_device"]]
                          for n, v in sh["results"].items()]))
    parts.append("## Targets\n\n" + "\n".join(
        f"- {k} <= {TARGET_LIMITS.get(k, '')}: {v:.3f} ({'met' if v <= TARGET_LIMITS[k] else 'MISSED'})"
        if k in TARGET_LIMITS else f"- {k}: {v:.3f}" for k, v in record["checks"].items()))
    return "\n\n".join(parts) + "\n"


def checks(r: dict) -> dict[str, float]:
    train = r["train"]
    out = {
        "train: jlora factored / hand FLOPs": train["jlora_factored"]["flops"]
                                              / train["hand_factored"]["flops"],
        "train: jlora factored / full FT FLOPs": train["jlora_factored"]["flops"] / train["full_ft"]["flops"],
        "inference: unmerged / base wall": r["inference"]["jlora_unmerged"]["median_ms"]
                                            / r["inference"]["base"]["median_ms"],
        "compile: jlora / base step": r["compile"]["jlora_factored"] / r["compile"]["full_ft"],
    }
    if "qwix_lora" in train:
        out["train: qwix / hand FLOPs"] = train["qwix_lora"]["flops"] / train["hand_factored"]["flops"]
    if "skipped" not in r["quantized"]:
        out |= {f"quantized {k} / f32 bytes": r["quantized"][k]["vs_f32"] for k in ("int8", "nf4")}
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="smoke test: 2 repeats, 1 compile, batch 2")
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--compile-repeats", type=int, default=3)
    parser.add_argument("--torch-python", default=os.environ.get("JLORA_TORCH_PYTHON"),
                        help="a Python with torch and peft to run peft_step.py "
                             "(default: $JLORA_TORCH_PYTHON)")
    parser.add_argument("--no-sharded", action="store_true")
    parser.add_argument("--out", type=pathlib.Path, default=harness.RESULTS)
    args = parser.parse_args(argv)
    if args.quick:
        args.repeats, args.compile_repeats = 2, 1

    shape = gpt.Shape(batch=2) if args.quick else gpt.Shape()
    s = step.setup(shape)
    steps = step.build(s)
    try:
        steps["qwix_lora"] = qwix_step(s)
    except ImportError as e:
        print(f"[suite] qwix not importable ({e}); pip install qwix==0.1.8", file=sys.stderr)
    results = {
        "train": harness.measure_all(steps, args.repeats),
        "peft": peft_results(s, args.torch_python, args.repeats, args.out) if not args.quick
        else skipped("PEFT: --quick"),
        "inference": inference(s, 2 * args.repeats),
        "compile": compile_times(steps, args.compile_repeats),
        "quantized": quantized(s, args.repeats),
        "sharded": skipped("--no-sharded") if args.no_sharded else sharded(args.repeats),
    }
    record = harness.machine() | {
        "command": "python benchmarks/suite.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "model": vars(shape) | {"rank": 8, "targets": step.TARGETS},
        "repeats": args.repeats,
        "results": results,
    }
    record["checks"] = checks(results)
    record["pass"] = all(v <= TARGET_LIMITS[k] for k, v in record["checks"].items() if k in TARGET_LIMITS)
    stem = args.out / (f"suite-{jax.default_backend()}" + ("-quick" if args.quick else ""))
    harness.write(stem, record, report(record))
    return 0


if __name__ == "__main__":
    sys.exit(main())
