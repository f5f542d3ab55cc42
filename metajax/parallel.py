"""Meshes, shardings, multi-host start-up and the legacy ``pmap`` path.

The default parallelism is one ``jit`` whose task axis is sharded over the mesh
axis ``"tasks"`` (see :func:`metajax.train.make_train_step`); this module holds
the pieces around it: building the mesh, turning each process's slice of the
meta-batch into one global array, starting ``jax.distributed``, and the
``jax.pmap`` step kept for users of the older API.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from metajax.types import PyTree, Task

TASK_AXIS = "tasks"
MODEL_AXIS = "model"
PMAP_AXIS = "devices"


def task_mesh(num_devices: int | None = None, devices: Sequence[Any] | None = None) -> Mesh:
    """A 1-D mesh with axis ``"tasks"`` over ``num_devices`` devices (default: all, every host).

    The axis type is ``Auto``: XLA propagates the shardings of the inputs
    through the step, so the algorithms need no sharding annotations. (An
    ``Explicit`` mesh, the default of ``jax.make_mesh``, works for the built-in
    algorithms too, but makes every op's output sharding part of its type.)
    """
    devices = list(jax.devices() if devices is None else devices)
    if num_devices is not None:
        if not 1 <= num_devices <= len(devices):
            raise ValueError(f"num_devices={num_devices}, but {len(devices)} devices exist.")
        devices = devices[:num_devices]
    return jax.make_mesh(
        (len(devices),), (TASK_AXIS,), axis_types=(AxisType.Auto,), devices=devices
    )


def replicated(mesh: Mesh) -> NamedSharding:
    """Every device holds the whole array (parameters, optimizer state, metrics)."""
    return NamedSharding(mesh, P())


def task_sharding(mesh: Mesh) -> NamedSharding:
    """The leading (task) axis split over mesh axis ``"tasks"``; the rest replicated."""
    return NamedSharding(mesh, P(TASK_AXIS))


# --- parameters sharded over a "model" axis (FSDP-style) ------------------------------------


def task_model_mesh(tasks: int, model: int, devices: Sequence[Any] | None = None) -> Mesh:
    """A 2-D mesh ``("tasks", "model")`` of ``tasks * model`` devices (default: the first ones).

    The meta-batch is split over ``"tasks"``; parameters and optimizer state
    over ``"model"`` (see :func:`fsdp_shardings`), so each device holds
    ``1 / model`` of them and XLA gathers each weight where it is used. Devices
    along ``"model"`` are neighbours in ``jax.devices()`` order (on one host,
    the fastest links carry those gathers). Axis types are ``Auto``, as in
    :func:`task_mesh`.
    """
    for name, size in (("tasks", tasks), ("model", model)):
        if isinstance(size, bool) or not isinstance(size, (int, np.integer)) or size < 1:
            raise ValueError(f"{name} must be an int >= 1, got {size!r}.")
    devices = list(jax.devices() if devices is None else devices)
    if tasks * model > len(devices):
        raise ValueError(
            f"a {tasks} x {model} mesh needs {tasks * model} devices, but {len(devices)} exist."
        )
    return jax.make_mesh(
        (tasks, model),
        (TASK_AXIS, MODEL_AXIS),
        axis_types=(AxisType.Auto, AxisType.Auto),
        devices=devices[: tasks * model],
    )


def auto_axes(mesh: Mesh) -> Mesh:
    """``mesh`` with every axis of type ``Auto`` (the same devices and names)."""
    if all(t == AxisType.Auto for t in mesh.axis_types):
        return mesh
    return Mesh(mesh.devices, mesh.axis_names, axis_types=(AxisType.Auto,) * len(mesh.axis_names))


def task_axis_size(mesh: Mesh) -> int:
    """How many shards the meta-batch is split into: the size of mesh axis ``"tasks"``."""
    if TASK_AXIS not in mesh.axis_names:
        raise ValueError(f"the mesh needs an axis named 'tasks', got {mesh.axis_names}.")
    return int(mesh.shape[TASK_AXIS])


def fsdp_spec(shape: Sequence[int], model_size: int) -> P:
    """Partition spec of one array: its largest dimension divisible by ``model_size`` split over
    ``"model"`` (the first such, on ties), everything else replicated.

    Args:
      shape: the array's shape.
      model_size: the size of mesh axis ``"model"``.

    Returns:
      E.g. ``P(None, "model")`` for ``(11, 8)`` and ``model_size=4``; ``P()``
      (replicated) when no dimension divides, for scalars, and for ``model_size=1``.
    """
    if model_size == 1:
        return P()
    divisible = [(size, -i) for i, size in enumerate(shape) if size % model_size == 0]
    if not divisible:
        return P()
    dim = -max(divisible)[1]
    return P(*([None] * dim), MODEL_AXIS)


def fsdp_shardings(tree: PyTree, mesh: Mesh) -> PyTree:
    """A ``NamedSharding`` per leaf of ``tree`` (arrays or ``ShapeDtypeStruct``s): :func:`fsdp_spec`
    over the mesh's ``"model"`` axis for floating-point leaves, replicated over every other axis.

    Integer and bool leaves (step counters, PRNG key data) are replicated: they are no
    parameters, and a key split across devices would only be gathered again.
    """
    if MODEL_AXIS not in mesh.axis_names:
        raise ValueError(f"fsdp_shardings needs a mesh axis named 'model', got {mesh.axis_names}.")
    axis_type = dict(zip(mesh.axis_names, mesh.axis_types))[MODEL_AXIS]
    if axis_type == AxisType.Explicit:
        # Explicit sharding makes every op's output sharding part of its type: a model's
        # gathers and matmuls over "model"-sharded weights would need annotations inside it.
        raise ValueError(
            "mesh axis 'model' has the Explicit axis type (jax.make_mesh's default): "
            "parameters sharded over it need Auto. Use parallel.task_model_mesh, or "
            "jax.make_mesh(..., axis_types=(AxisType.Auto, AxisType.Auto))."
        )
    size = int(mesh.shape[MODEL_AXIS])

    def sharding(x):
        if not jnp.issubdtype(jnp.result_type(x), jnp.inexact):
            return NamedSharding(mesh, P())
        return NamedSharding(mesh, fsdp_spec(np.shape(x), size))

    return jax.tree.map(sharding, tree)


def state_shardings(state: PyTree, mesh: Mesh, state_sharding: Any = None) -> PyTree:
    """The sharding of each leaf of a train state on ``mesh``.

    Args:
      state: the train state (or any pytree of arrays).
      mesh: the mesh of the train step.
      state_sharding: None for the default: :func:`fsdp_shardings` when the mesh
        has an axis ``"model"``, else replicated; or one ``Sharding`` for every
        leaf; or a pytree of shardings with the structure of ``state``; or a
        function ``state -> pytree of shardings``.

    Returns:
      A pytree of shardings with the structure of ``state``.
    """
    if state_sharding is None:
        if MODEL_AXIS in mesh.axis_names:
            return fsdp_shardings(state, mesh)
        state_sharding = replicated(mesh)
    elif callable(state_sharding):
        state_sharding = state_sharding(state)
    if isinstance(state_sharding, jax.sharding.Sharding):
        return jax.tree.map(lambda _: state_sharding, state)
    return state_sharding


def check_divisible(num_tasks: int, num_devices: int, what: str = "devices") -> None:
    """Raises a ValueError naming both numbers when the meta-batch does not split evenly."""
    if num_tasks % num_devices:
        lower = num_tasks - num_tasks % num_devices
        raise ValueError(
            f"the meta-batch of {num_tasks} tasks does not divide over {num_devices} {what}: "
            f"each must get the same number of tasks. Use a meta-batch of {lower or num_devices} "
            f"or {lower + num_devices}, or fewer devices."
        )


def local_task_range(meta_batch: int) -> tuple[int, int]:
    """``(first_task, num_tasks)`` of this process's slice of a global meta-batch.

    Process ``i`` samples tasks ``i * local .. (i + 1) * local - 1``; with the
    mesh's devices ordered by process (as ``jax.devices()`` is), that slice is
    exactly what this process's devices hold of ``P("tasks")``.
    """
    count = jax.process_count()
    check_divisible(meta_batch, count, "processes")
    local = meta_batch // count
    return jax.process_index() * local, local


def shard_tasks(local_tasks: Task, mesh: Mesh) -> Task:
    """Builds the global, task-sharded meta-batch from this process's slice of it.

    Args:
      local_tasks: this process's tasks (leading axis ``meta_batch / process_count``),
        numpy or jax arrays, as sampled with :func:`local_task_range`.
      mesh: the mesh of the train step.

    Returns:
      The same tree of global ``jax.Array``s with leading axis ``meta_batch``,
      sharded as :func:`task_sharding`. On one process this is a ``device_put``.
    """
    sharding = task_sharding(mesh)
    count = jax.process_count()

    def put(x):
        x = np.asarray(x)
        what = "devices" if len(mesh.axis_names) == 1 else "shards of mesh axis 'tasks'"
        check_divisible(x.shape[0] * count, task_axis_size(mesh), what)
        return jax.make_array_from_process_local_data(
            sharding, x, (x.shape[0] * count, *x.shape[1:])
        )

    return jax.tree.map(put, local_tasks)


def init_distributed(
    coordinator: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
    *,
    heartbeat_timeout_s: int = 30,
    init_timeout_s: int = 120,
    cpu_collectives: str = "gloo",
) -> bool:
    """Starts ``jax.distributed`` when asked to; returns whether it did.

    Arguments left as None come from ``METAJAX_COORDINATOR``,
    ``METAJAX_NUM_PROCESSES`` and ``METAJAX_PROCESS_ID`` (or JAX's own
    ``JAX_COORDINATOR_ADDRESS``, ``JAX_NUM_PROCESSES``, ``JAX_PROCESS_ID``). With
    no coordinator at all, and no cluster JAX detects by itself (SLURM, TPU pod),
    nothing happens and the run is single-process.

    ``heartbeat_timeout_s`` bounds how long the survivors of a crashed process
    wait: the coordination service marks a silent process dead after it, and
    JAX then terminates every other process (non-zero exit) instead of letting
    it hang in a collective. On CPU the cross-process collectives run over gloo.
    Must run before anything touches a JAX backend.
    """
    env = os.environ.get
    coordinator = coordinator or env("METAJAX_COORDINATOR") or env("JAX_COORDINATOR_ADDRESS")
    if num_processes is None and (v := env("METAJAX_NUM_PROCESSES") or env("JAX_NUM_PROCESSES")):
        num_processes = int(v)
    if process_id is None and (v := env("METAJAX_PROCESS_ID") or env("JAX_PROCESS_ID")):
        process_id = int(v)
    if coordinator is None and num_processes is None and not _cluster_detected():
        return False
    if num_processes == 1:
        return False
    jax.config.update("jax_cpu_collectives_implementation", cpu_collectives)
    jax.distributed.initialize(
        coordinator_address=coordinator,
        num_processes=num_processes,
        process_id=process_id,
        initialization_timeout=init_timeout_s,
        heartbeat_timeout_seconds=heartbeat_timeout_s,
        shutdown_timeout_seconds=heartbeat_timeout_s,
    )
    return True


def _cluster_detected() -> bool:
    return "SLURM_JOB_ID" in os.environ and "SLURM_NTASKS" in os.environ


# --- the legacy pmap path -------------------------------------------------------------------


def replicate(tree: PyTree, devices: Sequence[Any] | None = None) -> PyTree:
    """Copies ``tree`` onto every local device, with a leading device axis (pmap layout)."""
    devices = list(jax.local_devices() if devices is None else devices)
    sharding = NamedSharding(Mesh(np.array(devices), (PMAP_AXIS,)), P(PMAP_AXIS))
    return jax.tree.map(
        lambda x: jax.device_put(jnp.broadcast_to(x, (len(devices), *np.shape(x))), sharding), tree
    )


def unreplicate(tree: PyTree) -> PyTree:
    """The first device's copy of a replicated (pmap-layout) tree."""
    return jax.tree.map(lambda x: x[0], tree)


def make_pmap_step(update_fn, num_devices: int | None = None):
    """Wraps ``update_fn(state, tasks) -> (state, metrics)`` in ``jax.pmap``.

    ``update_fn`` receives each device's share of the tasks and must average
    its gradients and metrics over axis ``"devices"`` itself (``lax.pmean``);
    the train step passes a function that does. The returned
    ``step(state, tasks)`` takes the state plain (as :func:`metajax.train_state` makes it:
    replicated on the first call) or replicated (see :func:`replicate`), and the tasks
    with the global leading axis ``meta_batch``, which it reshapes to ``(devices,
    meta_batch / devices, ...)``. It returns the state replicated (:func:`unreplicate`
    gives the plain one) and the metrics unreplicated. The state is donated. Single
    process only.
    """
    devices = jax.local_devices()[: num_devices or jax.local_device_count()]
    n = len(devices)
    pmapped = jax.pmap(update_fn, axis_name=PMAP_AXIS, devices=devices, donate_argnums=(0,))

    def step(state, tasks):
        if jax.process_count() > 1:
            raise NotImplementedError("the pmap path is single-process; use parallel='sharding'.")
        leading = jax.tree.leaves(tasks)[0].shape[0]
        check_divisible(leading, n)
        split = jax.tree.map(lambda x: jnp.reshape(x, (n, leading // n, *x.shape[1:])), tasks)
        if jnp.ndim(getattr(state, "step", 0)) == 0:  # a plain state: no device axis yet
            state = replicate(state, devices)
        state, metrics = pmapped(state, split)
        return state, unreplicate(metrics)

    step.num_devices = n
    return step
