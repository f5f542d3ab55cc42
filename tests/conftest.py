"""Test setup: 8 fake CPU devices and the persistent compilation cache, before jax loads."""

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402

jax.config.update(
    "jax_compilation_cache_dir", os.environ.get("METAJAX_TEST_CACHE", os.path.expanduser("~/.cache/metajax-tests-jax"))
)
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
