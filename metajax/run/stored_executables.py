"""Compiled XLA executables kept on disk, for the step cache's warmest start.

A hit of :mod:`metajax.run.step_cache`'s exported program still lowers a wrapper around it
and looks the wrapper up in JAX's persistent compilation cache; for a small step that is
most of a warm start (JAX loads its LAPACK bindings while lowering). An executable stored
here is loaded as it is (``jax.experimental.serialize_executable``): no lowering, no
hashing of the program. For a large step the loading itself dominates (benchmarks/README.md,
``loop``).

An executable holds machine code for one backend build and one kind of machine, so its key
is the program's key plus the backend's platform version, the ``XLA_FLAGS``, the jax
settings that change compilation, this process's index and, on a CPU, the processor's model
and instruction-set flags. A program with a custom call (LAPACK through ``jnp.linalg``, say)
is not stored: its handlers are registered while lowering, which a loaded executable skips.

Loading runs code from the file, as a hit of the persistent compilation cache does: keep the
cache folder as private as that one.
"""

from __future__ import annotations

import json
import os
import pickle
import platform
import re
import sys
from pathlib import Path

import jax
from jax.experimental import serialize_executable
from jax.experimental.compilation_cache import compilation_cache

SUFFIX = ".xlaexec"
# jax settings that change what XLA compiles a traced program to.
_COMPILE_FLAGS = (
    "jax_exec_time_optimization_effort",
    "jax_memory_fitting_effort",
    "jax_compiler_enable_remat_pass",
    "jax_optimization_level",
)
# Custom calls XLA itself implements (sharding annotations); any other target needs a handler
# that jax registers while lowering.
_BUILTIN_CALLS = frozenset({"Sharding", "SPMDFullToShardShape", "SPMDShardToFullShape"})
_CUSTOM_CALL = re.compile(r"custom_call @([\w.$-]+)")


def key_text(program_key: str, devices) -> str:
    """The executable's key: the traced program's key, the ids of the devices it runs on in
    the order of its device assignment, and what the compiled code depends on."""
    backend = devices[0].client
    described = {
        "program": program_key,
        "devices": [d.id for d in devices],
        "platform": [backend.platform, backend.platform_version],
        "xla_flags": os.environ.get("XLA_FLAGS", ""),
        "flags": {name: str(getattr(jax.config, name, None)) for name in _COMPILE_FLAGS},
        "process": jax.process_index(),
        "machine": _machine() if backend.platform == "cpu" else platform.machine(),
    }
    return json.dumps(described, sort_keys=True)


def _machine() -> str:
    """The processor's architecture, model and feature flags (Linux), else what Python knows."""
    wanted = ("model name", "flags", "features", "cpu model")
    found = {}
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                name, _, value = line.partition(":")
                name = name.strip().lower()
                if name in wanted and name not in found:
                    found[name] = value.strip()
                if not line.strip() and found:
                    break  # the first processor's block is enough
    except OSError:
        pass
    return json.dumps([platform.machine(), platform.processor(), found], sort_keys=True)


def storable(module_text: str) -> bool:
    """Whether a program (its StableHLO text) runs from a loaded executable: no custom calls
    but XLA's own."""
    return set(_CUSTOM_CALL.findall(module_text)) <= _BUILTIN_CALLS


def load(path: Path, text: str, devices):
    """The stored executable (a ``jax.stages.Compiled``) for ``devices`` if ``path`` holds
    one for exactly ``text``, else None; a file that no longer loads (a changed runtime) is
    ignored."""
    payload = read_entry(path, text)
    if payload is None:
        return None
    try:
        in_tree, out_tree, executable = pickle.loads(payload)
        return serialize_executable.deserialize_and_load(
            executable, in_tree, out_tree, execution_devices=devices
        )
    except Exception as e:  # noqa: BLE001 - any failure only costs the next compile
        print(
            f"metajax: stored executable {path.name} not loaded ({e}); compiling.", file=sys.stderr
        )
        return None


def compile_and_store(lowered, path: Path, text: str):
    """``lowered.compile()``, stored under ``text`` when this backend can serialise it.

    Compiled without reading the persistent compilation cache: an executable that cache
    served cannot be serialised again (XLA:CPU keeps only the loaded code; a copy of it
    fails at its first call with "Function ... not found").
    """
    was_enabled = jax.config.jax_enable_compilation_cache
    jax.config.update("jax_enable_compilation_cache", False)
    compilation_cache.reset_cache()
    try:
        compiled = lowered.compile()
    finally:
        jax.config.update("jax_enable_compilation_cache", was_enabled)
        compilation_cache.reset_cache()
    try:
        executable, in_tree, out_tree = serialize_executable.serialize(compiled)
    except Exception:  # noqa: BLE001 - e.g. a backend without serialisation
        return compiled
    write_entry(path, text, pickle.dumps((in_tree, out_tree, executable)))
    return compiled


def read_entry(path: Path, text: str) -> bytes | None:
    """The stored bytes if ``path`` holds an entry for exactly ``text``, else None."""
    try:
        data = path.read_bytes()
    except OSError:
        return None
    header, sep, blob = data.partition(b"\n")
    if not sep or header.decode("utf-8", "replace") != text:
        return None
    return blob


def write_entry(path: Path, text: str, blob: bytes) -> bool:
    """Stores atomically (a half-written file is never read); False if the folder is not
    writable, which only costs the next process a trace."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
        tmp.write_bytes(text.encode() + b"\n" + blob)
        os.replace(tmp, path)
        return True
    except OSError as e:
        print(
            f"metajax: step cache {path.parent} not writable ({e}); tracing next time.",
            file=sys.stderr,
        )
        return False
