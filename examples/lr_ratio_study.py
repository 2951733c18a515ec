"""LoRA+'s ``lr_ratio`` against test accuracy, over training seeds, on two real tasks.

The recipe is the flagship's (``tweet_sentiment.py``): MiniLM-L6, rank-8 adapters
(alpha 16, dropout 0.1) on the attention projections, the head trained in full at
1e-3, AdamW with weight decay 0.01, 120 steps of 32, ``a``'s learning rate ``--lr``;
only ``b``'s rate changes, ``lr_ratio`` times ``a``'s (``"auto"``: a ratio per adapter
from its shape). Each ratio is trained with the same training seeds (the head's and the
adapters' initialisation, batch order, dropout) on a fixed data split:

* ``tweets``: the flagship's split (2,000 training tweets per class, 300 test per class);
* ``words``: the VADER lexicon task of ``two_tasks.py`` (the valence of a single word or
  emoticon; 600 training entries per class, 300 test per class), a much smaller training set.
  Sequences are 16 tokens (no entry is longer than 11), so these runs are quicker.

Prints test accuracy (mean ± sd over the seeds, with the test set's standard error) and
the mean training loss over the run, per ratio, and writes ``lr_ratio_<task>.json``.

    pip install --no-deps vaderSentiment==3.3.2     # for --task words
    python examples/lr_ratio_study.py --task words --ratios 1,4,16,auto --seeds 3
    python examples/lr_ratio_study.py --task tweets --ratios 4,auto --seeds 3
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys

import jax
import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).parent))
import minilm  # noqa: E402
import tweets  # noqa: E402
from tweet_sentiment import (  # noqa: E402
    accuracy,
    fmt,
    mean_loss,
    parse_ratio,
    seed_keys,
    standard_error,
    train_lora,
)

TASKS = {  # task -> (training per class, test per class, sequence length)
    "tweets": (2000, 300, 40),
    "words": (600, 300, 16),
}


def load(task: str, per_class: int, test_per_class: int):
    if task == "tweets":
        return tweets.load_tweets(per_class, seed=0, n_test_per_class=test_per_class)
    from two_tasks import load_words

    return load_words(per_class, test_per_class)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--task", choices=tuple(TASKS), default="words")
    parser.add_argument("--ratios", default="1,4,16,auto")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--first-seed", type=int, default=0)
    parser.add_argument("--steps", type=int, default=120)
    parser.add_argument("--lr", type=float, default=5e-4, help="a's learning rate")
    parser.add_argument("--quick", action="store_true", help="a few steps on a few examples")
    parser.add_argument("--out", type=pathlib.Path, default=pathlib.Path(__file__).parent / "out")
    args = parser.parse_args(argv)
    per_class, test_per_class, max_len = TASKS[args.task]
    steps, batch, eval_batch = args.steps, 32, 150
    if args.quick:
        per_class, test_per_class, steps, batch, eval_batch = 32, 16, 6, 16, 48
    ratios = [parse_ratio(r) for r in args.ratios.split(",")]
    seeds = list(range(args.first_seed, args.first_seed + args.seeds))

    train_split, test_split = load(args.task, per_class, test_per_class)
    tokenizer = minilm.load_tokenizer(max_len)
    arrays = (*minilm.tokenize(tokenizer, train_split.texts), train_split.labels)
    test_ids, test_mask = minilm.tokenize(tokenizer, test_split.texts)
    config, pretrained = minilm.load_pretrained()
    model = minilm.MiniLMClassifier(3, config=config)
    n_test = len(test_split.labels)
    print(f"{args.task}: {len(train_split.labels)} training, {n_test} test examples; "
          f"{steps} steps of {batch}; a's lr {args.lr:g}; ratios {args.ratios}; seeds {seeds}", flush=True)

    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"lr_ratio_{args.task}.json"
    results = {str(r): {"accuracy": [], "mean_loss": [], "final_loss": [], "seeds": []} for r in ratios}
    record = {"task": args.task, "steps": steps, "batch": batch, "lr": args.lr,
              "train": int(len(train_split.labels)), "test": int(n_test), "results": results}
    for seed in seeds:
        params = minilm.init_classifier_params(seed_keys(seed)["head"], model, pretrained)
        for ratio in ratios:
            run = train_lora(model, params, arrays, ratio=ratio, lr=args.lr, steps=steps, batch=batch,
                             seed=seed, name=f"ratio {ratio} seed {seed}")
            acc = accuracy(lambda i, m, r=run: r["apply"](r["frozen"], r["trainable"], i, m),
                           test_ids, test_mask, test_split.labels, eval_batch)
            row = results[str(ratio)]
            row["accuracy"].append(acc)
            row["mean_loss"].append(mean_loss(run["losses"]))
            row["final_loss"].append(float(np.mean(run["losses"][-max(steps // 10, 1):])))
            row["seeds"].append(seed)
            print(f"seed {seed} ratio {ratio}: test accuracy {100 * acc:.1f}%, mean training loss "
                  f"{row['mean_loss'][-1]:.3f}, final {row['final_loss'][-1]:.3f} ({run['seconds']:.0f} s)",
                  flush=True)
            del run
            path.write_text(json.dumps(record, indent=2) + "\n")
        jax.clear_caches()

    print(f"\n{args.task}: test accuracy against lr_ratio, mean ± sd over seeds {seeds}, "
          f"{n_test} test examples")
    print("| lr_ratio | test accuracy (%) | per seed (%) | mean training loss | final training loss |")
    print("|---|---:|---|---:|---:|")
    for r, row in results.items():
        per_seed = " / ".join(f"{100 * a:.1f}" for a in row["accuracy"])
        print(f"| {r} | {fmt(row['accuracy'])} | {per_seed} | {fmt(row['mean_loss'], 1, 3)} "
              f"| {fmt(row['final_loss'], 1, 3)} |")
    p = float(np.mean([a for row in results.values() for a in row["accuracy"]]))
    print(f"standard error of one accuracy on {n_test} test examples at {100 * p:.0f}%: "
          f"{100 * standard_error(p, n_test):.1f} points")
    return record


if __name__ == "__main__":
    main()
