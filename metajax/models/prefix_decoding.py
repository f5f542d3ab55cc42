"""Greedy continuations of one shared prefix with a Llama-family model, the prefix run once.

Few-shot prompting asks several questions after the same examples: the rows of a batch share
a long prefix (K example pairs, hundreds of tokens) and differ in a short suffix (the
question). :meth:`LlamaLM.decode_step` keeps every position of a row in that row's cache, so
n rows would hold and attend n copies of the prefix at every step, and on a CPU that copy
costs more than the weights. Here the prefix goes through the model once
(:func:`prefix_cache`: one causal pass, batch 1) and its keys and values are kept once; each
decoding step (:func:`shared_prefix_decoder`) attends every row to those shared keys and to
its own cached suffix positions, with one softmax over both, which is the attention over the
whole row.

The layers are :class:`~metajax.models.LlamaLM`'s own (its RMSNorm and MLP modules, its Dense
projections, its RoPE tables and attention) applied to its parameter tree, so LoRA-free
parameters of any checkpoint ``load_pretrained`` reads work; the tests compare the logits and
the greedy tokens with ``LlamaLM`` run on each whole row.
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from metajax.models.decoding import IncrementalDecoder
from metajax.models.llama import LlamaConfig, LlamaLM, LlamaMLP, RMSNorm, _apply_rope, _rope_tables
from metajax.models.transformer import KVCache, attention


class PrefixCache(NamedTuple):
    """The keys and values of a prefix, one ``(width, kv_heads, head_size)`` array per block
    each; ``length`` (an int32 scalar) of the ``width`` positions are the prefix, the rest
    padding that no row attends to."""

    k: list[jax.Array]
    v: list[jax.Array]
    length: jax.Array


def _check_model(model) -> LlamaConfig:
    if not isinstance(model, LlamaLM):
        raise TypeError(f"shared-prefix decoding needs a LlamaLM, got {type(model).__name__}.")
    return model.config


def _dense(cfg: LlamaConfig, p: dict, x: jax.Array) -> jax.Array:
    features = p["kernel"].shape[-1]
    dense = nn.Dense(features, use_bias="bias" in p, dtype=cfg.dtype, param_dtype=cfg.param_dtype)
    return dense.apply({"params": p}, x)


def _norm(cfg: LlamaConfig, p: dict, x: jax.Array) -> jax.Array:
    return RMSNorm(cfg.rms_norm_eps, cfg.dtype, cfg.param_dtype).apply({"params": p}, x)


def _embed(cfg: LlamaConfig) -> nn.Embed:
    return nn.Embed(cfg.vocab_size, cfg.hidden_size, dtype=cfg.dtype, param_dtype=cfg.param_dtype)


def _blocks(cfg: LlamaConfig, params: dict, tokens: jax.Array, positions: jax.Array, attend):
    """Embeddings and every block on ``tokens (batch, seq)`` at ``positions``; ``attend(i, q,
    k, v) -> (out, state)`` is block ``i``'s attention on RoPE-rotated ``(batch, seq, heads,
    d)`` queries and keys. Returns the last hidden states and each block's state."""
    p = params["params"]
    batch, seq = tokens.shape
    heads, kv_heads, d = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_size
    x = _embed(cfg).apply({"params": p["embed_tokens"]}, tokens)
    cos, sin = _rope_tables(cfg, positions)
    states = []
    for i in range(cfg.num_hidden_layers):
        layer, attn = p[f"layers_{i}"], p[f"layers_{i}"]["self_attn"]
        h = _norm(cfg, layer["input_layernorm"], x)
        q = _dense(cfg, attn["q_proj"], h).reshape(batch, seq, heads, d)
        k = _dense(cfg, attn["k_proj"], h).reshape(batch, seq, kv_heads, d)
        v = _dense(cfg, attn["v_proj"], h).reshape(batch, seq, kv_heads, d)
        out, state = attend(i, _apply_rope(q, cos, sin), _apply_rope(k, cos, sin), v)
        x = x + _dense(cfg, attn["o_proj"], out.reshape(batch, seq, heads * d))
        h = _norm(cfg, layer["post_attention_layernorm"], x)
        x = x + LlamaMLP(cfg).apply({"params": layer["mlp"]}, h)
        states.append(state)
    return x, states


def _logits(cfg: LlamaConfig, params: dict, x: jax.Array) -> jax.Array:
    p = params["params"]
    x = _norm(cfg, p["norm"], x)
    if cfg.tie_word_embeddings:
        logits = _embed(cfg).apply({"params": p["embed_tokens"]}, x, method="attend")
    else:
        logits = _dense(cfg, p["lm_head"], x)
    return logits.astype(jnp.promote_types(jnp.float32, cfg.dtype))


def prefix_cache(model: LlamaLM, params: Any, tokens: jax.Array, length: jax.Array) -> PrefixCache:
    """The keys and values of ``tokens[:length]`` at positions ``0 .. length - 1``.

    Args:
      model: the :class:`~metajax.models.LlamaLM`; params: its parameters.
      tokens: int ``(width,)``: the prefix, then any padding (the model is causal, so the
        padding never changes the prefix's keys); a fixed ``width`` for many prefixes of
        different lengths compiles once.
      length: how many of ``tokens`` are the prefix (may be traced), at least 1.
    """
    cfg = _check_model(model)
    rep = cfg.num_attention_heads // cfg.num_key_value_heads

    def attend(i, q, k, v):
        # HF's repeat_kv, as LlamaAttention: kv head j serves query heads j * rep .. + rep - 1.
        out = attention(q, jnp.repeat(k, rep, 2), jnp.repeat(v, rep, 2), None, causal=True)
        return out, (k[0], v[0])

    tokens = jnp.asarray(tokens, jnp.int32)[None]
    positions = jnp.arange(tokens.shape[1])[None]
    _, states = _blocks(cfg, params, tokens, positions, attend)
    return PrefixCache(
        [k for k, _ in states], [v for _, v in states], jnp.asarray(length, jnp.int32)
    )


def _shared_attention(q, prefix_k, prefix_v, prefix_len, cache_k, cache_v, index):
    """One position per row: ``q (n, 1, heads, d)`` against the shared prefix ``(P, g, d)``
    (its first ``prefix_len`` positions) and the row's own ``(n, W, g, d)`` cache (positions
    ``<= index``), one softmax over both, as :func:`~metajax.models.transformer.attention`."""
    n, _, heads, d = q.shape
    g = prefix_k.shape[1]
    acc = jnp.promote_types(jnp.float32, q.dtype)
    q = q.reshape(n, g, heads // g, d)
    scale = 1.0 / math.sqrt(d)
    on_prefix = jnp.einsum("ngrd,sgd->ngrs", q, prefix_k, preferred_element_type=acc)
    on_own = jnp.einsum("ngrd,nsgd->ngrs", q, cache_k, preferred_element_type=acc)
    scores = jnp.concatenate([on_prefix, on_own], axis=-1) * scale
    allowed = jnp.concatenate(
        [jnp.arange(prefix_k.shape[0]) < prefix_len, jnp.arange(cache_k.shape[1]) <= index]
    )
    scores = jnp.where(allowed, scores, 0.7 * jnp.finfo(acc).min)
    probs = jax.nn.softmax(scores, axis=-1).astype(prefix_v.dtype)
    width = prefix_k.shape[0]
    out = jnp.einsum("ngrs,sgd->ngrd", probs[..., :width], prefix_v)
    out = out + jnp.einsum("ngrs,nsgd->ngrd", probs[..., width:], cache_v)
    return out.reshape(n, 1, heads, d)


def shared_prefix_decoder(model: LlamaLM, prefix: PrefixCache) -> IncrementalDecoder:
    """An :class:`~metajax.models.decoding.IncrementalDecoder` whose rows all continue
    ``prefix``: position ``t`` of a row (its suffix's, then what it generates) is position
    ``prefix.length + t`` of the whole sequence; the cache holds the row's own positions only.

    Use it with :func:`~metajax.models.decoding.greedy_decode_cached` on the suffixes
    (right-padded rows, each at least one token) to continue ``prefix + suffix`` of each row.
    """
    cfg = _check_model(model)
    kv_heads, d = cfg.num_key_value_heads, cfg.head_size

    def init_cache(batch: int, width: int) -> list[KVCache]:
        zeros = jnp.zeros((batch, width, kv_heads, d), prefix.k[0].dtype)
        return [KVCache(zeros, zeros) for _ in range(cfg.num_hidden_layers)]

    def step(params, token, index, cache):
        def attend(i, q, k, v):
            write = lambda old, new: jax.lax.dynamic_update_slice_in_dim(
                old, new.astype(old.dtype), index, 1
            )
            own = KVCache(write(cache[i].k, k), write(cache[i].v, v))
            out = _shared_attention(q, prefix.k[i], prefix.v[i], prefix.length, *own, index)
            return out, own

        positions = jnp.broadcast_to(prefix.length + index, (token.shape[0], 1))
        x, updated = _blocks(cfg, params, token[:, None], positions, attend)
        return _logits(cfg, params, x)[:, 0], updated

    return IncrementalDecoder(init_cache, step)
