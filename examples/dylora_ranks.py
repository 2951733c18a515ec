"""DyLoRA: train once at rank 8, deploy at any rank — against LoRA trained at each rank.

The task and model are those of ``tweet_sentiment.py`` (MiniLM-L6, tweet sentiment,
adapters on the attention projections). One DyLoRA run samples a rank ``k ~ U{1..8}``
every step; afterwards it is evaluated at every rank 1..8 with ``jlora.rank_sweep``
(one compilation for all ranks), beside plain LoRA runs trained at ranks 1, 2, 4 and 8
with the same data and learning rates. The DyLoRA run takes twice the steps of one
LoRA run (half those of the four together): component ``j`` only learns in the steps
whose sampled rank reaches it. Both use ``lr_ratio=1``: DyLoRA's scale ``alpha/k``
already makes a low-rank step ``r/k`` times larger, and with LoRA+'s 16x on ``b`` the
low ranks diverge (see BUILD_NOTES.md). ``--seeds N`` repeats everything with N training
seeds (initialisation, batch order, dropout; the data split is fixed) and reports mean ± sd.
Prints the table and saves accuracy against rank (first seed) as a PNG.

    python examples/dylora_ranks.py [--mode plain|frozen] [--steps 120] [--dylora-steps 240]
                                    [--lr-ratio 1] [--seeds 1]
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys

import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).parent))
import minilm  # noqa: E402
import tweets  # noqa: E402
from tweet_sentiment import Batches, accuracy, fmt, lora_config, seed_keys, train  # noqa: E402

import jlora  # noqa: E402

RANK = 8


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--mode", choices=("plain", "frozen"), default="plain")
    parser.add_argument("--steps", type=int, default=120, help="training steps of each LoRA run")
    parser.add_argument("--dylora-steps", type=int, default=None, help="training steps of the DyLoRA run "
                        "(default: twice --steps); one DyLoRA run stands in for one LoRA run per rank")
    parser.add_argument("--lr-ratio", type=float, default=1.0,
                        help="ratio of b's learning rate to a's (LoRA+)")
    parser.add_argument("--lora-ranks", default="1,2,4,8", help="ranks of the LoRA runs to compare with "
                        "('' for none)")
    parser.add_argument("--seeds", type=int, default=1, help="training seeds (mean ± sd over them)")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--out", type=pathlib.Path, default=pathlib.Path(__file__).parent / "out")
    args = parser.parse_args(argv)
    steps = 6 if args.quick else args.steps
    dylora_steps = 6 if args.quick else (args.dylora_steps or 2 * args.steps)
    lora_ranks = [int(k) for k in args.lora_ranks.split(",") if k]
    per_class, test_per_class, batch, max_len = (32, 16, 16, 32) if args.quick else (2000, 300, 32, 48)
    eval_batch = 48 if args.quick else 150

    train_split, test_split = tweets.load_tweets(per_class, seed=0, n_test_per_class=test_per_class)
    tokenizer = minilm.load_tokenizer(max_len)
    train_ids, train_mask = minilm.tokenize(tokenizer, train_split.texts)
    test_ids, test_mask = minilm.tokenize(tokenizer, test_split.texts)
    model_config, pretrained = minilm.load_pretrained()
    model = minilm.MiniLMClassifier(3, config=model_config)

    def run(config, name, steps, seed):
        keys = seed_keys(seed)
        params = minilm.init_classifier_params(keys["head"], model, pretrained)
        frozen, trainable = jlora.init(keys["init"], params, config)
        lora_apply = jlora.wrap(model.apply, config)

        def forward(t, ids, mask, k):
            return lora_apply(frozen, t, ids, mask, deterministic=False, rngs={"dropout": k}, lora_rng=k)

        tx = jlora.optimizer(config, 5e-4, lr_ratio=args.lr_ratio, full_lr=1e-3, weight_decay=0.01)
        data = Batches((train_ids, train_mask, train_split.labels), batch, seed=keys["batches"])
        trainable, _, secs = train(name, forward, trainable, tx, data, steps, keys["dropout"])
        return frozen, trainable, lora_apply, secs

    config = lora_config(dylora=args.mode)
    dylora_seeds, lora_seeds = [], []  # per seed: {rank: accuracy}
    for seed in range(args.seeds):
        frozen, trainable, lora_apply, secs = run(config, f"DyLoRA r={RANK}", dylora_steps, seed)

        def at_rank(k, frozen=frozen, trainable=trainable, lora_apply=lora_apply):
            return accuracy(lambda ids, mask: lora_apply(frozen, trainable, ids, mask, lora_rank=k),
                            test_ids, test_mask, test_split.labels, eval_batch)

        dylora_seeds.append(jlora.rank_sweep(at_rank, config))
        lora = {}
        for k in lora_ranks:
            c = jlora.LoraConfig(rank=k, alpha=config.alpha, targets=config.targets,
                                 train_in_full=config.train_in_full, dropout=config.dropout)
            f, t, la, _ = run(c, f"LoRA r={k}", steps, seed)
            lora[k] = accuracy(lambda ids, mask, la=la, f=f, t=t: la(f, t, ids, mask), test_ids, test_mask,
                               test_split.labels, eval_batch)
        lora_seeds.append(lora)
        if seed == 0:
            first = (frozen, trainable, dylora_seeds[0])

    dylora = {k: float(np.mean([d[k] for d in dylora_seeds])) for k in dylora_seeds[0]}
    lora = {k: float(np.mean([d[k] for d in lora_seeds])) for k in lora_ranks}
    print(f"\nDyLoRA ({args.mode} mode), one run of {dylora_steps} steps ({secs:.0f} s), "
          f"vs LoRA trained at each rank for {steps} steps; lr_ratio {args.lr_ratio:g}; "
          f"mean ± sd over {args.seeds} seed(s)")
    print("| rank | DyLoRA accuracy (%) | LoRA accuracy (%) | difference (points) |")
    print("|---:|---:|---:|---:|")
    for k in dylora:
        mine = [d[k] for d in dylora_seeds]
        other = fmt([d[k] for d in lora_seeds]) if k in lora else "-"
        diff = fmt([d[k] - o[k] for d, o in zip(dylora_seeds, lora_seeds, strict=True)], sign="+") \
            if k in lora else "-"
        print(f"| {k} | {fmt(mine)} | {other} | {diff} |")
    frozen, trainable, first_sweep = first

    # Exported at rank k, the adapter is a plain rank-k LoRA adapter with the same predictions.
    small, small_config = jlora.truncate(trainable, config, 2)
    exported = accuracy(lambda ids, mask: jlora.wrap(model.apply, small_config)(frozen, small, ids, mask),
                        test_ids, test_mask, test_split.labels, eval_batch)
    print(f"truncate(..., 2) exported as a rank-2 adapter (first seed): accuracy {100 * exported:.1f}% "
          f"(rank_sweep at 2: {100 * first_sweep[2]:.1f}%)")

    args.out.mkdir(parents=True, exist_ok=True)
    record = {"mode": args.mode, "steps": steps, "dylora_steps": dylora_steps, "lr_ratio": args.lr_ratio,
              "seeds": args.seeds, "dylora": dylora, "lora": lora, "dylora_per_seed": dylora_seeds,
              "lora_per_seed": lora_seeds, "truncated_rank2": exported}
    (args.out / f"dylora_{args.mode}.json").write_text(json.dumps(record, indent=2) + "\n")
    plot(dylora, lora, args.mode, args.out / f"dylora_{args.mode}.png")
    return record


def plot(dylora: dict, lora: dict, mode: str, path: pathlib.Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(list(dylora), 100 * np.array(list(dylora.values())), "o-", label=f"DyLoRA ({mode}), one run")
    ax.plot(list(lora), 100 * np.array(list(lora.values())), "s--", label="LoRA trained at that rank")
    ax.set_xlabel("rank")
    ax.set_ylabel("test accuracy (%)")
    ax.set_title("MiniLM-L6 tweet sentiment: accuracy vs rank")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    print(f"plot: {path}")


if __name__ == "__main__":
    main()
