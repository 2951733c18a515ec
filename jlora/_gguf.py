"""Exchange adapters with llama.cpp: GGUF LoRA adapter files (``llama-cli -m base.gguf --lora a.gguf``).

A GGUF adapter names each factor after the base GGUF tensor it adapts and stores it in
the orientation llama.cpp multiplies (``ne`` is GGUF's shape, innermost first; numpy's
shape is its reverse):

=======================  =============================  =========================
jlora (Flax)             GGUF tensor                    numpy shape (``ne``)
=======================  =============================  =========================
``a (*in, r)``           ``<base>.lora_a``              ``(r, Πin)`` (``Πin, r``)
``b (r, *out)``          ``<base>.lora_b``              ``(Πout, r)`` (``r, Πout``)
=======================  =============================  =========================

— PEFT's ``lora_A``/``lora_B`` layouts, named like ``blk.0.attn_q.weight.lora_a``. The
metadata says ``general.type = "adapter"``, ``adapter.type = "lora"``,
``general.architecture`` (llama.cpp refuses an adapter whose architecture differs from the
model's) and ``adapter.lora.alpha``; llama.cpp scales each pair by ``alpha / r``.

llama.cpp's converter permutes the rows of every Llama ``attn_q``/``attn_k`` weight (it
interleaves each head's two RoPE halves), so an adapter trained on Hugging Face-layout
weights must have the same rows of ``b`` permuted: `export_gguf` does it for a ``llama``
base, from the base file's head counts, and `import_gguf` undoes it.

Names: ``tensor_name(path)`` gives the base GGUF tensor of a kernel's leaf path (a callable
or a dict); the same mapping, applied to every leaf of ``params``, finds each tensor's leaf
on import, so whatever one writes the other reads.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable
from pathlib import Path

import jax.numpy as jnp
import numpy as np

from jlora._config import LoraConfig, Rule
from jlora._foreign import name_mapping, one_layer, restack, stack_shape, write_file
from jlora._layout import default_layout
from jlora._paths import flatten, nest
from jlora._plan import Plan
from jlora._variants import refuse

try:  # an optional dependency: pip install gguf (jlora[gguf])
    import gguf
except ImportError:  # pragma: no cover - the suite installs it
    gguf = None

ROPE_PERMUTED = {"llama": {"attn_q": "attention.head_count", "attn_k": "attention.head_count_kv"}}


def _need_gguf(who: str) -> None:
    if gguf is None:
        raise ImportError(f"{who} needs the 'gguf' package (llama.cpp's reader and writer): pip install gguf")


# --------------------------------------------------------------------------- names and rows


def _namer(tensor_name, who: str) -> Callable[[str, tuple[int, ...]], str | None]:
    if tensor_name is None:
        raise TypeError(f"{who}: tensor_name is required: a callable (leaf path -> base GGUF tensor name, "
                        "e.g. 'blk.0.attn_q.weight') or a dict {path: name}.")
    return name_mapping(tensor_name, None, "tensor_name", "base GGUF tensor name, e.g. 'blk.0.attn_q.weight'")


def _rope_heads(reader, name: str) -> int | None:
    """The head count whose rows llama.cpp permuted in base tensor ``name`` (None: not permuted)."""
    arch = _field(reader, "general.architecture")
    kind = re.fullmatch(r"blk\.\d+\.(\w+)\.weight", name)
    key = ROPE_PERMUTED.get(arch, {}).get(kind[1]) if kind else None
    return None if key is None else int(_field(reader, f"{arch}.{key}"))


def permute_rows(x: np.ndarray, heads: int) -> np.ndarray:
    """llama.cpp's q/k row order: within each head, row ``i`` of the first half and row ``i`` of
    the second half become rows ``2i`` and ``2i + 1``.

    >>> permute_rows(np.arange(4)[:, None], 1)[:, 0].tolist()
    [0, 2, 1, 3]
    """
    return x.reshape(heads, 2, x.shape[0] // heads // 2, *x.shape[1:]).swapaxes(1, 2).reshape(x.shape)


def unpermute_rows(x: np.ndarray, heads: int) -> np.ndarray:
    """The inverse of `permute_rows` (Hugging Face's row order).

    >>> x = np.arange(24.0).reshape(12, 2)
    >>> bool((unpermute_rows(permute_rows(x, 3), 3) == x).all())
    True
    """
    return x.reshape(heads, x.shape[0] // heads // 2, 2, *x.shape[1:]).swapaxes(1, 2).reshape(x.shape)


# --------------------------------------------------------------------------- reading a file


def _read(path: Path, who: str):
    """A `gguf.GGUFReader`, or one ValueError naming the file for anything that is not a GGUF."""
    if not path.is_file():
        raise FileNotFoundError(f"{who}: {path} does not exist.")
    try:
        return gguf.GGUFReader(path)
    except Exception as e:  # noqa: BLE001  (truncated, bit-flipped, lying sizes: the reader raises anything)
        raise ValueError(f"{who}: {path} is not a readable GGUF file ({type(e).__name__}: {e}); "
                         "the file is truncated or damaged: copy or write it again.") from None


def _field(reader, key: str, want=None):
    field = reader.fields.get(key)
    if field is None:
        raise ValueError(f"{reader.data.filename}: no {key!r} field in the GGUF metadata.")
    try:
        value = field.contents()
    except Exception as e:  # noqa: BLE001
        raise ValueError(f"{reader.data.filename}: field {key!r} cannot be read ({e}).") from None
    if want is not None and not isinstance(value, want):
        raise ValueError(f"{reader.data.filename}: field {key!r} is {value!r}, expected a {want.__name__}.")
    return value


def _tensors(reader) -> dict[str, np.ndarray]:
    """Every tensor as a float32 numpy array (numpy's shape: ``ne`` reversed), checked for size."""
    out = {}
    for t in reader.tensors:
        if t.tensor_type not in (gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.F16,
                                 gguf.GGMLQuantizationType.BF16):
            raise ValueError(f"{reader.data.filename}: tensor {t.name!r} is {t.tensor_type.name}; an "
                             "adapter's factors are F32, F16 or BF16.")
        shape = tuple(int(n) for n in reversed(t.shape))
        data = np.asarray(t.data)
        if data.size != int(np.prod(shape)):
            raise ValueError(f"{reader.data.filename}: tensor {t.name!r} declares shape {shape} but holds "
                             f"{data.size} values.")
        if t.tensor_type == gguf.GGMLQuantizationType.BF16:
            data = gguf.quants.dequantize(data, t.tensor_type)
        out[t.name] = np.asarray(data, np.float32).reshape(shape)
    return out


# --------------------------------------------------------------------------- export


def export_gguf(path, trainable, config: LoraConfig, *, base, tensor_name, frozen=None) -> None:
    """Write ``trainable`` as a llama.cpp LoRA adapter (a GGUF file) for the base model ``base``.

    ``llama-cli -m BASE --lora PATH`` (or ``Llama(model_path=BASE, lora_path=PATH)``) then
    applies it. Each adapter becomes ``<name>.lora_a`` ``(r, in)`` and ``<name>.lora_b``
    ``(out, r)`` where ``name = tensor_name(path)`` is the base GGUF tensor it adapts;
    the base file is read for its architecture (written as llama.cpp checks it), for each
    named tensor's shape (checked against the kernel's) and, for a ``llama`` base, the
    head counts that llama.cpp's q/k row permutation needs. The file is written beside
    ``path`` and renamed into place: a crash never leaves half a file.

    Args:
      path: the ``.gguf`` file to write (replaced if it exists).
      trainable: the adapters, as from `jlora.init` and training.
      config: their `LoraConfig`. Every adapter must have the same ``alpha/r`` scale
        (llama.cpp has one ``adapter.lora.alpha`` and divides it by each pair's rank).
      base: the base model's GGUF file.
      tensor_name: the base GGUF tensor of each adapted kernel's leaf path: a callable
        (e.g. ``params/layers_0/self_attn/q_proj/kernel -> 'blk.0.attn_q.weight'``) or a
        dict ``{path: name}``. A stacked (scanned) kernel writes one tensor per layer: the
        callable may take ``(path, index)``, ``index`` the layer's stack indices (``()``
        when unstacked), and a ``{}`` in a dict's name takes the index.
      frozen: the base parameters; if given, ``trainable`` is checked against them.

    Raises:
      ValueError: variants llama.cpp has no form for (DoRA, a nonlinearity, DyLoRA, PiSSA),
        leaves trained in full, input axes that are not the kernel's leading ones (after
        its stack axes), embeddings, scales that differ between adapters, a name the
        base file lacks or whose shape differs, two kernels named alike; all listed at once.
      ImportError: the ``gguf`` package is missing.
    """
    who = "export_gguf"
    _need_gguf(who)
    if not isinstance(config, LoraConfig):
        raise TypeError(f"{who}: expected a jlora.LoraConfig, got {type(config).__name__}.")
    refuse(config, "export_gguf", who)
    namer = _namer(tensor_name, who)
    targets = Plan.of_trainable(config, trainable, who) if frozen is None else Plan.of_base(config, frozen)
    values = targets.read(trainable)
    reader = _read(Path(os.fspath(base)).expanduser(), who)
    arch = _field(reader, "general.architecture", str)
    base_shapes = {t.name: tuple(int(n) for n in reversed(t.shape)) for t in reader.tensors}

    errors, owner, tensors, scales = [], {}, {}, {}
    for p, t in targets.items():
        if not t.adapted:
            errors.append(f"{p}: trained in full; a llama.cpp adapter holds LoRA pairs only (merge the "
                          "model with jlora.merge and convert that instead)")
            continue
        stack, layer_shape, in_axes = one_layer(t.layout, t.shape)
        if t.embedding or in_axes != tuple(range(len(in_axes))):
            after = " after its stack axes" if stack else ""
            why = ("an embedding table" if t.embedding else
                   f"in_axes={t.layout.in_axes}, not its leading axes{after}")
            errors.append(f"{p}: {why}; llama.cpp adapts one 2-D weight (out, in) per tensor")
            continue
        in_size = int(np.prod(layer_shape[:len(in_axes)]))
        out_size = int(np.prod(layer_shape[len(in_axes):]))
        a_all, b_all, _ = (None if x is None else np.asarray(x, np.float32) for x in values[p])
        for index in np.ndindex(*stack):  # a stacked (scanned) kernel: one base tensor per layer
            where = f"{p} layer {index}" if index else p
            name = namer(p, index)
            if not isinstance(name, str) or not name:
                errors.append(f"{where}: tensor_name gave {name!r}; name its base GGUF tensor, e.g. "
                              "'blk.0.attn_q.weight'")
                continue
            if name in owner:
                errors.append(f"{owner[name]} and {where} both map to {name!r}; tensor_name must tell them "
                              "apart")
                continue
            owner[name] = where
            if name not in base_shapes:
                close = [n for n in base_shapes if n.split(".")[-2:] == name.split(".")[-2:]][:3]
                like = ", ".join(close) or next(iter(base_shapes))
                errors.append(f"{where}: {name!r} is no tensor of {base} (e.g. {like})")
                continue
            if base_shapes[name] != (out_size, in_size):
                errors.append(f"{where}: {name!r} is {base_shapes[name]} (out, in) in {base}, the kernel is "
                              f"({out_size}, {in_size})")
                continue
            big_a, big_b = a_all[index].reshape(in_size, t.rank).T, b_all[index].reshape(t.rank, out_size).T
            heads = _rope_heads(reader, name)
            if heads is not None:
                big_b = permute_rows(big_b, heads)
            tensors[f"{name}.lora_a"] = np.ascontiguousarray(big_a)
            tensors[f"{name}.lora_b"] = np.ascontiguousarray(big_b)
        scales[p] = (t.scale, t.rank)
    if len({s for s, _ in scales.values()}) > 1:
        listed = ", ".join(f"{p}: {s:g}" for p, (s, _) in list(scales.items())[:4])
        errors.append(f"the adapters' scales differ ({listed}, ...); llama.cpp applies one alpha/r, so "
                      "export adapters with one rank and alpha (or one scale)")
    if errors:
        raise ValueError(f"{who}: cannot write a llama.cpp adapter:\n  " + "\n  ".join(errors))
    if not tensors:
        raise ValueError(f"{who}: trainable holds no adapter to write.")
    scale, rank = next(iter(scales.values()))
    _write(Path(os.fspath(path)).expanduser(), arch, float(scale * rank), tensors)


def _write(path: Path, arch: str, alpha: float, tensors: dict[str, np.ndarray]) -> None:
    def write(tmp: str) -> None:
        writer = gguf.GGUFWriter(tmp, arch)
        try:
            writer.add_type(gguf.GGUFType.ADAPTER)
            writer.add_string(gguf.Keys.Adapter.TYPE, "lora")
            writer.add_float32(gguf.Keys.Adapter.LORA_ALPHA, alpha)
            for name, x in tensors.items():
                writer.add_tensor(name, x)
            writer.write_header_to_file()
            writer.write_kv_data_to_file()
            writer.write_tensors_to_file()
        finally:
            writer.close()

    write_file(path, write)


# --------------------------------------------------------------------------- import


def import_gguf(path, params, *, base, tensor_name, layouts: LoraConfig | None = None):
    """Read a llama.cpp LoRA adapter (GGUF) as jlora's ``(frozen, trainable, config)``.

    The inverse of `export_gguf`: each ``<name>.lora_a``/``.lora_b`` pair lands on the
    leaf of ``params`` whose ``tensor_name`` is ``name`` (the q/k row permutation of a
    ``llama`` base undone), and ``config`` has one rank and ``alpha`` from the file.

    Args:
      path: the adapter ``.gguf``.
      params: the Flax base parameters the adapter was trained on.
      base: the base model's GGUF (its architecture and head counts).
      tensor_name: as for `export_gguf`.
      layouts: a `LoraConfig` whose rules give kernels' ``in_axes`` and ``stack_axes``
        (e.g. from `jlora.infer_layouts`); others take jlora's default split. A scanned
        kernel's layers are read from one base tensor each, named ``tensor_name(path, index)``.

    Raises:
      ValueError: a file that is not a GGUF LoRA adapter (naming the file and the field),
        an architecture that differs from the base's, tensors that map to no leaf or do not
        fit it; no other exception escapes for any file content.
    """
    who = "import_gguf"
    _need_gguf(who)
    path = Path(os.fspath(path)).expanduser()
    reader = _read(path, who)
    base_reader = _read(Path(os.fspath(base)).expanduser(), who)
    for key, want in (("general.type", "adapter"), ("adapter.type", "lora")):
        if _field(reader, key, str) != want:
            raise ValueError(f"{who}: {path}: {key} is {_field(reader, key)!r}, not {want!r}; not a LoRA "
                             "adapter.")
    arch = _field(reader, "general.architecture", str)
    base_arch = _field(base_reader, "general.architecture", str)
    if arch != base_arch:
        raise ValueError(f"{who}: {path} is for architecture {arch!r}, {base} is {base_arch!r}.")
    alpha = _field(reader, "adapter.lora.alpha")
    if not isinstance(alpha, int | float) or not np.isfinite(alpha) or alpha <= 0:
        raise ValueError(f"{who}: {path}: adapter.lora.alpha is {alpha!r}, expected a finite number > 0.")
    tensors = _tensors(reader)
    namer = _namer(tensor_name, who)
    leaves = flatten(params)
    by_name: dict[str, list[tuple[str, tuple[int, ...]]]] = {}  # base tensor -> (leaf, layer)
    for p, leaf in leaves.items():
        for index in np.ndindex(*stack_shape(layouts, p, np.shape(leaf))):
            name = namer(p, index)
            if isinstance(name, str) and name:
                by_name.setdefault(name, []).append((p, index))

    errors, pairs = [], {}
    for key in tensors:
        m = re.fullmatch(r"(.+)\.lora_([ab])", key)
        if m is None:
            errors.append(f"{key}: not a LoRA factor (names end in .lora_a / .lora_b)")
        else:
            pairs.setdefault(m[1], {})[m[2]] = tensors[key]
    def layout_of(p: str):
        rule = None if layouts is None else layouts.rule_for(p)
        return default_layout(p, np.ndim(leaves[p]), None if rule is None else rule.in_axes,
                              () if rule is None else rule.stack_axes)

    layers: dict[str, dict[tuple[int, ...], dict]] = {}  # leaf -> layer -> {"a", "b"}
    ranks = set()
    for name, f in sorted(pairs.items()):
        found = by_name.get(name, [])
        if set(f) != {"a", "b"}:
            errors.append(f"{name}: has only lora_{''.join(f)}")
            continue
        if len(found) != 1:
            listed = [f"{p} layer {i}" if i else p for p, i in found]
            errors.append(f"{name}: " + (f"the leaves {listed} all map to it; tensor_name must tell them "
                                         "apart" if found else "maps to no leaf of params; pass the "
                                         "tensor_name the adapter was exported with (and layouts= for a "
                                         "scanned stack)"))
            continue
        big_a, big_b = f["a"], f["b"]
        if big_a.ndim != 2 or big_b.ndim != 2 or big_a.shape[0] != big_b.shape[1]:
            errors.append(f"{name}: lora_a {big_a.shape} / lora_b {big_b.shape} are no pair (r, in) / "
                          "(out, r)")
            continue
        heads = _rope_heads(base_reader, name)
        if heads is not None:
            if big_b.shape[0] % (2 * heads):
                errors.append(f"{name}: lora_b has {big_b.shape[0]} rows, not a multiple of 2 x {heads} "
                              "heads")
                continue
            big_b = unpermute_rows(big_b, heads)
        p, index = found[0]
        shape = tuple(np.shape(leaves[p]))
        layout = layout_of(p)
        _, layer_shape, in_axes = one_layer(layout, shape)
        in_dims = [layer_shape[i] for i in in_axes]
        out_dims = [d for i, d in enumerate(layer_shape) if i not in in_axes]
        rank = big_a.shape[0]
        if big_a.shape != (rank, int(np.prod(in_dims))) or big_b.shape != (int(np.prod(out_dims)), rank):
            errors.append(f"{name} -> {p}{f' layer {index}' if index else ''}: lora_a {big_a.shape} / lora_b "
                          f"{big_b.shape} do not fit the kernel's {shape} (in_axes={layout.in_axes}); pass "
                          "layouts=jlora.infer_layouts(...)")
            continue
        layers.setdefault(p, {})[index] = {"a": big_a.T.reshape(*in_dims, rank),
                                           "b": big_b.T.reshape(rank, *out_dims)}
        ranks.add(rank)
    if len(ranks) > 1:
        errors.append(f"ranks {sorted(ranks)} differ; a llama.cpp adapter of one alpha scales each by "
                      "alpha/r, which jlora reads only for one rank")
    adapters = {}
    for p, got in layers.items():  # a stacked kernel's layers back into its layout
        factors, missing = restack(got, stack_shape(layouts, p, np.shape(leaves[p])))
        if missing:
            name = namer(p, missing[0])
            errors.append(f"{p}: the file has {len(got)} of its {len(got) + len(missing)} layers; missing "
                          f"layers {missing[:5]}{' ...' if len(missing) > 5 else ''}"
                          f"{f' (the first would be {name!r})' if isinstance(name, str) else ''}")
            continue
        adapters[p] = (factors["a"], factors["b"], layout_of(p))
    if errors:
        raise ValueError(f"{who}: cannot read {path}:\n  " + "\n  ".join(errors[:20]))
    rank = ranks.pop()
    groups: dict[tuple, list[str]] = {}
    for p, (_, _, layout) in adapters.items():
        default = default_layout(p, np.ndim(leaves[p]))
        in_axes = None if (default.in_axes, ()) == (layout.in_axes, layout.stack_axes) else layout.in_axes
        groups.setdefault((in_axes, layout.stack_axes), []).append(p)
    rules = tuple(Rule(pattern="|".join(re.escape(p) for p in sorted(ps)), in_axes=in_axes,
                       stack_axes=stack)
                  for (in_axes, stack), ps in sorted(groups.items(),
                                                     key=lambda kv: (kv[0][0] or (), kv[0][1])))
    config = LoraConfig(rank=rank, alpha=float(alpha), targets=rules)
    flat = {}
    for p, (a, b, _) in adapters.items():
        flat[f"{p}/a"], flat[f"{p}/b"] = jnp.asarray(a), jnp.asarray(b)
    trainable = nest(flat)
    return params, trainable, config
