import jax
import pytest

# The fixture scripts run in their own torch environment (each says how); the suite reads what they wrote.
collect_ignore_glob = ["fixtures/*.py"]

# Strict numerics: a float32 delta silently promoting a bf16 kernel, or an
# accidental broadcast, fails the test instead of passing unnoticed. Tests that
# run third-party code which relies on implicit promotion (optax's Adam bias
# correction raises an int step count to a float power) opt out with
# @pytest.mark.standard_promotion; jlora's own code stays strict there too,
# because it is also exercised by the strict tests.
jax.config.update("jax_numpy_rank_promotion", "raise")


def pytest_configure(config):
    config.addinivalue_line("markers", "standard_promotion: run with JAX's standard dtype promotion")


@pytest.fixture(autouse=True)
def _strict_promotion(request):
    mode = "standard" if request.node.get_closest_marker("standard_promotion") else "strict"
    with jax.numpy_dtype_promotion(mode):
        yield


@pytest.fixture
def key():
    return jax.random.key(0)
