"""Held-out evaluation adapts each task once: the jitted metrics and the host-side scores
come from the same adaptation."""

import jax
import numpy as np
import pytest
from toy import mlp_init, mse_loss

import metajax as mj
from metajax.tasks.sinusoid import Sinusoid
from metajax.train import evaluate

NUM_TASKS, CHUNK, STEPS = 6, 4, 3  # two chunks: 4 tasks, then 2


def _counting(algo, runs: list):
    """``algo`` whose ``adapt_trace`` reports each run (not each trace) to ``runs``."""

    def adapt_trace(meta_params, support, trace_fn=None, *, steps=None, key=None):
        jax.debug.callback(lambda x: runs.append(x.shape), support[0])
        return algo.adapt_trace(meta_params, support, trace_fn, steps=steps, key=key)

    return algo._replace(adapt_trace=adapt_trace)


def _scored_evaluation(vmap_tasks: bool):
    algo = mj.maml(mse_loss, inner_steps=1, inner_lr=0.1)
    params = mlp_init(jax.random.key(0))
    source = Sinusoid(shots=5, queries=7, split="test")
    runs, scored = [], []

    def score_fn(adapted, query):
        scored.append(1)
        return {"host_mse": float(mse_loss(adapted, query))}

    per_task = evaluate(
        _counting(algo, runs),
        params,
        source,
        mse_loss,
        num_tasks=NUM_TASKS,
        steps=STEPS,
        chunk=CHUNK,
        vmap_tasks=vmap_tasks,
        score_fn=score_fn,
        score_steps=(0, 2, 3),
    )
    jax.effects_barrier()
    return algo, params, source, per_task, runs, scored


@pytest.mark.parametrize("vmap_tasks", [True, False])
def test_each_task_is_adapted_once_for_metrics_and_host_scores(vmap_tasks):
    algo, params, source, per_task, runs, scored = _scored_evaluation(vmap_tasks)
    assert len(runs) == NUM_TASKS and all(shape == (5, 1) for shape in runs)
    assert len(scored) == NUM_TASKS * 3
    assert list(per_task) == ["loss", "host_mse"]  # the scores after the jitted metrics
    assert per_task["host_mse"].shape == (NUM_TASKS, STEPS + 1)
    assert np.isnan(per_task["host_mse"][:, 1]).all()
    # The host scores the parameters the jitted loss saw: the same numbers where scored.
    for k in (0, 2, 3):
        np.testing.assert_allclose(per_task["host_mse"][:, k], per_task["loss"][:, k], rtol=1e-6)
    # Each scored step's parameters are those of adapting k steps from scratch.
    tasks = source.sample(0, NUM_TASKS)
    for i in range(NUM_TASKS):
        task = jax.tree.map(lambda x, i=i: x[i], tasks)
        for k in (0, 2, 3):
            direct = mse_loss(algo.adapt(params, task.support, steps=k), task.query)
            np.testing.assert_allclose(per_task["host_mse"][i, k], direct, rtol=1e-5)


def test_scored_loss_equals_the_unscored_vmapped_one():
    algo, params, source, per_task, _, _ = _scored_evaluation(vmap_tasks=True)
    runs = []
    plain = evaluate(
        _counting(algo, runs),
        params,
        source,
        mse_loss,
        num_tasks=NUM_TASKS,
        steps=STEPS,
        chunk=CHUNK,
    )
    jax.effects_barrier()
    assert len(runs) == NUM_TASKS and list(plain) == ["loss"]
    np.testing.assert_allclose(per_task["loss"], plain["loss"], rtol=1e-5)
    # Adaptation moves every task's loss: one step count's scores cannot pass for another's.
    assert np.abs(plain["loss"][:, STEPS] - plain["loss"][:, 0]).min() > 0.01


def test_score_steps_beyond_the_evaluated_steps_are_refused():
    params = mlp_init(jax.random.key(0))
    algo = mj.maml(mse_loss, inner_steps=1, inner_lr=0.1)
    with pytest.raises(ValueError, match=r"score_steps=\(4,\): each must be in 0..steps=3"):
        evaluate(
            algo,
            params,
            Sinusoid(shots=5, queries=7, split="test"),
            mse_loss,
            num_tasks=2,
            steps=3,
            score_fn=lambda adapted, query: {},
            score_steps=(4,),
        )
