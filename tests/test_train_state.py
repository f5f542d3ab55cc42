"""The train state owns its arrays, and the pmap step takes the same plain state as jit."""

import jax
import numpy as np
import optax
from toy import mlp_init, mse_loss, sine_tasks

import metajax as mj
from metajax import parallel


def test_donating_step_leaves_the_callers_params_alive():
    params = mlp_init(jax.random.key(0))
    algo = mj.maml(mse_loss, inner_steps=1, inner_lr=0.1)
    step = mj.make_train_step(algo, optax.adam(1e-3))
    state, _ = step(mj.train_state(algo, params, optax.adam(1e-3)), sine_tasks(jax.random.key(1)))
    # The step donated the state's buffers; the caller's params were copied, not donated.
    assert all(not leaf.is_deleted() for leaf in jax.tree.leaves(params))
    assert int(state.step) == 1


def test_pmap_step_takes_a_plain_state_like_the_sharded_one():
    params = mlp_init(jax.random.key(2))
    tasks = sine_tasks(jax.random.key(3), num_tasks=8)
    algo = mj.maml(mse_loss, inner_steps=1, inner_lr=0.1)
    opt = optax.sgd(0.1)
    sharded, _ = mj.make_train_step(algo, opt, mesh=parallel.task_mesh())(
        mj.train_state(algo, params, opt), tasks
    )
    pmapped, _ = mj.make_train_step(algo, opt, parallel="pmap")(
        mj.train_state(algo, params, opt), tasks
    )
    plain = parallel.unreplicate(pmapped)
    jax.tree.map(
        lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6),
        jax.device_get(sharded.meta_params),
        jax.device_get(plain.meta_params),
    )
