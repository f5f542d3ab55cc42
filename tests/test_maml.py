"""Exactness of second-order MAML, FOMAML and Reptile against independent references."""

import jax
import jax.flatten_util
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from toy import central_differences, mlp_init, mse_loss, rel_error, sine_tasks, take_task

import metajax as mj

ALPHA = 0.1


def meta_objective(params, tasks, steps, lr=ALPHA):
    """The MAML objective written plainly: a Python loop over tasks and steps."""
    total = 0.0
    n = tasks.support[0].shape[0]
    for i in range(n):
        task = take_task(tasks, i)
        p = params
        for _ in range(steps):
            g = jax.grad(mse_loss)(p, task.support)
            p = jax.tree.map(lambda a, b: a - lr * b, p, g)
        total = total + mse_loss(p, task.query)
    return total / n


def test_second_order_matches_finite_differences_float64():
    with jax.enable_x64(True):
        params = mlp_init(jax.random.key(0), (1, 6, 6, 1), jnp.float64)
        tasks = sine_tasks(jax.random.key(1), num_tasks=3, dtype=jnp.float64)
        grads, _ = mj.maml(mse_loss, inner_steps=3, inner_lr=ALPHA).meta_grad(params, tasks)
        fd = central_differences(lambda p: meta_objective(p, tasks, 3), params)
        err = rel_error(grads, fd)
    print(f"second-order MAML vs central differences (float64, 3 steps): rel err {err:.2e}")
    assert err < 1e-6


def test_one_step_matches_hessian_closed_form():
    with jax.enable_x64(True):
        params = mlp_init(jax.random.key(2), (1, 5, 1), jnp.float64)
        tasks = sine_tasks(jax.random.key(3), num_tasks=1, dtype=jnp.float64)
        task = take_task(tasks, 0)
        flat, unravel = jax.flatten_util.ravel_pytree(params)
        support_loss = lambda v: mse_loss(unravel(v), task.support)
        hessian = jax.hessian(support_loss)(flat)
        adapted = flat - ALPHA * jax.grad(support_loss)(flat)
        g_query = jax.grad(lambda v: mse_loss(unravel(v), task.query))(adapted)
        expected = (jnp.eye(flat.size) - ALPHA * hessian) @ g_query
        grads, _ = mj.maml(mse_loss, inner_steps=1, inner_lr=ALPHA).meta_grad(params, tasks)
        got, _ = jax.flatten_util.ravel_pytree(grads)
        np.testing.assert_allclose(got, expected, rtol=1e-10, atol=1e-12)


def quadratic_loss(w, batch):
    return 0.5 * jnp.mean(batch["a"]) * w**2


@pytest.mark.parametrize("steps", [1, 2, 3])
def test_scalar_toy_hand_derived(steps):
    # L_s(w) = a_s w^2 / 2 so each SGD step multiplies w by (1 - lr a_s); after n steps
    # w_n = (1 - lr a_s)^n w and d/dw L_q(w_n) = a_q (1 - lr a_s)^(2n) w. FOMAML: a_q w_n.
    w, lr, a_s, a_q = 1.5, 0.3, 2.0, 3.0
    tasks = mj.Task(support={"a": jnp.full((1, 1), a_s)}, query={"a": jnp.full((1, 1), a_q)})
    second, m = mj.maml(quadratic_loss, inner_steps=steps, inner_lr=lr).meta_grad(w, tasks)
    first, _ = mj.maml(quadratic_loss, inner_steps=steps, inner_lr=lr, first_order=True).meta_grad(
        w, tasks
    )
    shrink = 1 - lr * a_s
    np.testing.assert_allclose(second, a_q * shrink ** (2 * steps) * w, rtol=1e-6)
    np.testing.assert_allclose(first, a_q * shrink**steps * w, rtol=1e-6)
    np.testing.assert_allclose(m["loss_before"], 0.5 * a_q * w**2, rtol=1e-6)
    np.testing.assert_allclose(m["loss_after"], 0.5 * a_q * (shrink**steps * w) ** 2, rtol=1e-6)


def reference_adapt(params, support, steps, lr):
    for _ in range(steps):
        g = jax.grad(mse_loss)(params, support)
        params = jax.tree.map(lambda a, b: a - lr * b, params, g)
    return params


def test_first_order_matches_plain_reference():
    params = mlp_init(jax.random.key(4))
    tasks = sine_tasks(jax.random.key(5))
    expected = []
    for i in range(4):
        task = take_task(tasks, i)
        adapted = reference_adapt(params, task.support, 2, ALPHA)
        expected.append(jax.grad(mse_loss)(adapted, task.query))
    expected = jax.tree.map(lambda *g: sum(g) / 4, *expected)
    grads, _ = mj.maml(mse_loss, inner_steps=2, inner_lr=ALPHA, first_order=True).meta_grad(
        params, tasks
    )
    assert rel_error(grads, expected) < 1e-5


def test_reptile_matches_plain_reference():
    params = mlp_init(jax.random.key(6))
    tasks = sine_tasks(jax.random.key(7))
    adapted = [reference_adapt(params, take_task(tasks, i).support, 3, ALPHA) for i in range(4)]
    expected = jax.tree.map(lambda p, *a: p - sum(a) / 4, params, *adapted)
    algo = mj.reptile(mse_loss, inner_steps=3, inner_lr=ALPHA)
    grads, metrics = algo.meta_grad(params, tasks)
    assert rel_error(grads, expected) < 1e-5
    query_after = np.mean([mse_loss(a, take_task(tasks, i).query) for i, a in enumerate(adapted)])
    np.testing.assert_allclose(metrics["loss_after"], query_after, rtol=1e-5)
    # The pseudo-gradient with optax.sgd(eps) is the paper's interpolation toward the mean.
    opt = optax.sgd(0.5)
    updates, _ = opt.update(grads, opt.init(params), params)
    new = optax.apply_updates(params, updates)
    mean_adapted = jax.tree.map(lambda *a: sum(a) / 4, *adapted)
    want = jax.tree.map(lambda p, a: p + 0.5 * (a - p), params, mean_adapted)
    assert rel_error(new, want) < 1e-5


def test_second_and_first_order_differ_on_nonlinear_model():
    params = mlp_init(jax.random.key(8))
    tasks = sine_tasks(jax.random.key(9))
    second, _ = mj.maml(mse_loss, inner_steps=2, inner_lr=0.3).meta_grad(params, tasks)
    first, _ = mj.maml(mse_loss, inner_steps=2, inner_lr=0.3, first_order=True).meta_grad(
        params, tasks
    )
    assert rel_error(first, second) > 1e-2


def linear_loss(params, batch):
    x, y = batch
    return jnp.mean((x @ params["w"] + params["b"]) * y)


def test_second_and_first_order_agree_when_loss_is_linear_in_params():
    # A loss linear in the parameters has a zero Hessian: the second-order terms vanish.
    params = {"w": jnp.array([[0.3], [-0.2]]), "b": jnp.array([0.1])}
    x = jax.random.normal(jax.random.key(10), (3, 9, 2))
    y = jax.random.normal(jax.random.key(11), (3, 9, 1))
    tasks = mj.Task(support=(x[:, :4], y[:, :4]), query=(x[:, 4:], y[:, 4:]))
    second, _ = mj.maml(linear_loss, inner_steps=3, inner_lr=0.5).meta_grad(params, tasks)
    first, _ = mj.maml(linear_loss, inner_steps=3, inner_lr=0.5, first_order=True).meta_grad(
        params, tasks
    )
    assert rel_error(first, second) < 1e-6


@pytest.mark.parametrize("first_order", [False, True])
def test_vmap_over_tasks_equals_loop_over_tasks(first_order):
    params = mlp_init(jax.random.key(12))
    tasks = sine_tasks(jax.random.key(13))
    algo = mj.maml(mse_loss, inner_steps=2, inner_lr=ALPHA, first_order=first_order)
    batched, metrics = algo.meta_grad(params, tasks)
    singles = [
        algo.meta_grad(params, jax.tree.map(lambda a: a[i : i + 1], tasks)) for i in range(4)
    ]
    looped = jax.tree.map(lambda *g: sum(g) / 4, *[g for g, _ in singles])
    assert rel_error(batched, looped) < 1e-5
    np.testing.assert_allclose(
        metrics["loss_after"], np.mean([m["loss_after"] for _, m in singles]), rtol=1e-5
    )


def test_jit_equals_eager_and_does_not_recompile():
    traces = []

    def counting_loss(params, batch):
        traces.append(1)
        return mse_loss(params, batch)

    params = mlp_init(jax.random.key(14))
    algo = mj.maml(counting_loss, inner_steps=2, inner_lr=ALPHA)
    eager, _ = algo.meta_grad(params, sine_tasks(jax.random.key(15)))
    step = jax.jit(algo.meta_grad)
    jitted, _ = step(params, sine_tasks(jax.random.key(15)))
    assert rel_error(jitted, eager) < 1e-5
    traced_once = len(traces)
    step(params, sine_tasks(jax.random.key(16)))
    assert len(traces) == traced_once
    assert step._cache_size() == 1


@pytest.mark.parametrize(
    "variant",
    [
        dict(unroll=False),
        dict(unroll=False, remat=True),
        dict(unroll=True, remat=True),
        dict(remat=True),
    ],
)
@pytest.mark.parametrize("steps", [3, 7, 30])
def test_scanned_and_remat_equal_unrolled(variant, steps):
    # The reference unrolls without remat. Scanned with remat, 3 steps run in one scan, 7 in
    # two segments of 4 (the eighth a skipped pad step) and 30 nest three levels (2 x 3 x 5);
    # unrolled with remat, 7 are segments of 4 and 3 and 30 five segments of 6. In float64 the
    # forms agree to rounding, so a step taken out of order or twice (a rate per step would
    # show it) or a pad step that is not skipped fails by orders of magnitude.
    with jax.enable_x64(True):
        params = mlp_init(jax.random.key(17), dtype=jnp.float64)
        tasks = sine_tasks(jax.random.key(18), dtype=jnp.float64)
        lr = ALPHA * jnp.linspace(0.5, 1.5, steps)
        make = lambda **kw: mj.maml(mse_loss, inner_steps=steps, inner_lr=lr, **kw)
        want, _ = make(unroll=True).meta_grad(params, tasks)
        got, _ = make(**variant).meta_grad(params, tasks)
        assert rel_error(got, want) < 1e-10
        one = take_task(tasks, 0)
        trace = lambda **kw: mj.adapt_trace(
            mse_loss,
            params,
            one.support,
            steps=steps,
            lr=lr,
            trace_fn=lambda p: mse_loss(p, one.query),
            **kw,
        )[1]
        want_trace, got_trace = trace(unroll=True), trace(**variant)
        assert got_trace.shape == (steps + 1,)
        np.testing.assert_allclose(got_trace, want_trace, rtol=1e-10)
        assert float(want_trace[-1]) < float(want_trace[0]) - 0.05  # the steps do adapt


def test_adam_inner_loop_matches_finite_differences():
    with jax.enable_x64(True):
        params = mlp_init(jax.random.key(19), (1, 5, 1), jnp.float64)
        tasks = sine_tasks(jax.random.key(20), num_tasks=2, dtype=jnp.float64)
        inner = optax.adam(0.05, eps_root=1e-8)
        algo = mj.maml(mse_loss, inner_steps=3, inner_optimizer=inner)
        grads, _ = algo.meta_grad(params, tasks)

        def objective(p):
            losses = [
                mse_loss(algo.adapt(p, take_task(tasks, i).support), take_task(tasks, i).query)
                for i in range(2)
            ]
            return sum(losses) / 2

        fd = central_differences(objective, params, eps=1e-7)
        assert all(bool(jnp.all(jnp.isfinite(g))) for g in jax.tree.leaves(grads))
        err = rel_error(grads, fd)
    print(f"second-order MAML with inner Adam vs central differences: rel err {err:.2e}")
    assert err < 1e-6


@pytest.mark.parametrize("name", ["maml", "fomaml", "reptile"])
@pytest.mark.parametrize("task_batch,unroll_tasks", [(1, False), (2, False), (2, True)])
def test_task_batch_scan_equals_vmap(name, task_batch, unroll_tasks):
    params = mlp_init(jax.random.key(21))
    tasks = sine_tasks(jax.random.key(22))
    make = {
        "maml": lambda **kw: mj.maml(mse_loss, inner_steps=2, inner_lr=ALPHA, **kw),
        "fomaml": lambda **kw: mj.maml(
            mse_loss, inner_steps=2, inner_lr=ALPHA, first_order=True, **kw
        ),
        "reptile": lambda **kw: mj.reptile(mse_loss, inner_steps=2, inner_lr=ALPHA, **kw),
    }[name]
    want, want_metrics = make().meta_grad(params, tasks)
    got, got_metrics = make(task_batch=task_batch, unroll_tasks=unroll_tasks).meta_grad(
        params, tasks
    )
    assert rel_error(got, want) < 1e-5
    np.testing.assert_allclose(got_metrics["loss_after"], want_metrics["loss_after"], rtol=1e-5)
    with pytest.raises(ValueError, match="does not divide"):
        make(task_batch=3).meta_grad(params, tasks)
    with pytest.raises(ValueError, match="needs a task_batch"):
        make(unroll_tasks=True).meta_grad(params, tasks)


def test_unroll_tasks_leaves_no_while_loop():
    """The reason unroll_tasks exists: XLA:CPU convolutions are slow inside while loops."""
    params = mlp_init(jax.random.key(23))
    tasks = sine_tasks(jax.random.key(24))
    for unroll, loops in ((False, True), (True, False)):
        algo = mj.maml(
            mse_loss, inner_steps=2, inner_lr=ALPHA, task_batch=1, unroll_tasks=unroll, unroll=True
        )
        hlo = jax.jit(algo.meta_grad).lower(params, tasks).as_text()
        assert ("stablehlo.while" in hlo) == loops


def test_support_minibatches_mix_classes_and_cycle():
    from metajax.algorithms.reptile import support_minibatches

    labels = np.repeat(np.arange(5), 3)  # class-major, 5 classes x 3 shots
    x = np.arange(15.0)[:, None]
    xb, yb = support_minibatches((x, labels), 5, steps=4)
    assert xb.shape == (4, 5, 1) and yb.shape == (4, 5)
    for k in range(3):  # each batch: one shot of every class
        assert sorted(np.asarray(yb[k]).tolist()) == [0, 1, 2, 3, 4]
    assert sorted(np.asarray(xb[:3]).ravel().tolist()) == list(range(15))  # one epoch
    np.testing.assert_array_equal(xb[3], xb[0])  # then it starts over
    with pytest.raises(ValueError, match="inner_batch=4 does not divide the 15"):
        support_minibatches((x, labels), 4, steps=2)


def test_reptile_inner_batch_matches_plain_reference():
    from metajax.algorithms.reptile import support_minibatches

    params = mlp_init(jax.random.key(8))
    tasks = sine_tasks(jax.random.key(9), shots=6)
    inner = optax.adam(0.01, b1=0.0)
    adapted = []
    for i in range(4):
        xb, yb = support_minibatches(take_task(tasks, i).support, 2, steps=4)
        p, state = params, inner.init(params)
        for k in range(4):
            g = jax.grad(mse_loss)(p, (xb[k], yb[k]))
            updates, state = inner.update(g, state, p)
            p = optax.apply_updates(p, updates)
        adapted.append(p)
    expected = jax.tree.map(lambda p, *a: p - sum(a) / 4, params, *adapted)
    algo = mj.reptile(mse_loss, inner_steps=4, inner_optimizer=inner, inner_batch=2)
    grads, _ = algo.meta_grad(params, tasks)
    assert rel_error(grads, expected) < 1e-5
    full_batch = mj.reptile(mse_loss, inner_steps=4, inner_optimizer=inner)
    assert rel_error(full_batch.meta_grad(params, tasks)[0], expected) > 1e-2
