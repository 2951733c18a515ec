"""Two JAX processes of 4 CPU devices each: init, training, checkpoints, merge and PEFT export across them.

The checks themselves are in ``_multiprocess_child.py`` (its docstring lists them).
Here two children are started, joined by ``jax.distributed`` on a free local port,
and watched: the first to fail, or the deadline, ends both (by process group, so
nothing is left behind). A third child then reads what they wrote on one device.
"""

import os
import pathlib
import signal
import socket
import subprocess
import sys
import time

HERE = pathlib.Path(__file__).parent
CHILD = HERE / "_multiprocess_child.py"
DEADLINE_S = 300  # about 60 s on two cores; generous for a loaded CI machine, never a hang


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env() -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "PYTEST_XDIST_WORKER")}
    # The children choose their own device counts; nothing of this process's JAX setup carries over.
    return {**env, "JAX_PLATFORMS": "cpu", "PYTHONPATH": str(HERE.parent)}


def _start(args: list[str], log: pathlib.Path) -> tuple[subprocess.Popen, pathlib.Path]:
    out = log.open("w")
    try:
        proc = subprocess.Popen([sys.executable, str(CHILD), *args], stdout=out, stderr=subprocess.STDOUT,
                                env=_env(), cwd=HERE.parent, start_new_session=True)
    finally:
        out.close()
    return proc, log


def _kill(proc: subprocess.Popen) -> None:
    """End ``proc`` and anything it started (its own process group)."""
    if proc.poll() is None:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    proc.wait(timeout=30)


def _run_all(children: list[tuple[subprocess.Popen, pathlib.Path]], deadline: float) -> None:
    """Wait for every child; on the first failure or at the deadline kill them all and fail with the logs."""
    procs = [p for p, _ in children]
    failed = None
    try:
        while any(p.poll() is None for p in procs):
            failed = next((p for p in procs if p.poll() not in (None, 0)), None)
            if failed is not None or time.monotonic() > deadline:
                break
            time.sleep(0.2)
        else:
            failed = next((p for p in procs if p.returncode != 0), None)
    finally:
        for p in procs:
            _kill(p)
    if failed is not None or any(p.returncode != 0 for p in procs):
        logs = "\n".join(f"--- {log.name} (exit {p.returncode})\n{log.read_text()}" for p, log in children)
        why = "timed out" if failed is None else f"a child exited {failed.returncode}"
        raise AssertionError(f"multi-process run failed: {why}\n{logs}")


def test_two_processes_fsdp_and_tensor_parallel(tmp_path):
    deadline = time.monotonic() + DEADLINE_S
    for attempt in range(3):  # another program may take the free port before the coordinator binds it
        work = tmp_path / f"attempt_{attempt}"
        work.mkdir()
        port = _free_port()
        pair = [_start(["pair", str(i), str(port), str(work)], work / f"process_{i}.log") for i in (0, 1)]
        try:
            _run_all(pair, deadline)
            break
        except AssertionError as e:
            if "Failed to start RPC server" not in str(e) or attempt == 2:
                raise
    for _, log in pair:
        assert "all passed" in log.read_text(), log.read_text()

    one = _start(["single", str(work)], work / "single.log")
    _run_all([one], time.monotonic() + 120)
    assert "all passed" in one[1].read_text(), one[1].read_text()
