"""`save` and `restore` adapters with Orbax; resuming training with Orbax's `CheckpointManager`.

A jlora checkpoint is an ordinary Orbax checkpoint directory with two items,
written by ``ocp.Checkpointer(ocp.CompositeCheckpointHandler())``:

* ``adapters``: the ``trainable`` tree (``ocp.args.StandardSave``), as plain
  nested dicts keyed by the '/'-separated path;
* ``lora_metadata``: a JSON document (``ocp.args.JsonSave``) that says how to
  read the arrays back::

    {
      "format": "jlora-adapters",
      "format_version": 1,                 # FORMAT_VERSION; restore refuses newer ones
      "jlora_version": "0.1.0",
      "fold_scale": false,                 # true: the scale is folded into every b
      "config": {...},                     # LoraConfig.to_dict() of the stored adapters
      "targets": {                         # one entry per adapted or fully trained leaf
        "params/dense/kernel": {
          "kind": "lora", "rank": 8, "alpha": 16.0, "scale": 2.0,
          "in_axes": [0], "out_axes": [1], "stack_axes": [],
          "embedding": false, "dora": false,
          "base": {"shape": [64, 32], "dtype": "bfloat16"}   # null unless save got frozen=
        },
        "params/head/kernel": {"kind": "full", "base": {...}}
      },
      "leaves": {                          # every stored array
        "params/dense/kernel/a": {"shape": [64, 8], "dtype": "float32"}, ...
      }
    }

Orbax writes into ``<directory>.orbax-checkpoint-tmp`` and renames it to
``<directory>`` only once every byte is on disk (``AtomicRenameTemporaryPath``; on
GCS a ``commit_success.txt`` marks completion instead), so a crash mid-save never
leaves a directory that `restore` or ``CheckpointManager.latest_step()`` takes for
a checkpoint.

Resuming training
-----------------
Use Orbax's own ``CheckpointManager`` for the whole training state. `save_args`
gives the two items `save` writes, so every step directory is also a checkpoint
`restore` reads. Saves are asynchronous (the step loop goes on while the arrays
are written) and only the last ``max_to_keep`` steps stay on disk. Orbax 0.12.8
saves and restores typed PRNG keys as they are (older versions need
``jax.random.key_data(key)`` saved and ``jax.random.wrap_key_data`` on restore).
With several processes (``jax.distributed``) every process runs the same code and
every array saved must be a global one: Orbax refuses an array on one local device
("host local jax.Array"), so the optimizer's step counts and the key are placed
on the mesh, replicated (the moments already follow ``trainable``)::

    import orbax.checkpoint as ocp
    from jax.sharding import NamedSharding, PartitionSpec as P

    options = ocp.CheckpointManagerOptions(max_to_keep=2, enable_async_checkpointing=True)
    ckpt_dir = os.path.abspath(ckpt_dir)  # unlike save/restore, CheckpointManager takes absolute paths only
    mngr = ocp.CheckpointManager(ckpt_dir, options=options)

    frozen, trainable = jlora.init(jax.random.key(0), params, config)
    tx = jlora.optimizer(config, learning_rate=1e-3)
    replicated = NamedSharding(mesh, P())  # one device: jax.sharding.make_single_device_sharding(device)
    opt_state = jax.tree.map(lambda x: x if x.ndim else jax.device_put(x, replicated), tx.init(trainable))
    key, start = jax.jit(lambda: jax.random.key(1), out_shardings=replicated)(), 0

    if (last := mngr.latest_step()) is not None:  # resume from the newest complete step
        abstract = lambda tree: jax.tree.map(ocp.utils.to_shape_dtype_struct, tree)
        restored = mngr.restore(last, args=ocp.args.Composite(
            adapters=ocp.args.StandardRestore(abstract(trainable)),
            train_state=ocp.args.StandardRestore(abstract({"opt_state": opt_state, "key": key})),
        ))
        trainable = restored.adapters
        opt_state, key = restored.train_state["opt_state"], restored.train_state["key"]
        start = last

    for step in range(start + 1, num_steps + 1):
        trainable, opt_state, key = train_step(trainable, opt_state, key, batch(step))
        mngr.save(step, args=ocp.args.Composite(
            **jlora.save_args(trainable, config),  # items "adapters" and "lora_metadata"
            train_state=ocp.args.StandardSave({"opt_state": opt_state, "key": key}),
        ))
    mngr.wait_until_finished()
    mngr.close()

    # Any step is also a jlora checkpoint of the adapters alone:
    trainable, config = jlora.restore(mngr.directory / str(mngr.latest_step()), frozen)

``train_step`` must draw its randomness from ``key`` (split it each step) and
``batch(step)`` must depend on the step alone; then a resumed run equals an
uninterrupted one bit for bit (``tests/test_multiprocess.py`` runs this recipe as
written on two processes).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import re

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from etils import epath

from jlora._config import LoraConfig
from jlora._layout import wider
from jlora._paths import ADAPTER_KEYS, flatten, nest
from jlora._plan import Plan, Target
from jlora._sharding import restore_shardings
from jlora._variants import refuse
from jlora._version import __version__

FORMAT = "jlora-adapters"
FORMAT_VERSION = 1
ADAPTERS = "adapters"  # Orbax item names inside a checkpoint directory
METADATA = "lora_metadata"


def _dtype_name(x) -> str:
    return jnp.dtype(x.dtype).name


def absolute_path(directory, who: str) -> epath.Path:
    """``directory`` as Orbax needs it: ``~`` expanded and made absolute; URLs (``gs://...``) as given.

    Accepts a ``str``, a ``pathlib.Path`` or an ``etils.epath.Path``; relative paths are
    taken from the current working directory.
    """
    if not isinstance(directory, str | os.PathLike):
        raise TypeError(f"{who}: expected a directory path (str or pathlib.Path), got "
                        f"{type(directory).__name__} {directory!r}.")
    text = os.fspath(directory)
    if not isinstance(text, str) or not text.strip():
        raise ValueError(f"{who}: expected a directory path, got {directory!r}.")
    if "://" in text:  # a URL: Orbax and etils.epath read it as it is
        return epath.Path(text)
    return epath.Path(os.path.abspath(os.path.expanduser(text)))


def _one_slot(trainable, config: LoraConfig):
    """``trainable`` itself, or for a bank (``config.adapters`` set) the shapes of one of its adapters."""
    if not config.adapters:
        return trainable
    k = len(config.adapters)
    leaves = jax.tree_util.tree_leaves(trainable)
    wrong = sorted({str(np.shape(x)) for x in leaves if np.ndim(x) == 0 or np.shape(x)[0] != k})
    if wrong:
        raise ValueError(f"save: the config names a bank of {k} adapters {list(config.adapters)}, so every "
                         f"leaf of trainable leads with {k}; got shapes {wrong}. Save the bank jlora.stack "
                         "made, or one adapter (jlora.unstack) with its own config.")
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(np.shape(x)[1:], x.dtype), trainable)


def _checked_plan(trainable, config: LoraConfig, frozen) -> tuple[Plan, dict]:
    """Check ``trainable`` against ``config`` (and ``frozen``); return the targets and its leaves."""
    if not isinstance(config, LoraConfig):
        raise TypeError(f"save: expected a jlora.LoraConfig, got {type(config).__name__}.")
    flat = flatten(trainable)
    one = _one_slot(trainable, config)  # a bank is checked as one of its adapters
    if frozen is None:  # the kernels the adapters imply stand in for frozen
        targets = Plan.of_trainable(config, one, "save")
    else:
        targets = Plan.of_base(config, frozen)
        targets.read(one)
    base = flatten(frozen) if frozen is not None else {}
    wanted = {}
    for path, t in targets.items():
        if t.adapted:
            wanted.update({f"{path}/{k}": config.dtype for k in ADAPTER_KEYS})
        elif path in base:
            wanted[path] = _dtype_name(base[path])
    errors = [f"{p} has dtype {_dtype_name(flat[p])}, expected {dtype}"
              for p, dtype in wanted.items() if p in flat and _dtype_name(flat[p]) != dtype]
    if errors:
        raise ValueError(
            "save: trainable has the wrong dtypes:\n  " + "\n  ".join(errors)
            + f"\nAdapters are LoraConfig(dtype={config.dtype!r}) and leaves trained in full keep the base "
            "dtype; cast them back with .astype(...) or save with the config they were trained with."
        )
    return targets, flat


def _unit_alpha(rank: int, rslora: bool) -> float:
    """The alpha whose scale is exactly 1: ``r`` (``sqrt(r)`` with rsLoRA)."""
    return math.sqrt(rank) if rslora else float(rank)


def _fold(targets: Plan, flat: dict, config: LoraConfig) -> tuple[dict, LoraConfig, dict[str, Target]]:
    """``b ← scale·b`` in every adapter, and a config (and targets) whose every rule has scale 1.

    Exact for any nonlinearity, since ``s·f(x·a)·b = f(x·a)·(s·b)``, and for DoRA,
    whose direction uses the same ``W + s·a@b``.
    """
    refuse(config, "fold_scale", "save(fold_scale=True)")
    flat = dict(flat)
    for path, t in targets.items():
        if t.adapted:
            b = flat[f"{path}/b"]
            acc = wider(b.dtype, jnp.float32)
            flat[f"{path}/b"] = (b.astype(acc) * jnp.asarray(t.scale, acc)).astype(b.dtype)
    rules = tuple(
        dataclasses.replace(r, rank=config.rank_for(r), alpha=_unit_alpha(config.rank_for(r), config.rslora))
        for r in config.targets
    )
    folded = {p: dataclasses.replace(t, scale=1.0, alpha=_unit_alpha(t.rank, config.rslora)) if t.adapted
              else t
              for p, t in targets.items()}
    return flat, dataclasses.replace(config, alpha=_unit_alpha(config.rank, config.rslora),
                                     targets=rules), folded


def _describe(targets: dict[str, Target], config: LoraConfig, frozen) -> dict:
    base = flatten(frozen) if frozen is not None else {}
    out = {}
    for path, t in targets.items():
        entry = {"kind": "full"}
        if t.adapted:
            entry = {
                "kind": "lora",
                "rank": t.rank,
                "alpha": t.alpha,
                "scale": t.scale,
                "in_axes": list(t.layout.in_axes),
                "out_axes": list(t.layout.out_axes),
                "stack_axes": list(t.layout.stack_axes),
                "embedding": t.embedding,
                "dora": t.dora,
            }
        leaf = base.get(path)
        entry["base"] = None if leaf is None else {"shape": list(np.shape(leaf)), "dtype": _dtype_name(leaf)}
        out[path] = entry
    return out


def _leaf_table(flat: dict) -> dict:
    return {p: {"shape": list(np.shape(x)), "dtype": _dtype_name(x)} for p, x in flat.items()}


def save_args(trainable, config: LoraConfig, *, frozen=None, fold_scale: bool = False) -> dict:
    """The Orbax items `save` writes, for an ``ocp.args.Composite`` of your own.

    Use it to put the adapters in the checkpoints of an ``ocp.CheckpointManager``
    next to the optimizer state (see "Resuming training" in this module's
    docstring); `restore` then reads any of its step directories. Validates as
    `save` does.

    Returns:
      ``{"adapters": ocp.args.StandardSave(...), "lora_metadata": ocp.args.JsonSave(...)}``.

    >>> import jax.numpy as jnp
    >>> trainable = {"dense": {"kernel": {"a": jnp.zeros((16, 2)), "b": jnp.zeros((2, 4))}}}
    >>> items = save_args(trainable, LoraConfig(rank=2, targets=r".*/kernel"))
    >>> sorted(items), type(items["adapters"]).__name__
    (['adapters', 'lora_metadata'], 'StandardSaveArgs')
    """
    targets, flat = _checked_plan(trainable, config, frozen)
    if fold_scale:
        flat, config, targets = _fold(targets, flat, config)
    metadata = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "jlora_version": __version__,
        "fold_scale": bool(fold_scale),
        "config": config.to_dict(),
        "targets": _describe(targets, config, frozen),
        "leaves": _leaf_table(flat),
    }
    return {ADAPTERS: ocp.args.StandardSave(nest(flat)), METADATA: ocp.args.JsonSave(metadata)}


def save(directory, trainable, config: LoraConfig, *, frozen=None, fold_scale: bool = False,
         overwrite: bool = False) -> None:
    """Write ``trainable`` and its metadata as an Orbax checkpoint at ``directory``.

    Everything is checked before anything is written: ``trainable`` against
    ``config`` (and against ``frozen`` when given, with the base shapes and dtypes
    then recorded too). The write is atomic: Orbax fills
    ``<directory>.orbax-checkpoint-tmp`` and renames it when complete.

    Args:
      directory: a new directory: a ``str`` or ``pathlib.Path`` (relative to the
        working directory, ``~`` expanded) or any ``etils.epath`` URL. What an
        interrupted save there left behind (``<directory>.orbax-checkpoint-tmp``)
        is cleared by Orbax first, and a save that raises removes its own.
      trainable: the adapters from `init` (and training).
      config: the `LoraConfig` they were made with.
      frozen: the base parameters; optional, but recommended: shapes and dtypes
        are then checked against the real kernels and recorded.
      fold_scale: store ``scale·b`` in place of ``b`` and a config whose every rule
        has scale 1 (explicit ``rank`` and ``alpha = r``, ``sqrt(r)`` with rsLoRA),
        so a loader that applies ``a@b`` as is gets the full adapter. Outputs are
        the same either way (up to float32 rounding). Not possible with DyLoRA.
      overwrite: replace an existing jlora checkpoint at ``directory``. Orbax's
        ``force``: the old checkpoint is deleted *before* the new one is written,
        so a crash in between leaves neither; write to a new directory when the
        old one must survive. A directory that is not a jlora checkpoint is
        never deleted.

    Raises:
      FileExistsError: ``directory`` exists and ``overwrite`` is False, or a
        parent of it is a file.
      TypeError: ``directory`` is not a path.
      ValueError: ``trainable`` does not fit ``config``/``frozen`` (every bad path
        named); ``fold_scale`` with DyLoRA; overwriting a non-checkpoint.

    >>> import tempfile, jax, jax.numpy as jnp
    >>> from jlora import init
    >>> params = {"params": {"dense": {"kernel": jnp.ones((16, 4)), "bias": jnp.zeros(4)}}}
    >>> cfg = LoraConfig(rank=2, alpha=4.0, targets=r".*/kernel")
    >>> frozen, trainable = init(jax.random.key(0), params, cfg)
    >>> path = tempfile.mkdtemp() + "/adapter"
    >>> save(path, trainable, cfg, frozen=frozen)
    >>> restored, cfg2 = restore(path, frozen)
    >>> cfg2 == cfg, jax.tree.all(jax.tree.map(jnp.array_equal, restored, trainable))
    (True, True)
    """
    path = absolute_path(directory, "save")
    items = save_args(trainable, config, frozen=frozen, fold_scale=fold_scale)
    blocker = next((p for p in (path, *path.parents) if p.exists() and not p.is_dir()), None)
    if blocker is not None:
        raise FileExistsError(
            f"save: cannot write a checkpoint at {path}: {blocker} is a file, not a directory. "
            "Choose another directory."
        )
    if path.exists():
        if not overwrite:
            raise FileExistsError(
                f"save: {path} already exists; pass overwrite=True to replace it, or choose a new directory."
            )
        if not (path / METADATA).exists():
            raise ValueError(
                f"save: refusing to overwrite {path}: it is not a jlora checkpoint (no {METADATA!r} item), "
                "and overwrite=True deletes the directory. Choose another directory."
            )
    with contextlib.closing(ocp.Checkpointer(ocp.CompositeCheckpointHandler())) as ckptr:
        try:
            ckptr.save(path, ocp.args.Composite(**items), force=overwrite)
        except BaseException:
            # A save that failed (or was interrupted in this process) leaves no temporary directory
            # for a later restore to report as an interrupted save; Orbax clears it first anyway.
            for leftover in path.parent.glob(path.name + ocp.step.TMP_DIR_SUFFIX + "*"):
                leftover.rmtree(missing_ok=True)
            raise


def _finished(path: epath.Path, who: str) -> epath.Path:
    """``path`` if it holds a finished Orbax checkpoint; a clear error otherwise."""
    if not path.exists():
        partial = sorted(path.parent.glob(path.name + ocp.step.TMP_DIR_SUFFIX + "*"))
        if partial:
            raise FileNotFoundError(
                f"{who}: no checkpoint at {path}; {partial[0]} is what an interrupted save left behind "
                "(Orbax renames it only when the save completes). Restore an earlier checkpoint."
            )
        raise FileNotFoundError(f"{who}: no checkpoint at {path}.")
    if not path.is_dir():
        raise ValueError(f"{who}: {path} is a file; a checkpoint is a directory written by jlora.save.")
    if not ocp.step.is_path_finalized(path):
        raise ValueError(
            f"{who}: {path} is an unfinished save (an Orbax temporary directory); use a completed one."
        )
    return path


def _show(value) -> str:
    """A JSON value as it reads in the file: short ones in full, long ones by their type (list, dict)."""
    try:
        text = json.dumps(value)
    except (TypeError, ValueError):
        text = type(value).__name__
    if len(text) <= 40:
        return text
    return text[:37] + "..." if isinstance(value, str) else type(value).__name__


def _is_int(n, low: int = 0) -> bool:
    return isinstance(n, int) and not isinstance(n, bool) and n >= low


def _dtype_problem(name) -> str | None:
    if not isinstance(name, str):
        return f"is {_show(name)}, not a dtype name such as \"float32\""
    try:
        dt = np.dtype(name) if name != "bfloat16" else jnp.dtype(name)
    except TypeError:
        dt = None
    if dt is None or dt.name != name or not (jnp.issubdtype(dt, jnp.number) or dt == np.bool_):
        return f"is {_show(name)}, not a numeric dtype name such as \"float32\""
    return None


def _array_problem(entry) -> str | None:
    """What is wrong with a ``{"shape": [...], "dtype": "..."}`` record (``.field: problem``), or None."""
    if not isinstance(entry, dict):
        return f" is {_show(entry)}, not an object with \"shape\" and \"dtype\""
    for field in ("shape", "dtype"):
        if field not in entry:
            return f" has no {field!r} field"
    if not isinstance(entry["shape"], list) or not all(_is_int(n) for n in entry["shape"]):
        return f".shape is {_show(entry['shape'])}, not a list of non-negative ints"
    problem = _dtype_problem(entry["dtype"])
    return None if problem is None else f".dtype {problem}"


_LORA_FIELDS = {  # field of a "lora" target entry: (check, what it must be)
    "rank": (lambda v: _is_int(v, 1), "an int >= 1"),
    "alpha": (lambda v: isinstance(v, int | float) and not isinstance(v, bool), "a number"),
    "scale": (lambda v: isinstance(v, int | float) and not isinstance(v, bool), "a number"),
    "in_axes": (lambda v: isinstance(v, list) and all(map(_is_int, v)), "a list of axis ints"),
    "out_axes": (lambda v: isinstance(v, list) and all(map(_is_int, v)), "a list of axis ints"),
    "stack_axes": (lambda v: isinstance(v, list) and all(map(_is_int, v)), "a list of axis ints"),
    "embedding": (lambda v: isinstance(v, bool), "true or false"),
    "dora": (lambda v: isinstance(v, bool), "true or false"),
}
_TOP_FIELDS = {"jlora_version": str, "fold_scale": bool, "config": dict, "targets": dict, "leaves": dict}


def _metadata_problem(meta) -> str | None:
    """The first thing wrong with a metadata document (``field: problem``), or None when it is sound."""
    if not isinstance(meta, dict):
        return f"the document is {_show(meta)}, not a JSON object"
    if meta.get("format") != FORMAT:
        return f"\"format\" is {_show(meta.get('format'))}, not {FORMAT!r} (not jlora metadata)"
    if not _is_int(meta.get("format_version"), 1):
        return f"\"format_version\" is {_show(meta.get('format_version'))}, not an int >= 1"
    if meta["format_version"] > FORMAT_VERSION:
        return None  # the caller reports a newer format (upgrade jlora)
    for field, kind in _TOP_FIELDS.items():
        if field not in meta:
            return f"field {field!r} is missing"
        if not isinstance(meta[field], kind) or (kind is int and isinstance(meta[field], bool)):
            return f"{field!r} is {_show(meta[field])}, not {'an object' if kind is dict else kind.__name__}"
    for p, entry in meta["targets"].items():
        where = f"targets[{p!r}]"
        if not isinstance(entry, dict):
            return f"{where} is {_show(entry)}, not an object"
        if entry.get("kind") not in ("lora", "full"):
            return f"{where}.kind is {_show(entry.get('kind'))}, not \"lora\" or \"full\""
        if "base" not in entry:
            return f"{where} has no 'base' field (null when saved without frozen)"
        if entry["base"] is not None and (problem := _array_problem(entry["base"])):
            return f"{where}.base{problem}"
        for field, (ok, what) in _LORA_FIELDS.items() if entry["kind"] == "lora" else ():
            if field not in entry:
                return f"{where} has no {field!r} field"
            if not ok(entry[field]):
                return f"{where}.{field} is {_show(entry[field])}, not {what}"
    for p, entry in meta["leaves"].items():
        if problem := _array_problem(entry):
            return f"leaves[{p!r}]{problem}"
    return None


def _metadata(path: epath.Path, ckptr, who: str) -> dict:
    try:
        meta = ckptr.restore(path, ocp.args.Composite(**{METADATA: ocp.args.JsonRestore()}))[METADATA]
    except (KeyError, OSError, ValueError, TypeError) as e:  # missing item or file; bad JSON or bytes
        raise ValueError(
            f"{who}: {path} has no readable jlora metadata ({type(e).__name__}: {_first_line(e)}); it is not "
            "a checkpoint written by jlora.save / jlora.save_args, or it was damaged."
        ) from None
    problem = _metadata_problem(meta)
    if problem is not None:
        raise ValueError(f"{who}: {path} has corrupt jlora metadata: {problem} (in {METADATA}/metadata).")
    if meta["format_version"] > FORMAT_VERSION:
        raise ValueError(
            f"{who}: {path} has checkpoint format version {meta['format_version']} (written by jlora "
            f"{str(meta.get('jlora_version', '?'))[:40]}); this jlora reads versions up to {FORMAT_VERSION}. "
            "Upgrade jlora to read it."
        )
    return meta


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0][:200] if text else type(e).__name__


def _expected(targets: dict[str, Target], config: LoraConfig, base: dict) -> dict[str, tuple]:
    """``{leaf path: (shape, dtype name)}`` that ``config`` on this base calls for (a bank: K of each)."""
    bank = (len(config.adapters),) if config.adapters else ()
    out = {}
    for path, t in targets.items():
        if t.adapted:
            out.update({p: ((*bank, *shape), config.dtype) for p, shape in t.factor_shapes().items()})
        else:
            out[path] = ((*bank, *t.shape), _dtype_name(base[path]))
    return out


def restore(directory, frozen, *, shardings=None) -> tuple[dict, LoraConfig]:
    """Read the adapters `save` wrote, checked against ``frozen`` before any array is loaded.

    The metadata is read first, then every stored shape and dtype is compared with
    what its config, resolved on ``frozen``, calls for; all mismatches are reported
    in one error. Nothing on disk is changed.

    Args:
      directory: a checkpoint written by `save`, or a ``CheckpointManager`` step
        directory saved with `save_args`: a ``str`` or ``pathlib.Path`` (relative to
        the working directory, ``~`` expanded) or an ``etils.epath`` URL.
      frozen: the base parameters the adapters go with.
      shardings: where to put each array: a tree shaped like ``trainable`` of
        ``jax.sharding.Sharding``s. By default the adapters follow ``frozen``:
        ``jlora.shardings(frozen, config)`` when its targeted leaves lie on a mesh,
        else the one device they are on. The layout, mesh or process count that
        wrote the checkpoint never matters: a checkpoint saved by several
        processes reads on one device, and one saved under FSDP onto a
        tensor-parallel base.

    Returns:
      ``(trainable, config)``: ``trainable`` as plain nested dicts of jax arrays
      (the structure `init` makes) placed as ``shardings`` says, ``config`` the
      stored `LoraConfig`.

    Raises:
      FileNotFoundError: no checkpoint at ``directory`` (the message says so when a
        save there was interrupted).
      TypeError: ``directory`` is not a path.
      ValueError: missing or corrupt metadata (the message names the field); a
        format newer than this jlora reads; a config that does not fit ``frozen``;
        stored arrays whose shape or dtype differs from the expected ones (every
        path named).

    >>> restore("/no/such/adapter", {})
    Traceback (most recent call last):
    FileNotFoundError: restore: no checkpoint at /no/such/adapter.
    """
    path = _finished(absolute_path(directory, "restore"), "restore")
    with contextlib.closing(ocp.Checkpointer(ocp.CompositeCheckpointHandler())) as ckptr:
        meta = _metadata(path, ckptr, "restore")
        if not (path / ADAPTERS).is_dir():
            raise ValueError(f"restore: {path} has jlora metadata but no {ADAPTERS!r} item (the arrays); the "
                             "checkpoint is incomplete or damaged. Restore another one.")
        try:
            config = LoraConfig.from_dict(meta["config"])
        except (TypeError, ValueError, KeyError, AttributeError, re.error) as e:
            raise ValueError(f"restore: {path} has corrupt jlora metadata: its config is unreadable "
                             f"({_first_line(e)}) (in {METADATA}/metadata).") from None
        try:
            targets = Plan.of_base(config, frozen)
        except ValueError as e:
            raise ValueError(f"restore: the config stored in {path} does not fit frozen:\n{e}") from None
        base = flatten(frozen)
        expected = _expected(targets, config, base)
        stored = {p: (tuple(v["shape"]), v["dtype"]) for p, v in meta["leaves"].items()}
        errors = []
        for p, (shape, dtype) in expected.items():
            if p not in stored:
                errors.append(f"{p}: not in the checkpoint (expected shape {shape}, {dtype})")
            elif stored[p] != (shape, dtype):
                errors.append(f"{p}: stored shape {stored[p][0]}, {stored[p][1]}; expected {shape}, {dtype}")
        errors += [f"{p}: stored shape {s}, {d}; no target of the config on frozen has this path"
                   for p, (s, d) in stored.items() if p not in expected]
        for p, entry in meta["targets"].items():
            recorded = (entry or {}).get("base")
            if recorded and p in base and tuple(recorded["shape"]) != np.shape(base[p]):
                errors.append(f"{p}: frozen has shape {np.shape(base[p])}; the adapters were trained on "
                              f"shape {tuple(recorded['shape'])}")
        if errors:
            raise ValueError(
                f"restore: the checkpoint at {path} does not fit frozen:\n  " + "\n  ".join(errors)
                + "\nRestore with the base parameters the adapters were trained on."
            )
        where = restore_shardings(targets, base, list(stored), shardings)
        abstract = nest({p: jax.ShapeDtypeStruct(s, jnp.dtype(d), sharding=where[p])
                         for p, (s, d) in stored.items()})
        restored = ckptr.restore(path, ocp.args.Composite(**{ADAPTERS: ocp.args.StandardRestore(abstract)}))
    return restored[ADAPTERS], config


def read_metadata(directory) -> dict:
    """The JSON metadata of a checkpoint (schema in this module's docstring), checked as `restore` does.

    Reads no arrays; handy to see a checkpoint's config, ranks and scales before
    choosing a base to restore it onto.

    >>> import tempfile, jax.numpy as jnp
    >>> trainable = {"dense": {"kernel": {"a": jnp.zeros((16, 2)), "b": jnp.zeros((2, 4))}}}
    >>> path = tempfile.mkdtemp() + "/adapter"
    >>> save(path, trainable, LoraConfig(rank=2, alpha=4.0, targets=r".*/kernel"))
    >>> meta = read_metadata(path)
    >>> meta["targets"]["dense/kernel"]["scale"], meta["leaves"]["dense/kernel/b"]
    (2.0, {'shape': [2, 4], 'dtype': 'float32'})
    """
    path = _finished(absolute_path(directory, "read_metadata"), "read_metadata")
    with contextlib.closing(ocp.Checkpointer(ocp.CompositeCheckpointHandler())) as ckptr:
        return _metadata(path, ckptr, "read_metadata")
