"""Parameters and optimizer state sharded over a "model" mesh axis, tasks over "tasks"."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import PartitionSpec as P
from toy import counting_tasks

import metajax as mj
from metajax import parallel
from metajax.models import TransformerConfig, TransformerLM, next_token_loss
from metajax.train import make_train_step, place_state, train_state

# Width 12 with 2 heads of 6: the fused qkv bias (3, 2, 6) has no dimension divisible by 4
# (replicated on a model axis of 4) but splits its last dimension over a model axis of 2.
TINY = TransformerConfig(vocab_size=11, width=12, depth=1, heads=2, mlp_width=16, max_len=6)
LM = TransformerLM(TINY)
QKV_BIAS = ("params", "trunk", "blocks_0", "attn", "qkv", "bias")
MLP_IN = ("params", "trunk", "blocks_0", "mlp_in", "kernel")


@functools.cache
def lm_params():
    return jax.device_get(jax.jit(LM.init)(jax.random.key(0), jnp.zeros((1, 6), jnp.int32)))


def lm_tasks(num_tasks=8, batch=2, seq=6):
    return counting_tasks(0, num_tasks, batch, seq)


def get(tree, path):
    for key in path:
        tree = tree[key]
    return tree


def assert_leaves_close(actual, expected, rtol=1e-5):
    """Per leaf, ``|actual - expected| <= rtol |expected|`` in the 2-norm: summation order
    differs across shards, so single entries near zero may differ relatively more."""

    def close(path, a, b):
        err = float(np.linalg.norm(np.asarray(a) - b)) / max(float(np.linalg.norm(b)), 1e-30)
        assert err < rtol, f"{jax.tree_util.keystr(path)}: relative error {err:.2e}"

    jax.tree_util.tree_map_with_path(close, actual, expected)


def test_fsdp_spec_picks_the_largest_divisible_dimension():
    assert parallel.fsdp_spec((11, 8), 4) == P(None, "model")
    assert parallel.fsdp_spec((12, 16), 4) == P(None, "model")
    assert parallel.fsdp_spec((16, 12), 4) == P("model")
    assert parallel.fsdp_spec((8, 8), 2) == P("model")  # ties: the first
    assert parallel.fsdp_spec((3, 2, 6), 2) == P(None, None, "model")
    assert parallel.fsdp_spec((3, 2, 6), 4) == P()
    assert parallel.fsdp_spec((), 4) == P()
    assert parallel.fsdp_spec((12,), 1) == P()


def test_task_model_mesh_checks_its_sizes():
    mesh = parallel.task_model_mesh(tasks=2, model=4)
    assert dict(mesh.shape) == {"tasks": 2, "model": 4}
    assert parallel.task_axis_size(mesh) == 2
    with pytest.raises(ValueError, match="a 4 x 4 mesh needs 16 devices, but 8 exist"):
        parallel.task_model_mesh(tasks=4, model=4)
    with pytest.raises(ValueError, match="model must be an int >= 1, got 0"):
        parallel.task_model_mesh(tasks=2, model=0)
    with pytest.raises(ValueError, match="needs a mesh axis named 'model'"):
        parallel.fsdp_shardings({"w": jnp.zeros(4)}, parallel.task_mesh(8))
    specs = parallel.fsdp_shardings({"w": jnp.zeros(4), "key": jnp.zeros(4, jnp.uint32)}, mesh)
    assert specs["w"].spec == P("model") and specs["key"].spec == P()
    explicit = jax.make_mesh((2, 4), ("tasks", "model"))  # JAX's default axis type: Explicit
    with pytest.raises(ValueError, match="'model' has the Explicit axis type"):
        place_state({"w": jnp.zeros(4)}, explicit)


def _one_step(mesh, optimizer, algo, tasks):
    state = train_state(algo, lm_params(), optimizer)
    if mesh is None:
        return make_train_step(algo, optimizer)(state, tasks)
    state = place_state(state, mesh)
    return make_train_step(algo, optimizer, mesh=mesh)(state, parallel.shard_tasks(tasks, mesh))


def test_sharded_over_model_axis_equals_one_device():
    algo = mj.maml(next_token_loss(LM.apply), inner_steps=1, inner_lr=0.5)  # second order
    # SGD at rate 1 with momentum: the update is minus the meta-gradient, and the optimizer
    # state (the momentum) has a leaf shaped like every parameter, to be sharded too.
    optimizer = optax.sgd(1.0, momentum=0.9)
    tasks = lm_tasks()
    ref, ref_metrics = jax.device_get(_one_step(None, optimizer, algo, tasks))
    ref_grad = jax.tree.map(jnp.subtract, lm_params(), ref.meta_params)
    assert float(optax.tree.norm(ref_grad)) > 1e-2
    for tasks_size, model_size in [(2, 4), (4, 2)]:
        mesh = parallel.task_model_mesh(tasks=tasks_size, model=model_size)
        state, metrics = _one_step(mesh, optimizer, algo, tasks)
        # Every parameter and momentum leaf lives where fsdp_spec says; the step is replicated.
        for tree in (state.meta_params, state.opt_state[0].trace):
            specs = jax.tree.map(lambda x: x.sharding.spec, tree)
            expected = jax.tree.map(lambda x: parallel.fsdp_spec(x.shape, model_size), tree)
            assert specs == expected
        assert get(state.meta_params, MLP_IN).sharding.spec == P(None, "model")
        qkv_bias = get(state.meta_params, QKV_BIAS).sharding
        assert qkv_bias.is_fully_replicated == (model_size == 4)
        assert get(state.meta_params, MLP_IN).addressable_shards[0].data.shape == (
            12,
            16 // model_size,
        )
        assert state.step.sharding.is_fully_replicated
        assert metrics["loss_after"].sharding.is_fully_replicated
        state = jax.device_get(state)
        grad = jax.tree.map(jnp.subtract, lm_params(), state.meta_params)
        assert_leaves_close(grad, ref_grad)
        assert_leaves_close(state.opt_state, ref.opt_state)
        for key in ref_metrics:
            np.testing.assert_allclose(metrics[key], ref_metrics[key], rtol=1e-5, err_msg=key)


def test_meta_batch_must_divide_the_tasks_axis_and_state_is_donated():
    algo = mj.maml(next_token_loss(LM.apply), inner_steps=1, inner_lr=0.5, first_order=True)
    mesh = parallel.task_model_mesh(tasks=4, model=2)
    state = place_state(train_state(algo, lm_params(), optax.sgd(0.1)), mesh)
    step = make_train_step(algo, optax.sgd(0.1), mesh=mesh)
    with pytest.raises(ValueError, match="6 tasks does not divide over 4 shards of mesh axis"):
        step(state, lm_tasks(num_tasks=6))
    with pytest.raises(ValueError, match="6 tasks does not divide over 4 shards"):
        parallel.shard_tasks(lm_tasks(num_tasks=6), mesh)
    # 4 tasks on a 4 x 2 mesh: one task per "tasks" shard, even though the mesh has 8 devices.
    old = get(state.meta_params, MLP_IN)
    new_state, _ = step(state, parallel.shard_tasks(lm_tasks(num_tasks=4), mesh))
    assert old.is_deleted()
    assert get(new_state.meta_params, MLP_IN).sharding.spec == P(None, "model")


def test_explicit_state_sharding_replicates_on_a_two_axis_mesh():
    algo = mj.maml(next_token_loss(LM.apply), inner_steps=1, inner_lr=0.5, first_order=True)
    mesh = parallel.task_model_mesh(tasks=2, model=4)
    rep = parallel.replicated(mesh)
    state = place_state(train_state(algo, lm_params(), optax.sgd(0.1)), mesh, rep)
    step = make_train_step(algo, optax.sgd(0.1), mesh=mesh, state_sharding=rep)
    state, _ = step(state, parallel.shard_tasks(lm_tasks(num_tasks=2), mesh))
    assert all(x.sharding.is_fully_replicated for x in jax.tree.leaves(state))
    with pytest.raises(ValueError, match="state_sharding needs parallel='sharding' and a mesh"):
        make_train_step(algo, optax.sgd(0.1), state_sharding=rep)


def test_lora_factors_shard_like_any_parameter():
    from metajax import lora as mjl

    lora = mjl.LoRA(rank=4, alpha=4.0, targets=r"mlp_(in|out)/kernel")
    meta = jax.device_get(lora.init(lm_params(), jax.random.key(1)))
    algo = mj.maml(
        lora.wrap(next_token_loss(LM.apply)),
        inner_steps=1,
        inner_lr=0.5,
        first_order=True,
        mask=mjl.inner_mask(meta, "lora"),
    )
    optimizer = mjl.freeze_base(optax.sgd(1.0, momentum=0.9))
    tasks = lm_tasks(num_tasks=4)
    ref, _ = jax.device_get(
        make_train_step(algo, optimizer)(train_state(algo, meta, optimizer), tasks)
    )
    mesh = parallel.task_model_mesh(tasks=2, model=4)
    state = place_state(train_state(algo, meta, optimizer), mesh)
    state, _ = make_train_step(algo, optimizer, mesh=mesh)(state, parallel.shard_tasks(tasks, mesh))
    factors = state.meta_params["lora"]["params"]["trunk"]["blocks_0"]
    assert factors["mlp_in"]["kernel"]["a"].sharding.spec == P("model")  # (12, 4)
    assert factors["mlp_in"]["kernel"]["b"].sharding.spec == P(None, "model")  # (4, 16)
    state = jax.device_get(state)
    jax.tree.map(np.testing.assert_array_equal, state.meta_params["base"], meta["base"])
    moved = jax.tree.map(jnp.subtract, state.meta_params["lora"], meta["lora"])
    assert float(optax.tree.norm(moved)) > 1e-3
    assert_leaves_close(moved, jax.tree.map(jnp.subtract, ref.meta_params["lora"], meta["lora"]))
