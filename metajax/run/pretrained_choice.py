"""A text family's model choice: its own Transformer (``scratch``) or a pretrained model.

Every text family's task config inherits :class:`ModelChoice`, so ``task.model``,
``task.adapt``, ``task.lora_*``, ``task.freeze_base``, ``task.dtype``, ``task.remat`` and
``task.trainable_blocks`` mean the same everywhere; this module is the one place that loads a
pretrained model and its tokenizer and wires its LoRA factors (:class:`Pretrained`).

Meta-parameters of a pretrained model: ``{"base": weights, "lora": factors}``
(:class:`metajax.lora.LoRA`, zero-initialised ``b``: the first meta-step starts from the
pretrained model itself). The inner loop adapts the factors (``adapt="lora"``), the factors
and the norms (``"lora+norm"``) or every leaf (``"all"``); with ``freeze_base`` the outer loop
trains only the factors (and the norms for ``lora+norm``) and whatever lies outside the LoRA
dict (a classification head).

With ``trainable_blocks=k`` the bottom ``n - k`` blocks and the embeddings form a frozen
trunk: they are not in the meta-parameters at all (no factors, no gradients, no optimizer
state, not in checkpoints), and their output for each distinct sequence is computed once
and cached on disk (:class:`metajax.run.trunk_cache.TrunkCache`). Batches then carry the
trunk's hidden states (float32 ``(n, seq, width)``): a next-token model input becomes
``(tokens, states)`` (the tokens are the targets), a classifier's the states instead of the
tokens; the loss runs ``model.top(hidden, start=n - k)`` only. The tied head of the top
reads its own copy of the token embedding, which ``adapt="all"`` may move while the
trunk's stays frozen.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import re
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from metajax import lora as lora_lib
from metajax.models.decoding import greedy_decode, greedy_decode_cached, lm_decoder
from metajax.models.losses import next_token_byte_metrics, next_token_loss, next_token_metrics
from metajax.run.config import Config, ConfigError
from metajax.run.trunk_cache import TrunkCache, file_digest, params_digest
from metajax.tasks.base import TaskSource
from metajax.types import Task

SCRATCH = "scratch"
ADAPT_MODES = ("lora", "lora+norm", "all")
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
# LoRA on every attention and MLP kernel, by model class.
DEFAULT_TARGETS = {
    "GPT2LM": r"(c_attn|c_proj|c_fc)/kernel",
    "LlamaLM": r"(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)/kernel",
}
# Document boundaries the families use as start, end and padding token, in order of choice.
_START_TOKENS = ("<|endoftext|>", "<|begin_of_text|>", "<s>", "<bos>")
_END_TOKENS = ("<|endoftext|>", "<|end_of_text|>", "</s>", "<eos>")


@dataclasses.dataclass(frozen=True)
class ModelChoice:
    """The model fields every text family's task config shares (see :data:`ATTRIBUTES`)."""

    model: str = SCRATCH
    trainable_blocks: int | None = None
    num_blocks: int | None = None
    adapt: str = "lora"
    lora_rank: int = 8
    lora_alpha: float = 16.0
    lora_targets: str | None = None
    freeze_base: bool = True
    dtype: str = "float32"
    remat: bool = False


# Appended to each family's task config docstring, for `metajax show`.
ATTRIBUTES = """
      model: scratch (the family's own Transformer, sized by the scratch fields) or a
        pretrained model: a Hugging Face folder (gpt2, llama, qwen2), a GGUF file or a
        registered name such as smollm2-135m; its tokenizer encodes the text and LoRA
        factors are meta-learned. The fields below need a pretrained model.
      trainable_blocks: the top k blocks adapt and meta-train; the embeddings and the
        blocks below are frozen, computed once per text and cached on disk
        ($METAJAX_CACHE_DIR/trunk); none: every block.
      num_blocks: a classifier's features are the raw states after the model's first n
        blocks (no final norm; the blocks above are dropped, trainable_blocks counts down
        from block n); none: the final normed states of every block.
      adapt: what the inner loop adapts: lora, lora+norm (the factors and the norms) or
        all.
      lora_rank: rank of the LoRA factors (>= 1).
      lora_alpha: LoRA scale numerator: updates are lora_alpha / lora_rank * A @ B (> 0).
      lora_targets: regex of the kernel paths that get factors; none: every attention and
        MLP kernel of the architecture.
      freeze_base: the outer loop trains only the factors (the norms too for lora+norm,
        and a classification head); false: every weight of the trainable blocks.
      dtype: compute dtype, float32 or bfloat16 (the weights stay float32).
      remat: recompute each block in the backward pass instead of storing it.
"""


def documented(cls: type) -> type:
    """Appends :data:`ATTRIBUTES` to a task config's docstring (a class decorator)."""
    cls.__doc__ = (cls.__doc__ or "").rstrip() + "\n" + ATTRIBUTES
    return cls


def check(task: ModelChoice) -> None:
    """Range checks that need no files; with ``model=scratch`` every other field of
    :class:`ModelChoice` must keep its default.

    Raises:
      ConfigError: one line naming the field.
    """
    if not isinstance(task.model, str) or not task.model:
        raise ConfigError(f"task.model={task.model!r}: give scratch or a pretrained model.")
    if task.model == SCRATCH:
        for field in dataclasses.fields(ModelChoice):
            value = getattr(task, field.name)
            if field.name != "model" and value != field.default:
                raise ConfigError(
                    f"task.{field.name}={value!r} sets up a pretrained model, but "
                    "task.model=scratch trains the family's own Transformer: set task.model "
                    f"or leave task.{field.name} at {field.default!r}."
                )
        return
    if task.adapt not in ADAPT_MODES:
        raise ConfigError(f"task.adapt={task.adapt!r}: choose one of {', '.join(ADAPT_MODES)}.")
    if isinstance(task.lora_rank, bool) or task.lora_rank < 1:
        raise ConfigError(f"task.lora_rank={task.lora_rank} must be an int >= 1.")
    if not (math.isfinite(task.lora_alpha) and task.lora_alpha > 0):
        raise ConfigError(f"task.lora_alpha={task.lora_alpha} must be a positive number.")
    if task.lora_targets is not None:
        try:
            re.compile(task.lora_targets)
        except re.error as e:
            raise ConfigError(
                f"task.lora_targets={task.lora_targets!r} is not a regex: {e}."
            ) from None
    if task.dtype not in DTYPES:
        raise ConfigError(f"task.dtype={task.dtype!r}: choose one of {', '.join(DTYPES)}.")
    for name in ("trainable_blocks", "num_blocks"):
        value = getattr(task, name)
        if value is not None and (isinstance(value, bool) or value < 1):
            raise ConfigError(f"task.{name}={value} must be >= 1 (or none).")


def _load(name: str, dtype: Any, remat: bool) -> tuple[Any, Any, Any, list[Path]]:
    """``(model, params, tokenizer, files)``: the pretrained model ``task.model`` names and the
    files its weights come from (for the trunk cache's key)."""
    from metajax.models.pretrained import load_pretrained, load_tokenizer, resolve_pretrained

    try:
        path = resolve_pretrained(name)
        model, params = load_pretrained(name, dtype=dtype, remat=remat)
        tokenizer = load_tokenizer(name)
    except (OSError, ValueError, KeyError) as e:
        raise ConfigError(f"task.model={name!r}: {e}".replace("\n", " ")) from None
    files = [path] if path.is_file() else sorted(p for p in path.iterdir() if p.is_file())
    return model, params, tokenizer, files


def _config_value(model: Any, *names: str) -> int:
    for name in names:
        value = getattr(model.config, name, None)
        if value is not None:
            return int(value)
    raise ConfigError(f"{type(model).__name__}'s config has none of {names}.")


def _token_id(tokenizer: Any, candidates: tuple[str, ...], what: str, model: str) -> int:
    for token in candidates:
        try:
            return int(tokenizer.token_id(token))
        except (ValueError, KeyError):
            continue
    # The checkpoint's own ids when no document-boundary token has a known name.
    found = getattr(tokenizer, "bos_id" if what == "start" else "eos_id", None)
    if found is not None:
        return int(found)
    raise ConfigError(f"task.model={model!r}: the tokenizer has no {what} token {candidates}.")


def _used(model: Any, method: str, example: Any, **kwargs: Any) -> Any:
    """The parameter tree (shapes only) a method of ``model`` creates: what it needs."""
    init = lambda x: model.init(jax.random.key(0), x, method=method, **kwargs)
    return jax.eval_shape(init, example)


def _union(base: Any, top: Any) -> Any:
    """Two parameter trees in one: ``top``'s leaves where both have a path."""
    if not (isinstance(base, dict) and isinstance(top, dict)):
        return top
    return {**base, **{k: _union(base[k], v) if k in base else v for k, v in top.items()}}


def _select(params: Any, shapes: Any) -> Any:
    """The part of ``params`` whose paths ``shapes`` has."""
    if isinstance(shapes, dict):
        return {k: _select(params[k], v) for k, v in shapes.items()}
    return params


class Pretrained:
    """A pretrained model set up for a family: tokenizer, meta-parameters, masks, trunk.

    Args:
      task: the family's task config (a :class:`ModelChoice` with ``model`` not scratch).
      seed: draws the LoRA factors (``fold_in(key(seed), 1)``).
      max_len: the family's tokens per sequence, checked against the model's positions.
      lm_head: whether the family reads the LM head's logits; False (a classifier over the
        final features): with a frozen trunk the meta-parameters leave out the head.

    Attributes:
      model: the flax model (``GPT2LM``, ``LlamaLM``).
      tokenizer: ``encode(str) -> ids``, ``decode(ids) -> str``, ``token_id(str)``.
      meta_params: ``{"base": weights of the trainable part, "lora": factors}``.
      lora: the :class:`metajax.lora.LoRA` of the factors.
      start: the first trainable block; 0 without a frozen trunk.
      stop: ``task.num_blocks`` where it drops blocks (features of an inner layer), or None.
      trunk: the :class:`TrunkCache` of the frozen blocks, or None.
      start_id, end_id: the tokens that open and close a text (also the padding).
    """

    def __init__(self, task: ModelChoice, seed: int, max_len: int, lm_head: bool = True):
        check(task)
        self.task = task
        model, params, tokenizer, files = _load(task.model, DTYPES[task.dtype], task.remat)
        self.model, self.tokenizer = model, tokenizer
        blocks = _config_value(model, "n_layer", "num_hidden_layers")
        positions = _config_value(model, "n_positions", "max_position_embeddings")
        if max_len > positions:
            raise ConfigError(f"task.max_len={max_len} > the model's n_positions {positions}.")
        self.stop = None
        if task.num_blocks is not None:
            if lm_head:
                raise ConfigError(
                    f"task.num_blocks={task.num_blocks}: this family reads the LM head, which "
                    "follows the last block; num_blocks is for classifiers."
                )
            if task.num_blocks > blocks:
                raise ConfigError(
                    f"task.num_blocks={task.num_blocks} must be in [1, {blocks}] (the model's "
                    "blocks)."
                )
            self.stop = task.num_blocks if task.num_blocks < blocks else None
            blocks = task.num_blocks
        k = task.trainable_blocks
        if k is not None and not 1 <= k <= blocks:
            raise ConfigError(
                f"task.trainable_blocks={k} must be in [1, {blocks}] (the blocks used)."
            )
        vocab = getattr(tokenizer, "vocab_size", 0)
        if vocab > _config_value(model, "vocab_size"):
            raise ConfigError(
                f"task.model={task.model!r}: the tokenizer has {vocab} ids, the model "
                f"{_config_value(model, 'vocab_size')}."
            )
        self.start_id = _token_id(tokenizer, _START_TOKENS, "start", task.model)
        self.end_id = _token_id(tokenizer, _END_TOKENS, "end", task.model)
        self.start, self.trunk, self.trunk_params = 0, None, None
        base = params
        if self.stop is not None:
            tokens = jnp.zeros((1, max_len), jnp.int32)
            base = _select(params, _used(model, "trunk", tokens, blocks=self.stop))
        if k is not None:
            self.start = blocks - k
            tokens = jnp.zeros((1, max_len), jnp.int32)
            self.trunk_params = _select(params, _used(model, "trunk", tokens, blocks=self.start))
            hidden = jax.eval_shape(
                lambda p, t: model.apply(p, t, blocks=self.start, method="trunk"),
                self.trunk_params,
                tokens,
            )
            top = _used(
                model, "top", hidden, start=self.start, features=not lm_head, stop=self.stop
            )
            base = _select(params, top)
            digest = file_digest(files) if files else params_digest(self.trunk_params)
            self.trunk = TrunkCache(model, self.trunk_params, self.start, digest)
        targets = task.lora_targets or DEFAULT_TARGETS.get(type(model).__name__)
        if targets is None:
            raise ConfigError(
                f"task.lora_targets: no default for {type(model).__name__}; give a regex."
            )
        self.lora = lora_lib.LoRA(rank=task.lora_rank, targets=targets, alpha=task.lora_alpha)
        try:
            self.meta_params = self.lora.init(base, jax.random.fold_in(jax.random.key(seed), 1))
        except (ValueError, TypeError) as e:
            raise ConfigError(f"task.lora_targets={targets!r}: {e}") from None

    @property
    def width(self) -> int:
        """The model's hidden width."""
        return _config_value(self.model, "n_embd", "hidden_size")

    def encode_ids(self, text: str) -> list[int]:
        """The tokenizer's ids of ``text`` (no special tokens)."""
        return list(self.tokenizer.encode(text))

    def inputs(self, tokens: Any) -> Any:
        """What :meth:`apply` reads for host tokens ``(..., seq)``: the tokens, or the frozen
        trunk's float32 states ``(..., seq, width)`` (cached)."""
        if self.trunk is None:
            return np.asarray(tokens, np.int32)
        return self.trunk.hidden(tokens)

    def apply(self, meta_params: Any, x: Any, *, features: bool = False) -> jax.Array:
        """Logits ``(n, seq, vocab)`` (or final normed ``features``) of ``x`` from
        :meth:`inputs` (or a ``(tokens, states)`` pair of :meth:`lm_batch`); differentiable in
        ``meta_params``."""
        params = self.lora.merge(meta_params)
        if self.trunk is not None:
            x = x[1] if isinstance(x, tuple) else x
            return self.model.apply(
                params, x, start=self.start, features=features, stop=self.stop, method="top"
            )
        if self.stop is not None:
            return self.model.apply(params, x, blocks=self.stop, method="trunk")
        return self.model.apply(params, x, method="features" if features else None)

    def decoder(self) -> tuple[Any, Any]:
        """``(decode, params_of)`` for greedy decoding with the whole model (the frozen trunk,
        if any, then the adapted top): ``decode(params_of(meta_params), prompts, lengths,
        **kwargs)`` takes and returns what :func:`~metajax.models.decoding.greedy_decode`
        does. A model with ``decode_step`` (``LlamaLM``) decodes with its key-value cache, one
        position per step; others run the whole buffer once per generated token."""
        model, lora = self.model, self.lora
        if self.trunk is None:
            params_of = lora.merge
        else:
            # The trunk's and the top's weights are disjoint parts of one tree, but for the
            # tied embedding: decoding reads the top's copy as the input embedding too. The
            # loss reads the trunk's there; they are the same weights unless adapt="all" or
            # freeze_base=False trains the top's copy.
            params_of = lambda meta_params: _union(self.trunk_params, lora.merge(meta_params))
        if hasattr(model, "decode_step"):
            return functools.partial(greedy_decode_cached, lm_decoder(model)), params_of
        return functools.partial(greedy_decode, model.apply), params_of

    def byte_lengths(self) -> np.ndarray:
        """int32 ``(model vocab,)``: the UTF-8 bytes each token id spells
        (:func:`token_byte_lengths`; 0 for special tokens and ids the tokenizer lacks).

        Raises:
          ConfigError: the tokenizer is not a byte-level BPE.
        """
        try:
            return token_byte_lengths(self.tokenizer, _config_value(self.model, "vocab_size"))
        except ValueError as e:
            raise ConfigError(f"task.model={self.task.model!r}: {e}") from None

    def next_token_fns(self, byte_lengths: Any = None) -> tuple[Any, Any]:
        """``(loss_fn, metric_fn)`` on :meth:`lm_batch` batches: next-token cross-entropy
        (nats) over real targets; bits per token and next-token accuracy, and bits per byte
        when ``byte_lengths`` (:meth:`byte_lengths`) is given."""
        metrics = next_token_metrics
        if byte_lengths is not None:
            metrics = functools.partial(next_token_byte_metrics, byte_lengths=byte_lengths)

        def on_inputs(make):
            def fn(meta_params, batch):
                x, mask = batch
                tokens, inputs = x if self.trunk is not None else (x, x)
                # The last position predicts nothing: the model reads all but it.
                apply = lambda p, _tokens: self.apply(p, inputs[:, :-1])
                return make(apply)(meta_params, (tokens, mask))

            return fn

        return on_inputs(next_token_loss), on_inputs(metrics)

    def lm_input(self, tokens: Any) -> Any:
        """A next-token model input: the tokens, or ``(tokens, states)`` with a frozen trunk
        (the states to run the top on, the tokens as targets)."""
        tokens = np.asarray(tokens, np.int32)
        return tokens if self.trunk is None else (tokens, self.trunk.hidden(tokens))

    def lm_batch(self, tokens: Any, mask: Any) -> tuple:
        """``(lm_input(tokens), mask)``: a next-token batch."""
        return self.lm_input(tokens), np.asarray(mask, np.float32)

    def tokens_of(self, x: Any) -> Any:
        """The tokens of an :meth:`lm_input`."""
        return x[0] if self.trunk is not None else x

    def inner_mask(self, meta_params: Any, config: Config) -> Any:
        """The inner loop's mask for meta-parameters holding :attr:`meta_params` (nested in a
        dict with other leaves, which adapt); None for ``adapt="all"`` and for metric-based
        algorithms (ProtoNets adapts nothing)."""
        from metajax.run.build import ALGORITHMS

        spec = ALGORITHMS.get(config.algorithm.name)
        if self.task.adapt == "all" or (spec is not None and spec.metric_based):
            return None

        def node(n):
            if lora_lib.is_lora_params(n):
                return lora_lib.inner_mask(n, self.task.adapt)
            return jax.tree.map(lambda _: True, n)

        return jax.tree.map(node, meta_params, is_leaf=lora_lib.is_lora_params)

    def wrap_optimizer(self) -> Any:
        """``Setup.wrap_optimizer``: :func:`freeze_base` for ``task.freeze_base``, else None."""
        if not self.task.freeze_base:
            return None
        return lambda tx: freeze_base(tx, self.task.adapt)


@functools.cache
def _byte_of_char() -> dict[str, int]:
    """GPT-2's byte-level alphabet (``bytes_to_unicode``) inverted: each of the 256 characters a
    byte-level BPE writes its tokens in, to the byte it stands for."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1)]
    printable += range(ord("®"), ord("ÿ") + 1)
    char_of = {b: chr(b) for b in printable}
    # The other bytes (controls, space, ...) take the characters from 256 up, in byte order.
    char_of |= {b: chr(256 + n) for n, b in enumerate(b for b in range(256) if b not in char_of)}
    return {c: b for b, c in char_of.items()}


def token_byte_lengths(tokenizer: Any, size: int | None = None) -> np.ndarray:
    """int32 ``(size,)``: the UTF-8 bytes each token id spells in a text, so a text's bytes are
    the table summed over its ids.

    A byte-level BPE token stands for the bytes its characters map back to through GPT-2's
    ``bytes_to_unicode`` (often part of a character: decoding the id alone would give U+FFFD);
    an added token for its text as matched in the input; a special token (start, end, padding)
    for none; ids the tokenizer lacks, up to ``size`` (a model's padded vocabulary), for none.

    Args:
      tokenizer: a ``tokenizers.Tokenizer`` with a ``ByteLevel`` decoder, or a wrapper holding
        one as ``.tokenizer`` (:class:`metajax.models.pretrained.PretrainedTokenizer`).
      size: the table's length; default the tokenizer's vocabulary size.

    Raises:
      ValueError: not a byte-level BPE tokenizer, a token outside its alphabet, or ``size``
        below the tokenizer's ids.
    """
    inner = _byte_level(tokenizer)
    vocab = inner.get_vocab(with_added_tokens=True)
    size = inner.get_vocab_size(with_added_tokens=True) if size is None else size
    if vocab and max(vocab.values()) >= size:
        raise ValueError(f"size={size} is below the tokenizer's ids (up to {max(vocab.values())}).")
    lengths = np.zeros(size, np.int32)
    added = inner.get_added_tokens_decoder()
    for token, i in vocab.items():
        if i in added:
            lengths[i] = 0 if added[i].special else len(added[i].content.encode("utf-8"))
        else:
            lengths[i] = len(_decoded(token, i))
    return lengths


def _byte_level(tokenizer: Any) -> Any:
    from tokenizers import decoders

    inner = getattr(tokenizer, "tokenizer", tokenizer)
    if not isinstance(inner.decoder, decoders.ByteLevel):
        raise ValueError(
            "bits per byte needs a byte-level BPE tokenizer (GPT-2, Llama 3, Qwen2, SmolLM2); "
            f"this one decodes with {type(inner.decoder).__name__}."
        )
    return inner


def _decoded(token: str, token_id: int) -> bytes:
    byte_of = _byte_of_char()
    try:
        return bytes(byte_of[c] for c in token)
    except KeyError:
        raise ValueError(
            f"token {token_id} {token!r} has characters outside the byte-level alphabet."
        ) from None


def freeze_base(
    optimizer: optax.GradientTransformation, adapt: str
) -> optax.GradientTransformation:
    """``optimizer`` on the factors (and the norms for ``lora+norm``), zero elsewhere in each
    LoRA dict; leaves outside LoRA dicts (a head) train.

    Like :func:`metajax.lora.freeze_base`, on every LoRA dict of the tree (Meta-SGD nests
    them).
    """
    trained = "lora+norm" if adapt == "lora+norm" else "lora"

    def labels(tree):
        def node(n):
            if lora_lib.is_lora_params(n):
                mask = lora_lib.inner_mask(n, trained)
                return jax.tree.map(lambda t: "train" if t else "frozen", mask)
            return jax.tree.map(lambda _: "train", n)

        return jax.tree.map(node, tree, is_leaf=lora_lib.is_lora_params)

    return optax.multi_transform({"train": optimizer, "frozen": optax.set_to_zero()}, labels)


class MappedSource(TaskSource):
    """A task source whose support and query batches pass through ``fn`` (host side).

    ``sample`` stays a pure function of ``(step, num_tasks, first_task)`` when ``fn`` is one
    (the trunk cache is: a sequence's states never change). Other attributes are the
    source's (``sample_languages``, ``split``).
    """

    def __init__(self, source: Any, fn: Any):
        self.source, self.fn = source, fn

    def sample(self, step: int, num_tasks: int, first_task: int = 0) -> Task:
        task = self.source.sample(step, num_tasks, first_task)
        return Task(support=self.fn(task.support), query=self.fn(task.query))

    def __getattr__(self, name: str) -> Any:
        if name in ("source", "fn"):  # not set yet (unpickling): no recursion
            raise AttributeError(name)
        return getattr(self.source, name)
