"""The runner's compiled train step: how it is dispatched, and kept across processes.

:func:`fast_steps` dispatches the train loop's steps. A source whose ``sample`` is jittable
in the step (``traceable = True``) is sampled inside the program, :func:`steps_per_call`
meta-steps per dispatch (a ``lax.scan``); any other source is sampled and placed on the
devices by a background thread, one step per dispatch. Either program is compiled ahead of
time by :func:`cached_step`, which keeps the traced program for the next process.

Warm starts: JAX's persistent compilation cache keeps XLA executables, keyed by the
program's StableHLO, so a new process still traces the whole meta-step to find its entry,
and tracing second-order gradients through an unrolled inner loop is slow. This cache keeps
the traced program itself (``jax.export``, serialised): a new process deserialises it,
traces only a one-call wrapper around it, and the wrapper's compilation hits the persistent
compilation cache. Warmer still, the compiled wrapper is kept too
(:mod:`metajax.run.stored_executables`) and loaded without lowering anything. A family
whose loss closed over arrays read from files outside the config would need them in the
key; none does.

The key is a SHA-256 of everything the program depends on: the caller's description of it
(the config and how the loop calls the step), the tree structure, shapes, dtypes and
shardings of the inputs, the devices, the versions of Python, jax, jaxlib, optax, flax,
chex and numpy, the jax settings that change traced programs, and the source of every
``metajax`` module (a code change re-traces; a source file changed while the process runs
bypasses the cache). The file also stores the key's full text and a hit must match it
exactly, so a hash collision or a hand-copied file is never run.

``jax.export`` keeps the shardings of the inputs and outputs but not donation: the wrapper
``jit`` donates the state (argument 0), as the fresh step does. A fresh trace goes through
the same serialise-deserialise round trip as a hit, so both run one program.

The cache lives in ``<jax compilation cache dir>/metajax-steps`` and is off whenever the
compilation cache is (``metajax train --cache-dir none``); ``$METAJAX_STEP_CACHE`` set to a
folder moves it, set to ``none`` turns it off alone.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import platform
import sys
import time
from collections.abc import Callable
from importlib import metadata
from pathlib import Path
from typing import Any, NamedTuple

import jax

import metajax
from metajax import parallel
from metajax.run import stored_executables
from metajax.run.config import Config, to_dict
from metajax.run.stored_executables import read_entry, write_entry
from metajax.tasks.prefetch import prefetch

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
# Meta-steps per dispatch at most, for sources sampled inside the compiled step.
MAX_STEPS_PER_CALL = 100
# Config keys that do not change the compiled step (the steps per call are keyed apart).
_NOT_IN_PROGRAM = ("name", "eval")
_TRAIN_NOT_IN_PROGRAM = ("log_every", "checkpoint_every", "keep_checkpoints")


class Dispatch(NamedTuple):
    """What the loop hands a dispatcher: the step, the state and the task stream.

    Attributes:
      step_fn: ``make_train_step``'s ``step(state, tasks) -> (state, metrics)``.
      state: the placed (or restored) train state; donated to the first dispatch.
      source: the meta-train task source.
      local_tasks: tasks per meta-batch on this process.
      first_task: this process's first task in the global meta-batch.
      prepare: ``prepare(tasks)``: this process's tasks to the step's global input.
      start: the first step.
      bar: the progress display (its ``note`` says when the step is ready).
      clock: called when the timed steps begin.
    """

    step_fn: Callable
    state: Any
    source: Any
    local_tasks: int
    first_task: int
    prepare: Callable
    start: int
    bar: Any
    clock: Callable[[], None]


def steps_per_call(tc, start: int) -> int:
    """Meta-steps per dispatch for a source sampled inside the step: the largest divisor of
    the log and checkpoint intervals, the start and the end step, up to
    :data:`MAX_STEPS_PER_CALL`, so that every log line and checkpoint ends a dispatch."""
    common = math.gcd(tc.log_every, tc.checkpoint_every, start, tc.steps)
    return max(d for d in range(1, min(common, MAX_STEPS_PER_CALL) + 1) if common % d == 0)


def program_identity(config: Config, loop: str, steps: int) -> dict:
    """What a runner's train program is keyed by beyond its inputs' shapes: the config
    (less what never reaches the program), the loop form and the meta-steps per dispatch."""
    data = to_dict(config)
    for key in _NOT_IN_PROGRAM:
        data.pop(key)
    for key in _TRAIN_NOT_IN_PROGRAM:
        data["train"].pop(key)
    return {"runner": "metajax.run.loop", "loop": loop, "steps_per_call": steps, "config": data}


def fast_steps(config: Config, plan: Dispatch, mesh, directory: Path | None):
    """The runner's dispatches: fused and sampled on the devices when the source is
    traceable (``source.traceable``), else one step per dispatch over batches a thread
    samples and places ahead (:func:`metajax.tasks.prefetch`). The step is compiled (or
    read from ``directory``) before the first dispatch, which is timed.

    Yields:
      ``(steps done, state, metrics, count)`` after issuing each dispatch of ``count``
      steps (not waiting for it); metrics have a leading axis ``count`` when fused.
    """
    tc, state, start, bar = config.train, plan.state, plan.start, plan.bar
    rep = parallel.replicated(mesh)
    if start >= tc.steps:
        return
    if getattr(plan.source, "traceable", False):
        k = steps_per_call(tc, start)

        def chunk(state, _):
            def one(state, _):
                # Every process samples the global meta-batch's values (a pure function of
                # the step and the task index); the program keeps each device's shard.
                return plan.step_fn(state, plan.source.sample(state.step, tc.meta_batch))

            return jax.lax.scan(one, state, None, length=k)

        bar.note("compiling the meta-step")
        t0 = time.perf_counter()
        identity = program_identity(config, "fused", k)
        run, how = cached_step(
            chunk, state, (), metric_sharding=rep, identity=identity, directory=directory
        )
        bar.note(
            f"meta-step ready in {time.perf_counter() - t0:.2f} s ({how}; {k} meta-steps "
            "per dispatch)"
        )
        plan.clock()
        for first in range(start, tc.steps, k):
            state, metrics = run(state, ())
            yield first + k, state, metrics, k
        return
    batches = prefetch(
        plan.source,
        start,
        plan.local_tasks,
        plan.first_task,
        num_steps=tc.steps - start,
        transform=plan.prepare,
    )
    with batches:
        for step, tasks in batches:
            if step == start:
                bar.note("compiling the meta-step")
                t0 = time.perf_counter()
                identity = program_identity(config, "prefetched", 1)
                run, how = cached_step(
                    plan.step_fn,
                    state,
                    tasks,
                    metric_sharding=rep,
                    identity=identity,
                    directory=directory,
                )
                bar.note(f"meta-step ready in {time.perf_counter() - t0:.2f} s ({how})")
                plan.clock()
            state, metrics = run(state, tasks)
            yield step + 1, state, metrics, 1


def default_directory() -> Path | None:
    """Where steps are kept: ``$METAJAX_STEP_CACHE``, else beside the compilation cache.

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


def cached_step(
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
      stored executable, loaded), ``"cached program"`` (the stored traced program, compiled
      or served by the persistent compilation cache), ``"traced"`` (traced now and stored),
      ``"traced, not cached"`` or ``"traced, not exportable"`` (``jax.export`` refused it,
      e.g. for a host callback).
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
    flat = _flat(fn, state_tree, extra_tree)
    how = "traced, not cached"
    source = source_digest() if directory is not None and available() else None
    exe = None  # (path, key) of the stored executable
    if source is not None:
        text = _key_text(
            identity, (state_tree, extra_tree), (state_leaves, extra_leaves), in_shardings, source
        )
        devices = _device_assignment(state_leaves[0].sharding)
        exe_text = stored_executables.key_text(text, devices)
        exe = (_entry(directory, exe_text, stored_executables.SUFFIX), exe_text)
        compiled = stored_executables.load(*exe, devices)
        if compiled is not None:
            return _unflattened(compiled, state_tree, extra_tree), "cached"
        path = _entry(directory, text, SUFFIX)
        blob = read_entry(path, text)
        how = "cached program"
        if blob is None:
            traced = jax.jit(flat, in_shardings=in_shardings, out_shardings=out_shardings)
            try:
                blob = bytes(jax.export.export(traced)(*avals).serialize())
            except Exception as e:  # noqa: BLE001 - e.g. a host callback: run it uncached
                print(
                    f"metajax: this step cannot be exported ({type(e).__name__}: "
                    f"{str(e)[:200]}); it is traced in every process.",
                    file=sys.stderr,
                )
                how = "traced, not exportable"
            else:
                how = "traced" if write_entry(path, text, blob) else "traced, not cached"
        if blob is not None:
            # A fresh trace runs the deserialised program too: a hit runs the very same one.
            exported = jax.export.deserialize(blob)
            flat = exported.call
            if not stored_executables.storable(exported.mlir_module()):
                exe = None
    lowered = jax.jit(
        flat, in_shardings=in_shardings, out_shardings=out_shardings, donate_argnums=(0,)
    ).lower(*avals)
    if exe is not None and how != "traced, not exportable":
        compiled = stored_executables.compile_and_store(lowered, *exe)
    else:
        compiled = lowered.compile()
    return _unflattened(compiled, state_tree, extra_tree), how


def _device_assignment(sharding) -> list:
    """The devices a program over inputs placed like this runs on, in mesh order."""
    mesh = getattr(sharding, "mesh", None)
    if mesh is not None and hasattr(mesh, "devices"):
        return list(mesh.devices.flat)
    return sorted(sharding.device_set, key=lambda d: d.id)


def _entry(directory: Path, text: str, suffix: str) -> Path:
    return Path(directory) / (hashlib.sha256(text.encode()).hexdigest()[:40] + suffix)


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
