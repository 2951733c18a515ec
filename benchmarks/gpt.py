"""The reference model of the benchmarks: a small GPT-style decoder in Flax Linen.

d_model 512, 4 layers, 8 heads, vocab 4096, sequence 128, batch 4 (DESIGN.md). The
attention is Flax's own `nn.MultiHeadDotProductAttention`, so the q/k/v kernels
are 3-D ``(embed, heads, head_dim)`` and the out kernel ``(heads, head_dim, embed)``.
"""

from __future__ import annotations

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax


@dataclasses.dataclass(frozen=True)
class Shape:
    d_model: int = 512
    layers: int = 4
    heads: int = 8
    vocab: int = 4096
    seq: int = 128
    batch: int = 4


class Block(nn.Module):
    shape: Shape

    @nn.compact
    def __call__(self, x, mask):
        h = nn.LayerNorm(name="ln1")(x)
        x = x + nn.MultiHeadDotProductAttention(num_heads=self.shape.heads, name="attn")(h, mask=mask)
        h = nn.LayerNorm(name="ln2")(x)
        h = nn.Dense(4 * self.shape.d_model, name="up")(h)
        return x + nn.Dense(self.shape.d_model, name="down")(nn.gelu(h))


class GPT(nn.Module):
    shape: Shape

    @nn.compact
    def __call__(self, tokens):
        s = self.shape
        pos = self.param("pos", nn.initializers.normal(0.02), (s.seq, s.d_model))
        x = nn.Embed(s.vocab, s.d_model, name="embed")(tokens) + pos[: tokens.shape[1]]
        mask = nn.make_causal_mask(tokens)
        for i in range(s.layers):
            x = Block(s, name=f"block_{i}")(x, mask)
        return nn.Dense(s.vocab, use_bias=False, name="head")(nn.LayerNorm(name="ln_f")(x))


def next_token_loss(logits, tokens):
    return optax.softmax_cross_entropy_with_integer_labels(logits[:, :-1], tokens[:, 1:]).mean()


# ------------------------------------------------------- hand-written factored LoRA


def hand_forward(shape: Shape, frozen, trainable, tokens, scale, flat_lora: bool = False):
    """The same model with the LoRA branch written by hand (the floor jlora is held to).

    ``flat_lora``: the branch as 2-D matmuls, ``(b*t, in) @ (in, r) @ (r, out)``, reshaped
    back (``benchmarks/speed.py`` measures what that saves on CPU).
    """
    p, t = frozen["params"], trainable["params"]

    def dense(x, name_p, name_t, w_in: str, w_out: str):
        # x: (..., *w_in) ; kernel: (*w_in, *w_out)
        k = name_p["kernel"]
        xs = "bt" + w_in
        out = jnp.einsum(f"{xs},{w_in}{w_out}->bt{w_out}", x, k)
        if name_t is not None:
            a, b = name_t["kernel"]["a"], name_t["kernel"]["b"]
            if flat_lora:
                r = a.shape[-1]
                u = x.reshape(-1, a.size // r) @ a.reshape(-1, r) * scale
                out = out + (u @ b.reshape(r, -1)).reshape(out.shape)
            else:
                u = jnp.einsum(f"{xs},{w_in}r->btr", x, a) * scale
                out = out + jnp.einsum(f"btr,r{w_out}->bt{w_out}", u, b)
        return out + name_p["bias"] if "bias" in name_p else out

    def ln(x, q):
        return nn.LayerNorm().apply({"params": q}, x)

    x = jnp.take(p["embed"]["embedding"], tokens, axis=0) + p["pos"][: tokens.shape[1]]
    mask = nn.make_causal_mask(tokens)
    for i in range(shape.layers):
        bp, bt = p[f"block_{i}"], t[f"block_{i}"]
        h = ln(x, bp["ln1"])
        q, k, v = (dense(h, bp["attn"][n], bt["attn"][n], "d", "hk") for n in ("query", "key", "value"))
        o = nn.dot_product_attention(q, k, v, mask=mask)
        x = x + dense(o, bp["attn"]["out"], bt["attn"]["out"], "hk", "d")
        h = ln(x, bp["ln2"])
        h = dense(nn.gelu(dense(h, bp["up"], bt["up"], "d", "f")), bp["down"], bt["down"], "f", "d")
        x = x + h
    x = ln(x, p["ln_f"])
    return jnp.einsum("btd,dv->btv", x, p["head"]["kernel"])


def init(shape: Shape, key):
    model = GPT(shape)
    tokens = jax.random.randint(key, (shape.batch, shape.seq), 0, shape.vocab)
    return model, model.init(key, tokens), tokens
