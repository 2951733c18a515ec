"""Reading JAX primitives' parameters across jax releases.

JAX renames primitive parameters between releases (``scan`` replaced ``num_consts`` and
``num_carry`` by ``ft_in`` in 0.11). The rewrite and the layout analysis read every
parameter through `param`, so that the next rename says which primitive changed, in which
jax, instead of raising a bare ``KeyError``.
"""

from __future__ import annotations

import jax


class UnsupportedJax(RuntimeError):
    """A primitive of the installed jax carries parameters this jlora does not know."""


def param(eqn, name: str):
    """``eqn.params[name]``, or an error naming the primitive and the jax version when it is gone.

    JAX renames primitive parameters between releases (``scan`` replaced ``num_consts`` and
    ``num_carry`` by ``ft_in`` in 0.11); the rewrite reads every parameter through here so
    that the next rename says what changed instead of raising a bare ``KeyError``.
    """
    try:
        return eqn.params[name]
    except KeyError:
        raise UnsupportedJax(
            f"jlora cannot read the '{eqn.primitive.name}' primitive of jax {jax.__version__}: it has no "
            f"parameter {name!r} (it has {sorted(eqn.params)}). This jax is newer than the ones jlora was "
            "tested with; upgrade jlora, or install a supported jax (see the README's supported versions). "
            "wrap(..., strategy='merge') does not read primitives and works meanwhile."
        ) from None


def scan_counts(eqn) -> tuple[int, int]:
    """How many of a ``scan``'s operands are constants and loop carries (jax <= 0.10 and >= 0.11)."""
    if "num_consts" in eqn.params:  # jax <= 0.10
        return param(eqn, "num_consts"), param(eqn, "num_carry")
    groups = param(eqn, "ft_in").unpack()  # jax >= 0.11: a flat tree of (consts, carry, xs)
    if len(groups) != 3:
        raise UnsupportedJax(
            f"jlora cannot read the 'scan' primitive of jax {jax.__version__}: its ft_in has {len(groups)} "
            "groups where jlora expects three (constants, carry, scanned inputs). Upgrade jlora, or use "
            "wrap(..., strategy='merge') meanwhile."
        )
    return len(groups[0]), len(groups[1])
