"""The language task families: few-shot byte-level language modelling and language ID.

- ``words_lm``: a small decoder :class:`~metajax.models.TransformerLM` over byte tokens
  (vocabulary :data:`metajax.tasks.words.VOCAB_SIZE`); a task is one language, its support K
  words; loss is next-token cross-entropy (nats), metric the query bits per byte.
- ``words_langid``: N-way K-shot language identification with the encoder
  :class:`~metajax.models.TransformerClassifier`; loss cross-entropy, metric accuracy.

Meta-splits are by language family (:mod:`metajax.tasks.languages`): meta-test languages and
their families are never seen in meta-training.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from metajax.experiment import Config, Setup, register_family
from metajax.families_omniglot import classifier_fns
from metajax.models.losses import next_token_loss
from metajax.models.transformer import TransformerClassifier, TransformerConfig, TransformerLM
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
      eval_split: meta-split evaluated: "test" (held-out language families).
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


def _transformer_config(task: WordsTask) -> TransformerConfig:
    return TransformerConfig(vocab_size=words.VOCAB_SIZE, width=task.width, depth=task.depth,
                             heads=task.heads, mlp_width=task.mlp_width, max_len=task.max_len)


@register_family("words_lm")
def words_lm(config: Config) -> Setup:
    task: WordsTask = config.task
    seed = config.train.seed
    model = TransformerLM(_transformer_config(task))
    params = model.init(jax.random.key(seed), jnp.zeros((1, task.max_len), jnp.int32))
    loss_fn = next_token_loss(model.apply)

    def metric_fn(params, batch):
        tokens, mask = batch
        # Bits per UTF-8 byte: every target's information (EOS included) over byte targets.
        return {"bits_per_byte": words.bits_per_byte(model.apply(params, tokens), tokens, mask)}

    common = dict(shots=task.shots, queries=task.queries, seed=seed, num_words=task.num_words,
                  max_len=task.max_len)
    train = words.LanguageModeling(split="train", **common)
    test = words.LanguageModeling(split=task.eval_split, **common)
    return Setup(params, loss_fn, metric_fn, train, test, None, predict_fn=model.apply)


@register_family("words_langid")
def words_langid(config: Config) -> Setup:
    task: WordsTask = config.task
    seed = config.train.seed
    model = TransformerClassifier(_transformer_config(task), num_classes=task.ways,
                                  pad_id=words.PAD)
    params = model.init(jax.random.key(seed), jnp.zeros((1, task.max_len), jnp.int32))
    loss_fn, metric_fn = classifier_fns(model.apply)
    common = dict(ways=task.ways, shots=task.shots, queries=task.queries, seed=seed,
                  num_words=task.num_words, max_len=task.max_len)
    train = words.LanguageID(split="train", **common)
    test = words.LanguageID(split=task.eval_split, **common)
    return Setup(params, loss_fn, metric_fn, train, test, None, predict_fn=model.apply)
