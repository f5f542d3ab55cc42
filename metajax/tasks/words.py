"""Few-shot language tasks over the top-word lists of ``wordfreq`` (offline, in its wheel).

Tokens are UTF-8 bytes: ids 0..255 are the bytes themselves, then three specials,
``PAD = 256``, ``BOS = 257``, ``EOS = 258``; ``VOCAB_SIZE = 259``. A sequence is
``BOS, bytes..., EOS`` right-padded with PAD to ``max_len``.

Two task families, both :class:`~metajax.tasks.base.TaskSource`:

- :class:`LanguageModeling`: a task is one language; support = K sequences (a word, or up to
  ``words_per_sequence`` words joined by spaces), query = Q other sequences of that language.
  Batch ``(tokens int32 (n, L), mask float32 (n, L))``; ``mask[:, t]`` is 1 where token ``t``
  is a real prediction target (never BOS, never PAD), for a next-token loss that predicts
  token ``t`` from tokens ``< t``: :func:`metajax.models.losses.next_token_loss` and
  :func:`metajax.models.losses.bits_per_byte_metric`.
- :class:`LanguageID`: N-way K-shot classification whose classes are languages; batch
  ``(tokens int32 (n, L), labels int32 (n,))``, labels a random permutation per task.

Words are drawn uniformly from each language's top ``num_words`` (uniform, not by frequency:
by frequency a task would be mostly "the", "of", "a"). Words that are not letters (digits,
symbols) are dropped, as are ASCII-only words in a language of another script (English
leaking into e.g. the Hindi list) and words that do not fit ``max_len``.

Meta-splits are by language; the default holds out whole families
(:mod:`metajax.tasks.languages`). Plain loader, not a TFDS builder: the lists are already
local and compact, and a TFDS text feature would pull in TensorFlow to encode.
"""

from __future__ import annotations

import dataclasses
import functools
import unicodedata

import numpy as np

from metajax.tasks import languages as lang_lib
from metajax.tasks.base import TaskSource, split_id, task_rng
from metajax.types import Task

PAD, BOS, EOS = 256, 257, 258
VOCAB_SIZE = 259


def encode(texts: list[str] | list[bytes], max_len: int) -> np.ndarray:
    """Byte-tokenizes texts: int32 (n, max_len), ``BOS bytes EOS PAD...``.

    Raises:
      ValueError: a text needs more than ``max_len - 2`` bytes.
    """
    out = np.full((len(texts), max_len), PAD, np.int32)
    for i, text in enumerate(texts):
        b = text.encode("utf-8") if isinstance(text, str) else text
        if len(b) + 2 > max_len:
            raise ValueError(f"{text!r} needs {len(b) + 2} tokens > max_len={max_len}.")
        out[i, 0] = BOS
        out[i, 1 : len(b) + 1] = np.frombuffer(b, np.uint8)
        out[i, len(b) + 1] = EOS
    return out


def decode(tokens: np.ndarray) -> list[str]:
    """Inverse of :func:`encode` for int (n, L) tokens (specials dropped)."""
    return [bytes(int(t) for t in row if t < 256).decode("utf-8", "replace") for row in tokens]


def target_mask(tokens: np.ndarray) -> np.ndarray:
    """float32 mask of real prediction targets: not PAD and not the leading BOS."""
    mask = (tokens != PAD).astype(np.float32)
    mask[..., 0] = 0.0
    return mask


def _is_word(word: str) -> bool:
    return all(unicodedata.category(c)[0] in "LM" or c in "'-" for c in word)


def _is_latin(word: str) -> bool:
    return unicodedata.name(word[0], "").startswith("LATIN")


@functools.lru_cache(maxsize=64)
def load_words(lang: str, num_words: int = 5000, max_len: int = 32) -> tuple[bytes, ...]:
    """The filtered top words of one language as UTF-8 bytes, most frequent first."""
    import wordfreq

    words = [w for w in wordfreq.top_n_list(lang, num_words) if w and _is_word(w)]
    if sum(map(_is_latin, words)) < len(words) / 2:
        words = [w for w in words if not w.isascii()]
    out = tuple(b for b in (w.encode("utf-8") for w in words) if len(b) + 2 <= max_len)
    if not out:
        raise ValueError(f"no usable words for language {lang!r}.")
    return out


@functools.lru_cache(maxsize=64)
def _encoded(lang: str, num_words: int, max_len: int) -> np.ndarray:
    return encode(load_words(lang, num_words, max_len), max_len)


@functools.lru_cache(maxsize=1)
def available_languages() -> tuple[str, ...]:
    """Languages with top-word lists in the installed ``wordfreq``."""
    import wordfreq

    return tuple(sorted(wordfreq.available_languages()))


@dataclasses.dataclass(frozen=True)
class _WordTasks(TaskSource):
    split: str = "train"
    seed: int = 0
    languages: tuple[tuple[str, ...], tuple[str, ...], tuple[str, ...]] | None = None
    num_words: int = 5000
    max_len: int = 32
    words_per_sequence: int = 1

    def __post_init__(self):
        split_id(self.split)
        if self.max_len < 3 or self.words_per_sequence < 1:
            raise ValueError(f"need max_len >= 3 and words_per_sequence >= 1: {self}")

    def language_split(self) -> dict[str, tuple[str, ...]]:
        """``{meta-split: language codes}`` in use."""
        if self.languages is None:
            return lang_lib.default_split(available_languages())
        names = dict(zip(("train", "validation", "test"), self.languages, strict=True))
        return lang_lib.check_split(names, available_languages())

    def split_languages(self) -> tuple[str, ...]:
        langs = self.language_split()[self.split]
        if not langs:
            raise ValueError(f"meta-split {self.split!r} has no languages.")
        return langs

    def _sequences(self, rng: np.random.Generator, lang: str, count: int) -> np.ndarray:
        """``count`` distinct-word sequences of one language: int32 (count, max_len)."""
        words = load_words(lang, self.num_words, self.max_len)
        per = self.words_per_sequence
        if count * per > len(words):
            raise ValueError(f"{lang!r} has {len(words)} words; a task needs {count * per}.")
        picks = rng.choice(len(words), count * per, replace=False).reshape(count, per)
        if per == 1:  # the common case: one gather from the pre-encoded table
            return _encoded(lang, self.num_words, self.max_len)[picks[:, 0]]
        texts = []
        for row in picks:
            # Join words while they fit; the first always does (load_words filtered it).
            seq = words[row[0]]
            for j in row[1:]:
                if len(seq) + 1 + len(words[j]) + 2 > self.max_len:
                    break
                seq = seq + b" " + words[j]
            texts.append(seq)
        return encode(texts, self.max_len)


@dataclasses.dataclass(frozen=True)
class LanguageModeling(_WordTasks):
    """Byte-level language modelling, one language per task.

    ``sample`` returns ``Task(support=(tokens, mask), query=(tokens, mask))``: tokens int32
    (T, K, L) and mask float32 (T, K, L) for the support, (T, Q, L) for the query.

    Attributes:
      shots: K support sequences per task.
      queries: Q query sequences per task (distinct from the support's words).
      split: "train", "validation" or "test".
      seed: the task stream's seed.
      languages: explicit (train, validation, test) language codes; default by family.
      num_words: top words per language to draw from.
      max_len: L, tokens per sequence including BOS and EOS.
      words_per_sequence: words joined by spaces into one sequence (fewer if they don't fit).
    """

    shots: int = 16
    queries: int = 16

    def sample(self, step: int, num_tasks: int, first_task: int = 0) -> Task:
        langs = self.split_languages()
        sid, k, q = split_id(self.split), self.shots, self.queries
        tokens = np.empty((num_tasks, k + q, self.max_len), np.int32)
        for t in range(num_tasks):
            rng = task_rng(self.seed, sid, step, first_task + t)
            tokens[t] = self._sequences(rng, langs[rng.integers(len(langs))], k + q)
        mask = target_mask(tokens)
        return Task(support=(tokens[:, :k], mask[:, :k]), query=(tokens[:, k:], mask[:, k:]))

    def sample_languages(self, step: int, num_tasks: int, first_task: int = 0) -> list[str]:
        """The language of each task ``sample`` returns (same draws), for per-language metrics."""
        langs = self.split_languages()
        sid = split_id(self.split)
        return [
            langs[task_rng(self.seed, sid, step, first_task + t).integers(len(langs))]
            for t in range(num_tasks)
        ]


@dataclasses.dataclass(frozen=True)
class LanguageID(_WordTasks):
    """N-way K-shot language identification; classes are the split's languages.

    ``sample`` returns ``Task(support=(tokens, labels), query=(tokens, labels))``: tokens int32
    (T, N*K, L) padded with PAD, labels int32 (T, N*K) in 0..N-1 (a random permutation of the
    sampled languages per task); query likewise with N*Q. Grouped by class.

    Attributes:
      ways: N languages per task.
      shots: K support sequences per language.
      queries: Q query sequences per language.
      (others as in :class:`LanguageModeling`)
    """

    ways: int = 5
    shots: int = 1
    queries: int = 15

    def sample(self, step: int, num_tasks: int, first_task: int = 0) -> Task:
        langs = self.split_languages()
        n, k, q = self.ways, self.shots, self.queries
        if n > len(langs):
            raise ValueError(f"{n}-way needs {n} languages; {self.split!r} has {len(langs)}.")
        sid, length = split_id(self.split), self.max_len
        tokens = np.empty((num_tasks, n, k + q, length), np.int32)
        perm = np.empty((num_tasks, n), np.int32)
        for t in range(num_tasks):
            rng = task_rng(self.seed, sid, step, first_task + t)
            chosen = rng.choice(len(langs), n, replace=False)
            perm[t] = rng.permutation(n)
            for c, li in enumerate(chosen):
                tokens[t, c] = self._sequences(rng, langs[li], k + q)
        labels = np.broadcast_to(perm[:, :, None], (num_tasks, n, k + q))

        def part(lo, hi):
            m = n * (hi - lo)
            return (
                np.ascontiguousarray(tokens[:, :, lo:hi]).reshape(num_tasks, m, length),
                np.ascontiguousarray(labels[:, :, lo:hi]).reshape(num_tasks, m),
            )

        return Task(support=part(0, k), query=part(k, k + q))
