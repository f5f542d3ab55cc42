"""LlamaLM: parity with Hugging Face's Llama and Qwen2 on committed tiny checkpoints (no
torch), padding, Llama-3 RoPE scaling, trunk/top, the key-value cache, bf16, remat, a 2x4
mesh and second-order MAML through LoRA factors against float64 finite differences."""

import functools
import json
import math
import shutil
from pathlib import Path

import jax
import jax.flatten_util
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from toy import counting_tasks

import metajax as mj
from metajax import parallel
from metajax.models import LlamaConfig, LlamaLM, llama_param_count, load_pretrained, next_token_loss
from metajax.models.decoding import greedy_decode, greedy_decode_cached, lm_decoder
from metajax.models.pretrained import llama_key_map
from metajax.train import make_train_step, place_state, train_state

FIXTURE = Path(__file__).resolve().parent / "fixtures" / "llama_tiny"
FAST_COMPILE = {"xla_backend_optimization_level": 0, "xla_cpu_use_fusion_emitters": False}
jit = functools.partial(jax.jit, compiler_options=FAST_COMPILE)


@functools.cache
def reference():
    return dict(np.load(FIXTURE / "reference.npz"))


@functools.cache
def fixture(name, **overrides):
    return load_pretrained(FIXTURE / name, **overrides)


def rel_error(got, want):
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    return float(np.linalg.norm(got - want) / np.linalg.norm(want))


def test_named_sizes_have_the_released_parameter_counts():
    # num_parameters() of the released checkpoints (tied heads counted once).
    counts = {
        "smollm2-135m": 134_515_008,
        "smollm2-360m": 361_821_120,
        "smollm2-1.7b": 1_711_376_384,
        "llama-3.2-1b": 1_235_814_400,
        "qwen2.5-0.5b": 494_032_768,
    }
    for name, count in counts.items():
        # The loader's key table (HF names and shapes), much faster than tracing 30 blocks.
        shapes = [shape for _, shape in llama_key_map(LlamaConfig.named(name)).values()]
        assert sum(math.prod(shape) for shape in shapes) == count, name
    # The key table has the model's shapes: llama_param_count traces model.init.
    assert llama_param_count(LlamaConfig.named("smollm2-135m")) == counts["smollm2-135m"]
    for name in ("tiny-llama", "tiny-qwen2"):
        config = LlamaConfig.named(name)
        params = jax.eval_shape(LlamaLM(config).init, jax.random.key(0), jnp.zeros((1, 1), int))
        for key, (path, shape) in llama_key_map(config).items():
            leaf = functools.reduce(lambda node, k: node[k], path, params["params"])
            assert leaf.shape == (shape[::-1] if path[-1] == "kernel" else shape), key
    assert LlamaConfig.named("tiny") == LlamaConfig.named("tiny-llama")
    with pytest.raises(ValueError, match="unknown Llama size 'llama-7b'"):
        LlamaConfig.named("llama-7b")
    with pytest.raises(ValueError, match="num_attention_heads 4 is not a multiple of num_key"):
        LlamaConfig(num_attention_heads=4, num_key_value_heads=3)
    with pytest.raises(ValueError, match="hidden_size 50 is not divisible by num_attention_heads"):
        LlamaConfig(hidden_size=50, num_attention_heads=3, num_key_value_heads=1)
    with pytest.raises(ValueError, match="head_dim must be an even int"):
        LlamaConfig(head_dim=7)
    with pytest.raises(ValueError, match="num_hidden_layers must be an int >= 1, got 0"):
        LlamaConfig(num_hidden_layers=0)


@pytest.mark.parametrize("name", ["llama", "qwen2"])
def test_logits_match_hugging_face_with_and_without_left_padding(name):
    ref = reference()
    model, params = fixture(name)
    assert model.config == LlamaConfig.named(f"tiny-{name}")
    apply = jit(model.apply)
    got = np.asarray(apply(params, jnp.asarray(ref["tokens"])))
    want = ref[f"{name}_logits"]
    assert got.dtype == np.float32 and got.shape == want.shape
    # Measured: 3.0e-7 (llama) and 3.1e-7 (qwen2). An RMSNorm epsilon of 1e-6 for 1e-5 or
    # an interleaved instead of rotate-half RoPE fails this by orders of magnitude.
    assert rel_error(got, want) < 2e-6
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4 * np.abs(want).max())
    assert want.std() > 1.0  # far from uniform
    mask = ref["mask"]
    padded = np.asarray(apply(params, jnp.asarray(ref["padded"]), jnp.asarray(mask)))
    assert rel_error(padded[mask], ref[f"{name}_padded_logits"][mask]) < 2e-6
    # Not vacuous: unmasked, the pads shift the positions and are attended to.
    unmasked = np.asarray(apply(params, jnp.asarray(ref["padded"])))
    assert rel_error(unmasked[0][mask[0]], ref[f"{name}_padded_logits"][0][mask[0]]) > 1e-2


def test_llama3_rope_scaling_matches_hugging_face(tmp_path):
    ref = reference()
    folder = tmp_path / "scaled"
    shutil.copytree(FIXTURE / "llama", folder)
    config = json.loads((folder / "config.json").read_text())
    config["rope_parameters"] = json.loads(str(ref["scaled_rope"]))
    (folder / "config.json").write_text(json.dumps(config))
    model, params = load_pretrained(folder)
    assert model.config.rope_scaling.original_max_position_embeddings == 16
    got = jit(model.apply)(params, jnp.asarray(ref["long_tokens"]))
    assert rel_error(got, ref["scaled_logits"]) < 2e-6
    # The scaling matters: the unscaled model is far off on the same tokens.
    plain_model, _ = fixture("llama")
    plain = jit(plain_model.apply)(params, jnp.asarray(ref["long_tokens"]))
    assert rel_error(plain, ref["scaled_logits"]) > 1e-3


def test_trunk_then_top_equals_the_full_pass_and_top_needs_no_lower_blocks():
    ref = reference()
    model, params = fixture("llama")
    tokens, mask = jnp.asarray(ref["padded"]), jnp.asarray(ref["mask"])
    full = jit(model.apply)(params, tokens, mask)
    features = jit(functools.partial(model.apply, method="features"))(params, tokens, mask)
    assert features.shape == (2, 12, 48) and features.dtype == jnp.float32
    for k in range(model.config.num_hidden_layers + 1):
        hidden = jit(functools.partial(model.apply, blocks=k, method="trunk"))(params, tokens, mask)
        assert hidden.shape == (2, 12, 48) and hidden.dtype == jnp.float32
        # Only the blocks below k (and the embeddings) are needed below; only those above
        # (and the head: lm_head, untied here) on top.
        index = lambda n: int(n.split("_")[1]) if n.startswith("layers_") else None
        below = {
            n: v
            for n, v in params["params"].items()
            if n == "embed_tokens" or (index(n) or 0) < k and index(n) is not None
        }
        above = {
            n: v
            for n, v in params["params"].items()
            if n != "embed_tokens" and (index(n) is None or index(n) >= k)
        }
        assert jnp.array_equal(
            hidden,
            jit(functools.partial(model.apply, blocks=k, method="trunk"))(
                {"params": below}, tokens, mask
            ),
        )
        top = functools.partial(model.apply, start=k, method="top")
        logits = jit(top)({"params": above}, hidden, mask)
        np.testing.assert_allclose(logits, full, rtol=1e-5, atol=1e-5)
        top_features = jit(functools.partial(top, features=True))({"params": above}, hidden, mask)
        np.testing.assert_allclose(top_features, features, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match=r"blocks/start must be ints in \[0, 2\]"):
        model.apply(params, tokens, blocks=3, method="trunk")


def test_cached_decoding_equals_the_full_pass():
    ref = reference()
    for name in ("llama", "qwen2"):
        model, params = fixture(name)
        tokens = jnp.asarray(ref["tokens"][:, :10])
        full = jit(model.apply)(params, tokens)
        cache = model.init_cache(2, 10)
        step = jit(functools.partial(model.apply, method="decode_step"))
        for t in range(10):
            logits, cache = step(params, tokens[:, t], jnp.int32(t), cache)
            np.testing.assert_allclose(logits, full[:, t], rtol=1e-5, atol=1e-5, err_msg=name)
    # Greedy decoding with the cache equals one full pass per token.
    model, params = fixture("llama")
    prompts = jnp.asarray(np.pad(ref["tokens"][:, :5], ((0, 0), (0, 7))))
    lengths = jnp.asarray([3, 5])
    kwargs = dict(steps=6, end_id=2, pad_id=0)
    cached = jax.jit(
        lambda p: greedy_decode_cached(lm_decoder(model), p, prompts, lengths, **kwargs)
    )(params)
    plain = jax.jit(lambda p: greedy_decode(model.apply, p, prompts, lengths, **kwargs))(params)
    np.testing.assert_array_equal(cached, plain)
    assert len(np.unique(np.asarray(cached))) > 2  # real tokens were generated


def test_bf16_compute_keeps_float32_params_and_stays_close():
    ref = reference()
    model, params = fixture("llama", dtype=jnp.bfloat16)
    assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(params))
    got = jit(model.apply)(params, jnp.asarray(ref["tokens"]))
    assert got.dtype == jnp.float32
    err = rel_error(got, ref["llama_logits"])
    assert 1e-4 < err < 5e-2, err  # bf16 really was used, and stayed close
    hidden = jit(functools.partial(model.apply, blocks=1, method="trunk"))(
        params, jnp.asarray(ref["tokens"])
    )
    top = jit(functools.partial(model.apply, start=1, method="top"))(params, hidden)
    # Equal up to bf16 rounding: XLA may keep a fused residual sum in float32 (its default
    # xla_allow_excess_precision), which a jit boundary rounds.
    assert rel_error(top, got) < 2e-2


def test_remat_gradients_equal_no_remat():
    ref = reference()
    model, params = fixture("llama")
    remat_model, _ = fixture("llama", remat=True)
    tokens = jnp.asarray(ref["tokens"])

    def loss(apply):
        return lambda p: jnp.mean(jax.nn.log_softmax(apply(p, tokens))[..., 1])

    g, g_remat = (jit(jax.grad(loss(m.apply)))(params) for m in (model, remat_model))
    jax.tree.map(functools.partial(np.testing.assert_allclose, rtol=1e-5, atol=1e-6), g_remat, g)
    assert np.abs(g["params"]["layers_0"]["self_attn"]["k_proj"]["kernel"]).max() > 1e-3


TINY = dict(
    vocab_size=11, hidden_size=12, intermediate_size=16, num_hidden_layers=2,
    num_attention_heads=3, num_key_value_heads=1, head_dim=4, max_position_embeddings=6,
)  # fmt: skip


def test_sharded_over_a_2x4_mesh_equals_one_device():
    model = LlamaLM(LlamaConfig(**{**TINY, "num_hidden_layers": 1}))
    params = jax.device_get(jit(model.init)(jax.random.key(0), jnp.zeros((1, 6), jnp.int32)))
    # First order: the sharding of a step is what is checked here, and second order through
    # the same model is checked against finite differences below; this halves compile time.
    algo = mj.maml(next_token_loss(model.apply), inner_steps=1, inner_lr=0.5, first_order=True)
    optimizer = optax.sgd(1.0)  # the update is minus the meta-gradient
    tasks = counting_tasks(0, num_tasks=8, batch=2, seq=6)
    # make_train_step donates the state it is given: one fresh state per step.
    state = lambda: train_state(algo, params, optimizer)
    ref, ref_metrics = jax.device_get(make_train_step(algo, optimizer)(state(), tasks))
    mesh = parallel.task_model_mesh(tasks=2, model=4)
    step = make_train_step(algo, optimizer, mesh=mesh)
    sharded, metrics = step(place_state(state(), mesh), parallel.shard_tasks(tasks, mesh))
    q = sharded.meta_params["params"]["layers_0"]["self_attn"]["q_proj"]["kernel"]
    assert q.sharding.spec == parallel.fsdp_spec((12, 12), 4) and not q.sharding.is_fully_replicated
    grad = jax.tree.map(jnp.subtract, params, jax.device_get(sharded.meta_params))
    ref_grad = jax.tree.map(jnp.subtract, params, ref.meta_params)
    assert float(optax.tree.norm(ref_grad)) > 1e-2
    flat = lambda t: jax.flatten_util.ravel_pytree(t)[0]
    assert rel_error(flat(grad), flat(ref_grad)) < 1e-5
    np.testing.assert_allclose(metrics["loss_after"], ref_metrics["loss_after"], rtol=1e-5)


def test_second_order_maml_through_lora_matches_finite_differences_float64():
    lr, eps = 0.1, 1e-6
    with jax.enable_x64(True):
        model = LlamaLM(LlamaConfig(**TINY, dtype=jnp.float64, param_dtype=jnp.float64))
        shapes = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 6), jnp.int32))
        rng = np.random.default_rng(8)
        # Large weights, RMSNorm scales away from 1: every second-order term is exercised.
        params = jax.tree_util.tree_map_with_path(
            lambda path, s: jnp.asarray(
                (path[-1].key == "scale") + 0.4 * rng.standard_normal(s.shape), jnp.float64
            ),
            shapes,
        )
        lora = mj.lora.LoRA(rank=2, alpha=4.0, targets=r"(q_proj|v_proj|down_proj)/kernel")
        meta = lora.init(params, jax.random.key(1))
        # Non-zero B factors (as after meta-training): at B = 0, A has no second-order terms.
        meta["lora"] = jax.tree.map(
            lambda x: jnp.asarray(0.3 * rng.standard_normal(x.shape)), meta["lora"]
        )
        loss = lora.wrap(next_token_loss(model.apply))
        mask = mj.lora.inner_mask(meta, "lora")
        tasks = counting_tasks(9, num_tasks=2, batch=2, seq=6, vocab=11)
        algo = mj.maml(loss, inner_steps=1, inner_lr=lr, mask=mask)
        grads, metrics = jit(algo.meta_grad)(meta, tasks)

        def objective(m):  # one inner step on the factors alone, written plainly
            def one_task(task):
                inner = lambda f: loss({"base": m["base"], "lora": f}, task.support)
                g = jax.grad(inner)(m["lora"])
                factors = jax.tree.map(lambda a, b: a - lr * b, m["lora"], g)
                return loss({"base": m["base"], "lora": factors}, task.query)

            return jnp.mean(jax.vmap(one_task)(tasks))

        flat, unravel = jax.flatten_util.ravel_pytree(meta)
        directions = [jnp.asarray(rng.standard_normal(flat.size)) for _ in range(2)]
        # One coordinate of A in a k_proj-free target and one in the base's k_proj kernel.
        for path in (
            ("lora", "params", "layers_1", "self_attn", "v_proj", "kernel", "a"),
            ("base", "params", "layers_0", "self_attn", "k_proj", "kernel"),
        ):
            one_hot = jax.tree.map(jnp.zeros_like, meta)
            node = functools.reduce(lambda n, k: n[k], path[:-1], one_hot)
            node[path[-1]] = node[path[-1]].at[(1, 1)].set(1.0)
            directions.append(jax.flatten_util.ravel_pytree(one_hot)[0])
        directions = jnp.stack(directions)
        f = jit(jax.vmap(lambda v: objective(unravel(v))))
        fd = (f(flat + eps * directions) - f(flat - eps * directions)) / (2 * eps)
        got = np.asarray(directions @ jax.flatten_util.ravel_pytree(grads)[0])
        fd = np.asarray(fd)
    assert float(metrics["loss_after"]) < float(metrics["loss_before"])
    assert np.abs(got).min() > 1e-4
    np.testing.assert_allclose(got, fd, rtol=1e-6)
