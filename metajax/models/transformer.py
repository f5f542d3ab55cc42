"""Transformers for meta-learning: a decoder-only language model and an encoder classifier.

Both are pure ``flax.linen`` modules: ``model.apply(params, tokens)`` is a function of
``params`` alone, so it can sit inside :func:`metajax.adapt` and be differentiated to second
order. They share one trunk (token and position embeddings, pre-norm blocks, final LayerNorm);
a block's only difference between the two is its ``causal`` flag.

Dropout is off unless a ``'dropout'`` rng is passed to ``apply`` (``rngs={'dropout': key}``)
and ``config.dropout > 0``: inner loops are deterministic by default, and a stochastic inner
loop is an explicit choice. Dropout acts on the embeddings and on each residual branch, not on
attention probabilities.

Attention: by default (``attention="einsum"``) the same three XLA ops as the ``"xla"``
implementation of ``jax.nn.dot_product_attention`` (scores einsum, masked softmax, values
einsum), so just as fast, but with the softmax in ``promote(float32, dtype)``:
``jax.nn.dot_product_attention`` always runs its softmax in float32, even for float64 inputs,
which would cap the float64 finite-difference checks of MAML at float32 accuracy.
``attention="xla"`` or ``"cudnn"`` call ``jax.nn.dot_product_attention`` with that
implementation (cuDNN flash attention: GPU only, bf16/fp16, and not differentiable twice, so
first-order methods and evaluation only).

Mixed precision: ``dtype`` is the compute dtype (e.g. ``jnp.bfloat16``), ``param_dtype`` the
storage dtype of the parameters (keep it ``float32``, so inner updates and meta-gradients are
float32). LayerNorm statistics and the attention softmax run in float32 whatever ``dtype`` is,
and logits are returned in float32 (float64 when the compute dtype is float64).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Literal, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp


@dataclasses.dataclass(frozen=True)
class TransformerConfig:
    """Static configuration of the Transformer trunk (shared by the LM and the classifier).

    The defaults are the benchmark's standard model: 2 layers, width 128, 4 heads, MLP 512,
    sequences up to 32 tokens over a vocabulary of 64.

    Attributes:
      vocab_size: number of token ids; inputs lie in ``[0, vocab_size)``.
      width: model (residual stream) width; divisible by ``heads``.
      depth: number of blocks.
      heads: attention heads per block (head size ``width // heads``).
      mlp_width: hidden width of each block's MLP.
      max_len: longest input sequence (size of the learned position table).
      dropout: dropout rate; used only when a ``'dropout'`` rng is given to ``apply``.
      dtype: compute dtype (``jnp.float32``, ``jnp.bfloat16``, or ``jnp.float64`` under x64).
      param_dtype: parameter dtype.
      tie_embeddings: LM only: the output head reuses the token embedding matrix (no bias);
        otherwise a separate bias-free ``width -> vocab_size`` projection. Ignored by the
        classifier.
      attention: ``"einsum"`` (default, exact in every dtype, differentiable to any order),
        or ``"xla"`` / ``"cudnn"`` for ``jax.nn.dot_product_attention`` (see module doc).
    """

    vocab_size: int = 64
    width: int = 128
    depth: int = 2
    heads: int = 4
    mlp_width: int = 512
    max_len: int = 32
    dropout: float = 0.0
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    tie_embeddings: bool = True
    attention: Literal["einsum", "xla", "cudnn"] = "einsum"

    def __post_init__(self):
        if self.attention not in ("einsum", "xla", "cudnn"):
            raise ValueError(f"attention must be einsum, xla or cudnn, got {self.attention!r}.")
        if self.width % self.heads:
            raise ValueError(f"width {self.width} is not divisible by heads {self.heads}.")
        for name in ("vocab_size", "width", "depth", "heads", "mlp_width", "max_len"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}.")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}.")


def attention(
    q: jax.Array, k: jax.Array, v: jax.Array, key_mask: jax.Array | None, causal: bool
) -> jax.Array:
    """Scaled dot-product attention, softmax in ``promote(float32, dtype)``.

    Args:
      q, k, v: ``(batch, seq, heads, head_dim)``, one dtype.
      key_mask: ``(batch, seq)`` bool or None; False keys get zero weight from every query.
      causal: query ``t`` gets zero weight on keys ``> t``.

    Returns:
      ``(batch, seq, heads, head_dim)`` in the dtype of ``v``.
    """
    acc = jnp.promote_types(jnp.float32, q.dtype)
    scores = jnp.einsum("bthd,bshd->bhts", q, k, preferred_element_type=acc)
    scores = scores * (1.0 / math.sqrt(q.shape[-1]))
    seq = q.shape[1]
    allowed = jnp.ones((1, 1, seq, seq), bool)
    if causal:
        allowed = jnp.tril(allowed)
    if key_mask is not None:
        allowed = allowed & key_mask[:, None, None, :]
    if causal or key_mask is not None:
        # A finite "minus infinity": a row with every key masked (an all-pad sequence) gets
        # uniform weights instead of NaN, and exp underflows to exactly 0 elsewhere.
        scores = jnp.where(allowed, scores, 0.7 * jnp.finfo(acc).min)
    probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
    return jnp.einsum("bhts,bshd->bthd", probs, v)


def _dense_init(std: float):
    return nn.initializers.normal(stddev=std)


def _dtypes(cfg: TransformerConfig) -> dict[str, Any]:
    return {"dtype": cfg.dtype, "param_dtype": cfg.param_dtype}


def _out_dtype(cfg: TransformerConfig):
    # float32 logits for bf16/f32 compute; float64 stays float64 (finite-difference tests).
    return jnp.promote_types(jnp.float32, cfg.dtype)


class KVCache(NamedTuple):
    """One block's keys and values of the positions decoded so far, each
    ``(batch, length, heads, head_dim)``; slots not yet decoded are ignored."""

    k: jax.Array
    v: jax.Array


class KVStep(NamedTuple):
    """A block's :class:`KVCache` and the position of the token being decoded (a scalar)."""

    k: jax.Array
    v: jax.Array
    index: jax.Array


def init_kv_cache(config: TransformerConfig, batch: int, length: int) -> list[KVCache]:
    """Empty caches (one per block) for decoding ``batch`` rows of up to ``length`` tokens."""
    if not 1 <= length <= config.max_len:
        raise ValueError(f"cache length {length} must be in [1, max_len = {config.max_len}].")
    shape = (batch, length, config.heads, config.width // config.heads)
    zeros = jnp.zeros(shape, config.dtype)
    return [KVCache(zeros, zeros) for _ in range(config.depth)]


class SelfAttention(nn.Module):
    """Multi-head self-attention (fused QKV projection, :func:`attention`, output projection).

    Attributes:
      config: the trunk configuration.
      causal: position ``t`` attends only to positions ``<= t``.
    """

    config: TransformerConfig
    causal: bool

    @nn.compact
    def __call__(
        self, x: jax.Array, key_mask: jax.Array | None = None, cache: KVStep | None = None
    ) -> jax.Array | tuple[jax.Array, KVCache]:
        """Args: x ``(batch, seq, width)``; key_mask ``(batch, seq)`` bool, False keys are
        ignored by every query. Returns ``(batch, seq, width)``.

        With ``cache`` (incremental decoding, causal only): x is ``(batch, 1, width)``, the
        token at position ``cache.index``; its key and value are written into the cache at
        that position and it attends to positions ``<= index``. Returns the output and the
        updated :class:`KVCache`."""
        cfg = self.config
        head_dim = cfg.width // cfg.heads
        # One fused projection: a single (width, 3 * width) matmul instead of three.
        qkv = nn.DenseGeneral(
            (3, cfg.heads, head_dim), kernel_init=_dense_init(0.02), name="qkv", **_dtypes(cfg)
        )(x)
        q, k, v = qkv[..., 0, :, :], qkv[..., 1, :, :], qkv[..., 2, :, :]
        new_cache = None
        if cache is not None:
            if not self.causal or x.shape[1] != 1:
                raise ValueError("a key-value cache decodes one token at a time, causally.")
            k = jax.lax.dynamic_update_slice_in_dim(
                cache.k, k.astype(cache.k.dtype), cache.index, 1
            )
            v = jax.lax.dynamic_update_slice_in_dim(
                cache.v, v.astype(cache.v.dtype), cache.index, 1
            )
            new_cache = KVCache(k, v)
            # Slots after `index` hold stale or zero keys: masked, as causality would.
            seen = jnp.arange(k.shape[1]) <= cache.index
            out = attention(q, k, v, jnp.broadcast_to(seen, k.shape[:2]), causal=False)
        elif cfg.attention == "einsum":
            out = attention(q, k, v, key_mask, self.causal)
        else:
            mask = None if key_mask is None else key_mask[:, None, None, :]
            out = jax.nn.dot_product_attention(
                q, k, v, mask=mask, is_causal=self.causal, implementation=cfg.attention
            )
        # GPT-2: residual projections scaled down with depth so that the residual stream's
        # variance does not grow with the number of blocks.
        out_init = _dense_init(0.02 / math.sqrt(2 * cfg.depth))
        out = nn.DenseGeneral(
            cfg.width, axis=(-2, -1), kernel_init=out_init, name="out", **_dtypes(cfg)
        )(out)
        return out if cache is None else (out, new_cache)


class Block(nn.Module):
    """Pre-norm Transformer block: ``x + Attn(LN(x))`` then ``x + MLP(LN(x))``, GELU MLP.

    The same block serves the decoder (``causal=True``) and the encoder (``causal=False``,
    usually with a key padding mask).
    """

    config: TransformerConfig
    causal: bool

    @nn.compact
    def __call__(
        self,
        x: jax.Array,
        key_mask: jax.Array | None = None,
        deterministic: bool = True,
        cache: KVStep | None = None,
    ) -> jax.Array | tuple[jax.Array, KVCache]:
        """Args: x ``(batch, seq, width)``; key_mask ``(batch, seq)`` bool or None; cache as
        in :class:`SelfAttention` (then the updated cache is returned too).
        Returns ``(batch, seq, width)``."""
        cfg = self.config
        norm = lambda name: nn.LayerNorm(name=name, **_dtypes(cfg))
        drop = nn.Dropout(cfg.dropout, deterministic=deterministic)
        h = SelfAttention(cfg, self.causal, name="attn")(norm("ln_attn")(x), key_mask, cache)
        if cache is not None:
            h, cache = h
        x = x + drop(h)
        h = norm("ln_mlp")(x)
        h = nn.Dense(cfg.mlp_width, kernel_init=_dense_init(0.02), name="mlp_in", **_dtypes(cfg))(h)
        h = nn.gelu(h)  # tanh approximation, as in GPT-2
        out_init = _dense_init(0.02 / math.sqrt(2 * cfg.depth))
        h = nn.Dense(cfg.width, kernel_init=out_init, name="mlp_out", **_dtypes(cfg))(h)
        return x + drop(h) if cache is None else (x + drop(h), cache)


class Trunk(nn.Module):
    """Embeddings, ``depth`` blocks and the final LayerNorm; shared by both models."""

    config: TransformerConfig
    causal: bool

    def setup(self):
        cfg = self.config
        self.embed = nn.Embed(
            cfg.vocab_size, cfg.width, embedding_init=_dense_init(0.02), **_dtypes(cfg)
        )
        self.positions = self.param(
            "positions", _dense_init(0.02), (cfg.max_len, cfg.width), cfg.param_dtype
        )
        self.blocks = [Block(cfg, self.causal) for _ in range(cfg.depth)]
        self.ln_final = nn.LayerNorm(**_dtypes(cfg))
        self.drop = nn.Dropout(cfg.dropout)

    def __call__(
        self,
        tokens: jax.Array,
        positions: jax.Array,
        key_mask: jax.Array | None = None,
        deterministic: bool = True,
    ) -> jax.Array:
        """Args: tokens and positions ``(batch, seq)`` int; key_mask ``(batch, seq)`` bool or
        None. Returns the final hidden states ``(batch, seq, width)`` in the compute dtype."""
        cfg = self.config
        x = self.embed(tokens) + jnp.take(self.positions, positions, axis=0).astype(cfg.dtype)
        x = self.drop(x, deterministic=deterministic)
        for block in self.blocks:
            x = block(x, key_mask, deterministic)
        return self.ln_final(x)

    def decode_step(
        self, token: jax.Array, index: jax.Array, cache: list[KVCache]
    ) -> tuple[jax.Array, list[KVCache]]:
        """One token per row at position ``index`` (a scalar, the same for every row), with
        a :class:`KVCache` per block. Returns the final states ``(batch, width)`` and the
        updated caches."""
        cfg = self.config
        x = self.embed(token[:, None]) + self.positions[index].astype(cfg.dtype)
        updated = []
        for block, layer in zip(self.blocks, cache, strict=True):
            x, layer = block(x, cache=KVStep(layer.k, layer.v, index))
            updated.append(layer)
        return self.ln_final(x)[:, 0], updated

    def attend(self, x: jax.Array) -> jax.Array:
        """Tied output head: ``x @ embedding.T``, ``(..., width) -> (..., vocab_size)``."""
        return self.embed.attend(x)


def _check_tokens(tokens: jax.Array, cfg: TransformerConfig) -> None:
    if tokens.ndim != 2:
        raise ValueError(f"tokens must be (batch, seq), got shape {tokens.shape}.")
    if not jnp.issubdtype(tokens.dtype, jnp.integer):
        raise TypeError(f"tokens must be integer ids, got {tokens.dtype}.")
    if tokens.shape[1] > cfg.max_len:
        raise ValueError(f"sequence length {tokens.shape[1]} > max_len {cfg.max_len}.")


def _deterministic(module: nn.Module) -> bool:
    return module.config.dropout == 0.0 or not module.has_rng("dropout")


class TransformerLM(nn.Module):
    """Decoder-only (GPT-style) language model with causal self-attention.

    ``logits[b, t]`` depends on ``tokens[b, :t + 1]`` only, and predicts ``tokens[b, t + 1]``.
    Use right padding: a causal model never lets a real token see the pads after it, so no
    padding mask is needed here; :func:`metajax.models.next_token_loss` drops the pads'
    targets. Dropout is off unless ``apply(..., rngs={'dropout': key})``.

    Example::

        model = TransformerLM(TransformerConfig(vocab_size=64))
        params = model.init(jax.random.key(0), jnp.zeros((1, 32), jnp.int32))
        logits = model.apply(params, tokens)  # (batch, seq, 64) float32
    """

    config: TransformerConfig

    def setup(self):
        cfg = self.config
        self.trunk = Trunk(cfg, causal=True)
        if not cfg.tie_embeddings:
            self.head = nn.Dense(
                cfg.vocab_size, use_bias=False, kernel_init=_dense_init(0.02), **_dtypes(cfg)
            )

    def _logits(self, x: jax.Array) -> jax.Array:
        logits = self.trunk.attend(x) if self.config.tie_embeddings else self.head(x)
        return logits.astype(_out_dtype(self.config))

    def __call__(self, tokens: jax.Array) -> jax.Array:
        """Args: tokens ``(batch, seq)`` int, ``seq <= max_len``.
        Returns logits ``(batch, seq, vocab_size)``, float32 (float64 for float64 compute)."""
        cfg = self.config
        _check_tokens(tokens, cfg)
        positions = jnp.broadcast_to(jnp.arange(tokens.shape[1]), tokens.shape)
        return self._logits(self.trunk(tokens, positions, None, _deterministic(self)))

    def decode_step(
        self, token: jax.Array, index: jax.Array, cache: list[KVCache]
    ) -> tuple[jax.Array, list[KVCache]]:
        """Incremental decoding: the logits after ``token`` (int ``(batch,)``) at position
        ``index`` (a scalar), given the caches of positions ``< index``
        (:func:`init_kv_cache`). Equals ``__call__``'s ``logits[:, index]`` on the whole
        prefix, at the cost of one position instead of ``index + 1``. No dropout.

        Use: ``model.apply(params, token, index, cache, method="decode_step")``.
        Returns logits ``(batch, vocab_size)`` and the updated caches."""
        x, cache = self.trunk.decode_step(token, index, cache)
        return self._logits(x), cache


def _encode_and_pool(
    module: nn.Module, tokens: jax.Array, entity_positions: jax.Array | None
) -> jax.Array:
    """The encoder trunk (named ``trunk`` in ``module``) and its pooling; see
    :class:`TransformerClassifier`. Returns ``(batch, width)`` (``pool="mean"``) or
    ``(batch, 2 * width)`` (``pool="entity"``) in ``promote(float32, dtype)``."""
    cfg = module.config
    _check_tokens(tokens, cfg)
    if module.pool not in ("mean", "entity"):
        raise ValueError(f"pool must be 'mean' or 'entity', got {module.pool!r}.")
    if (entity_positions is None) != (module.pool == "mean"):
        raise ValueError(
            f"pool={module.pool!r} needs entity_positions "
            + ("None." if module.pool == "mean" else "of shape (batch, 2).")
        )
    if entity_positions is not None and (
        entity_positions.shape != (tokens.shape[0], 2)
        or not jnp.issubdtype(entity_positions.dtype, jnp.integer)
    ):
        raise ValueError(
            f"entity_positions must be int ({tokens.shape[0]}, 2), got "
            f"{entity_positions.dtype} {entity_positions.shape}."
        )
    real = tokens != module.pad_id
    positions = jnp.maximum(jnp.cumsum(real, axis=1) - 1, 0)
    x = Trunk(cfg, causal=False, name="trunk")(tokens, positions, real, _deterministic(module))
    # Pool in float32 (at least): bf16 sums over long sequences lose digits.
    acc = _out_dtype(cfg)
    if entity_positions is not None:
        # The states at the head-start and tail-start markers, side by side: which entity is
        # the head stays visible to the classifier.
        picked = jnp.take_along_axis(x, entity_positions[:, :, None], axis=1)
        return picked.astype(acc).reshape(tokens.shape[0], 2 * cfg.width)
    weights = real.astype(acc)[..., None]
    return jnp.sum(x.astype(acc) * weights, axis=1) / jnp.maximum(jnp.sum(weights, axis=1), 1.0)


class TransformerClassifier(nn.Module):
    """Transformer encoder over token sequences with a pooled N-way head.

    Tokens equal to ``pad_id`` are padding: they are masked out of every attention (as keys)
    and of the mean pooling, and they take no position, since a token's position is the
    number of real tokens before it. So pads anywhere in a sequence (appended, prepended or
    interleaved) leave the logits unchanged. A sequence of only pads pools to zero: its
    logits are the head's bias.

    Pooling: ``pool="mean"`` averages the final states of the real tokens. ``pool="entity"``
    (relation classification) concatenates the final states at two given positions per
    sequence, typically the head-entity and tail-entity start markers, so the head reads
    ``2 * width`` features.

    Attributes:
      config: the trunk configuration (``tie_embeddings`` is ignored).
      num_classes: N of the N-way head.
      pad_id: the padding token id.
      pool: ``"mean"`` or ``"entity"``.
    """

    config: TransformerConfig
    num_classes: int
    pad_id: int = 0
    pool: Literal["mean", "entity"] = "mean"

    @nn.compact
    def __call__(self, tokens: jax.Array, entity_positions: jax.Array | None = None) -> jax.Array:
        """Args: tokens ``(batch, seq)`` int, ``seq <= max_len``; entity_positions ``(batch, 2)``
        int in ``[0, seq)`` for ``pool="entity"`` (None for ``"mean"``).
        Returns logits ``(batch, num_classes)``, float32 (float64 for float64 compute)."""
        cfg = self.config
        pooled = _encode_and_pool(self, tokens, entity_positions)
        head = nn.Dense(
            self.num_classes, kernel_init=_dense_init(0.02), name="head", **_dtypes(cfg)
        )
        logits = head(pooled)
        return logits.astype(_out_dtype(cfg))


class TransformerEncoder(nn.Module):
    """:class:`TransformerClassifier` without its head: the pooled features, as an embedding
    for metric-based meta-learning (ProtoNets). Its parameters are the classifier's minus
    ``head`` (same names), so one trunk serves both.

    Attributes:
      config: the trunk configuration.
      pad_id: the padding token id.
      pool: ``"mean"`` or ``"entity"``, as in :class:`TransformerClassifier`.
    """

    config: TransformerConfig
    pad_id: int = 0
    pool: Literal["mean", "entity"] = "mean"

    @nn.compact
    def __call__(self, tokens: jax.Array, entity_positions: jax.Array | None = None) -> jax.Array:
        """Same arguments as :class:`TransformerClassifier`. Returns ``(batch, width)`` for
        ``pool="mean"``, ``(batch, 2 * width)`` for ``"entity"``, float32 (float64 for
        float64 compute)."""
        return _encode_and_pool(self, tokens, entity_positions)
