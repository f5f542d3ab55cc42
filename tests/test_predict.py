"""metajax.predict: load a trained workdir and adapt to a user's own few-shot task."""

import jax
import numpy as np
import pytest
from conftest import needs_data

from metajax.run import cli, predict
from metajax.run.config import ConfigError
from metajax.run.config_files import load_config

QUIET = ["--no-progress", "--no-eval"]


@pytest.fixture(scope="module")
def sinusoid_run(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("predict") / "sin"
    assert cli.main(["train", "sinusoid:tiny", "--workdir", str(workdir), *QUIET]) == 0
    return workdir


def test_config_round_trips_through_config_json(sinusoid_run):
    model = predict.load(sinusoid_run)
    assert model.config == load_config("sinusoid:tiny")
    assert model.step == 20


def test_adapt_and_predict_equals_adapting_by_hand(sinusoid_run):
    model = predict.load(sinusoid_run)
    rng = np.random.default_rng(0)
    x = rng.uniform(-5, 5, (5, 1)).astype(np.float32)
    y = 3.0 * np.sin(x - 0.5)
    xq = np.linspace(-5, 5, 7, dtype=np.float32)[:, None]

    exp_algo = model._exp.algo
    apply = model._exp.evaluator.predict_fn
    for steps in (0, 1, 3):
        got = model.adapt_and_predict(x, y, xq, steps=steps)
        adapted = exp_algo.adapt(model.meta_params, (x, y), steps=steps)
        np.testing.assert_allclose(got, apply(adapted, xq), rtol=1e-5, atol=1e-6)
        assert got.shape == (7, 1)
    # Zero steps is the meta-learned model itself; adapting changes the fit toward the support.
    np.testing.assert_allclose(
        model.adapt_and_predict(x, y, xq, steps=0), apply(model.meta_params, xq), rtol=1e-6
    )

    def support_mse(steps):
        return float(np.mean((model.adapt_and_predict(x, y, x, steps=steps) - y) ** 2))

    assert support_mse(10) < support_mse(0)


@needs_data("omniglot")
def test_protonets_adapt_and_predict_classifies_its_own_support(tmp_path):
    workdir = tmp_path / "proto"
    assert cli.main(["train", "omniglot:tiny_protonets", "--workdir", str(workdir), *QUIET]) == 0
    model = predict.load(workdir)
    images = np.random.default_rng(1).integers(0, 256, (5, 28, 28, 1), dtype=np.uint8)
    labels = np.array([3, 0, 4, 1, 2])
    logits = model.adapt_and_predict(images, labels, images)
    assert logits.shape == (5, 5)
    # One shot per class and the query equal to the support: every query sits on its own
    # prototype (distance 0), so the nearest prototype is its label.
    np.testing.assert_array_equal(logits.argmax(-1), labels)
    np.testing.assert_allclose(logits[np.arange(5), labels], 0.0, atol=1e-3)
    adapted = model.adapt(images, labels)
    assert adapted.prototypes.shape == (5, jax.tree.leaves(adapted.params)[-1].shape[-1])


def test_load_errors(tmp_path):
    with pytest.raises(ConfigError, match="config.json"):
        predict.load(tmp_path)
    with pytest.raises(ConfigError, match="no checkpoint"):
        predict.load(tmp_path, "sinusoid:tiny")
