"""The frozen trunk (``task.trainable_blocks``): meta-gradients through the cached hidden states
equal those of the whole model on tokens, the cache's files are reused by another process
without recomputing, and prediction with a trunk matches the model without one."""

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import jax
import jax.flatten_util
import jax.numpy as jnp
import numpy as np
import pytest

import metajax as mj
from metajax.models import load_gpt2, next_token_loss
from metajax.run.build import build
from metajax.run.config_files import load_config
from metajax.run.predict import FewShotModel
from metajax.run.trunk_cache import TrunkCache

FIXTURE = Path(__file__).resolve().parent / "fixtures" / "gpt2_tiny"
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def trunk_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("METAJAX_TRUNK_CACHE", str(tmp_path / "trunk"))
    return tmp_path / "trunk"


def _rel(got, want):
    got, want = (np.asarray(jax.flatten_util.ravel_pytree(t)[0], np.float64) for t in (got, want))
    return float(np.linalg.norm(got - want) / np.linalg.norm(want))


def _whole_model_params(meta, alpha=4.0):
    """The GPT-2 parameters of LoRA meta-parameters over the top: the pretrained trunk below,
    the merged top above."""
    _, pretrained = load_gpt2(FIXTURE)
    return {"params": {**pretrained["params"], **_top(meta, alpha)["params"]}}


def _top(meta, alpha=4.0):
    from metajax.lora import LoRA

    return LoRA(rank=2, alpha=alpha, targets=r"(c_attn|c_proj|c_fc)/kernel").merge(meta)


def test_second_order_meta_gradient_through_the_cache_equals_the_whole_models(trunk_cache):
    config = load_config("words_lm:gpt2_tiny", ["task.trainable_blocks=1"])
    exp = build(config)
    meta = exp.algo.init(exp.params)
    tasks = exp.setup.train_source.sample(0, 4)
    (tokens, hidden), mask = tasks.support
    assert hidden.shape == (*tokens.shape, 32) and hidden.dtype == np.float32
    grads, metrics = jax.jit(exp.algo.meta_grad)(meta, tasks)

    gpt2, pretrained = load_gpt2(FIXTURE)
    token_tasks = exp.setup.train_source.source.sample(0, 4)  # the same draws, in tokens

    def meta_grad(apply):
        loss = next_token_loss(apply)
        reference = mj.maml(loss, inner_steps=1, inner_lr=0.5, mask=exp.setup.inner_mask)
        return jax.jit(reference.meta_grad)(meta, token_tasks)

    # The whole GPT-2 on tokens: equal everywhere but at the token embedding, which the
    # whole model also reads at its input, where the trunk's own copy is frozen.
    want, want_metrics = meta_grad(lambda p, t: gpt2.apply(_whole_model_params(p), t))
    np.testing.assert_allclose(metrics["loss_after"], want_metrics["loss_after"], rtol=1e-5)
    wte = lambda tree: tree["base"]["params"].pop("wte")
    grads_wte, want_wte = wte(grads), wte(want)
    assert _rel(grads, want) < 1e-5
    assert _rel(grads_wte, want_wte) > 1e-3
    # The trunk run inside the differentiated program with frozen weights: equal everywhere.
    trunk = {"params": {k: pretrained["params"][k] for k in ("wte", "wpe", "h_0")}}

    def trunk_then_top(p, t):
        hidden = gpt2.apply(trunk, t, blocks=1, method="trunk")
        return gpt2.apply(_top(p), hidden, start=1, method="top")

    want, _ = meta_grad(trunk_then_top)
    assert _rel(grads_wte, want["base"]["params"]["wte"]) < 1e-5
    # The gradient reaches the top's factors; the trunk has none.
    assert sorted(grads["lora"]["params"]) == ["h_1"]
    assert float(jnp.abs(grads["lora"]["params"]["h_1"]["mlp"]["c_fc"]["kernel"]["b"]).max()) > 0


def test_fewrel_maml_meta_gradient_through_the_cache_equals_the_whole_models(tmp_path):
    from test_fewrel_pretrained import _config

    exp = build(_config(tmp_path, "maml", trainable_blocks=1))
    meta = exp.algo.init(exp.params)
    tasks = exp.setup.train_source.sample(0, 2)
    grads, _ = jax.jit(exp.algo.meta_grad)(meta, tasks)

    gpt2, _ = load_gpt2(FIXTURE)

    def apply(params, x):
        tokens, positions = x
        whole = _whole_model_params(params["model"], alpha=16.0)  # _config's lora_alpha
        states = gpt2.apply(whole, tokens, method="features")
        pooled = jnp.take_along_axis(states, positions[:, :, None], axis=1)
        features = pooled.reshape(pooled.shape[0], -1)
        return features @ params["head"]["kernel"] + params["head"]["bias"]

    loss = mj.models.classification_loss(apply)
    reference = mj.maml(loss, inner_steps=1, inner_lr=0.1, mask=exp.setup.inner_mask)
    token_tasks = exp.setup.train_source.source.sample(0, 2)
    want, _ = jax.jit(reference.meta_grad)(meta, token_tasks)
    assert _rel(grads, want) < 1e-5
    assert _rel(grads["head"], want["head"]) < 1e-5 and float(jnp.abs(want["head"]["kernel"]).max())


def test_prediction_with_a_trunk_equals_the_whole_model(tmp_path):
    from test_fewrel_pretrained import _config, sentence

    support = [sentence(["a", "b", "c", "d"], [0], [2]), sentence(["e", "f", "g"], [2], [0])]
    outputs = []
    for blocks in (None, 1):
        exp = build(_config(tmp_path, "maml", trainable_blocks=blocks))
        model = FewShotModel(exp, exp.algo.init(exp.params), 0)
        # b = 0: both meta-parameters are the pretrained GPT-2 with a zero head, so the
        # pooled features agree, and one adaptation step moves the head the same way.
        inputs = exp.evaluator.inputs_fn(support)
        outputs.append(
            (
                np.asarray(exp.setup.embedding.apply_fn(exp.setup.embedding.params, inputs)),
                np.asarray(model.adapt(support, [0, 1])["head"]["kernel"]),
                model.adapt_and_predict(support, [0, 1], support),
            )
        )
    (f0, h0, p0), (f1, h1, p1) = outputs
    np.testing.assert_allclose(f1, f0, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(h1, h0, rtol=1e-5, atol=1e-7)
    assert p1.shape == (2, 2) and np.isfinite(p1).all()


def test_cache_computes_each_sequence_once_and_keys_by_blocks(trunk_cache):
    model, params = load_gpt2(FIXTURE)
    cache = TrunkCache(model, params, 1, "digest-a")
    tokens = np.array([[[0, 5, 6, 0], [0, 7, 0, 0]], [[0, 5, 6, 0], [0, 8, 9, 0]]], np.int32)
    hidden = cache.hidden(tokens)
    assert hidden.shape == (2, 2, 4, 32) and cache.computed == 3 and cache.read == 0
    want = model.apply(params, tokens.reshape(4, 4), blocks=1, method="trunk")
    np.testing.assert_allclose(hidden.reshape(4, 4, 32), want, rtol=1e-6, atol=1e-6)
    np.testing.assert_array_equal(hidden[0, 0], hidden[1, 0])
    assert cache.hidden(tokens[:1]).shape == (1, 2, 4, 32) and cache.computed == 3
    files = sorted(cache.folder.rglob("*.npy"))
    assert len(files) == 3 and not list(cache.folder.rglob("*.tmp"))
    # Another number of frozen blocks or other weights: another folder, computed anew.
    for other in (TrunkCache(model, params, 2, "digest-a"), TrunkCache(model, params, 1, "b")):
        assert other.folder != cache.folder
        other.hidden(tokens)
        assert other.computed == 3


def test_missing_rows_pad_to_a_power_of_two_and_stored_states_are_found():
    model, params = load_gpt2(FIXTURE)
    cache = TrunkCache(model, params, 1, "digest-pad")
    shapes = []
    trunk = cache._trunk
    cache._trunk = lambda p, t: shapes.append(t.shape[0]) or trunk(p, t)
    tokens = np.arange(3 * 4, dtype=np.int32).reshape(3, 4) % 50
    hidden = cache.hidden(tokens)
    # 3 missing rows run as 4, not as a whole batch of 32.
    assert shapes == [4] and cache.computed == 3
    want = model.apply(params, tokens, blocks=1, method="trunk")
    np.testing.assert_allclose(hidden, want, rtol=1e-6, atol=1e-6)
    # States stored from elsewhere are read back as they were, never recomputed.
    other = TrunkCache(model, params, 1, "digest-pad")
    new = np.full((2, 4), 7, np.int32) + np.arange(2)[:, None]
    states = np.random.default_rng(0).normal(size=(2, 4, 32)).astype(np.float32)
    other.store(new, states)
    np.testing.assert_array_equal(other.hidden(new), states)
    assert other.computed == 0
    with pytest.raises(ValueError, match="do not match"):
        other.store(new, states[:1])


_SECOND_RUN = """
import json, sys
import numpy as np
from metajax.run import trunk_cache
from metajax.run.build import build
from metajax.run.config_files import load_config

calls = []
compute = trunk_cache.TrunkCache._compute
trunk_cache.TrunkCache._compute = lambda self, keys, rows: calls.append(len(keys)) or compute(
    self, keys, rows
)
exp = build(load_config("words_lm:gpt2_tiny", ["task.trainable_blocks=1"]))
(tokens, hidden), _ = exp.setup.train_source.sample(0, 4).support
print(json.dumps({"computed": sum(calls), "sum": float(np.sum(hidden, dtype=np.float64))}))
"""


def test_a_second_process_reuses_the_cache_without_recomputing(trunk_cache):
    exp = build(load_config("words_lm:gpt2_tiny", ["task.trainable_blocks=1"]))
    (_, hidden), _ = exp.setup.train_source.sample(0, 4).support
    files = {p: p.stat().st_mtime_ns for p in trunk_cache.rglob("*.npy")}
    drawn = exp.setup.train_source.source.sample(0, 4)  # support and query, in tokens
    rows = np.concatenate([drawn.support[0].reshape(-1, 12), drawn.query[0].reshape(-1, 12)])
    assert len(files) == len({r.tobytes() for r in rows})  # one file per distinct sequence
    env = {**os.environ, "METAJAX_TRUNK_CACHE": str(trunk_cache), "JAX_PLATFORMS": "cpu"}
    run = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(_SECOND_RUN)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        check=True,
    )
    second = json.loads(run.stdout.strip().splitlines()[-1])
    assert second["computed"] == 0
    assert second["sum"] == pytest.approx(float(np.sum(hidden, dtype=np.float64)), rel=1e-12)
    assert {p: p.stat().st_mtime_ns for p in trunk_cache.rglob("*.npy")} == files
