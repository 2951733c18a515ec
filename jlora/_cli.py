"""``python -m jlora``: look into, merge and convert adapter checkpoints from the shell.

Base parameters are read from a ``.safetensors`` file whose keys are '/'-joined
leaf paths (``params/dense/kernel``) or from an Orbax checkpoint directory; merged
parameters are written in the same form as the base given.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys

import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from absl import logging as absl_logging
from safetensors import SafetensorError, safe_open
from safetensors.numpy import load_file, save_file

from jlora._checkpoint import read_metadata, restore, save
from jlora._gguf import export_gguf
from jlora._merge import merge
from jlora._paths import flatten, nest
from jlora._peft import export_peft, import_peft
from jlora._sharding import single_device


def _first_line(e: BaseException) -> str:
    """An error's message on one line: a list under a heading joined with '; '."""
    lines = [line.strip() for line in str(e).strip().splitlines() if line.strip()]
    if not lines:
        return type(e).__name__
    return lines[0] + (" " + "; ".join(lines[1:]) if len(lines) > 1 else "")


def _nest_keys(flat: dict, path: str) -> dict:
    """``nest`` for keys read from a file: an empty part or a key that is also a prefix is an error."""
    for key in sorted(flat):
        if not key or "" in key.split("/"):
            raise ValueError(f"{path}: key {key!r} has an empty part; keys are '/'-joined leaf paths such as "
                             "'params/dense/kernel'.")
        if any(other.startswith(key + "/") for other in flat):
            raise ValueError(f"{path}: key {key!r} is both a leaf and a prefix of other keys; keys are "
                             "'/'-joined leaf paths such as 'params/dense/kernel'.")
    return nest(flat)


def _load_params(path: str):
    p = pathlib.Path(path).expanduser()
    if not p.exists():
        raise FileNotFoundError(f"base parameters {path}: no such file or directory.")
    if p.suffix == ".safetensors":
        try:
            tensors = load_file(str(p))
        except (SafetensorError, OSError, ValueError, TypeError) as e:  # truncated, garbled, a directory...
            raise ValueError(f"{path}: not a readable .safetensors file ({_first_line(e)}).") from None
        return _nest_keys({k: jnp.asarray(v) for k, v in tensors.items()}, path)
    if p.is_dir():
        # Arrays go where the checkpoint says when this process has those devices, else onto
        # one local device: a base saved on a mesh of several processes reads here too.
        one = single_device()
        with ocp.Checkpointer(ocp.StandardCheckpointHandler()) as ckptr:
            return ckptr.restore(p.resolve(), ocp.args.StandardRestore(fallback_sharding=one))
    raise ValueError(f"{path}: base parameters must be a .safetensors file or an Orbax checkpoint directory.")


def _save_params(params, path: str, like: str) -> None:
    p = pathlib.Path(path).expanduser()
    if p.exists():
        raise FileExistsError(f"{path} exists; choose a new output path (nothing was written).")
    if not p.parent.is_dir():
        raise FileNotFoundError(f"{path}: the directory {p.parent} does not exist; create it first (nothing "
                                "was written).")
    if pathlib.Path(like).suffix == ".safetensors":
        save_file({k: np.asarray(v) for k, v in flatten(params).items()}, str(p))
    else:
        ckptr = ocp.StandardCheckpointer()
        ckptr.save(p.resolve(), params)
        ckptr.wait_until_finished()


def _inspect(args) -> None:
    d = pathlib.Path(args.directory).expanduser()
    if (d / "adapter_config.json").is_file():
        try:
            config = json.loads((d / "adapter_config.json").read_text())
        except (ValueError, OSError) as e:
            raise ValueError(f"{d / 'adapter_config.json'}: not readable JSON ({_first_line(e)}).") from None
        if not isinstance(config, dict):
            raise ValueError(f"{d / 'adapter_config.json'}: expected a JSON object, got "
                             f"{type(config).__name__}.")
        weights = d / "adapter_model.safetensors"
        try:  # everything is read before anything is printed: a failure prints its one line alone
            with safe_open(str(weights), "np") as f:
                tensors = [f"  {key}  {tuple(f.get_slice(key).get_shape())}" for key in sorted(f.keys())]
        except (SafetensorError, OSError, ValueError, TypeError) as e:
            raise ValueError(f"{weights}: not a readable .safetensors file ({_first_line(e)}).") from None
        print(f"PEFT adapter: r={config.get('r')}, lora_alpha={config.get('lora_alpha')}, "
              f"use_rslora={config.get('use_rslora')}, use_dora={config.get('use_dora')}")
        print(f"target_modules: {config.get('target_modules')}")
        print("\n".join(tensors))
        return
    print(json.dumps(read_metadata(d), indent=2, sort_keys=True))


def _merge(args) -> None:
    base = _load_params(args.base)
    trainable, config = restore(args.adapter, base)
    _save_params(merge(base, trainable, config, scale=args.scale, safe=True), args.out, args.base)
    print(f"merged {args.adapter} into {args.base}: {args.out}")


def _names(path: str | None, what: str) -> dict | None:
    """A JSON file ``{leaf path: name}``: the mapping a command takes from the shell."""
    if path is None:
        return None
    p = pathlib.Path(path).expanduser()
    try:
        names = json.loads(p.read_text())
    except (OSError, ValueError) as e:
        raise ValueError(f"{path}: not a readable JSON file of {what} ({_first_line(e)}).") from None
    if not isinstance(names, dict) or not all(isinstance(x, str) for kv in names.items() for x in kv):
        raise ValueError(f"{path}: expected a JSON object of strings {{\"leaf/path/kernel\": "
                         f"\"{what}\", ...}}.")
    return names


def _export(args) -> None:
    base = _load_params(args.base)
    trainable, config = restore(args.adapter, base)
    export_peft(args.out, trainable, config, frozen=base, conv=tuple(args.conv),
                module_name=_names(args.module_names, "PEFT module name"), experts=tuple(args.experts))
    print(f"PEFT adapter written: {args.out}")


def _export_gguf(args) -> None:
    names = _names(args.tensor_names, "base GGUF tensor name")
    base = _load_params(args.base)
    trainable, config = restore(args.adapter, base)
    export_gguf(args.out, trainable, config, base=args.gguf, tensor_name=names, frozen=base)
    print(f"llama.cpp adapter written: {args.out}")


def _import(args) -> None:
    base = _load_params(args.base)
    frozen, trainable, config = import_peft(args.peft, base,
                                            module_name=_names(args.module_names, "PEFT module name"))
    save(args.out, trainable, config, frozen=frozen)
    print(f"jlora adapter written: {args.out}")


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m jlora",
                                description="Inspect, merge and convert LoRA adapters.")
    sub = p.add_subparsers(dest="command", required=True)
    s = sub.add_parser("inspect", help="print an adapter's metadata (jlora) or its tensors (PEFT)")
    s.add_argument("directory")
    s.set_defaults(run=_inspect)
    s = sub.add_parser("merge", help="fold an adapter into base parameters")
    s.add_argument("adapter", help="jlora adapter checkpoint directory")
    s.add_argument("base", help="base parameters: .safetensors ('/'-joined keys) or Orbax directory")
    s.add_argument("out", help="where to write the merged parameters (same form as base)")
    s.add_argument("--scale", type=float, default=1.0, help="adapter strength (0 = base, 1 = adapter)")
    s.set_defaults(run=_merge)
    s = sub.add_parser("export-peft", help="write a jlora adapter in PEFT's format")
    s.add_argument("adapter")
    s.add_argument("base")
    s.add_argument("out")
    s.add_argument("--conv", action="append", default=[], help="regex of kernels that are convolutions")
    s.add_argument("--module-names", help="JSON file {leaf path: PEFT module name}; a '{}' in a stacked "
                                          "(scanned) kernel's name takes its layer index")
    s.add_argument("--experts", action="append", default=[],
                   help="regex of a kernel whose last stack axis holds experts, written as PEFT's "
                        "target_parameters (one per torch parameter, in the order the torch module "
                        "defines them)")
    s.set_defaults(run=_export)
    s = sub.add_parser("export-gguf", help="write a jlora adapter as a llama.cpp LoRA adapter (GGUF)")
    s.add_argument("adapter")
    s.add_argument("base")
    s.add_argument("gguf", help="the base model's GGUF file (its architecture, tensor names and shapes)")
    s.add_argument("out", help="the adapter .gguf to write")
    s.add_argument("--tensor-names", required=True,
                   help="JSON file {leaf path: base GGUF tensor name, e.g. 'blk.0.attn_q.weight'}")
    s.set_defaults(run=_export_gguf)
    s = sub.add_parser("import-peft", help="read a PEFT adapter into a jlora checkpoint")
    s.add_argument("peft", help="PEFT adapter directory (adapter_config.json + adapter_model.safetensors)")
    s.add_argument("base")
    s.add_argument("out")
    s.add_argument("--module-names", help="JSON file {leaf path: PEFT module name}")
    s.set_defaults(run=_import)
    return p


def main(argv=None) -> int:
    """Run one command; every failure is a non-zero exit and one line on stderr, never a traceback."""
    args = parser().parse_args(argv)
    verbosity = absl_logging.get_verbosity()
    absl_logging.set_verbosity(absl_logging.FATAL)  # Orbax logs its own failures with tracebacks
    try:
        args.run(args)
    except (ValueError, TypeError, OSError, KeyError) as e:
        print(f"jlora {args.command}: error: {_first_line(e)}", file=sys.stderr)
        return 1
    except Exception as e:  # noqa: BLE001 -- an unforeseen failure is still one line, its type named
        print(f"jlora {args.command}: error: {type(e).__name__}: {_first_line(e)}", file=sys.stderr)
        return 1
    finally:
        absl_logging.set_verbosity(verbosity)
    return 0
