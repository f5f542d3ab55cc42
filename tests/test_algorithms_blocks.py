"""metajax.blocks: the example of its docstring is a working algorithm, equal to the library's."""

import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from toy import mlp_init, mse_loss, rel_error, sine_tasks

import metajax as mj
from metajax import blocks


def _docstring_example() -> dict:
    """Runs the code block of ``metajax.blocks``'s docstring; returns what it defines."""
    doc = blocks.__doc__
    body = doc[doc.index("::\n") + 3 :]
    lines = []
    for line in body.splitlines():
        if line and not line.startswith("    "):
            break
        lines.append(line)
    namespace = {}
    exec(textwrap.dedent("\n".join(lines)), namespace)
    return namespace


def _metric(params, batch):
    return {"abs_error": jnp.mean(jnp.abs(mse_loss(params, batch)))}


def test_docstring_fomaml_equals_the_librarys():
    my_fomaml = _docstring_example()["my_fomaml"]
    params = mlp_init(jax.random.key(0))
    tasks = sine_tasks(jax.random.key(1))
    mine = my_fomaml(mse_loss, inner_steps=3, inner_lr=0.1, metric_fn=_metric)
    theirs = mj.maml(mse_loss, inner_steps=3, inner_lr=0.1, first_order=True, metric_fn=_metric)
    got, got_metrics = jax.jit(mine.meta_grad)(params, tasks)
    want, want_metrics = theirs.meta_grad(params, tasks)
    assert rel_error(got, want) < 1e-6
    assert set(got_metrics) == set(want_metrics)
    for name in want_metrics:
        np.testing.assert_allclose(got_metrics[name], want_metrics[name], rtol=1e-6)
    # Second order differs on this model: the example is first order, not a copy of MAML.
    second, _ = mj.maml(mse_loss, inner_steps=3, inner_lr=0.1).meta_grad(params, tasks)
    assert rel_error(got, second) > 1e-2

    # Keys reach every inner step and the query loss, split per task as the library does.
    def noisy(p, batch, *, key=None):  # metrics call the loss without a key
        x, y = batch
        noise = 0.0 if key is None else 0.1 * jax.random.normal(key, x.shape)
        return mse_loss(p, (x + noise, y))

    key = jax.random.key(2)
    got_k, _ = my_fomaml(noisy, inner_steps=2, inner_lr=0.1).meta_grad(params, tasks, key=key)
    want_k, _ = mj.maml(noisy, inner_steps=2, inner_lr=0.1, first_order=True).meta_grad(
        params, tasks, key=key
    )
    assert rel_error(got_k, want_k) < 1e-6
    # adapt is the library's inner loop, steps overridable.
    one = jax.tree.map(lambda x: x[0], tasks)
    adapted = mine.adapt(params, one.support, steps=5)
    assert rel_error(adapted, theirs.adapt(params, one.support, steps=5)) < 1e-6


def test_blocks_export_what_they_document():
    assert set(blocks.__all__) == {n for n in dir(blocks) if not n.startswith("_")} - {
        "annotations"
    }
    for name in blocks.__all__:
        assert f":func:`{name}`" in blocks.__doc__ or name == "MetaLearner"


@pytest.mark.parametrize("name", ["call_loss", "query_metrics", "fixed_inner_loop"])
def test_helpers_are_not_public_by_accident(name):
    import metajax.algorithms as algorithms
    import metajax.inner as inner

    assert not hasattr(algorithms, "base")
    assert hasattr(blocks, name) and not hasattr(algorithms, name)
    assert not hasattr(inner, "rate_at") and not hasattr(inner, "path_str")
