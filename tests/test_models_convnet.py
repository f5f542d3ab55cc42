"""The MAML Omniglot ConvNet: pure normalisation, shapes under vmap, exact MAML meta-gradient."""

import functools

import jax
import jax.flatten_util
import jax.numpy as jnp
import numpy as np
import pytest
from toy import one_step_maml_objective, rel_error

import metajax as mj
from metajax.models import ConvNet, ConvNetConfig, PureNorm, classification_loss

# Compile-bound on CPU: unoptimised code, ~5x faster to compile (see test_models_transformer).
FAST_COMPILE = {"xla_backend_optimization_level": 0, "xla_cpu_use_fusion_emitters": False}
jit = functools.partial(jax.jit, compiler_options=FAST_COMPILE)

IMAGE = (28, 28, 1)


def host_params(model, x, seed=0, scale=0.3):
    """Parameters shaped like ``model.init``: N(0, scale^2), plus 1 for norm scales."""
    shapes = jax.eval_shape(model.init, jax.random.key(0), x)
    rng = np.random.default_rng(seed)

    def draw(path, s):
        base = 1.0 if getattr(path[-1], "key", None) == "scale" else 0.0
        return jnp.asarray(base + scale * rng.standard_normal(s.shape), s.dtype)

    return jax.tree_util.tree_map_with_path(draw, shapes)


def images(seed, *shape, dtype=np.float32):
    return np.random.default_rng(seed).uniform(0.0, 1.0, shape + IMAGE).astype(dtype)


def test_config_is_pure_and_checked():
    model = ConvNet(ConvNetConfig(ways=3, filters=4))
    variables = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((2,) + IMAGE))
    assert set(variables) == {"params"}  # no batch_stats collection: apply is pure
    with pytest.raises(ValueError, match="norm"):
        ConvNetConfig(norm="batch_stats")


@pytest.mark.parametrize("kind,axes", [("batch", (0, 1, 2)), ("layer", (1, 2, 3))])
def test_pure_norm_normalises_over_the_documented_axes(kind, axes):
    x = jnp.asarray(np.random.default_rng(1).normal(3.0, 2.0, (4, 5, 5, 3)), jnp.float32)
    norm = PureNorm(kind)
    y = np.asarray(norm.apply(norm.init(jax.random.key(0), x), x), np.float64)
    np.testing.assert_allclose(y.mean(axis=axes), 0.0, atol=1e-5)
    np.testing.assert_allclose(y.var(axis=axes), 1.0, atol=1e-3)


@pytest.mark.parametrize("norm", ["batch", "layer", "none"])
def test_shapes_under_vmap_and_transductive_only_with_batch_norm(norm):
    model = ConvNet(ConvNetConfig(ways=3, filters=4, norm=norm))
    x = images(2, 3, 4)  # 3 tasks of 4 images
    params = host_params(model, x[0])
    out = jit(jax.vmap(model.apply, in_axes=(None, 0)))(params, x)
    assert out.shape == (3, 4, 3) and out.dtype == jnp.float32
    apply = jit(model.apply)
    # Batch statistics stay per task under vmap: vmap equals a loop over tasks.
    np.testing.assert_allclose(out, np.stack([apply(params, x[i]) for i in range(3)]), atol=1e-5)
    # Example 0's logits depend on example 3 only with transductive batch statistics.
    other = x[0].copy()
    other[3] = 1.0 - other[3]
    moved = np.abs(np.asarray(apply(params, other))[0] - np.asarray(out[0, 0])).max()
    if norm == "batch":
        assert moved > 1e-4
    else:
        assert moved < 1e-6


def test_uint8_images_are_scaled_to_unit_interval():
    # No normalisation: a BatchNorm right after the first conv would hide a missing 1/255.
    model = ConvNet(ConvNetConfig(ways=5, filters=4, norm="none"))
    raw = np.random.default_rng(3).integers(0, 256, (4,) + IMAGE).astype(np.uint8)
    params = host_params(model, raw.astype(np.float32))
    apply = jit(model.apply)
    scaled = np.asarray(apply(params, raw.astype(np.float32) / 255.0))
    np.testing.assert_allclose(apply(params, raw), scaled, rtol=1e-5, atol=1e-5)
    assert np.abs(np.asarray(apply(params, raw.astype(np.float32))) - scaled).max() > 1e-3


def test_maml_meta_grad_matches_directional_finite_differences_float64():
    lr, ways, shots = 0.1, 3, 2
    with jax.enable_x64(True):
        model = ConvNet(
            ConvNetConfig(ways=ways, filters=3, dtype=jnp.float64, param_dtype=jnp.float64)
        )
        x = images(4, 2, 2 * ways * shots, dtype=np.float64)  # 2 tasks
        y = np.tile(np.repeat(np.arange(ways), shots), (2, 2)).astype(np.int32)
        n = ways * shots
        tasks = mj.Task(support=(x[:, :n], y[:, :n]), query=(x[:, n:], y[:, n:]))
        params = host_params(model, x[0, :n], seed=5)
        loss_fn = classification_loss(model.apply)

        objective = one_step_maml_objective(loss_fn, tasks, lr)

        algo = mj.maml(loss_fn, inner_steps=1, inner_lr=lr)
        grads, metrics = jit(algo.meta_grad)(params, tasks)
        # Central differences along 4 random unit directions of the whole parameter vector.
        # Unit length keeps each step tiny: ReLU and max-pool are not differentiable at their
        # kinks, and a longer step crosses some of them.
        flat, unravel = jax.flatten_util.ravel_pytree(params)
        g_flat, _ = jax.flatten_util.ravel_pytree(grads)
        dirs = np.random.default_rng(6).standard_normal((4, flat.size))
        dirs = jnp.asarray(dirs / np.linalg.norm(dirs, axis=1, keepdims=True))
        eps = 1e-6
        f = jit(jax.vmap(lambda v: objective(unravel(v))))
        fd = (f(flat + eps * dirs) - f(flat - eps * dirs)) / (2 * eps)
        err = rel_error(dirs @ g_flat, fd)
    print(f"ConvNet (batch norm) MAML meta-gradient vs directional differences: {err:.2e}")
    assert all(bool(jnp.all(jnp.isfinite(g))) for g in jax.tree.leaves(grads))
    assert float(metrics["loss_after"]) < float(metrics["loss_before"])
    assert err < 1e-6
