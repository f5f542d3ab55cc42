"""llama.cpp GGUF files read into Hugging Face's layout: weights, config and tokenizer.

A GGUF file (read with the ``gguf`` package, numpy only) holds llama.cpp's tensor names, ggml
quantisation blocks, metadata keys (``llama.block_count``, ``tokenizer.ggml.tokens``, ...)
and, for the ``llama`` architecture, Q and K projections whose rows llama.cpp's converter
permuted for its interleaved RoPE (``convert_hf_to_gguf.py``, ``LlamaModel.permute``). This
module turns one into what a Hugging Face folder holds: a state dict with HF's keys and
``(out, in)`` kernels in float32 (dequantized with ``gguf.quants.dequantize``, the rows
un-permuted), an HF-style config dict, and a ``tokenizers.Tokenizer`` rebuilt from the
metadata. Without the un-permutation the logits are wrong with no error.

Dequantizing a file and parsing its 49k-token vocabulary takes seconds, so the result
(float32 state dict, config, tokenizer) is cached as safetensors + JSON (:func:`cached_gguf`)
under :func:`pretrained_cache_dir`, keyed by the file's size and the SHA-256 of its first and
last MiB: the first MiB holds the metadata and the tensor directory, the last the final
tensors' data, so a re-quantisation or an edit changes the key, while hashing a whole
multi-GB file on every load would cost about a second per GB. The path and mtime are left
out on purpose: a reinstalled wheel with the same file still hits the cache.

It also defines the loader's named errors, shared with :mod:`metajax.models.pretrained`.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any

import numpy as np


class CheckpointError(ValueError):
    """A checkpoint that cannot be read into the model (base class of the named errors)."""


class CheckpointNotFoundError(FileNotFoundError):
    """A checkpoint file, folder or package that is not there."""


class MissingTensorError(CheckpointError):
    """A weight the model needs is not in the checkpoint."""


class UnexpectedTensorError(CheckpointError):
    """The checkpoint holds a weight the model has no place for."""


class TensorShapeError(CheckpointError):
    """A weight's shape differs from the model's."""


class UnsupportedArchitectureError(CheckpointError):
    """A ``model_type`` / ``general.architecture`` this loader does not map."""


class UnsupportedQuantizationError(CheckpointError):
    """A GGUF tensor type that cannot be dequantized here."""


class UnsupportedConfigError(CheckpointError):
    """A config value or metadata key that is missing, or a variant the model does not compute."""


GGUF_ARCHITECTURES = ("llama", "qwen2")
# GGUF tensor name (without "blk.{i}.") -> HF state-dict key (without "model.layers.{i}.").
GGUF_BLOCK_NAMES = {
    "attn_norm.weight": "input_layernorm.weight",
    "attn_q.weight": "self_attn.q_proj.weight",
    "attn_k.weight": "self_attn.k_proj.weight",
    "attn_v.weight": "self_attn.v_proj.weight",
    "attn_q.bias": "self_attn.q_proj.bias",
    "attn_k.bias": "self_attn.k_proj.bias",
    "attn_v.bias": "self_attn.v_proj.bias",
    "attn_output.weight": "self_attn.o_proj.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "ffn_gate.weight": "mlp.gate_proj.weight",
    "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
}
GGUF_GLOBAL_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
# tokenizer.ggml.pre -> the split regex applied before the byte-level map (llama.cpp's
# llama-vocab.cpp and the models' tokenizer.json). None: GPT-2's own regex inside ByteLevel.
_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
PRE_TOKENIZERS = {
    "default": None,
    "gpt2": None,
    "smollm": "digits",  # SmolLM2: every digit its own token, then GPT-2's regex
    "llama-bpe": _LLAMA3_SPLIT,
    "llama3": _LLAMA3_SPLIT,
    "qwen2": _QWEN2_SPLIT,
}
_CONTROL, _USER_DEFINED = 3, 4  # tokenizer.ggml.token_type values (llama.cpp's TokenType)


def unpermute_rows(w: np.ndarray, n_head: int) -> np.ndarray:
    """Inverse of llama.cpp's Q/K row permutation.

    llama.cpp writes ``w.reshape(n_head, 2, rows // n_head // 2, *rest).swapaxes(1, 2)``:
    within each head, the rotate-half pairs ``(i, i + d/2)`` of HF become adjacent rows. This
    swaps them back.

    Args:
      w: ``(n_head * head_dim, ...)`` rows as stored in the GGUF file (HF's ``(out, in)``).
      n_head: query heads for Q, key/value heads for K.
    """
    if w.shape[0] % (2 * n_head):
        raise TensorShapeError(f"cannot un-permute {w.shape[0]} rows over {n_head} heads.")
    half = w.shape[0] // n_head // 2
    return w.reshape(n_head, half, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _float32_value(x: float) -> float:
    # GGUF stores eps and theta as float32: 1e-5 comes back as 9.99999974e-06. Use the
    # shortest decimal that rounds to the same float32, as the original config.json had.
    return float(str(np.float32(x)))


def _field(reader, key: str, default: Any = ..., path: Path | None = None) -> Any:
    field = reader.fields.get(key)
    if field is None:
        if default is ...:
            raise UnsupportedConfigError(f"GGUF file {path}: metadata key {key!r} is missing.")
        return default
    return field.contents()


def _dequantize(tensor, path: Path) -> np.ndarray:
    from gguf import GGMLQuantizationType as T
    from gguf import quants

    try:
        out = quants.dequantize(np.asarray(tensor.data), tensor.tensor_type)
    except NotImplementedError:
        raise UnsupportedQuantizationError(
            f"GGUF file {path.name}: tensor {tensor.name!r} has type {tensor.tensor_type.name}, "
            "which cannot be dequantized (F32, F16, BF16, Q4_0, Q4_1, Q5_0, Q5_1, Q8_0 and the "
            "K-quants can)."
        ) from None
    if tensor.tensor_type not in (T.F32, T.F16) and out.dtype != np.float32:
        out = out.astype(np.float32)
    # The reader's numpy shape is ggml's reversed: (rows, row length) = HF's (out, in).
    shape = tuple(int(n) for n in reversed(tensor.shape.tolist()))
    return np.ascontiguousarray(out, dtype=np.float32).reshape(shape)


def read_gguf(
    path: str | Path, tensors: bool = True
) -> tuple[dict[str, np.ndarray], dict[str, Any], dict[str, Any]]:
    """Reads a GGUF file of the ``llama`` or ``qwen2`` architecture.

    Args:
      path: the ``.gguf`` file.
      tensors: False skips the dequantization (an empty state dict comes back).

    Returns:
      ``(tensors, hf_config, tokenizer_metadata)``: HF state-dict key -> float32
      ``(out, in)`` array (Q/K rows un-permuted for ``llama``); a config dict with HF's
      field names and ``model_type`` (and ``rope_freq_factors``: ``rope_freqs.weight``, the
      Llama 3 RoPE scaling as llama.cpp stores it, or None); the ``tokenizer.ggml.*``
      fields (keys without the prefix) for :func:`tokenizer_from_metadata`.

    Raises:
      CheckpointNotFoundError, UnsupportedArchitectureError, UnsupportedConfigError,
      UnsupportedQuantizationError, UnexpectedTensorError, TensorShapeError.
    """
    import gguf

    path = Path(path)
    if not path.is_file():
        raise CheckpointNotFoundError(f"GGUF file {path} not found.")
    try:
        reader = gguf.GGUFReader(path)
    except (ValueError, OSError) as e:
        raise CheckpointError(f"{path} is not a readable GGUF file: {e}") from None
    arch = _field(reader, "general.architecture", path=path)
    if arch not in GGUF_ARCHITECTURES:
        raise UnsupportedArchitectureError(
            f"GGUF file {path.name}: architecture {arch!r} is not supported; "
            f"expected one of {list(GGUF_ARCHITECTURES)}."
        )
    heads = int(_field(reader, f"{arch}.attention.head_count", path=path))
    kv_heads = int(_field(reader, f"{arch}.attention.head_count_kv", heads))
    hidden = int(_field(reader, f"{arch}.embedding_length", path=path))
    tokens = _field(reader, "tokenizer.ggml.tokens", path=path)
    names = {t.name for t in reader.tensors}
    head_dim = int(_field(reader, f"{arch}.attention.key_length", 0)) or int(
        _field(reader, f"{arch}.rope.dimension_count", 0)
    )
    config = {
        "model_type": arch,
        "vocab_size": int(_field(reader, f"{arch}.vocab_size", len(tokens))),
        "hidden_size": hidden,
        "intermediate_size": int(_field(reader, f"{arch}.feed_forward_length", path=path)),
        "num_hidden_layers": int(_field(reader, f"{arch}.block_count", path=path)),
        "num_attention_heads": heads,
        "num_key_value_heads": kv_heads,
        "head_dim": head_dim if head_dim and head_dim != hidden // heads else None,
        "rms_norm_eps": _float32_value(
            _field(reader, f"{arch}.attention.layer_norm_rms_epsilon", path=path)
        ),
        "rope_theta": _float32_value(_field(reader, f"{arch}.rope.freq_base", 10000.0)),
        "max_position_embeddings": int(_field(reader, f"{arch}.context_length", path=path)),
        "tie_word_embeddings": "output.weight" not in names,
        "attention_bias": "blk.0.attn_q.bias" in names,
        "rope_freq_factors": None,
    }
    state: dict[str, np.ndarray] = {}
    for tensor in reader.tensors if tensors else ():
        name = tensor.name
        if name == "rope_freqs.weight":  # Llama 3 RoPE scaling, one divisor per frequency
            config["rope_freq_factors"] = [float(f) for f in _dequantize(tensor, path)]
            continue
        if name in GGUF_GLOBAL_NAMES:
            key = GGUF_GLOBAL_NAMES[name]
        else:
            parts = name.split(".", 2)
            if len(parts) != 3 or parts[0] != "blk" or parts[2] not in GGUF_BLOCK_NAMES:
                raise UnexpectedTensorError(f"GGUF file {path.name}: unknown tensor {name!r}.")
            key = f"model.layers.{parts[1]}.{GGUF_BLOCK_NAMES[parts[2]]}"
        value = _dequantize(tensor, path)
        if arch == "llama" and name.endswith(("attn_q.weight", "attn_k.weight")):
            value = unpermute_rows(value, heads if "attn_q" in name else kv_heads)
        state[key] = value
    tokenizer = {
        key.removeprefix("tokenizer.ggml."): _field(reader, key)
        for key in reader.fields
        if key.startswith("tokenizer.ggml.")
    }
    return state, config, tokenizer


def tokenizer_from_metadata(meta: dict[str, Any], source: str = "GGUF file"):
    """A ``tokenizers.Tokenizer`` from a GGUF file's ``tokenizer.ggml.*`` fields.

    Byte-level BPE (``model == "gpt2"``): the vocabulary and merges as stored, the split of
    ``pre`` (:data:`PRE_TOKENIZERS`) then GPT-2's byte-to-unicode map, control tokens
    (type 3) as special tokens and user-defined ones (type 4) as added tokens, matched whole.

    Raises:
      UnsupportedConfigError: another tokenizer model or pre-tokenizer, or no vocabulary.
    """
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers

    kind = meta.get("model")
    if kind != "gpt2":
        raise UnsupportedConfigError(
            f"{source}: tokenizer.ggml.model {kind!r} is not supported (only byte-level BPE, "
            "'gpt2')."
        )
    pre = meta.get("pre", "default")
    if pre not in PRE_TOKENIZERS:
        raise UnsupportedConfigError(
            f"{source}: tokenizer.ggml.pre {pre!r} is not supported; "
            f"known: {sorted(PRE_TOKENIZERS)}."
        )
    if "tokens" not in meta or "merges" not in meta:
        raise UnsupportedConfigError(f"{source}: tokenizer.ggml.tokens or merges is missing.")
    tokens = list(meta["tokens"])
    vocab = {token: i for i, token in enumerate(tokens)}
    merges = [tuple(m.split(" ", 1)) for m in meta["merges"]]
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=merges))
    split = PRE_TOKENIZERS[pre]
    if split is None:
        tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    elif split == "digits":
        tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
            [
                pre_tokenizers.Digits(individual_digits=True),
                pre_tokenizers.ByteLevel(add_prefix_space=False),
            ]
        )
    else:
        tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
            [
                pre_tokenizers.Split(Regex(split), behavior="isolated"),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
            ]
        )
    tokenizer.decoder = decoders.ByteLevel()
    types = list(meta.get("token_type") or [])
    special = [t for t, k in zip(tokens, types) if k == _CONTROL]
    user = [t for t, k in zip(tokens, types) if k == _USER_DEFINED]
    tokenizer.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in special])
    tokenizer.add_tokens([AddedToken(t, special=False, normalized=False) for t in user])
    return tokenizer


AUTO = "auto"
_CACHE_FORMAT = 1  # bump when what is cached changes


def pretrained_cache_dir() -> Path | None:
    """Where dequantized GGUF files are cached; None when caching is off.

    ``$METAJAX_PRETRAINED_CACHE`` (``none`` turns it off), else ``metajax-pretrained`` inside
    ``$METAJAX_CACHE_DIR`` (the compilation cache, as the step cache does), else
    ``~/.cache/metajax/pretrained``.
    """
    explicit = os.environ.get("METAJAX_PRETRAINED_CACHE")
    if explicit:
        return None if explicit.lower() == "none" else Path(explicit).expanduser()
    base = os.environ.get("METAJAX_CACHE_DIR")
    if base and base.lower() != "none":
        return Path(base).expanduser() / "metajax-pretrained"
    return Path("~/.cache/metajax/pretrained").expanduser()


def _cache_key(path: Path) -> str:
    size = path.stat().st_size
    digest = hashlib.sha256(f"{_CACHE_FORMAT}:{size}".encode())
    with open(path, "rb") as f:
        digest.update(f.read(1 << 20))
        f.seek(max(size - (1 << 20), 0))
        digest.update(f.read(1 << 20))
    return digest.hexdigest()[:32]


def _write_entry(entry: Path, path: Path) -> None:
    """Dequantizes ``path`` into the cache folder ``entry`` (tensors, config, tokenizer)."""
    from safetensors.numpy import save_file

    tensors, config, token_meta = read_gguf(path)
    tokenizer = tokenizer_from_metadata(token_meta, f"GGUF file {path.name}")
    special = {k: token_meta.get(f"{k}_token_id") for k in ("bos", "eos", "padding")}
    # Written into a fresh folder then renamed: a killed write never looks complete.
    entry.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=entry.parent, prefix=".tmp-"))
    save_file(tensors, tmp / "tensors.safetensors")
    meta = {"config": config, "special_ids": special, "source": str(path)}
    (tmp / "meta.json").write_text(json.dumps(meta))
    (tmp / "tokenizer.json").write_text(tokenizer.to_str())
    try:
        tmp.rename(entry)
    except OSError:  # another process finished first: keep its copy
        for f in tmp.iterdir():
            f.unlink()
        tmp.rmdir()


def cached_gguf(path: Path, cache_dir: str | Path | None = AUTO) -> Path | None:
    """The cache folder of ``path``, filled now if absent; None when caching is off.

    It holds ``tensors.safetensors`` (:func:`read_gguf`'s float32 state dict),
    ``meta.json`` (the config and the special token ids) and ``tokenizer.json``.

    Args:
      path: the ``.gguf`` file.
      cache_dir: the cache's root; ``"auto"``: :func:`pretrained_cache_dir`; None: off.
    """
    cache = pretrained_cache_dir() if cache_dir == AUTO else cache_dir
    if cache is None:
        return None
    entry = Path(cache).expanduser() / _cache_key(path)
    if not (entry / "meta.json").is_file():
        _write_entry(entry, path)
    return entry
