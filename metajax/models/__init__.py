"""Pure Flax models and the loss helpers that turn them into ``loss_fn(params, batch)``."""

from metajax.models.convnet import ConvNet, ConvNetConfig, PureNorm, convnet_param_count
from metajax.models.losses import (
    accuracy_metric,
    bits_per_byte,
    classification_loss,
    mse_loss,
    next_token_loss,
    next_token_metrics,
)
from metajax.models.mlp import MLP
from metajax.models.nnx_adapter import from_nnx, update_nnx
from metajax.models.transformer import (
    Block,
    SelfAttention,
    TransformerClassifier,
    TransformerConfig,
    TransformerLM,
    Trunk,
)

__all__ = [
    "MLP",
    "Block",
    "ConvNet",
    "ConvNetConfig",
    "PureNorm",
    "SelfAttention",
    "TransformerClassifier",
    "TransformerConfig",
    "TransformerLM",
    "Trunk",
    "accuracy_metric",
    "bits_per_byte",
    "classification_loss",
    "convnet_param_count",
    "from_nnx",
    "mse_loss",
    "next_token_loss",
    "next_token_metrics",
    "update_nnx",
]
