"""One table of what each LoRA variant allows, and the one wording of every refusal.

A variant is a property of a `LoraConfig` (DoRA, DyLoRA, a nonlinearity, PiSSA's
initialisation, rsLoRA). Each declares, per operation, why it cannot take part and
what to do instead; an operation it does not name is allowed. Every verb asks
`refuse` (or `refusals`) instead of testing config fields itself, so what a variant
allows is decided and worded here alone.

>>> from jlora._config import LoraConfig
>>> [v.name for v in active(LoraConfig(rank=2, targets="w", dora=True, rslora=True))]
['DoRA', 'rsLoRA']
>>> allowed(LoraConfig(rank=2, targets="w", dylora="plain"), "merge")
True
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping

from jlora._config import LoraConfig

# What a variant may be asked to do (the keys of `Variant.refuses`).
OPERATIONS = (
    "merge",  # fold the delta into W (merge, strategy='merge', fallbacks of ops without a factored rule)
    "unmerge",  # subtract it again
    "combine",  # jlora.combine(method='sum'/'svd'): a sum of low-rank deltas
    "bank",  # jlora.stack / lora_weights / lora_index
    "export_peft",
    "export_gguf",  # a llama.cpp LoRA adapter
    "fold_scale",  # save(fold_scale=True)
    "transposed",  # a kernel used as x·Wᵀ (a tied embedding head)
    "ragged_dot",  # experts through ragged_dot
    "embedding",  # an embedding table
    "pissa_init",  # init='pissa' (an SVD of each full-precision kernel)
)


@dataclasses.dataclass(frozen=True)
class Variant:
    """A LoRA variant: when a config has it, and ``{operation: why it is refused, and the fix}``."""

    name: str
    of: Callable[[LoraConfig], bool]
    refuses: Mapping[str, str]

    def __post_init__(self):
        unknown = set(self.refuses) - set(OPERATIONS)
        if unknown:
            raise ValueError(f"variant {self.name}: unknown operations {sorted(unknown)}")


VARIANTS = (
    Variant("nonlinearity", lambda c: not c.linear, {
        "merge": "the delta s·f(x·a)·b is no longer a linear map of x, so no merged weight W' with x·W' = "
                 "x·W + s·f(x·a)·b exists. Serve with jlora.wrap(..., strategy='factored'), or train with "
                 "nonlinearity='identity'.",
        "combine": "its branch s·f(x·a)·b is not a matrix, so a sum of such deltas is not an adapter; use "
                   "method='average' to average the factors of adapters of one kind, or serve them side by "
                   "side as a bank (jlora.stack).",
        "export_peft": "it makes the delta s·f(x·a)·b; PEFT's LoRA is linear (s·x·a·b) and has no field for "
                       "f. Train with nonlinearity='identity' to export, or save with jlora.save (which "
                       "keeps f).",
        "export_gguf": "it makes the delta s·f(x·a)·b; llama.cpp applies s·x·a·b. Train with "
                       "nonlinearity='identity' to export, or merge and convert the merged model.",
        "transposed": "with a nonlinearity the adapter defines no transposed map. Adapt the kernel only "
                      "where it is used forward, or drop the nonlinearity.",
    }),
    Variant("DoRA", lambda c: c.dora, {
        "unmerge": "a DoRA merge rescales every output unit by m/‖W + s·a@b‖, which depends on the base "
                   "weight that unmerge is asked to recover; keep the frozen base instead of unmerging.",
        "combine": "its weight m·(W + s·a@b)/‖W + s·a@b‖ differs from W by a full-rank matrix, not s·a@b, so "
                   "no sum of low-rank deltas reproduces it (merge it with jlora.merge, or use "
                   "method='average' over DoRA adapters of one initialisation).",
        "bank": "DoRA's magnitude rescales the whole output of its own adapter, so adapters cannot share a "
                "bank; merge them first.",
        "transposed": "DoRA rescales output units, which a transposed use (x·Wᵀ) does not have. Adapt the "
                      "kernel only where it is used forward, or set dora=False.",
        "ragged_dot": "DoRA is not defined for experts consumed by ragged_dot. Set dora=False.",
        "export_gguf": "llama.cpp's adapters hold lora_a and lora_b only, no magnitude vector; merge the "
                       "model (jlora.merge) and convert that, or set dora=False.",
        "embedding": "DoRA rescales a layer's output units and is not defined here for embedding tables; "
                     "exclude them from targets or set dora=False.",
    }),
    Variant("DyLoRA", lambda c: c.dylora is not None, {
        "bank": "DyLoRA's scale alpha/k depends on a rank chosen at run time, so its adapters cannot share a "
                "bank; jlora.truncate them to one rank first.",
        "export_peft": "PEFT has no DyLoRA. Cut the adapter to one rank first with "
                       "trainable_k, config_k = jlora.truncate(trainable, config, rank=k) and export that.",
        "export_gguf": "llama.cpp has no DyLoRA. Cut the adapter to one rank first with "
                       "trainable_k, config_k = jlora.truncate(trainable, config, rank=k) and export that.",
        "fold_scale": "its scale alpha/k depends on the rank k chosen at run time, so no single factor folds "
                      "into b. Save with fold_scale=False, or jlora.truncate it to a fixed rank first.",
    }),
    Variant("PiSSA", lambda c: c.init == "pissa", {
        "combine": "its a@b holds W's top singular part and its frozen base is the residual W - s·a0@b0, so "
                   "its delta is not relative to the shared base; merge it with jlora.merge and use the "
                   "difference to the original params instead.",
        "export_peft": "it acts on the SVD residual stored in frozen, not on the pretrained weights a PEFT "
                       "user loads; export the merged model (jlora.merge) instead.",
        "export_gguf": "it acts on the SVD residual stored in frozen, not on the base GGUF's weights; export "
                       "the merged model (jlora.merge) instead.",
    }),
    Variant("rsLoRA", lambda c: c.rslora, {}),
    # A property of the params, not the config: the verbs that see a QArray ask `reason` for it.
    Variant("quantized base", lambda c: False, {
        "unmerge": "subtracting the adapter from a re-quantized merge cannot recover the base (the rounding "
                   "is not invertible). Keep the quantized frozen base instead.",
        "pissa_init": "init='pissa' takes the SVD of each full-precision kernel. Initialise on the "
                      "full-precision params, then quantize the residual: frozen, trainable = "
                      "jlora.init(key, params, config); frozen = jlora.quantize(frozen, config).",
    }),
)
BY_NAME = {v.name: v for v in VARIANTS}


def active(config: LoraConfig) -> list[Variant]:
    """The variants ``config`` has."""
    return [v for v in VARIANTS if v.of(config)]


def describe(name: str, config: LoraConfig | None = None) -> str:
    """How a refusal names the variant: the config field that turns it on, with its value."""
    if config is not None and name == "nonlinearity":
        return f"nonlinearity={config.nonlinearity!r}"
    if config is not None and name == "DyLoRA":
        return f"DyLoRA (dylora={config.dylora!r})"
    return {"PiSSA": "init='pissa'"}.get(name, name)


def reason(name: str, operation: str, config: LoraConfig | None = None) -> str:
    """``"<variant>: <why and the fix>"`` for one refusal of the table."""
    return f"{describe(name, config)}: {BY_NAME[name].refuses[operation]}"


def refusals(config: LoraConfig, operation: str) -> list[str]:
    """Every refusal of ``operation`` by a variant of ``config`` (empty: allowed)."""
    if operation not in OPERATIONS:
        raise ValueError(f"unknown operation {operation!r}; one of {OPERATIONS}")
    return [reason(v.name, operation, config) for v in active(config) if operation in v.refuses]


def allowed(config: LoraConfig, operation: str) -> bool:
    return not refusals(config, operation)


def refuse(config: LoraConfig, operation: str, who: str) -> None:
    """Raise ValueError, starting with ``who``, if a variant of ``config`` refuses ``operation``."""
    found = refusals(config, operation)
    if found:
        raise ValueError(f"{who}: " + "\n  ".join(found))
