"""The suite's warnings policy (``filterwarnings`` in pyproject.toml), checked against the live filters.

Every warning is an error, except a deprecation attributed to a module that is not ours,
which is shown (pytest lists it in the warnings summary). Python's filters match the module
a warning is attributed to, so each case names that module with ``warn_explicit``; inside
``catch_warnings(record=True)`` the active filters stay as pytest set them, and a shown
warning lands in the list instead of the summary.
"""

from __future__ import annotations

import pathlib
import subprocess
import sys
import warnings

import jax
import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
DEPRECATIONS = (DeprecationWarning, PendingDeprecationWarning, FutureWarning)
OURS = ("jlora", "jlora._sharding", "test_sharding", "tests.test_sharding", "conftest", "models",
        "_sharded_child", "readme")
THEIRS = ("orbax.checkpoint._src.serialization", "flax.linen", "jax._src.sharding_impls", "jloraextra",
          "models_zoo", "readmes")


def _raised(category, module: str) -> bool:
    with warnings.catch_warnings(record=True) as shown:
        try:
            warnings.warn_explicit("a name going away", category, "somewhere.py", 1, module=module)
        except category:
            return True
    assert len(shown) == 1, (category, module, shown)
    return False


@pytest.mark.parametrize("category", DEPRECATIONS)
@pytest.mark.parametrize("module", OURS)
def test_our_deprecations_are_errors(category, module):
    assert _raised(category, module)


@pytest.mark.parametrize("category", DEPRECATIONS)
@pytest.mark.parametrize("module", THEIRS)
def test_a_dependency_deprecation_is_shown_not_raised(category, module):
    assert not _raised(category, module)


@pytest.mark.parametrize("module", THEIRS + OURS)
def test_other_warnings_are_errors_wherever_they_come_from(module):
    assert _raised(UserWarning, module)
    assert _raised(RuntimeWarning, module)


def _pytest_on(tmp_path, files: dict[str, str]) -> subprocess.CompletedProcess:
    """Run pytest with this project's settings on ``files`` written to ``tmp_path``, in a new process
    (jax warns of a deprecated name once per process, on its first use)."""
    tmp_path.mkdir()
    for name, text in files.items():
        (tmp_path / name).write_text(text)
    return subprocess.run([sys.executable, "-m", "pytest", "-c", str(ROOT / "pyproject.toml"), "--rootdir",
                           str(tmp_path), "-o", "addopts=", "-p", "no:cacheprovider", str(tmp_path)],
                          capture_output=True, text=True, timeout=300, cwd=tmp_path)


@pytest.mark.skipif(not hasattr(jax.sharding, "is_single_device_sharding"),
                    reason="jax < 0.12 does not deprecate SingleDeviceSharding")
def test_a_deprecated_jax_name_fails_on_our_line_and_is_listed_on_theirs(tmp_path):
    use = "import jax\n\nSHARDING = jax.sharding.SingleDeviceSharding\n"
    deprecated = "DeprecationWarning: jax.sharding.SingleDeviceSharding is deprecated"
    in_a_test = "def test_it():\n    " + use.replace("\n", "\n    ")
    ours = _pytest_on(tmp_path / "ours", {"test_ours.py": in_a_test})
    assert ours.returncode == 1 and deprecated in ours.stdout, ours
    theirs = _pytest_on(tmp_path / "theirs", {"somelib.py": use, "test_theirs.py": "import somelib\n\n\n"
                                              "def test_it():\n    assert somelib.SHARDING\n"})
    assert theirs.returncode == 0, theirs
    summary = theirs.stdout.split("warnings summary")[1]
    assert f"somelib.py:3: {deprecated}" in summary, theirs
