"""The ``words_lm`` family: few-shot language modelling of new languages.

A task is one language, its support K words; the loss is next-token cross-entropy (nats).
Meta-splits are by language family (:mod:`metajax.tasks.languages`): meta-test languages and
their families are never seen in meta-training. The model (``task.model``):

- ``scratch``: a small decoder :class:`~metajax.models.TransformerLM` over byte tokens
  (vocabulary :data:`metajax.tasks.words.VOCAB_SIZE`); the metric is the query bits per byte.
- a pretrained model (:mod:`metajax.run.pretrained_choice`): the same words encoded by its
  tokenizer as ``start word end`` (:class:`metajax.tasks.text_encoding.WordTokens`), LoRA
  factors meta-learned; the metrics are the query bits per byte (every target's information,
  the end token's included, over the UTF-8 bytes of the word's tokens, as the scratch
  metric: comparable across tokenizers and with the byte-level model; needs a byte-level BPE
  tokenizer), bits per token and next-token accuracy. Batches are ``(tokens, mask)``, or
  ``((tokens, states), mask)`` with the frozen trunk's states when ``task.trainable_blocks``
  is set; a user's support and query sets are lists of strings.

``words_langid`` shares :class:`WordsTask` and :func:`check` (scratch only).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from metajax.models.losses import bits_per_byte_metric, next_token_loss
from metajax.models.transformer import TransformerConfig, TransformerLM
from metajax.run import pretrained_choice
from metajax.run.config import Config, ConfigError, require_positive
from metajax.run.pretrained_choice import SCRATCH, MappedSource, ModelChoice, Pretrained
from metajax.run.setup import Evaluator, Family, Setup
from metajax.tasks import words
from metajax.tasks.text_encoding import TokenEncoder, WordTokens


@pretrained_choice.documented
@dataclasses.dataclass(frozen=True)
class WordsTask(ModelChoice):
    """Few-shot word tasks over languages, and the model that learns them.

    Attributes:
      shots: K, support words per task (``words_lm``) or per language (``words_langid``).
      queries: query words per task (``words_lm``) or per language (``words_langid``).
      ways: N languages per task (``words_langid`` only).
      max_len: tokens per word sequence, both end tokens included (bytes for scratch, the
        model's tokens otherwise); words of more than max_len - 2 UTF-8 bytes are never
        drawn, so every word fits.
      num_words: each language's most frequent words to draw from.
      width: scratch: Transformer width.
      depth: scratch: Transformer blocks.
      heads: scratch: attention heads.
      mlp_width: scratch: hidden width of each block's MLP.
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


def check(task: WordsTask) -> None:
    """Range checks of a task for the family's own (scratch) Transformer; any pretrained
    setting is refused (``words_langid`` takes no pretrained model)."""
    if task.model != SCRATCH:
        raise ConfigError(
            f"task.model={task.model!r}: this family trains its own Transformer; "
            "leave task.model=scratch."
        )
    pretrained_choice.check(task)
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
    if task.model != SCRATCH:
        return _build_pretrained(config, task)
    check(task)
    seed = config.train.seed
    model = TransformerLM(transformer_config(task))
    # One compiled init: op by op, each initializer of each shape would compile on its own.
    params = jax.jit(model.init)(jax.random.key(seed), jnp.zeros((1, task.max_len), jnp.int32))

    def batch_fn(x, y=None):
        del y  # the targets are the next bytes
        t = tokens(x, task.max_len)
        return t, jnp.asarray(words.target_mask(np.asarray(t)))

    train, test = word_sources(task, seed)
    return Setup(
        params=params,
        loss_fn=next_token_loss(model.apply),
        # Bits per UTF-8 byte: every target's information (EOS included) over byte targets.
        metric_fn=bits_per_byte_metric(model.apply),
        train_source=train,
        eval_source=test,
        evaluator=Evaluator(
            model.apply, batch_fn=batch_fn, inputs_fn=lambda x: tokens(x, task.max_len)
        ),
        head="head|embed",
    )


def word_sources(
    task: WordsTask, seed: int
) -> tuple[words.LanguageModeling, words.LanguageModeling]:
    """The byte-level ``(meta-train, evaluated)`` task sources of a task config: the words
    every model of the family learns and is scored on (a pretrained model re-encodes them)."""
    common = dict(
        shots=task.shots,
        queries=task.queries,
        seed=seed,
        num_words=task.num_words,
        max_len=task.max_len,
    )
    train = words.LanguageModeling(split="train", **common)
    return train, words.LanguageModeling(split=task.eval_split, **common)


def _build_pretrained(config: Config, task: WordsTask) -> Setup:
    require_positive(task, "shots", "queries", "num_words")
    if task.max_len < 3:
        raise ConfigError(f"task.max_len={task.max_len} must be >= 3 (start, a token, end).")
    if task.eval_split not in ("validation", "test"):
        raise ConfigError(f"task.eval_split={task.eval_split!r}: choose test or validation.")
    pre = Pretrained(task, config.train.seed, task.max_len)
    encoder = TokenEncoder(pre.encode_ids, pre.end_id, task.max_len, pre.start_id)

    def encoded(texts):
        return encoder(list(texts) if isinstance(texts, tuple) else texts)

    def batch_fn(x, y=None):
        del y  # the targets are the next tokens
        return pre.lm_batch(*encoded(x))

    loss_fn, metric_fn = pre.next_token_fns(pre.byte_lengths())
    train, test = (
        MappedSource(WordTokens(s, encoder), lambda b: pre.lm_batch(*b))
        for s in word_sources(task, config.train.seed)
    )
    return Setup(
        params=pre.meta_params,
        loss_fn=loss_fn,
        metric_fn=metric_fn,
        train_source=train,
        eval_source=test,
        evaluator=Evaluator(
            pre.apply, batch_fn=batch_fn, inputs_fn=lambda x: pre.lm_input(encoded(x)[0])
        ),
        head=r"^lora/",
        inner_mask=pre.inner_mask(pre.meta_params, config),
        wrap_optimizer=pre.wrap_optimizer(),
    )


FAMILY = Family(WordsTask, build, eval_keys=("task.eval_split",), requires=("wordfreq",))
