"""Tiny models and tasks shared by the core tests (plain functions, no Flax)."""

import jax
import jax.flatten_util
import jax.numpy as jnp
import numpy as np

from metajax import Task


def mlp_init(key, sizes=(1, 8, 8, 1), dtype=jnp.float32):
    params = []
    for i, (n_in, n_out) in enumerate(zip(sizes[:-1], sizes[1:])):
        k = jax.random.fold_in(key, i)
        w = jax.random.normal(k, (n_in, n_out), dtype) / jnp.sqrt(n_in)
        params.append({"w": w, "b": jnp.full((n_out,), 0.1, dtype)})
    return params


def mlp_apply(params, x):
    for layer in params[:-1]:
        x = jnp.tanh(x @ layer["w"] + layer["b"])
    return x @ params[-1]["w"] + params[-1]["b"]


def mse_loss(params, batch):
    x, y = batch
    return jnp.mean((mlp_apply(params, x) - y) ** 2)


def sine_tasks(key, num_tasks=4, shots=5, queries=7, dtype=jnp.float32):
    """A batch of sinusoid regression tasks with a leading task axis."""
    k_amp, k_phase, k_x = jax.random.split(key, 3)
    amp = jax.random.uniform(k_amp, (num_tasks, 1, 1), dtype, 0.5, 2.0)
    phase = jax.random.uniform(k_phase, (num_tasks, 1, 1), dtype, 0.0, 3.0)
    x = jax.random.uniform(k_x, (num_tasks, shots + queries, 1), dtype, -3.0, 3.0)
    y = amp * jnp.sin(x + phase)
    return Task(
        support=(x[:, :shots], y[:, :shots]),
        query=(x[:, shots:], y[:, shots:]),
    )


def take_task(tasks, i):
    return jax.tree.map(lambda a: a[i], tasks)


def central_differences(f, params, eps=1e-6):
    """Gradient of scalar f at params by central differences, coordinate by coordinate."""
    flat, unravel = jax.flatten_util.ravel_pytree(params)
    f_flat = jax.jit(jax.vmap(lambda v: f(unravel(v))))
    basis = jnp.eye(flat.size, dtype=flat.dtype)
    return unravel((f_flat(flat + eps * basis) - f_flat(flat - eps * basis)) / (2 * eps))


def rel_error(a, b):
    fa, _ = jax.flatten_util.ravel_pytree(a)
    fb, _ = jax.flatten_util.ravel_pytree(b)
    return float(jnp.linalg.norm(fa - fb) / jnp.linalg.norm(fb))


def counting_tasks(seed, num_tasks=2, batch=3, seq=6, vocab=11):
    """Next-token tasks over ids ``1 .. vocab - 1``: each task counts with its own stride from
    random starts, so support and query share a rule to adapt to; all-true masks."""
    rng = np.random.default_rng(seed)
    stride = rng.integers(1, vocab - 1, (num_tasks, 1, 1, 1))
    start = rng.integers(0, vocab - 1, (num_tasks, 2, batch, 1))
    tokens = ((start + stride * np.arange(seq)) % (vocab - 1) + 1).astype(np.int32)
    mask = np.ones(tokens.shape, bool)
    return Task(support=(tokens[:, 0], mask[:, 0]), query=(tokens[:, 1], mask[:, 1]))


def one_step_maml_objective(loss_fn, tasks, lr):
    """The one-inner-step MAML objective written plainly, without metajax: the reference that
    finite differences of a meta-gradient are taken of."""

    def objective(p):
        def one_task(task):
            g = jax.grad(loss_fn)(p, task.support)
            adapted = jax.tree.map(lambda a, b: a - lr * b, p, g)
            return loss_fn(adapted, task.query)

        return jnp.mean(jax.vmap(one_task)(tasks))

    return objective
