"""Hugging Face GPT-2 checkpoints and tokenizers, read from local files into :class:`GPT2LM`.

A checkpoint directory is what ``GPT2LMHeadModel.save_pretrained`` writes: ``config.json``
and ``model.safetensors`` (or sharded ``model-*.safetensors`` with
``model.safetensors.index.json``). Weights are read with ``safetensors`` in numpy mode, so
neither torch nor a network connection is needed. The key map is a renaming: HF's ``Conv1D``
already stores kernels ``(in, out)``, as :class:`flax.linen.Dense` does, and LayerNorm's
``weight`` is Flax's ``scale``. Keys may carry the ``transformer.`` prefix of
``GPT2LMHeadModel``; the causal-mask buffers (``attn.bias``, ``attn.masked_bias``) and the
tied ``lm_head.weight`` are skipped.

``safetensors`` and ``tokenizers`` are imported inside the functions that use them, so
importing :mod:`metajax.models` stays light.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from metajax.models.gpt2 import GPT2LM, GPT2Config

# HF activation names that are GPT-2's tanh-approximate GELU.
_TANH_GELU = ("gelu_new", "gelu_pytorch_tanh")
_ARCHITECTURES = ("GPT2LMHeadModel", "GPT2Model")
# Non-parameter buffers and the tied head, present in some checkpoints.
_SKIPPED_SUFFIXES = (".attn.bias", ".attn.masked_bias")
_SKIPPED_KEYS = ("lm_head.weight",)


def _require_file(path: Path) -> Path:
    if not path.is_file():
        raise FileNotFoundError(f"GPT-2 checkpoint file {path.name!r} not found in {path.parent}.")
    return path


def gpt2_config_from_hf(hf: dict[str, Any], **overrides: Any) -> GPT2Config:
    """A :class:`GPT2Config` from the contents of a Hugging Face GPT-2 ``config.json``.

    Args:
      hf: the parsed ``config.json``.
      **overrides: :class:`GPT2Config` fields to set, e.g. ``dtype`` or ``remat``.

    Raises:
      ValueError: the file describes another model type or architecture, or a GPT-2 variant
        this model does not compute (another activation, cross-attention, untied head, ...).
    """
    if hf.get("model_type") != "gpt2":
        raise ValueError(f"config.json: model_type must be 'gpt2', got {hf.get('model_type')!r}.")
    unknown = [a for a in hf.get("architectures") or [] if a not in _ARCHITECTURES]
    if unknown:
        raise ValueError(
            f"config.json: unknown architectures {unknown}; expected one of {list(_ARCHITECTURES)}."
        )
    activation = hf.get("activation_function", "gelu_new")
    if activation not in _TANH_GELU:
        raise ValueError(
            f"config.json: activation_function {activation!r} is not supported; "
            f"expected one of {list(_TANH_GELU)}."
        )
    # Flags of HF's GPT2Config whose non-default values change what the model computes.
    for field, supported in (
        ("scale_attn_weights", True),
        ("scale_attn_by_inverse_layer_idx", False),
        ("add_cross_attention", False),
        ("tie_word_embeddings", True),
    ):
        if hf.get(field, supported) != supported:
            raise ValueError(
                f"config.json: {field}={hf[field]!r} is not supported (needs {supported})."
            )
    fields = dict(
        vocab_size=hf.get("vocab_size", 50257),
        n_positions=hf.get("n_positions", 1024),
        n_embd=hf.get("n_embd", 768),
        n_layer=hf.get("n_layer", 12),
        n_head=hf.get("n_head", 12),
        n_inner=hf.get("n_inner"),
        layer_norm_epsilon=hf.get("layer_norm_epsilon", 1e-5),
    )
    return GPT2Config(**{**fields, **overrides})


def gpt2_key_map(config: GPT2Config) -> dict[str, tuple[str, ...]]:
    """HF state-dict key (without ``transformer.``) -> path into ``params["params"]``.

    Args:
      config: the model configuration (its ``n_layer`` sets the block keys).
    """
    keys = {
        "wte.weight": ("wte", "embedding"),
        "wpe.weight": ("wpe", "embedding"),
        "ln_f.weight": ("ln_f", "scale"),
        "ln_f.bias": ("ln_f", "bias"),
    }
    modules = ("ln_1", "attn.c_attn", "attn.c_proj", "ln_2", "mlp.c_fc", "mlp.c_proj")
    for i in range(config.n_layer):
        for module in modules:
            path = (f"h_{i}", *module.split("."))
            weight = "scale" if module.startswith("ln_") else "kernel"
            keys[f"h.{i}.{module}.weight"] = (*path, weight)
            keys[f"h.{i}.{module}.bias"] = (*path, "bias")
    return keys


def _read_tensors(directory: Path) -> dict[str, np.ndarray]:
    from safetensors.numpy import load_file

    single = directory / "model.safetensors"
    index = directory / "model.safetensors.index.json"
    if not single.is_file() and index.is_file():
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        tensors = {}
        for shard in shards:
            tensors.update(load_file(_require_file(directory / shard)))
        return tensors
    return load_file(_require_file(single))


def gpt2_params_from_tensors(tensors: dict[str, np.ndarray], config: GPT2Config) -> dict[str, Any]:
    """Flax parameters of :class:`GPT2LM` from a HF GPT-2 state dict of numpy arrays.

    Args:
      tensors: key -> array, keys with or without the ``transformer.`` prefix.
      config: the model configuration the arrays must fit.

    Returns:
      ``{"params": ...}`` with every leaf a ``config.param_dtype`` array of the shape
      ``model.init`` gives.

    Raises:
      ValueError: a key is missing or unknown, or an array has the wrong shape.
    """
    by_key = {}
    for key, value in tensors.items():
        short = key.removeprefix("transformer.")
        if short in _SKIPPED_KEYS or short.endswith(_SKIPPED_SUFFIXES):
            continue
        by_key[short] = value
    key_map = gpt2_key_map(config)
    missing = sorted(set(key_map) - set(by_key))
    if missing:
        raise ValueError(f"GPT-2 checkpoint is missing keys: {missing}.")
    unknown = sorted(set(by_key) - set(key_map))
    if unknown:
        raise ValueError(f"GPT-2 checkpoint has unknown keys: {unknown}.")

    shapes = jax.eval_shape(
        GPT2LM(config).init, jax.random.key(0), jax.ShapeDtypeStruct((1, 1), jnp.int32)
    )["params"]
    params: dict[str, Any] = {}
    for key, path in key_map.items():
        want = shapes
        for name in path:
            want = want[name]
        value = by_key[key]
        if tuple(value.shape) != tuple(want.shape):
            raise ValueError(
                f"GPT-2 checkpoint key {key!r} has shape {tuple(value.shape)}, the model "
                f"expects {tuple(want.shape)}."
            )
        node = params
        for name in path[:-1]:
            node = node.setdefault(name, {})
        node[path[-1]] = jnp.asarray(value, config.param_dtype)
    return {"params": params}


def load_gpt2(directory: str | Path, **overrides: Any) -> tuple[GPT2LM, dict[str, Any]]:
    """Reads a Hugging Face GPT-2 checkpoint directory into :class:`GPT2LM`.

    Args:
      directory: holds ``config.json`` and ``model.safetensors`` (as written by
        ``save_pretrained``), or a sharded ``model.safetensors.index.json`` and its shards.
      **overrides: :class:`GPT2Config` fields, e.g. ``dtype=jnp.bfloat16`` or ``remat=True``.

    Returns:
      ``(model, params)``: ``model.apply(params, tokens)`` maps ``(batch, seq)`` int tokens
      to ``(batch, seq, vocab_size)`` logits.

    Raises:
      FileNotFoundError: a file is missing.
      ValueError: an unsupported config, or a missing, unknown or misshapen weight.
    """
    directory = Path(directory)
    hf = json.loads(_require_file(directory / "config.json").read_text())
    config = gpt2_config_from_hf(hf, **overrides)
    params = gpt2_params_from_tensors(_read_tensors(directory), config)
    return GPT2LM(config), params


class GPT2Tokenizer:
    """A byte-level BPE tokenizer: ``encode(str) -> list[int]``, ``decode(ids) -> str``.

    Wraps a ``tokenizers.Tokenizer``; no special tokens are added by ``encode``.
    """

    def __init__(self, tokenizer: Any):
        self.tokenizer = tokenizer

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text``."""
        if not isinstance(text, str):
            raise TypeError(f"encode takes a str, got {type(text).__name__}.")
        return list(self.tokenizer.encode(text, add_special_tokens=False).ids)

    def decode(self, ids: Any) -> str:
        """The text of a sequence of token ids (a list or a 1-D integer array)."""
        return self.tokenizer.decode([int(i) for i in ids], skip_special_tokens=False)

    @property
    def vocab_size(self) -> int:
        """Number of token ids, special tokens included."""
        return self.tokenizer.get_vocab_size(with_added_tokens=True)

    def token_id(self, token: str) -> int:
        """The id of one token string, e.g. ``"<|endoftext|>"``."""
        found = self.tokenizer.token_to_id(token)
        if found is None:
            raise ValueError(f"token {token!r} is not in the vocabulary.")
        return found


def load_gpt2_tokenizer(directory: str | Path) -> GPT2Tokenizer:
    """Reads a GPT-2 tokenizer from local files, offline.

    Args:
      directory: holds ``tokenizer.json``, or else ``vocab.json`` and ``merges.txt``
        (GPT-2's byte-level BPE; ``<|endoftext|>`` becomes a special token when present).

    Raises:
      FileNotFoundError: neither form is present.
    """
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

    directory = Path(directory)
    if (directory / "tokenizer.json").is_file():
        return GPT2Tokenizer(Tokenizer.from_file(str(directory / "tokenizer.json")))
    vocab, merges = directory / "vocab.json", directory / "merges.txt"
    if not (vocab.is_file() and merges.is_file()):
        raise FileNotFoundError(
            f"no GPT-2 tokenizer in {directory}: needs tokenizer.json, or vocab.json and "
            "merges.txt."
        )
    tokenizer = Tokenizer(models.BPE.from_file(str(vocab), str(merges)))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    if tokenizer.token_to_id("<|endoftext|>") is not None:
        tokenizer.add_special_tokens([AddedToken("<|endoftext|>", special=True)])
    return GPT2Tokenizer(tokenizer)
