"""The ``words_lm`` family: few-shot byte-level language modelling of new languages.

A small decoder :class:`~metajax.models.TransformerLM` over byte tokens (vocabulary
:data:`metajax.tasks.words.VOCAB_SIZE`); a task is one language, its support K words; the
loss is next-token cross-entropy (nats), the metric the query bits per byte. Meta-splits are
by language family (:mod:`metajax.tasks.languages`): meta-test languages and their families
are never seen in meta-training. ``words_langid`` shares :class:`WordsTask`.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from metajax.models.losses import next_token_loss
from metajax.models.transformer import TransformerConfig, TransformerLM
from metajax.run.config import Config, ConfigError, require_positive
from metajax.run.setup import Setup
from metajax.tasks import words


@dataclasses.dataclass(frozen=True)
class WordsTask:
    """Few-shot word tasks over languages, and the Transformer that models them.

    Attributes:
      shots: K, support words per task (``words_lm``) or per language (``words_langid``).
      queries: query words per task (``words_lm``) or per language (``words_langid``).
      ways: N languages per task (``words_langid`` only).
      max_len: tokens per word sequence, BOS and EOS included.
      num_words: each language's most frequent words to draw from.
      width: Transformer width.
      depth: Transformer blocks.
      heads: attention heads.
      mlp_width: hidden width of each block's MLP.
      eval_split: meta-split evaluated: test (held-out language families) or validation.
    """

    shots: int = 16
    queries: int = 16
    ways: int = 5
    max_len: int = 24
    num_words: int = 5000
    width: int = 64
    depth: int = 2
    heads: int = 4
    mlp_width: int = 256
    eval_split: str = "test"


TaskConfig = WordsTask
EVAL_KEYS = ("task.eval_split",)


def check(task: WordsTask) -> None:
    require_positive(
        task, "shots", "queries", "ways", "num_words", "width", "depth", "heads", "mlp_width"
    )
    if task.max_len < 3:
        raise ConfigError(f"task.max_len={task.max_len} must be >= 3 (BOS, a byte, EOS).")


def transformer_config(task, vocab_size: int = words.VOCAB_SIZE) -> TransformerConfig:
    """The Transformer of a task config with ``width``, ``depth``, ``heads``, ``mlp_width`` and
    ``max_len`` fields (a refused size becomes a config error in ``build``)."""
    return TransformerConfig(
        vocab_size=vocab_size,
        width=task.width,
        depth=task.depth,
        heads=task.heads,
        mlp_width=task.mlp_width,
        max_len=task.max_len,
    )


def tokens(x, max_len: int) -> jnp.ndarray:
    """Int32 ``(n, max_len)`` tokens from token arrays or a list of strings."""
    if isinstance(x, (list, tuple)) and x and isinstance(x[0], (str, bytes)):
        x = words.encode(list(x), max_len)
    return jnp.asarray(x, jnp.int32)


def build(config: Config) -> Setup:
    task: WordsTask = config.task
    check(task)
    seed = config.train.seed
    model = TransformerLM(transformer_config(task))
    # One compiled init: op by op, each initializer of each shape would compile on its own.
    params = jax.jit(model.init)(jax.random.key(seed), jnp.zeros((1, task.max_len), jnp.int32))

    def metric_fn(params, batch):
        tokens_, mask = batch
        # Bits per UTF-8 byte: every target's information (EOS included) over byte targets.
        return {"bits_per_byte": words.bits_per_byte(model.apply(params, tokens_), tokens_, mask)}

    def batch_fn(x, y=None):
        del y  # the targets are the next bytes
        t = tokens(x, task.max_len)
        return t, jnp.asarray(words.target_mask(np.asarray(t)))

    common = dict(
        shots=task.shots,
        queries=task.queries,
        seed=seed,
        num_words=task.num_words,
        max_len=task.max_len,
    )
    train = words.LanguageModeling(split="train", **common)
    test = words.LanguageModeling(split=task.eval_split, **common)
    return Setup(
        params,
        next_token_loss(model.apply),
        metric_fn,
        train,
        test,
        model.apply,
        head="head|embed",
        batch_fn=batch_fn,
        inputs_fn=lambda x: tokens(x, task.max_len),
    )
