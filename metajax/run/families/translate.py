"""The ``translate`` family: few-shot translation from English into a language never seen.

A small decoder :class:`~metajax.models.TransformerLM` over byte tokens (vocabulary
:data:`metajax.tasks.translate.VOCAB_SIZE`) reads ``BOS english SEP`` and writes the target
name, then END. A task is one target language; its support K (English, target) pairs of CLDR
display names (:mod:`metajax.tasks.translate`), its query Q other pairs. The loss is
next-token cross-entropy on the target bytes and END only (the mask); the metric the query
bits per target byte. Meta-test and validation languages come from families never seen in
meta-training, the test languages in two groups (``task.test_group``): scripts never seen
either, or Latin script (:func:`metajax.tasks.translate.language_groups`).

With a pretrained ``task.model`` (:mod:`metajax.run.pretrained_choice`) a pair is encoded by
its tokenizer as the prompt ``start "English: Germany\\nTranslation:"`` and the target
``" name" end`` (:class:`metajax.tasks.text_encoding.PairEncoder`), the mask on the target
and end; LoRA factors are meta-learned, the metrics are bits per token and next-token
accuracy. Greedy translation runs the whole model (the frozen trunk, if any, then the
adapted top), with its key-value cache where it has one (Llama-family models: one position
per step).

``predict_fn`` translates greedily (jitted, ``decode_len`` tokens at most): ``inputs_fn`` turns
a list of English strings into prompts, ``outputs_fn`` the generated tokens into strings, and
``batch_fn`` takes the support set as a list of (English, target) string pairs.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from metajax.models.decoding import lm_decoder
from metajax.models.losses import bits_per_byte_metric, next_token_loss
from metajax.models.metrics import text_scores
from metajax.models.transformer import TransformerConfig, TransformerLM
from metajax.run import pretrained_choice
from metajax.run.config import Config, ConfigError, require_positive
from metajax.run.pretrained_choice import SCRATCH, MappedSource, ModelChoice, Pretrained
from metajax.run.setup import Evaluator, Family, Setup
from metajax.tasks import translate
from metajax.tasks.text_encoding import PairEncoder, TranslateTokens


@pretrained_choice.documented
@dataclasses.dataclass(frozen=True)
class TaskConfig(ModelChoice):
    """Few-shot English-to-X translation tasks, and the decoder that translates.

    Attributes:
      kinds: CLDR name kinds the pairs come from: territories, languages, scripts,
        currencies.
      shots: K, support pairs per task.
      queries: Q, query pairs per task.
      max_len: tokens per sequence (BOS, English bytes, SEP, target bytes, END; or a
        pretrained model's tokens); longer pairs are dropped.
      width: scratch: Transformer width.
      depth: scratch: Transformer blocks.
      heads: scratch: attention heads.
      mlp_width: scratch: hidden width of each block's MLP.
      eval_split: meta-split evaluated: test (held-out families) or validation (for
        choosing checkpoints and rates).
      test_group: which test languages eval_split=test draws: new_script (families and
        scripts never seen in meta-training: kn, ko, lo, ml, ta, te, th) or latin (families
        never seen, written in Latin script: vi, tr, fi, sw, ...); see
        metajax.tasks.translate.language_groups. Ignored by eval_split=validation.
      decode_len: tokens generated per translation at most (END included); at most
        max_len - 3.
      train_script: which training languages meta-training draws: any (all 137) or latin
        (the 81 written in Latin script alone, for the latin test group).
    """

    kinds: tuple[str, ...] = translate.DEFAULT_KINDS
    shots: int = 8
    queries: int = 16
    max_len: int = 64
    width: int = 64
    depth: int = 2
    heads: int = 4
    mlp_width: int = 256
    eval_split: str = "test"
    decode_len: int = 56
    test_group: str = "new_script"
    train_script: str = "any"


def check(task: TaskConfig) -> None:
    """Raises ConfigError naming the first field out of range."""
    if not task.kinds or any(k not in translate.KINDS for k in task.kinds):
        raise ConfigError(f"task.kinds={task.kinds!r}: choose from {translate.KINDS}.")
    if len(set(task.kinds)) != len(task.kinds):
        raise ConfigError(f"task.kinds={task.kinds!r}: a kind is repeated.")
    require_positive(task, "shots", "queries", "width", "depth", "heads", "mlp_width")
    if task.max_len < 5:
        raise ConfigError(f"task.max_len={task.max_len} must be >= 5 (BOS, SEP, END, 2 bytes).")
    if not 1 <= task.decode_len <= task.max_len - 3:
        raise ConfigError(
            f"task.decode_len={task.decode_len} must be in [1, max_len - 3 = {task.max_len - 3}]."
        )
    if task.eval_split not in ("validation", "test"):
        raise ConfigError(f"task.eval_split={task.eval_split!r}: choose validation or test.")
    if task.test_group not in translate.TEST_GROUPS:
        raise ConfigError(
            f"task.test_group={task.test_group!r}: choose {' or '.join(translate.TEST_GROUPS)}."
        )
    if task.train_script not in translate.TRAIN_SCRIPTS:
        raise ConfigError(
            f"task.train_script={task.train_script!r}: choose "
            f"{' or '.join(translate.TRAIN_SCRIPTS)}."
        )


def transformer_config(task: TaskConfig) -> TransformerConfig:
    """The scratch decoder over :data:`metajax.tasks.translate.VOCAB_SIZE` byte tokens."""
    return TransformerConfig(
        vocab_size=translate.VOCAB_SIZE,
        width=task.width,
        depth=task.depth,
        heads=task.heads,
        mlp_width=task.mlp_width,
        max_len=task.max_len,
    )


def build(config: Config) -> Setup:
    task: TaskConfig = config.task
    pretrained_choice.check(task)
    check(task)
    if task.model != SCRATCH:
        return _build_pretrained(config, task)
    seed = config.train.seed
    model = TransformerLM(transformer_config(task))
    decoder = lm_decoder(model)  # key-value cache: one position per generated token
    # Jitted: one compile instead of many small eager ops (the same values).
    params = jax.jit(model.init)(jax.random.key(seed), jnp.zeros((1, task.max_len), jnp.int32))

    def predict_fn(adapted, inputs):
        prompts, lengths = inputs
        return translate.greedy_translate(decoder, adapted, prompts, lengths, task.decode_len)

    def batch_fn(support_pairs, y=None):
        del y  # the targets are in the pairs
        tokens, mask = translate.encode_pairs(list(support_pairs), task.max_len)
        return jnp.asarray(tokens), jnp.asarray(mask)

    def inputs_fn(query_sources):
        prompts, lengths = translate.encode_prompts(list(query_sources), task.max_len)
        return jnp.asarray(prompts), jnp.asarray(lengths)

    train, test = _sources(task, seed)
    return Setup(
        params=params,
        loss_fn=next_token_loss(model.apply),
        # Bits per target byte: all target NLL (END included) over the target bytes.
        metric_fn=bits_per_byte_metric(model.apply),
        train_source=train,
        eval_source=test,
        evaluator=Evaluator(
            predict_fn,
            batch_fn=batch_fn,
            inputs_fn=inputs_fn,
            outputs_fn=translate.to_strings,
            score_fn=translation_scores(
                predict_fn, lambda batch: translate.split_sequences(batch[0]), translate.to_strings
            ),
        ),
        head="head|embed",
    )


def translation_scores(predict_fn, split, strings):
    """``score_fn(adapted, query_batch) -> {"chrf", "exact_match"}``: the query sources
    translated greedily by ``predict_fn`` (jitted), ``strings`` of its output scored against
    the query targets; ``split(batch) -> (prompts, lengths, target strings)``."""
    predict = jax.jit(predict_fn)

    def score_fn(adapted, batch):
        prompts, lengths, references = split(batch)
        return text_scores(strings(predict(adapted, (prompts, lengths))), references)

    return score_fn


def _sources(task: TaskConfig, seed: int) -> tuple[translate.Translate, translate.Translate]:
    common = dict(
        shots=task.shots,
        queries=task.queries,
        seed=seed,
        max_len=task.max_len,
        kinds=tuple(task.kinds),
    )
    return (
        translate.Translate(split="train", train_script=task.train_script, **common),
        translate.Translate(split=task.eval_split, test_group=task.test_group, **common),
    )


def _build_pretrained(config: Config, task: TaskConfig) -> Setup:
    pre = Pretrained(task, config.train.seed, task.max_len)
    encoder = PairEncoder(
        pre.encode_ids, pre.tokenizer.decode, pre.start_id, pre.end_id, task.max_len
    )
    decode, params_of = pre.decoder()
    banned = () if pre.start_id == pre.end_id else (pre.start_id,)

    def predict_fn(adapted, inputs):
        prompts, lengths = inputs
        return decode(
            params_of(adapted),
            prompts,
            lengths,
            steps=task.decode_len,
            end_id=pre.end_id,
            pad_id=pre.end_id,
            banned_ids=banned,
        )

    loss_fn, metric_fn = pre.next_token_fns()
    to_batch = lambda b: pre.lm_batch(*b)
    train, test = (
        MappedSource(TranslateTokens(s, encoder), to_batch)
        for s in _sources(task, config.train.seed)
    )
    return Setup(
        params=pre.meta_params,
        loss_fn=loss_fn,
        metric_fn=metric_fn,
        train_source=train,
        eval_source=test,
        evaluator=Evaluator(
            predict_fn,
            batch_fn=lambda pairs, y=None: pre.lm_batch(*encoder.pairs(list(pairs))),
            inputs_fn=lambda sources: encoder.prompts(list(sources)),
            outputs_fn=encoder.strings,
            score_fn=translation_scores(
                predict_fn,
                lambda batch: encoder.split(pre.tokens_of(batch[0]), batch[1]),
                lambda generated: encoder.strings(np.asarray(generated)),
            ),
        ),
        head=r"^lora/",
        inner_mask=pre.inner_mask(pre.meta_params, config),
        wrap_optimizer=pre.wrap_optimizer(),
    )


FAMILY = Family(
    TaskConfig,
    build,
    # What is evaluated: the split and test group, the translation length.
    eval_keys=("task.eval_split", "task.test_group", "task.decode_len"),
    # CLDR names, and chrF, which is scored only after training.
    requires=("babel", "sacrebleu"),
)
