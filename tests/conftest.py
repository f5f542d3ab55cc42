"""Test setup, before jax loads: 8 fake CPU devices, fast compiles, the persistent cache."""

import os

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
