"""Few-shot relation classification on FewRel-format data (Han et al., 2018; Gao et al., 2019).

A FewRel file maps a relation id to its sentences; a sentence is a dict ``{"tokens": [words],
"h": [name, id, [[positions of mention 1], ...]], "t": [...]}`` (head and tail entity). Only
the first mention of each entity is used, as its span ``min .. max`` of the listed positions.

Entity markers: ``[E1] head words [/E1]`` and ``[E2] tail words [/E2]`` are inserted around the
spans; a model reads the states at the ``[E1]`` and ``[E2]`` tokens (their indices are the
``(n, 2)`` "positions" array beside the tokens). Two tokenizations:

- ``"byte"``: UTF-8 bytes of the words joined by single spaces (ids 0..255), ``PAD = 256`` and
  the four markers 257..260 (``BYTE_VOCAB_SIZE = 261``); the space before a word goes before
  its opening markers.
- ``"word"``: lowercased words; ``PAD = 0``, ``UNK = 1``, markers 2..5, then the ``vocab_size``
  most frequent words of the meta-training split's sentences (ties alphabetical). Words seen
  only in validation or test relations are UNK, so nothing of the held-out data leaks in.

Truncation to ``max_len`` keeps all four markers. Tokens are ranked: first those between the
first opening and the last closing marker, nearest a marker first; then those outside, nearest
that stretch first (ties: the earlier token). The best ``max_len`` are kept in their order. So
when both entities fit, the result is a contiguous window centred on them; when they do not,
the middle of the gap between them (and of over-long names) is dropped.

Meta-splits are by relation and must be disjoint (checked). :func:`protocol_splits` gives the
two standard protocols over the shared files, from sorted relation ids: ``cross_domain``
(meta-train on Wikipedia and SemEval relations, meta-test on the 25 news relations of
``val_nyt.json``) and ``in_domain`` (Wikipedia only; 5 test relations).
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import json
import os
from pathlib import Path
from typing import Any

import numpy as np

from metajax.tasks.base import TaskSource, split_id, task_rng
from metajax.types import Task

BYTE_PAD, BYTE_VOCAB_SIZE = 256, 261
WORD_PAD, WORD_UNK, WORD_SPECIALS = 0, 1, 6
MARKERS = ("[E1]", "[/E1]", "[E2]", "[/E2]")
_MARKER_IDS = {"byte": (257, 258, 259, 260), "word": (2, 3, 4, 5)}
TOKENIZERS = ("byte", "word")
# About 95 % of the default meta-training sentences fit, markers included.
DEFAULT_MAX_LEN = {"byte": 192, "word": 48}

# The folder of relative file names when no data_dir is given.
ENV = "METAJAX_FEWREL_DIR"
WIKI, NYT, SEMEVAL = "val_wiki.json", "val_nyt.json", "val_semeval.json"


class FewRelError(ValueError):
    """FewRel data or a task setting that cannot work; the message names file, relation, field."""


# One sentence: its words and the half-open spans [start, stop) of head and tail.
Sentence = tuple[tuple[str, ...], tuple[int, int], tuple[int, int]]


def default_data_dir() -> Path | None:
    """``$METAJAX_FEWREL_DIR``, or none when it is unset."""
    folder = os.environ.get(ENV)
    return Path(folder) if folder else None


def parse_sentence(inst: Any, where: str) -> Sentence:
    """Checks one FewRel instance (a dict with ``tokens``, ``h``, ``t``) and returns it as a
    :data:`Sentence`. ``where`` names it in errors (file, relation, index)."""
    if not isinstance(inst, dict) or not {"tokens", "h", "t"} <= inst.keys():
        raise FewRelError(f"{where}: expected a dict with keys tokens, h, t; got {inst!r:.80}.")
    words = inst["tokens"]
    if not words or not all(isinstance(w, str) for w in words) or isinstance(words, str):
        raise FewRelError(f"{where}: tokens must be a non-empty list of strings.")
    spans = []
    for key in ("h", "t"):
        ent = inst[key]
        mentions = ent[2] if isinstance(ent, list | tuple) and len(ent) >= 3 else None
        if not mentions or not isinstance(mentions, list | tuple) or not mentions[0]:
            raise FewRelError(f"{where}: {key} must be [name, id, [[token positions], ...]].")
        pos = mentions[0]
        if not all(isinstance(p, int) and not isinstance(p, bool) for p in pos):
            raise FewRelError(f"{where}: {key} positions must be integers, got {pos}.")
        if min(pos) < 0 or max(pos) >= len(words):
            raise FewRelError(
                f"{where}: {key} span {pos} lies outside the sentence's {len(words)} tokens."
            )
        spans.append((min(pos), max(pos) + 1))
    return tuple(words), spans[0], spans[1]


@functools.lru_cache(maxsize=16)
def load_file(path: str) -> dict[str, tuple[Sentence, ...]]:
    """One FewRel JSON file, checked: ``{relation id: sentences}`` (cached per path)."""
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        # Only a name looked up in the default folder is helped by pointing elsewhere.
        default = default_data_dir()
        hint = (
            f" (relative names are looked up in {default}: set task.data_dir or "
            f"${ENV} to their folder)"
            if default is not None and default.resolve() in Path(path).resolve().parents
            else ""
        )
        raise FewRelError(f"{path}: no such FewRel JSON file{hint}.") from None
    except (OSError, json.JSONDecodeError) as e:
        raise FewRelError(f"{path}: cannot read a FewRel JSON file: {e}") from None
    if not isinstance(data, dict) or not data:
        raise FewRelError(
            f"{path}: not FewRel format: expected a non-empty JSON object mapping "
            f"relation ids to lists of sentences, got {type(data).__name__}."
        )
    out = {}
    for rel, insts in data.items():
        if not isinstance(insts, list) or not insts:
            raise FewRelError(f"{path}: relation {rel!r}: expected a non-empty list of sentences.")
        out[rel] = tuple(
            parse_sentence(inst, f"{path}: relation {rel!r} sentence {i}")
            for i, inst in enumerate(insts)
        )
    return out


def load_relations(paths: tuple[str, ...]) -> dict[str, tuple[Sentence, ...]]:
    """Relations of several files pooled; a relation in two files gets both files' sentences."""
    pooled: dict[str, tuple[Sentence, ...]] = {}
    for path in paths:
        for rel, sents in load_file(str(path)).items():
            pooled[rel] = pooled.get(rel, ()) + sents
    return pooled


@dataclasses.dataclass(frozen=True)
class Splits:
    """Files and relations of the three meta-splits.

    Attributes:
      train_files, val_files, test_files: FewRel JSON paths of each split.
      train_relations, val_relations, test_relations: the relation ids each split uses;
        None: every relation of its files.
      vocab_exclude: relations of the train files whose sentences the word vocabulary must
        not see (those held out within the same files: validation, in-domain test). The
        vocabulary does not depend on the test files, so a trained model can be evaluated
        on any other FewRel-format file.
    """

    train_files: tuple[str, ...]
    val_files: tuple[str, ...]
    test_files: tuple[str, ...]
    train_relations: tuple[str, ...] | None = None
    val_relations: tuple[str, ...] | None = None
    test_relations: tuple[str, ...] | None = None
    vocab_exclude: tuple[str, ...] = ()

    def parts(self, split: str) -> tuple[tuple[str, ...], tuple[str, ...] | None]:
        """``(files, relation ids or None)`` of ``"train"``, ``"validation"`` or ``"test"``."""
        i = split_id(split)
        files = (self.train_files, self.val_files, self.test_files)[i]
        return files, (self.train_relations, self.val_relations, self.test_relations)[i]


@functools.lru_cache(maxsize=8)
def resolve(splits: Splits) -> dict[str, dict[str, tuple[Sentence, ...]]]:
    """``{split: {relation: sentences}}``, checked: named relations exist, splits are disjoint."""
    out = {}
    for split in ("train", "validation", "test"):
        files, wanted = splits.parts(split)
        pooled = load_relations(tuple(files))
        missing = sorted(set(wanted or ()) - pooled.keys())
        if missing:
            raise FewRelError(f"{split} relations {missing} are not in files {list(files)}.")
        out[split] = {r: pooled[r] for r in sorted(pooled if wanted is None else wanted)}
    for a, b in (("train", "validation"), ("train", "test"), ("validation", "test")):
        shared = sorted(out[a].keys() & out[b].keys())
        if shared:
            raise FewRelError(
                f"relation ids {shared} are in both the {a} and the {b} split; "
                "meta-splits must not share relations."
            )
    return out


def _spread(ids: list[str], num: int, what: str) -> list[str]:
    # Every (len/num)-th id of the sorted list: deterministic and spread over the id range.
    if not 0 <= num <= len(ids):
        raise FewRelError(f"{what}={num}: need 0 .. {len(ids)} (the relations available).")
    return [ids[i * len(ids) // num] for i in range(num)]


def protocol_splits(
    protocol: str,
    train_files: tuple[str, ...] = (),
    val_files: tuple[str, ...] = (),
    test_files: tuple[str, ...] = (),
    data_dir: str | Path | None = None,
    num_val: int = 5,
    num_test: int = 5,
) -> Splits:
    """The meta-splits of a protocol; relative paths are under ``data_dir``
    (default :func:`default_data_dir`).

    - ``"cross_domain"``: files default to train = validation = (wiki, semeval), test =
      (nyt,). Test: every relation of the test files. The pool: the other files' relations
      minus the test ones (the 8 Wikipedia relations that also occur in the news file leave
      it). Validation: ``num_val`` pool relations of the validation files, every
      (pool / num_val)-th of the sorted ids; train: the rest of the train files' pool. Default:
      25 test, 5 validation (Cause-Effect(e1,e2), Content-Container(e2,e1),
      Instrument-Agency(e2,e1), P155, P364), 20 train relations. A validation relation's
      reverse-direction twin (SemEval) may be in train.
    - ``"in_domain"``: one set of files (default (wiki,)); from their sorted relation ids,
      ``num_test`` evenly spread ones are test (P155, P2094, P361, P410, P463), then
      ``num_val`` of the remaining 11 are validation (P177, P25, P364, P412, P59), the rest
      (6) train; ``num_val=0`` meta-trains on all 11 and leaves validation empty.
    - ``"files"``: each split is every relation of its own files (all three needed).
    """
    root = Path(data_dir) if data_dir is not None else default_data_dir()

    def paths(files):
        if root is None and not all(Path(f).is_absolute() for f in files):
            raise FewRelError(
                f"no FewRel data folder for {', '.join(files)}: set task.data_dir or ${ENV} "
                "to the folder of the FewRel JSON files."
            )
        return tuple(str(f if root is None else root / f) for f in files)  # absolute f stays

    if protocol == "files":
        if not (train_files and val_files and test_files):
            raise FewRelError("protocol 'files' needs train_files, val_files and test_files.")
        return Splits(paths(train_files), paths(val_files), paths(test_files))
    if protocol == "in_domain":
        files = paths(train_files or (WIKI,))
        if any(f and paths(f) != files for f in (val_files, test_files)):
            raise FewRelError(
                "protocol 'in_domain' splits train_files' relations; "
                "leave val_files and test_files empty."
            )
        ids = sorted(load_relations(files))
        test = _spread(ids, num_test, "num_test")
        pool = [r for r in ids if r not in test]
        val = _spread(pool, num_val, "num_val")
        train = [r for r in pool if r not in val]
        return Splits(
            files,
            files,
            files,
            tuple(train),
            tuple(val),
            tuple(test),
            vocab_exclude=tuple(sorted(val + test)),
        )
    if protocol == "cross_domain":
        tr, va = paths(train_files or (WIKI, SEMEVAL)), paths(val_files or (WIKI, SEMEVAL))
        te = paths(test_files or (NYT,))
        test = set(load_relations(te))
        train_ids, val_ids = set(load_relations(tr)) - test, set(load_relations(va)) - test
        val = _spread(sorted(val_ids), num_val, "num_val")
        train = sorted(train_ids - set(val))
        return Splits(tr, va, te, tuple(train), tuple(val), None, vocab_exclude=tuple(val))
    raise FewRelError(f"protocol={protocol!r}: expected cross_domain, in_domain or files.")


@functools.lru_cache(maxsize=8)
def build_vocab(splits: Splits, vocab_size: int) -> dict[str, int]:
    """Word ids of the ``vocab_size`` commonest lowercased words of the train files'
    sentences, less those of ``splits.vocab_exclude`` (ties alphabetical), numbered from
    ``WORD_SPECIALS``."""
    resolve(splits)  # the splits are checked first
    relations = load_relations(tuple(splits.train_files))
    counts = collections.Counter(
        w.lower()
        for rel, sents in relations.items()
        if rel not in splits.vocab_exclude
        for s in sents
        for w in s[0]
    )
    top = sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))[:vocab_size]
    return {w: WORD_SPECIALS + i for i, (w, _) in enumerate(top)}


def _with_markers(sent: Sentence, tokenizer: str, vocab: dict[str, int] | None):
    """Ids with markers inserted and the indices of [E1], [/E1], [E2], [/E2]."""
    words, (h0, h1), (t0, t1) = sent
    e1, e1_end, e2, e2_end = _MARKER_IDS[tokenizer]
    # Nested spans: the outer entity opens first and closes last.
    opens = sorted([(h0, h1, e1, 0), (t0, t1, e2, 2)], key=lambda s: -s[1])
    closes = sorted([(h0, h1, e1_end, 1), (t0, t1, e2_end, 3)], key=lambda s: -s[0])
    ids: list[int] = []
    where = [0, 0, 0, 0]
    for i, word in enumerate(words):
        if tokenizer == "byte" and i:
            ids.append(32)
        for start, _, marker, slot in opens:
            if start == i:
                where[slot] = len(ids)
                ids.append(marker)
        if tokenizer == "byte":
            ids.extend(word.encode("utf-8"))
        else:
            ids.append(vocab.get(word.lower(), WORD_UNK))
        for _, stop, marker, slot in closes:
            if stop == i + 1:
                where[slot] = len(ids)
                ids.append(marker)
    return ids, where


def _truncate(ids: list[int], where: list[int], max_len: int):
    """The ranking of the module docstring: keeps every marker and ``max_len`` ids in all."""
    if len(ids) <= max_len:
        return ids, where
    lo, hi = min(where), max(where)

    def rank(j):
        if lo <= j <= hi:
            return (0, min(abs(j - m) for m in where), j)
        return (1, lo - j if j < lo else j - hi, j)

    keep = sorted(sorted(range(len(ids)), key=rank)[:max_len])
    index = {j: k for k, j in enumerate(keep)}
    return [ids[j] for j in keep], [index[m] for m in where]


def encode(sentences, tokenizer: str, max_len: int, vocab: dict[str, int] | None = None):
    """Tokenizes sentences (:data:`Sentence` tuples or FewRel dicts) with entity markers.

    Args:
      sentences: a sequence of n sentences.
      tokenizer: ``"byte"`` or ``"word"`` (then ``vocab`` from :func:`build_vocab`).
      max_len: L; longer sequences are truncated as the module docstring says.

    Returns:
      ``(tokens int32 (n, L) right-padded, positions int32 (n, 2))``: positions of [E1], [E2].
    """
    if tokenizer not in TOKENIZERS or (tokenizer == "word" and vocab is None):
        raise FewRelError(f"tokenizer={tokenizer!r}: expected 'byte' or 'word' (with a vocab).")
    pad = BYTE_PAD if tokenizer == "byte" else WORD_PAD
    tokens = np.full((len(sentences), max_len), pad, np.int32)
    positions = np.empty((len(sentences), 2), np.int32)
    for i, sent in enumerate(sentences):
        if isinstance(sent, dict):
            sent = parse_sentence(sent, f"sentence {i}")
        ids, where = _truncate(*_with_markers(sent, tokenizer, vocab), max_len)
        tokens[i, : len(ids)] = ids
        positions[i] = where[0], where[2]
    return tokens, positions


@functools.lru_cache(maxsize=8)
def _encoded_split(splits: Splits, split: str, tokenizer: str, max_len: int, vocab_size: int):
    vocab = build_vocab(splits, vocab_size) if tokenizer == "word" else None
    rels = resolve(splits)[split]
    return tuple(rels), [encode(s, tokenizer, max_len, vocab) for s in rels.values()]


@dataclasses.dataclass(frozen=True)
class FewRel(TaskSource):
    """N-way K-shot relation classification; classes are the split's relations.

    ``sample`` returns ``Task(support=((tokens, positions), labels), query=...)``: tokens int32
    (T, N*K, L) right-padded with :attr:`pad_id`, positions int32 (T, N*K, 2) (the [E1] and
    [E2] indices), labels int32 (T, N*K) in 0..N-1, a random permutation of the sampled
    relations per task, grouped by relation; the query likewise with N*Q. A task's
    sentences are distinct.

    Attributes:
      files: the meta-splits (:func:`protocol_splits`).
      split: "train", "validation" or "test".
      ways: N relations per task.
      shots: K support sentences per relation.
      queries: Q query sentences per relation.
      seed: the task stream's seed.
      max_len: L, tokens per sentence, markers included (>= 4).
      tokenizer: "word" (the default: at equal compute it meta-learns better here,
        experiments/fewrel_tokenizers.py) or "byte".
      vocab_size: words of the word vocabulary (``tokenizer="word"``).
    """

    files: Splits
    split: str = "train"
    ways: int = 5
    shots: int = 1
    queries: int = 5
    seed: int = 0
    max_len: int = 64
    tokenizer: str = "word"
    vocab_size: int = 8000

    def __post_init__(self):
        split_id(self.split)
        if self.tokenizer not in TOKENIZERS:
            raise FewRelError(f"tokenizer={self.tokenizer!r}: expected one of {TOKENIZERS}.")
        for name, low in (
            ("ways", 2),
            ("shots", 1),
            ("queries", 1),
            ("max_len", 4),
            ("vocab_size", 1),
        ):
            if getattr(self, name) < low:
                raise FewRelError(f"{name}={getattr(self, name)}: must be >= {low}.")

    @property
    def pad_id(self) -> int:
        return BYTE_PAD if self.tokenizer == "byte" else WORD_PAD

    @property
    def num_tokens(self) -> int:
        """The model's vocabulary size: every id ``encode`` can emit."""
        if self.tokenizer == "byte":
            return BYTE_VOCAB_SIZE
        return WORD_SPECIALS + len(build_vocab(self.files, self.vocab_size))

    def relations(self) -> tuple[str, ...]:
        return tuple(resolve(self.files)[self.split])

    def check(self) -> None:
        """Raises :class:`FewRelError` unless every task can be drawn: N relations and
        K + Q sentences in each."""
        rels = resolve(self.files)[self.split]
        if self.ways > len(rels):
            raise FewRelError(
                f"ways={self.ways} but the {self.split} split has "
                f"{len(rels)} relations: {list(rels)}."
            )
        need = self.shots + self.queries
        for rel, sents in rels.items():
            if len(sents) < need:
                raise FewRelError(
                    f"relation {rel!r} ({self.split}) has {len(sents)} sentences; "
                    f"shots + queries = {need} are needed."
                )

    def encode(self, sentences) -> tuple[np.ndarray, np.ndarray]:
        """User sentences (FewRel dicts) as model inputs ``(tokens (n, L), positions (n, 2))``."""
        vocab = build_vocab(self.files, self.vocab_size) if self.tokenizer == "word" else None
        return encode(list(sentences), self.tokenizer, self.max_len, vocab)

    def sample(self, step: int, num_tasks: int, first_task: int = 0) -> Task:
        self.check()
        _, data = _encoded_split(
            self.files, self.split, self.tokenizer, self.max_len, self.vocab_size
        )
        n, k, q, length = self.ways, self.shots, self.queries, self.max_len
        sid = split_id(self.split)
        tokens = np.empty((num_tasks, n, k + q, length), np.int32)
        positions = np.empty((num_tasks, n, k + q, 2), np.int32)
        perm = np.empty((num_tasks, n), np.int32)
        for t in range(num_tasks):
            rng = task_rng(self.seed, sid, step, first_task + t)
            chosen = rng.choice(len(data), n, replace=False)
            perm[t] = rng.permutation(n)
            for c, r in enumerate(chosen):
                rel_tokens, rel_positions = data[r]
                picks = rng.choice(len(rel_tokens), k + q, replace=False)
                tokens[t, c], positions[t, c] = rel_tokens[picks], rel_positions[picks]
        return tasks_from_draws(tokens, positions, perm, k)


def tasks_from_draws(tokens: np.ndarray, positions: np.ndarray, perm: np.ndarray, shots: int):
    """``Task``s from drawn sentences ``tokens (T, N, K + Q, L)``, ``positions (T, N, K + Q,
    2)`` and each task's label of every drawn relation ``perm (T, N)``: the first ``shots``
    sentences of each relation are the support, the rest the query, grouped by relation."""
    num_tasks, n, per_relation, length = tokens.shape
    labels = np.broadcast_to(perm[:, :, None], (num_tasks, n, per_relation))

    def part(lo, hi):
        m = n * (hi - lo)
        x = (
            tokens[:, :, lo:hi].reshape(num_tasks, m, length),
            positions[:, :, lo:hi].reshape(num_tasks, m, 2),
        )
        return x, np.ascontiguousarray(labels[:, :, lo:hi]).reshape(num_tasks, m)

    return Task(support=part(0, shots), query=part(shots, per_relation))
