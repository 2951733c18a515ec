"""The two stacks `make test` runs the suite on, pinned in committed lock files.

    python3 .ci/stacks.py oldest          # pip constraints for the oldest stack (.ci/oldest.lock)
    python3 .ci/stacks.py newest          # pip constraints for the newest stack (.ci/newest.lock)
    python3 .ci/stacks.py lower-bounds    # every lower bound in pyproject.toml, pinned exactly
    python3 .ci/stacks.py newest-python   # the newest Python here that the newest jax supports
    python3 .ci/stacks.py lock NAME PYTHON   # write PYTHON's environment as .ci/NAME.lock

The oldest stack is Python 3.11 with every lower bound in pyproject.toml pinned exactly and
the packages they pull in at the versions recorded in ``oldest.lock``; the newest stack is
the newest Python with the exact versions in ``newest.lock``. Both gate CI, so a release
upstream never turns main red on its own: ``make test-latest`` resolves the newest releases
afresh, runs the suite, and on success rewrites ``newest.lock`` (and its line in
BUILD_NOTES.md) for one commit; ``make relock-oldest`` does the same for the packages under
the lower bounds.
"""

from __future__ import annotations

import datetime
import pathlib
import re
import shutil
import subprocess
import sys
import tomllib

ROOT = pathlib.Path(__file__).resolve().parent.parent
CI = ROOT / ".ci"
NEWEST_FIRST = ("3.13", "3.12")  # the newest jax (0.12) supports both; 3.14 has no jaxlib wheels yet
NOTES_MARK = "<!-- newest-lock -->"  # the BUILD_NOTES.md line `lock newest` rewrites starts with it


def _name(spec: str) -> str:
    """A requirement's project name, normalised the way pip compares names."""
    return re.sub(r"[-_.]+", "-", re.match(r"[A-Za-z0-9_.\-]+", spec.strip())[0]).lower()


def _requirements() -> list[str]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    specs = list(project["dependencies"])
    for extra in ("dev", "examples"):
        specs += project["optional-dependencies"][extra]
    return specs


def lower_bounds() -> dict[str, str]:
    """``{name: 'name==lower bound'}`` for every requirement of the tested extras (jaxlib follows jax)."""
    pins = {}
    for spec in _requirements():
        m = re.fullmatch(r"([A-Za-z0-9_.\-]+)\s*>=\s*([0-9][0-9A-Za-z.]*)(,.*)?", spec.strip())
        if not m:
            raise SystemExit(f"{spec!r} in pyproject.toml has no '>=' lower bound to pin")
        pins[_name(m[1])] = f"{m[1]}=={m[2]}"
        if _name(m[1]) == "jax":
            pins["jaxlib"] = f"jaxlib=={m[2]}"
    return pins


def read_lock(name: str) -> dict[str, str]:
    """``{name: 'name==version'}`` from ``.ci/NAME.lock`` (comments and blank lines skipped)."""
    path = CI / f"{name}.lock"
    if not path.exists():
        target = "relock-oldest" if name == "oldest" else "test-latest"
        raise SystemExit(f"{path} is missing; make it with `make {target}`")
    pins = {}
    for line in path.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            if "==" not in line:
                raise SystemExit(f"{path}: {line!r} is not an exact 'name==version' pin")
            pins[_name(line)] = line
    return pins


def constraints(name: str) -> list[str]:
    """The pins of one stack, refusing a lock that has fallen behind pyproject.toml."""
    lock = read_lock(name)
    fix = "make relock-oldest" if name == "oldest" else "make test-latest"
    missing = [spec for spec in _requirements() if _name(spec) not in lock]
    if missing:
        raise SystemExit(f".ci/{name}.lock pins none of {', '.join(missing)} (new in pyproject.toml); "
                         f"run `{fix}` and commit the lock")
    if name == "oldest":
        stale = [f"{lock[n]} (lower bound {pin})" for n, pin in lower_bounds().items() if lock.get(n) != pin]
        if stale:
            raise SystemExit(f".ci/oldest.lock disagrees with pyproject.toml's lower bounds: "
                             f"{', '.join(stale)}; run `{fix}` and commit the lock")
    return sorted(lock.values(), key=str.lower)


def write_lock(name: str, python: str) -> None:
    """Freeze ``python``'s environment (less jlora itself) into ``.ci/NAME.lock``; date it in
    BUILD_NOTES.md."""
    frozen = subprocess.run([python, "-m", "pip", "freeze", "--exclude-editable"], check=True,
                            capture_output=True, text=True).stdout.split()
    version = subprocess.run([python, "-c", "import sys; print(sys.version.split()[0])"], check=True,
                             capture_output=True, text=True).stdout.strip()
    pins = sorted((p for p in frozen if "==" in p and _name(p) != "jlora"), key=str.lower)
    today = datetime.date.today().isoformat()
    header = (f"# The {name} stack, resolved {today} on Python {version} by `make "
              f"{'relock-oldest' if name == 'oldest' else 'test-latest'}` after the suite passed on it.\n")
    (CI / f"{name}.lock").write_text(header + "\n".join(pins) + "\n")
    if name == "newest":
        versions = {_name(p): p.split("==")[1] for p in pins}
        line = (f"{NOTES_MARK} Newest lock: resolved {today} on Python {version}, jax {versions['jax']}, "
                f"flax {versions['flax']}, optax {versions['optax']}, orbax-checkpoint "
                f"{versions['orbax-checkpoint']} (`make test-latest` passed; `.ci/newest.lock`).")
        notes = ROOT / "BUILD_NOTES.md"
        text = notes.read_text()
        if NOTES_MARK not in text:
            raise SystemExit(f"BUILD_NOTES.md has no line starting with {NOTES_MARK} to date the lock on")
        notes.write_text(re.sub(re.escape(NOTES_MARK) + r".*", lambda _: line, text, count=1))
    print(f"wrote .ci/{name}.lock ({len(pins)} pins); commit it")


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
    command, args = (sys.argv[1], sys.argv[2:]) if len(sys.argv) > 1 else ("", [])
    if command in ("oldest", "newest") and not args:
        print("\n".join(constraints(command)))
    elif command == "lower-bounds" and not args:
        print("\n".join(lower_bounds().values()))
    elif command == "newest-python" and not args:
        print(newest_python())
    elif command == "lock" and len(args) == 2 and args[0] in ("oldest", "newest"):
        write_lock(*args)
    else:
        raise SystemExit(__doc__)
