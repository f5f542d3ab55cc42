"""LoRA factors as meta-parameters: merge math, masks, exactness, and every algorithm."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from toy import (
    central_differences,
    counting_tasks,
    mlp_init,
    mse_loss,
    rel_error,
    sine_tasks,
    take_task,
)

import metajax as mj
from metajax import lora as mjl
from metajax.models import TransformerConfig, TransformerLM, next_token_loss
from metajax.train import make_train_step, train_state

TINY = TransformerConfig(vocab_size=11, width=8, depth=1, heads=2, mlp_width=16, max_len=6)
LM = TransformerLM(TINY)
LM_LOSS = next_token_loss(LM.apply)
# Every kernel of the tiny LM's blocks: the fused qkv (8, 3, 2, 4) and out (2, 4, 8) kernels
# need their input axes named; the MLP kernels are plain matrices.
BLOCK_LORA = mjl.LoRA(
    rank=2, alpha=4.0, targets=r"(attn|mlp).*/kernel", in_dims={r"attn/out": 2, r"attn/qkv": 1}
)


@functools.cache
def lm_params(seed=0):
    return jax.jit(LM.init)(jax.random.key(seed), jnp.zeros((1, 6), jnp.int32))


def lm_tasks(seed, num_tasks=2, batch=3, seq=6):
    return counting_tasks(seed, num_tasks, batch, seq)


def with_random_b(meta, key, scale=0.3):
    """Non-zero B factors, as after meta-training (at init B = 0 hides A's gradient paths)."""
    leaves, treedef = jax.tree.flatten(meta["lora"])
    keys = jax.random.split(key, len(leaves))
    leaves = [scale * jax.random.normal(k, x.shape, x.dtype) for k, x in zip(keys, leaves)]
    return {"base": meta["base"], "lora": jax.tree.unflatten(treedef, leaves)}


def test_merged_equals_base_at_init_and_factor_shapes():
    params = lm_params()
    meta = BLOCK_LORA.init(params, jax.random.key(1))
    merged = jax.jit(BLOCK_LORA.merge)(meta)
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(a, b), merged, params)
    block = meta["lora"]["params"]["trunk"]["blocks_0"]
    factor_shapes = lambda f: (f["kernel"]["a"].shape, f["kernel"]["b"].shape)
    assert factor_shapes(block["attn"]["qkv"]) == ((8, 2), (2, 24))  # (8, 3 * 2 * 4)
    assert factor_shapes(block["attn"]["out"]) == ((8, 2), (2, 8))  # (2 * 4, 8)
    assert block["mlp_in"]["kernel"]["a"].shape == (8, 2)
    assert block["mlp_out"]["kernel"]["b"].shape == (2, 8)
    assert not jnp.any(block["mlp_out"]["kernel"]["b"])
    assert "embed" not in meta["lora"]["params"]["trunk"]  # the regex does not reach it
    # A ~ N(0, 1 / fan_in): checked on a kernel with enough entries to estimate the std.
    big = mjl.LoRA(rank=8, targets="w").init({"w": jnp.zeros((256, 4))}, jax.random.key(2))
    np.testing.assert_allclose(np.std(big["lora"]["w"]["a"]), 1 / 16, rtol=0.1)


def test_rank_alpha_math_on_hand_built_factors():
    w = jnp.arange(6.0).reshape(2, 3)
    lora = mjl.LoRA(rank=2, alpha=3.0, targets=r"^w$")
    assert lora.scale == 1.5
    a = jnp.array([[1.0, 2.0], [0.0, -1.0]])
    b = jnp.array([[1.0, 0.0, 2.0], [0.5, 1.0, 0.0]])
    meta = {"base": {"w": w, "bias": jnp.ones(3)}, "lora": {"w": {"a": a, "b": b}}}
    merged = lora.merge(meta)
    # a @ b = [[2, 2, 2], [-0.5, -1, 0]], times alpha / rank = 1.5.
    np.testing.assert_allclose(merged["w"], w + jnp.array([[3.0, 3.0, 3.0], [-0.75, -1.5, 0.0]]))
    np.testing.assert_array_equal(merged["bias"], jnp.ones(3))
    assert mjl.LoRA(rank=4, targets="w").scale == 1.0  # alpha defaults to rank


@pytest.mark.parametrize("in_dims, matrix", [(1, (2, 6)), (2, (4, 3))])
def test_kernels_with_more_axes_fold_their_leading_axes(in_dims, matrix):
    kernel = jnp.zeros((2, 2, 3))
    lora = mjl.LoRA(rank=1, alpha=2.0, targets="k", in_dims=in_dims)
    meta = lora.init({"k": kernel}, jax.random.key(0))
    assert meta["lora"]["k"]["a"].shape == (matrix[0], 1)
    assert meta["lora"]["k"]["b"].shape == (1, matrix[1])
    a = jnp.arange(1.0, matrix[0] + 1)[:, None]
    b = jnp.arange(1.0, matrix[1] + 1)[None, :]
    merged = lora.merge({"base": {"k": kernel}, "lora": {"k": {"a": a, "b": b}}})
    np.testing.assert_allclose(merged["k"], 2.0 * np.outer(a, b).reshape(2, 2, 3))


def test_bad_input_raises_clear_errors():
    params = lm_params()
    with pytest.raises(ValueError, match="matches no kernel"):
        mjl.LoRA(rank=2, targets="nonexistent").init(params, jax.random.key(0))
    with pytest.raises(ValueError, match=r"matches no kernel"):
        mjl.LoRA(rank=2, targets="ln_attn").init(params, jax.random.key(0))  # 1-D leaves only
    with pytest.raises(ValueError, match=r"attn/out/kernel has shape \(2, 4, 8\).*in_dims"):
        mjl.LoRA(rank=2, targets="attn").init(params, jax.random.key(0))
    with pytest.raises(ValueError, match="in_dims for k must be an int in"):
        mjl.LoRA(rank=1, targets="k", in_dims=3).init(
            {"k": jnp.zeros((2, 2, 3))}, jax.random.key(0)
        )
    with pytest.raises(ValueError, match="rank must be an int >= 1"):
        mjl.LoRA(rank=0, targets="w")
    with pytest.raises(ValueError, match="alpha must be"):
        mjl.LoRA(rank=2, targets="w", alpha=-1.0)
    lora = mjl.LoRA(rank=2, targets="w")
    with pytest.raises(TypeError, match="LoRA meta-parameters"):
        lora.merge(params)
    meta = {
        "base": {"w": jnp.zeros((4, 4))},
        "lora": {"v": {"a": jnp.zeros((4, 2)), "b": jnp.zeros((2, 4))}},
    }
    with pytest.raises(ValueError, match=r"without a kernel in the base: \['v'\]"):
        lora.merge(meta)
    meta = {
        "base": {"w": jnp.zeros((4, 4))},
        "lora": {"w": {"a": jnp.zeros((4, 3)), "b": jnp.zeros((3, 4))}},
    }
    with pytest.raises(ValueError, match="do not fit the kernel w"):
        lora.merge(meta)
    meta = lora.init({"w": jnp.zeros((4, 4))}, jax.random.key(0))
    with pytest.raises(ValueError, match="adapt must be"):
        mjl.inner_mask(meta, "factors")
    with pytest.raises(ValueError, match="matches no leaf of the base"):
        mjl.inner_mask(meta, "lora+norm")
    with pytest.raises(ValueError, match="found no LoRA meta-parameters"):
        mjl.outer_mask({"w": jnp.zeros(3)})


def lora_objective(meta, tasks, scale, steps, lr):
    """Second-order MAML over the factors of layer 1 written plainly: merge by hand, a Python
    loop over tasks and steps, the base fixed in the inner loop."""

    def model_params(base, factors):
        w = base[1]["w"] + scale * factors["a"] @ factors["b"]
        return [base[0], {"w": w, "b": base[1]["b"]}, base[2]]

    total = 0.0
    n = tasks.support[0].shape[0]
    for i in range(n):
        task = take_task(tasks, i)
        factors = meta["lora"]["1"]["w"]
        for _ in range(steps):
            g = jax.grad(lambda f: mse_loss(model_params(meta["base"], f), task.support))(factors)
            factors = jax.tree.map(lambda p, d: p - lr * d, factors, g)
        total = total + mse_loss(model_params(meta["base"], factors), task.query)
    return total / n


def test_second_order_maml_through_factors_matches_finite_differences_float64():
    with jax.enable_x64(True):
        params = mlp_init(jax.random.key(0), (1, 4, 4, 1), jnp.float64)
        lora = mjl.LoRA(rank=2, alpha=3.0, targets=r"^1/w$")
        meta = with_random_b(lora.init(params, jax.random.key(1)), jax.random.key(2))
        tasks = sine_tasks(jax.random.key(3), num_tasks=2, dtype=jnp.float64)
        algo = mj.maml(
            lora.wrap(mse_loss), inner_steps=2, inner_lr=0.1, mask=mjl.inner_mask(meta, "lora")
        )
        grads, _ = jax.jit(algo.meta_grad)(meta, tasks)
        fd = central_differences(lambda m: lora_objective(m, tasks, 1.5, 2, 0.1), meta)
        err = rel_error(grads, fd)
        base_err = rel_error(grads["base"], fd["base"])
        assert float(jnp.linalg.norm(grads["lora"]["1"]["w"]["a"])) > 1e-3
    print(f"second-order MAML through LoRA vs central differences: rel err {err:.2e}")
    assert err < 1e-6
    assert base_err < 1e-6


@pytest.mark.parametrize("adapt", ["lora", "lora+norm"])
def test_inner_loop_moves_only_what_the_mask_adapts(adapt):
    meta = BLOCK_LORA.init(lm_params(), jax.random.key(1))
    mask = mjl.inner_mask(meta, adapt)
    algo = mj.maml(BLOCK_LORA.wrap(LM_LOSS), inner_steps=2, inner_lr=0.5, mask=mask)
    adapted = jax.jit(algo.adapt)(meta, take_task(lm_tasks(0), 0).support)
    moved = jax.tree.map(lambda a, b: bool(jnp.any(a != b)), adapted, meta)
    # Two steps: B moves at the first, A at the second (its gradient carries a factor B).
    assert all(jax.tree.leaves(moved["lora"]))
    base_moved = {
        mj.path_str(kp): m for kp, m in jax.tree_util.tree_flatten_with_path(moved["base"])[0]
    }
    expected = {p: adapt == "lora+norm" and ("ln_" in p) for p in base_moved}
    assert base_moved == expected
    assert sum(expected.values()) == (0 if adapt == "lora" else 6)  # 3 LayerNorms x scale, bias


def test_frozen_base_gets_no_outer_update_through_train_step():
    meta = BLOCK_LORA.init(lm_params(), jax.random.key(1))
    algo = mj.maml(
        BLOCK_LORA.wrap(LM_LOSS),
        inner_steps=1,
        inner_lr=0.5,
        mask=mjl.inner_mask(meta, "lora+norm"),
    )
    optimizer = mjl.freeze_base(optax.adam(1e-2))
    state = train_state(algo, meta, optimizer)
    # Adam keeps moments only for the 8 factor leaves (times mu and nu), none for the base.
    assert len(jax.tree.leaves(state.opt_state)) == 2 * 8 + 1
    before = jax.device_get(state.meta_params)
    state, metrics = make_train_step(algo, optimizer)(state, lm_tasks(0))
    after = jax.device_get(state.meta_params)
    jax.tree.map(np.testing.assert_array_equal, after["base"], before["base"])
    changes = jax.tree.map(lambda a, b: float(np.max(np.abs(a - b))), after["lora"], before["lora"])
    # Adam's first step moves every leaf with a non-zero gradient by about the learning rate.
    np.testing.assert_allclose(max(jax.tree.leaves(changes)), 1e-2, rtol=1e-3)
    assert np.isfinite(metrics["loss_after"]) and metrics["grad_norm"] > 0
    # optax.masked alone would let the base's gradients through as updates.
    masked = optax.masked(optax.adam(1e-2), mjl.outer_mask(before))
    grads = jax.tree.map(jnp.ones_like, before)
    updates, _ = masked.update(grads, masked.init(before), before)
    assert float(jnp.sum(updates["base"]["params"]["trunk"]["positions"])) == 6 * 8


def _algorithms(meta):
    loss = BLOCK_LORA.wrap(LM_LOSS)
    mask = mjl.inner_mask(meta, "lora")
    return {
        "fomaml": mj.maml(loss, inner_steps=2, inner_lr=0.5, first_order=True, mask=mask),
        "reptile": mj.reptile(loss, inner_steps=2, inner_lr=0.5, mask=mask),
        "anil": mj.anil(loss, head=r"^lora/", inner_steps=2, inner_lr=0.5),
        "meta_sgd": mj.meta_sgd(loss, inner_steps=2, inner_lr=0.5, mask=mask),
    }


@pytest.mark.parametrize("name", ["fomaml", "reptile", "anil", "meta_sgd"])
def test_each_algorithm_takes_one_meta_gradient(name):
    meta = BLOCK_LORA.init(lm_params(), jax.random.key(1))
    algo = _algorithms(meta)[name]
    meta_params = algo.init(meta)
    grads, metrics = jax.jit(algo.meta_grad)(meta_params, lm_tasks(0))
    assert jax.tree.structure(grads) == jax.tree.structure(meta_params)
    assert mj.train.all_finite(grads)
    norm = lambda tree: float(optax.tree.norm(tree))
    meta_grads = grads["params"] if name == "meta_sgd" else grads
    assert norm(meta_grads["lora"]) > 1e-6
    if name == "reptile":
        # The pseudo-gradient base - mean(adapted base) is exactly zero: the base never adapts.
        assert norm(meta_grads["base"]) == 0.0
    else:
        # The outer loop still sees the base (through the query loss at the adapted factors).
        assert norm(meta_grads["base"]) > 1e-6
    if name == "meta_sgd":
        assert norm(grads["lr"]["base"]) == 0.0 and norm(grads["lr"]["lora"]) > 0.0
    assert float(metrics["loss_after"]) < float(metrics["loss_before"])
