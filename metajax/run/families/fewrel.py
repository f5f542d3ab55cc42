"""The ``fewrel`` family: few-shot relation classification on FewRel-format data.

A task draws N relations of the meta-split and K sentences of each; entity markers are
inserted around the head and tail (:mod:`metajax.tasks.fewrel`) and an entity-pooled
:class:`~metajax.models.transformer.TransformerClassifier` (the states at ``[E1]`` and ``[E2]``,
concatenated) classifies them. Gradient-based algorithms adapt the whole classifier, N-way head
included; ProtoNets meta-learns the same network without its head (``Setup.embedding``).

With a pretrained ``task.model`` (:mod:`metajax.run.pretrained_choice`) the sentences are
encoded by its tokenizer with the markers as text
(:class:`metajax.tasks.text_encoding.MarkerEncoder`) and the features are the model's final
states at the last token of the two markers of ``task.pool``, concatenated. Meta-parameters:
``{"model": {"base", "lora"}, "head": N-way linear head}``; the head starts at zero (every
class equally likely) and adapts in the inner loop with the factors; ProtoNets meta-learns
``{"model": ...}`` without the head. A causal model's state at ``[E1]`` has read only what
comes before the head entity; ``pool="end"`` reads ``[/E1]`` and ``[/E2]`` instead, and
``pool="prompt"`` follows the sentence with a prompt that names both entities again and reads
the last token of each name, states that have read the whole sentence
(:data:`metajax.tasks.text_encoding.PROMPT`). ``task.num_blocks`` reads the features after an
inner block instead of the final norm.

Model inputs are ``(tokens int32 (n, L), positions int32 (n, 2))`` (with a frozen trunk,
``task.trainable_blocks``, its float32 states ``(n, L, width)`` instead of the tokens); a
user's sentences are FewRel dicts (``{"tokens": [...], "h": [name, id, [[positions]]], "t":
[...]}``), turned into inputs by ``batch_fn(sentences, labels)`` and ``inputs_fn(sentences)``.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from metajax.models.losses import accuracy_metric, classification_loss
from metajax.models.transformer import TransformerClassifier, TransformerConfig, TransformerEncoder
from metajax.run import pretrained_choice
from metajax.run.config import Config, ConfigError
from metajax.run.pretrained_choice import SCRATCH, MappedSource, ModelChoice, Pretrained
from metajax.run.setup import Embedding, Evaluator, Family, Setup
from metajax.tasks import fewrel
from metajax.tasks.text_encoding import POOLS, FewRelTokens, MarkerEncoder

# Tokens per sentence of a pretrained model's tokenizer when task.max_len is 0.
PRETRAINED_MAX_LEN = 96
HEAD_INPUTS = ("raw", "centered")
# Meta-training sentences whose mean pretrained feature centers task.head_input=centered.
CENTER_SENTENCES = 256


@pretrained_choice.documented
@dataclasses.dataclass(frozen=True)
class FewRelTask(ModelChoice):
    """FewRel N-way K-shot relation classification and the model that learns it.

    Attributes:
      protocol: cross_domain (meta-train on Wikipedia and SemEval relations, test on the 25
        news relations), in_domain (Wikipedia relations split into train, validation and 5
        test relations) or files (each split is every relation of its own files); relations
        chosen from sorted ids, see metajax.tasks.fewrel.protocol_splits.
      data_dir: folder of relative file names; none: $METAJAX_FEWREL_DIR.
      train_files: FewRel JSON files of meta-training; empty: the protocol's (cross_domain:
        val_wiki.json and val_semeval.json; in_domain: val_wiki.json).
      val_files: files of the validation relations; empty: the protocol's (as train_files).
      test_files: files of the test relations; empty: the protocol's (cross_domain:
        val_nyt.json; in_domain: the train files).
      val_relations: relations of the meta-training pool held out for validation (0: none).
      test_relations: in_domain: relations held out for meta-testing.
      ways: N relations per task.
      shots: K support sentences per relation.
      queries: query sentences per relation.
      tokenizer: scratch: word (lowercased words of the meta-training sentences, UNK for
        the rest; at equal compute it meta-learns better than bytes,
        experiments/fewrel_tokenizers.py) or byte (UTF-8 bytes, about 4 times longer).
      max_len: tokens per sentence, entity markers (and a pretrained model's start token)
        included; longer sentences are cut around the entities; 0: 48 for words, 192 for
        bytes, 96 for a pretrained model's tokens.
      vocab_size: scratch, tokenizer word: the commonest meta-training words kept.
      width: scratch: Transformer width.
      depth: scratch: Transformer blocks.
      heads: scratch: attention heads.
      mlp_width: scratch: hidden width of each block's MLP.
      eval_split: meta-split evaluated: test (relations never seen in meta-training) or
        validation.
      pool: pretrained model: start (the states at [E1] and [E2]), end (at [/E1] and
        [/E2], which have read their entity in a causal model) or prompt (at the head's and
        the tail's names restated in a prompt after the sentence, which have read all of
        it); scratch pools at start.
      head_input: pretrained model: what the head (and ProtoNets) reads of each of the two
        pooled states: raw, or centered (minus the mean pooled state of the pretrained
        model on 256 meta-training sentences, then scaled to unit root mean square). A
        language model's states share a large common direction and a few outlier
        dimensions; a zero head's first step on raw states turns them into a class bias.
    """

    protocol: str = "cross_domain"
    data_dir: str | None = None
    train_files: tuple[str, ...] = ()
    val_files: tuple[str, ...] = ()
    test_files: tuple[str, ...] = ()
    val_relations: int = 5
    test_relations: int = 5
    ways: int = 5
    shots: int = 1
    queries: int = 5
    tokenizer: str = "word"
    max_len: int = 0
    vocab_size: int = 8000
    width: int = 64
    depth: int = 2
    heads: int = 4
    mlp_width: int = 128
    eval_split: str = "test"
    pool: str = "start"
    head_input: str = "raw"


def splits(task: FewRelTask) -> fewrel.Splits:
    """The relations of each meta-split that ``task``'s protocol and files give.

    Raises:
      fewrel.FewRelError: a file cannot be read or the relations do not split.
    """
    return fewrel.protocol_splits(
        task.protocol,
        task.train_files,
        task.val_files,
        task.test_files,
        data_dir=task.data_dir,
        num_val=task.val_relations,
        num_test=task.test_relations,
    )


def sources(task: FewRelTask, seed: int) -> tuple[fewrel.FewRel, fewrel.FewRel]:
    """The meta-training source and the ``eval_split`` source, checked: every task drawable."""
    _check(task)
    try:
        meta_splits = splits(task)
        common = dict(
            ways=task.ways,
            shots=task.shots,
            queries=task.queries,
            seed=seed,
            max_len=task.max_len or fewrel.DEFAULT_MAX_LEN[task.tokenizer],
            tokenizer=task.tokenizer,
            vocab_size=task.vocab_size,
        )
        train = fewrel.FewRel(meta_splits, split="train", **common)
        test = fewrel.FewRel(meta_splits, split=task.eval_split, **common)
        train.check()
        test.check()
    except fewrel.FewRelError as e:
        hint = " (set task.data_dir or $METAJAX_FEWREL_DIR)" if "cannot read" in str(e) else ""
        raise ConfigError(f"task (protocol={task.protocol!r}): {e}{hint}") from None
    return train, test


def build(config: Config) -> Setup:
    task: FewRelTask = config.task
    pretrained_choice.check(task)
    if task.pool not in POOLS:
        raise ConfigError(f"task.pool={task.pool!r}: choose one of {', '.join(POOLS)}.")
    if task.head_input not in HEAD_INPUTS:
        raise ConfigError(
            f"task.head_input={task.head_input!r}: choose one of {', '.join(HEAD_INPUTS)}."
        )
    if task.model != SCRATCH:
        return _build_pretrained(config, task)
    if task.head_input != "raw":
        raise ConfigError(
            f"task.head_input={task.head_input!r}: centering needs a pretrained task.model."
        )
    if task.pool != "start":
        raise ConfigError(f"task.pool={task.pool!r}: the scratch classifier pools at start.")
    train, test = sources(task, config.train.seed)
    net = TransformerConfig(
        vocab_size=train.num_tokens,
        width=task.width,
        depth=task.depth,
        heads=task.heads,
        mlp_width=task.mlp_width,
        max_len=train.max_len,
    )
    model = TransformerClassifier(net, num_classes=task.ways, pad_id=train.pad_id, pool="entity")
    encoder = TransformerEncoder(net, pad_id=train.pad_id, pool="entity")
    apply = lambda params, x: model.apply(params, *x)
    embed = lambda params, x: encoder.apply(params, *x)
    x0 = (jnp.zeros((task.ways, train.max_len), jnp.int32), jnp.zeros((task.ways, 2), jnp.int32))
    # One compiled init: op by op, each initializer of each shape would compile on its own.
    params = jax.jit(model.init)(jax.random.key(config.train.seed), *x0)
    # The encoder's parameters are the classifier's minus the head: one initial trunk.
    trunk = {"params": {k: v for k, v in params["params"].items() if k != "head"}}

    def batch_fn(sentences, labels):
        return train.encode(sentences), _labels(labels, len(sentences), task.ways)

    return Setup(
        params=params,
        loss_fn=classification_loss(apply),
        metric_fn=accuracy_metric(apply),
        train_source=train,
        eval_source=test,
        evaluator=Evaluator(apply, batch_fn=batch_fn, inputs_fn=train.encode),
        embedding=Embedding(trunk, embed, task.ways),
        head="head",
    )


def _check(task: FewRelTask) -> None:
    for name, low in (
        ("ways", 2),
        ("shots", 1),
        ("queries", 1),
        ("vocab_size", 1),
        ("width", 1),
        ("depth", 1),
        ("heads", 1),
        ("mlp_width", 1),
        ("val_relations", 0),
        ("test_relations", 0),
        ("max_len", 0),
    ):
        if getattr(task, name) < low:
            raise ConfigError(f"task.{name}={getattr(task, name)} must be >= {low}.")
    if 0 < task.max_len < 4:
        raise ConfigError(f"task.max_len={task.max_len}: needs room for the 4 entity markers.")
    if task.tokenizer not in fewrel.TOKENIZERS:
        raise ConfigError(f"task.tokenizer={task.tokenizer!r}: choose 'word' or 'byte'.")
    if task.protocol not in ("cross_domain", "in_domain", "files"):
        raise ConfigError(
            f"task.protocol={task.protocol!r}: choose cross_domain, in_domain or files."
        )
    if task.eval_split not in ("validation", "test"):
        raise ConfigError(f"task.eval_split={task.eval_split!r}: choose test or validation.")
    if task.width % task.heads:
        raise ConfigError(f"task.width={task.width} is not divisible by task.heads={task.heads}.")


def _build_pretrained(config: Config, task: FewRelTask) -> Setup:
    # The relations, splits and their checks are the scratch family's; the FewRel source's
    # own tokenizer is never used (bytes need no vocabulary pass over the files).
    train_rel, test_rel = sources(dataclasses.replace(task, tokenizer="byte"), config.train.seed)
    max_len = task.max_len or PRETRAINED_MAX_LEN
    pre = Pretrained(task, config.train.seed, max_len, lm_head=False)
    try:
        encoder = MarkerEncoder(pre.encode_ids, pre.start_id, max_len, task.pool)
    except ValueError as e:
        raise ConfigError(f"task.{e}") from None

    def pooled(params, x):
        inputs, positions = x
        states = pre.apply(params["model"], inputs, features=True)
        return jnp.take_along_axis(states, positions[:, :, None], axis=1)  # (n, 2, d)

    train_tokens = FewRelTokens(train_rel, encoder)
    center = None
    if task.head_input == "centered":
        center = _mean_pooled(jax.jit(pooled), {"model": pre.meta_params}, train_tokens, pre)

    def embed(params, x):
        states = pooled(params, x)
        if center is not None:
            states = states - center
            states = states * jax.lax.rsqrt(jnp.mean(states**2, -1, keepdims=True) + 1e-6)
        return states.reshape(states.shape[0], -1)

    def apply(params, x):
        return embed(params, x) @ params["head"]["kernel"] + params["head"]["bias"]

    def inputs(sentences):
        tokens, positions = encoder(list(sentences))
        return pre.inputs(tokens), positions

    # A zero head: every class starts equally likely, and the first inner step moves each
    # class's weights towards the mean features of its support sentences.
    width = 2 * pre.width
    head = {"kernel": jnp.zeros((width, task.ways)), "bias": jnp.zeros((task.ways,))}
    params = {"model": pre.meta_params, "head": head}
    to_inputs = lambda b: ((pre.inputs(b[0][0]), b[0][1]), b[1])
    return Setup(
        params=params,
        loss_fn=classification_loss(apply),
        metric_fn=accuracy_metric(apply),
        train_source=MappedSource(train_tokens, to_inputs),
        eval_source=MappedSource(FewRelTokens(test_rel, encoder), to_inputs),
        evaluator=Evaluator(
            apply,
            batch_fn=lambda sentences, labels: (
                inputs(sentences),
                _labels(labels, len(sentences), task.ways),
            ),
            inputs_fn=inputs,
        ),
        embedding=Embedding({"model": pre.meta_params}, embed, task.ways),
        head=r"^head/",
        inner_mask=pre.inner_mask(params, config),
        wrap_optimizer=pre.wrap_optimizer(),
    )


def _mean_pooled(pooled, params, source: FewRelTokens, pre: Pretrained) -> jax.Array:
    """The mean ``(2, width)`` of ``pooled`` over :data:`CENTER_SENTENCES` meta-training
    sentences, taken in turn from each relation (the same for every seed and task shape, so
    evaluation at other shots centers as training did), under the pretrained weights (the
    LoRA factors start at zero); computed once, in batches of 32."""
    tokens, positions = source.first_sentences(CENTER_SENTENCES)
    total = 0.0
    for lo in range(0, len(tokens), 32):
        x = (pre.inputs(tokens[lo : lo + 32]), positions[lo : lo + 32])
        total = total + np.asarray(pooled(params, x), np.float64).sum(0)
    return jnp.asarray(total / len(tokens), jnp.float32)


def _labels(labels, n: int, ways: int) -> np.ndarray:
    """A user's support labels, checked: ``n`` integers in ``0 .. ways - 1``."""
    labels = np.asarray(labels)
    if labels.shape != (n,) or not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(
            f"labels must be {n} integers (one per sentence), got {labels.dtype} {labels.shape}."
        )
    if labels.min() < 0 or labels.max() >= ways:
        raise ValueError(f"labels must lie in 0..{ways - 1}, got {sorted(set(labels.tolist()))}.")
    return labels.astype(np.int32)


FAMILY = Family(
    FewRelTask,
    build,
    # What is evaluated, not what was trained. The word vocabulary comes from the train
    # files alone, so evaluation may read other test files (other train or validation
    # files would change the relations and so the vocabulary) and draw tasks with another
    # number of shots (the classifier's head has one output per way, not per shot).
    eval_keys=("task.eval_split", "task.data_dir", "task.test_files", "task.shots"),
)
