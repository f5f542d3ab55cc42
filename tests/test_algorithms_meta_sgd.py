"""Meta-SGD: learned per-parameter rates are used, differentiated exactly, and may go negative."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
from toy import central_differences, mlp_init, mse_loss, rel_error, sine_tasks, take_task

from metajax.algorithms import meta_sgd


def spread_rates(params, lo=-0.05, hi=0.2):
    """Distinct per-parameter rates, some negative."""
    return jax.tree.map(
        lambda p: jnp.linspace(lo, hi, p.size, dtype=p.dtype).reshape(p.shape), params
    )


def sgd_by_hand(params, rates, support, steps, momentum=0.0):
    m = jax.tree.map(jnp.zeros_like, params)
    for _ in range(steps):
        g = jax.grad(mse_loss)(params, support)
        m = jax.tree.map(lambda mi, gi: momentum * mi + gi, m, g)
        params = jax.tree.map(lambda p, r, mi: p - r * mi, params, rates, m)
    return params


def test_init_and_adapt_use_learned_rates_even_negative():
    params = mlp_init(jax.random.key(0), (1, 4, 1))
    task = take_task(sine_tasks(jax.random.key(1), num_tasks=1), 0)
    algo = meta_sgd(mse_loss, inner_steps=2, inner_lr=0.07)
    meta_params = algo.init(params)
    assert jax.tree.structure(meta_params["lr"]) == jax.tree.structure(params)
    for r, p in zip(jax.tree.leaves(meta_params["lr"]), jax.tree.leaves(params), strict=True):
        assert r.shape == p.shape and bool(jnp.all(r == 0.07))
    rates = spread_rates(params)
    got = algo.adapt({"params": params, "lr": rates}, task.support)  # eager: no sign check
    err = rel_error(got, sgd_by_hand(params, rates, task.support, 2))
    print(f"Meta-SGD adapt (negative rates included) vs hand loop: {err:.2e}")
    assert err < 1e-6


def test_meta_grad_for_params_and_rates_matches_finite_differences_float64():
    with jax.enable_x64(True):
        params = mlp_init(jax.random.key(2), (1, 4, 1), jnp.float64)
        tasks = sine_tasks(jax.random.key(3), num_tasks=2, dtype=jnp.float64)
        meta_params = {"params": params, "lr": spread_rates(params, 0.02, 0.3)}
        algo = meta_sgd(mse_loss, inner_steps=2, inner_lr=0.1)
        grads, _ = jax.jit(algo.meta_grad)(meta_params, tasks)

        def objective(mp):
            losses = [
                mse_loss(
                    sgd_by_hand(mp["params"], mp["lr"], take_task(tasks, i).support, 2),
                    take_task(tasks, i).query,
                )
                for i in range(2)
            ]
            return sum(losses) / 2

        fd = central_differences(objective, meta_params)
        err_p, err_lr = rel_error(grads["params"], fd["params"]), rel_error(grads["lr"], fd["lr"])
        lr_grad_max = float(jnp.max(jnp.abs(jax.flatten_util.ravel_pytree(grads["lr"])[0])))
    print(
        f"Meta-SGD vs central differences (float64): params {err_p:.2e}, rates {err_lr:.2e}; "
        f"max |d/d rate| {lr_grad_max:.2e}"
    )
    assert err_p < 1e-7 and err_lr < 1e-7
    assert lr_grad_max > 1e-3


def test_first_order_gradients_match_closed_form():
    # First order: phi = theta - sum_k r * g_k with the g_k constants, so
    # dL/dtheta = grad L_q(phi) and dL/dr = -sum_k g_k * grad L_q(phi).
    params = mlp_init(jax.random.key(4), (1, 4, 1))
    tasks = sine_tasks(jax.random.key(5), num_tasks=2)
    rates = spread_rates(params, 0.02, 0.3)
    fo = meta_sgd(mse_loss, inner_steps=2, inner_lr=0.1, first_order=True)
    got, _ = jax.jit(fo.meta_grad)({"params": params, "lr": rates}, tasks)

    @jax.jit
    def closed_form(params, rates):
        d_params, d_rates = [], []
        for i in range(2):
            task, p, g_sum = take_task(tasks, i), params, jax.tree.map(jnp.zeros_like, params)
            for _ in range(2):
                g = jax.grad(mse_loss)(p, task.support)
                g_sum = jax.tree.map(jnp.add, g_sum, g)
                p = jax.tree.map(lambda a, r, b: a - r * b, p, rates, g)
            g_q = jax.grad(mse_loss)(p, task.query)
            d_params.append(g_q)
            d_rates.append(jax.tree.map(lambda s, q: -s * q, g_sum, g_q))
        mean = lambda ts: jax.tree.map(lambda *x: sum(x) / 2, *ts)  # noqa: E731
        return mean(d_params), mean(d_rates)

    want_p, want_r = closed_form(params, rates)
    err_p, err_r = rel_error(got["params"], want_p), rel_error(got["lr"], want_r)
    print(f"first-order Meta-SGD vs closed form: params {err_p:.2e}, rates {err_r:.2e}")
    assert err_p < 1e-5 and err_r < 1e-5
    assert float(jnp.linalg.norm(jax.flatten_util.ravel_pytree(got["lr"])[0])) > 1e-3


def test_rates_scale_an_optax_inner_optimizer():
    params = mlp_init(jax.random.key(6), (1, 4, 1))
    task = take_task(sine_tasks(jax.random.key(7), num_tasks=1), 0)
    algo = meta_sgd(mse_loss, inner_steps=3, inner_optimizer=optax.sgd(1.0, momentum=0.5))
    assert bool(jnp.all(algo.init(params)["lr"][0]["w"] == 1.0))
    rates = spread_rates(params, 0.01, 0.2)
    got = algo.adapt({"params": params, "lr": rates}, task.support)
    want = sgd_by_hand(params, rates, task.support, 3, momentum=0.5)
    err = rel_error(got, want)
    print(f"Meta-SGD over optax.sgd(momentum) vs hand loop: {err:.2e}")
    assert err < 1e-6
    np.testing.assert_raises(ValueError, meta_sgd, mse_loss, inner_steps=1)
