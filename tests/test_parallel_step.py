"""The sharded, single-device and pmap train steps take the same meta-update."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from toy import mlp_init, mse_loss, sine_tasks

import metajax as mj
from metajax import parallel
from metajax.train import TrainState, make_train_step, train_state

ALGOS = {
    "maml": lambda: mj.maml(mse_loss, inner_steps=2, inner_lr=0.1),
    "fomaml": lambda: mj.maml(mse_loss, inner_steps=2, inner_lr=0.1, first_order=True),
    "reptile": lambda: mj.reptile(mse_loss, inner_steps=2, inner_lr=0.1),
}


def _run(algo, optimizer, tasks, mode, devices=8):
    state = train_state(algo, mlp_init(jax.random.key(0)), optimizer)
    if mode == "single":
        step = make_train_step(algo, optimizer)
    elif mode == "sharding":
        mesh = parallel.task_mesh(devices)
        step = make_train_step(algo, optimizer, mesh=mesh)
        tasks = parallel.shard_tasks(tasks, mesh)
    else:
        step = make_train_step(algo, optimizer, mesh=parallel.task_mesh(devices), parallel="pmap")
        state = parallel.replicate(state, jax.local_devices()[:devices])
    state, metrics = step(state, tasks)
    if mode == "pmap":
        state = parallel.unreplicate(state)
    return jax.device_get(state), jax.device_get(metrics)


@pytest.mark.parametrize("name", sorted(ALGOS))
def test_sharded_and_pmap_equal_single_device(name):
    algo = ALGOS[name]()
    tasks = sine_tasks(jax.random.key(1), num_tasks=16)
    # With SGD at rate 1 the update is minus the meta-gradient, so this compares gradients.
    sgd = optax.sgd(1.0)
    init = jax.device_get(mlp_init(jax.random.key(0)))
    ref, ref_metrics = _run(algo, sgd, tasks, "single")
    ref_grad = jax.tree.map(lambda a, b: a - b, init, ref.meta_params)
    assert float(optax.tree.norm(ref_grad)) > 1e-3  # a real update, not a no-op
    assert int(ref.step) == 1
    for mode in ("sharding", "pmap"):
        state, metrics = _run(algo, sgd, tasks, mode)
        grad = jax.tree.map(lambda a, b: a - b, init, state.meta_params)
        jax.tree.map(
            lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), grad, ref_grad
        )
        assert int(state.step) == 1
        for key in ref_metrics:
            np.testing.assert_allclose(metrics[key], ref_metrics[key], rtol=1e-5, err_msg=key)
    if name != "maml":
        return
    # Adam's update too (it normalises, so it checks the state plumbing, not just the scale).
    adam = optax.adam(1e-2)
    ref, _ = _run(algo, adam, tasks, "single")
    for mode in ("sharding", "pmap"):
        state, _ = _run(algo, adam, tasks, mode)
        jax.tree.map(
            lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), state, ref
        )


def test_sharded_step_is_mean_over_tasks():
    """The all-reduce spans devices: the step equals the mean of per-half meta-gradients."""
    algo = ALGOS["maml"]()
    tasks = sine_tasks(jax.random.key(2), num_tasks=8)
    params = mlp_init(jax.random.key(0))
    halves = [jax.tree.map(lambda x, s=s: x[s], tasks) for s in (slice(0, 4), slice(4, 8))]
    meta_grad = jax.jit(algo.meta_grad)
    expected = jax.tree.map(lambda a, b: (a + b) / 2, *[meta_grad(params, h)[0] for h in halves])
    state, _ = _run(algo, optax.sgd(1.0), tasks, "sharding")
    grad = jax.tree.map(lambda a, b: a - b, params, state.meta_params)
    jax.tree.map(
        lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), grad, expected
    )


def test_sharded_outputs_replicated_and_state_donated():
    algo = ALGOS["maml"]()
    mesh = parallel.task_mesh(8)
    state = train_state(algo, mlp_init(jax.random.key(0)), optax.adam(1e-3))
    from metajax.train import place_state

    state = place_state(state, mesh)
    step = make_train_step(algo, optax.adam(1e-3), mesh=mesh)
    tasks = parallel.shard_tasks(sine_tasks(jax.random.key(1), num_tasks=8), mesh)
    assert tasks.support[0].sharding.spec == parallel.task_sharding(mesh).spec
    old = state.meta_params[0]["w"]
    new_state, metrics = step(state, tasks)
    assert isinstance(new_state, TrainState)
    assert new_state.meta_params[0]["w"].sharding.is_fully_replicated
    assert metrics["loss_after"].sharding.is_fully_replicated
    assert old.is_deleted()  # donated


def test_explicit_mesh_also_works():
    algo = ALGOS["fomaml"]()
    tasks = sine_tasks(jax.random.key(1), num_tasks=8)
    ref, _ = _run(algo, optax.sgd(1.0), tasks, "single")
    mesh = jax.make_mesh((8,), ("tasks",))  # Explicit axis type, JAX's default
    state = train_state(algo, mlp_init(jax.random.key(0)), optax.sgd(1.0))
    state, _ = make_train_step(algo, optax.sgd(1.0), mesh=mesh)(
        state, parallel.shard_tasks(tasks, mesh)
    )
    jax.tree.map(
        lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6),
        jax.device_get(state),
        ref,
    )


@pytest.mark.parametrize("mode", ["sharding", "pmap"])
def test_meta_batch_must_divide_devices(mode):
    algo = ALGOS["maml"]()
    tasks = sine_tasks(jax.random.key(1), num_tasks=12)
    state = train_state(algo, mlp_init(jax.random.key(0)), optax.sgd(1.0))
    mesh = parallel.task_mesh(8)
    step = make_train_step(algo, optax.sgd(1.0), mesh=mesh, parallel=mode)
    if mode == "pmap":
        state = parallel.replicate(state)
    with pytest.raises(ValueError, match="12 tasks does not divide over 8 devices"):
        step(state, tasks)
    with pytest.raises(ValueError, match="does not divide"):
        parallel.shard_tasks(tasks, mesh)


def test_unknown_parallel_mode():
    with pytest.raises(ValueError, match="'sharding' or 'pmap'"):
        make_train_step(ALGOS["maml"](), optax.sgd(1.0), parallel="shard_map")


@pytest.mark.parametrize("vmap_tasks", [True, False])
def test_evaluate_step_zero_is_unadapted_loss(vmap_tasks):
    from metajax.tasks.sinusoid import Sinusoid
    from metajax.train import evaluate, summarize

    algo = ALGOS["maml"]()
    params = mlp_init(jax.random.key(0))
    source = Sinusoid(shots=5, queries=7, split="test")
    per_task = evaluate(
        algo, params, source, mse_loss, num_tasks=10, steps=3, chunk=4, vmap_tasks=vmap_tasks
    )
    assert per_task["loss"].shape == (10, 4)
    tasks = source.sample(0, 10)
    direct = jax.jit(jax.vmap(mse_loss, in_axes=(None, 0)))(params, tasks.query)
    np.testing.assert_allclose(per_task["loss"][:, 0], direct, rtol=1e-5)
    one = jax.jit(jax.vmap(lambda t: mse_loss(algo.adapt(params, t.support, steps=1), t.query)))(
        tasks
    )
    np.testing.assert_allclose(per_task["loss"][:, 1], one, rtol=1e-5)
    summary = summarize(per_task)
    values = np.asarray(per_task["loss"][:, 3], np.float64)
    np.testing.assert_allclose(summary["loss"]["mean"][3], values.mean(), rtol=1e-6)
    np.testing.assert_allclose(
        summary["loss"]["ci95"][3], 1.96 * values.std(ddof=1) / np.sqrt(10), rtol=1e-6
    )
    assert jnp.isfinite(jnp.asarray(summary["loss"]["mean"])).all()
