"""Llama-family decoders (Llama 2/3, SmolLM2, Qwen2) as a pure ``flax.linen`` module.

A sibling of :class:`metajax.models.GPT2LM` with the numerics of Hugging Face's
``LlamaForCausalLM`` / ``Qwen2ForCausalLM``, so pretrained checkpoints load into it
(:func:`metajax.models.load_pretrained`): RMSNorm, rotary positions in HF's rotate-half
layout, a SwiGLU MLP, grouped-query attention and a tied or untied head. Parameter names are
HF's (``embed_tokens``, ``layers_{i}/self_attn/q_proj``, ``layers_{i}/mlp/gate_proj``,
``norm``, ``lm_head``) and kernels are stored ``(in, out)``, so the checkpoint key map is a
renaming plus a transpose.

``model.apply(params, tokens)`` depends on ``params`` alone: it sits inside
:func:`metajax.adapt`, vmaps over tasks and differentiates to second order. Mixed precision
follows :class:`metajax.models.GPT2Config`: ``dtype`` computes, ``param_dtype`` stores; RMSNorm
statistics and the softmax run in float32 at least; logits come back in
``promote(float32, dtype)``.

Five entry points share one compact body, so the parameter names are the same whichever is
called: ``__call__`` (logits), ``features`` (final normed states), ``trunk`` (embeddings and
the first blocks, for a frozen trunk whose output is cached), ``top`` (the remaining blocks
and the head, from ``trunk``'s output) and ``decode_step`` (one position with a key-value
cache, for :func:`metajax.models.decoding.greedy_decode_cached`).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from metajax.models.transformer import KVCache, KVStep, attention


@dataclasses.dataclass(frozen=True)
class Llama3RopeScaling:
    """Llama 3.1/3.2's frequency-dependent RoPE stretch (HF ``rope_type="llama3"``).

    Wavelengths longer than ``original_max_position_embeddings / low_freq_factor`` are
    divided by ``factor``, shorter than ``.../ high_freq_factor`` kept, those between blended.
    """

    factor: float = 32.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192


@dataclasses.dataclass(frozen=True)
class RopeFreqFactors:
    """Per-frequency RoPE divisors, as llama.cpp stores Llama 3 scaling (``rope_freqs.weight``):
    inverse frequency ``i`` is divided by ``factors[i]`` (``head_size // 2`` of them)."""

    factors: tuple[float, ...]


# The released configurations, from each model's Hugging Face config.json; "tiny-*" are the
# shapes of the committed test fixtures (tests/fixtures/make_llama_tiny.py), "tiny" the first.
_COMMON = dict(vocab_size=49152, max_position_embeddings=8192, rms_norm_eps=1e-5)
LLAMA_SIZES: dict[str, dict[str, Any]] = {
    "smollm2-135m": dict(
        **_COMMON, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
        num_attention_heads=9, num_key_value_heads=3, rope_theta=100000.0,
        tie_word_embeddings=True,
    ),
    "smollm2-360m": dict(
        **_COMMON, hidden_size=960, intermediate_size=2560, num_hidden_layers=32,
        num_attention_heads=15, num_key_value_heads=5, rope_theta=100000.0,
        tie_word_embeddings=True,
    ),
    "smollm2-1.7b": dict(
        **_COMMON, hidden_size=2048, intermediate_size=8192, num_hidden_layers=24,
        num_attention_heads=32, num_key_value_heads=32, rope_theta=130000.0,
        tie_word_embeddings=True,
    ),
    "llama-3.2-1b": dict(
        vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
        num_attention_heads=32, num_key_value_heads=8, head_dim=64, rms_norm_eps=1e-5,
        rope_theta=500000.0, max_position_embeddings=131072, tie_word_embeddings=True,
        rope_scaling=Llama3RopeScaling(32.0, 1.0, 4.0, 8192),
    ),
    "qwen2.5-0.5b": dict(
        vocab_size=151936, hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
        num_attention_heads=14, num_key_value_heads=2, rms_norm_eps=1e-6, rope_theta=1e6,
        max_position_embeddings=32768, tie_word_embeddings=True, attention_bias=True,
    ),
    "tiny-llama": dict(
        vocab_size=320, hidden_size=48, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=3, num_key_value_heads=1, head_dim=8, rms_norm_eps=1e-5,
        rope_theta=10000.0, max_position_embeddings=64, tie_word_embeddings=False,
    ),
    "tiny-qwen2": dict(
        vocab_size=320, hidden_size=36, intermediate_size=40, num_hidden_layers=2,
        num_attention_heads=6, num_key_value_heads=2, rms_norm_eps=1e-6, rope_theta=1e6,
        max_position_embeddings=64, tie_word_embeddings=True, attention_bias=True,
    ),
}  # fmt: skip
LLAMA_SIZES["tiny"] = LLAMA_SIZES["tiny-llama"]


@dataclasses.dataclass(frozen=True)
class LlamaConfig:
    """Static configuration of :class:`LlamaLM`; field names are those of HF's ``LlamaConfig``.

    Attributes:
      vocab_size: number of token ids.
      hidden_size: residual stream width.
      intermediate_size: SwiGLU hidden width.
      num_hidden_layers: number of blocks.
      num_attention_heads: query heads.
      num_key_value_heads: key/value heads; divides ``num_attention_heads`` (grouped-query
        attention: query head ``h`` reads kv head ``h // (heads // kv_heads)``, as HF's
        ``repeat_kv``).
      head_dim: per-head width; None means ``hidden_size // num_attention_heads``.
      rms_norm_eps: RMSNorm epsilon.
      rope_theta: RoPE base.
      max_position_embeddings: longest sequence.
      tie_word_embeddings: the head is ``embed_tokens`` transposed (no ``lm_head``).
      attention_bias: biases on the q, k and v projections (Qwen2), none on o.
      rope_scaling: None, :class:`Llama3RopeScaling` (HF) or :class:`RopeFreqFactors` (GGUF).
      dtype: compute dtype. param_dtype: storage dtype (keep float32).
      remat: rematerialise each block in the backward pass (``nn.remat``).
    """

    vocab_size: int = 49152
    hidden_size: int = 576
    intermediate_size: int = 1536
    num_hidden_layers: int = 30
    num_attention_heads: int = 9
    num_key_value_heads: int = 3
    head_dim: int | None = None
    rms_norm_eps: float = 1e-5
    rope_theta: float = 100000.0
    max_position_embeddings: int = 8192
    tie_word_embeddings: bool = True
    attention_bias: bool = False
    rope_scaling: Llama3RopeScaling | RopeFreqFactors | None = None
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    remat: bool = False

    def __post_init__(self):
        for name in (
            "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
            "num_attention_heads", "num_key_value_heads", "max_position_embeddings",
        ):  # fmt: skip
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"LlamaConfig.{name} must be an int >= 1, got {value!r}.")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(
                f"LlamaConfig: num_attention_heads {self.num_attention_heads} is not a multiple "
                f"of num_key_value_heads {self.num_key_value_heads}."
            )
        if self.head_dim is None and self.hidden_size % self.num_attention_heads:
            raise ValueError(
                f"LlamaConfig: hidden_size {self.hidden_size} is not divisible by "
                f"num_attention_heads {self.num_attention_heads}; set head_dim."
            )
        if not isinstance(self.head_size, int) or self.head_size < 2 or self.head_size % 2:
            raise ValueError(  # RoPE rotates pairs
                f"LlamaConfig.head_dim must be an even int >= 2, got {self.head_size!r}."
            )
        if not self.rms_norm_eps > 0 or not self.rope_theta > 0:
            raise ValueError(
                f"LlamaConfig: rms_norm_eps ({self.rms_norm_eps}) and rope_theta "
                f"({self.rope_theta}) must be > 0."
            )
        if not isinstance(self.rope_scaling, Llama3RopeScaling | RopeFreqFactors | None):
            raise ValueError(
                "LlamaConfig.rope_scaling must be None, Llama3RopeScaling or RopeFreqFactors."
            )
        if isinstance(self.rope_scaling, RopeFreqFactors) and (
            len(self.rope_scaling.factors) != self.head_size // 2
        ):
            raise ValueError(
                f"LlamaConfig: {len(self.rope_scaling.factors)} RoPE frequency factors for "
                f"a head size of {self.head_size} (needs {self.head_size // 2})."
            )

    @property
    def head_size(self) -> int:
        """The per-head width actually used (``head_dim`` or ``hidden // heads``)."""
        return self.head_dim or self.hidden_size // self.num_attention_heads

    @classmethod
    def named(cls, name: str, **overrides: Any) -> LlamaConfig:
        """The configuration of a size in :data:`LLAMA_SIZES`, with field overrides."""
        if name not in LLAMA_SIZES:
            raise ValueError(f"unknown Llama size {name!r}; known sizes: {sorted(LLAMA_SIZES)}.")
        return cls(**{**LLAMA_SIZES[name], **overrides})


def llama_param_count(config: LlamaConfig) -> int:
    """Number of parameters of :class:`LlamaLM` (a tied head counted once), from the shapes."""
    shapes = jax.eval_shape(
        LlamaLM(config).init, jax.random.key(0), jax.ShapeDtypeStruct((1, 1), jnp.int32)
    )
    return sum(math.prod(s.shape) for s in jax.tree.leaves(shapes))


def rope_frequencies(config: LlamaConfig, dtype: Any = np.float32) -> np.ndarray:
    """RoPE inverse frequencies ``(head_size // 2,)`` as HF computes them (``dtype``)."""
    d = config.head_size
    inv = 1.0 / (config.rope_theta ** (np.arange(0, d, 2).astype(dtype) / d)).astype(dtype)
    s = config.rope_scaling
    if isinstance(s, RopeFreqFactors):
        return (inv / np.asarray(s.factors, dtype)).astype(dtype)
    if s is not None:  # HF's _compute_llama3_parameters
        low_wavelen = s.original_max_position_embeddings / s.low_freq_factor
        high_wavelen = s.original_max_position_embeddings / s.high_freq_factor
        wavelen = 2 * math.pi / inv
        scaled = np.where(wavelen > low_wavelen, inv / s.factor, inv)
        smooth = (s.original_max_position_embeddings / wavelen - s.low_freq_factor) / (
            s.high_freq_factor - s.low_freq_factor
        )
        smoothed = (1 - smooth) * scaled / s.factor + smooth * scaled
        medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
        inv = np.where(medium, smoothed, scaled)
    return inv.astype(dtype)


def _rope_tables(config: LlamaConfig, positions: jax.Array) -> tuple[jax.Array, jax.Array]:
    """cos and sin ``(batch, seq, head_size)`` for int ``positions (batch, seq)``."""
    acc = jnp.promote_types(jnp.float32, config.dtype)  # float64 compute keeps float64 angles
    inv = jnp.asarray(rope_frequencies(config, np.dtype(acc)))
    angles = positions.astype(acc)[..., None] * inv
    angles = jnp.concatenate([angles, angles], axis=-1)  # HF's rotate-half layout
    return jnp.cos(angles), jnp.sin(angles)


def _apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """``x (batch, seq, heads, d)`` rotated: ``x cos + rotate_half(x) sin`` in ``x.dtype``."""
    half = x.shape[-1] // 2
    rotated = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
    cos, sin = cos[:, :, None].astype(x.dtype), sin[:, :, None].astype(x.dtype)
    return x * cos + rotated * sin


class RMSNorm(nn.Module):
    """``scale * x / sqrt(mean(x^2) + eps)``, statistics in float32 at least (HF's order)."""

    eps: float
    dtype: Any
    param_dtype: Any

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        """Args: x ``(..., width)``. Returns ``(..., width)`` in ``dtype``."""
        scale = self.param("scale", nn.initializers.ones, (x.shape[-1],), self.param_dtype)
        x32 = x.astype(jnp.promote_types(jnp.float32, x.dtype))
        normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        return scale.astype(self.dtype) * normed.astype(self.dtype)


def _dense(cfg: LlamaConfig, features: int, name: str, bias: bool = False) -> nn.Dense:
    return nn.Dense(
        features,
        use_bias=bias,
        kernel_init=nn.initializers.normal(0.02),
        name=name,
        dtype=cfg.dtype,
        param_dtype=cfg.param_dtype,
    )


class LlamaAttention(nn.Module):
    """Grouped-query causal self-attention with RoPE: ``q_proj k_proj v_proj o_proj``."""

    config: LlamaConfig

    @nn.compact
    def __call__(self, x, cos, sin, key_mask, cache: KVStep | None = None):
        """Args: x ``(batch, seq, hidden)``; cos, sin ``(batch, seq, head_size)``; key_mask
        ``(batch, seq)`` bool or None; cache: decode one position (``seq == 1``) at
        ``cache.index``, written into the cache. Returns ``(batch, seq, hidden)``, and the
        updated :class:`KVCache` when ``cache`` is given."""
        cfg = self.config
        batch, seq, _ = x.shape
        heads, kv_heads, d = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_size
        bias = cfg.attention_bias
        q = _dense(cfg, heads * d, "q_proj", bias)(x).reshape(batch, seq, heads, d)
        k = _dense(cfg, kv_heads * d, "k_proj", bias)(x).reshape(batch, seq, kv_heads, d)
        v = _dense(cfg, kv_heads * d, "v_proj", bias)(x).reshape(batch, seq, kv_heads, d)
        q, k = _apply_rope(q, cos, sin), _apply_rope(k, cos, sin)
        causal, new_cache = True, None
        if cache is not None:
            k = jax.lax.dynamic_update_slice_in_dim(
                cache.k, k.astype(cache.k.dtype), cache.index, 1
            )
            v = jax.lax.dynamic_update_slice_in_dim(
                cache.v, v.astype(cache.v.dtype), cache.index, 1
            )
            new_cache = KVCache(k, v)
            # Slots after `index` hold zeros or stale keys: masked, as causality would.
            key_mask = jnp.broadcast_to(jnp.arange(k.shape[1]) <= cache.index, k.shape[:2])
            causal = False
        # HF's repeat_kv: kv head j serves query heads j * rep .. (j + 1) * rep - 1.
        rep = heads // kv_heads
        out = attention(q, jnp.repeat(k, rep, 2), jnp.repeat(v, rep, 2), key_mask, causal)
        out = _dense(cfg, cfg.hidden_size, "o_proj")(out.reshape(batch, seq, heads * d))
        return out if cache is None else (out, new_cache)


class LlamaMLP(nn.Module):
    """SwiGLU: ``down_proj(silu(gate_proj(x)) * up_proj(x))``."""

    config: LlamaConfig

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        """Args: x ``(batch, seq, hidden)``. Returns ``(batch, seq, hidden)``."""
        cfg = self.config
        gate = nn.silu(_dense(cfg, cfg.intermediate_size, "gate_proj")(x))
        up = _dense(cfg, cfg.intermediate_size, "up_proj")(x)
        return _dense(cfg, cfg.hidden_size, "down_proj")(gate * up)


class LlamaBlock(nn.Module):
    """Pre-norm block: ``x + attn(input_layernorm(x))``, then
    ``x + mlp(post_attention_layernorm(x))``."""

    config: LlamaConfig

    @nn.compact
    def __call__(self, x, cos, sin, key_mask, cache: KVStep | None = None):
        """Args as :class:`LlamaAttention`. Returns ``(batch, seq, hidden)`` (and the cache)."""
        cfg = self.config
        norm = lambda name: RMSNorm(cfg.rms_norm_eps, cfg.dtype, cfg.param_dtype, name=name)
        h = LlamaAttention(cfg, name="self_attn")(
            norm("input_layernorm")(x), cos, sin, key_mask, cache
        )
        if cache is not None:
            h, cache = h
        x = x + h
        x = x + LlamaMLP(cfg, name="mlp")(norm("post_attention_layernorm")(x))
        return x if cache is None else (x, cache)


def _positions(tokens_shape, attention_mask):
    """``(key_mask, positions)``: a real token's position is the number of real tokens before it."""
    if attention_mask is None:
        return None, jnp.broadcast_to(jnp.arange(tokens_shape[1]), tokens_shape)
    if attention_mask.shape != tuple(tokens_shape):
        raise ValueError(
            f"attention_mask shape {attention_mask.shape} != tokens shape {tuple(tokens_shape)}."
        )
    key_mask = attention_mask.astype(bool)
    return key_mask, jnp.maximum(jnp.cumsum(key_mask, axis=1) - 1, 0)


class LlamaLM(nn.Module):
    """Llama-family causal LM: ``logits[b, t]`` predicts ``tokens[b, t + 1]``.

    Padding as :class:`metajax.models.GPT2LM`: with ``attention_mask``, False keys get no
    weight and a real token's position is the number of real tokens before it, so left
    padding leaves the real tokens' logits unchanged.

    Example::

        model = LlamaLM(LlamaConfig.named("tiny-llama"))
        params = model.init(jax.random.key(0), jnp.zeros((1, 8), jnp.int32))
        logits = model.apply(params, tokens)  # (batch, seq, 320) float32
        h = model.apply(params, tokens, blocks=2, method="trunk")  # cache this (frozen)
        logits = model.apply(params, h, start=2, method="top")  # equals the full pass
    """

    config: LlamaConfig

    def __call__(self, tokens: jax.Array, attention_mask: jax.Array | None = None) -> jax.Array:
        """Args: tokens ``(batch, seq)`` int; attention_mask ``(batch, seq)``, True for real
        tokens, or None. Returns logits ``(batch, seq, vocab_size)`` in
        ``promote(float32, dtype)``."""
        return self._body(tokens, None, attention_mask, 0, None, "logits")

    def features(self, tokens: jax.Array, attention_mask: jax.Array | None = None) -> jax.Array:
        """The final normed hidden states ``(batch, seq, hidden_size)``; args as ``__call__``."""
        return self._body(tokens, None, attention_mask, 0, None, "features")

    def trunk(
        self, tokens: jax.Array, attention_mask: jax.Array | None = None, *, blocks: int
    ) -> jax.Array:
        """The embeddings then blocks ``0 .. blocks - 1`` (``blocks=0``: embeddings only).

        Returns: ``(batch, seq, hidden_size)`` in ``promote(float32, dtype)``, the input of
        :meth:`top` with ``start=blocks``. Needs only the parameters of those blocks."""
        return self._body(tokens, None, attention_mask, 0, blocks, "hidden")

    def top(
        self,
        hidden: jax.Array,
        attention_mask: jax.Array | None = None,
        *,
        start: int,
        features: bool = False,
        stop: int | None = None,
    ) -> jax.Array:
        """Blocks ``start ..`` end, the final norm and the head, from ``trunk(..., blocks=start)``.

        ``top(trunk(x, m, blocks=k), m, start=k) == __call__(x, m)``. Needs no parameters of
        blocks ``< start`` (nor ``embed_tokens`` when the head is untied). With ``stop``: blocks
        ``start .. stop - 1`` and their raw output, ``trunk(x, m, blocks=stop)`` (an inner
        layer's features; no norm, no head).

        Returns: logits ``(batch, seq, vocab_size)``, or with ``features=True`` the final
        normed states ``(batch, seq, hidden_size)``, in ``promote(float32, dtype)``."""
        out = "hidden" if stop is not None else "features" if features else "logits"
        return self._body(None, hidden, attention_mask, start, stop, out)

    def decode_step(self, token: jax.Array, index: jax.Array, cache: list[KVCache]):
        """One position: the logits ``(batch, vocab_size)`` after ``token`` (int ``(batch,)``)
        at position ``index`` (a scalar, the same for every row), given the caches of the
        positions before it (:meth:`init_cache`); equals ``__call__``'s ``logits[:, index]``
        on the whole prefix. Returns the logits and the updated caches."""
        return self._body(token[:, None], None, None, 0, None, "logits", cache, index)

    @nn.nowrap
    def init_cache(self, batch: int, length: int) -> list[KVCache]:
        """Empty caches (one per block, ``(batch, length, kv_heads, head_size)`` each)."""
        cfg = self.config
        if not 1 <= length <= cfg.max_position_embeddings:
            raise ValueError(
                f"cache length {length} must be in [1, {cfg.max_position_embeddings}]."
            )
        zeros = jnp.zeros((batch, length, cfg.num_key_value_heads, cfg.head_size), cfg.dtype)
        return [KVCache(zeros, zeros) for _ in range(cfg.num_hidden_layers)]

    @nn.compact
    def _body(self, tokens, hidden, attention_mask, start, stop, output, cache=None, index=None):
        # One compact method for every entry point: submodules are created by name only when
        # used, so the parameter names match and `top` never creates the blocks below `start`.
        cfg = self.config
        layers = cfg.num_hidden_layers
        stop = layers if stop is None else stop
        if not (isinstance(start, int) and isinstance(stop, int) and 0 <= start <= stop <= layers):
            raise ValueError(f"blocks/start must be ints in [0, {layers}], got {start}, {stop}.")
        x = tokens if hidden is None else hidden
        if x.ndim != 2 + (hidden is not None):
            raise ValueError(
                f"expected (batch, seq{', hidden' * (hidden is not None)}), got {x.shape}."
            )
        if tokens is not None and not jnp.issubdtype(tokens.dtype, jnp.integer):
            raise TypeError(f"tokens must be integer ids, got dtype {tokens.dtype}.")
        if x.shape[1] > cfg.max_position_embeddings:
            raise ValueError(f"sequence length {x.shape[1]} > {cfg.max_position_embeddings}.")
        embed = nn.Embed(
            cfg.vocab_size,
            cfg.hidden_size,
            embedding_init=nn.initializers.normal(0.02),
            name="embed_tokens",
            dtype=cfg.dtype,
            param_dtype=cfg.param_dtype,
        )
        if cache is not None:
            key_mask, positions = None, jnp.broadcast_to(index, x.shape)
        else:
            key_mask, positions = _positions(x.shape[:2], attention_mask)
        x = embed(tokens) if hidden is None else hidden.astype(cfg.dtype)
        cos, sin = _rope_tables(cfg, positions)
        block = nn.remat(LlamaBlock) if cfg.remat else LlamaBlock
        updated = []
        for i in range(start, stop):
            if cache is None:
                x = block(cfg, name=f"layers_{i}")(x, cos, sin, key_mask)
            else:
                step = KVStep(cache[i].k, cache[i].v, index)
                x, layer = block(cfg, name=f"layers_{i}")(x, cos, sin, None, step)
                updated.append(layer)
        out_dtype = jnp.promote_types(jnp.float32, cfg.dtype)
        if output == "hidden":
            return x.astype(out_dtype)
        x = RMSNorm(cfg.rms_norm_eps, cfg.dtype, cfg.param_dtype, name="norm")(x)
        if output == "features":
            return x.astype(out_dtype)
        if cfg.tie_word_embeddings:
            logits = embed.attend(x)
        else:
            logits = _dense(cfg, cfg.vocab_size, "lm_head")(x)
        logits = logits.astype(out_dtype)
        return logits if cache is None else (logits[:, 0], updated)
