"""iMAML: CG equals the dense implicit solve, the implicit gradient is the true hypergradient
of the converged proximal problem, and memory does not grow with inner steps."""

import jax
import jax.flatten_util
import jax.numpy as jnp
import numpy as np
from toy import central_differences, mlp_init, mse_loss, rel_error, sine_tasks, take_task

from metajax.algorithms import imaml

REG = 2.0
LR = 0.05


def dense_implicit_gradient(params, task, phi):
    """(I + H/reg)^{-1} g_query with H = jax.hessian of the support loss at phi, solved densely."""
    flat_phi, unravel = jax.flatten_util.ravel_pytree(phi)
    hessian = jax.hessian(lambda v: mse_loss(unravel(v), task.support))(flat_phi)
    g_query = jax.grad(lambda v: mse_loss(unravel(v), task.query))(flat_phi)
    system = jnp.eye(flat_phi.size) + hessian / REG
    return unravel(jnp.linalg.solve(system, g_query)), jnp.linalg.eigvalsh(system)


def test_cg_matches_dense_solve_float64():
    with jax.enable_x64(True):
        params = mlp_init(jax.random.key(0), (1, 5, 1), jnp.float64)
        tasks = sine_tasks(jax.random.key(1), num_tasks=2, dtype=jnp.float64)
        n = jax.flatten_util.ravel_pytree(params)[0].size
        exact = imaml(mse_loss, inner_steps=10, reg=REG, inner_lr=LR, cg_steps=4 * n, cg_tol=1e-14)
        loose = imaml(mse_loss, inner_steps=10, reg=REG, inner_lr=LR, cg_steps=5)

        @jax.jit
        def reference(params, tasks):
            def one(task):
                return dense_implicit_gradient(params, task, exact.adapt(params, task.support))

            vs, eigs = jax.vmap(one)(tasks)
            return jax.tree.map(lambda v: jnp.mean(v, axis=0), vs), jnp.min(eigs)

        want, min_eig = reference(params, tasks)
        assert float(min_eig) > 0  # CG's positive-definiteness assumption holds here
        got, metrics = jax.jit(exact.meta_grad)(params, tasks)
        got5, metrics5 = jax.jit(loose.meta_grad)(params, tasks)
        err, err5 = rel_error(got, want), rel_error(got5, want)
    print(
        f"iMAML CG vs dense solve (float64): {err:.2e} (to convergence, residual "
        f"{float(metrics['cg_residual']):.1e}); with 5 CG steps {err5:.2e} (residual "
        f"{float(metrics5['cg_residual']):.1e})"
    )
    assert err < 1e-10
    assert float(metrics["cg_residual"]) < 1e-10
    assert err5 < 0.05 and float(metrics5["cg_residual"]) > 1e-12


def test_implicit_gradient_is_hypergradient_of_converged_inner_problem_float64():
    # With the proximal problem solved to machine precision, the implicit gradient must equal
    # d/dtheta L_query(phi*(theta)), which finite differences measure without any Hessian.
    with jax.enable_x64(True):
        params = mlp_init(jax.random.key(2), (1, 4, 1), jnp.float64)
        task = take_task(sine_tasks(jax.random.key(3), num_tasks=1, dtype=jnp.float64), 0)
        tasks = jax.tree.map(lambda a: a[None], task)
        algo = imaml(
            mse_loss,
            inner_steps=400,
            reg=REG,
            inner_lr=LR,
            cg_steps=100,
            cg_tol=1e-14,
            unroll=False,
        )
        got, _ = jax.jit(algo.meta_grad)(params, tasks)
        fd = central_differences(
            lambda p: mse_loss(algo.adapt(p, task.support), task.query), params
        )
        err = rel_error(got, fd)
    print(f"iMAML implicit gradient vs central differences of L_q(phi*(theta)): {err:.2e}")
    assert err < 1e-6


def temp_bytes(steps):
    params = mlp_init(jax.random.key(4), (1, 8, 8, 1))
    tasks = sine_tasks(jax.random.key(5), num_tasks=2)
    algo = imaml(mse_loss, inner_steps=steps, reg=REG, inner_lr=LR, unroll=False)
    compiled = jax.jit(algo.meta_grad).lower(params, tasks).compile()
    return compiled.memory_analysis().temp_size_in_bytes


def test_temp_memory_flat_in_inner_steps():
    few, many = temp_bytes(5), temp_bytes(100)
    print(f"iMAML meta_grad temp bytes: 5 steps {few}, 100 steps {many}")
    assert many <= 1.2 * few
    np.testing.assert_array_less(0, few)
