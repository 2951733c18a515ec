"""Exchange adapters with Hugging Face PEFT: ``adapter_config.json`` + ``adapter_model.safetensors``.

PEFT names an adapter by the torch module it adapts and stores each factor in torch's
layout; jlora keys it by the Flax leaf path and stores the transposes. For a module
``M`` (every key starts with ``base_model.model.``):

======================  ==========================================  ==============================
jlora (Flax)            PEFT key                                    PEFT value
======================  ==========================================  ==============================
Dense ``a (in, r)``     ``M.lora_A.weight``                         ``aᵀ``, ``(r, in)``
Dense ``b (r, out)``    ``M.lora_B.weight``                         ``bᵀ``, ``(out, r)``
(out, in) kernel a / b  as Dense (``Rule(in_axes=(1,))``)           ``fan_in_fan_out: true``
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

Experts (``export_peft(..., experts=...)``, PEFT's ``target_parameters``): a kernel stacking
``E`` experts, ``a (E, *in, r)`` and ``b (E, r, *out)``, adapts transformers' fused expert
parameter ``M.P`` ``(E, out, in)`` through PEFT's ``ParamWrapper``: ``M.lora_A.weight``
``(r·E, in)`` holds ``aₑᵀ`` in rows ``e·r + k``, ``M.lora_B.weight`` ``(out, r·E)`` holds
``bₑᵀ`` in columns ``k·E + e``. Two adapted parameters of one module nest, the first the torch
module defines innermost, so its keys read ``M.base_layer.lora_A.weight`` (one ``base_layer.``
per wrapper outside it).

The scale is PEFT's ``lora_alpha / r`` (``/ sqrt(r)`` with ``use_rslora``), with
per-module ranks and alphas in ``rank_pattern`` / ``alpha_pattern``, exactly as jlora's
``alpha / r`` per `Rule`.

Transposed kernels (``fan_in_fan_out``): torch's ``Conv1D`` (GPT-2) stores its weight
``(in, out)``; Hugging Face's Flax port keeps that kernel as ``(out, in)`` and contracts
its axis 1, so jlora's layout is ``Rule(in_axes=(1,))`` (what `jlora.infer_layouts`
derives). PEFT's factors are ``(r, in)`` and ``(out, r)`` for either module, so the
tensors cross unchanged; the flag only says which axis of a 2-D kernel is its input.
`import_peft` gives every 2-D Linear adapter of a ``fan_in_fan_out: true`` file
``in_axes=(1,)`` unless its ``layouts=`` say otherwise; `export_peft` writes ``true``
when its 2-D Linear adapters all have ``in_axes=(1,)``. A 2-D kernel saved whole
(``modules_to_save``) crosses as its transpose either way: torch Linear ``(out, in)`` of a
Flax ``(in, out)`` kernel, torch Conv1D ``(in, out)`` of the Flax port's ``(out, in)``.

Module names: by default a leaf path drops a leading ``params/`` collection and its
own last component, and joins the rest with ``.``, which is Hugging Face's naming for
its Flax ports: ``params/bert/encoder/layer/0/attention/self/query/kernel`` ->
``bert.encoder.layer.0.attention.self.query``. A leaf named ``bias`` is its module's
``bias``; every other leaf, whatever it is called (``kernel``, ``embedding``, ``scale``,
gemma's and tunix's ``w``), is its module's ``weight``, as in torch. `peft_name` is that
mapping, and export and import both call it, so whatever one writes the other reads.
"""

from __future__ import annotations

import difflib
import json
import math
import re
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import safetensors.numpy
from jax.experimental import multihost_utils

from jlora._config import LoraConfig, Rule
from jlora._foreign import name_mapping, one_layer, restack, stack_shape, user_path, with_index, write_folder
from jlora._layout import default_layout
from jlora._paths import flatten, nest
from jlora._plan import Plan
from jlora._variants import refuse

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
         "lora_dropout", "init_lora_weights", "fan_in_fan_out", "target_parameters"}
# Fields that do not change what the saved tensors mean: bookkeeping, which modules PEFT
# adapts or saves whole (the file's keys say that), initialisation, and trained biases
# (`bias`: they are saved as plain tensors and read like modules_to_save).
_IGNORED = {"peft_version", "auto_mapping", "base_model_name_or_path", "revision", "task_type",
            "inference_mode",
            "target_modules", "exclude_modules", "modules_to_save", "layers_to_transform", "layers_pattern",
            "loftq_config", "eva_config", "corda_config", "lora_ga_config", "bias",
            "megatron_config", "megatron_core", "runtime_config", "ensure_weight_tying", "qalora_group_size"}
# init_lora_weights that also change the base weights: the adapter is relative to weights jlora does not have.
_BASE_CHANGING_INITS = ("pissa", "olora", "corda", "loftq", "lora_ga")


# --------------------------------------------------------------------------- names


def default_module_name(path: str, index: tuple[int, ...] = ()) -> str:
    """PEFT's module name for a leaf path: drop ``params/`` and the leaf's own name, join with ``.``.

    ``index`` is a stacked (scanned) kernel's layer: its numbers follow the first component
    named ``layers``, ``layer``, ``blocks``, ``block`` or ``h`` (else the first component),
    which is how the unrolled torch model numbers its layers.

    >>> default_module_name("params/bert/encoder/layer/0/attention/self/query/kernel")
    'bert.encoder.layer.0.attention.self.query'
    >>> default_module_name("classifier/bias")
    'classifier'
    >>> default_module_name("params/model/layers/self_attn/q_proj/kernel", (3,))
    'model.layers.3.self_attn.q_proj'
    """
    parts = path.split("/")
    if parts[0] == "params" and len(parts) > 2:
        parts = parts[1:]
    return with_index(".".join(parts[:-1]), index)


def _namer(module_name) -> Callable[[str, tuple[int, ...]], str]:
    """``module_name`` as one function ``(path, index) -> PEFT module name``."""
    return name_mapping(module_name, default_module_name, "module_name", "PEFT module name")


def _module_of(namer, path: str, index: tuple[int, ...] = ()) -> str:
    name = namer(path, index)
    if not isinstance(name, str) or not name:
        at = f" layer {index}" if index else ""
        raise ValueError(
            f"no PEFT module name for {path}{at} (the name function gave {name!r}); pass "
            f"module_name={{{path!r}: 'model.some.module'}} or a callable that names it."
        )
    return name


def peft_name(namer, path: str, index: tuple[int, ...] = ()) -> str:
    """The PEFT name ``module.param`` of the leaf at ``path`` (layer ``index`` of a stacked kernel):
    the module `namer` gives, then the torch parameter — ``bias`` for a leaf named ``bias``,
    ``weight`` for any other.

    Export writes a leaf trained in full under this name and an adapter under its module;
    import finds each key's leaf by applying this to every leaf (and layer) of ``params``.

    >>> peft_name(default_module_name, "params/layers/0/attn/q_einsum/w")
    'layers.0.attn.q_einsum.weight'
    >>> peft_name(default_module_name, "params/classifier/bias")
    'classifier.bias'
    """
    return f"{_module_of(namer, path, index)}.{'bias' if path.rsplit('/', 1)[-1] == 'bias' else 'weight'}"


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


# --------------------------------------------------------------------------- experts


def _expert_patterns(experts) -> list[tuple[str, str | None]]:
    """``experts`` as ``[(regex, torch parameter name, or None for the leaf's own)]``, in order."""
    if isinstance(experts, str):
        items = [(experts, None)]
    elif isinstance(experts, Mapping):
        items = list(experts.items())
    elif isinstance(experts, Sequence):
        items = [(pattern, None) for pattern in experts]
    else:
        raise TypeError(f"experts must be a regex, a sequence of regexes or a dict {{regex: torch parameter "
                        f"name}}, got {type(experts).__name__}.")
    for pattern, name in items:
        named = name is None or isinstance(name, str) and name.isidentifier()
        if not isinstance(pattern, str) or not named:
            raise TypeError(f"experts: {pattern!r}: {name!r} is no (regex, parameter name) pair; give "
                            "regexes and names such as {r'.*/experts/wi': 'gate_up_proj'}.")
        try:
            re.compile(pattern)
        except re.error as e:
            raise ValueError(f"experts: {pattern!r} is not a valid regex ({e}).") from None
    return items


def _expert_of(patterns, path: str) -> tuple[int, str] | None:
    """``(order of its pattern, torch parameter name)`` of an expert kernel, None for any other leaf."""
    return next(((k, name or path.rsplit("/", 1)[-1]) for k, (pattern, name) in enumerate(patterns)
                 if re.fullmatch(pattern, path)), None)


def _expert_slots(namer, patterns, kernels: Mapping[str, tuple[int, ...]]):
    """Where each expert kernel's layers go in PEFT's file.

    ``kernels`` maps an expert kernel's path to its layer stack shape (its stack axes
    but the last, the experts'). Returns ``({(path, layer): (key module, torch parameter)},
    errors)``. PEFT wraps the parameters it adapts on one module one inside the other, in
    the order the torch module defines them (the first innermost), and each wrapper's keys
    gain one ``base_layer.`` per wrapper outside it; that order is the order of ``patterns``.
    """
    on_module: dict[str, list[tuple[int, str, str, tuple[int, ...]]]] = {}
    errors = []
    for path, layers in kernels.items():
        order, name = _expert_of(patterns, path)
        for index in np.ndindex(*layers):
            try:
                module = _module_of(namer, path, index)
            except ValueError as e:
                errors.append(str(e))
                continue
            on_module.setdefault(module, []).append((order, f"{module}.{name}", path, index))
    slots = {}
    for module, params in on_module.items():
        params.sort()
        for (k, name, path, index), (k2, name2, path2, index2) in zip(params, params[1:], strict=False):
            at, at2 = (f"{p} layer {i}" if i else p for p, i in ((path, index), (path2, index2)))
            if name == name2:
                errors.append(f"{at} and {at2} both map to the torch parameter {name!r}; tell them apart "
                              "with module_name or experts")
            elif k == k2:
                errors.append(f"{at} and {at2} ({name}, {name2}) are parameters of one torch module "
                              f"matched by one experts pattern {patterns[k][0]!r}; give one pattern per "
                              "parameter, in the order the torch module defines them (PEFT's keys follow "
                              "that order)")
        for j, (_, name, path, index) in enumerate(params):
            slots[path, index] = (module + ".base_layer" * (len(params) - 1 - j), name)
    return slots, errors


def _experts_to_torch(a: np.ndarray, b: np.ndarray, r: int) -> tuple[np.ndarray, np.ndarray]:
    """PEFT's ``lora_A (r·E, in)`` (row ``e·r + k``) and ``lora_B (out, r·E)`` (column ``k·E + e``)
    of per-expert factors ``a (E, *in, r)``, ``b (E, r, *out)`` (PEFT 0.21's ``ParamWrapper``)."""
    n = a.shape[0]
    big_a = np.swapaxes(a.reshape(n, -1, r), 1, 2).reshape(n * r, -1)
    return big_a, np.transpose(b.reshape(n, r, -1), (2, 1, 0)).reshape(-1, r * n)


def _experts_from_torch(big_a, big_b, n: int, in_dims, out_dims) -> tuple[dict, int | str]:
    """`_experts_to_torch`'s inverse for ``n`` experts: ``({"a", "b"}, rank)``, or ``({}, why)``."""
    if (n < 1 or big_a.ndim != 2 or big_b.ndim != 2 or not big_a.shape[0] or big_a.shape[0] % n
            or big_a.shape[0] != big_b.shape[1]):
        return {}, (f"lora_A {big_a.shape} / lora_B {big_b.shape} are no expert factors (r·E, in) / "
                    f"(out, r·E) for {n} experts")
    r = big_a.shape[0] // n
    if big_a.shape[1] != math.prod(in_dims) or big_b.shape[0] != math.prod(out_dims):
        return {}, (f"lora_A {big_a.shape} / lora_B {big_b.shape} do not fit {n} experts of "
                    f"{math.prod(in_dims)} inputs and {math.prod(out_dims)} outputs (expected "
                    f"({r * n}, {math.prod(in_dims)}) / ({math.prod(out_dims)}, {r * n}))")
    a = np.swapaxes(big_a.reshape(n, r, -1), 1, 2).reshape(n, *in_dims, r)
    b = np.transpose(big_b.reshape(-1, r, n), (2, 1, 0)).reshape(n, r, *out_dims)
    return {"a": a, "b": b}, r


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
        fits = value.shape == shape
        return value if fits else f"conv weight {value.shape} does not fit the kernel's {shape}"
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
    refuse(config, "export_peft", "export_peft")


def export_peft(directory, trainable, config: LoraConfig, *, frozen=None, module_name=None,
                base_model_name_or_path: str | None = None, conv: str | Sequence[str] = (),
                fan_in_fan_out: bool | None = None,
                experts: str | Sequence[str] | Mapping[str, str] = ()) -> None:
    """Write ``trainable`` as a PEFT LoRA adapter: ``adapter_config.json`` + ``adapter_model.safetensors``.

    ``PeftModel.from_pretrained(torch_model, directory)`` then loads it onto the torch
    model whose module names `module_name` gives. Keys, layouts and config fields are
    those of PEFT 0.21 (see the module docstring's table); each adapter's rank and
    alpha go to ``r``/``lora_alpha`` or, where they differ, ``rank_pattern``/``alpha_pattern``.
    Leaves trained in full become ``modules_to_save``. A 2-D kernel used transposed
    (``Rule(in_axes=(1,))``, e.g. GPT-2's ``(out, in)`` Conv1D kernels in Flax) exports
    as it is, and the file says ``fan_in_fan_out: true``. A stacked kernel (layers of an
    ``nn.scan``/``nnx.scan``, ``stack_axes``) becomes one PEFT module per layer, named by
    ``module_name(path, index)``, as the unrolled torch model has them; `import_peft` with
    the same ``module_name`` and ``layouts`` stacks them back. An expert kernel (``experts``)
    becomes one PEFT ``target_parameters`` entry per layer, its experts in one pair of factors.

    The two files are written into a temporary folder beside ``directory`` and moved
    into place, so a crash never leaves a config beside weights it does not describe:
    a new ``directory`` appears whole by one rename; an existing one (its other files
    are kept) is swapped for the new folder in one step where the system can
    (Linux ``renameat2(RENAME_EXCHANGE)``), so a reader sees the old pair or the new
    pair. Elsewhere the weights then the config are replaced file by file (each file
    whole, the pair not).

    An embedding adapter acts on lookups only in PEFT: a tied output head (``embed.attend``)
    that jlora adapts along with the table gets no delta there.

    Args:
      directory: folder to write (a str or `pathlib.Path`, relative or with ``~``;
        created if missing; the two files are replaced, other files in it kept).
      trainable: the adapters, as from `jlora.init` and training.
      config: the `LoraConfig` they were made with.
      frozen: the base parameters; if given, ``trainable`` is checked against them.
      module_name: PEFT module name of a leaf path: a callable ``(path, index)``, where
        ``index`` is the tuple of a stacked kernel's stack indices (``()`` for an
        unstacked kernel); a callable ``(path)``, whose name for a stacked kernel gets the
        index inserted as the default does; or a dict ``{path: name}`` (a ``{}`` in a
        stacked kernel's name takes the index; paths it lacks take the default).
        Default (`default_module_name`): drop ``params/`` and the leaf name, join with
        ``.`` (Hugging Face's Flax naming), and put a stacked kernel's index after the
        first component named ``layers``/``layer``/``blocks``/``block``/``h`` (else after
        the first component): ``params/model/layers/mlp/up/kernel`` layer 3 ->
        ``model.layers.3.mlp.up``.
      base_model_name_or_path: written to the config, as PEFT does (e.g. a hub id).
      conv: regexes (``re.fullmatch``) of the kernel paths that are convolution kernels
        ``(*window, in, out)``; their adapters are written as PEFT's Conv layout. Other
        kernels with several input axes are written as Linear with those axes flattened.
      fan_in_fan_out: the flag to write: whether the torch model's modules store their
        weights ``(in, out)`` (Conv1D). Default: ``True`` if every 2-D Linear adapter has
        ``in_axes=(1,)``, ``False`` if none has. PEFT sets it per module from the module's
        type (with a warning where it disagrees), so the factors load right either way;
        pass it when the Flax layout does not tell (e.g. a port that keeps torch
        Linear's ``(out, in)`` kernels, or a mix of both).
      experts: the kernels that stack experts, for transformers' fused expert parameters
        (Mixtral, Qwen3-MoE, GPT-OSS: ``mlp.experts.gate_up_proj`` ``(E, 2·ffn, d)``,
        ``mlp.experts.down_proj``), which PEFT adapts with ``target_parameters``: regexes
        (``re.fullmatch``) of their paths, or a dict ``{regex: torch parameter name}`` where
        the leaf is not named as the torch parameter. The last stack axis of each is the
        experts' (``stack_axes``, as `jlora.infer_layouts` finds for a batched einsum or
        ``ragged_dot``); any before it are layers, named by ``module_name`` as above. The
        torch parameter is ``module_name(path, layer)`` + ``.`` + the name. Per expert ``e``,
        PEFT's ``lora_A`` ``(r·E, in)`` holds ``aₑᵀ`` in rows ``e·r … e·r + r − 1`` and
        ``lora_B`` ``(out, r·E)`` holds ``bₑᵀ`` in columns ``e, E + e, …``. PEFT nests the
        wrappers of two parameters of one module in the order the torch module defines
        them, which its keys show (``experts.base_layer.lora_A`` is the first), so list one
        pattern per parameter in that order: ``(r".*/gate_up_proj", r".*/down_proj")``.
        PEFT refuses dropout on parameters, so a file with experts says ``lora_dropout: 0``
        (dropout only acts in training).

    Raises:
      ValueError: for what PEFT cannot represent (a nonlinearity, DyLoRA, PiSSA's residual
        base, input axes that are not the kernel's leading axes (after its stack axes)
        except a 2-D ``(out, in)`` kernel, a stacked conv kernel), 2-D kernels both
        transposed and not without ``fan_in_fan_out``, two leaves (or two layers) that
        would share a PEFT key, naming both, and expert kernels that PEFT cannot adapt
        (no stack axis, not 2-D per expert, DoRA, ``fan_in_fan_out``).
      FileExistsError: ``directory`` is a file.

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
    expert_patterns = _expert_patterns(experts)
    if frozen is None:
        targets = Plan.of_trainable(config, trainable, "export_peft")
    else:
        targets = Plan.of_base(config, frozen)
    values = targets.read(trainable)
    # Arrays split across processes are gathered whole (a collective: every process calls export_peft).
    values = jax.tree.map(lambda x: x if getattr(x, "is_fully_addressable", True)
                          else multihost_utils.process_allgather(x, tiled=True), values)

    tensors: dict[str, np.ndarray] = {}
    owner: dict[str, str] = {}  # PEFT key -> leaf path, to catch two leaves on one key
    ranks, alphas, full_modules, errors = {}, {}, set(), []
    linear_2d: dict[str, bool] = {}  # 2-D Linear adapter path -> used transposed (in_axes=(1,))
    expert_kernels: dict[str, tuple[int, ...]] = {}  # expert kernel path -> its layer stack shape

    def put(key: str, value, path: str) -> None:
        key = PREFIX + key
        if key in owner:
            errors.append(f"{owner[key]} and {path} both map to the PEFT key {key!r}; tell them apart with "
                          "module_name")
        owner[key] = path
        tensors[key] = np.ascontiguousarray(value)

    for path, t in targets.items():
        is_conv = any(re.fullmatch(p, path) for p in conv_patterns)
        if not t.adapted:
            try:
                full_modules.add(_module_of(namer, path))
            except ValueError as e:
                errors.append(str(e))
                continue
            put(peft_name(namer, path), _leaf_to_torch(path, np.asarray(values[path]), is_conv), path)
            continue
        lay = t.layout
        stack, layer_shape, in_axes = one_layer(lay, t.shape)
        if _expert_of(expert_patterns, path) is not None:
            why = ""
            if not stack:
                why = "it has no stack axis for its experts (stack_axes, as jlora.infer_layouts finds)"
            elif len(layer_shape) != 2:
                why = f"one expert's kernel is {layer_shape}, and PEFT's expert parameters are (E, out, in)"
            elif config.dora:
                why = "DoRA is not defined on PEFT's parameter targets"
            elif is_conv:
                why = "it is a conv kernel"
            if why:
                errors.append(f"{path} (shape {t.shape}) is no expert kernel PEFT can adapt: {why}")
            else:
                expert_kernels[path] = stack[:-1]
            continue
        transposed = len(layer_shape) == 2 and in_axes == (1,)
        if in_axes != tuple(range(len(in_axes))) and not transposed:
            errors.append(
                f"{path} has in_axes={lay.in_axes}, not its leading axes"
                f"{' after its stack axes' if stack else ''}, so it is no torch Linear weight (in, out) "
                "flattened; PEFT's factors would not line up with the kernel. Use a kernel whose input axes "
                "come first (a 2-D (out, in) kernel with in_axes=(1,) exports as it is)."
            )
            continue
        if len(layer_shape) == 2 and not t.embedding:
            linear_2d[path] = transposed
        if is_conv and (stack or len(layer_shape) < 3 or lay.out_axes != (len(t.shape) - 1,)):
            errors.append(f"{path} (shape {t.shape}, in_axes={lay.in_axes}) was marked conv but is no Flax "
                          "conv kernel (*window, in, out) with its input axes first; fix the conv patterns.")
            continue
        a, b, m = (None if x is None else np.asarray(x) for x in values[path])
        r = t.rank
        for index in np.ndindex(*stack):  # one PEFT module per layer of a stacked kernel; () if unstacked
            try:
                module = _module_of(namer, path, index)
            except ValueError as e:
                errors.append(str(e))
                continue
            a_i, b_i, m_i = a[index], b[index], None if m is None else m[index]
            where = f"{path} layer {index}" if index else path
            if is_conv:  # a (*k, in, r) -> (r, in, *k); b (r, out) -> (out, r, 1, ..); m -> (1, out, 1, ..)
                n = a_i.ndim - 1
                ones = (1,) * (n - 1)
                big_a, big_b = np.transpose(a_i, (n, n - 1, *range(n - 1))), b_i.T.reshape(-1, r, *ones)
                big_m = None if m_i is None else m_i.reshape(1, -1, *ones)
            else:
                big_a, big_b = a_i.reshape(-1, r).T, b_i.reshape(r, -1).T
                big_m = None if m_i is None else m_i.reshape(-1)
            linear = ("lora_A.weight", "lora_B.weight")
            names = ("lora_embedding_A", "lora_embedding_B") if t.embedding else linear
            put(f"{module}.{names[0]}", big_a, where)
            put(f"{module}.{names[1]}", big_b, where)
            if big_m is not None:
                put(f"{module}.lora_magnitude_vector", big_m, where)
            ranks[module] = r
            alphas[module] = t.alpha
    slots, slot_errors = _expert_slots(namer, expert_patterns, expert_kernels)
    errors += slot_errors
    host = {path: [np.asarray(x) for x in values[path][:2]] for path in expert_kernels}  # once per kernel
    for (path, index), (module, param) in slots.items():
        t = targets[path]
        a, b = host[path]
        big_a, big_b = _experts_to_torch(a[index], b[index], t.rank)
        where = f"{path} layer {index}" if index else path
        put(f"{module}.lora_A.weight", big_a, where)
        put(f"{module}.lora_B.weight", big_b, where)
        ranks[param], alphas[param] = t.rank, t.alpha  # PEFT's patterns match the parameter's name
    if not errors:
        clash = sorted({param.rsplit(".", 1)[0] for _, param in slots.values()} & (set(ranks) | full_modules))
        if clash:
            errors.append(f"modules {clash} hold adapted expert parameters and are also adapted or "
                          "trained in full as modules; PEFT wraps a module one way. Drop one of them.")
    if not errors:
        shared = sorted(full_modules & set(ranks))
        if shared:
            errors.append(f"modules {shared} are both adapted and (partly) trained in full; PEFT adapts a "
                          "module or saves it whole, not both. Drop their leaves from train_in_full or from "
                          "targets.")
    if fan_in_fan_out is None and len(set(linear_2d.values())) > 1:
        flipped = sorted(p for p, tr in linear_2d.items() if tr)
        plain = sorted(p for p, tr in linear_2d.items() if not tr)
        errors.append(
            f"2-D kernels used transposed (in_axes=(1,)): {flipped}, beside kernels that are not: {plain}. "
            "PEFT's adapter_config.json has one fan_in_fan_out flag; pass fan_in_fan_out=True if the torch "
            "modules are Conv1D (weights (in, out)), False if they are Linear. The tensors are the same "
            "either way."
        )
    elif fan_in_fan_out is None:
        fan_in_fan_out = any(linear_2d.values())
    elif not isinstance(fan_in_fan_out, bool):
        raise TypeError(f"export_peft: fan_in_fan_out must be True, False or None, got {fan_in_fan_out!r}.")
    if fan_in_fan_out and expert_kernels:
        errors.append("fan_in_fan_out (passed, or read off 2-D kernels used transposed) beside expert "
                      "kernels: PEFT refuses it on parameter targets; export the experts' adapters and the "
                      "others separately")
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
        target_modules=sorted(set(ranks) - {param for _, param in slots.values()}),
        target_parameters=sorted(param for _, param in slots.values()) or None,
        modules_to_save=sorted(full_modules) or None,
        use_rslora=config.rslora,
        use_dora=config.dora,
        lora_dropout=0.0 if slots else float(config.dropout),
        fan_in_fan_out=fan_in_fan_out,
    )
    write_folder(user_path(directory), {
        WEIGHTS_FILE: safetensors.numpy.save(tensors, metadata={"format": "pt"}),
        CONFIG_FILE: (json.dumps(peft_config, indent=2, sort_keys=True) + "\n").encode(),
    }, "export_peft")


# --------------------------------------------------------------------------- import


def _read_config(directory: Path) -> dict:
    path = directory / CONFIG_FILE
    if not path.is_file():
        raise FileNotFoundError(f"import_peft: {path} does not exist; a PEFT adapter folder holds "
                                f"{CONFIG_FILE} and {WEIGHTS_FILE} (PeftModel.save_pretrained writes both).")
    try:
        cfg = json.loads(path.read_bytes().decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
        raise ValueError(f"import_peft: {path} is not valid JSON ({e}); PeftModel.save_pretrained writes it, "
                         "or write it again with export_peft.") from None
    if not isinstance(cfg, dict):
        raise ValueError(f"import_peft: {path} holds a JSON {type(cfg).__name__}, not an object of PEFT's "
                         "LoraConfig fields ({\"peft_type\": \"LORA\", \"r\": 8, ...}).")
    _check_fields(path, cfg)
    if cfg.get("peft_type") != "LORA":
        raise ValueError(f"import_peft: {path} has peft_type={cfg.get('peft_type')!r}; jlora reads LoRA "
                         "adapters (peft_type 'LORA') only.")
    unsupported = [f"{k}={v!r}" for k, v in sorted(cfg.items())
                   if k not in _READ | _IGNORED and v not in (None, False, "", [], {})]
    init = cfg.get("init_lora_weights")
    if isinstance(init, str) and init.lower().startswith(_BASE_CHANGING_INITS):
        unsupported.append(
            f"init_lora_weights={init!r} (it changed the base weights too; convert it to plain LoRA with "
            "PEFT's save_pretrained(..., path_initial_model_for_weight_conversion=...))"
        )
    if unsupported:
        raise ValueError(
            f"import_peft: {path} uses PEFT features jlora does not implement: {', '.join(unsupported)}. "
            "jlora reads plain LoRA, rsLoRA, DoRA, rank/alpha patterns and modules_to_save."
        )
    return cfg


def _bad_field(path: Path, field: str, value, want: str) -> ValueError:
    return ValueError(f"import_peft: {path}: field {field!r} is {json.dumps(value)[:80]}, expected {want}; "
                      "fix the field (or write the adapter again).")


def _is_number(x) -> bool:
    return isinstance(x, int | float) and not isinstance(x, bool) and math.isfinite(x)


def _check_fields(path: Path, cfg: dict) -> None:
    """Types and ranges of the fields import reads; one error naming the file and the field."""
    def positive_int(x):
        return isinstance(x, int) and not isinstance(x, bool) and x > 0

    def positive_number(x):
        return _is_number(x) and x > 0

    checks = {
        "peft_type": (lambda x: isinstance(x, str), "a string such as \"LORA\""),
        "r": (positive_int, "a positive integer (the rank)"),
        "lora_alpha": (positive_number, "a finite number > 0"),
        "use_rslora": (lambda x: isinstance(x, bool), "true or false"),
        "use_dora": (lambda x: isinstance(x, bool), "true or false"),
        "fan_in_fan_out": (lambda x: isinstance(x, bool), "true or false"),
        "lora_dropout": (lambda x: _is_number(x) and 0 <= x < 1, "a rate in [0, 1)"),
        "init_lora_weights": (lambda x: isinstance(x, bool | str), "true, false or a scheme name"),
        "target_parameters": (lambda x: isinstance(x, list) and all(isinstance(n, str) for n in x),
                              "a list of parameter names"),
    }
    for field, (ok, want) in checks.items():  # r and lora_alpha may be left out (PEFT's 8), never null
        if field in cfg and (cfg[field] is not None or field in ("r", "lora_alpha")) and not ok(cfg[field]):
            raise _bad_field(path, field, cfg[field], want)
    for field, ok, want in (("rank_pattern", positive_int, "positive integers"),
                            ("alpha_pattern", positive_number, "finite numbers > 0")):
        patterns = cfg.get(field)
        if patterns is None:
            continue
        if not isinstance(patterns, dict):
            raise _bad_field(path, field, patterns, f"an object {{module name pattern: value}} of {want}")
        for key, value in patterns.items():
            if not ok(value):
                raise _bad_field(path, f"{field}[{key!r}]", value, want)
            try:
                re.compile(key)
            except re.error as e:
                raise ValueError(f"import_peft: {path}: {field} key {key!r} is not a valid regex ({e}); "
                                 "fix the field.") from None


def _read_tensors(directory: Path) -> dict[str, np.ndarray]:
    path = directory / WEIGHTS_FILE
    if not path.is_file():
        if (directory / PICKLE_FILE).is_file():
            raise ValueError(
                f"import_peft: {directory} holds {PICKLE_FILE}, a pickled torch file, and no {WEIGHTS_FILE}. "
                "Unpickling can run arbitrary code, so jlora does not open it. Convert it once, where you "
                "trust the file, with torch and safetensors:\n    python -c \"import torch; from "
                f"safetensors.torch import save_file; save_file(torch.load('{directory / PICKLE_FILE}', "
                f"weights_only=True), '{path}', metadata={{'format': 'pt'}})\""
            )
        raise FileNotFoundError(f"import_peft: {path} does not exist; PeftModel.save_pretrained writes it.")
    loader = safetensors.numpy
    try:
        tensors = loader.load_file(str(path))
    except OSError as e:
        if not path.is_file():
            raise
        raise ValueError(f"import_peft: {path} cannot be read as safetensors ({e}).") from None
    except Exception as e:  # SafetensorError and friends: a truncated or corrupt file
        raise ValueError(f"import_peft: {path} is not a valid safetensors file ({type(e).__name__}: {e}); "
                         "the file is truncated or corrupt: copy or save it again.") from None
    bad = [f"{k} ({v.dtype}, shape {v.shape})" for k, v in sorted(tensors.items())
           if not (np.issubdtype(v.dtype, np.floating) or v.dtype.name == "bfloat16")]
    if bad:
        raise ValueError(f"import_peft: {path} holds tensors that are not floating point: {', '.join(bad)}; "
                         "LoRA factors and trained weights are floats.")
    return tensors


def _split_key(key: str) -> tuple[str, str | None, str]:
    """``(module, factor, rest)``: factor 'a', 'b', 'm', or None for a plain tensor (rest: 'mod.param')."""
    rest = key[len(PREFIX):]
    for suffix, factor in _SUFFIXES.items():
        if rest.endswith(suffix):
            return rest[: -len(suffix)], factor, rest
    return "", None, rest


def _adapter_from_torch(path: str, shape, f: dict, rank: int, in_axes) -> tuple[dict, str | None]:
    """jlora's ``a``, ``b`` (and ``m``) for a kernel of ``shape`` from PEFT's factors.

    ``in_axes`` is the kernel's input side for a Linear adapter (None: jlora's default).
    """
    big_a, big_b, m = f["a"], f["b"], f.get("m")
    if big_a.ndim < 2 or big_b.ndim < 2 or big_a.ndim != big_b.ndim:
        return {}, f"lora_A {big_a.shape} / lora_B {big_b.shape} are no pair of Linear (2-D) or conv factors"
    if big_a.ndim >= 3:  # Conv: A (r, in, *k), B (out, r, 1, ..)
        n = big_a.ndim
        a = np.transpose(big_a, (*range(2, n), 1, 0))
        ones = (1,) * (n - 2)
        if len(shape) != n or a.shape != (*shape[:-1], rank) or big_b.shape != (shape[-1], rank, *ones):
            return {}, f"conv lora_A {big_a.shape} / lora_B {big_b.shape} do not fit the kernel's {shape}"
        b = big_b.reshape(shape[-1], rank).T
        out_dims = (shape[-1],)
    else:
        if len(shape) < 2:
            return {}, f"the leaf's shape {shape} is no kernel"
        layout = default_layout(path, len(shape), in_axes)
        in_dims, out_dims = tuple(shape[i] for i in layout.in_axes), tuple(shape[i] for i in layout.out_axes)
        if big_a.shape != (rank, math.prod(in_dims)) or big_b.shape != (math.prod(out_dims), rank):
            hint = ""
            if len(shape) == 2 and (big_a.shape[1], big_b.shape[0]) == shape[::-1] and in_axes != (1,):
                hint = (". They fit the kernel used transposed, (out, in) with in_axes=(1,): the torch "
                        "module is a Conv1D (fan_in_fan_out) or the port keeps (out, in) kernels; pass "
                        "layouts=jlora.infer_layouts(...) (or a config with Rule(pattern=..., in_axes=(1,)))")
            elif len(shape) == 2 and (big_a.shape[1], big_b.shape[0]) == shape and in_axes == (1,):
                hint = (". They fit the kernel as (in, out), in_axes=(0,): fan_in_fan_out: true makes 2-D "
                        "kernels (out, in) unless layouts say otherwise (PEFT sets the flag per module, so a "
                        "torch Linear may sit beside Conv1Ds); pass layouts=jlora.infer_layouts(...) or a "
                        "config with Rule(pattern=..., in_axes=(0,)) for it")
            return {}, (f"lora_A {big_a.shape} / lora_B {big_b.shape} do not fit the kernel's {shape} "
                        f"(expected ({rank}, {math.prod(in_dims)}) / ({math.prod(out_dims)}, {rank})){hint}")
        a, b = big_a.T.reshape(*in_dims, rank), big_b.T.reshape(rank, *out_dims)
    out = {"a": a, "b": b}
    if m is not None:
        if m.size != math.prod(out_dims):
            return {}, (f"lora_magnitude_vector {m.shape} does not fit the kernel's {math.prod(out_dims)} "
                        "output units")
        out["m"] = m.reshape(out_dims)
    return out, None


def import_peft(directory, params, *, module_name=None, layouts: LoraConfig | None = None,
                experts: str | Sequence[str] | Mapping[str, str] = ()):
    """Read a PEFT LoRA adapter folder as jlora's ``(frozen, trainable, config)``.

    Every tensor of ``adapter_model.safetensors`` is placed on the leaf of ``params``
    whose PEFT name (`module_name` applied to every leaf path) it carries: LoRA factors
    become that kernel's adapter (transposed, see the module docstring's table), other
    tensors (``modules_to_save``, trained biases) become leaves trained in full.

    Args:
      directory: a folder written by ``PeftModel.save_pretrained`` (or `export_peft`).
      params: the Flax base parameters (Linen variables or NNX state), already
        converted from the torch base model.
      module_name: as for `export_peft` (the same mapping reads back what it wrote).
      layouts: a `LoraConfig` whose rules say which axes of each kernel are its input
        (``Rule(in_axes=...)``) and which are stack axes (``stack_axes``: a scanned
        kernel, whose layers are read from one PEFT module each, named by
        ``module_name(path, index)``), e.g. the one `jlora.infer_layouts` returns; only the
        ``in_axes``/``stack_axes`` of rules that match a kernel are read; ``in_axes`` win over
        the file's ``fan_in_fan_out`` (PEFT sets that flag per module from the module's type, so
        one model may mix Conv1D and Linear). Where they leave ``in_axes`` unset a
        Linear adapter takes jlora's default layout, or ``in_axes=(1,)`` for a 2-D
        kernel when the file says ``fan_in_fan_out: true`` (torch Conv1D weights
        ``(in, out)``, Flax kernels ``(out, in)``). Factor shapes that fit neither are
        an error; a square kernel's layout is taken as given (``wrap`` checks it
        against the model's ops).
      experts: as for `export_peft`: the kernels whose last stack axis (from ``layouts``)
        holds the experts of a PEFT ``target_parameters`` entry, one pattern per torch
        parameter in the order the torch module defines them.

    Returns:
      ``(frozen, trainable, config)``: ``frozen`` is ``params``; ``trainable`` holds the
      factors in the file's dtype (full leaves in their leaf's dtype); ``config`` has one
      exact-path `Rule` per distinct (rank, alpha, in_axes), so every module keeps PEFT's
      ``lora_alpha / r`` (or ``/ sqrt(r)``), plus ``rslora``, ``dora``, ``dropout`` and
      ``train_in_full``. ``jlora.wrap(apply_fn, config)(frozen, trainable, ...)`` then
      computes what the PEFT model computes.

    Raises:
      FileNotFoundError: the folder or one of its two files is missing.
      ValueError: everything else about the files, naming the file and the field or
        key: ``adapter_config.json`` that is not a JSON object or has a field of the
        wrong type or range; an ``adapter_model.safetensors`` that is truncated, corrupt
        or holds non-float tensors; a pickled ``adapter_model.bin`` (unpickling can run
        code); a PEFT feature jlora does not implement; keys that map to no leaf (all
        listed at once); tensors whose shapes do not fit their leaves (with the layout
        they would fit). No other exception escapes for any file content (a fuzz test
        holds this).
      TypeError: ``layouts`` or ``module_name`` of the wrong type.

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
    directory = user_path(directory)
    if layouts is not None and not isinstance(layouts, LoraConfig):
        raise TypeError("import_peft: layouts must be a jlora.LoraConfig (e.g. from jlora.infer_layouts), "
                        f"got {type(layouts).__name__}.")
    namer = _namer(module_name)
    expert_patterns = _expert_patterns(experts)
    peft = _read_config(directory)
    tensors = _read_tensors(directory)
    leaves = flatten(params)
    by_name: dict[str, list[tuple[str, tuple[int, ...]]]] = {}  # "module.param" -> (leaf path, layer)
    expert_kernels, errors = {}, []  # expert kernel path -> its layer stack shape
    for path, leaf in leaves.items():
        stack = stack_shape(layouts, path, np.shape(leaf))
        if _expert_of(expert_patterns, path) is not None:
            if stack:
                expert_kernels[path] = stack[:-1]
            else:
                errors.append(f"{path}: an experts pattern matches it, but layouts give it no stack axis for "
                              "its experts; pass layouts=jlora.infer_layouts(...) or a Rule with stack_axes")
            continue
        for index in np.ndindex(*stack):  # a stacked (scanned) kernel: one PEFT module per layer
            try:
                by_name.setdefault(peft_name(namer, path, index), []).append((path, index))
            except ValueError:  # a leaf the mapping leaves unnamed: no key can land on it
                pass
    slots, slot_errors = _expert_slots(namer, expert_patterns, expert_kernels)
    errors += slot_errors
    expert_at = {module: (param, path, index) for (path, index), (module, param) in slots.items()}

    r, alpha = peft.get("r", 8), float(peft.get("lora_alpha", 8))  # PEFT's defaults
    rank_pattern, alpha_pattern = peft.get("rank_pattern") or {}, peft.get("alpha_pattern") or {}
    use_dora = bool(peft.get("use_dora", False))
    transposed = bool(peft.get("fan_in_fan_out", False))
    factors: dict[str, dict[str, np.ndarray]] = {}  # module -> {"a", "b", "m"}
    module_keys: dict[str, list[str]] = {}
    full: dict[str, np.ndarray] = {}
    unmapped = []
    for key in sorted(tensors):
        if not key.startswith(PREFIX):
            errors.append(f"{key}: not a PEFT LoRA key (they start with {PREFIX!r})")
            continue
        module, factor, rest = _split_key(key)
        if factor is not None:
            factors.setdefault(module, {})[factor] = tensors[key]
            module_keys.setdefault(module, []).append(key)
        elif ".lora_" in rest or rest.startswith("lora_"):
            errors.append(f"{key}: a tensor of a LoRA variant jlora does not implement (it reads lora_A, "
                          "lora_B, lora_embedding_A/B and lora_magnitude_vector)")
        else:
            full[rest] = tensors[key]

    def leaf_for(name: str, keys: list[str]) -> tuple[str, tuple[int, ...]] | None:
        found = by_name.get(name, [])
        if len(found) > 1:
            listed = [f"{p} layer {i}" if i else p for p, i in found]
            errors.append(f"{PREFIX}{name}: the leaves {listed} all map to {name!r}; tell them apart with "
                          "module_name")
        elif not found:
            unmapped.extend(keys)
        return found[0] if len(found) == 1 else None

    adapters, groups, layers = {}, {}, {}
    for module, f in factors.items():
        key = PREFIX + module
        if "a" not in f or "b" not in f:
            errors.append(f"{key}: has {sorted(f)} of PEFT's factors, needs both lora_A and lora_B")
            continue
        if ("m" in f) != use_dora:
            has = "a" if "m" in f else "no"
            errors.append(f"{key}: {has} lora_magnitude_vector, but use_dora={use_dora}")
            continue
        if module in expert_at:
            param, path, index = expert_at[module]
            if use_dora:
                errors.append(f"{key}: DoRA on the expert parameter {param}; PEFT does not define it there")
                continue
            full_shape = tuple(np.shape(leaves[path]))
            rule = layouts.rule_for(path)
            (*_, n), shape, in_axes = one_layer(
                default_layout(path, len(full_shape), rule.in_axes, rule.stack_axes), full_shape)
            in_dims = tuple(shape[i] for i in in_axes)
            out_dims = tuple(d for i, d in enumerate(shape) if i not in in_axes)
            adapter, rank = _experts_from_torch(f["a"], f["b"], n, in_dims, out_dims)
            want = _pattern_value(rank_pattern, param, r)
            if isinstance(rank, str) or rank != want:
                why = (rank if isinstance(rank, str)
                       else f"its factors have rank {rank}, r/rank_pattern give {want}")
                errors.append(f"{key} -> {path}{f' layer {index}' if index else ''} ({param}): {why}")
                continue
            group = (rank, float(_pattern_value(alpha_pattern, param, alpha)))
            layers.setdefault(path, {})[index] = (adapter, group)
            continue
        if use_dora and any(k.endswith("lora_embedding_A") for k in module_keys[module]):
            errors.append(f"{key}: DoRA on an embedding; jlora implements DoRA for Linear and Conv kernels "
                          "only")
            continue
        found = leaf_for(f"{module}.weight", module_keys[module])
        if found is None:
            continue
        path, index = found
        if f["a"].ndim < 2:
            errors.append(f"{key}: lora_A has shape {f['a'].shape}; PEFT's factors have a rank axis and an "
                          "input axis")
            continue
        rank = int(f["a"].shape[0])
        want = _pattern_value(rank_pattern, module, r)
        if rank != want:
            errors.append(f"{key}: lora_A has rank {rank}, but r/rank_pattern give {want}")
            continue
        shape = tuple(np.shape(leaves[path]))
        embedding = any(k.endswith("lora_embedding_A") for k in module_keys[module])
        rule = None if layouts is None else layouts.rule_for(path)
        in_axes = None if rule is None else rule.in_axes
        stack_axes = () if rule is None else tuple(rule.stack_axes)
        if stack_axes:  # one layer of a stacked kernel: its shape and input axes without the stack axes
            layout = default_layout(path, len(shape), in_axes, stack_axes)
            _, shape, in_axes = one_layer(layout, shape)
        if in_axes is None and transposed and len(shape) == 2 and f["a"].ndim == 2 and not embedding:
            in_axes = (1,)  # torch Conv1D (in, out) -> Flax kernel (out, in)
        adapter, error = _adapter_from_torch(path, shape, f, rank, in_axes)
        if error:
            errors.append(f"{key} -> {path}{f' layer {index}' if index else ''}: {error}")
            continue
        group = (rank, float(_pattern_value(alpha_pattern, module, alpha)))
        if stack_axes:
            layers.setdefault(path, {})[index] = (adapter, group)
            continue
        adapters[path] = adapter
        default = default_layout(path, len(shape))
        if in_axes is not None and default_layout(path, len(shape), in_axes) == default:
            in_axes = None  # the default: no need to spell it out
        groups.setdefault((*group, in_axes, ()), []).append(path)
    for path, got in layers.items():  # stack each stacked kernel's layers back into its layout
        rule = layouts.rule_for(path)
        stack = expert_kernels.get(path, stack_shape(layouts, path, np.shape(leaves[path])))
        stacked, missing = restack({i: adapter for i, (adapter, _) in got.items()}, stack)
        kinds = {g for _, g in got.values()}
        if missing:
            more = " ..." if len(missing) > 5 else ""
            errors.append(f"{path}: the file has {len(got)} of its {len(missing) + len(got)} layers; missing "
                          f"layers {missing[:5]}{more} (their PEFT modules, e.g. "
                          f"{_module_of(namer, path, missing[0])})")
            continue
        if len(kinds) > 1:
            errors.append(f"{path}: its layers have different ranks/alphas {sorted(kinds)}; one stacked "
                          "kernel takes one rank and alpha")
            continue
        adapters[path] = stacked
        layout = default_layout(path, len(np.shape(leaves[path])), rule.in_axes, rule.stack_axes)
        groups.setdefault((*kinds.pop(), layout.in_axes, layout.stack_axes), []).append(path)

    trained = {}
    for name, value in full.items():
        found = leaf_for(name, [PREFIX + name])
        if found is None:
            continue
        path, _ = found
        leaf = leaves[path]
        got = _leaf_from_torch(path, tuple(np.shape(leaf)), value)
        if isinstance(got, str):
            errors.append(f"{PREFIX + name} -> {path}: {got}")
        else:
            trained[path] = jnp.asarray(got, dtype=leaf.dtype)
    if unmapped:
        known = sorted(by_name)
        close = difflib.get_close_matches(unmapped[0][len(PREFIX):], known, 3, 0.3) or known[:3]
        errors.insert(0, f"{len(unmapped)} adapter keys map to no leaf of params: "
                         f"{', '.join(sorted(unmapped))}. "
                         f"Names params gives (module.param), e.g. {', '.join(close)}; pass module_name "
                         "(leaf path -> PEFT module name) to match the torch model's names"
                         + (f"; the file adapts the parameters {peft['target_parameters'][:4]}: pass experts="
                            "(one regex per expert kernel, in the torch module's parameter order) and layouts"
                            if peft.get("target_parameters") and not slots else ""))
    if errors:
        raise ValueError(f"import_peft: cannot read {directory}:\n  " + "\n  ".join(errors))

    dtypes = {x.dtype for ad in adapters.values() for x in ad.values()}
    one = dtypes.pop() if len(dtypes) == 1 else None
    dtype = one if one is not None and jnp.issubdtype(one, jnp.floating) else np.float32
    dtype = jax.dtypes.canonicalize_dtype(dtype)  # float64 factors are float32 unless jax_enable_x64
    rules = tuple(
        Rule(pattern="|".join(re.escape(p) for p in sorted(paths)), rank=None if rank == r else rank,
             alpha=None if a == alpha else a, in_axes=in_axes, stack_axes=stack_axes)
        for (rank, a, in_axes, stack_axes), paths in sorted(
            groups.items(), key=lambda kv: (kv[0][:2], kv[0][2] or (), kv[0][3]))
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
        Plan.of_base(config, params).read(trainable)
    except ValueError as e:
        raise ValueError(f"import_peft: {directory} does not fit jlora's adapters on params:\n{e}") from None
    return params, trainable, config
