"""Every code block of README.md runs, verbatim, in a fresh temporary working directory.

A block is run as written (its relative paths land in the temporary directory). The
names it assumes but does not define (``model``, ``key``, ``x``, ``loss_fn``, ...) come
from its entry in ``BLOCKS`` below: a *prelude* that returns them, and a *check* that
looks at what the block made. A block is found by a piece of text it contains
(``match``), so editing its other lines keeps it mapped. A block that no entry matches
fails `test_every_block_has_a_prelude` with the entry to add.

``python`` blocks are executed with ``exec``; ``sh`` blocks line by line: ``python -m
jlora ...`` lines through the CLI's own ``main`` (in this process: no interpreter start
per line), ``make <target>`` lines as ``make -n <target>`` (the targets build virtual
environments and run the whole suite; a dry run checks that each one exists).
"""

from __future__ import annotations

import dataclasses
import os
import re
import shlex
import subprocess
from collections.abc import Callable
from pathlib import Path

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
from models import bump
from safetensors.numpy import save_file

import jlora
from jlora._cli import main as cli_main
from jlora._paths import flatten

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"


@dataclasses.dataclass(frozen=True)
class Block:
    lang: str
    line: int  # where its first line is in README.md
    code: str


def readme_blocks(text: str) -> list[Block]:
    """The fenced ``python`` and ``sh`` blocks of a markdown text (other languages are not code to run)."""
    out = []
    for m in re.finditer(r"^```(\w*)[^\n]*\n(.*?)^```", text, re.M | re.S):
        lang = m.group(1)
        if lang in ("python", "sh", "bash", "shell"):
            out.append(Block(lang, text[:m.start()].count("\n") + 2, m.group(2)))
    return out


# ----------------------------------------------------------------------------- what the blocks assume


class Model(nn.Module):
    """Attention with query/key/value/out kernels, then a Dense head: what the quick start adapts."""

    @nn.compact
    def __call__(self, x):
        h = nn.MultiHeadDotProductAttention(num_heads=2, qkv_features=16, name="attn")(x)
        return nn.Dense(4, name="head")(h.mean(axis=1))


class NnxModel(nnx.Module):
    def __init__(self, rngs):
        self.attn = nnx.MultiHeadAttention(num_heads=2, in_features=16, qkv_features=16, decode=False,
                                           rngs=rngs)
        self.head = nnx.Linear(16, 4, rngs=rngs)

    def __call__(self, x):
        return self.head(self.attn(x).mean(axis=1))


CONFIG = jlora.LoraConfig(rank=8, alpha=16.0, targets=r".*/(query|value)/kernel")


def quickstart_names() -> dict:
    """A Linen model, its input (batch 4, 5 tokens, width 16), targets and a squared-error loss."""
    key = jax.random.key(0)
    x = jax.random.normal(jax.random.key(1), (4, 5, 16))
    return {"model": Model(), "key": key, "x": x, "y": jnp.zeros((4, 4)),
            "loss_fn": lambda out, y: jnp.mean((out - y) ** 2)}


def trained_names() -> dict:
    """The quick start's names after it ran: params, config, frozen and a trained-looking trainable."""
    names = quickstart_names()
    params = names["model"].init(names["key"], names["x"])
    frozen, trainable = jlora.init(jax.random.key(0), params, CONFIG)
    tx = jlora.optimizer(CONFIG, learning_rate=1e-4)
    trainable = bump(trainable, 0.05)
    return {**names, "params": params, "config": CONFIG, "frozen": frozen, "trainable": trainable,
            "lora_apply": jlora.wrap(names["model"].apply, CONFIG), "tx": tx, "opt_state": tx.init(trainable)}


def check_quickstart(ns: dict) -> None:
    """The step the block defines trains, and merging fresh adapters (b = 0) gives params back."""
    trainable, opt_state, loss = ns["step"](ns["trainable"], ns["opt_state"], ns["x"], ns["y"])
    assert np.isfinite(float(loss))
    assert jax.tree.structure(ns["merged"]) == jax.tree.structure(ns["params"])
    for u, v in zip(jax.tree.leaves(ns["merged"]), jax.tree.leaves(ns["params"]), strict=True):
        np.testing.assert_array_equal(u, v)


def nnx_names() -> dict:
    return {"nnx": nnx, "jlora": jlora, "model": NnxModel(nnx.Rngs(0)), "key": jax.random.key(0),
            "config": CONFIG}


def check_nnx(ns: dict) -> None:
    x = jax.random.normal(jax.random.key(1), (4, 5, 16))
    np.testing.assert_allclose(ns["lora_apply"](ns["frozen"], ns["trainable"], x), ns["model"](x), rtol=1e-6)


def check_saved(ns: dict) -> None:
    assert sorted(os.listdir("ckpt")) == ["folded", "sentiment"]
    restored, cfg = jlora.restore("ckpt/folded", ns["frozen"])
    x = ns["x"]
    want = jlora.wrap(ns["model"].apply, ns["config"])(ns["frozen"], ns["trainable"], x)
    np.testing.assert_allclose(jlora.wrap(ns["model"].apply, cfg)(ns["frozen"], restored, x), want,
                               rtol=1e-5, atol=1e-6)


def resume_names() -> dict:
    """A one-device mesh; ``ckpt_dir`` absolute (Orbax's CheckpointManager takes absolute paths only)."""
    mesh = jax.sharding.Mesh(np.array(jax.devices()[:1]), ("data",))
    return {**trained_names(), "ocp": ocp, "ckpt_dir": os.path.abspath("ckpt/run"), "step": 1,
            "mesh": mesh, "NamedSharding": NamedSharding, "P": P}


def check_resume(ns: dict) -> None:
    mngr = ns["mngr"]
    mngr.wait_until_finished()
    assert mngr.latest_step() == 1
    mngr.close()
    restored, cfg = jlora.restore(Path("ckpt/run/1"), ns["frozen"])
    assert cfg == ns["config"]
    jax.tree.map(np.testing.assert_array_equal, restored, ns["trainable"])


def cli_files() -> dict:
    """``ckpt/sentiment`` and ``base.safetensors`` ('/'-joined keys) in the working directory."""
    names = trained_names()
    jlora.save("ckpt/sentiment", names["trainable"], names["config"], frozen=names["frozen"])
    save_file({k: np.asarray(v) for k, v in flatten(names["params"]).items()}, "base.safetensors")
    return names


def check_cli(ns: dict) -> None:
    assert {"merged.safetensors", "peft_dir", "ckpt"} <= set(os.listdir("."))
    back, cfg = jlora.restore("ckpt/from_peft", ns["params"])
    want = ns["lora_apply"](ns["frozen"], ns["trainable"], ns["x"])
    np.testing.assert_allclose(jlora.wrap(ns["model"].apply, cfg)(ns["params"], back, ns["x"]), want,
                               rtol=1e-5, atol=1e-6)


def bank_names() -> dict:
    """Three adapters of ranks 8, 4 and 6 on the quick start's base (non-zero, as after training)."""
    names = trained_names()
    out = {**names, "jnp": jnp}
    for i, (name, rank) in enumerate([("a", 8), ("b", 4), ("c", 6)]):
        cfg = dataclasses.replace(CONFIG, rank=rank)
        out[f"trainable_{name}"] = bump(jlora.init(jax.random.key(i), names["params"], cfg)[1],
                                        0.02 * (i + 1))
        out[f"config_{name}"] = cfg
    return out


def check_bank(ns: dict) -> None:
    # after put: c in 1
    got = ns["serve"](ns["frozen"], ns["bank"], ns["x"], lora_index=jnp.array([1, 1, -1, 0]))
    alone = jlora.wrap(ns["model"].apply, ns["config_c"])(ns["frozen"], ns["trainable_c"], ns["x"])
    np.testing.assert_allclose(got[1], alone[1], rtol=1e-5, atol=1e-5)
    again = jlora.wrap(ns["model"].apply, ns["config_b2"])(ns["frozen"], ns["trainable_b2"], ns["x"])
    np.testing.assert_allclose(again, alone, rtol=1e-5, atol=1e-5)
    assert ns["combined_config"].rank_for(ns["combined_config"].targets[0]) == 8


def check_bank_training(ns: dict) -> None:
    """Each slot moved, and slot "fr" equals one step of that adapter alone on its one example."""
    config, params, x, y = ns["config"], ns["params"], ns["x"], ns["y"]
    _, start = jlora.init(ns["key"], params, config)
    for k in range(3):
        assert float(jnp.abs(ns["bank"]["params"]["attn"]["query"]["kernel"]["b"][k]).max()) > 0
    assert ns["fr_config"] == dataclasses.replace(config, adapters=())
    alone, one_config = jlora.unstack(start, config, "fr")
    apply = jlora.wrap(ns["model"].apply, one_config)
    tx = jlora.optimizer(one_config, 1e-3)
    grads = jax.grad(lambda t: jnp.mean((apply(ns["frozen"], t, x[:1]) - y[:1]) ** 2))(alone)
    updates, _ = tx.update(grads, tx.init(alone), alone)
    want = optax.apply_updates(alone, updates)
    jax.tree.map(lambda g, w: np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-7), ns["fr"], want)


def check_qlora(ns: dict) -> None:
    assert isinstance(ns["qparams"]["params"]["attn"]["query"]["kernel"], jlora.QArray)
    out = ns["lora_apply"](ns["frozen"], ns["trainable"], ns["x"])
    np.testing.assert_allclose(out, ns["model"].apply(ns["merged"], ns["x"]), rtol=1e-5, atol=1e-5)


def sharding_names() -> dict:
    """One-device shardings (the test process may have one device): a mesh, params replicated on it."""
    names = trained_names()
    mesh = jax.sharding.Mesh(np.array(jax.devices()[:1]), ("data",))
    replicated = NamedSharding(mesh, P())
    frozen, lora_apply, loss_fn, tx = names["frozen"], names["lora_apply"], names["loss_fn"], names["tx"]

    def step(trainable, opt_state, x, y):  # the quick start's step
        loss, grads = jax.value_and_grad(lambda t: loss_fn(lora_apply(frozen, t, x), y))(trainable)
        updates, opt_state = tx.update(grads, opt_state, trainable)
        return optax.apply_updates(trainable, updates), opt_state, loss

    return {**names, "step": step, "param_shardings": jax.tree.map(lambda _: replicated, names["params"]),
            "opt_shardings": replicated}


def check_sharding(ns: dict) -> None:
    trainable, opt_state, loss = ns["step"](ns["trainable"], ns["opt_state"], ns["x"], ns["y"])
    assert np.isfinite(float(loss))
    assert jax.tree.structure(ns["adapter_shardings"]) == jax.tree.structure(ns["trainable"])


@dataclasses.dataclass(frozen=True)
class Entry:
    match: str  # text only this block contains
    prelude: Callable[[], dict] = dict  # the names the block assumes
    check: Callable[[dict], None] = lambda ns: None  # what it made, checked
    doc: str = ""


BLOCKS = [
    Entry("make demo", doc="make targets: dry-run with make -n"),
    Entry("make llm", doc="make targets: dry-run with make -n"),
    Entry('targets=r".*/(query|value)/kernel")', quickstart_names, check_quickstart, "quick start"),
    Entry("nnx.split(model)", nnx_names, check_nnx, "NNX"),
    Entry('jlora.save("ckpt/sentiment"', trained_names, check_saved, "save / restore"),
    Entry("jlora.save_args(trainable, config)", resume_names, check_resume,
          "resuming with CheckpointManager"),
    Entry("python -m jlora inspect", cli_files, check_cli, "the CLI"),
    Entry("jlora.stack(", bank_names, check_bank, "banks"),
    Entry('adapters=("fr", "de", "es"))', trained_names, check_bank_training, "training a bank"),
    Entry("jlora.quantize(params", trained_names, check_qlora, "QLoRA"),
    Entry("jlora.shardings(sharded, config)", sharding_names, check_sharding, "sharding"),
]


def _entry(block: Block) -> Entry | None:
    hits = [e for e in BLOCKS if e.match in block.code]
    if len(hits) > 1:
        raise AssertionError(f"README.md line {block.line}: matched by several entries "
                             f"{[e.match for e in hits]}; make their match texts more specific.")
    return hits[0] if hits else None


# ----------------------------------------------------------------------------- running a block


def _run_sh(block: Block) -> None:
    for n, raw in enumerate(block.code.splitlines()):
        argv = shlex.split(raw, comments=True)
        where = f"README.md line {block.line + n}: {raw.strip()}"
        if not argv:
            continue
        if argv[0] == "make":
            out = subprocess.run(["make", "-n", *argv[1:]], cwd=ROOT, capture_output=True, text=True)
            assert out.returncode == 0, f"{where}\n{out.stderr}"
        elif argv[:3] == ["python", "-m", "jlora"]:
            assert cli_main(argv[3:]) == 0, where
        else:
            raise AssertionError(f"{where}: this test runs `python -m jlora ...` and `make ...` lines only; "
                                 "teach _run_sh the new kind of line.")


def _run(block: Block, tmp_path, monkeypatch) -> None:
    entry = _entry(block)
    assert entry is not None, _missing(block)
    monkeypatch.chdir(tmp_path)
    ns = {"__name__": "readme", "jax": jax, "jnp": jnp, "optax": optax, "nn": nn, "jlora": jlora}
    ns.update(entry.prelude())
    if block.lang == "python":
        exec(compile(block.code, f"README.md (block at line {block.line})", "exec"), ns)
    else:
        _run_sh(block)
    entry.check(ns)


def _missing(block: Block) -> str:
    first = next((ln for ln in block.code.splitlines() if ln.strip()), "")
    return (f"README.md line {block.line}: no entry in tests/test_readme.py BLOCKS "
            f"runs this {block.lang} block (first line {first.strip()!r}). Add "
            f"Entry(<text only this block contains>, <prelude returning the "
            "names it uses but does not define>, <check of what it made>) to BLOCKS.")


ALL = readme_blocks(README.read_text())


def test_every_block_has_a_prelude():
    missing = [_missing(b) for b in ALL if _entry(b) is None]
    assert not missing, "\n".join(missing)
    stale = [e.match for e in BLOCKS if not any(e.match in b.code for b in ALL)]
    assert not stale, f"entries of BLOCKS that match no README block (remove or update them): {stale}"


@pytest.mark.standard_promotion  # a reader's code runs under JAX's default promotion (optax's Adam needs it)
@pytest.mark.parametrize("block", ALL, ids=[f"line{b.line}" for b in ALL])
def test_block_runs_as_written(block, tmp_path, monkeypatch):
    _run(block, tmp_path, monkeypatch)


def test_a_new_block_fails_loudly_with_the_way_to_add_it():
    text = "# x\n\n```python\nprint(jlora.frobnicate(model))\n```\n\n```text\nnot code\n```\n"
    [block] = readme_blocks(text)
    assert (block.lang, block.line, block.code) == ("python", 4, "print(jlora.frobnicate(model))\n")
    assert _entry(block) is None
    assert re.search(r"README\.md line 4: no entry in tests/test_readme\.py BLOCKS runs this python block "
                     r"\(first line 'print\(jlora\.frobnicate\(model\)\)'\)\. Add Entry\(", _missing(block))
