"""Flax NNX models through from_nnx: a pure apply_fn that MAML differentiates exactly."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from toy import mlp_apply, rel_error

import metajax as mj
from metajax.models import from_nnx, mse_loss, update_nnx

# Compile-bound on CPU: unoptimised code, ~5x faster to compile (see test_models_transformer).
FAST_COMPILE = {"xla_backend_optimization_level": 0, "xla_cpu_use_fusion_emitters": False}
jit = functools.partial(jax.jit, compiler_options=FAST_COMPILE)


class TanhMLP(nnx.Module):
    """The architecture of tests/toy.py's ``mlp_apply``: tanh hidden layers, linear output."""

    def __init__(self, sizes, rngs):
        pairs = zip(sizes[:-1], sizes[1:], strict=True)
        self.layers = nnx.List([nnx.Linear(a, b, rngs=rngs) for a, b in pairs])

    def __call__(self, x):
        for layer in self.layers[:-1]:
            x = jnp.tanh(layer(x))
        return self.layers[-1](x)


class NormNet(nnx.Module):
    def __init__(self, rngs):
        self.linear = nnx.Linear(2, 3, rngs=rngs)
        self.bn = nnx.BatchNorm(3, rngs=rngs)  # training mode: batch statistics

    def __call__(self, x):
        return self.bn(self.linear(x))


def sine_tasks(seed, num_tasks=4, shots=5, queries=7):
    """tests/toy.py's sinusoid tasks, drawn on the host (no per-op compiles)."""
    rng = np.random.default_rng(seed)
    amp = rng.uniform(0.5, 2.0, (num_tasks, 1, 1))
    phase = rng.uniform(0.0, 3.0, (num_tasks, 1, 1))
    x = rng.uniform(-3.0, 3.0, (num_tasks, shots + queries, 1))
    y = amp * np.sin(x + phase)
    x, y = x.astype(np.float32), y.astype(np.float32)
    return mj.Task(support=(x[:, :shots], y[:, :shots]), query=(x[:, shots:], y[:, shots:]))


def test_maml_on_nnx_model_equals_plain_jax_reference():
    model = TanhMLP((1, 8, 8, 1), nnx.Rngs(0))
    apply_fn, params = from_nnx(model)
    assert sorted(params["layers"][0]) == ["bias", "kernel"]
    # The same weights in tests/toy.py's plain-jax format.
    as_toy = lambda tree: [{"w": t["kernel"], "b": t["bias"]} for _, t in sorted(tree.items())]
    toy = as_toy(params["layers"])
    tasks = sine_tasks(1)
    x = tasks.support[0][0]
    np.testing.assert_allclose(jit(apply_fn)(params, x), jit(mlp_apply)(toy, x), rtol=1e-6)

    nnx_grads, nnx_m = jit(mj.maml(mse_loss(apply_fn), inner_steps=2, inner_lr=0.1).meta_grad)(
        params, tasks
    )
    toy_loss = mse_loss(mlp_apply)
    toy_grads, toy_m = jit(mj.maml(toy_loss, inner_steps=2, inner_lr=0.1).meta_grad)(toy, tasks)
    err = rel_error(as_toy(nnx_grads["layers"]), toy_grads)
    print(f"NNX vs plain-jax second-order MAML meta-gradient: rel err {err:.2e}")
    assert err < 1e-6
    np.testing.assert_allclose(nnx_m["loss_after"], toy_m["loss_after"], rtol=1e-6)
    assert float(toy_m["loss_after"]) < float(toy_m["loss_before"])

    # ANIL-style masks address NNX parameters by path; update_nnx writes results back.
    mask = mj.mask_by_path(params, "layers/2")
    assert sum(jax.tree.leaves(mask)) == 2
    new = jax.tree.map(lambda p, g: p - 0.1 * g, params, nnx_grads)
    update_nnx(model, new)
    np.testing.assert_allclose(model.layers[0].kernel[...], new["layers"][0]["kernel"])
    np.testing.assert_allclose(
        nnx.jit(lambda m, x: m(x))(model, x), jit(apply_fn)(new, x), rtol=1e-6
    )


def test_apply_fn_is_pure_with_batch_norm_state():
    model = NormNet(nnx.Rngs(2))
    apply_fn, params = from_nnx(model)
    assert set(params) == {"linear", "bn"}  # batch statistics are not parameters
    x = jnp.asarray(np.random.default_rng(3).normal(2.0, 3.0, (6, 2)), jnp.float32)
    first = np.asarray(apply_fn(params, x))
    second = np.asarray(jit(apply_fn)(params, x))
    np.testing.assert_allclose(first, second, rtol=1e-5, atol=1e-6)
    # Training-mode BatchNorm normalises with this batch's statistics...
    np.testing.assert_allclose(first.mean(axis=0), 0.0, atol=1e-5)
    # ...and no call wrote into the module's running statistics.
    np.testing.assert_array_equal(model.bn.mean[...], np.zeros(3))
    np.testing.assert_array_equal(model.bn.var[...], np.ones(3))
