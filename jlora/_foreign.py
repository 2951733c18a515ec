"""What every foreign format shares: leaf names, the layers of a stack, atomic writes.

A format module (`_peft`, `_gguf`) maps each adapted leaf — and, for a stacked (scanned)
kernel, each of its layers — to a name in the foreign file with one function, used both
ways: export names what it writes with it, import applies it to every leaf of ``params``
to find where each foreign tensor goes. `name_mapping` turns what a user passes (a
callable ``(path, index)`` or ``(path)``, or a dict) into that one function. Files are
written beside their destination and moved into place, so a crash leaves the old file(s)
or the new ones, never a mix.
"""

from __future__ import annotations

import ctypes
import errno
import inspect
import os
import shutil
import sys
import tempfile
from collections.abc import Callable, Mapping
from pathlib import Path

import numpy as np

from jlora._layout import Layout

_CONTAINERS = ("layers", "layer", "blocks", "block", "h")  # where a scanned stack's layer index goes


# --------------------------------------------------------------------------- names


def with_index(name: str, index: tuple[int, ...]) -> str:
    """``index`` put into a dotted module name after its first layer container (else its first part)."""
    if not index:
        return name
    parts = name.split(".")
    at = next((i for i, part in enumerate(parts) if part in _CONTAINERS), 0) + 1
    parts[at:at] = [str(i) for i in index]
    return ".".join(parts)


def _takes_index(fn) -> bool:
    """Whether a ``module_name`` callable takes ``(path, index)`` rather than ``(path)``."""
    try:
        inspect.signature(fn).bind("path", ())
    except TypeError:
        return False
    except ValueError:  # no signature (a builtin): call it the old way
        return False
    return True


def name_mapping(mapping, default: Callable | None, argument: str,
                 what: str) -> Callable[[str, tuple[int, ...]], str | None]:
    """``mapping`` as one function ``(path, index) -> name`` (``index``: a stacked kernel's stack
    indices, ``()`` when unstacked).

    ``mapping`` is a callable ``(path, index)``; a callable ``(path)``, whose name gets a
    stacked kernel's index inserted by `with_index`; a dict ``{path: name}`` (a ``{}`` in a
    stacked kernel's name takes the index; paths it lacks go to ``default``); or None
    (``default``). A name of None means "no name": the format says what that costs.

    >>> f = name_mapping({"p/layers/q/kernel": "model.layers.{}.q"}, None, "module_name", "name")
    >>> f("p/layers/q/kernel", (3,)), f("p/other/kernel", ())
    ('model.layers.3.q', None)
    """
    fallback = default or (lambda path, index: None)
    if mapping is None:
        return fallback
    if isinstance(mapping, Mapping):
        table = dict(mapping)

        def from_table(path, index):
            name = table.get(path)
            if name is None:
                return fallback(path, index)
            if not isinstance(name, str) or not index:
                return name
            return name.format(*index) if "{" in name else with_index(name, index)

        return from_table
    if callable(mapping):
        if _takes_index(mapping):
            return mapping

        def one_argument(path, index):
            name = mapping(path)
            return with_index(name, index) if index and isinstance(name, str) else name

        return one_argument
    raise TypeError(f"{argument} must be a callable (leaf path, and for a stacked kernel its layer index -> "
                    f"{what}) or a dict {{path: name}}, got {type(mapping).__name__}.")


def one_layer(layout: Layout, shape) -> tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]:
    """``(stack shape, one layer's shape, its in_axes)`` of a kernel: the stack axes taken out."""
    rest = [i for i in range(len(shape)) if i not in layout.stack_axes]
    return (tuple(shape[i] for i in layout.stack_axes), tuple(shape[i] for i in rest),
            tuple(rest.index(i) for i in layout.in_axes))


def stack_shape(layouts, path: str, shape) -> tuple[int, ...]:
    """The sizes of the stack axes that ``layouts`` (a `LoraConfig` or None) gives the leaf at ``path``."""
    rule = None if layouts is None else layouts.rule_for(path)
    return () if rule is None else tuple(shape[i] for i in rule.stack_axes)


def restack(got: Mapping[tuple[int, ...], Mapping[str, np.ndarray]], stack: tuple[int, ...]):
    """One stacked kernel's per-layer factors ``{layer index: {"a": .., "b": ..}}`` as arrays
    leading with the ``stack`` axes: ``(factors, [])``, or ``({}, the missing layer indices)``."""
    order = list(np.ndindex(*stack))
    missing = [i for i in order if i not in got]
    if missing:
        return {}, missing
    first = got[order[0]]
    return {k: np.stack([got[i][k] for i in order]).reshape(*stack, *first[k].shape) for k in first}, []



# --------------------------------------------------------------------------- files


def user_path(directory) -> Path:
    """A folder argument as an absolute path: str or PathLike, ``~`` expanded, symlinks followed."""
    if not isinstance(directory, str | os.PathLike):
        raise TypeError(f"expected a folder path (str or pathlib.Path), got {type(directory).__name__}.")
    return Path(os.path.realpath(Path(directory).expanduser()))


_AT_FDCWD, _RENAME_EXCHANGE = -100, 2


def exchange(a: Path, b: Path) -> bool:
    """Swap two paths in one step (Linux ``renameat2(RENAME_EXCHANGE)``); False where the system cannot."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):  # no glibc 2.28+ (musl, old systems)
        return False
    renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    if renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):  # the file system cannot swap
        return False
    raise OSError(code, os.strerror(code), str(b))


def fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # not every system opens folders
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def write_folder(directory: Path, files: dict[str, bytes], who: str) -> None:
    """Put ``files`` (name -> bytes, in replace order) into ``directory`` as one change where the system can.

    They are written and synced in a temporary folder beside ``directory`` (same file system),
    then: a missing or empty ``directory`` is replaced by that folder in one rename; an
    existing one gets its other entries carried over (files hard-linked, folders moved back
    after) and is swapped with it in one step (`exchange`); where no swap exists the files
    are replaced one by one, in the order given.
    """
    if directory.exists() and not directory.is_dir():
        raise FileExistsError(f"{who}: {directory} is a file; give a folder path (it is created if "
                              "missing).")
    directory.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{directory.name}.", suffix=".tmp", dir=directory.parent))
    try:
        for name, data in files.items():
            with open(tmp / name, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
        os.chmod(tmp, directory.stat().st_mode & 0o7777 if directory.exists() else 0o755)
        fsync_dir(tmp)
        try:
            os.rename(tmp, directory)  # POSIX: atomic onto a missing or empty folder
            fsync_dir(directory.parent)
            return
        except OSError:
            pass
        moved = []
        for entry in directory.iterdir():
            if entry.name in files:
                continue
            if entry.is_file() and not entry.is_symlink():
                try:
                    os.link(entry, tmp / entry.name)
                except OSError:
                    shutil.copy2(entry, tmp / entry.name)
            else:
                moved.append(entry.name)
        if exchange(tmp, directory):
            for name in moved:  # tmp now holds the old folder
                try:
                    os.rename(tmp / name, directory / name)
                except OSError as e:
                    kept, tmp = tmp, None  # never delete what could not be moved back
                    raise OSError(f"{who}: wrote the new adapter to {directory}, but could not move "
                                  f"{name} "
                                  f"back into it ({e}); it is in {kept}: move it by hand.") from e
        else:
            for name in files:
                os.replace(tmp / name, directory / name)
        fsync_dir(directory.parent)
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)


def write_file(path: Path, write: Callable[[str], None]) -> None:
    """``write(tmp)`` a file beside ``path``, sync it, and rename it onto ``path`` in one step; on any
    failure the old ``path`` (if any) is untouched and the temporary file removed."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        with open(tmp, "rb") as file:
            os.fsync(file.fileno())
        os.replace(tmp, path)
        fsync_dir(path.parent)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
