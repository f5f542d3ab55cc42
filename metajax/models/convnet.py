"""The 4-block ConvNet of the MAML paper (Finn et al., 2017) for Omniglot.

Each block is ``conv 3x3 (SAME) -> normalisation -> ReLU -> 2x2 max-pool``; a linear N-way head
reads the flattened features (a 28x28 input pools to 1x1, so 64 features by default).

Normalisation inside an inner loop is a trap: BatchNorm's running statistics are state that
the inner loop would have to thread through and MAML would have to differentiate. Every option
here is pure, with no ``batch_stats`` collection, so ``model.apply(params, x)`` is a function of
``params`` alone:

- ``"batch"`` (default): batch statistics always, in training and at test time, like the MAML
  reference code. The mean and variance per channel come from the current batch (over batch,
  height and width), so the model is transductive: one example's logits depend on the other
  examples in the same call. Under ``jax.vmap`` over tasks the statistics stay per task.
- ``"layer"``: per-example statistics over height, width and channels (LayerNorm with a
  per-channel scale and bias): not transductive.
- ``"none"``: no normalisation.

``"batch"`` and ``"layer"`` both learn a per-channel scale and bias, so the three choices'
parameter counts differ only by ``2 * filters`` per block for ``"none"``.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Literal

import flax.linen as nn
import jax
import jax.numpy as jnp

Norm = Literal["batch", "layer", "none"]


@dataclasses.dataclass(frozen=True)
class ConvNetConfig:
    """Static configuration of :class:`ConvNet`.

    Attributes:
      ways: N of the N-way head.
      head: False drops the head: the network returns its ``(batch, features)`` embedding
        (what ProtoNets meta-learns: the network MAML adapts, minus the N-way head).
      filters: channels of every conv layer (64 in the paper; fewer for fast tests).
      blocks: number of conv blocks (4 in the paper).
      norm: ``"batch"`` (transductive batch statistics), ``"layer"`` or ``"none"``.
      norm_eps: epsilon added to the variance.
      dtype: compute dtype.
      param_dtype: parameter dtype.
    """

    ways: int = 5
    head: bool = True
    filters: int = 64
    blocks: int = 4
    norm: Norm = "batch"
    norm_eps: float = 1e-5
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    def __post_init__(self):
        if self.norm not in ("batch", "layer", "none"):
            raise ValueError(f"norm must be 'batch', 'layer' or 'none', got {self.norm!r}.")
        for name in ("ways", "filters", "blocks"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}.")


class PureNorm(nn.Module):
    """Stateless normalisation of ``(batch, height, width, channels)`` maps.

    ``"batch"`` normalises each channel over (batch, height, width), ``"layer"`` each example
    over (height, width, channels); both then apply a learned per-channel scale and bias.
    Statistics are computed in float32 (at least) and never stored.
    """

    kind: Norm
    eps: float = 1e-5
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        channels = x.shape[-1]
        scale = self.param("scale", nn.initializers.ones, (channels,), self.param_dtype)
        bias = self.param("bias", nn.initializers.zeros, (channels,), self.param_dtype)
        axes = (0, 1, 2) if self.kind == "batch" else (1, 2, 3)
        acc = jnp.promote_types(jnp.float32, x.dtype)
        xf = x.astype(acc)
        mean = jnp.mean(xf, axis=axes, keepdims=True)
        # Two-pass variance: E[(x - mean)^2] does not cancel catastrophically.
        var = jnp.mean(jnp.square(xf - mean), axis=axes, keepdims=True)
        y = (xf - mean) * jax.lax.rsqrt(var + self.eps)
        return (y * scale.astype(acc) + bias.astype(acc)).astype(self.dtype)


class ConvNet(nn.Module):
    """The MAML paper's Omniglot ConvNet; ``ConvNet(ConvNetConfig(ways=5))``.

    Input ``(batch, height, width, channels)``: float images in ``[0, 1]``, or integer
    (e.g. uint8) images, which are scaled by ``1 / 255`` inside. Omniglot is
    ``(batch, 28, 28, 1)``. Output: logits ``(batch, ways)`` in float32 (float64 for float64
    compute), or the features ``(batch, features)`` with ``head=False``. With
    ``norm="batch"`` the logits of one example depend on the whole batch (see the module
    docstring).
    """

    config: ConvNetConfig

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        cfg = self.config
        if x.ndim != 4:
            raise ValueError(f"images must be (batch, height, width, channels), got {x.shape}.")
        if jnp.issubdtype(x.dtype, jnp.integer):
            x = x.astype(cfg.dtype) / 255.0
        x = x.astype(cfg.dtype)
        dtypes = {"dtype": cfg.dtype, "param_dtype": cfg.param_dtype}
        for i in range(cfg.blocks):
            # The conv bias is redundant before a normalisation; kept to match the reference
            # implementation (and its parameter count).
            x = nn.Conv(cfg.filters, (3, 3), padding="SAME", name=f"conv_{i}", **dtypes)(x)
            if cfg.norm != "none":
                x = PureNorm(cfg.norm, cfg.norm_eps, name=f"norm_{i}", **dtypes)(x)
            x = nn.relu(x)
            # 2x2 max-pool, VALID: 28 -> 14 -> 7 -> 3 -> 1.
            x = nn.max_pool(x, (2, 2), strides=(2, 2), padding="VALID")
        x = x.reshape(x.shape[0], -1)
        if cfg.head:
            x = nn.Dense(cfg.ways, name="head", **dtypes)(x)
        return x.astype(jnp.promote_types(jnp.float32, cfg.dtype))


def convnet_param_count(
    config: ConvNetConfig, image_shape: tuple[int, int, int] = (28, 28, 1)
) -> int:
    """Parameter count of ``ConvNet(config)`` on ``(height, width, channels)`` images.

    Per block ``9 * c_in * filters + filters`` (conv) plus ``2 * filters`` (norm scale and
    bias, unless ``norm="none"``); each block halves height and width (floor); the head has
    ``features * ways + ways``.
    """
    h, w, c_in = image_shape
    total = 0
    for _ in range(config.blocks):
        total += 9 * c_in * config.filters + config.filters
        total += 0 if config.norm == "none" else 2 * config.filters
        c_in, h, w = config.filters, h // 2, w // 2
    return total + (h * w * c_in * config.ways + config.ways if config.head else 0)
