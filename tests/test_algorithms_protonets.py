"""ProtoNets: loss, accuracy and meta-gradient against a hand-written numpy computation."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from toy import take_task

import metajax as mj
from metajax.algorithms import (
    Prototypes,
    centered_cosine,
    protonet_logits,
    protonets,
    squared_euclidean,
)

WAYS, SHOTS, QUERIES, DIM = 3, 2, 4, 3


def embed(params, x):
    return jnp.tanh(x @ params["w"] + params["b"])


def make_tasks(seed, num_tasks=2, dtype=np.float64):
    rng = np.random.default_rng(seed)
    centers = rng.normal(size=(num_tasks, WAYS, 1, DIM)) * 1.5

    def draw(per_class):
        x = centers + rng.normal(size=(num_tasks, WAYS, per_class, DIM))
        labels = np.broadcast_to(np.arange(WAYS)[None, :, None], (num_tasks, WAYS, per_class))
        order = rng.permutation(WAYS * per_class)  # interleave classes: no reliance on order
        x = x.reshape(num_tasks, -1, DIM)[:, order].astype(dtype)
        return x, labels.reshape(num_tasks, -1)[:, order].astype(np.int32)

    return mj.Task(support=draw(SHOTS), query=draw(QUERIES))


def numpy_episode(w, b, task):
    """Loss and accuracy of one episode, written with loops and numpy only."""
    (xs, ys), (xq, yq) = task
    emb_s, emb_q = np.tanh(xs @ w + b), np.tanh(xq @ w + b)
    protos = np.stack([emb_s[ys == c].mean(axis=0) for c in range(WAYS)])
    losses, correct = [], 0
    for e, y in zip(emb_q, yq, strict=True):
        logits = np.array([-np.sum((e - p) ** 2) for p in protos])
        log_z = np.log(np.sum(np.exp(logits - logits.max()))) + logits.max()
        losses.append(log_z - logits[y])
        correct += int(np.argmax(logits) == y)
    return np.mean(losses), correct / len(yq)


def numpy_mean_loss(w, b, tasks):
    n = tasks.support[0].shape[0]
    return np.mean([numpy_episode(w, b, take_task(tasks, i))[0] for i in range(n)])


def test_loss_metrics_and_gradient_match_numpy_float64():
    with jax.enable_x64(True):
        rng = np.random.default_rng(0)
        w, b = rng.normal(size=(DIM, 4)) * 0.7, rng.normal(size=(4,)) * 0.1
        tasks = make_tasks(1)
        algo = protonets(embed, ways=WAYS)
        grads, metrics = jax.jit(algo.meta_grad)({"w": jnp.array(w), "b": jnp.array(b)}, tasks)
        eps = 1e-6
        fd = {"w": np.zeros_like(w), "b": np.zeros_like(b)}
        for name, arr in (("w", w), ("b", b)):
            for idx in np.ndindex(arr.shape):
                plus, minus = arr.copy(), arr.copy()
                plus[idx] += eps
                minus[idx] -= eps
                up, down = ((plus, b), (minus, b)) if name == "w" else ((w, plus), (w, minus))
                fd[name][idx] = (numpy_mean_loss(*up, tasks) - numpy_mean_loss(*down, tasks)) / (
                    2 * eps
                )
        want_loss = numpy_mean_loss(w, b, tasks)
        want_acc = np.mean([numpy_episode(w, b, take_task(tasks, i))[1] for i in range(2)])
        loss_err = abs(float(metrics["loss_after"]) - want_loss) / want_loss
        flat = lambda t: np.concatenate([np.ravel(t["w"]), np.ravel(t["b"])])
        grad_err = np.linalg.norm(flat(grads) - flat(fd)) / np.linalg.norm(flat(fd))
    print(
        f"ProtoNets vs numpy: loss rel err {loss_err:.2e}, gradient vs numpy central "
        f"differences {grad_err:.2e}, accuracy {float(metrics['accuracy_after']):.3f}"
    )
    assert loss_err < 1e-12
    assert grad_err < 1e-7
    np.testing.assert_allclose(metrics["accuracy_after"], want_acc, rtol=1e-12)
    np.testing.assert_allclose(metrics["loss_before"], math.log(WAYS), rtol=1e-6)
    np.testing.assert_allclose(metrics["accuracy_before"], 1 / WAYS, rtol=1e-6)


def test_adapt_returns_prototypes_for_prediction():
    rng = np.random.default_rng(2)
    params = {"w": jnp.array(rng.normal(size=(DIM, 4)), jnp.float32), "b": jnp.zeros(4)}
    task = jax.tree.map(lambda a: a[0], make_tasks(3, num_tasks=1, dtype=np.float32))
    algo = protonets(embed, ways=WAYS)
    adapted = algo.adapt(params, task.support)
    assert isinstance(adapted, Prototypes) and adapted.prototypes.shape == (WAYS, 4)
    xs, ys = task.support
    emb = np.tanh(np.asarray(xs) @ np.asarray(params["w"]))
    for c in range(WAYS):
        np.testing.assert_allclose(adapted.prototypes[c], emb[ys == c].mean(axis=0), rtol=1e-5)
    logits = protonet_logits(embed, adapted, task.query[0])
    assert logits.shape == (WAYS * QUERIES, WAYS)
    _, trace = algo.adapt_trace(params, task.support, lambda a: a.prototypes)
    assert trace.shape == (1, WAYS, 4)
    np.testing.assert_array_equal(trace[0], adapted.prototypes)
    with pytest.raises(ValueError, match="no inner steps"):
        algo.adapt(params, task.support, steps=1)


def numpy_centered_cosine(queries, prototypes, scale):
    center = prototypes.mean(axis=0)
    q, p = queries - center, prototypes - center
    cos = (q @ p.T) / np.outer(np.linalg.norm(q, axis=1), np.linalg.norm(p, axis=1))
    return -scale * cos


def test_centered_cosine_matches_numpy_and_ignores_a_shared_offset_and_scale():
    rng = np.random.default_rng(4)
    queries, prototypes = rng.normal(size=(7, 5)), rng.normal(size=(3, 5))
    distance = centered_cosine(4.0)
    want = numpy_centered_cosine(queries, prototypes, 4.0)
    np.testing.assert_allclose(distance(queries, prototypes), want, rtol=1e-5, atol=1e-6)
    # What it is for: states sharing a large common direction, at any norm.
    offset = 50.0 * rng.normal(size=(5,))
    shifted = distance(3.0 * queries + offset, 3.0 * prototypes + offset)
    np.testing.assert_allclose(shifted, want, rtol=1e-4, atol=1e-4)
    # Squared Euclidean distances change under the same offset-free rescaling.
    assert not np.allclose(squared_euclidean(3.0 * queries, 3.0 * prototypes),
                           squared_euclidean(queries, prototypes))  # fmt: skip
    with pytest.raises(ValueError, match="scale must be > 0"):
        centered_cosine(0.0)
    with pytest.raises(ValueError, match="unknown distance 'cosine'"):
        protonets(embed, ways=WAYS, distance="cosine")


def test_centered_cosine_loss_and_gradient_against_numpy_and_finite_at_the_center():
    with jax.enable_x64(True):
        rng = np.random.default_rng(5)
        w, b = rng.normal(size=(DIM, 4)) * 0.7, rng.normal(size=(4,)) * 0.1
        tasks = make_tasks(6, num_tasks=1)
        task = take_task(tasks, 0)
        algo = protonets(embed, ways=WAYS, distance="centered_cosine", cosine_scale=3.0)

        def numpy_loss(w):
            (xs, ys), (xq, yq) = task
            emb_s, emb_q = np.tanh(xs @ w + b), np.tanh(xq @ w + b)
            protos = np.stack([emb_s[ys == c].mean(axis=0) for c in range(WAYS)])
            logits = -numpy_centered_cosine(emb_q, protos, 3.0)
            log_z = np.log(np.exp(logits).sum(axis=1))
            return np.mean(log_z - logits[np.arange(len(yq)), yq])

        params = {"w": jnp.array(w), "b": jnp.array(b)}
        grads, metrics = algo.meta_grad(params, tasks)
        loss, grad = metrics["loss_after"], grads["w"]
        fd = np.zeros_like(w)
        for idx in np.ndindex(w.shape):
            plus, minus = w.copy(), w.copy()
            plus[idx] += 1e-6
            minus[idx] -= 1e-6
            fd[idx] = (numpy_loss(plus) - numpy_loss(minus)) / 2e-6
        np.testing.assert_allclose(loss, numpy_loss(w), rtol=1e-10)
        np.testing.assert_allclose(grad, fd, rtol=1e-5, atol=1e-8)
        # Two identical prototypes both equal the 2-way center: zero vectors, finite gradient.
        same = jnp.ones((2, 4))
        g = jax.grad(lambda p: centered_cosine()(jnp.ones((1, 4)) * 2.0, p).sum())(same)
        assert np.all(np.isfinite(g))


def test_the_runner_names_the_same_distances():
    from metajax.algorithms.protonets import DISTANCES
    from metajax.run.config import DISTANCES as RUNNER_DISTANCES

    assert RUNNER_DISTANCES == DISTANCES
