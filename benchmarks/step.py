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
import dataclasses
import functools
import pathlib
import sys

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).parent))
import gpt  # noqa: E402
import harness  # noqa: E402

import jlora  # noqa: E402

TARGETS = r".*/(query|key|value|out|up|down)/kernel"
LR = 1e-3


def sgd(params, grads):
    return jax.tree.map(lambda p, g: p - jnp.asarray(LR, p.dtype) * g.astype(p.dtype), params, grads)


@dataclasses.dataclass(frozen=True)
class Setup:
    """The reference model, one batch, and a rank-8 adapter with non-zero ``b``."""

    shape: gpt.Shape
    model: object
    params: dict
    tokens: jax.Array
    cfg: jlora.LoraConfig
    frozen: dict
    trainable: dict

    @property
    def scale(self) -> float:
        return self.cfg.scale_for(self.cfg.targets[0])

    def hand_forward(self, frozen, trainable, tokens, flat_lora: bool = False):
        return gpt.hand_forward(self.shape, frozen, trainable, tokens, self.scale, flat_lora)


def setup(shape: gpt.Shape) -> Setup:
    model, params, tokens = gpt.init(shape, jax.random.key(0))
    cfg = jlora.LoraConfig(rank=8, alpha=16.0, targets=TARGETS)
    frozen, trainable = jlora.init(jax.random.key(1), params, cfg)
    # Non-zero b, so every variant computes a real delta (and the checks mean something).
    trainable = jax.tree.map(lambda v: v + 0.01 * jax.random.normal(jax.random.key(2), v.shape, v.dtype),
                             trainable)
    return Setup(shape, model, params, tokens, cfg, frozen, trainable)


def full_ft_step(apply_fn):
    """A training step of every parameter of ``apply_fn(params, tokens)``."""

    def step(params, tokens):
        loss, g = jax.value_and_grad(lambda p: gpt.next_token_loss(apply_fn(p, tokens), tokens))(params)
        return loss, sgd(params, g)

    return step


def lora_step(forward):
    """A training step of ``trainable`` only, for ``forward(frozen, trainable, tokens)``."""

    def step(trainable, frozen, tokens):
        loss, g = jax.value_and_grad(
            lambda t: gpt.next_token_loss(forward(frozen, t, tokens), tokens))(trainable)
        return loss, sgd(trainable, g)

    return step


def build(s: Setup) -> dict:
    """``name: (step, args)`` for the four steps; checks first that they compute the same model."""
    factored = jlora.wrap(s.model.apply, s.cfg)
    merged = jlora.wrap(s.model.apply, s.cfg, strategy="merge")
    lora_args = (s.trainable, s.frozen, s.tokens)
    steps = {
        "full_ft": (full_ft_step(s.model.apply), (s.params, s.tokens)),
        "jlora_factored": (lora_step(factored), lora_args),
        "jlora_merge": (lora_step(merged), lora_args),
        "hand_factored": (lora_step(s.hand_forward), lora_args),
        "hand_factored_2d": (lora_step(functools.partial(s.hand_forward, flat_lora=True)), lora_args),
    }
    # The hand-written model is the same maths: check before timing anything.
    forward_args = (s.frozen, s.trainable, s.tokens)
    np.testing.assert_allclose(jax.jit(s.hand_forward)(*forward_args), factored(*forward_args),
                               rtol=2e-3, atol=2e-3)
    uses = factored.uses(s.frozen, s.trainable, s.tokens)
    assert uses and all(u.factored for u in uses), "a kernel fell back to the merged weight"
    return steps


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

    results = harness.measure_all(build(setup(gpt.Shape())), args.repeats)
    f = results["jlora_factored"]["flops"]
    # the cheaper hand-written form
    hand = min(results[k]["flops"] for k in ("hand_factored", "hand_factored_2d"))
    checks = {
        "factored_vs_hand <= 1.01": f / hand,
        "factored_vs_full_ft <= 0.69": f / results["full_ft"]["flops"],
    }
    ok = checks["factored_vs_hand <= 1.01"] <= 1.01 and checks["factored_vs_full_ft <= 0.69"] <= 0.69
    record = harness.machine() | {
        "command": "python benchmarks/step.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "model": vars(gpt.Shape()) | {"rank": 8, "targets": TARGETS},
        "results": results,
        "checks": checks,
        "pass": ok,
    }
    md = (f"Reference LoRA step, {record['date']}, {record['machine']}, jax {jax.__version__}\n\n"
          + table(results) + "\n\n"
          + "\n".join(f"- {k}: {v:.3f}" for k, v in checks.items()) + f"\n- targets met: {ok}\n")
    harness.write(args.out / f"step-{jax.default_backend()}", record, md)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
