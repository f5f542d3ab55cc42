"""A frozen trunk's hidden states, computed once per token sequence and kept on disk.

The bottom blocks of a pretrained model that neither adapt nor meta-train (the *trunk*,
``model.trunk(tokens, blocks=k)``) give the same hidden states for a sequence at every
meta-step, so :class:`TrunkCache` computes each distinct sequence's states once, in jitted
batches, and keeps them as one ``.npy`` file per sequence. Meta-learning then runs only the
top blocks (``model.top(hidden, start=k)``).

Keys: a folder per (model files' digest, model class, frozen blocks, compute dtype), and in
it a file per sequence named by the SHA-256 of its int32 token ids (the tokenizer's output
for the text at the family's sequence length: two texts that encode to the same ids have the
same states). Files are written to a temporary name and renamed, so a reader in another
process or run never sees half a file, and two writers of one key write the same bytes.
Where: ``$METAJAX_TRUNK_CACHE``, else ``$METAJAX_CACHE_DIR/trunk``, else
``~/.cache/metajax/trunk``.

States are stored and returned as float32 (``promote(float32, dtype)`` of the trunk: bf16
compute round-trips exactly), shape ``(..., seq, width)`` for tokens ``(..., seq)``.
"""

from __future__ import annotations

import collections
import hashlib
import os
import threading
import uuid
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

# Rows per jitted trunk call: one compiled shape, the last batch padded.
BATCH = 32
# Hidden states kept in memory besides the files (least recently used dropped first).
MEMORY_BYTES = 1 << 30


def default_directory() -> Path:
    """``$METAJAX_TRUNK_CACHE``, else ``$METAJAX_CACHE_DIR/trunk``, else
    ``~/.cache/metajax/trunk``."""
    override = os.environ.get("METAJAX_TRUNK_CACHE")
    if override:
        return Path(override).expanduser()
    root = os.environ.get("METAJAX_CACHE_DIR")
    if root and root.lower() != "none":
        return Path(root).expanduser() / "trunk"
    return Path("~/.cache/metajax/trunk").expanduser()


def file_digest(paths: list[Path]) -> str:
    """SHA-256 over the names and contents of model files (sorted), read in 1 MiB pieces."""
    h = hashlib.sha256()
    for path in sorted(Path(p) for p in paths):
        h.update(path.name.encode() + b"\0")
        with open(path, "rb") as f:
            while piece := f.read(1 << 20):
                h.update(piece)
    return h.hexdigest()


def params_digest(params: Any) -> str:
    """SHA-256 of a parameter tree's paths, shapes, dtypes and values (models without files)."""
    h = hashlib.sha256()
    for path, leaf in jax.tree_util.tree_leaves_with_path(params):
        leaf = np.asarray(leaf)
        h.update(f"{jax.tree_util.keystr(path)}|{leaf.shape}|{leaf.dtype}".encode())
        h.update(np.ascontiguousarray(leaf).tobytes())
    return h.hexdigest()


class TrunkCache:
    """``hidden(tokens)``: a frozen trunk's output for host token arrays, cached.

    Args:
      model: a flax model with a ``trunk(tokens, attention_mask=None, *, blocks)`` method.
      params: the parameters ``trunk`` needs (at least the embeddings and blocks
        ``< blocks``).
      blocks: the frozen blocks run after the embeddings.
      digest: identifies the weights (:func:`file_digest` of the model's files, or
        :func:`params_digest`); part of the key with ``blocks`` and the compute dtype.
      directory: the cache root; default :func:`default_directory`.

    Attributes:
      computed: sequences whose states this object computed (not found in memory or on
        disk).
      read: sequences read from disk.
      folder: where this trunk's files are.
    """

    def __init__(
        self,
        model: Any,
        params: Any,
        blocks: int,
        digest: str,
        directory: str | Path | None = None,
    ):
        dtype = jnp.dtype(getattr(model.config, "dtype", jnp.float32)).name
        name = f"{digest}|{type(model).__name__}|blocks={blocks}|dtype={dtype}"
        key = hashlib.sha256(name.encode()).hexdigest()[:32]
        self.folder = Path(directory or default_directory()).expanduser() / key
        self.params = params
        self._trunk = jax.jit(lambda p, t: model.apply(p, t, blocks=blocks, method="trunk"))
        self._memory: collections.OrderedDict[str, np.ndarray] = collections.OrderedDict()
        self._memory_bytes = 0
        self._lock = threading.Lock()
        self.computed = 0
        self.read = 0

    def hidden(self, tokens: Any) -> np.ndarray:
        """float32 ``(..., seq, width)`` states of int tokens ``(..., seq)`` (numpy or jax).

        Sequences found in memory or on disk are not recomputed; the missing distinct ones are
        computed in jitted batches of :data:`BATCH` and written.
        """
        tokens = np.asarray(tokens)
        if tokens.ndim < 1 or not np.issubdtype(tokens.dtype, np.integer):
            raise TypeError(f"tokens must be an int array (..., seq), got {tokens.dtype}.")
        rows = np.ascontiguousarray(tokens.reshape(-1, tokens.shape[-1]), np.int32)
        keys = [hashlib.sha256(row.tobytes()).hexdigest() for row in rows]
        with self._lock:
            found = {k: self._lookup(k) for k in dict.fromkeys(keys)}
            missing = [k for k, v in found.items() if v is None]
            if missing:
                first = {k: i for i, k in reversed(list(enumerate(keys)))}
                found.update(self._compute(missing, rows[[first[k] for k in missing]]))
        out = np.stack([found[k] for k in keys])
        return out.reshape(*tokens.shape, out.shape[-1])

    def store(self, tokens: Any, states: Any) -> None:
        """Writes ``states`` float32 ``(n, seq, width)`` of int ``tokens (n, seq)`` computed
        elsewhere (a pass that also reads other layers), so :meth:`hidden` finds them; the
        caller vouches that they are this trunk's output."""
        tokens, states = np.asarray(tokens, np.int32), np.asarray(states, np.float32)
        if tokens.ndim != 2 or states.shape[:2] != tokens.shape:
            raise ValueError(f"tokens {tokens.shape} and states {states.shape} do not match.")
        with self._lock:
            for row, value in zip(tokens, states):
                key = hashlib.sha256(np.ascontiguousarray(row).tobytes()).hexdigest()
                if not self._path(key).is_file():
                    self._write(key, np.ascontiguousarray(value))

    def _path(self, key: str) -> Path:
        return self.folder / key[:2] / f"{key}.npy"

    def _lookup(self, key: str) -> np.ndarray | None:
        if key in self._memory:
            self._memory.move_to_end(key)
            return self._memory[key]
        path = self._path(key)
        if not path.is_file():
            return None
        value = np.load(path)
        self.read += 1
        self._remember(key, value)
        return value

    def _compute(self, keys: list[str], rows: np.ndarray) -> dict[str, np.ndarray]:
        out = {}
        for lo in range(0, len(keys), BATCH):
            chunk = rows[lo : lo + BATCH]
            # Padded to the next power of two (at most BATCH): a few missing sequences cost
            # a few rows, not BATCH, for at most log2(BATCH) + 1 compiled shapes.
            size = min(BATCH, 1 << (len(chunk) - 1).bit_length())
            padded = np.concatenate([chunk, np.repeat(chunk[:1], size - len(chunk), 0)])
            states = np.asarray(self._trunk(self.params, padded), np.float32)[: len(chunk)]
            for key, value in zip(keys[lo : lo + BATCH], states):
                value = np.ascontiguousarray(value)
                self._write(key, value)
                self._remember(key, value)
                out[key] = value
        self.computed += len(keys)
        return out

    def _write(self, key: str, value: np.ndarray) -> None:
        path = self._path(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex}.tmp")
        with open(tmp, "wb") as f:
            np.save(f, value)
        os.replace(tmp, path)  # atomic: readers see the whole file or none

    def _remember(self, key: str, value: np.ndarray) -> None:
        self._memory[key] = value
        self._memory_bytes += value.nbytes
        while self._memory_bytes > MEMORY_BYTES and len(self._memory) > 1:
            _, dropped = self._memory.popitem(last=False)
            self._memory_bytes -= dropped.nbytes
