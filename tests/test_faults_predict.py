"""``adapt_and_predict`` refuses data the trained model cannot take, each fault named.

The models are built from their configs, not trained: the checks run before adaptation.
"""

import numpy as np
import pytest
from conftest import needs_data

from metajax.run.build import build
from metajax.run.config_files import load_config
from metajax.run.predict import FewShotModel, PredictInputError


def _model(spec: str) -> FewShotModel:
    exp = build(load_config(spec))
    return FewShotModel(exp, exp.algo.init(exp.params), 0)


@pytest.fixture(scope="module")
def omniglot():
    return _model("omniglot:tiny_protonets")


IMAGES = np.random.default_rng(0).integers(0, 256, (5, 28, 28, 1), dtype=np.uint8)


@needs_data("omniglot")
@pytest.mark.parametrize(
    ("labels", "message"),
    [
        ([1, 2, 3, 4, 5], r"support_y must lie in 0..4 \(zero-based .*got 1..5"),
        ([0, 1, 2, 3, 99], "got 0..99"),
        ([-1, 0, 1, 2, 3], "got -1..3"),
        ([0, 0, 1, 2, 3], r"each class 0..4 equally often .* got counts \[2, 1, 1, 1, 0\]"),
        ([0.0, 1.0, 2.0, 3.0, 4.0], "must be 5 integer labels"),
        ([0, 1, 2, 3], r"must be 5 integer labels .* shape \(4,\)"),
        (None, "support_y is None"),
    ],
)
def test_support_labels_are_checked(omniglot, labels, message):
    with pytest.raises(PredictInputError, match=message):
        omniglot.adapt_and_predict(IMAGES, labels, IMAGES)


@needs_data("omniglot")
def test_images_of_another_size_name_the_trained_shape(omniglot):
    big = np.zeros((5, 32, 32, 1), np.uint8)
    labels = np.arange(5)
    expected = r"the model was trained on inputs of shape \(n, 28, 28, 1\)"
    with pytest.raises(
        PredictInputError, match=r"support_x has shape \(5, 32, 32, 1\); " + expected
    ):
        omniglot.adapt_and_predict(big, labels, IMAGES)
    with pytest.raises(PredictInputError, match=r"query_x has shape \(5, 32, 32, 1\); " + expected):
        omniglot.adapt_and_predict(IMAGES, labels, big)
    with pytest.raises(PredictInputError, match=r"support_x has shape \(5, 28, 28\)"):
        omniglot.adapt_and_predict(IMAGES[..., 0], labels, IMAGES)
    # Well-formed data passes: each query on its own prototype.
    logits = omniglot.adapt_and_predict(IMAGES, labels, IMAGES)
    np.testing.assert_array_equal(logits.argmax(-1), labels)


def test_empty_inputs_are_named():
    lm = _model("words_lm:tiny")
    with pytest.raises(PredictInputError, match="support_x is empty"):
        lm.adapt_and_predict([], None, ["kirja"])
    with pytest.raises(PredictInputError, match="query_x is empty"):
        lm.adapt_and_predict(["kala"], None, [])
    # Token arrays of another length than the model's: named from the trained task shape.
    length = lm.config.task.max_len
    with pytest.raises(PredictInputError, match=rf"\(n, {length}\)"):
        lm.adapt_and_predict(np.ones((2, length + 3), np.int32), None, ["kirja"])
    sinusoid = _model("sinusoid:tiny")
    with pytest.raises(PredictInputError, match="support_x is empty"):
        sinusoid.adapt_and_predict(np.zeros((0,)), np.zeros((0,)), np.zeros((3,)))
