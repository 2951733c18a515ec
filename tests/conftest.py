import jax
import pytest

# Strict numerics: a float32 delta silently promoting a bf16 kernel, or an
# accidental broadcast, fails the test instead of passing unnoticed.
jax.config.update("jax_numpy_dtype_promotion", "strict")
jax.config.update("jax_numpy_rank_promotion", "raise")


@pytest.fixture
def key():
    return jax.random.key(0)
