"""SmolLM2-135M-Instruct (the LLM flagship's model, from its GGUF): a training step and decoding.

Training: one step (value_and_grad of the next-token loss over every position, plain SGD) on
the same ``--batch`` x ``--seq`` tokens:

* ``lora``: jlora, rank-8 LoRA on every linear layer (210 kernels), factored (`jlora.wrap`);
* ``qlora``: the same on an nf4 base (`jlora.quantize`);
* ``full``: full fine-tuning of the same model;
* ``peft_eager`` / ``peft_compile``: PEFT on transformers' model of the same GGUF, rank 8 on the
  same modules, in PyTorch eager and under ``torch.compile`` (``peft_llm_step.py``, run with the
  Python that ``--torch-python`` or ``$JLORA_TORCH_PYTHON`` names; skipped without one).

Decoding: the wall time of one generated token (one jitted step of the model with its KV cache)
at ``--decode-batch`` rows with a cache of 128 positions: ``base``; ``factored`` (one adapter
through `jlora.wrap`); ``merged`` (that adapter merged into the weights); ``bank_8`` and
``bank_64`` (8 or 64 adapters in a bank, each row its own through ``lora_index``).

Reports XLA's FLOPs and memory figures and median wall times (jlora's candidates timed
round-robin, `harness.wall_samples`; PEFT's in its own process right after), checks the targets
(``TARGETS``) and writes ``benchmarks/results/llm-<platform>.json`` and ``.md``.

    python benchmarks/llm.py [--repeats 5] [--torch-python .venv-torch/bin/python]
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
import jax.numpy as jnp
import numpy as np
import optax

HERE = pathlib.Path(__file__).parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent / "examples"))
import harness  # noqa: E402
import smollm2  # noqa: E402

import jlora  # noqa: E402

TARGETS_RE = r".*/(self_attn|mlp)/\w+_proj/kernel"
RANK, ALPHA, LR = 8, 16.0, 1e-4
# (section, candidate, reference, limit): median wall candidate / reference <= limit
TARGETS = [
    ("train", "lora", "peft_eager", 0.8),
    ("train", "lora", "full", 0.75),
    ("decode", "factored", "base", 1.15),
    ("decode", "bank_64", "base", 1.3),
]


def perturbed(tree, seed: int):
    leaves, treedef = jax.tree.flatten(tree)
    keys = jax.random.split(jax.random.key(seed), len(leaves))
    return treedef.unflatten([x + 0.01 * jax.random.normal(k, x.shape, x.dtype)
                              for x, k in zip(leaves, keys, strict=True)])


def train_steps(model, params, tokens):
    positions = jnp.broadcast_to(jnp.arange(tokens.shape[1]), tokens.shape)

    def next_token_loss(logits):
        return optax.softmax_cross_entropy_with_integer_labels(logits[:, :-1], tokens[:, 1:]).mean()

    config = jlora.infer_layouts(jlora.LoraConfig(rank=RANK, alpha=ALPHA, targets=TARGETS_RE), model.apply,
                                 params, tokens, positions)
    lora_apply = jlora.wrap(model.apply, config)
    tx = optax.sgd(LR)

    def lora_step(frozen, trainable):
        loss, grads = jax.value_and_grad(
            lambda t: next_token_loss(lora_apply(frozen, t, tokens, positions)[0]))(trainable)
        updates, _ = tx.update(grads, tx.init(trainable), trainable)
        return optax.apply_updates(trainable, updates), loss

    def full_step(params):
        loss, grads = jax.value_and_grad(
            lambda p: next_token_loss(model.apply(p, tokens, positions)[0]))(params)
        updates, _ = tx.update(grads, tx.init(params), params)
        return optax.apply_updates(params, updates), loss

    frozen, trainable = jlora.init(jax.random.key(0), params, config)
    qfrozen, qtrainable = jlora.init(jax.random.key(0), jlora.quantize(params, config, "nf4"), config)
    return config, {"lora": (lora_step, (frozen, trainable)), "qlora": (lora_step, (qfrozen, qtrainable)),
                    "full": (full_step, (params,))}


def decode_steps(model, cfg, params, config, batch: int, length: int = 128):
    """One generated token per call: the step after a full cache's worth of positions."""
    frozen, trainable = jlora.init(jax.random.key(1), params, config)
    trainable = perturbed(trainable, 2)
    cache = smollm2.init_cache(cfg, batch, length)
    token = jnp.ones((batch, 1), jnp.int32)
    position = jnp.full((batch, 1), length - 1, jnp.int32)
    lora_apply = jlora.wrap(model.apply, config)
    merged = jlora.merge(frozen, trainable, config)

    def plain(params, cache):
        return model.apply(params, token, position, cache)

    def factored(frozen, trainable, cache):
        return lora_apply(frozen, trainable, token, position, cache)

    steps = {"base": (plain, (params, cache)), "factored": (factored, (frozen, trainable, cache)),
             "merged": (plain, (merged, cache))}
    for k in (8, 64):
        names = tuple(f"t{i}" for i in range(k))
        bank, bank_config = jlora.stack({n: (perturbed(trainable, 10 + i), config)
                                         for i, n in enumerate(names)})
        serve = jlora.wrap(model.apply, bank_config)
        index = jnp.arange(batch, dtype=jnp.int32) % k

        def per_example(frozen, bank, cache, index, serve=serve):
            return serve(frozen, bank, token, position, cache, lora_index=index)

        steps[f"bank_{k}"] = (per_example, (frozen, bank, cache, index))
    return steps


def peft_side(torch_python: str | None, tokens: np.ndarray, repeats: int) -> dict:
    if not torch_python:
        print("[llm] no torch Python given (--torch-python or $JLORA_TORCH_PYTHON): PEFT is skipped",
              file=sys.stderr)
        return {}
    with tempfile.TemporaryDirectory() as tmp:
        np.save(f"{tmp}/tokens.npy", tokens)
        out = pathlib.Path(tmp) / "peft.json"
        done = subprocess.run([torch_python, str(HERE / "peft_llm_step.py"), "--tokens", f"{tmp}/tokens.npy",
                               "--rank", str(RANK), "--alpha", str(ALPHA), "--repeats", str(repeats),
                               "--out", str(out)], capture_output=True, text=True)
        if done.returncode != 0:
            print(f"[llm] peft_llm_step.py failed:\n{done.stderr[-2000:]}", file=sys.stderr)
            return {}
        return json.loads(out.read_text())


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--decode-batch", type=int, default=8)
    parser.add_argument("--torch-python", default=os.environ.get("JLORA_TORCH_PYTHON"))
    parser.add_argument("--out", type=pathlib.Path, default=harness.RESULTS)
    args = parser.parse_args(argv)

    cfg, params = smollm2.load()
    model = smollm2.Llama(cfg)
    tokens = np.random.default_rng(0).integers(0, cfg.vocab, (args.batch, args.seq)).astype(np.int32)
    config, train = train_steps(model, params, jnp.asarray(tokens))
    results = {"train": harness.measure_all(train, args.repeats)}
    peft = peft_side(args.torch_python, tokens, args.repeats)
    results["train"].update({name: r for name, r in peft.items() if isinstance(r, dict) and "median_ms" in r})
    peft_notes = {name: r for name, r in peft.items() if name not in results["train"]}  # versions, errors
    results["decode"] = harness.measure_all(decode_steps(model, cfg, params, config, args.decode_batch),
                                            args.repeats * 4)

    checks = []
    for section, cand, ref, limit in TARGETS:
        got = results[section]
        if cand in got and ref in got:
            ratio = got[cand]["median_ms"] / got[ref]["median_ms"]
            checks.append({"target": f"{section}: {cand} / {ref} <= {limit}", "ratio": round(ratio, 3),
                           "pass": ratio <= limit})
        else:
            checks.append({"target": f"{section}: {cand} / {ref} <= {limit}", "ratio": None, "pass": None})
    record = harness.machine() | {"command": "python benchmarks/llm.py " + " ".join(argv or sys.argv[1:]),
                                  "shape": {"batch": args.batch, "seq": args.seq,
                                            "decode_batch": args.decode_batch, "rank": RANK},
                                  "results": results, "peft": peft_notes, "targets": checks}
    md = [f"# SmolLM2-135M: training step ({args.batch}x{args.seq} tokens) and decoding "
          f"(batch {args.decode_batch}), {record['date']}, {record['machine']}\n"]
    rows = []
    for section, entries in results.items():
        base = "full" if section == "train" else "base"
        for name, r in entries.items():
            ratio = r["median_ms"] / entries[base]["median_ms"] if base in entries else float("nan")
            flops = f"{r['flops'] / 1e9:.1f}" if r.get("flops") is not None else "-"
            mem = (f"{(r['temp_bytes'] + r['argument_bytes']) / 2**30:.2f}"
                   if r.get("temp_bytes") is not None else "-")
            rows.append([f"{section}: {name}", flops, mem, f"{r['median_ms']:.1f}", f"{ratio:.3f}"])
    md.append(harness.md_table(["step", "GFLOP (XLA)", "args+temp GiB", "median ms", "vs full / base"], rows))
    md.append("\n" + "\n".join(f"- {c['target']}: {c['ratio']} -> "
                               f"{'met' if c['pass'] else 'missed' if c['pass'] is False else 'not measured'}"
                               for c in checks))
    harness.write(args.out / f"llm-{jax.devices()[0].platform}", record, "\n".join(md) + "\n")
    return record


if __name__ == "__main__":
    main()
