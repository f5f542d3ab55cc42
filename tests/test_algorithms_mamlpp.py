"""MAML++: LSLR and the multi-step loss reduce to MAML, match plain references, and anneal."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from toy import central_differences, mlp_init, mse_loss, rel_error, sine_tasks, take_task

from metajax.algorithms import maml, mamlpp, mamlpp_weights
from metajax.train import make_train_step, train_state

ALPHA = 0.1
STEPS = 3


def multi_step_objective(params, tasks, weights, rates=None):
    """sum_k w_k L_query(phi_k) averaged over tasks, as a plain loop; rates[k] per step."""
    total = 0.0
    n = tasks.support[0].shape[0]
    for i in range(n):
        task = take_task(tasks, i)
        p = params
        for k in range(len(weights)):
            g = jax.grad(mse_loss)(p, task.support)
            if rates is None:
                r = jax.tree.map(lambda _: ALPHA, p)
            else:
                r = jax.tree.map(lambda x, k=k: x[k], rates)
            p = jax.tree.map(lambda a, ri, b: a - ri * b, p, r, g)
            total = total + weights[k] * mse_loss(p, task.query)
    return total / n


def test_last_step_weights_and_uniform_lslr_equal_plain_maml():
    params = mlp_init(jax.random.key(0))
    tasks = sine_tasks(jax.random.key(1))
    want, _ = jax.jit(maml(mse_loss, inner_steps=STEPS, inner_lr=ALPHA).meta_grad)(params, tasks)
    last_only = jnp.zeros(STEPS).at[-1].set(1.0)
    msl = mamlpp(
        mse_loss, inner_steps=STEPS, inner_lr=ALPHA, lslr=False, msl_weights=lambda step: last_only
    )
    got_msl, _ = jax.jit(msl.meta_grad)(msl.init(params), tasks, step=0)
    lslr = mamlpp(mse_loss, inner_steps=STEPS, inner_lr=ALPHA, multi_step_loss=False)
    mp = lslr.init(params)
    assert mp["lr"][0]["w"].shape == (STEPS, 1, 1) and mp["lr"][0]["b"].shape == (STEPS, 1)
    got_lslr, _ = jax.jit(lslr.meta_grad)(mp, tasks)
    e1, e2 = rel_error(got_msl["params"], want), rel_error(got_lslr["params"], want)
    print(f"MAML++ weights (0,..,0,1) vs MAML: {e1:.2e}; LSLR all rates alpha vs MAML: {e2:.2e}")
    assert e1 < 1e-6 and e2 < 1e-6


def test_multi_step_loss_matches_plain_loop():
    params = mlp_init(jax.random.key(2))
    tasks = sine_tasks(jax.random.key(3))
    weights = jnp.array([0.2, 0.3, 0.5])
    algo = mamlpp(
        mse_loss, inner_steps=STEPS, inner_lr=ALPHA, lslr=False, msl_weights=lambda step: weights
    )
    got, metrics = jax.jit(algo.meta_grad)(algo.init(params), tasks, step=0)
    want = jax.jit(jax.grad(multi_step_objective))(params, tasks, weights)
    last, _ = jax.jit(maml(mse_loss, inner_steps=STEPS, inner_lr=ALPHA).meta_grad)(params, tasks)
    err = rel_error(got["params"], want)
    print(f"MAML++ multi-step loss (w=0.2,0.3,0.5) vs plain loop: {err:.2e}")
    assert err < 1e-5
    assert rel_error(got["params"], last) > 1e-2  # the earlier steps really count
    assert "step" not in got and float(metrics["msl_last_weight"]) == 0.5
    with pytest.raises(ValueError, match="needs step="):
        algo.meta_grad(algo.init(params), tasks)


def test_lslr_rate_gradients_match_finite_differences_float64():
    with jax.enable_x64(True):
        params = mlp_init(jax.random.key(4), (1, 4, 1), jnp.float64)
        tasks = sine_tasks(jax.random.key(5), num_tasks=2, dtype=jnp.float64)
        weights = jnp.array([0.1, 0.3, 0.6])
        algo = mamlpp(mse_loss, inner_steps=STEPS, inner_lr=ALPHA, msl_weights=lambda s: weights)
        mp = algo.init(params)
        # Distinct rates per tensor and step, one negative, to catch any mix-up of indices.
        mp["lr"] = jax.tree.map(
            lambda r, s: (
                r * jnp.array([1.0, 0.5, -0.3]).reshape((STEPS,) + (1,) * (r.ndim - 1)) * s
            ),
            mp["lr"],
            [{"w": 1.0, "b": 2.0}, {"w": 0.7, "b": 1.5}],
        )
        grads, _ = jax.jit(algo.meta_grad)(mp, tasks, step=0)
        fd = central_differences(
            lambda q: multi_step_objective(q["params"], tasks, weights, q["lr"]),
            {"params": mp["params"], "lr": mp["lr"]},
        )
        err_p, err_lr = rel_error(grads["params"], fd["params"]), rel_error(grads["lr"], fd["lr"])
        smallest = float(jnp.min(jnp.abs(jax.flatten_util.ravel_pytree(grads["lr"])[0])))
    print(
        f"MAML++ LSLR+MSL vs central differences (float64): params {err_p:.2e}, "
        f"rates {err_lr:.2e}; smallest |d/d rate| {smallest:.2e}"
    )
    assert err_p < 1e-7 and err_lr < 1e-7
    assert smallest > 1e-6


def test_annealed_weights_schedule():
    w0 = mamlpp_weights(0, 3, anneal_iters=100)
    w_mid = mamlpp_weights(50, 3, anneal_iters=100)
    w_end = mamlpp_weights(1000, 3, anneal_iters=100)
    np.testing.assert_allclose(w0, [1 / 3] * 3, rtol=1e-6)
    np.testing.assert_allclose(w_mid, [0.5 / 3, 0.5 / 3, 2 / 3], rtol=1e-6)
    np.testing.assert_allclose(w_end, [0.01, 0.01, 0.98], rtol=1e-5)
    for s in (0, 10, 50, 97, 1000):
        np.testing.assert_allclose(jnp.sum(mamlpp_weights(s, 3, 100)), 1.0, rtol=1e-6)


def test_train_step_feeds_the_step_and_first_order_warmup_switches():
    params = mlp_init(jax.random.key(6))
    tasks = sine_tasks(jax.random.key(7))
    algo = mamlpp(
        mse_loss,
        inner_steps=STEPS,
        inner_lr=ALPHA,
        lslr=False,
        multi_step_loss=False,
        first_order_until=2,
    )
    fo_grad = jax.jit(maml(mse_loss, inner_steps=STEPS, inner_lr=ALPHA, first_order=True).meta_grad)
    so_grad = jax.jit(maml(mse_loss, inner_steps=STEPS, inner_lr=ALPHA).meta_grad)
    g0, m0 = jax.jit(algo.meta_grad)(algo.init(params), tasks, step=0)
    e0 = rel_error(g0["params"], fo_grad(params, tasks)[0])
    assert e0 < 1e-6 and float(m0["second_order"]) == 0.0
    # Any optax optimizer: the train state's own step drives the switch.
    opt = optax.adamw(1e-2, weight_decay=0.5)
    step = make_train_step(algo, opt)
    state = train_state(algo, params, opt)
    orders = []
    for _ in range(3):
        before = jax.device_get(state.meta_params)
        state, metrics = step(state, tasks)
        orders.append(float(metrics["second_order"]))
    assert orders == [0.0, 0.0, 1.0] and int(state.step) == 3
    g2, _ = jax.jit(algo.meta_grad)({"params": before["params"]}, tasks, step=2)
    so, fo = so_grad(before["params"], tasks)[0], fo_grad(before["params"], tasks)[0]
    e2 = rel_error(g2["params"], so)
    print(f"first_order_until=2: step 0 vs FOMAML {e0:.2e}; step 2 vs second-order MAML {e2:.2e}")
    assert e2 < 1e-6 and rel_error(so, fo) > 1e-2


def test_lslr_rates_extend_to_longer_evaluations():
    params = mlp_init(jax.random.key(8))
    tasks = sine_tasks(jax.random.key(9))
    algo = mamlpp(mse_loss, inner_steps=2, inner_lr=ALPHA, multi_step_loss=False)
    mp = algo.init(params)
    support = jax.tree.map(lambda x: x[0], tasks.support)
    # Rates of step 1 reused for steps 2 and 3: equal to plain SGD at ALPHA (all rates ALPHA).
    want = maml(mse_loss, inner_steps=4, inner_lr=ALPHA).adapt(params, support)
    got = algo.adapt(mp, support, steps=4)
    assert rel_error(got, want) < 1e-6
