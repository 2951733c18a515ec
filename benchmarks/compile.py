"""Trace + compile time of a wrapped training step against the base model's, as layers grow.

The benchmark GPT (benchmarks/gpt.py) at d_model 128 with 4, 24 and 48 unscanned layers,
rank 8 on q/k/v/out/up/down of every layer. For each depth, from cold caches, the median
seconds of ``jax.jit(step).lower(...).compile()`` for the full fine-tuning step and for
jlora's LoRA step (the same loss, SGD update), and their ratio. Target: <= 1.3 at 48 layers.

    .venv/bin/python benchmarks/compile.py [--layers 4 24 48] [--repeats 3]
"""

from __future__ import annotations

import argparse
import pathlib

import gpt
import harness
import jax
import step

import jlora

RESULTS = pathlib.Path(__file__).parent / "results"


def measure(layers: int, repeats: int) -> dict:
    shape = gpt.Shape(d_model=128, layers=layers, heads=4, vocab=512, seq=64, batch=2)
    model, params, tokens = gpt.init(shape, jax.random.key(0))
    cfg = jlora.LoraConfig(rank=8, alpha=16.0, targets=step.TARGETS)
    frozen, trainable = jlora.init(jax.random.key(1), params, cfg)
    steps = {
        "full_ft": (step.full_ft_step(model.apply), (params, tokens)),
        "jlora": (step.lora_step(jlora.wrap(model.apply, cfg)), (trainable, frozen, tokens)),
    }
    seconds = harness.compile_seconds(steps, repeats)
    return {"layers": layers, "adapted_kernels": 6 * layers, **seconds,
            "ratio": seconds["jlora"] / seconds["full_ft"]}


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, nargs="+", default=[4, 24, 48])
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)
    rows = [measure(n, args.repeats) for n in args.layers]
    record = {**harness.machine(), "command": "benchmarks/compile.py " + " ".join(argv or []), "rows": rows}
    table = harness.md_table(
        ["layers", "adapted kernels", "full FT step (s)", "jlora step (s)", "jlora / full FT"],
        [[r["layers"], r["adapted_kernels"], f"{r['full_ft']:.2f}", f"{r['jlora']:.2f}", f"{r['ratio']:.2f}"]
         for r in rows],
    )
    harness.write(RESULTS / "compile-cpu", record,
                  "## Trace + compile time of a training step (cold caches, median)\n\n" + table + "\n")
    return record


if __name__ == "__main__":
    main()
