"""adapt: learning-rate forms, their gradients, masks, and input errors."""

import jax
import jax.flatten_util
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from toy import central_differences, mlp_init, mse_loss, rel_error, sine_tasks, take_task

import metajax as mj


def sgd_by_hand(params, support, rates_per_step):
    """rates_per_step[k] is a pytree of rates (like params) used at step k."""
    for rates in rates_per_step:
        g = jax.grad(mse_loss)(params, support)
        params = jax.tree.map(lambda p, r, gi: p - r * gi, params, rates, g)
    return params


@pytest.fixture(scope="module")
def problem():
    params = mlp_init(jax.random.key(0), (1, 4, 1))
    task = take_task(sine_tasks(jax.random.key(1), num_tasks=1), 0)
    return params, task


def test_per_step_lr(problem):
    params, task = problem
    lrs = jnp.array([0.3, 0.1, 0.02])
    got = mj.adapt(mse_loss, params, task.support, steps=3, lr=lrs)
    want = sgd_by_hand(params, task.support, [jax.tree.map(lambda _: r, params) for r in lrs])
    assert rel_error(got, want) < 1e-6


def test_per_parameter_lr(problem):
    params, task = problem
    rates = jax.tree.map(lambda p: jnp.linspace(0.01, 0.2, p.size).reshape(p.shape), params)
    got = mj.adapt(mse_loss, params, task.support, steps=2, lr=rates)
    want = sgd_by_hand(params, task.support, [rates, rates])
    assert rel_error(got, want) < 1e-6


def test_per_step_per_tensor_lr(problem):
    # MAML++ LSLR: a leaf of shape (steps, 1, ..., 1) per parameter tensor.
    params, task = problem
    rates = jax.tree.map(lambda p: jnp.array([0.2, 0.05]).reshape((2,) + (1,) * p.ndim), params)
    got = mj.adapt(mse_loss, params, task.support, steps=2, lr=rates)
    want = sgd_by_hand(params, task.support, [jax.tree.map(lambda r: r[k], rates) for k in (0, 1)])
    assert rel_error(got, want) < 1e-6


@pytest.mark.parametrize("form", ["scalar", "per_step", "per_parameter"])
def test_gradient_with_respect_to_lr_matches_finite_differences(form):
    with jax.enable_x64(True):
        params = mlp_init(jax.random.key(2), (1, 4, 1), jnp.float64)
        task = take_task(sine_tasks(jax.random.key(3), num_tasks=1, dtype=jnp.float64), 0)
        lr = {
            "scalar": jnp.array(0.1),
            "per_step": jnp.array([0.1, 0.05, 0.2]),
            "per_parameter": jax.tree.map(lambda p: jnp.full(p.shape, 0.1), params),
        }[form]

        def query_loss(rate):
            adapted = mj.adapt(mse_loss, params, task.support, steps=3, lr=rate)
            return mse_loss(adapted, task.query)

        grad = jax.grad(query_loss)(lr)
        fd = central_differences(query_loss, lr)
        assert rel_error(grad, fd) < 1e-6
        assert float(jnp.max(jnp.abs(jax.flatten_util.ravel_pytree(grad)[0]))) > 1e-4


def test_mask_freezes_what_it_says(problem):
    params, task = problem
    mask = mj.mask_by_path(params, r"^1/")  # only the last layer adapts
    assert jax.tree.leaves(mask) == [False, False, True, True]
    adapted = mj.adapt(mse_loss, params, task.support, steps=3, lr=0.5, mask=mask)
    np.testing.assert_array_equal(adapted[0]["w"], params[0]["w"])
    np.testing.assert_array_equal(adapted[0]["b"], params[0]["b"])
    assert float(jnp.max(jnp.abs(adapted[1]["w"] - params[1]["w"]))) > 1e-3
    # Prefix masks work, and an inner optimizer honours the mask too.
    adapted_opt = mj.adapt(
        mse_loss, params, task.support, steps=3, optimizer=optax.adam(0.1), mask=[False, True]
    )
    np.testing.assert_array_equal(adapted_opt[0]["w"], params[0]["w"])
    assert float(jnp.max(jnp.abs(adapted_opt[1]["b"] - params[1]["b"]))) > 1e-3


def test_masked_meta_gradient_still_reaches_frozen_layers(problem):
    # ANIL: the body does not adapt, but the query loss still depends on it.
    params, _ = problem
    tasks = sine_tasks(jax.random.key(4))
    algo = mj.maml(mse_loss, inner_steps=2, inner_lr=0.3, mask=[False, True])
    grads, _ = algo.meta_grad(params, tasks)
    assert float(jnp.linalg.norm(grads[0]["w"])) > 1e-4


def test_trace_records_every_step(problem):
    params, task = problem
    adapted, losses = mj.adapt_trace(
        mse_loss,
        params,
        task.support,
        steps=4,
        lr=0.2,
        trace_fn=lambda p: mse_loss(p, task.support),
    )
    assert losses.shape == (5,)
    np.testing.assert_allclose(losses[0], mse_loss(params, task.support), rtol=1e-6)
    np.testing.assert_allclose(losses[-1], mse_loss(adapted, task.support), rtol=1e-6)
    _, scanned = mj.adapt_trace(
        mse_loss,
        params,
        task.support,
        steps=4,
        lr=0.2,
        unroll=False,
        trace_fn=lambda p: mse_loss(p, task.support),
    )
    np.testing.assert_allclose(scanned, losses, rtol=1e-5)


def test_input_errors(problem):
    params, task = problem
    tasks = sine_tasks(jax.random.key(5))
    with pytest.raises(ValueError, match="inner_steps must be >= 1"):
        mj.maml(mse_loss, inner_steps=0, inner_lr=0.1)
    with pytest.raises(ValueError, match="inner_lr must be non-negative"):
        mj.maml(mse_loss, inner_steps=1, inner_lr=-0.1)
    with pytest.raises(ValueError, match="exactly one of"):
        mj.maml(mse_loss, inner_steps=1, inner_lr=0.1, inner_optimizer=optax.sgd(0.1))
    with pytest.raises(ValueError, match="lr must be non-negative"):
        mj.adapt(mse_loss, params, task.support, steps=1, lr=jnp.array([-0.1]))
    with pytest.raises(ValueError, match=r"shape \(steps,\)"):
        mj.adapt(mse_loss, params, task.support, steps=3, lr=jnp.array([0.1, 0.2]))
    algo = mj.maml(mse_loss, inner_steps=1, inner_lr=0.1)
    with pytest.raises(ValueError, match="different structures"):
        algo.meta_grad(params, mj.Task(support=tasks.support, query={"x": tasks.query[0]}))
    with pytest.raises(ValueError, match="task axis"):
        algo.meta_grad(params, mj.Task(support=task.support, query=task.query))
    with pytest.raises(ValueError, match="leading axes differ"):
        short = jax.tree.map(lambda a: a[:2], tasks.query)
        algo.meta_grad(params, mj.Task(support=tasks.support, query=short))
    with pytest.raises(ValueError, match="example shape"):
        wide = (tasks.query[0].repeat(2, axis=-1), tasks.query[1])
        algo.meta_grad(params, mj.Task(support=tasks.support, query=wide))
    with pytest.raises(ValueError, match="must return a scalar"):
        mj.adapt(lambda p, b: mse_loss(p, b) * jnp.ones(2), params, task.support, steps=1, lr=0.1)
    with pytest.raises(ValueError, match="freezes every parameter"):
        mj.adapt(mse_loss, params, task.support, steps=1, lr=0.1, mask=False)


@pytest.mark.parametrize("unroll", [True, False])
def test_support_per_step_fits_one_batch_per_step(problem, unroll):
    params, task = problem
    x, y = task.support  # 5 points: steps 0, 1, 2 fit points (0, 1), (2, 3), (4, 0)
    idx = np.array([[0, 1], [2, 3], [4, 0]])
    batches = (x[idx], y[idx])
    got = mj.adapt(mse_loss, params, batches, steps=3, lr=0.2, support_per_step=True, unroll=unroll)
    want = params
    for k in range(3):
        want = sgd_by_hand(want, (x[idx[k]], y[idx[k]]), [jax.tree.map(lambda _: 0.2, params)])
    assert rel_error(got, want) < 1e-6
    # Not the same as fitting the whole support three times.
    assert rel_error(got, mj.adapt(mse_loss, params, task.support, steps=3, lr=0.2)) > 1e-3
    with pytest.raises(ValueError, match="leading axis of size steps=4"):
        mj.adapt(mse_loss, params, batches, steps=4, lr=0.2, support_per_step=True)


def noisy_loss(params, batch, *, key):
    """mse on inputs with key-dependent noise: the adapted params depend on every step's key."""
    x, y = batch
    return mse_loss(params, (x + 0.3 * jax.random.normal(key, x.shape), y))


@pytest.mark.parametrize("remat", [False, True])
def test_key_is_folded_in_per_step(problem, remat):
    params, task = problem
    key = jax.random.key(7)
    got = mj.adapt(noisy_loss, params, task.support, steps=3, lr=0.2, key=key, remat=remat)
    want = params
    for k in range(3):
        step_loss = lambda p, k=k: noisy_loss(p, task.support, key=jax.random.fold_in(key, k))
        want = jax.tree.map(lambda p, g: p - 0.2 * g, want, jax.grad(step_loss)(want))
    assert rel_error(got, want) < 1e-6
    other = mj.adapt(noisy_loss, params, task.support, steps=3, lr=0.2, key=jax.random.key(8))
    assert rel_error(other, got) > 1e-3
    same = mj.adapt(noisy_loss, params, task.support, steps=3, lr=0.2, key=jax.random.key(7))
    assert rel_error(same, got) < 1e-6
    for unroll in (True, False):
        adapt = lambda p, s, k, unroll=unroll: mj.adapt(
            noisy_loss, p, s, steps=3, lr=0.2, key=k, remat=remat, unroll=unroll
        )
        assert rel_error(jax.jit(adapt)(params, task.support, key), want) < 1e-6


def test_key_input_errors(problem):
    params, task = problem
    with pytest.raises(TypeError, match="key must be a PRNG key"):
        mj.adapt(noisy_loss, params, task.support, steps=1, lr=0.1, key=7)
    with pytest.raises(ValueError, match="single PRNG key"):
        mj.adapt(
            noisy_loss,
            params,
            task.support,
            steps=1,
            lr=0.1,
            key=jax.random.split(jax.random.key(0)),
        )
    with pytest.raises(TypeError, match="unroll must be an int or a bool"):
        mj.adapt(mse_loss, params, task.support, steps=1, lr=0.1, unroll=2.0)
    with pytest.raises(ValueError, match="unroll must be >= 0"):
        mj.adapt(mse_loss, params, task.support, steps=1, lr=0.1, unroll=-1)


def _loops(problem, steps, **kw) -> bool:
    """Whether the jitted second-order gradient through ``steps`` inner steps has a loop."""
    params, task = problem
    meta_loss = lambda p: mse_loss(
        mj.adapt(mse_loss, p, task.support, steps=steps, lr=0.1, **kw), task.query
    )
    return "stablehlo.while" in jax.jit(jax.grad(meta_loss)).lower(params).as_text()


@pytest.mark.parametrize(
    ("steps", "kw", "loops"),
    [
        (mj.inner.UNROLL, {}, False),  # the default unrolls loops up to UNROLL steps
        (mj.inner.UNROLL + 1, {}, True),  # and scans longer ones
        (mj.inner.UNROLL + 1, dict(remat=True), True),
        (4, dict(unroll=3), True),
        (3, dict(unroll=3), False),
        (20, dict(unroll=True), False),
        (2, dict(unroll=False), True),
        (2, dict(unroll=0), True),
    ],
)
def test_unroll_is_the_longest_loop_unrolled(problem, steps, kw, loops):
    assert _loops(problem, steps, **kw) == loops


def test_every_algorithm_takes_the_same_unroll_default():
    import inspect

    from metajax.run.config import AlgorithmConfig

    defaults = {
        fn.__name__: inspect.signature(fn).parameters["unroll"].default
        for fn in (mj.maml, mj.anil, mj.reptile, mj.meta_sgd, mj.mamlpp, mj.imaml, mj.pretrain)
    }
    assert defaults == dict.fromkeys(defaults, mj.inner.UNROLL)
    assert inspect.signature(mj.adapt).parameters["unroll"].default == mj.inner.UNROLL
    assert AlgorithmConfig().unroll == mj.inner.UNROLL  # the runner's default is the library's
