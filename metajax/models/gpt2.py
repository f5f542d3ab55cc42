"""GPT-2 (Radford et al., 2019) as a pure ``flax.linen`` module, laid out like Hugging Face's.

A sibling of :class:`metajax.models.TransformerLM` with GPT-2's exact numerics, so that
pretrained checkpoints load into it (:func:`metajax.models.load_gpt2`): learned positions,
pre-LayerNorm blocks with ``eps = 1e-5``, tanh-approximate GELU, a fused QKV projection, a
4x MLP, a final LayerNorm and an output head tied to the token embedding. Parameter names
follow Hugging Face's (``wte``, ``wpe``, ``h_{i}/ln_1``, ``h_{i}/attn/c_attn``, ...) and every
kernel is stored ``(in, out)`` like HF's ``Conv1D``, so the checkpoint key map is a renaming.

``model.apply(params, tokens)`` is a function of ``params`` alone: it sits inside
:func:`metajax.adapt`, vmaps over tasks and differentiates to second order. The model is
deterministic (no dropout): checkpoints' ``*_pdrop`` rates are training-time settings and
inner loops here are deterministic.

Attention is :func:`metajax.models.transformer.attention`, whose softmax runs in
``promote(float32, dtype)``, so float64 finite-difference checks keep float64 accuracy.
Mixed precision follows :class:`metajax.models.TransformerConfig`: ``dtype`` is the compute
dtype, ``param_dtype`` the storage dtype (keep it float32); LayerNorm statistics and the
softmax run in float32 at least, and logits come back in ``promote(float32, dtype)``.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from metajax.models.transformer import attention

# name -> (n_layer, n_embd, n_head, vocab_size, n_positions). The four released checkpoints,
# and a tiny size for tests (the shape of the committed test fixture).
GPT2_SIZES: dict[str, tuple[int, int, int, int, int]] = {
    "gpt2": (12, 768, 12, 50257, 1024),
    "gpt2-medium": (24, 1024, 16, 50257, 1024),
    "gpt2-large": (36, 1280, 20, 50257, 1024),
    "gpt2-xl": (48, 1600, 25, 50257, 1024),
    "tiny": (2, 32, 4, 320, 64),
}


@dataclasses.dataclass(frozen=True)
class GPT2Config:
    """Static configuration of :class:`GPT2LM`; field names are those of HF's ``GPT2Config``.

    The defaults are the 124M model (``gpt2``); :meth:`named` gives the other sizes.

    Attributes:
      vocab_size: number of token ids; inputs lie in ``[0, vocab_size)``.
      n_positions: longest input sequence (size of the learned position table).
      n_embd: residual stream width; divisible by ``n_head``.
      n_layer: number of blocks.
      n_head: attention heads per block (head size ``n_embd // n_head``).
      n_inner: MLP hidden width; None means ``4 * n_embd`` (every released GPT-2).
      layer_norm_epsilon: LayerNorm epsilon.
      dtype: compute dtype (``jnp.float32``, ``jnp.bfloat16``, or ``jnp.float64`` under x64).
      param_dtype: parameter dtype.
      remat: rematerialise each block in the backward pass (``nn.remat``): activations of a
        block are recomputed instead of stored. Composes with the inner-loop remat of
        :func:`metajax.adapt`, which recomputes whole inner steps.
    """

    vocab_size: int = 50257
    n_positions: int = 1024
    n_embd: int = 768
    n_layer: int = 12
    n_head: int = 12
    n_inner: int | None = None
    layer_norm_epsilon: float = 1e-5
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    remat: bool = False

    def __post_init__(self):
        for name in ("vocab_size", "n_positions", "n_embd", "n_layer", "n_head"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an int >= 1, got {value!r}.")
        if self.n_inner is not None and (not isinstance(self.n_inner, int) or self.n_inner < 1):
            raise ValueError(f"n_inner must be None or an int >= 1, got {self.n_inner!r}.")
        if self.n_embd % self.n_head:
            raise ValueError(f"n_embd {self.n_embd} is not divisible by n_head {self.n_head}.")
        if not self.layer_norm_epsilon > 0:
            raise ValueError(f"layer_norm_epsilon must be > 0, got {self.layer_norm_epsilon}.")

    @property
    def mlp_width(self) -> int:
        """Hidden width of each block's MLP."""
        return 4 * self.n_embd if self.n_inner is None else self.n_inner

    @classmethod
    def named(cls, name: str, **overrides: Any) -> GPT2Config:
        """The configuration of a named size, with optional field overrides.

        Args:
          name: one of :data:`GPT2_SIZES` (``gpt2``, ``gpt2-medium``, ``gpt2-large``,
            ``gpt2-xl``, ``tiny``).
          **overrides: fields to replace, e.g. ``dtype=jnp.bfloat16, remat=True``.
        """
        if name not in GPT2_SIZES:
            raise ValueError(f"unknown GPT-2 size {name!r}; known sizes: {sorted(GPT2_SIZES)}.")
        n_layer, n_embd, n_head, vocab_size, n_positions = GPT2_SIZES[name]
        sizes = dict(
            n_layer=n_layer,
            n_embd=n_embd,
            n_head=n_head,
            vocab_size=vocab_size,
            n_positions=n_positions,
        )
        return cls(**{**sizes, **overrides})


def gpt2_param_count(config: GPT2Config) -> int:
    """Number of parameters of :class:`GPT2LM` (the tied head counted once), from the shapes.

    Args:
      config: the model configuration.

    Returns:
      The total number of scalars in ``model.init(...)``.
    """
    shapes = jax.eval_shape(
        GPT2LM(config).init, jax.random.key(0), jax.ShapeDtypeStruct((1, 1), jnp.int32)
    )
    return sum(math.prod(s.shape) for s in jax.tree.leaves(shapes))


def _dtypes(cfg: GPT2Config) -> dict[str, Any]:
    return {"dtype": cfg.dtype, "param_dtype": cfg.param_dtype}


def _layer_norm(cfg: GPT2Config, name: str) -> nn.LayerNorm:
    return nn.LayerNorm(epsilon=cfg.layer_norm_epsilon, name=name, **_dtypes(cfg))


def _dense(cfg: GPT2Config, features: int, name: str, std: float = 0.02) -> nn.Dense:
    return nn.Dense(features, kernel_init=nn.initializers.normal(std), name=name, **_dtypes(cfg))


def _residual_std(cfg: GPT2Config) -> float:
    # GPT-2's initialisation: projections into the residual stream are scaled down with depth
    # so that the stream's variance does not grow with the number of blocks.
    return 0.02 / math.sqrt(2 * cfg.n_layer)


class GPT2Attention(nn.Module):
    """Causal multi-head self-attention: fused ``c_attn`` (width -> 3 * width), ``c_proj``."""

    config: GPT2Config

    @nn.compact
    def __call__(self, x: jax.Array, key_mask: jax.Array | None) -> jax.Array:
        """Args: x ``(batch, seq, n_embd)``; key_mask ``(batch, seq)`` bool or None, False keys
        get zero weight. Returns ``(batch, seq, n_embd)``."""
        cfg = self.config
        batch, seq, _ = x.shape
        head_dim = cfg.n_embd // cfg.n_head
        # HF's c_attn output is [q | k | v], each of them heads-major: (3, heads, head_dim).
        qkv = _dense(cfg, 3 * cfg.n_embd, "c_attn")(x).reshape(batch, seq, 3, cfg.n_head, head_dim)
        out = attention(qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2], key_mask, causal=True)
        return _dense(cfg, cfg.n_embd, "c_proj", _residual_std(cfg))(
            out.reshape(batch, seq, cfg.n_embd)
        )


class GPT2MLP(nn.Module):
    """``c_fc`` (width -> mlp_width), tanh-approximate GELU, ``c_proj`` (back to width)."""

    config: GPT2Config

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        """Args: x ``(batch, seq, n_embd)``. Returns ``(batch, seq, n_embd)``."""
        cfg = self.config
        h = nn.gelu(_dense(cfg, cfg.mlp_width, "c_fc")(x), approximate=True)
        return _dense(cfg, cfg.n_embd, "c_proj", _residual_std(cfg))(h)


class GPT2Block(nn.Module):
    """Pre-norm block: ``x + attn(ln_1(x))``, then ``x + mlp(ln_2(x))``."""

    config: GPT2Config

    @nn.compact
    def __call__(self, x: jax.Array, key_mask: jax.Array | None) -> jax.Array:
        """Args: x ``(batch, seq, n_embd)``; key_mask ``(batch, seq)`` bool or None.
        Returns ``(batch, seq, n_embd)``."""
        cfg = self.config
        x = x + GPT2Attention(cfg, name="attn")(_layer_norm(cfg, "ln_1")(x), key_mask)
        return x + GPT2MLP(cfg, name="mlp")(_layer_norm(cfg, "ln_2")(x))


class GPT2LM(nn.Module):
    """GPT-2 language model head model: ``logits[b, t]`` predicts ``tokens[b, t + 1]``.

    Without a mask, position ``t`` has position id ``t`` (as Hugging Face's default). With
    ``attention_mask``, False tokens are padding: no query attends to them, and a real
    token's position id is the number of real tokens before it (as HF's ``generate`` does),
    so left padding leaves the real tokens' logits unchanged. Right padding needs no mask: a
    causal model never lets a real token see the pads after it.

    Example::

        model = GPT2LM(GPT2Config.named("tiny"))
        params = model.init(jax.random.key(0), jnp.zeros((1, 8), jnp.int32))
        logits = model.apply(params, tokens)  # (batch, seq, 320) float32
        states = model.apply(params, tokens, method="features")  # (batch, seq, 32)
    """

    config: GPT2Config

    def __call__(self, tokens: jax.Array, attention_mask: jax.Array | None = None) -> jax.Array:
        """Args:
          tokens: ``(batch, seq)`` int ids in ``[0, vocab_size)``, ``seq <= n_positions``.
          attention_mask: optional ``(batch, seq)``, nonzero / True for real tokens.

        Returns:
          Logits ``(batch, seq, vocab_size)``, float32 (float64 for float64 compute).
        """
        return self._run(
            tokens, attention_mask, start=0, stop=self.config.n_layer, out="logits", embed=True
        )

    def features(self, tokens: jax.Array, attention_mask: jax.Array | None = None) -> jax.Array:
        """The final hidden states (after ``ln_f``), for a head other than the LM's.

        ``logits = features @ wte.T``: the same states the tied LM head reads, so
        ``model.apply(params, tokens, method="features")`` takes the parameters of
        ``model.init`` or of a checkpoint unchanged.

        Args:
          tokens: as :meth:`__call__`.
          attention_mask: as :meth:`__call__`.

        Returns:
          ``(batch, seq, n_embd)``, float32 (float64 for float64 compute).
        """
        return self._run(
            tokens, attention_mask, start=0, stop=self.config.n_layer, out="features", embed=True
        )

    def trunk(
        self, tokens: jax.Array, attention_mask: jax.Array | None = None, *, blocks: int
    ) -> jax.Array:
        """The residual stream after the embeddings and the first ``blocks`` blocks.

        ``top(trunk(tokens, m, blocks=k), m, start=k) == __call__(tokens, m)`` for every
        ``0 <= k <= n_layer``: a frozen bottom of the model can be computed once and its
        output reused.

        Args:
          tokens: as :meth:`__call__`.
          attention_mask: as :meth:`__call__`.
          blocks: blocks run after the embeddings, ``0 <= blocks <= n_layer`` (0: the
            embeddings alone).

        Returns:
          ``(batch, seq, n_embd)`` in ``promote(float32, dtype)``: lossless for bf16 compute,
          whose stream :meth:`top` casts back.
        """
        _check_blocks(blocks, self.config.n_layer, "blocks")
        return self._run(tokens, attention_mask, start=0, stop=blocks, out="hidden", embed=True)

    def top(
        self,
        hidden: jax.Array,
        attention_mask: jax.Array | None = None,
        *,
        start: int,
        features: bool = False,
        stop: int | None = None,
    ) -> jax.Array:
        """Blocks ``start..n_layer - 1``, ``ln_f``, then the tied LM head, on :meth:`trunk`'s
        output; with ``stop``, blocks ``start..stop - 1`` and their raw output (no ``ln_f``).

        Only the modules it runs take parameters: ``model.init(key, hidden, start=k,
        method="top")`` creates no ``wpe`` and no block below ``k``, and ``apply`` needs none
        (the tied head reads ``wte``).

        Args:
          hidden: ``(batch, seq, n_embd)``, as ``trunk(tokens, attention_mask, blocks=start)``.
          attention_mask: the mask :meth:`trunk` was given (None: none).
          start: the first block to run, ``0 <= start <= n_layer``.
          features: return the final normed states (as :meth:`features`) instead of logits.
          stop: ``start <= stop <= n_layer``: return the states after block ``stop - 1``
            (``trunk(tokens, m, blocks=stop)``), an inner layer's features.

        Returns:
          Logits ``(batch, seq, vocab_size)``, or ``(batch, seq, n_embd)`` features; float32
          (float64 for float64 compute).
        """
        _check_blocks(start, self.config.n_layer, "start")
        if stop is not None:
            _check_blocks(stop, self.config.n_layer, "stop")
            if stop < start:
                raise ValueError(f"stop={stop} < start={start}.")
        out = "hidden" if stop is not None else "features" if features else "logits"
        end = self.config.n_layer if stop is None else stop
        return self._run(hidden, attention_mask, start=start, stop=end, out=out, embed=False)

    @nn.compact
    def _run(self, x: jax.Array, attention_mask, *, start: int, stop: int, out: str, embed: bool):
        # One compact method for every part, so the parameter names (wte, wpe, h_i, ln_f) and
        # hence checkpoints are the same whichever part runs; linen creates parameters only
        # for the submodules a call reaches.
        cfg = self.config
        wte = nn.Embed(
            cfg.vocab_size,
            cfg.n_embd,
            embedding_init=nn.initializers.normal(0.02),
            name="wte",
            **_dtypes(cfg),
        )
        if embed:
            key_mask, x = self._embed(wte, x, attention_mask)
        else:
            if x.ndim != 3 or x.shape[-1] != cfg.n_embd:
                raise ValueError(
                    f"hidden states must be (batch, seq, {cfg.n_embd}), got shape {x.shape}."
                )
            key_mask = _key_mask(attention_mask, x.shape[:2])
            # The stream in the compute dtype, as the full pass carries it (bf16 round trips
            # through float32 exactly).
            x = x.astype(cfg.dtype)
        block = nn.remat(GPT2Block) if cfg.remat else GPT2Block
        for i in range(start, stop):
            x = block(cfg, name=f"h_{i}")(x, key_mask)
        out_dtype = jnp.promote_types(jnp.float32, cfg.dtype)
        if out == "hidden":
            return x.astype(out_dtype)
        x = _layer_norm(cfg, "ln_f")(x)
        if out == "features":
            return x.astype(out_dtype)
        logits = wte.attend(x)  # the head is tied to the token embedding
        return logits.astype(out_dtype)

    def _embed(self, wte: nn.Embed, tokens: jax.Array, attention_mask: jax.Array | None):
        cfg = self.config
        if tokens.ndim != 2:
            raise ValueError(f"tokens must be (batch, seq), got shape {tokens.shape}.")
        if not jnp.issubdtype(tokens.dtype, jnp.integer):
            raise TypeError(f"tokens must be integer ids, got dtype {tokens.dtype}.")
        if tokens.shape[1] > cfg.n_positions:
            raise ValueError(f"sequence length {tokens.shape[1]} > n_positions {cfg.n_positions}.")
        key_mask = _key_mask(attention_mask, tokens.shape)
        if key_mask is None:
            positions = jnp.broadcast_to(jnp.arange(tokens.shape[1]), tokens.shape)
        else:
            positions = jnp.maximum(jnp.cumsum(key_mask, axis=1) - 1, 0)
        wpe = nn.Embed(
            cfg.n_positions,
            cfg.n_embd,
            embedding_init=nn.initializers.normal(0.01),
            name="wpe",
            **_dtypes(cfg),
        )
        return key_mask, wte(tokens) + wpe(positions)


def _key_mask(attention_mask: jax.Array | None, shape: tuple[int, ...]) -> jax.Array | None:
    if attention_mask is None:
        return None
    if attention_mask.shape != tuple(shape):
        raise ValueError(f"attention_mask shape {attention_mask.shape} != tokens shape {shape}.")
    return attention_mask.astype(bool)


def _check_blocks(value: int, n_layer: int, name: str) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= n_layer:
        raise ValueError(f"{name} must be an int in [0, n_layer = {n_layer}], got {value!r}.")
