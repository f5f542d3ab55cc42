"""The pretrain-then-fine-tune baseline: its gradient, its fine-tuning and its metrics."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from toy import mlp_apply, mlp_init, mse_loss, sine_tasks, take_task

import metajax as mj
from metajax.algorithms import pretrain
from metajax.algorithms.pretrain import pool_examples


def test_meta_grad_is_the_plain_gradient_of_the_pooled_loss():
    params = mlp_init(jax.random.key(0))
    tasks = sine_tasks(jax.random.key(1), num_tasks=3, shots=4, queries=6)
    algo = pretrain(mse_loss, inner_steps=2, inner_lr=0.1)
    grads, metrics = jax.jit(algo.meta_grad)(algo.init(params), tasks)

    # By hand: each task's 10 points in one batch, loss averaged over the 3 tasks.
    def pooled(p):
        losses = []
        for i in range(3):
            t = take_task(tasks, i)
            x = jnp.concatenate([t.support[0], t.query[0]])
            y = jnp.concatenate([t.support[1], t.query[1]])
            losses.append(jnp.mean((mlp_apply(p, x) - y) ** 2))
        return sum(losses) / 3

    expected = jax.grad(pooled)(params)
    jax.tree.map(
        lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7), grads, expected
    )
    # Not MAML's gradient: pooling differs from the query loss after adaptation.
    maml_grads, _ = mj.maml(mse_loss, inner_steps=2, inner_lr=0.1).meta_grad(params, tasks)
    diff = jax.tree.map(lambda a, b: float(jnp.max(jnp.abs(a - b))), grads, maml_grads)
    assert max(jax.tree.leaves(diff)) > 1e-3

    # Metrics: the query loss before and after fine-tuning with the inner rule.
    before = np.mean([mse_loss(params, take_task(tasks, i).query) for i in range(3)])
    after = np.mean(
        [
            mse_loss(
                mj.adapt(mse_loss, params, take_task(tasks, i).support, steps=2, lr=0.1),
                take_task(tasks, i).query,
            )
            for i in range(3)
        ]
    )
    np.testing.assert_allclose(metrics["loss_before"], before, rtol=1e-5)
    np.testing.assert_allclose(metrics["loss_after"], after, rtol=1e-5)


@pytest.mark.parametrize("steps", [0, 1, 3])
def test_adapt_is_plain_sgd_fine_tuning(steps):
    params = mlp_init(jax.random.key(2))
    support = take_task(sine_tasks(jax.random.key(3), num_tasks=1), 0).support
    algo = pretrain(mse_loss, inner_steps=5, inner_lr=0.05)
    got = algo.adapt(params, support, steps=steps)
    p = params
    for _ in range(steps):
        g = jax.grad(mse_loss)(p, support)
        p = jax.tree.map(lambda w, d: w - 0.05 * d, p, g)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7), got, p)
    _, trace = algo.adapt_trace(params, support, lambda q: mse_loss(q, support), steps=steps)
    assert trace.shape == (steps + 1,)
    if steps:
        assert trace[-1] < trace[0]


def test_training_fits_the_task_mixture():
    # Trained on pooled sinusoids, the model's output shrinks toward the mixture's mean (0):
    # the pooled loss must fall well below its initial value.
    params = mlp_init(jax.random.key(4), sizes=(1, 16, 16, 1))
    algo = pretrain(mse_loss, inner_steps=1, inner_lr=0.01)
    import optax

    opt = optax.adam(1e-2)
    state = opt.init(params)

    @jax.jit
    def step(p, s, key):
        tasks = sine_tasks(key, num_tasks=8)
        g, m = algo.meta_grad(p, tasks)
        u, s = opt.update(g, s, p)
        return optax.apply_updates(p, u), s, m

    first = None
    for i in range(200):
        params, state, m = step(params, state, jax.random.key(100 + i))
        first = float(m["loss_before"]) if first is None else first
    assert float(m["loss_before"]) < 0.8 * first


def test_pool_examples_concatenates_every_leaf():
    s = {"x": jnp.ones((2, 3)), "m": jnp.zeros((2,))}
    q = {"x": 2 * jnp.ones((4, 3)), "m": jnp.ones((4,))}
    out = pool_examples(s, q)
    assert out["x"].shape == (6, 3) and float(out["x"].sum()) == 6 + 24
    assert float(out["m"].sum()) == 4


def test_checks_its_arguments():
    with pytest.raises(ValueError, match="inner_steps"):
        pretrain(mse_loss, inner_steps=0, inner_lr=0.1)
    with pytest.raises(ValueError, match="exactly one"):
        pretrain(mse_loss, inner_steps=1)
