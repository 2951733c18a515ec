"""What every benchmark script shares: compiled costs, interleaved wall times, the record.

Wall times on a shared CPU drift while a benchmark runs. `wall_times` therefore runs the
candidates round-robin (one call of each per round), so that drift hits all of them
alike and the ratios between medians stay meaningful even when the absolute times do not.
"""

from __future__ import annotations

import datetime
import json
import os
import pathlib
import platform
import statistics
import time

import jax

RESULTS = pathlib.Path(__file__).parent / "results"


def compile_with_costs(fn, args) -> tuple[object, dict]:
    """``jax.jit(fn)`` compiled for ``args``, and XLA's own figures for it."""
    compiled = jax.jit(fn).lower(*args).compile()
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, list | tuple) else cost
    mem = compiled.memory_analysis()
    return compiled, {
        "flops": float(cost["flops"]),
        "bytes_accessed": float(cost["bytes accessed"]),
        "argument_bytes": int(mem.argument_size_in_bytes),
        "output_bytes": int(mem.output_size_in_bytes),
        "temp_bytes": int(mem.temp_size_in_bytes),
    }


def wall_samples(runs: dict, repeats: int) -> dict[str, list[float]]:
    """Milliseconds of each call of each ``name: (callable, args)``, called round-robin after one warm-up."""
    for fn, args in runs.values():
        jax.block_until_ready(fn(*args))
    times = {name: [] for name in runs}
    for _ in range(repeats):
        for name, (fn, args) in runs.items():
            t0 = time.perf_counter()
            jax.block_until_ready(fn(*args))
            times[name].append(1e3 * (time.perf_counter() - t0))
    return times


def wall_times(runs: dict, repeats: int) -> dict[str, float]:
    """Median milliseconds of each ``name: (callable, args)``, called round-robin after one warm-up."""
    return {name: statistics.median(t) for name, t in wall_samples(runs, repeats).items()}


def measure_all(steps: dict, repeats: int) -> dict[str, dict]:
    """Compile each ``name: (fn, args)``; its XLA figures plus its interleaved median wall time."""
    compiled = {name: compile_with_costs(fn, args) for name, (fn, args) in steps.items()}
    medians = wall_times({name: (c, steps[name][1]) for name, (c, _) in compiled.items()}, repeats)
    return {name: stats | {"median_ms": medians[name]} for name, (_, stats) in compiled.items()}


def compile_seconds(fns: dict, repeats: int) -> dict[str, float]:
    """Median seconds of trace + lower + compile of each ``name: (fn, args)``, from cold caches."""
    times = {name: [] for name in fns}
    for _ in range(repeats):
        for name, (fn, args) in fns.items():
            jax.clear_caches()
            t0 = time.perf_counter()
            jax.jit(fn).lower(*args).compile()
            times[name].append(time.perf_counter() - t0)
    return {name: statistics.median(t) for name, t in times.items()}


def machine() -> dict:
    """Date, machine and versions for a benchmark record."""
    import flax
    import optax

    import jlora

    device = jax.devices()[0]
    return {
        "date": datetime.date.today().isoformat(),
        "machine": f"{platform.machine()} {device.platform} ({device.device_kind}), "
                   f"{os.cpu_count()} CPU cores, {jax.device_count()} device(s)",
        "versions": {"python": platform.python_version(), "jax": jax.__version__, "flax": flax.__version__,
                     "optax": optax.__version__, "jlora": jlora.__version__},
    }


def write(stem: pathlib.Path, record: dict, markdown: str) -> None:
    """``stem``.json and ``stem``.md, and the markdown on stdout."""
    stem.parent.mkdir(parents=True, exist_ok=True)
    stem.with_suffix(".json").write_text(json.dumps(record, indent=2) + "\n")
    stem.with_suffix(".md").write_text(markdown)
    print(markdown)


def md_table(header: list[str], rows: list[list]) -> str:
    """A markdown table; the first column left-aligned, the others right-aligned."""
    lines = ["| " + " | ".join(header) + " |", "|---|" + "---:|" * (len(header) - 1)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)
