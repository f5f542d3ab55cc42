"""Transformer LM and encoder classifier: causality, padding, dropout, MAML exactness, bf16."""

import functools

import jax
import jax.flatten_util
import jax.numpy as jnp
import numpy as np
import pytest
from toy import one_step_maml_objective, rel_error

import metajax as mj
from metajax.models import (
    KVCache,
    TransformerClassifier,
    TransformerConfig,
    TransformerLM,
    Trunk,
    bits_per_token,
    init_kv_cache,
    next_token_loss,
    next_token_metrics,
)
from metajax.models.transformer import attention

# These tests are compile-bound on CPU. Unoptimised code from XLA's older CPU emitters
# compiles about 5x faster than the default and computes the same IEEE operations (in another
# order, so float32 results move by ulps). For the same reason parameters and data are made
# on the host with numpy: op by op, each random draw of each new shape compiles on its own.
FAST_COMPILE = {"xla_backend_optimization_level": 0, "xla_cpu_use_fusion_emitters": False}
jit = functools.partial(jax.jit, compiler_options=FAST_COMPILE)

TINY = TransformerConfig(vocab_size=11, width=8, depth=2, heads=2, mlp_width=16, max_len=6)
TINY_BF16 = TransformerConfig(**{**TINY.__dict__, "dtype": jnp.bfloat16})


def host_params(model, *example_args, seed=0, scale=0.3):
    """Parameters with the structure and dtypes of ``model.init``, drawn on the host:
    N(0, scale^2), plus 1 for LayerNorm scales. Large enough that attention is far from
    uniform, and LayerNorm's scale and bias are not 1 and 0."""
    shapes = jax.eval_shape(model.init, jax.random.key(0), *example_args)
    rng = np.random.default_rng(seed)

    def draw(path, s):
        base = 1.0 if getattr(path[-1], "key", None) == "scale" else 0.0
        return jnp.asarray(base + scale * rng.standard_normal(s.shape), s.dtype)

    return jax.tree_util.tree_map_with_path(draw, shapes)


def lm_params(model, seq, **kw):
    return host_params(model, jnp.zeros((1, seq), jnp.int32), **kw)


def lm_tasks(seed, num_tasks, batch, seq, vocab):
    """Next-token tasks: each task counts in steps of its own stride through the ids
    ``1 .. vocab - 1`` from random starts, so support and query share a rule to adapt to.
    The last sequence of each support and query set is right-padded (id 0) by 2."""
    rng = np.random.default_rng(seed)
    stride = rng.integers(1, vocab - 1, (num_tasks, 1, 1, 1))
    start = rng.integers(0, vocab - 1, (num_tasks, 2, batch, 1))
    tokens = (start + stride * np.arange(seq)) % (vocab - 1) + 1
    mask = np.ones(tokens.shape, bool)
    mask[:, :, -1, seq - 2 :] = False
    tokens = np.where(mask, tokens, 0).astype(np.int32)
    return mj.Task(support=(tokens[:, 0], mask[:, 0]), query=(tokens[:, 1], mask[:, 1]))


def central_differences(f, params, eps=1e-6):
    """tests/toy.py's coordinate-wise central differences, compiled by the fast ``jit``."""
    flat, unravel = jax.flatten_util.ravel_pytree(params)
    f_flat = jit(jax.vmap(lambda v: f(unravel(v))))
    basis = eps * jnp.eye(flat.size, dtype=flat.dtype)
    return unravel((f_flat(flat + basis) - f_flat(flat - basis)) / (2 * eps))


def causality_probe(apply, params, seq, vocab):
    """For every position t, changes token t alone. Returns the largest change of the logits
    at positions < t (must be 0) and the smallest change at position t itself (must not)."""
    base = np.random.default_rng(3).integers(0, vocab, seq)
    tokens = np.stack([base] * (seq + 1))  # row 0 as is; row t + 1 has token t changed
    tokens[np.arange(1, seq + 1), np.arange(seq)] = (base + 1) % vocab
    logits = np.asarray(jit(apply)(params, jnp.asarray(tokens, jnp.int32)))
    ref, out = logits[0], logits[1:]
    leak = max(np.abs(out[t, :t] - ref[:t]).max() for t in range(1, seq))
    own = min(np.abs(out[t, t] - ref[t]).max() for t in range(seq))
    return float(leak), float(own)


def test_lm_is_causal_at_every_position():
    model = TransformerLM(TINY)
    leak, own = causality_probe(model.apply, lm_params(model, 6), 6, TINY.vocab_size)
    assert leak < 1e-6, leak
    assert own > 1e-3, own  # the changed token does reach its own position

    # The same probe catches a trunk without the causal mask: it is not vacuous.
    trunk = Trunk(TINY, causal=False)
    pos = jnp.broadcast_to(jnp.arange(6), (7, 6))
    tparams = host_params(trunk, jnp.zeros((7, 6), jnp.int32), pos)
    leak, _ = causality_probe(lambda p, x: trunk.apply(p, x, pos), tparams, 6, TINY.vocab_size)
    assert leak > 1e-3


def test_lm_untied_head_and_sequence_length_check():
    model = TransformerLM(TransformerConfig(**{**TINY.__dict__, "tie_embeddings": False}))
    params = lm_params(model, 6)
    assert params["params"]["head"]["kernel"].shape == (8, 11)
    tokens = jnp.ones((2, 6), jnp.int32)
    untied = np.asarray(jit(model.apply)(params, tokens))
    tied = np.asarray(jit(TransformerLM(TINY).apply)(params, tokens))  # ignores params["head"]
    assert untied.shape == (2, 6, 11)
    assert np.abs(untied - tied).max() > 1e-2
    with pytest.raises(ValueError, match="max_len"):
        jax.eval_shape(model.apply, params, jnp.ones((2, 7), jnp.int32))


@pytest.mark.parametrize("tie", [True, False])
def test_decode_step_with_kv_cache_equals_the_full_forward(tie):
    model = TransformerLM(TransformerConfig(**{**TINY.__dict__, "tie_embeddings": tie}))
    params = lm_params(model, 6)
    tokens = jnp.asarray(np.random.default_rng(3).integers(0, TINY.vocab_size, (3, 6)))
    full = np.asarray(jit(model.apply)(params, tokens))
    step = jit(functools.partial(model.apply, method="decode_step"))
    cache, cached = init_kv_cache(TINY, 3, 6), []
    for t in range(6):
        logits, cache = step(params, tokens[:, t], jnp.int32(t), cache)
        cached.append(np.asarray(logits))
    np.testing.assert_allclose(np.stack(cached, 1), full, atol=1e-5)
    # A stale cache slot after the position read is ignored, as causality requires.
    poisoned = [KVCache(c.k.at[:, 5].set(1e3), c.v.at[:, 5].set(1e3)) for c in cache]
    again, _ = step(params, tokens[:, 3], jnp.int32(3), poisoned)
    np.testing.assert_allclose(np.asarray(again), full[:, 3], atol=1e-5)
    with pytest.raises(ValueError, match="cache length 7"):
        init_kv_cache(TINY, 3, 7)


def test_dropout_off_without_rng_and_on_with_it():
    model = TransformerLM(TransformerConfig(**{**TINY.__dict__, "dropout": 0.5}))
    params = lm_params(model, 6)
    tokens = jnp.asarray(np.random.default_rng(4).integers(0, 11, (2, 6)), jnp.int32)
    det = np.asarray(jit(model.apply)(params, tokens))
    np.testing.assert_allclose(det, jit(TransformerLM(TINY).apply)(params, tokens), atol=1e-6)
    noisy = jit(lambda p, x, k: model.apply(p, x, rngs={"dropout": k}))
    a, b, c = (np.asarray(noisy(params, tokens, jax.random.key(k))) for k in (5, 5, 6))
    np.testing.assert_array_equal(a, b)
    assert np.abs(a - det).max() > 1e-2
    assert np.abs(a - c).max() > 1e-2


def test_classifier_ignores_padding_anywhere():
    cfg = TransformerConfig(**{**TINY.__dict__, "max_len": 10})
    model = TransformerClassifier(cfg, num_classes=5, pad_id=0)
    params = lm_params(model, 10)
    apply = jit(model.apply)
    real = [[3, 1, 4, 1], [5, 9, 2, 6], [7, 7, 7, 7]]
    base = np.asarray(apply(params, jnp.array(real, jnp.int32)))  # no padding, length 4
    # All of length 10, in one batch: appended, prepended, interleaved pads; then a control.
    rows = [r + [0] * 6 for r in real]
    rows += [[0, 0] + r + [0] * 4 for r in real]
    rows += [[r[0], 0, r[1], r[2], 0, 0, r[3], 0, 0, 0] for r in real]
    rows += [r + [2] + [0] * 5 for r in real]
    out = np.asarray(apply(params, jnp.array(rows, jnp.int32))).reshape(4, 3, 5)
    for name, got in zip(["appended", "prepended", "interleaved"], out[:3], strict=True):
        # Sums over more (exactly zero) terms may round differently: a few ulps.
        np.testing.assert_allclose(got, base, rtol=1e-5, atol=1e-5, err_msg=name)
    # Not vacuous: one more real token changes the logits, and the same zeros read as
    # tokens (another pad id, same parameters) change them too.
    assert np.abs(out[3] - base).max(axis=-1).min() > 1e-3
    unmasked = TransformerClassifier(cfg, num_classes=5, pad_id=-1)
    zeros_as_tokens = np.asarray(jit(unmasked.apply)(params, jnp.array(rows[:3], jnp.int32)))
    assert np.abs(zeros_as_tokens - base).max(axis=-1).min() > 1e-3


@pytest.mark.parametrize(
    "model,out_shape",
    [
        (TransformerLM(TINY), (3, 2, 6, 11)),
        (TransformerLM(TINY_BF16), (3, 2, 6, 11)),
        (TransformerClassifier(TINY, num_classes=4), (3, 2, 4)),
    ],
)
def test_shapes_and_dtypes_under_vmap_over_tasks(model, out_shape):
    params = lm_params(model, 6)
    assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(params))
    tokens = jnp.asarray(np.random.default_rng(7).integers(0, 11, (3, 2, 6)), jnp.int32)
    out = jit(jax.vmap(model.apply, in_axes=(None, 0)))(params, tokens)
    assert out.shape == out_shape and out.dtype == jnp.float32
    apply = jit(model.apply)
    loop = np.stack([apply(params, tokens[i]) for i in range(3)])
    np.testing.assert_allclose(out, loop, atol=1e-5)


@pytest.mark.parametrize("causal,masked", [(True, False), (False, True), (True, True)])
def test_attention_matches_jax_dot_product_attention(causal, masked):
    q, k, v = jnp.asarray(np.random.default_rng(12).standard_normal((3, 2, 5, 2, 4)), jnp.float32)
    key_mask = jnp.array([[1, 1, 1, 0, 0], [1, 0, 1, 1, 0]], bool) if masked else None
    mask = None if key_mask is None else key_mask[:, None, None, :]
    ours = jit(attention, static_argnums=(4,))
    want = jit(jax.nn.dot_product_attention, static_argnames=("is_causal",))(
        q, k, v, mask=mask, is_causal=causal
    )
    got = np.asarray(ours(q, k, v, key_mask, causal))
    np.testing.assert_allclose(got, want, atol=1e-6)
    if masked:  # masked keys get exactly zero weight: their values do not matter
        v2 = jnp.where(key_mask[:, :, None, None], v, 100.0)
        np.testing.assert_array_equal(ours(q, k, v2, key_mask, causal), got)


def test_next_token_loss_masks_pad_targets():
    model = TransformerLM(TINY)
    params = lm_params(model, 6)
    tokens = np.array([[1, 2, 3, 4, 5, 6], [7, 8, 9, 0, 0, 0]], np.int32)
    mask = tokens != 0
    logits = np.asarray(jit(model.apply)(params, jnp.asarray(tokens[:, :-1])), np.float64)
    logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    # Predicted positions with a real target: 5 in row 0, 2 in row 1 (targets 8 and 9).
    picks = [(0, t, tokens[0, t + 1]) for t in range(5)] + [(1, 0, 8), (1, 1, 9)]
    want = -np.mean([logp[b, t, y] for b, t, y in picks])
    acc = np.mean([logits[b, t].argmax() == y for b, t, y in picks])

    loss_fn = jit(next_token_loss(model.apply))
    loss = loss_fn(params, (tokens, mask))
    np.testing.assert_allclose(loss, want, rtol=1e-5)
    bits = jit(bits_per_token(model.apply))(params, (tokens, mask))
    np.testing.assert_allclose(bits, want / np.log(2), rtol=1e-5)
    metrics = jit(next_token_metrics(model.apply))(params, (tokens, mask))
    np.testing.assert_allclose(metrics["bits_per_token"], want / np.log(2), rtol=1e-5)
    np.testing.assert_allclose(metrics["accuracy"], acc)
    # Whatever stands in the padded slots changes nothing.
    other = tokens.copy()
    other[1, 3:] = [4, 5, 6]
    np.testing.assert_allclose(loss_fn(params, (other, mask)), loss, rtol=1e-6)


def test_second_order_maml_matches_finite_differences_float64():
    # One inner step differentiates through the Hessian of every layer (several steps are
    # checked on the MLP in test_maml); two blocks, every parameter perturbed.
    lr = 0.1
    with jax.enable_x64(True):
        cfg = TransformerConfig(
            vocab_size=11,
            width=8,
            depth=2,
            heads=2,
            mlp_width=8,
            max_len=4,
            dtype=jnp.float64,
            param_dtype=jnp.float64,
        )
        model = TransformerLM(cfg)
        params = lm_params(model, 4, seed=8)
        loss_fn = next_token_loss(model.apply)
        tasks = lm_tasks(9, num_tasks=2, batch=2, seq=5, vocab=11)

        objective = one_step_maml_objective(loss_fn, tasks, lr)

        algo = mj.maml(loss_fn, inner_steps=1, inner_lr=lr)
        grads, metrics = jit(algo.meta_grad)(params, tasks)
        fd = central_differences(objective, params)
        err = rel_error(grads, fd)
        n = sum(p.size for p in jax.tree.leaves(params))
    print(f"Transformer second-order MAML vs central differences (float64, {n} params): {err:.2e}")
    assert float(metrics["loss_after"]) < float(metrics["loss_before"])
    assert err < 1e-6


def test_bf16_compute_gives_float32_meta_gradients_close_to_float32():
    # One block: the dtype plumbing is the same in every block.
    cfg32 = TransformerConfig(vocab_size=13, width=16, depth=1, heads=2, mlp_width=32, max_len=8)
    cfg16 = TransformerConfig(**{**cfg32.__dict__, "dtype": jnp.bfloat16})
    params = lm_params(TransformerLM(cfg32), 8, seed=10, scale=0.2)
    tasks = lm_tasks(11, num_tasks=2, batch=3, seq=9, vocab=13)
    grads = {}
    for name, cfg in (("f32", cfg32), ("bf16", cfg16)):
        algo = mj.maml(next_token_loss(TransformerLM(cfg).apply), inner_steps=1, inner_lr=0.5)
        grads[name], _ = jit(algo.meta_grad)(params, tasks)
    leaves = jax.tree.leaves(grads["bf16"])
    assert all(g.dtype == jnp.float32 for g in leaves)
    assert all(bool(jnp.all(jnp.isfinite(g))) for g in leaves)
    err = rel_error(grads["bf16"], grads["f32"])
    print(f"bf16-compute vs float32 meta-gradient: rel err {err:.2e}")
    assert 1e-5 < err < 5e-2  # bf16 really was used, and stayed close
