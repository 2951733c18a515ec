"""`summary`: what is adapted, at which rank, and how many parameters train."""

from __future__ import annotations

import math

import numpy as np

from jlora._config import LoraConfig
from jlora._paths import adapter_of, flatten
from jlora._plan import Plan


def _rows_of_plan(plan: Plan, trainable) -> list[tuple]:
    plan.read(trainable)  # the table describes a trainable that fits, or nothing
    rows = []
    for path, t in plan.items():
        n = sum(math.prod(s) for s in t.factor_shapes().values())
        kind, rank = ("lora", str(t.rank)) if t.adapted else ("full", "-")
        rows.append((path, kind, str(t.shape), rank, n))
    return rows


def _rows_of_structure(base: dict, flat: dict) -> list[tuple]:
    rows, seen = [], set()
    for path, leaf in flat.items():
        adapter = adapter_of(path, flat)
        if adapter is not None and adapter[0] in base:
            parent = adapter[0]
            if parent not in seen:
                seen.add(parent)
                n = int(sum(np.size(flat[p]) for p in flat if p.rpartition("/")[0] == parent))
                rank = str(np.shape(flat[f"{parent}/a"])[-1])
                rows.append((parent, "lora", str(tuple(np.shape(base[parent]))), rank, n))
        else:
            rows.append((path, "full", str(tuple(np.shape(leaf))), "-", int(np.size(leaf))))
    return rows


def summary(frozen, trainable, config: LoraConfig | None = None) -> str:
    """A table per adapted or fully-trained path, then the totals.

    With ``config``, the rows are the config's plan on ``frozen`` (and ``trainable`` is
    checked against it, every mismatch named). Without it, an adapter is recognised as
    a dict holding ``a`` and ``b`` (and DoRA's ``m``) at the path of a frozen leaf, and
    any other leaf of ``trainable`` is trained in full.

    >>> import jax, jax.numpy as jnp
    >>> from jlora import LoraConfig, init
    >>> params = {"dense": {"kernel": jnp.ones((64, 32)), "bias": jnp.zeros(32)}}
    >>> frozen, trainable = init(jax.random.key(0), params, LoraConfig(rank=4, targets="dense/kernel"))
    >>> print(summary(frozen, trainable))
    path          kind  shape     rank  parameters
    ------------  ----  --------  ----  ----------
    dense/kernel  lora  (64, 32)     4         384
    Total parameters: 2,464, thereof trainable: 384 (15.58%)
    """
    base = flatten(frozen)
    if config is None:
        rows = _rows_of_structure(base, flatten(trainable))
    else:
        rows = _rows_of_plan(Plan.of_base(config, frozen), trainable)
    trained = sum(r[4] for r in rows)
    total = sum(int(np.size(x)) for x in base.values())
    total += sum(r[4] for r in rows if r[1] == "lora")
    header = ("path", "kind", "shape", "rank", "parameters")
    cells = [header] + [(p, k, s, r, f"{n:,}") for p, k, s, r, n in rows]
    widths = [max(len(c[i]) for c in cells) for i in range(5)]
    right = (False, False, False, True, True)

    def line(c):
        cells = (x.rjust(w) if r else x.ljust(w) for x, w, r in zip(c, widths, right, strict=True))
        return "  ".join(cells).rstrip()

    lines = [line(header), "  ".join("-" * w for w in widths)] + [line(c) for c in cells[1:]]
    pct = 100.0 * trained / total if total else math.nan
    lines.append(f"Total parameters: {total:,}, thereof trainable: {trained:,} ({pct:.2f}%)")
    return "\n".join(lines)
