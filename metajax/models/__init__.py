"""Pure Flax models and the loss helpers that turn them into ``loss_fn(params, batch)``."""

from metajax.models.convnet import ConvNet, ConvNetConfig, PureNorm, convnet_param_count
from metajax.models.gpt2 import GPT2_SIZES, GPT2LM, GPT2Config, gpt2_param_count

# safetensors and tokenizers are imported inside these functions, not here.
from metajax.models.gpt2_checkpoint import GPT2Tokenizer, load_gpt2, load_gpt2_tokenizer
from metajax.models.llama import (
    LLAMA_SIZES,
    Llama3RopeScaling,
    LlamaConfig,
    LlamaLM,
    RopeFreqFactors,
    llama_param_count,
)
from metajax.models.losses import (
    accuracy_metric,
    bits_per_token,
    classification_loss,
    mse_loss,
    next_token_loss,
    next_token_metrics,
)
from metajax.models.mlp import MLP
from metajax.models.nnx_adapter import from_nnx, update_nnx

# gguf, safetensors and tokenizers are imported inside these functions, not here.
from metajax.models.pretrained import (
    CheckpointError,
    CheckpointNotFoundError,
    PretrainedTokenizer,
    load_pretrained,
    load_tokenizer,
)
from metajax.models.transformer import (
    Block,
    KVCache,
    SelfAttention,
    TransformerClassifier,
    TransformerConfig,
    TransformerLM,
    Trunk,
    init_kv_cache,
)

__all__ = [
    "MLP",
    "Block",
    "ConvNet",
    "ConvNetConfig",
    "GPT2_SIZES",
    "GPT2Config",
    "GPT2LM",
    "GPT2Tokenizer",
    "KVCache",
    "LLAMA_SIZES",
    "Llama3RopeScaling",
    "LlamaConfig",
    "LlamaLM",
    "PretrainedTokenizer",
    "PureNorm",
    "RopeFreqFactors",
    "SelfAttention",
    "TransformerClassifier",
    "TransformerConfig",
    "TransformerLM",
    "Trunk",
    "CheckpointError",
    "CheckpointNotFoundError",
    "accuracy_metric",
    "bits_per_token",
    "classification_loss",
    "convnet_param_count",
    "from_nnx",
    "gpt2_param_count",
    "init_kv_cache",
    "llama_param_count",
    "load_gpt2",
    "load_gpt2_tokenizer",
    "load_pretrained",
    "load_tokenizer",
    "mse_loss",
    "next_token_loss",
    "next_token_metrics",
    "update_nnx",
]
