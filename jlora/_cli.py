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


def _load_params(path: str):
    p = pathlib.Path(path)
    if p.suffix == ".safetensors":
        from safetensors.numpy import load_file

        from jlora._paths import nest

        return nest({k: jnp.asarray(v) for k, v in load_file(str(p)).items()})
    if p.is_dir():
        import jax
        import orbax.checkpoint as ocp

        # Arrays go where the checkpoint says when this process has those devices, else onto
        # one local device: a base saved on a mesh of several processes reads here too.
        one = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
        with ocp.Checkpointer(ocp.StandardCheckpointHandler()) as ckptr:
            return ckptr.restore(p.resolve(), ocp.args.StandardRestore(fallback_sharding=one))
    raise ValueError(f"{path}: base parameters must be a .safetensors file or an Orbax checkpoint directory.")


def _save_params(params, path: str, like: str) -> None:
    p = pathlib.Path(path)
    if p.exists():
        raise ValueError(f"{path} exists; choose a new output path (nothing was written).")
    if pathlib.Path(like).suffix == ".safetensors":
        from safetensors.numpy import save_file

        from jlora._paths import flatten

        save_file({k: np.asarray(v) for k, v in flatten(params).items()}, str(p))
    else:
        import orbax.checkpoint as ocp

        ckptr = ocp.StandardCheckpointer()
        ckptr.save(p.resolve(), params)
        ckptr.wait_until_finished()


def _inspect(args) -> None:
    d = pathlib.Path(args.directory)
    if (d / "adapter_config.json").is_file():
        from safetensors import safe_open

        config = json.loads((d / "adapter_config.json").read_text())
        print(f"PEFT adapter: r={config.get('r')}, lora_alpha={config.get('lora_alpha')}, "
              f"use_rslora={config.get('use_rslora')}, use_dora={config.get('use_dora')}")
        print(f"target_modules: {config.get('target_modules')}")
        with safe_open(str(d / "adapter_model.safetensors"), "np") as f:
            for key in sorted(f.keys()):
                print(f"  {key}  {tuple(f.get_slice(key).get_shape())}")
        return
    from jlora._checkpoint import read_metadata

    print(json.dumps(read_metadata(d), indent=2, sort_keys=True))


def _merge(args) -> None:
    from jlora._checkpoint import restore
    from jlora._merge import merge

    base = _load_params(args.base)
    trainable, config = restore(args.adapter, base)
    _save_params(merge(base, trainable, config, scale=args.scale, safe=True), args.out, args.base)
    print(f"merged {args.adapter} into {args.base}: {args.out}")


def _export(args) -> None:
    from jlora._checkpoint import restore
    from jlora._peft import export_peft

    base = _load_params(args.base)
    trainable, config = restore(args.adapter, base)
    export_peft(args.out, trainable, config, frozen=base, conv=tuple(args.conv))
    print(f"PEFT adapter written: {args.out}")


def _import(args) -> None:
    from jlora._checkpoint import save
    from jlora._peft import import_peft

    base = _load_params(args.base)
    frozen, trainable, config = import_peft(args.peft, base)
    save(args.out, trainable, config, frozen=frozen)
    print(f"jlora adapter written: {args.out}")


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m jlora", description="Inspect, merge and convert LoRA adapters.")
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
    s.set_defaults(run=_export)
    s = sub.add_parser("import-peft", help="read a PEFT adapter into a jlora checkpoint")
    s.add_argument("peft", help="PEFT adapter directory (adapter_config.json + adapter_model.safetensors)")
    s.add_argument("base")
    s.add_argument("out")
    s.set_defaults(run=_import)
    return p


def main(argv=None) -> int:
    args = parser().parse_args(argv)
    try:
        args.run(args)
    except (ValueError, TypeError, OSError, KeyError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        print(f"jlora {args.command}: error: {first}", file=sys.stderr)
        return 1
    return 0
