"""remat in every inner-loop form: memory that does not grow with the steps, same numbers."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from toy import mlp_init, mse_loss, rel_error

import metajax as mj
from metajax import _remat

# 512 examples through two tanh layers of width 32: each step's activations (about 512 x 32
# floats per layer and their second-order backward terms) outweigh the 1.2k parameters about
# fifty times over, so what grows with the steps is visible in the temporary memory.
SIZES = (4, 32, 32, 1)
EXAMPLES = 512
INNER = {"sgd": dict(lr=0.05), "adam": dict(optimizer=optax.adam(1e-2, eps_root=1e-8))}


def regression(seed, n=EXAMPLES):
    x = jax.random.normal(jax.random.key(seed), (n, SIZES[0]))
    return x, jnp.sin(x.sum(axis=1, keepdims=True))


@pytest.fixture(scope="module")
def problem():
    return mlp_init(jax.random.key(0), SIZES), regression(1), regression(2)


def meta_loss(params, support, query, *, steps, **kw):
    adapted = mj.adapt(mse_loss, params, support, steps=steps, **kw)
    return mse_loss(adapted, query)


def temp_bytes(problem, **kw) -> int:
    """Compiled temporary memory of the second-order meta-gradient of one task."""
    params, support, query = problem
    grad = jax.jit(jax.grad(lambda p: meta_loss(p, support, query, **kw)))
    return grad.lower(params).compile().memory_analysis().temp_size_in_bytes


# The unrolled program (and its compile time) grows with the steps: 12 steps already
# checkpoint in segments (3 of 4 steps), like 50 do (5 of 10).
@pytest.mark.parametrize("inner", ["sgd", "adam"])
@pytest.mark.parametrize(("unroll", "many"), [(False, 50), (True, 12)])
def test_remat_memory_does_not_grow_with_steps(problem, unroll, many, inner):
    kw = dict(unroll=unroll, remat=True, **INNER[inner])
    few_bytes = temp_bytes(problem, steps=5, **kw)
    many_bytes = temp_bytes(problem, steps=many, **kw)
    assert many_bytes / few_bytes <= 1.5, (few_bytes, many_bytes)


def test_default_remat_memory_does_not_grow_with_steps(problem):
    # The default unrolls 5 steps (a checkpoint per step) and scans 50 (2 x 5 x 5 segments).
    few_bytes = temp_bytes(problem, steps=5, remat=True, lr=0.05)
    many_bytes = temp_bytes(problem, steps=50, remat=True, lr=0.05)
    assert many_bytes / few_bytes <= 1.5, (few_bytes, many_bytes)


def test_without_remat_memory_grows_with_steps(problem):
    # The model above keeps 50 steps' activations without remat: the measure can see them.
    few = temp_bytes(problem, steps=5, unroll=False, remat=True, lr=0.05)
    plain = temp_bytes(problem, steps=50, unroll=False, remat=False, lr=0.05)
    assert plain / few >= 20, (few, plain)


@pytest.mark.parametrize("rule", ["sgd_lr_per_step", "adam", "sgd_masked"])
@pytest.mark.parametrize("unroll", [False, True])
def test_remat_equals_no_remat(problem, unroll, rule):
    # Every part of the schedule, in order (a rate per step catches a step taken out of
    # order). Scanned, 50 steps nest three levels (2 x 5 x 5). Unrolled, 11 steps are
    # segments of 4, 4 and 3. Adam, slower to compile, takes 6: two segments of 3.
    params, support, query = problem
    steps = 6 if rule == "adam" else (11 if unroll else 50)
    lr = jnp.linspace(0.02, 0.08, steps)
    kw = {"adam": INNER["adam"], "sgd_masked": dict(lr=0.05, mask=[False, True, True])}.get(
        rule, {}
    )

    def objective(p, rate, remat):
        rule_kw = kw or dict(lr=rate)
        return meta_loss(p, support, query, steps=steps, remat=remat, unroll=unroll, **rule_kw)

    grad = jax.jit(jax.grad(objective, argnums=(0, 1)), static_argnums=2)
    want, got = grad(params, lr, False), grad(params, lr, True)
    assert rel_error(got, want) < 1e-6
    assert float(jnp.linalg.norm(want[0][0]["w"])) > 1e-4  # frozen layers too (masked)
    if rule == "sgd_lr_per_step":
        assert rel_error(got[1], want[1]) < 1e-6
        assert float(jnp.min(jnp.abs(want[1]))) > 1e-6

    trace = lambda p: mse_loss(p, query)
    traced = [
        mj.adapt_trace(
            mse_loss,
            params,
            support,
            steps=steps,
            trace_fn=trace,
            remat=remat,
            unroll=unroll,
            **(kw or dict(lr=lr)),
        )[1]
        for remat in (False, True)
    ]
    assert traced[0].shape == (steps + 1,)
    np.testing.assert_allclose(traced[1], traced[0], rtol=1e-6)


def test_unrolled_remat_supports_grad_of_grad(problem):
    # The unrolled checkpoint is a custom_vjp: its backward pass is itself differentiable.
    params, support, query = problem
    support, query = jax.tree.map(lambda a: a[:16], (support, query))

    def grad_norm(p, remat):
        g = jax.grad(
            lambda q: meta_loss(q, support, query, steps=3, lr=0.05, unroll=True, remat=remat)
        )(p)
        return sum(jnp.sum(x**2) for x in jax.tree.leaves(g))

    want, got = (jax.grad(grad_norm)(params, remat) for remat in (False, True))
    assert rel_error(got, want) < 1e-5


def test_scanned_remat_program_does_not_grow_with_steps(problem):
    # One loop body per level of equal segments, whatever the step count: 50 steps (2 x 5 x 5)
    # and 210 (5 x 6 x 7) lower to as many loops, and so do 49 and 203, whose last step is a
    # skipped pad step; segments with left-over tails would add loops for every distinct
    # tail length, and compile time with them.
    def loops(steps):
        params, support, query = problem
        kw = dict(steps=steps, lr=0.05, remat=True, unroll=False)
        grad = jax.jit(jax.grad(lambda p: meta_loss(p, support, query, **kw)))
        return grad.lower(params).as_text().count("stablehlo.while")

    assert _remat.schedule(49, _remat.SCAN_LEVELS) == (2, 5, 5)
    assert _remat.schedule(203, _remat.SCAN_LEVELS) == (5, 6, 7)
    counts = {steps: loops(steps) for steps in (49, 50, 203, 210)}
    assert len(set(counts.values())) == 1 and counts[50] > loops(5), counts
