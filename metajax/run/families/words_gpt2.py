"""The ``words_gpt2`` family: few-shot language modelling of new languages with a GPT-2, via LoRA.

The tasks are those of ``words_lm`` (:class:`metajax.tasks.words.LanguageModeling`: one
language per task, meta-test languages from families never seen in meta-training), re-encoded
with the checkpoint's GPT-2 BPE tokenizer: a sequence is ``<|endoftext|> word <|endoftext|>``
right-padded to ``max_len`` (GPT-2 separates documents with ``<|endoftext|>``, so the first
token opens a document and the last one ends the word). Without a checkpoint the model is a
random-weights GPT-2 of ``size`` over UTF-8 byte tokens (ids 0..255, end token 256), for
benchmarks and smoke tests.

The meta-parameters are ``{"base": GPT-2 weights, "lora": factors}`` (:class:`metajax.lora.LoRA`);
the inner loop adapts the factors (``adapt="lora"``), the factors and the LayerNorms
(``"lora+norm"``) or everything (``"all"``); with ``freeze_base`` the outer loop trains only
the factors (and, for ``"lora+norm"``, the LayerNorms). The loss is next-token cross-entropy
(nats) over real targets, the metrics bits per token and next-token accuracy. Batches are
``(tokens int32 (n, max_len), mask float32 (n, max_len))``; a user's support and query sets
are lists of strings.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from metajax import lora as lora_lib
from metajax.models.gpt2 import GPT2_SIZES, GPT2LM, GPT2Config
from metajax.models.losses import next_token_loss, next_token_metrics
from metajax.run.config import Config, ConfigError, require_positive
from metajax.run.setup import Setup
from metajax.tasks import words
from metajax.types import Task

ADAPT_MODES = ("lora", "lora+norm", "all")
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
END_TOKEN = "<|endoftext|>"
# Byte tokens of the random-weights model without a tokenizer: ids 0..255, then the end token.
BYTE_END_ID = 256


@dataclasses.dataclass(frozen=True)
class GPT2WordsTask:
    """Few-shot word tasks over languages, and the GPT-2 and LoRA factors that model them.

    Attributes:
      shots: K support words per task.
      queries: query words per task.
      max_len: GPT-2 tokens per sequence, both end tokens included; words of more than
        max_len - 2 UTF-8 bytes are never drawn, so every word fits.
      num_words: each language's most frequent words to draw from.
      eval_split: meta-split evaluated: test (held-out language families) or validation.
      checkpoint: a Hugging Face GPT-2 folder (config.json, model.safetensors and a
        tokenizer); none: a random-weights GPT-2 of size over UTF-8 byte tokens.
      size: GPT-2 size without a checkpoint: gpt2, gpt2-medium, gpt2-large, gpt2-xl or tiny.
      lora_rank: rank of the LoRA factors (>= 1).
      lora_alpha: LoRA scale numerator: updates are lora_alpha / lora_rank * A @ B (> 0).
      lora_targets: regex of the kernel paths that get LoRA factors.
      adapt: what the inner loop adapts: lora, lora+norm (the factors and the LayerNorms) or
        all.
      freeze_base: the outer loop trains only the factors (and the LayerNorms for
        lora+norm); false: it trains every weight.
      remat: recompute each GPT-2 block in the backward pass instead of storing it.
      dtype: compute dtype, float32 or bfloat16 (the weights stay float32).
    """

    shots: int = 4
    queries: int = 4
    max_len: int = 16
    num_words: int = 5000
    eval_split: str = "test"
    checkpoint: str | None = None
    size: str = "gpt2"
    lora_rank: int = 8
    lora_alpha: float = 16.0
    lora_targets: str = r"(c_attn|c_proj|c_fc)/kernel"
    adapt: str = "lora"
    freeze_base: bool = True
    remat: bool = False
    dtype: str = "float32"


TaskConfig = GPT2WordsTask
# `metajax eval --set` may change these: the folder is read for the tokenizer and the shapes
# only (the weights come from the workdir's checkpoint), so it may move.
EVAL_KEYS = ("task.eval_split", "task.checkpoint")


class TokenEncoder:
    """Strings -> ``(tokens int32 (n, max_len), mask float32 (n, max_len))`` next-token batches.

    ``tokens[i] = [end, ids of text i..., end, end (padding)...]``; ``mask[i, t]`` is 1 where
    token ``t`` is a prediction target: the text's tokens and the end token after them.

    Args:
      encode_ids: ``text -> list of token ids`` (no special tokens).
      end_id: id of the end token (also the start and the padding).
      max_len: tokens per sequence.
    """

    def __init__(self, encode_ids: Callable[[str], list[int]], end_id: int, max_len: int):
        self.encode_ids, self.end_id, self.max_len = encode_ids, end_id, max_len
        self._cache: dict[str, list[int]] = {}

    def __call__(self, texts: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        if isinstance(texts, str) or not all(isinstance(t, str) for t in texts):
            raise TypeError(f"expected a list of strings, got {texts!r:.80}.")
        tokens = np.full((len(texts), self.max_len), self.end_id, np.int32)
        mask = np.zeros((len(texts), self.max_len), np.float32)
        for i, text in enumerate(texts):
            ids = self._cache.get(text)
            if ids is None:
                ids = self._cache[text] = list(self.encode_ids(text))
            if len(ids) + 2 > self.max_len:
                raise ValueError(
                    f"{text!r} needs {len(ids) + 2} tokens with its end tokens > "
                    f"task.max_len={self.max_len}."
                )
            tokens[i, 1 : len(ids) + 1] = ids
            mask[i, 1 : len(ids) + 2] = 1.0
        return tokens, mask


class GPT2WordTasks:
    """:class:`~metajax.tasks.words.LanguageModeling` tasks re-encoded by a :class:`TokenEncoder`.

    ``sample(step, num_tasks, first_task=0)`` draws the byte-level tasks (a pure function of
    their seed, split, step and task index), decodes each word and encodes it again, so it
    stays a pure function of the same arguments. Returns ``Task(support=(tokens, mask),
    query=(tokens, mask))`` with tokens int32 ``(T, K, max_len)`` (``(T, Q, max_len)`` for the
    query) and masks float32 of the same shapes.
    """

    def __init__(self, source: words.LanguageModeling, encoder: TokenEncoder):
        self.source, self.encoder = source, encoder

    def sample(self, step: int, num_tasks: int, first_task: int = 0) -> Task:
        task = self.source.sample(step, num_tasks, first_task)
        return Task(support=self._recode(task.support[0]), query=self._recode(task.query[0]))

    def _recode(self, byte_tokens: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        num_tasks, per_task, _ = byte_tokens.shape
        tokens, mask = self.encoder(words.decode(byte_tokens.reshape(num_tasks * per_task, -1)))
        shape = (num_tasks, per_task, self.encoder.max_len)
        return tokens.reshape(shape), mask.reshape(shape)


def check(task: GPT2WordsTask) -> None:
    """Range checks of the task's values that need no files."""
    require_positive(task, "shots", "queries", "num_words")
    if task.max_len < 3:
        raise ConfigError(f"task.max_len={task.max_len} must be >= 3 (start, a token, end).")
    if task.eval_split not in ("validation", "test"):
        raise ConfigError(f"task.eval_split={task.eval_split!r}: choose test or validation.")
    if task.size not in GPT2_SIZES:
        raise ConfigError(
            f"task.size={task.size!r}: unknown; choose one of {', '.join(GPT2_SIZES)}."
        )
    if isinstance(task.lora_rank, bool) or task.lora_rank < 1:
        raise ConfigError(f"task.lora_rank={task.lora_rank} must be an int >= 1.")
    if not (np.isfinite(task.lora_alpha) and task.lora_alpha > 0):
        raise ConfigError(f"task.lora_alpha={task.lora_alpha} must be a positive number.")
    try:
        re.compile(task.lora_targets)
    except re.error as e:
        raise ConfigError(f"task.lora_targets={task.lora_targets!r} is not a regex: {e}.") from None
    if task.adapt not in ADAPT_MODES:
        raise ConfigError(f"task.adapt={task.adapt!r}: choose one of {', '.join(ADAPT_MODES)}.")
    if task.dtype not in DTYPES:
        raise ConfigError(f"task.dtype={task.dtype!r}: choose one of {', '.join(DTYPES)}.")


def checkpoint_folder(checkpoint: str) -> Path:
    """The checkpoint folder, checked to hold a config, weights and a tokenizer.

    Raises:
      ConfigError: naming the folder and the file it lacks.
    """
    folder = Path(checkpoint).expanduser()
    where = f"task.checkpoint={checkpoint!r}"
    if not folder.is_dir():
        raise ConfigError(
            f"{where}: folder {folder} does not exist (download one with "
            "`huggingface-cli download gpt2 --local-dir DIR`)."
        )
    if not (folder / "config.json").is_file():
        raise ConfigError(f"{where}: no config.json in {folder}.")
    if not any(
        (folder / f).is_file() for f in ("model.safetensors", "model.safetensors.index.json")
    ):
        raise ConfigError(
            f"{where}: no model.safetensors (nor model.safetensors.index.json) in {folder}."
        )
    if not (
        (folder / "tokenizer.json").is_file()
        or ((folder / "vocab.json").is_file() and (folder / "merges.txt").is_file())
    ):
        raise ConfigError(
            f"{where}: no tokenizer.json (nor vocab.json and merges.txt) in {folder}."
        )
    return folder


def load_model(task: GPT2WordsTask, seed: int) -> tuple[GPT2LM, Any, TokenEncoder]:
    """The GPT-2, its (pretrained or random) weights and the encoder of its tokens."""
    overrides = dict(dtype=DTYPES[task.dtype], remat=task.remat)
    if task.checkpoint is None:
        model = GPT2LM(GPT2Config.named(task.size, **overrides))
        # One compiled init: op by op, each initializer would compile on its own.
        params = jax.jit(model.init)(jax.random.key(seed), jnp.zeros((1, task.max_len), jnp.int32))
        encoder = TokenEncoder(lambda text: list(text.encode("utf-8")), BYTE_END_ID, task.max_len)
    else:
        from metajax.models.gpt2_checkpoint import load_gpt2, load_gpt2_tokenizer

        folder = checkpoint_folder(task.checkpoint)
        try:
            model, params = load_gpt2(folder, **overrides)
            tokenizer = load_gpt2_tokenizer(folder)
            end_id = tokenizer.token_id(END_TOKEN)
        except (OSError, ValueError) as e:
            raise ConfigError(f"task.checkpoint={task.checkpoint!r}: {e}") from None
        if tokenizer.vocab_size > model.config.vocab_size:
            raise ConfigError(
                f"task.checkpoint={task.checkpoint!r}: the tokenizer has "
                f"{tokenizer.vocab_size} ids, the model "
                f"{model.config.vocab_size}."
            )
        encoder = TokenEncoder(tokenizer.encode, end_id, task.max_len)
    if task.max_len > model.config.n_positions:
        raise ConfigError(
            f"task.max_len={task.max_len} > the model's n_positions {model.config.n_positions}."
        )
    return model, params, encoder


def freeze_base(
    optimizer: optax.GradientTransformation, adapt: str
) -> optax.GradientTransformation:
    """``optimizer`` on the factors (and the LayerNorms for ``lora+norm``), zero elsewhere.

    Like :func:`metajax.lora.freeze_base`, on every LoRA dict of the tree (Meta-SGD nests
    them), with the LayerNorms of ``lora+norm`` trained too.
    """
    trained = "lora+norm" if adapt == "lora+norm" else "lora"

    def labels(tree):
        def node(n):
            if lora_lib.is_lora_params(n):
                mask = lora_lib.inner_mask(n, trained)
                return jax.tree.map(lambda t: "train" if t else "frozen", mask)
            return "train"

        return jax.tree.map(node, tree, is_leaf=lora_lib.is_lora_params)

    return optax.multi_transform({"train": optimizer, "frozen": optax.set_to_zero()}, labels)


def build(config: Config) -> Setup:
    task: GPT2WordsTask = config.task
    check(task)
    seed = config.train.seed
    model, base, encoder = load_model(task, seed)
    lora = lora_lib.LoRA(
        rank=task.lora_rank, targets=task.lora_targets, alpha=float(task.lora_alpha)
    )
    try:
        meta_params = lora.init(base, jax.random.fold_in(jax.random.key(seed), 1))
    except (ValueError, TypeError) as e:
        raise ConfigError(f"task.lora_targets={task.lora_targets!r}: {e}") from None

    def batch_fn(texts, targets=None):
        del targets  # the targets are the next tokens
        tokens, mask = encoder(texts)
        return jnp.asarray(tokens), jnp.asarray(mask)

    def inputs_fn(texts):
        return jnp.asarray(encoder(texts)[0])

    common = dict(
        shots=task.shots,
        queries=task.queries,
        seed=seed,
        num_words=task.num_words,
        max_len=task.max_len,
    )
    train = GPT2WordTasks(words.LanguageModeling(split="train", **common), encoder)
    test = GPT2WordTasks(words.LanguageModeling(split=task.eval_split, **common), encoder)
    return Setup(
        meta_params,
        lora.wrap(next_token_loss(model.apply)),
        lora.wrap(next_token_metrics(model.apply)),
        train,
        test,
        lora.wrap(model.apply),
        head=r"^lora/",
        batch_fn=batch_fn,
        inputs_fn=inputs_fn,
        inner_mask=None if task.adapt == "all" else lora_lib.inner_mask(meta_params, task.adapt),
        wrap_optimizer=(lambda tx: freeze_base(tx, task.adapt)) if task.freeze_base else None,
    )
