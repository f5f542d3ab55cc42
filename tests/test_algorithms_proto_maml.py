"""Proto-MAML: its head starts as ProtoNets' readout, and both orders' meta-gradients are
checked against float64 central differences."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from test_algorithms_protonets import DIM, WAYS, embed, make_tasks
from toy import take_task

from metajax.algorithms import (
    centered_cosine,
    head_logits,
    maml,
    proto_maml,
    proto_maml_logits,
    protonets,
    prototype_head,
)

DISTANCES = ("squared_euclidean", "centered_cosine")


def _params(seed=0):
    rng = np.random.default_rng(seed)
    return {"w": jnp.array(rng.normal(size=(DIM, 4)) * 0.7), "b": jnp.array(rng.normal(size=4))}


def _flat(tree):
    return np.concatenate([np.ravel(x) for x in jax.tree.leaves(tree)])


def _central_differences(f, params, eps=1e-6):
    """``d f / d params`` by central differences, flattened in leaf order."""
    leaves, treedef = jax.tree.flatten(params)
    out = []
    for i, leaf in enumerate(leaves):
        leaf = np.asarray(leaf)
        for idx in np.ndindex(leaf.shape):
            moved = []
            for sign in (1, -1):
                bumped = leaf.copy()
                bumped[idx] += sign * eps
                moved.append(jax.tree.unflatten(treedef, [*leaves[:i], bumped, *leaves[i + 1 :]]))
            out.append((float(f(moved[0])) - float(f(moved[1]))) / (2 * eps))
    return np.array(out)


@pytest.mark.parametrize("distance", DISTANCES)
def test_the_prototype_head_is_protonets_readout(distance):
    with jax.enable_x64(True):
        rng = np.random.default_rng(3)
        support, query = rng.normal(size=(6, 5)), rng.normal(size=(7, 5))
        labels = np.array([0, 1, 2, 0, 1, 2])
        head = prototype_head(jnp.array(support), labels, 3, distance, cosine_scale=4.0)
        got = np.asarray(head_logits(head, jnp.array(query)))
        protos = np.stack([support[labels == c].mean(0) for c in range(3)])
        if distance == "squared_euclidean":
            want = -((query[:, None, :] - protos[None]) ** 2).sum(-1)
            # Equal up to -|q|^2, the same for every class: the softmax is the same.
            got, want = got - got.mean(1, keepdims=True), want - want.mean(1, keepdims=True)
        else:
            want = -np.asarray(centered_cosine(4.0)(jnp.array(query), jnp.array(protos)))
        np.testing.assert_allclose(got, want, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("distance", DISTANCES)
def test_before_any_step_it_predicts_as_protonets(distance):
    with jax.enable_x64(True):
        params, tasks = _params(), make_tasks(5, num_tasks=3)
        proto = proto_maml(embed, ways=WAYS, inner_steps=2, inner_lr=0.1, distance=distance)
        _, got = proto.meta_grad(params, tasks)
        _, want = protonets(embed, ways=WAYS, distance=distance).meta_grad(params, tasks)
        np.testing.assert_allclose(got["loss_before"], want["loss_after"], rtol=1e-10)
        np.testing.assert_allclose(got["accuracy_before"], want["accuracy_after"], rtol=1e-10)
        # The inner steps move the head and the embedding: the query loss changes.
        assert abs(float(got["loss_after"]) - float(got["loss_before"])) > 1e-3


@pytest.mark.parametrize("distance", DISTANCES)
def test_second_order_meta_gradient_matches_central_differences(distance):
    with jax.enable_x64(True):
        params, tasks = _params(1), make_tasks(2, num_tasks=2)
        algo = proto_maml(embed, ways=WAYS, inner_steps=2, inner_lr=0.3, distance=distance)
        grads, _ = algo.meta_grad(params, tasks)

        def mean_query_loss(p):
            losses = []
            for i in range(2):
                task = take_task(tasks, i)
                adapted = algo.adapt(p, task.support)
                x, y = task.query
                logits = proto_maml_logits(embed, adapted, x)
                losses.append(jnp.mean(-jax.nn.log_softmax(logits)[jnp.arange(len(y)), y]))
            return jnp.mean(jnp.stack(losses))

        fd = _central_differences(mean_query_loss, params)
        np.testing.assert_allclose(_flat(grads), fd, rtol=1e-5, atol=1e-8)


def test_first_order_differentiates_the_head_but_not_the_inner_loop():
    # fo-Proto-MAML's meta-gradient is that of L(init(p) + delta) with the inner loop's
    # displacement delta held at its value: exact through the prototypes, nothing more.
    with jax.enable_x64(True):
        params, tasks = _params(2), make_tasks(7, num_tasks=1)
        task = take_task(tasks, 0)
        kw = dict(ways=WAYS, inner_steps=3, inner_lr=0.3, distance="centered_cosine")
        algo = proto_maml(embed, first_order=True, **kw)
        grads, _ = algo.meta_grad(params, tasks)
        start = algo.adapt(params, task.support, steps=0)
        delta = jax.tree.map(jnp.subtract, algo.adapt(params, task.support), start)

        def frozen_step_loss(p):
            init = algo.adapt(p, task.support, steps=0)
            moved = jax.tree.map(jnp.add, init, delta)
            x, y = task.query
            logits = proto_maml_logits(embed, moved, x)
            return jnp.mean(-jax.nn.log_softmax(logits)[jnp.arange(len(y)), y])

        fd = _central_differences(frozen_step_loss, params)
        np.testing.assert_allclose(_flat(grads), fd, rtol=1e-5, atol=1e-8)
        second, _ = proto_maml(embed, **kw).meta_grad(params, tasks)
        assert np.abs(_flat(second) - _flat(grads)).max() > 1e-4  # the orders differ


def test_a_mask_freezes_embedding_leaves_and_the_head_adapts():
    params, tasks = _params(), make_tasks(4, num_tasks=1, dtype=np.float32)
    support = take_task(tasks, 0).support
    algo = proto_maml(embed, ways=WAYS, inner_steps=2, inner_lr=0.3, mask={"w": False, "b": True})
    start = algo.adapt(params, support, steps=0)
    adapted = algo.adapt(params, support)
    np.testing.assert_array_equal(adapted["embedding"]["w"], params["w"])
    assert np.abs(adapted["embedding"]["b"] - params["b"]).max() > 1e-5
    assert np.abs(adapted["head"]["kernel"] - start["head"]["kernel"]).max() > 1e-5


def test_maml_task_init_is_where_the_inner_loop_starts():
    # task_init shifts the parameters by the support's mean target: adapt(0 steps) is it.
    loss = lambda p, batch: jnp.mean((batch[0] * p["a"] - batch[1]) ** 2)
    shift = lambda p, support: {"a": p["a"] + jnp.mean(support[1])}
    algo = maml(loss, inner_steps=1, inner_lr=0.1, task_init=shift)
    support = (jnp.ones((4,)), jnp.full((4,), 2.0))
    np.testing.assert_allclose(algo.adapt({"a": jnp.array(1.0)}, support, steps=0)["a"], 3.0)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(distance="cosine"), "unknown distance 'cosine' for a prototype head"),
        (dict(distance="centered_cosine", cosine_scale=-1.0), "cosine scale must be"),
        (dict(ways=1), "ways must be >= 2"),
    ],
)
def test_bad_settings_are_refused(kwargs, message):
    settings = dict(ways=WAYS, inner_steps=1, inner_lr=0.1) | kwargs
    with pytest.raises(ValueError, match=message):
        proto_maml(embed, **settings)


def test_float_labels_are_refused():
    tasks = make_tasks(0, num_tasks=1, dtype=np.float32)
    (x, y), query = tasks.support, tasks.query
    bad = tasks._replace(support=(x, y.astype(np.float32)), query=(query[0], query[1]))
    algo = proto_maml(embed, ways=WAYS, inner_steps=1, inner_lr=0.1)
    with pytest.raises((TypeError, ValueError), match="integers|dtype"):
        algo.meta_grad(_params(), bad)
