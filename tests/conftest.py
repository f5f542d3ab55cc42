"""Test setup, before jax loads: 8 fake CPU devices, fast compiles, the persistent cache."""

import os
from pathlib import Path

import pytest

# Tests compile many small programs and run each a few times: XLA's backend optimisation
# level 0 compiles several times faster (benchmarks never use it).
os.environ.setdefault(
    "XLA_FLAGS",
    "--xla_force_host_platform_device_count=8 --xla_backend_optimization_level=0",
)
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402

_default_cache = os.path.expanduser("~/.cache/metajax-tests-jax")
jax.config.update("jax_compilation_cache_dir", os.environ.get("METAJAX_TEST_CACHE", _default_cache))
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)

# Data folders come from a config or these variables only. A checkout beside the project's
# ../shared/data reads that copy; tests that need data skip (``data_dir``) when it is absent.
SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
DATA_VARIABLES = {
    "omniglot": "METAJAX_OMNIGLOT_DIR",
    "fewrel": "METAJAX_FEWREL_DIR",
    "movietweetings": "METAJAX_MOVIETWEETINGS_DIR",
}
for _name, _variable in DATA_VARIABLES.items():
    if (SHARED_DATA / _name).is_dir():
        os.environ.setdefault(_variable, str(SHARED_DATA / _name))


def data_dir(name: str) -> Path:
    """The folder the data variable of ``name`` (a key of ``DATA_VARIABLES``) points at;
    a folder that does not exist when the variable is unset."""
    return Path(os.environ.get(DATA_VARIABLES[name]) or SHARED_DATA / name)


def needs_data(name: str):
    """Skips a test when the data of ``name`` is absent, saying which variable to set."""
    return pytest.mark.skipif(
        not data_dir(name).is_dir(),
        reason=f"needs the {name} data: set ${DATA_VARIABLES[name]} (or ../shared/data/{name})",
    )
