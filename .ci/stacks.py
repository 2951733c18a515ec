"""The two stacks `make test` runs the suite on.

    python3 .ci/stacks.py oldest          # pip constraints: every lower bound in pyproject.toml, pinned exactly
    python3 .ci/stacks.py newest-python   # the newest Python here that the newest jax supports

The oldest stack is Python 3.11 with each dependency at the lowest version pyproject.toml
allows (jaxlib follows jax); the newest stack is the newest Python with the newest releases.
"""

from __future__ import annotations

import pathlib
import re
import shutil
import subprocess
import sys
import tomllib

ROOT = pathlib.Path(__file__).resolve().parent.parent
NEWEST_FIRST = ("3.13", "3.12")  # the newest jax (0.12) supports both; 3.14 has no jaxlib wheels yet


def lower_bounds() -> list[str]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    specs = list(project["dependencies"])
    for extra in ("dev", "examples"):
        specs += project["optional-dependencies"][extra]
    pins = []
    for spec in specs:
        m = re.fullmatch(r"([A-Za-z0-9_.\-]+)\s*>=\s*([0-9][0-9A-Za-z.]*)(,.*)?", spec.strip())
        if not m:
            raise SystemExit(f"{spec!r} in pyproject.toml has no '>=' lower bound to pin")
        pins.append(f"{m[1]}=={m[2]}")
        if m[1] == "jax":
            pins.append(f"jaxlib=={m[2]}")
    return pins


def _works(python: str) -> bool:
    try:
        return subprocess.run([python, "-c", "import venv"], capture_output=True, timeout=60).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


def newest_python() -> str:
    pyenv = pathlib.Path.home() / ".pyenv" / "versions"
    for version in NEWEST_FIRST:
        candidates = [shutil.which(f"python{version}")]
        candidates += sorted(str(p) for p in pyenv.glob(f"{version}*/bin/python{version}"))
        for python in filter(None, candidates):
            if _works(python):
                return python
    raise SystemExit(f"no Python {' or '.join(NEWEST_FIRST)} found for the newest stack; install one")


if __name__ == "__main__":
    command = sys.argv[1] if len(sys.argv) > 1 else ""
    if command == "oldest":
        print("\n".join(lower_bounds()))
    elif command == "newest-python":
        print(newest_python())
    else:
        raise SystemExit(__doc__)
