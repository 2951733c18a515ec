"""The reference LoRA step in PyTorch eager with Hugging Face PEFT (run with a torch interpreter).

The GPT of ``gpt.py`` rebuilt in ``torch.nn`` (same shapes, LayerNorm eps 1e-6, tanh GELU,
causal attention), rank-8 LoRA on query/key/value/out/up/down through ``peft.get_peft_model``,
one step = forward, next-token cross-entropy, backward, SGD. Also the full fine-tuning step
of the same model. Reports FLOPs as ``torch.utils.flop_counter`` counts them (matmuls and
attention only, forward + backward), parameter bytes, and the median wall time.

With ``--weights`` (an ``.npz`` the JAX suite writes: flax paths -> arrays, base and
adapter), the model takes those values and the JSON records the loss, so the suite can
check that both frameworks compute the same function.

    /tmp/refvenv/bin/python benchmarks/peft_step.py --out benchmarks/results/peft-step-cpu.json
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import pathlib
import platform
import statistics
import time

import numpy as np
import peft
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

SHAPE = {"d_model": 512, "layers": 4, "heads": 8, "vocab": 4096, "seq": 128, "batch": 4}
TARGETS = ["query", "key", "value", "out", "up", "down"]
RANK, ALPHA, LR = 8, 16.0, 1e-3


class Attention(nn.Module):
    def __init__(self, d, heads):
        super().__init__()
        self.heads = heads
        self.query, self.key, self.value, self.out = (nn.Linear(d, d) for _ in range(4))

    def forward(self, x):
        b, t, d = x.shape
        q, k, v = (m(x).view(b, t, self.heads, -1).transpose(1, 2)
                   for m in (self.query, self.key, self.value))
        o = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.out(o.transpose(1, 2).reshape(b, t, d))


class Block(nn.Module):
    def __init__(self, d, heads):
        super().__init__()
        self.ln1, self.ln2 = nn.LayerNorm(d, eps=1e-6), nn.LayerNorm(d, eps=1e-6)
        self.attn = Attention(d, heads)
        self.up, self.down = nn.Linear(d, 4 * d), nn.Linear(4 * d, d)

    def forward(self, x):
        x = x + self.attn(self.ln1(x))
        return x + self.down(F.gelu(self.up(self.ln2(x)), approximate="tanh"))


class GPT(nn.Module):
    """Module names follow the flax paths (``block_0.attn.query`` <- ``params/block_0/attn/query``)."""

    def __init__(self, d_model, layers, heads, vocab, seq, **_):
        super().__init__()
        self.embed = nn.Embedding(vocab, d_model)
        self.pos = nn.Parameter(0.02 * torch.randn(seq, d_model))
        self.layers = layers
        for i in range(layers):
            self.add_module(f"block_{i}", Block(d_model, heads))
        self.ln_f = nn.LayerNorm(d_model, eps=1e-6)
        self.head = nn.Linear(d_model, vocab, bias=False)

    def forward(self, tokens):
        x = self.embed(tokens) + self.pos[: tokens.shape[1]]
        for i in range(self.layers):
            x = getattr(self, f"block_{i}")(x)
        return self.head(self.ln_f(x))


def next_token_loss(logits, tokens):
    return F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), tokens[:, 1:].reshape(-1))


# --------------------------------------------------------- loading the JAX weights

FLAX_TO_TORCH = {"kernel": "weight", "scale": "weight", "embedding": "weight", "bias": "bias"}


def load_flax(model: nn.Module, flat: dict[str, np.ndarray]) -> None:
    """Copy ``params/...`` arrays into ``model`` (flax kernels ``(*in, *out)`` -> ``(out, in)``)."""
    state = model.state_dict()
    for path, arr in flat.items():
        parts = path.split("/")
        if parts[0] != "params" or parts[-1] in ("a", "b"):
            continue
        if parts[-1] == "pos":
            name = "pos"
        else:
            name = ".".join(parts[1:-1] + [FLAX_TO_TORCH[parts[-1]]])
        target = state[name]
        value = (arr.reshape(target.shape[1], target.shape[0]).T if parts[-1] == "kernel"
                 else arr.reshape(target.shape))
        state[name] = torch.from_numpy(np.ascontiguousarray(value))
    model.load_state_dict(state)


def load_adapters(peft_model, flat: dict[str, np.ndarray]) -> None:
    """jlora's ``a (*in, r)``, ``b (r, *out)`` -> PEFT's ``lora_A (r, in)``, ``lora_B (out, r)``."""
    with torch.no_grad():
        for path, arr in flat.items():
            parts = path.split("/")
            if parts[-1] not in ("a", "b"):
                continue
            layer = peft_model.base_model.model.get_submodule(".".join(parts[1:-2]))
            if parts[-1] == "a":
                layer.lora_A["default"].weight.copy_(torch.from_numpy(arr.reshape(-1, RANK).T.copy()))
            else:
                layer.lora_B["default"].weight.copy_(torch.from_numpy(arr.reshape(RANK, -1).T.copy()))


# ------------------------------------------------------------------ measuring


def make_step(model):
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.SGD(params, lr=LR)

    def step(tokens):
        opt.zero_grad(set_to_none=True)
        loss = next_token_loss(model(tokens), tokens)
        loss.backward()
        opt.step()
        return loss

    return step, params


def measure(steps: dict, tokens, repeats: int) -> dict:
    out = {}
    for name, (step, params, model) in steps.items():
        with FlopCounterMode(display=False) as counter:
            step(tokens)
        out[name] = {
            "flops": float(counter.get_total_flops()),
            "trainable_bytes": sum(p.numel() * p.element_size() for p in params),
            "parameter_bytes": sum(p.numel() * p.element_size() for p in model.parameters()),
        }
    times = {name: [] for name in steps}
    for _ in range(repeats):  # round-robin, as harness.wall_times does
        for name, (step, _, _) in steps.items():
            t0 = time.perf_counter()
            step(tokens)
            times[name].append(time.perf_counter() - t0)
    for name in steps:
        out[name]["median_ms"] = 1e3 * statistics.median(times[name])
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--weights", type=pathlib.Path, help="npz of flax paths -> arrays (base and adapter)")
    parser.add_argument("--out", type=pathlib.Path,
                        default=pathlib.Path(__file__).parent / "results" / "peft-step-cpu.json")
    args = parser.parse_args(argv)

    torch.manual_seed(0)
    flat = dict(np.load(args.weights)) if args.weights else {}
    full = GPT(**SHAPE)
    lora_base = GPT(**SHAPE)
    if flat:
        load_flax(full, flat)
        load_flax(lora_base, flat)
    lora = peft.get_peft_model(lora_base, peft.LoraConfig(r=RANK, lora_alpha=ALPHA, target_modules=TARGETS))
    if flat:
        load_adapters(lora, flat)
    tokens = (torch.from_numpy(flat["tokens"]).long() if "tokens" in flat
              else torch.randint(0, SHAPE["vocab"], (SHAPE["batch"], SHAPE["seq"])))
    with torch.no_grad():
        loss = float(next_token_loss(lora(tokens), tokens))
    steps = {"peft_lora": (*make_step(lora), lora), "torch_full_ft": (*make_step(full), full)}
    record = {
        "date": datetime.date.today().isoformat(),
        "machine": f"{platform.machine()} cpu, {os.cpu_count()} CPU cores, "
                   f"torch threads {torch.get_num_threads()}",
        "versions": {"python": platform.python_version(), "torch": torch.__version__,
                     "peft": peft.__version__},
        "flops_counted_by": "torch.utils.flop_counter (matmuls + attention, forward + backward)",
        "loss_before_step": loss if flat else None,
        "results": measure(steps, tokens, args.repeats),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(record, indent=2) + "\n")
    print(json.dumps(record, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
