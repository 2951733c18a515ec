"""Exchange adapters with Hugging Face PEFT: ``adapter_config.json`` + ``adapter_model.safetensors``.

PEFT names an adapter by the torch module it adapts and stores each factor in torch's
layout; jlora keys it by the Flax leaf path and stores the transposes. For a module
``M`` (every key starts with ``base_model.model.``):

======================  ==========================================  ==============================
jlora (Flax)            PEFT key                                    PEFT value
======================  ==========================================  ==============================
Dense ``a (in, r)``     ``M.lora_A.weight``                         ``aᵀ``, ``(r, in)``
Dense ``b (r, out)``    ``M.lora_B.weight``                         ``bᵀ``, ``(out, r)``
DenseGeneral a / b      as Dense, ``in``/``out`` axes flattened     ``(r, Πin)`` / ``(Πout, r)``
Embed ``a (vocab, r)``  ``M.lora_embedding_A``                      ``aᵀ``, ``(r, vocab)``
Embed ``b (r, dim)``    ``M.lora_embedding_B``                      ``bᵀ``, ``(dim, r)``
Conv ``a (*k, in, r)``  ``M.lora_A.weight`` (a conv kernel)         ``(r, in, *k)``
Conv ``b (r, out)``     ``M.lora_B.weight`` (a 1×…×1 conv kernel)   ``(out, r, 1, …, 1)``
DoRA ``m (*out)``       ``M.lora_magnitude_vector``                 ``(Πout,)``; conv ``(1, out, 1, …)``
full ``…/kernel``       ``M.weight`` (``modules_to_save``)          torch layout: ``(out, in)``,
                                                                    conv ``(out, in, *k)``
full ``…/bias``         ``M.bias``                                  flattened to 1-D
full embedding, scale   ``M.weight``                                as is
======================  ==========================================  ==============================

The scale is PEFT's ``lora_alpha / r`` (``/ sqrt(r)`` with ``use_rslora``), with
per-module ranks and alphas in ``rank_pattern`` / ``alpha_pattern``, exactly as jlora's
``alpha / r`` per `Rule`.

Module names: by default a leaf path drops a leading ``params/`` collection and its
own last component, and joins the rest with ``.``, which is Hugging Face's naming for
its Flax ports: ``params/bert/encoder/layer/0/attention/self/query/kernel`` ->
``bert.encoder.layer.0.attention.self.query``. A leaf named ``kernel``, ``embedding``
or ``scale`` is its module's ``weight``; others keep their name (``bias``).
"""

from __future__ import annotations

import difflib
import json
import math
import re
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import jax.numpy as jnp
import numpy as np

from jlora._config import LoraConfig, Rule
from jlora._layout import default_layout
from jlora._paths import flatten, nest
from jlora._targets import check_trainable, implied_base, resolve

PREFIX = "base_model.model."
CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
PICKLE_FILE = "adapter_model.bin"

# Key suffix -> jlora factor. Older PEFT saved the magnitude with a trailing ".weight".
_SUFFIXES = {
    ".lora_A.weight": "a",
    ".lora_B.weight": "b",
    ".lora_embedding_A": "a",
    ".lora_embedding_B": "b",
    ".lora_magnitude_vector": "m",
    ".lora_magnitude_vector.weight": "m",
}

# The rest of what PEFT 0.21 writes into adapter_config.json, at PEFT's defaults.
_PEFT_DEFAULTS = {
    "alora_invocation_tokens": None, "arrow_config": None, "auto_mapping": None, "bias": "none",
    "corda_config": None, "ensure_weight_tying": False, "eva_config": None, "exclude_modules": None,
    "fan_in_fan_out": False, "inference_mode": True, "init_lora_weights": True, "kasa_config": None,
    "layer_replication": None, "layers_pattern": None, "layers_to_transform": None, "loftq_config": {},
    "lora_bias": False, "lora_ga_config": None, "megatron_config": None, "megatron_core": "megatron.core",
    "monteclora_config": None, "qalora_group_size": 16, "revision": None, "target_parameters": None,
    "task_type": None, "trainable_token_indices": None, "use_bdlora": None, "use_qalora": False,
    "velora_config": None,
}
# Fields import reads.
_READ = {"peft_type", "r", "lora_alpha", "rank_pattern", "alpha_pattern", "use_rslora", "use_dora",
         "lora_dropout", "init_lora_weights"}
# Fields that do not change what the saved tensors mean: bookkeeping, which modules PEFT
# adapts or saves whole (the file's keys say that), initialisation, the base weight's storage order
# (fan_in_fan_out: the factors are (r, in) and (out, r) either way), and trained biases
# (`bias`: they are saved as plain tensors and read like modules_to_save).
_IGNORED = {"peft_version", "auto_mapping", "base_model_name_or_path", "revision", "task_type", "inference_mode",
            "target_modules", "exclude_modules", "modules_to_save", "layers_to_transform", "layers_pattern",
            "loftq_config", "eva_config", "corda_config", "lora_ga_config", "fan_in_fan_out", "bias",
            "megatron_config", "megatron_core", "runtime_config", "ensure_weight_tying", "qalora_group_size"}
# init_lora_weights that also change the base weights: the adapter is relative to weights jlora does not have.
_BASE_CHANGING_INITS = ("pissa", "olora", "corda", "loftq", "lora_ga")
_WEIGHT_LEAVES = ("kernel", "embedding", "scale")


def _safetensors():
    try:
        import safetensors.numpy
    except ModuleNotFoundError as e:
        raise ModuleNotFoundError(
            "The PEFT format is safetensors; install the package with `pip install safetensors`."
        ) from e
    return safetensors.numpy


# --------------------------------------------------------------------------- names


def default_module_name(path: str) -> str:
    """PEFT's module name for a leaf path: drop ``params/`` and the leaf's own name, join with ``.``.

    >>> default_module_name("params/bert/encoder/layer/0/attention/self/query/kernel")
    'bert.encoder.layer.0.attention.self.query'
    >>> default_module_name("classifier/bias")
    'classifier'
    """
    parts = path.split("/")
    if parts[0] == "params" and len(parts) > 2:
        parts = parts[1:]
    return ".".join(parts[:-1])


def _param_name(path: str) -> str:
    """The torch parameter a leaf is: ``kernel``/``embedding``/``scale`` -> ``weight``, else its name."""
    leaf = path.rsplit("/", 1)[-1]
    return "weight" if leaf in _WEIGHT_LEAVES else leaf


def _namer(module_name) -> Callable[[str], str]:
    if module_name is None:
        return default_module_name
    if isinstance(module_name, Mapping):
        table = dict(module_name)
        return lambda path: table.get(path, default_module_name(path))
    if callable(module_name):
        return module_name
    raise TypeError(
        f"module_name must be a callable (leaf path -> PEFT module name) or a dict {{path: name}}, "
        f"got {type(module_name).__name__}."
    )


def _module_of(namer, path: str) -> str:
    name = namer(path)
    if not isinstance(name, str) or not name:
        raise ValueError(
            f"no PEFT module name for {path} (the name function gave {name!r}); pass "
            f"module_name={{{path!r}: 'model.some.module'}} or a callable that names it."
        )
    return name


def _pattern_value(patterns: Mapping, name: str, default):
    """What PEFT picks for module ``name`` from a rank/alpha pattern (its ``get_pattern_key``)."""
    for key in patterns:
        if re.match(rf"(.*\.)?({key})$", name):
            return patterns[key]
    return default


def _patterns(values: dict[str, float], default, field: str) -> dict:
    """The smallest pattern dict under which PEFT resolves every module to its value.

    Keys are module names, longest first, because PEFT matches a key as a suffix and
    takes the first that fits; if a default-valued module would still be caught by a
    longer name's key, every module is listed.
    """
    differing = {n: v for n, v in values.items() if v != default}
    for candidate in (differing, values):
        ordered = dict(sorted(candidate.items(), key=lambda kv: (-len(kv[0]), kv[0])))
        if all(_pattern_value(ordered, n, default) == v for n, v in values.items()):
            return ordered
    raise ValueError(f"export_peft: module names {sorted(values)} cannot be told apart by PEFT's {field} "
                     "matching; give them distinct names with module_name.")


def _number(x: float) -> int | float:
    return int(x) if float(x).is_integer() else float(x)


# --------------------------------------------------------------------------- layouts


def _linear_dims(path: str, shape) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """``(in_dims, out_dims)`` of a kernel read as a torch Linear, in jlora's default layout."""
    layout = default_layout(path, len(shape))
    return tuple(shape[i] for i in layout.in_axes), tuple(shape[i] for i in layout.out_axes)


def _kernel_to_torch(path: str, w: np.ndarray, conv: bool) -> np.ndarray:
    """A Flax kernel in torch's layout: conv ``(*k, in, out)`` -> ``(out, in, *k)``, else ``(Πout, Πin)``."""
    if conv:
        n = w.ndim
        return np.transpose(w, (n - 1, n - 2, *range(n - 2)))
    in_dims, _ = _linear_dims(path, w.shape)
    return w.reshape(math.prod(in_dims), -1).T


def _leaf_to_torch(path: str, value: np.ndarray, conv: bool) -> np.ndarray:
    leaf = path.rsplit("/", 1)[-1]
    if leaf == "kernel" and value.ndim >= 2:
        return _kernel_to_torch(path, value, conv)
    if leaf == "bias":
        return value.reshape(-1)
    return value


def _leaf_from_torch(path: str, shape: tuple[int, ...], value: np.ndarray) -> np.ndarray | str:
    """The inverse of `_leaf_to_torch` onto a leaf of ``shape``; a string says why it does not fit."""
    leaf = path.rsplit("/", 1)[-1]
    if leaf == "kernel" and value.ndim >= 3:  # a torch conv weight (out, in, *k)
        value = np.transpose(value, (*range(2, value.ndim), 1, 0))
        return value if value.shape == shape else f"conv weight {value.shape} does not fit the kernel's {shape}"
    if leaf == "kernel" and value.ndim == 2 and len(shape) >= 2:
        in_dims, out_dims = _linear_dims(path, shape)
        if value.shape != (math.prod(out_dims), math.prod(in_dims)):
            return f"shape {value.shape} does not fit the kernel's {shape} as a Linear (out, in) weight"
        value = value.T
    if value.size != math.prod(shape):
        return f"shape {value.shape} does not fit the leaf's {shape}"
    return value.reshape(shape)


# --------------------------------------------------------------------------- export


def _refuse_unexportable(config: LoraConfig) -> None:
    if not config.linear:
        raise ValueError(
            f"export_peft: nonlinearity={config.nonlinearity!r} makes the delta s·f(x·a)·b; PEFT's LoRA is linear "
            "(s·x·a·b) and has no field for f. Only nonlinearity='identity' adapters can be exported."
        )
    if config.dylora is not None:
        raise ValueError(
            f"export_peft: dylora={config.dylora!r}: PEFT has no DyLoRA. Cut the adapter to one rank first with "
            "trainable_k, config_k = jlora.truncate(trainable, config, rank=k) and export that."
        )
    if config.init == "pissa":
        raise ValueError(
            "export_peft: init='pissa' adapters act on the SVD residual stored in frozen, not on the pretrained "
            "weights a PEFT user loads; export the merged model (jlora.merge) instead."
        )


def _frozen_like(trainable, config: LoraConfig) -> dict:
    """A stand-in for ``frozen`` with each adapted kernel's shape (zero-strided views, no memory)."""
    base, misfits = implied_base(trainable, config, np.float32)
    errors = [f"the adapter at {m.kernel} matches no rule of the config" if m.rule is None else
              f"the adapter at {m.kernel} (a {m.a_shape}, b {m.b_shape}) does not fit rule {m.rule.pattern!r}'s axes"
              for m in misfits]
    if errors:
        raise ValueError("export_peft: trainable does not fit config:\n  " + "\n  ".join(errors)
                         + "\nPass the config given to jlora.init (and frozen=, to check against the base).")
    return nest({path: np.asarray(leaf) for path, leaf in base.items()})


def export_peft(directory, trainable, config: LoraConfig, *, frozen=None, module_name=None,
                base_model_name_or_path: str | None = None, conv: str | Sequence[str] = ()) -> None:
    """Write ``trainable`` as a PEFT LoRA adapter: ``adapter_config.json`` + ``adapter_model.safetensors``.

    ``PeftModel.from_pretrained(torch_model, directory)`` then loads it onto the torch
    model whose module names `module_name` gives. Keys, layouts and config fields are
    those of PEFT 0.21 (see the module docstring's table); each adapter's rank and
    alpha go to ``r``/``lora_alpha`` or, where they differ, ``rank_pattern``/``alpha_pattern``.
    Leaves trained in full become ``modules_to_save``.

    An embedding adapter acts on lookups only in PEFT: a tied output head (``embed.attend``)
    that jlora adapts along with the table gets no delta there.

    Args:
      directory: folder to write (created if missing; the two files are overwritten).
      trainable: the adapters, as from `jlora.init` and training.
      config: the `LoraConfig` they were made with.
      frozen: the base parameters; if given, ``trainable`` is checked against them.
      module_name: PEFT module name of a leaf path: a callable, or a dict ``{path: name}``
        (paths it lacks take the default). Default: drop ``params/`` and the leaf name,
        join with ``.`` (Hugging Face's Flax naming).
      base_model_name_or_path: written to the config, as PEFT does (e.g. a hub id).
      conv: regexes (``re.fullmatch``) of the kernel paths that are convolution kernels
        ``(*window, in, out)``; their adapters are written as PEFT's Conv layout. Other
        kernels with several input axes are written as Linear with those axes flattened.

    Raises:
      ValueError: for what PEFT cannot represent (a nonlinearity, DyLoRA, PiSSA's residual
        base, scanned kernels, input axes that are not the kernel's leading axes), and for
        two leaves that would share a PEFT key.

    >>> import json, pathlib, tempfile, jax, jax.numpy as jnp
    >>> from jlora import LoraConfig, init
    >>> params = {"params": {"encoder": {"query": {"kernel": jnp.ones((6, 4)), "bias": jnp.zeros(4)}}}}
    >>> cfg = LoraConfig(rank=2, alpha=4.0, targets=r".*/query/kernel")
    >>> _, trainable = init(jax.random.key(0), params, cfg)
    >>> with tempfile.TemporaryDirectory() as d:
    ...     export_peft(d, trainable, cfg)
    ...     peft = json.loads(pathlib.Path(d, "adapter_config.json").read_text())
    >>> peft["r"], peft["lora_alpha"], peft["target_modules"]
    (2, 4, ['encoder.query'])
    """
    if not isinstance(config, LoraConfig):
        raise TypeError(f"export_peft: expected a jlora.LoraConfig, got {type(config).__name__}.")
    _refuse_unexportable(config)
    namer = _namer(module_name)
    conv_patterns = (conv,) if isinstance(conv, str) else tuple(conv)
    base = _frozen_like(trainable, config) if frozen is None else frozen
    targets = resolve(config, base)
    values = check_trainable(targets, trainable)

    tensors: dict[str, np.ndarray] = {}
    owner: dict[str, str] = {}  # PEFT key -> leaf path, to catch two leaves on one key
    ranks, alphas, full_modules, errors = {}, {}, set(), []

    def put(key: str, value, path: str) -> None:
        key = PREFIX + key
        if key in owner:
            errors.append(f"{owner[key]} and {path} both map to the PEFT key {key!r}; tell them apart with module_name")
        owner[key] = path
        tensors[key] = np.ascontiguousarray(value)

    for path, t in targets.items():
        is_conv = any(re.fullmatch(p, path) for p in conv_patterns)
        try:
            module = _module_of(namer, path)
        except ValueError as e:
            errors.append(str(e))
            continue
        if not t.is_lora:
            full_modules.add(module)
            put(f"{module}.{_param_name(path)}", _leaf_to_torch(path, np.asarray(values[path]), is_conv), path)
            continue
        lay = t.layout
        if lay.stack_axes:
            errors.append(
                f"{path} is a stack of layers (stack_axes={lay.stack_axes}); PEFT has one module per layer and "
                "cannot hold a scanned kernel. Export an unrolled (unscanned) model's adapters instead."
            )
            continue
        if lay.in_axes != tuple(range(len(lay.in_axes))):
            errors.append(
                f"{path} has in_axes={lay.in_axes}, not its leading axes, so it is no torch Linear weight "
                "(in, out) flattened; PEFT's factors would not line up with the kernel. Use a kernel whose "
                "input axes come first."
            )
            continue
        if is_conv and (len(t.shape) < 3 or lay.out_axes != (len(t.shape) - 1,)):
            errors.append(f"{path} (shape {t.shape}, in_axes={lay.in_axes}) was marked conv but is no Flax "
                          "conv kernel (*window, in, out) with its input axes first; fix the conv patterns.")
            continue
        a, b, m = (None if x is None else np.asarray(x) for x in values[path])
        r = t.rank
        if is_conv:  # a (*k, in, r) -> (r, in, *k); b (r, out) -> (out, r, 1, ..); m -> (1, out, 1, ..)
            n = a.ndim - 1
            ones = (1,) * (n - 1)
            big_a, big_b = np.transpose(a, (n, n - 1, *range(n - 1))), b.T.reshape(-1, r, *ones)
            big_m = None if m is None else m.reshape(1, -1, *ones)
        else:
            big_a, big_b = a.reshape(-1, r).T, b.reshape(r, -1).T
            big_m = None if m is None else m.reshape(-1)
        names = ("lora_embedding_A", "lora_embedding_B") if t.embedding else ("lora_A.weight", "lora_B.weight")
        put(f"{module}.{names[0]}", big_a, path)
        put(f"{module}.{names[1]}", big_b, path)
        if big_m is not None:
            put(f"{module}.lora_magnitude_vector", big_m, path)
        rule = config.rule_for(path)
        ranks[module] = r
        alphas[module] = config.alpha if rule.alpha is None else rule.alpha
    if not errors:
        shared = sorted(full_modules & set(ranks))
        if shared:
            errors.append(f"modules {shared} are both adapted and (partly) trained in full; PEFT adapts a module "
                          "or saves it whole, not both. Drop their leaves from train_in_full or from targets.")
    if errors:
        raise ValueError("export_peft: cannot write a PEFT adapter:\n  " + "\n  ".join(errors))

    peft_config = dict(_PEFT_DEFAULTS)
    peft_config.update(
        peft_type="LORA",
        base_model_name_or_path=base_model_name_or_path,
        r=config.rank,
        lora_alpha=_number(config.alpha),
        rank_pattern=_patterns(ranks, config.rank, "rank_pattern"),
        alpha_pattern={k: _number(v) for k, v in _patterns(alphas, config.alpha, "alpha_pattern").items()},
        target_modules=sorted(ranks),
        modules_to_save=sorted(full_modules) or None,
        use_rslora=config.rslora,
        use_dora=config.dora,
        lora_dropout=float(config.dropout),
    )
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    (directory / CONFIG_FILE).write_text(json.dumps(peft_config, indent=2, sort_keys=True) + "\n")
    _safetensors().save_file(tensors, str(directory / WEIGHTS_FILE), metadata={"format": "pt"})


# --------------------------------------------------------------------------- import


def _read_config(directory: Path) -> dict:
    path = directory / CONFIG_FILE
    if not path.is_file():
        raise FileNotFoundError(f"import_peft: {path} does not exist; a PEFT adapter folder holds {CONFIG_FILE} "
                                f"and {WEIGHTS_FILE} (PeftModel.save_pretrained writes both).")
    cfg = json.loads(path.read_text())
    if cfg.get("peft_type") != "LORA":
        raise ValueError(f"import_peft: {path} has peft_type={cfg.get('peft_type')!r}; jlora reads LoRA adapters "
                         "(peft_type 'LORA') only.")
    unsupported = [f"{k}={v!r}" for k, v in sorted(cfg.items())
                   if k not in _READ | _IGNORED and v not in (None, False, "", [], {})]
    init = cfg.get("init_lora_weights")
    if isinstance(init, str) and init.lower().startswith(_BASE_CHANGING_INITS):
        unsupported.append(
            f"init_lora_weights={init!r} (it changed the base weights too; convert it to plain LoRA with PEFT's "
            "save_pretrained(..., path_initial_model_for_weight_conversion=...))"
        )
    if unsupported:
        raise ValueError(
            f"import_peft: {path} uses PEFT features jlora does not implement: {', '.join(unsupported)}. "
            "jlora reads plain LoRA, rsLoRA, DoRA, rank/alpha patterns and modules_to_save."
        )
    return cfg


def _read_tensors(directory: Path) -> dict[str, np.ndarray]:
    path = directory / WEIGHTS_FILE
    if not path.is_file():
        if (directory / PICKLE_FILE).is_file():
            raise ValueError(
                f"import_peft: {directory} holds {PICKLE_FILE}, a pickled torch file, and no {WEIGHTS_FILE}. "
                "Unpickling can run arbitrary code, so jlora does not open it. Convert it once, where you trust "
                "the file, with torch and safetensors:\n    python -c \"import torch; from safetensors.torch "
                f"import save_file; save_file(torch.load('{directory / PICKLE_FILE}', weights_only=True), "
                f"'{path}', metadata={{'format': 'pt'}})\""
            )
        raise FileNotFoundError(f"import_peft: {path} does not exist; PeftModel.save_pretrained writes it.")
    return _safetensors().load_file(str(path))


def _split_key(key: str) -> tuple[str, str | None, str]:
    """``(module, factor, rest)``: the factor is 'a', 'b', 'm' or None for a plain tensor (then rest is 'mod.param')."""
    rest = key[len(PREFIX):]
    for suffix, factor in _SUFFIXES.items():
        if rest.endswith(suffix):
            return rest[: -len(suffix)], factor, rest
    return "", None, rest


def _adapter_from_torch(path: str, shape, f: dict, rank: int) -> tuple[dict, str | None]:
    """jlora's ``a``, ``b`` (and ``m``) for a kernel of ``shape`` from PEFT's factors."""
    big_a, big_b, m = f["a"], f["b"], f.get("m")
    if big_a.ndim >= 3:  # Conv: A (r, in, *k), B (out, r, 1, ..)
        n = big_a.ndim
        a = np.transpose(big_a, (*range(2, n), 1, 0))
        if len(shape) != n or a.shape != (*shape[:-1], rank) or big_b.shape != (shape[-1], rank, *(1,) * (n - 2)):
            return {}, f"conv lora_A {big_a.shape} / lora_B {big_b.shape} do not fit the kernel's {shape}"
        b = big_b.reshape(shape[-1], rank).T
        out_dims = (shape[-1],)
    else:
        in_dims, out_dims = _linear_dims(path, shape)
        if big_a.shape != (rank, math.prod(in_dims)) or big_b.shape != (math.prod(out_dims), rank):
            return {}, (f"lora_A {big_a.shape} / lora_B {big_b.shape} do not fit the kernel's {shape} "
                        f"(expected ({rank}, {math.prod(in_dims)}) / ({math.prod(out_dims)}, {rank}))")
        a, b = big_a.T.reshape(*in_dims, rank), big_b.T.reshape(rank, *out_dims)
    out = {"a": a, "b": b}
    if m is not None:
        if m.size != math.prod(out_dims):
            return {}, f"lora_magnitude_vector {m.shape} does not fit the kernel's {math.prod(out_dims)} output units"
        out["m"] = m.reshape(out_dims)
    return out, None


def import_peft(directory, params, *, module_name=None):
    """Read a PEFT LoRA adapter folder as jlora's ``(frozen, trainable, config)``.

    Every tensor of ``adapter_model.safetensors`` is placed on the leaf of ``params``
    whose PEFT name (`module_name` applied to every leaf path) it carries: LoRA factors
    become that kernel's adapter (transposed, see the module docstring's table), other
    tensors (``modules_to_save``, trained biases) become leaves trained in full.

    Args:
      directory: a folder written by ``PeftModel.save_pretrained`` (or `export_peft`).
      params: the Flax base parameters (Linen variables or NNX state), already
        converted from the torch base model.
      module_name: as for `export_peft`: leaf path -> PEFT module name.

    Returns:
      ``(frozen, trainable, config)``: ``frozen`` is ``params``; ``trainable`` holds the
      factors in the file's dtype (full leaves in their leaf's dtype); ``config`` has one
      exact-path `Rule` per distinct (rank, alpha), so every module keeps PEFT's
      ``lora_alpha / r`` (or ``/ sqrt(r)``), plus ``rslora``, ``dora``, ``dropout`` and
      ``train_in_full``. ``jlora.wrap(apply_fn, config)(frozen, trainable, ...)`` then
      computes what the PEFT model computes.

    Raises:
      ValueError: a pickled ``adapter_model.bin`` (unpickling can run code), a PEFT
        feature jlora does not implement, keys that map to no leaf (all listed at
        once), or tensors whose shapes do not fit their leaves.

    >>> import tempfile, jax, jax.numpy as jnp
    >>> from jlora import LoraConfig, init
    >>> params = {"params": {"encoder": {"query": {"kernel": jnp.ones((6, 4)), "bias": jnp.zeros(4)}}}}
    >>> cfg = LoraConfig(rank=2, targets=r".*/query/kernel")
    >>> _, trainable = init(jax.random.key(0), params, cfg)
    >>> with tempfile.TemporaryDirectory() as d:
    ...     export_peft(d, trainable, cfg)
    ...     frozen, back, cfg2 = import_peft(d, params)
    >>> jax.tree.map(jnp.shape, back)
    {'params': {'encoder': {'query': {'kernel': {'a': (6, 2), 'b': (2, 4)}}}}}
    """
    directory = Path(directory)
    peft = _read_config(directory)
    tensors = _read_tensors(directory)
    namer = _namer(module_name)
    leaves = flatten(params)
    by_name: dict[str, list[str]] = {}  # "module.param" -> leaf paths
    for path in leaves:
        name = namer(path)
        if isinstance(name, str) and name:
            by_name.setdefault(f"{name}.{_param_name(path)}", []).append(path)

    r, alpha = int(peft.get("r", 8)), float(peft.get("lora_alpha", 8))  # PEFT's defaults
    rank_pattern, alpha_pattern = peft.get("rank_pattern") or {}, peft.get("alpha_pattern") or {}
    use_dora = bool(peft.get("use_dora", False))
    factors: dict[str, dict[str, np.ndarray]] = {}  # module -> {"a", "b", "m"}
    module_keys: dict[str, list[str]] = {}
    full: dict[str, np.ndarray] = {}
    unmapped, errors = [], []
    for key in sorted(tensors):
        if not key.startswith(PREFIX):
            errors.append(f"{key}: not a PEFT LoRA key (they start with {PREFIX!r})")
            continue
        module, factor, rest = _split_key(key)
        if factor is not None:
            factors.setdefault(module, {})[factor] = tensors[key]
            module_keys.setdefault(module, []).append(key)
        elif ".lora_" in rest or rest.startswith("lora_"):
            errors.append(f"{key}: a tensor of a LoRA variant jlora does not implement (it reads lora_A, lora_B, "
                          "lora_embedding_A/B and lora_magnitude_vector)")
        else:
            full[rest] = tensors[key]

    def leaf_for(name: str, keys: list[str]) -> str | None:
        paths = by_name.get(name, [])
        if len(paths) > 1:
            errors.append(f"{PREFIX}{name}: the leaves {paths} all map to {name!r}; tell them apart with module_name")
        elif not paths:
            unmapped.extend(keys)
        return paths[0] if len(paths) == 1 else None

    adapters, groups = {}, {}
    for module, f in factors.items():
        key = PREFIX + module
        if "a" not in f or "b" not in f:
            errors.append(f"{key}: has {sorted(f)} of PEFT's factors, needs both lora_A and lora_B")
            continue
        if ("m" in f) != use_dora:
            errors.append(f"{key}: {'a' if 'm' in f else 'no'} lora_magnitude_vector, but use_dora={use_dora}")
            continue
        if use_dora and any(k.endswith("lora_embedding_A") for k in module_keys[module]):
            errors.append(f"{key}: DoRA on an embedding; jlora implements DoRA for Linear and Conv kernels only")
            continue
        path = leaf_for(f"{module}.weight", module_keys[module])
        if path is None:
            continue
        rank = int(f["a"].shape[0])
        want = _pattern_value(rank_pattern, module, r)
        if rank != want:
            errors.append(f"{key}: lora_A has rank {rank}, but r/rank_pattern give {want}")
            continue
        adapter, error = _adapter_from_torch(path, tuple(np.shape(leaves[path])), f, rank)
        if error:
            errors.append(f"{key} -> {path}: {error}")
            continue
        adapters[path] = adapter
        groups.setdefault((rank, float(_pattern_value(alpha_pattern, module, alpha))), []).append(path)

    trained = {}
    for name, value in full.items():
        path = leaf_for(name, [PREFIX + name])
        if path is None:
            continue
        leaf = leaves[path]
        got = _leaf_from_torch(path, tuple(np.shape(leaf)), value)
        if isinstance(got, str):
            errors.append(f"{PREFIX + name} -> {path}: {got}")
        else:
            trained[path] = jnp.asarray(got, dtype=leaf.dtype)
    if unmapped:
        known = sorted(by_name)
        close = difflib.get_close_matches(unmapped[0][len(PREFIX):], known, 3, 0.3) or known[:3]
        errors.insert(0, f"{len(unmapped)} adapter keys map to no leaf of params: {', '.join(sorted(unmapped))}. "
                         f"Names params gives (module.param), e.g. {', '.join(close)}; pass module_name "
                         "(leaf path -> PEFT module name) to match the torch model's names")
    if errors:
        raise ValueError(f"import_peft: cannot read {directory}:\n  " + "\n  ".join(errors))

    dtypes = {x.dtype for ad in adapters.values() for x in ad.values()}
    dtype = dtypes.pop() if len(dtypes) == 1 and jnp.issubdtype(next(iter(dtypes)), jnp.floating) else np.float32
    rules = tuple(
        Rule(pattern="|".join(re.escape(p) for p in sorted(paths)),
             rank=None if rank == r else rank, alpha=None if a == alpha else a)
        for (rank, a), paths in sorted(groups.items())
    )
    config = LoraConfig(
        rank=r, alpha=alpha, targets=rules, rslora=bool(peft.get("use_rslora", False)), dora=use_dora,
        dropout=float(peft.get("lora_dropout") or 0.0), dtype=np.dtype(dtype).name,
        train_in_full=tuple(re.escape(p) for p in sorted(trained)),
    )
    trainable = dict(trained)
    for path, adapter in adapters.items():
        for factor, x in adapter.items():
            trainable[f"{path}/{factor}"] = jnp.asarray(x, dtype=dtype)
    trainable = nest(trainable)
    try:  # what wrap will check: fail here, not there
        check_trainable(resolve(config, params), trainable)
    except ValueError as e:
        raise ValueError(f"import_peft: {directory} does not fit jlora's adapters on params:\n{e}") from None
    return params, trainable, config
