"""The ``fewrel_gpt2`` family: FewRel few-shot relation classification on a pretrained GPT-2.

The relations, meta-splits and their checks are those of the ``fewrel`` family
(:func:`metajax.tasks.fewrel.protocol_splits`, :meth:`metajax.tasks.fewrel.FewRel.check`);
a task draws its relations and sentences exactly as :class:`~metajax.tasks.fewrel.FewRel`
does (the same :func:`~metajax.tasks.base.task_rng` draws, so the same sentences for the same
seed), but the sentences are encoded with the checkpoint's GPT-2 BPE tokenizer.

Encoding (:class:`MarkerEncoder`): ``<|endoftext|>`` (GPT-2's document start), then the
sentence with the entity markers inserted as text, `` [E1] head [/E1] ... [E2] tail [/E2]``.
Every piece, a run of words or a marker, is encoded on its own with a leading space, so a
marker is always the same token ids (`` [``, ``E``, ``1``, ``]`` for GPT-2) and no BPE merge
crosses a marker. A model reads the final hidden state at the last token of a marker, the
``]``, which has read the whole marker. Truncation to ``max_len`` keeps every marker token
(``fewrel``'s ranking: the tokens between the entities nearest a marker first, then those
outside nearest them).

Entity pooling: the states at the head-start and tail-start markers, concatenated
(``pool="start"``, as BERT-style FewRel encoders do). GPT-2 is causal, so a state has read
only what comes before it: the tail-start state has seen the head entity and the words
between them, the head-start state only the words before the head. ``pool="end"`` reads
the closing markers ``[/E1]`` and ``[/E2]`` instead, which have read their own entity.

Without a checkpoint the model is a random-weights GPT-2 of ``size`` over UTF-8 bytes (ids
0..255, start and padding 256), for benchmarks and smoke tests.

Meta-parameters: ``{"gpt2": {"base": GPT-2 weights, "lora": factors}, "head": N-way linear
head}``. MAML, FOMAML and ANIL classify with the head, which starts at zero and adapts in
the inner loop with the factors (``adapt="lora"``), the factors and the LayerNorms
(``"lora+norm"``) or everything (``"all"``); ANIL adapts the head alone. ProtoNets
meta-learns ``{"gpt2": ...}`` without the head (``Setup.embedding``). With ``freeze_base``
the outer loop leaves the GPT-2 weights as they are.

Model inputs are ``(tokens int32 (n, max_len), positions int32 (n, 2))``; a user's sentences
are FewRel dicts (``{"tokens": [...], "h": [name, id, [[positions]]], "t": [...]}``), turned
into inputs by ``batch_fn(sentences, labels)`` and ``inputs_fn(sentences)``.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from metajax import lora as lora_lib
from metajax.models.gpt2 import GPT2_SIZES
from metajax.models.losses import accuracy_metric, classification_loss
from metajax.run.config import Config, ConfigError
from metajax.run.families import fewrel as fewrel_family
from metajax.run.families import words_gpt2
from metajax.run.setup import Embedding, Setup
from metajax.tasks import fewrel
from metajax.tasks.base import split_id, task_rng
from metajax.types import Task

POOLS = {"start": (0, 2), "end": (1, 3)}  # indices into fewrel.MARKERS


@dataclasses.dataclass(frozen=True)
class FewRelGPT2Task:
    """FewRel N-way K-shot relation classification with a GPT-2 encoder and LoRA factors.

    Attributes:
      protocol: cross_domain, in_domain or files, as the fewrel family
        (metajax.tasks.fewrel.protocol_splits).
      data_dir: folder of relative file names; none: $METAJAX_FEWREL_DIR or
        ../shared/data/fewrel.
      train_files: FewRel JSON files of meta-training; empty: the protocol's.
      val_files: files of the validation relations; empty: the protocol's.
      test_files: files of the test relations; empty: the protocol's.
      val_relations: relations of the meta-training pool held out for validation (0: none).
      test_relations: in_domain: relations held out for meta-testing.
      ways: N relations per task.
      shots: K support sentences per relation.
      queries: query sentences per relation.
      max_len: GPT-2 tokens per sentence, the start token and the 4 entity markers
        included; longer sentences are cut around the entities.
      pool: start (the states at the head-start and tail-start markers) or end (at the
        closing markers, which have read their entity in a causal model).
      eval_split: meta-split evaluated: test (relations never seen in meta-training) or
        validation.
      checkpoint: a Hugging Face GPT-2 folder (config.json, model.safetensors and a
        tokenizer); none: a random-weights GPT-2 of size over UTF-8 byte tokens.
      size: GPT-2 size without a checkpoint: gpt2, gpt2-medium, gpt2-large, gpt2-xl or tiny.
      lora_rank: rank of the LoRA factors (>= 1).
      lora_alpha: LoRA scale numerator: updates are lora_alpha / lora_rank * A @ B (> 0).
      lora_targets: regex of the kernel paths that get LoRA factors.
      adapt: what the inner loop adapts besides the head: lora, lora+norm (the factors and
        the LayerNorms) or all.
      freeze_base: the outer loop trains only the factors and the head (and the LayerNorms
        for lora+norm); false: it trains every weight.
      remat: recompute each GPT-2 block in the backward pass instead of storing it.
      dtype: compute dtype, float32 or bfloat16 (the weights stay float32).
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
    max_len: int = 96
    pool: str = "start"
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


TaskConfig = FewRelGPT2Task
# Keys that `metajax eval --set` may change on a trained workdir: what is evaluated, not
# what was trained. The tokenizer needs no vocabulary of the data, so any FewRel-format
# test file can be evaluated; the checkpoint folder is read for the tokenizer and the
# shapes only (the weights come from the workdir), so it may move.
EVAL_KEYS = ("task.eval_split", "task.data_dir", "task.test_files", "task.checkpoint")


class MarkerEncoder:
    """FewRel sentences -> ``(tokens int32 (n, max_len), positions int32 (n, 2))``.

    ``tokens[i] = [start, pieces of sentence i..., start (padding)...]`` as the module
    docstring says; ``positions[i]`` are the indices of the last token of the two markers
    of ``pool``. Right padding needs no attention mask: no real token sees the pads after
    it in a causal model.

    Args:
      encode_ids: ``text -> list of token ids`` (no special tokens).
      start_id: id of the start token, also the padding.
      max_len: tokens per sequence.
      pool: ``"start"`` or ``"end"`` (:data:`POOLS`).

    Raises:
      ValueError: ``max_len`` has no room for the start token and the four markers.
    """

    def __init__(
        self, encode_ids: Callable[[str], list[int]], start_id: int, max_len: int, pool: str
    ):
        self.encode_ids, self.start_id, self.max_len = encode_ids, start_id, max_len
        self.slots = POOLS[pool]
        self.marker_ids = tuple(tuple(encode_ids(" " + m)) for m in fewrel.MARKERS)
        self.min_len = 1 + sum(len(m) for m in self.marker_ids)
        # Marker s's last token is entry ends[s] of the marker tokens listed marker by marker.
        self._ends = np.cumsum([len(m) for m in self.marker_ids]) - 1
        if max_len < self.min_len:
            raise ValueError(
                f"max_len={max_len}: needs room for the start token and the 4 entity markers "
                f"({self.min_len} tokens)."
            )

    def __call__(self, sentences: Sequence[Any]) -> tuple[np.ndarray, np.ndarray]:
        """Encodes :data:`~metajax.tasks.fewrel.Sentence` tuples or FewRel dicts."""
        if isinstance(sentences, dict):
            raise TypeError("expected a list of sentences, got one sentence dict.")
        tokens = np.full((len(sentences), self.max_len), self.start_id, np.int32)
        positions = np.empty((len(sentences), 2), np.int32)
        for i, sent in enumerate(sentences):
            if isinstance(sent, dict):
                sent = fewrel.parse_sentence(sent, f"sentence {i}")
            ids, where = self.encode_one(sent)
            tokens[i, : len(ids)] = ids
            positions[i] = where
        return tokens, positions

    def encode_one(self, sent: fewrel.Sentence) -> tuple[list[int], tuple[int, int]]:
        """One sentence's ids (start token first, at most ``max_len``) and its two positions."""
        ids: list[int] = []
        marker_tokens: list[int] = []  # indices of every marker token, marker by marker
        for piece in _pieces(sent):
            if isinstance(piece, int):
                marker_tokens.extend(range(len(ids), len(ids) + len(self.marker_ids[piece])))
                ids.extend(self.marker_ids[piece])
            else:
                ids.extend(self.encode_ids(" " + piece))
        kept, where = fewrel._truncate(ids, marker_tokens, self.max_len - 1)
        head, tail = (where[self._ends[s]] + 1 for s in self.slots)  # + 1: the start token
        return [self.start_id, *kept], (head, tail)


def _pieces(sent: fewrel.Sentence) -> list[str | int]:
    """The sentence as runs of words (str) and markers (int, an index into MARKERS).

    Nested spans: the outer entity opens first and closes last (as
    :func:`metajax.tasks.fewrel.encode`).
    """
    words, (h0, h1), (t0, t1) = sent
    opens = sorted([(h0, h1, 0), (t0, t1, 2)], key=lambda s: -s[1])
    closes = sorted([(h0, h1, 1), (t0, t1, 3)], key=lambda s: -s[0])
    pieces: list[str | int] = []
    run: list[str] = []

    def flush():
        if run:
            pieces.append(" ".join(run))
            run.clear()

    for i, word in enumerate(words):
        for start, _, marker in opens:
            if start == i:
                flush()
                pieces.append(marker)
        run.append(word)
        for _, stop, marker in closes:
            if stop == i + 1:
                flush()
                pieces.append(marker)
    flush()
    return pieces


class GPT2FewRelTasks:
    """N-way K-shot tasks of one meta-split, in GPT-2 tokens.

    ``sample(step, num_tasks, first_task=0)`` makes the draws of
    :meth:`metajax.tasks.fewrel.FewRel.sample` (a pure function of seed, split, step and
    task index) and encodes the drawn sentences with a :class:`MarkerEncoder` (each once,
    then cached). Returns ``Task(support=((tokens, positions), labels), query=...)``: tokens
    int32 ``(T, N*K, max_len)``, positions int32 ``(T, N*K, 2)``, labels int32 ``(T, N*K)``
    in 0..N-1, grouped by relation; the query likewise with N*Q.

    Args:
      source: the checked split and task shape (its files, split, ways, shots, queries and
        seed are used; its own tokenizer is not).
      encoder: the GPT-2 encoding of a sentence.
    """

    def __init__(self, source: fewrel.FewRel, encoder: MarkerEncoder):
        source.check()
        self.source, self.encoder = source, encoder
        self._relations = list(fewrel.resolve(source.files)[source.split].values())
        self._cache: dict[tuple[int, int], tuple[list[int], tuple[int, int]]] = {}

    def _encoded(self, relation: int, index: int) -> tuple[list[int], tuple[int, int]]:
        key = (relation, index)
        if key not in self._cache:
            self._cache[key] = self.encoder.encode_one(self._relations[relation][index])
        return self._cache[key]

    def sample(self, step: int, num_tasks: int, first_task: int = 0) -> Task:
        src = self.source
        n, k, q, length = src.ways, src.shots, src.queries, self.encoder.max_len
        sid = split_id(src.split)
        tokens = np.full((num_tasks, n, k + q, length), self.encoder.start_id, np.int32)
        positions = np.empty((num_tasks, n, k + q, 2), np.int32)
        perm = np.empty((num_tasks, n), np.int32)
        for t in range(num_tasks):
            rng = task_rng(src.seed, sid, step, first_task + t)
            chosen = rng.choice(len(self._relations), n, replace=False)
            perm[t] = rng.permutation(n)
            for c, r in enumerate(chosen):
                picks = rng.choice(len(self._relations[r]), k + q, replace=False)
                for j, pick in enumerate(picks):
                    ids, where = self._encoded(int(r), int(pick))
                    tokens[t, c, j, : len(ids)] = ids
                    positions[t, c, j] = where
        return fewrel.tasks_from_draws(tokens, positions, perm, k)


def check(task: FewRelGPT2Task) -> None:
    """Range checks of the model's values that need no files (the fewrel family checks the
    data's)."""
    if task.pool not in POOLS:
        raise ConfigError(f"task.pool={task.pool!r}: choose start or end.")
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
    if task.adapt not in words_gpt2.ADAPT_MODES:
        raise ConfigError(
            f"task.adapt={task.adapt!r}: choose one of {', '.join(words_gpt2.ADAPT_MODES)}."
        )
    if task.dtype not in words_gpt2.DTYPES:
        raise ConfigError(
            f"task.dtype={task.dtype!r}: choose one of {', '.join(words_gpt2.DTYPES)}."
        )


def fewrel_sources(task: FewRelGPT2Task, seed: int) -> tuple[fewrel.FewRel, fewrel.FewRel]:
    """The meta-training and ``eval_split`` relation sources, checked by the fewrel family:
    files readable, splits disjoint, N relations and K + Q sentences per relation."""
    names = {f.name for f in dataclasses.fields(fewrel_family.FewRelTask)}
    shared = {f.name: getattr(task, f.name) for f in dataclasses.fields(task) if f.name in names}
    del shared["max_len"]  # GPT-2 tokens, checked by MarkerEncoder; FewRel's are unused
    return fewrel_family.sources(fewrel_family.FewRelTask(**shared, tokenizer="byte"), seed)


def marker_encoder(task: FewRelGPT2Task, model_encoder: words_gpt2.TokenEncoder) -> MarkerEncoder:
    """The sentence encoder over the model's tokens, its start token the end-of-text one."""
    try:
        return MarkerEncoder(
            model_encoder.encode_ids, model_encoder.end_id, task.max_len, task.pool
        )
    except ValueError as e:
        raise ConfigError(f"task.{e}") from None


def build(config: Config) -> Setup:
    task: FewRelGPT2Task = config.task
    check(task)
    seed = config.train.seed
    train_rel, test_rel = fewrel_sources(task, seed)
    model, base, token_encoder = words_gpt2.load_model(task, seed)
    encoder = marker_encoder(task, token_encoder)
    lora = lora_lib.LoRA(
        rank=task.lora_rank, targets=task.lora_targets, alpha=float(task.lora_alpha)
    )
    try:
        gpt2 = lora.init(base, jax.random.fold_in(jax.random.key(seed), 1))
    except (ValueError, TypeError) as e:
        raise ConfigError(f"task.lora_targets={task.lora_targets!r}: {e}") from None

    def embed(params, x):
        tokens, positions = x
        states = model.apply(lora.merge(params["gpt2"]), tokens, method="features")
        pooled = jnp.take_along_axis(states, positions[:, :, None], axis=1)  # (n, 2, d)
        return pooled.reshape(pooled.shape[0], -1)

    def apply(params, x):
        features = embed(params, x)
        return features @ params["head"]["kernel"] + params["head"]["bias"]

    width = 2 * model.config.n_embd
    # A zero head: every class starts equally likely, and the first inner step moves each
    # class's weights towards the mean features of its support sentences.
    head = {"kernel": jnp.zeros((width, task.ways)), "bias": jnp.zeros((task.ways,))}
    params = {"gpt2": gpt2, "head": head}

    def batch_fn(sentences, labels):
        return encoder(list(sentences)), _labels(labels, len(sentences), task.ways)

    return Setup(
        params,
        classification_loss(apply),
        accuracy_metric(apply),
        GPT2FewRelTasks(train_rel, encoder),
        GPT2FewRelTasks(test_rel, encoder),
        apply,
        embedding=Embedding({"gpt2": gpt2}, embed, task.ways),
        head=r"^head/",
        batch_fn=batch_fn,
        inputs_fn=lambda sentences: encoder(list(sentences)),
        inner_mask=_inner_mask(params, task.adapt) if _has_inner_loop(config) else None,
        wrap_optimizer=(
            (lambda tx: words_gpt2.freeze_base(tx, task.adapt)) if task.freeze_base else None
        ),
    )


def _labels(labels: Any, n: int, ways: int) -> np.ndarray:
    """A user's support labels, checked: ``n`` integers in ``0 .. ways - 1``."""
    labels = np.asarray(labels)
    if labels.shape != (n,) or not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(
            f"labels must be {n} integers (one per sentence), got {labels.dtype} {labels.shape}."
        )
    if labels.min() < 0 or labels.max() >= ways:
        raise ValueError(f"labels must lie in 0..{ways - 1}, got {sorted(set(labels.tolist()))}.")
    return labels.astype(np.int32)


def _inner_mask(params: dict[str, Any], adapt: str) -> Any:
    """The leaves the inner loop adapts: the head, and the GPT-2's leaves of ``adapt``;
    None for ``"all"`` (every leaf)."""
    if adapt == "all":
        return None
    head = jax.tree.map(lambda _: True, params["head"])
    return {"gpt2": lora_lib.inner_mask(params["gpt2"], adapt), "head": head}


def _has_inner_loop(config: Config) -> bool:
    """False for metric-based algorithms (ProtoNets): they adapt no parameters, so there is
    nothing for a mask to restrict, and the runner refuses a mask they cannot take."""
    from metajax.run.build import ALGORITHMS

    spec = ALGORITHMS.get(config.algorithm.name)
    return spec is None or not spec.metric_based
