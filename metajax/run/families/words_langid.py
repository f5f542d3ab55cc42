"""The ``words_langid`` family: N-way K-shot language identification of single words.

The encoder :class:`~metajax.models.TransformerClassifier` over byte tokens; loss
cross-entropy, metric accuracy. Same task settings and language split as ``words_lm``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from metajax.models.losses import accuracy_metric, classification_loss
from metajax.models.transformer import TransformerClassifier, TransformerEncoder
from metajax.run.config import Config
from metajax.run.families.words_lm import WordsTask, check, tokens, transformer_config
from metajax.run.setup import Embedding, Evaluator, Family, Setup
from metajax.tasks import words


def build(config: Config) -> Setup:
    task: WordsTask = config.task
    check(task)
    seed = config.train.seed
    cfg = transformer_config(task)
    model = TransformerClassifier(cfg, num_classes=task.ways, pad_id=words.PAD)
    x0 = jnp.zeros((1, task.max_len), jnp.int32)
    key = jax.random.key(seed)
    common = dict(
        ways=task.ways,
        shots=task.shots,
        queries=task.queries,
        seed=seed,
        num_words=task.num_words,
        max_len=task.max_len,
    )
    train = words.LanguageID(split="train", **common)
    test = words.LanguageID(split=task.eval_split, **common)
    # One compiled init: op by op, each initializer of each shape would compile on its own.
    return Setup(
        params=jax.jit(model.init)(key, x0),
        loss_fn=classification_loss(model.apply),
        metric_fn=accuracy_metric(model.apply),
        train_source=train,
        eval_source=test,
        evaluator=Evaluator(
            model.apply,
            batch_fn=lambda x, y: (tokens(x, task.max_len), jnp.asarray(y, jnp.int32)),
            inputs_fn=lambda x: tokens(x, task.max_len),
        ),
        embedding=_embedding(cfg, task, key, x0),
        head="head",
    )


def _embedding(cfg, task, key, x0) -> Embedding:
    encoder = TransformerEncoder(cfg, pad_id=words.PAD)
    return Embedding(jax.jit(encoder.init)(key, x0), encoder.apply, task.ways)


FAMILY = Family(WordsTask, build, eval_keys=("task.eval_split",), requires=("wordfreq",))
