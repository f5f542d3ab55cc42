"""Compiled train-step programs, with their traced form kept across processes.

JAX's persistent compilation cache keeps XLA executables keyed by the program's StableHLO,
so a new process still traces the whole meta-step to find its entry, and tracing
second-order gradients through an unrolled inner loop is slow. This cache keeps the traced
program itself (``jax.export``, serialised): a new process deserialises it, traces only a
one-call wrapper around it, and the wrapper's compilation hits the persistent compilation
cache. A family whose loss closed over arrays read from files outside the config would need
them in the key; none does.

The key is a SHA-256 of everything the program depends on: the caller's description of it
(``identity``: the config and how the loop calls the step), the tree structure, shapes,
dtypes and shardings of the inputs, the devices, the versions of Python, jax, jaxlib, optax,
flax, chex and numpy, the jax settings that change traced programs, and the source of every
``metajax`` module (a code change re-traces; a source file changed while the process runs
bypasses the cache). The file also stores the key's full text and a hit must match it
exactly, so a hash collision or a hand-copied file is never run.

``jax.export`` keeps the shardings of the inputs and outputs but not donation: the wrapper
``jit`` donates the state (argument 0), as the fresh step does. A fresh trace goes through
the same serialise-deserialise round trip as a hit, so both run one program.

The cache lives in ``<jax compilation cache dir>/metajax-steps`` and is off whenever the
compilation cache is (``metajax train --cache-dir none``); ``$METAJAX_STEP_CACHE`` set to a
folder moves it, set to ``none`` turns it off alone. This module only reads jax's settings:
the CLI sets them.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import sys
import time
from collections.abc import Callable
from importlib import metadata
from pathlib import Path
from typing import Any

import jax

import metajax

SUFFIX = ".jaxexport"
# jax settings that change what a function traces to.
_TRACE_FLAGS = (
    "jax_enable_x64",
    "jax_default_matmul_precision",
    "jax_default_prng_impl",
    "jax_threefry_partitionable",
    "jax_numpy_dtype_promotion",
    "jax_numpy_rank_promotion",
)
_PACKAGES = ("jax", "jaxlib", "optax", "flax", "chex", "numpy")


def default_directory() -> Path | None:
    """Where programs are kept: ``$METAJAX_STEP_CACHE``, else beside the compilation cache.

    None (no cache) when ``$METAJAX_STEP_CACHE`` is ``none``, or when the persistent
    compilation cache is off or not on a local file system.
    """
    if not available():
        return None
    override = os.environ.get("METAJAX_STEP_CACHE")
    if override:
        return None if override.lower() == "none" else Path(override).expanduser()
    cache_dir = jax.config.jax_compilation_cache_dir
    if not jax.config.jax_enable_compilation_cache or not cache_dir or "://" in str(cache_dir):
        return None
    return Path(cache_dir).expanduser() / "metajax-steps"


def available() -> bool:
    """Whether ``jax.export`` can serialise here (it needs the ``flatbuffers`` package)."""
    try:
        import flatbuffers  # noqa: F401
    except ImportError:
        return False
    return True


def compiled_step(
    fn: Callable,
    state: Any,
    extra: Any,
    *,
    metric_sharding: Any,
    identity: dict,
    directory: Path | None,
) -> tuple[Callable, str]:
    """A compiled ``step(state, extra) -> (state, metrics)``, traced or from the cache.

    Compiled ahead of time (the persistent compilation cache serves the executable), so the
    first call runs the step and nothing else.

    Args:
      fn: ``fn(state, extra) -> (new_state, metrics)``, jittable; ``new_state`` has the tree
        structure of ``state`` and ``metrics`` is a dict of arrays.
      state: the train state (jax arrays; their shapes, dtypes and shardings are the
        step's, input and output).
      extra: the other argument (e.g. the task batch; ``()`` for none), likewise (input).
      metric_sharding: the one sharding of every metric.
      identity: JSON-able description of what ``fn`` computes that its inputs' shapes do
        not show (the config, steps per call, where tasks are sampled).
      directory: the cache folder; None traces every time and writes nothing.

    Returns:
      ``(step, how)``: the step, which donates its ``state``; ``how`` is ``"cached"`` (the
      stored program, compiled or served by the persistent compilation cache), ``"traced"``
      (traced now and stored) or ``"traced, not stored"`` (no cache folder, sources changed
      since the process started, a folder not writable or a program ``jax.export`` refuses,
      e.g. one with a host callback; the last two are said on stderr).
    """
    state_leaves, state_tree = jax.tree.flatten(state)
    extra_leaves, extra_tree = jax.tree.flatten(extra)
    in_shardings = ([x.sharding for x in state_leaves], [x.sharding for x in extra_leaves])
    out_shardings = (in_shardings[0], metric_sharding)
    avals = jax.tree.map(
        lambda x, s: jax.ShapeDtypeStruct(
            x.shape, x.dtype, sharding=s, weak_type=jax.typeof(x).weak_type
        ),
        [state_leaves, extra_leaves],
        list(in_shardings),
    )
    program = _flat(fn, state_tree, extra_tree)
    source = source_digest() if directory is not None and available() else None
    blob, how = None, "traced, not stored"
    if source is not None:
        leaves = (state_leaves, extra_leaves)
        text = _key_text(identity, (state_tree, extra_tree), leaves, in_shardings, source)
        path = Path(directory) / (hashlib.sha256(text.encode()).hexdigest()[:40] + SUFFIX)
        blob, how = read_entry(path, text), "cached"
        if blob is None:
            traced = jax.jit(program, in_shardings=in_shardings, out_shardings=out_shardings)
            blob = _exported(traced, avals)
            if blob is not None and write_entry(path, text, blob):
                how = "traced"
            else:
                how = "traced, not stored"
    if blob is not None:
        # A fresh trace runs the deserialised program too: a hit runs the very same one.
        program = jax.export.deserialize(blob).call
    donating = jax.jit(
        program, in_shardings=in_shardings, out_shardings=out_shardings, donate_argnums=(0,)
    )
    compiled = donating.lower(*avals).compile()
    return _unflattened(compiled, state_tree, extra_tree), how


def _exported(traced, avals) -> bytes | None:
    """The serialised program, or None (said on stderr) when ``jax.export`` refuses it."""
    try:
        return bytes(jax.export.export(traced)(*avals).serialize())
    except Exception as e:  # noqa: BLE001 - e.g. a host callback: run it uncached
        print(
            f"metajax: this step cannot be exported ({type(e).__name__}: "
            f"{str(e)[:200]}); it is traced in every process.",
            file=sys.stderr,
        )
        return None


def _unflattened(compiled, state_tree, extra_tree) -> Callable:
    """``compiled`` over flat leaves, as ``step(state, extra) -> (state, metrics)``."""

    def step(state, extra):
        leaves, metrics = compiled(state_tree.flatten_up_to(state), extra_tree.flatten_up_to(extra))
        return state_tree.unflatten(leaves), metrics

    return step


def _flat(fn, state_tree, extra_tree):
    """``fn`` over flat lists of leaves: ``jax.export`` serialises no custom pytree nodes."""

    def flat(state_leaves, extra_leaves):
        new_state, metrics = fn(
            state_tree.unflatten(state_leaves), extra_tree.unflatten(extra_leaves)
        )
        new_leaves, new_tree = jax.tree.flatten(new_state)
        if new_tree != state_tree:
            raise TypeError(f"the step changed the state's structure: {state_tree} -> {new_tree}.")
        if not isinstance(metrics, dict):
            raise TypeError(f"the step's metrics must be a dict, got {type(metrics).__name__}.")
        return new_leaves, metrics

    return flat


def _key_text(identity, trees, leaves, in_shardings, source: str) -> str:
    devices = jax.devices()
    described = {
        "identity": identity,
        "trees": [str(t) for t in trees],
        "inputs": [
            [
                [str(jax.typeof(x)), bool(jax.typeof(x).weak_type), _sharding_text(s)]
                for x, s in zip(group, shardings, strict=True)
            ]
            for group, shardings in zip(leaves, in_shardings, strict=True)
        ],
        "devices": [
            jax.default_backend(),
            devices[0].device_kind,
            len(devices),
            jax.process_count(),
        ],
        "versions": [platform.python_version(), *(_version(p) for p in _PACKAGES)],
        "flags": {name: str(getattr(jax.config, name, None)) for name in _TRACE_FLAGS},
        "source": source,
    }
    return json.dumps(described, sort_keys=True, default=str)


def _sharding_text(sharding) -> str:
    mesh = getattr(sharding, "mesh", None)
    if mesh is None:
        return repr(sharding)
    return f"{dict(mesh.shape)} {getattr(sharding, 'spec', '')} {getattr(mesh, 'axis_types', '')}"


def _version(package: str) -> str:
    try:
        return f"{package}=={metadata.version(package)}"
    except metadata.PackageNotFoundError:
        return f"{package} (not installed)"


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


def _process_start() -> float:
    """When this process started (Linux: its /proc entry), else when this module loaded."""
    try:
        return os.stat(f"/proc/{os.getpid()}").st_mtime
    except OSError:
        return _LOADED


_LOADED = time.time()


def source_digest() -> str | None:
    """SHA-256 of every ``metajax`` source file (paths and contents); None when one changed
    after this process started, since the code it runs may then not be the code on disk."""
    root = Path(metajax.__file__).resolve().parent
    started = _process_start()
    h = hashlib.sha256()
    for path in sorted(root.rglob("*.py")):
        data = path.read_bytes()
        if path.stat().st_mtime > started:
            return None
        h.update(str(path.relative_to(root)).encode() + b"\0" + data + b"\0")
    return h.hexdigest()
