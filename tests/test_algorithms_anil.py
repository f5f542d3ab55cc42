"""ANIL: the mask freezes the body, gradients match plain references, it is cheaper than MAML."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from toy import central_differences, mlp_init, mse_loss, rel_error, sine_tasks, take_task

from metajax.algorithms import anil, maml

HEAD = r"^2/"  # the last layer of a (1, h, h, 1) toy MLP: leaves '2/w', '2/b'
ALPHA = 0.2


def head_only_objective(params, tasks, steps, first_order=False):
    """The ANIL objective written plainly: loop over tasks, SGD on params[2] only."""
    total = 0.0
    n = tasks.support[0].shape[0]
    for i in range(n):
        task = take_task(tasks, i)
        head = params[2]
        for _ in range(steps):
            g = jax.grad(lambda h, s=task.support: mse_loss(params[:2] + [h], s))(head)
            if first_order:
                g = jax.lax.stop_gradient(g)
            head = jax.tree.map(lambda a, b: a - ALPHA * b, head, g)
        total = total + mse_loss(params[:2] + [head], task.query)
    return total / n


def test_mask_freezes_body_and_adapts_head():
    params = mlp_init(jax.random.key(0))
    task = take_task(sine_tasks(jax.random.key(1)), 0)
    algo = anil(mse_loss, head=HEAD, inner_steps=3, inner_lr=ALPHA)
    adapted = jax.jit(algo.adapt)(params, task.support)
    for i in (0, 1):
        for k in ("w", "b"):
            np.testing.assert_array_equal(adapted[i][k], params[i][k])
    change = float(jnp.max(jnp.abs(adapted[2]["w"] - params[2]["w"])))
    print(f"ANIL head change after 3 steps: {change:.3e} (body change exactly 0)")
    assert change > 1e-3


def test_second_order_matches_finite_differences_of_plain_loop_float64():
    with jax.enable_x64(True):
        params = mlp_init(jax.random.key(2), (1, 5, 5, 1), jnp.float64)
        tasks = sine_tasks(jax.random.key(3), num_tasks=2, dtype=jnp.float64)
        algo = anil(mse_loss, head=HEAD, inner_steps=2, inner_lr=ALPHA)
        grads, _ = jax.jit(algo.meta_grad)(params, tasks)
        fd = central_differences(lambda p: head_only_objective(p, tasks, 2), params)
        err_fd = rel_error(grads, fd)
        body_grad = float(jnp.linalg.norm(grads[0]["w"]))
    print(f"ANIL 2nd order vs central differences of a plain loop (float64): {err_fd:.2e}")
    assert err_fd < 1e-7
    assert body_grad > 1e-4  # the body is meta-learned even though it never adapts


def test_first_order_matches_plain_loop():
    params = mlp_init(jax.random.key(4))
    tasks = sine_tasks(jax.random.key(5), num_tasks=2)
    algo = anil(mse_loss, head=HEAD, inner_steps=2, inner_lr=ALPHA, first_order=True)
    grads, metrics = jax.jit(algo.meta_grad)(params, tasks)
    # The stop_gradient in the reference is what separates it from second order (rel. diff ~1).
    plain = jax.jit(jax.grad(lambda p: head_only_objective(p, tasks, 2, first_order=True)))(params)
    err = rel_error(grads, plain)
    print(f"ANIL 1st order vs plain loop: {err:.2e}")
    assert err < 1e-5
    assert float(metrics["loss_after"]) < float(metrics["loss_before"])


def test_predicate_head_and_inner_optimizer_agree_with_regex_sgd():
    params = mlp_init(jax.random.key(6), (1, 4, 4, 1))
    support = take_task(sine_tasks(jax.random.key(7)), 0).support
    regex = anil(mse_loss, head=HEAD, inner_steps=2, inner_lr=ALPHA).adapt(params, support)
    pred = anil(
        mse_loss,
        head=lambda path: path.startswith("2/"),
        inner_steps=2,
        inner_optimizer=optax.sgd(ALPHA, momentum=0.5),
    ).adapt(params, support)
    np.testing.assert_array_equal(pred[1]["w"], params[1]["w"])
    # Momentum 0.5 makes step 2 move 1.5x the SGD step: head differs, by about a third.
    diff = rel_error(
        jax.tree.map(jnp.subtract, pred[2], params[2]),
        jax.tree.map(jnp.subtract, regex[2], params[2]),
    )
    assert 0.1 < diff < 0.6
    with pytest.raises(ValueError, match="freezes every parameter"):
        anil(mse_loss, head="no-such-layer", inner_steps=1, inner_lr=0.1).adapt(params, support)


def compiled_flops(fn, *args):
    cost = jax.jit(fn).lower(*args).compile().cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    return float(cost["flops"])


def test_anil_costs_fewer_flops_than_maml():
    params = mlp_init(jax.random.key(8), (1, 16, 16, 1))
    tasks = sine_tasks(jax.random.key(9), shots=10, queries=10)
    kw = dict(inner_steps=2, inner_lr=ALPHA)
    f_anil = compiled_flops(anil(mse_loss, head=HEAD, **kw).meta_grad, params, tasks)
    f_maml = compiled_flops(maml(mse_loss, **kw).meta_grad, params, tasks)
    print(
        f"second-order meta_grad FLOPs: ANIL {f_anil:.3e}, MAML {f_maml:.3e}, "
        f"ratio {f_anil / f_maml:.2f}"
    )
    assert f_anil < 0.9 * f_maml
