"""The text task sources in a pretrained model's tokens: words, FewRel sentences, translations.

Each encoder takes the tokenizer as ``encode_ids(text) -> ids`` (no special tokens) and a
start and an end token (GPT-2 and SmolLM2: both ``<|endoftext|>``, which also pads); each
task source re-encodes the draws of its byte- or word-level counterpart, so a task is a pure
function of ``(seed, split, step, task index)`` and draws the same languages, words and
relations as that counterpart. Sequences are right-padded, which a causal model needs no
attention mask for: no real token sees the pads after it.

- Words (:class:`TokenEncoder`, :class:`WordTokens`): ``start word end pad...``; the mask is
  1 on the word's tokens and the end token (the next-token targets).
- FewRel (:class:`MarkerEncoder`, :class:`FewRelTokens`): ``start`` then the sentence with
  the entity markers inserted as text, `` [E1] head [/E1] ... [E2] tail [/E2]``. Every piece,
  a run of words or a marker, is encoded on its own with a leading space, so a marker is
  always the same ids and no BPE merge crosses one; a model reads the state at the last
  token of a marker (``pool="start"``: ``[E1]`` and ``[E2]``; ``"end"``: ``[/E1]`` and
  ``[/E2]``, which in a causal model have read their entity). ``pool="prompt"`` follows the
  sentence with :data:`PROMPT`, which names head and tail again, and reads the last token of
  each restated name: in a causal model those states have read the whole sentence and both
  entities. Truncation keeps every marker token and the prompt
  (:func:`metajax.tasks.fewrel._truncate`'s ranking).
- Translation (:class:`PairEncoder`, :class:`TranslateTokens`): ``start "English: source
  \\nTranslation:" " target" end`` (:data:`PAIR_PROMPT`); the mask is 1 on the target's tokens
  and the end token, so the prompt is the decoder's input at test time.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from metajax.tasks import fewrel, translate, words
from metajax.tasks.base import TaskSource, split_id, task_rng
from metajax.types import Task

EncodeIds = Callable[[str], list[int]]
POOLS = {"start": (0, 2), "end": (1, 3), "prompt": None}  # indices into fewrel.MARKERS
# pool="prompt": the text after the sentence; each name is cut to its first NAME_TOKENS tokens.
PROMPT = " The relation between {head} and {tail} is"
NAME_TOKENS = 8


class TokenEncoder:
    """Strings -> ``(tokens int32 (n, max_len), mask float32 (n, max_len))`` next-token batches.

    ``tokens[i] = [start, ids of text i..., end, end (padding)...]``; ``mask[i, t]`` is 1 where
    token ``t`` is a prediction target: the text's tokens and the end token after them.

    Args:
      encode_ids: ``text -> list of token ids`` (no special tokens).
      end_id: the end token, also the padding.
      max_len: tokens per sequence.
      start_id: the first token; default ``end_id``.
    """

    def __init__(self, encode_ids: EncodeIds, end_id: int, max_len: int, start_id: int = -1):
        self.encode_ids, self.end_id, self.max_len = encode_ids, end_id, max_len
        self.start_id = end_id if start_id < 0 else start_id
        self._ids = functools.lru_cache(maxsize=1 << 16)(lambda text: list(encode_ids(text)))

    def __call__(self, texts: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        if isinstance(texts, str) or not all(isinstance(t, str) for t in texts):
            raise TypeError(f"expected a list of strings, got {texts!r:.80}.")
        tokens = np.full((len(texts), self.max_len), self.end_id, np.int32)
        mask = np.zeros((len(texts), self.max_len), np.float32)
        for i, text in enumerate(texts):
            ids = self._ids(text)
            if len(ids) + 2 > self.max_len:
                raise ValueError(
                    f"{text!r} needs {len(ids) + 2} tokens with its end tokens > "
                    f"task.max_len={self.max_len}."
                )
            tokens[i, 0] = self.start_id
            tokens[i, 1 : len(ids) + 1] = ids
            mask[i, 1 : len(ids) + 2] = 1.0
        return tokens, mask


class WordTokens(TaskSource):
    """:class:`~metajax.tasks.words.LanguageModeling` tasks re-encoded by a
    :class:`TokenEncoder`: the same words, ``(tokens, mask)`` of shape ``(T, K, max_len)``
    (``(T, Q, max_len)`` for the query). A word of at most ``max_len - 2`` UTF-8 bytes always
    fits: a byte-level BPE token covers at least one byte."""

    def __init__(self, source: words.LanguageModeling, encoder: TokenEncoder):
        self.source, self.encoder = source, encoder

    def sample(self, step: int, num_tasks: int, first_task: int = 0) -> Task:
        task = self.source.sample(step, num_tasks, first_task)
        return Task(support=self._recode(task.support[0]), query=self._recode(task.query[0]))

    def sample_languages(self, step: int, num_tasks: int, first_task: int = 0) -> list[str]:
        return self.source.sample_languages(step, num_tasks, first_task)

    def _recode(self, byte_tokens: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        num_tasks, per_task, _ = byte_tokens.shape
        tokens, mask = self.encoder(words.decode(byte_tokens.reshape(num_tasks * per_task, -1)))
        shape = (num_tasks, per_task, self.encoder.max_len)
        return tokens.reshape(shape), mask.reshape(shape)


class MarkerEncoder:
    """FewRel sentences -> ``(tokens int32 (n, max_len), positions int32 (n, 2))``.

    ``positions[i]`` are the indices of the last token of the two markers of ``pool``, or
    with ``pool="prompt"`` of the head's and the tail's name in :data:`PROMPT`.

    Args:
      encode_ids: ``text -> list of token ids`` (no special tokens).
      start_id: the first token, also the padding.
      max_len: tokens per sequence.
      pool: ``"start"``, ``"end"`` or ``"prompt"`` (:data:`POOLS`).

    Raises:
      ValueError: an unknown pool, or ``max_len`` has no room for the start token, the four
        markers (and the prompt with names of :data:`NAME_TOKENS` tokens).
    """

    def __init__(self, encode_ids: EncodeIds, start_id: int, max_len: int, pool: str):
        if pool not in POOLS:
            raise ValueError(f"pool={pool!r}: choose one of {', '.join(POOLS)}.")
        self.encode_ids, self.start_id, self.max_len = encode_ids, start_id, max_len
        self.pool, self.slots = pool, POOLS[pool]
        self.marker_ids = tuple(tuple(encode_ids(" " + m)) for m in fewrel.MARKERS)
        self.min_len = 1 + sum(len(m) for m in self.marker_ids)
        what = "the start token and the 4 entity markers"
        if pool == "prompt":
            before, rest = PROMPT.split("{head}")
            # Each name is encoded with its leading space: the text around it ends without one.
            parts = (before, *rest.split("{tail}"))
            self.prompt_ids = tuple(tuple(encode_ids(t.rstrip())) for t in parts)
            self.min_len += sum(len(t) for t in self.prompt_ids) + 2 * NAME_TOKENS
            what += f", the prompt and 2 names of {NAME_TOKENS} tokens"
        # Marker s's last token is entry ends[s] of the marker tokens listed marker by marker.
        self._ends = np.cumsum([len(m) for m in self.marker_ids]) - 1
        if max_len < self.min_len:
            raise ValueError(f"max_len={max_len}: needs room for {what} ({self.min_len} tokens).")

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
        if self.pool == "prompt":
            prompt, names_end = self._prompt(sent)
            kept, _ = fewrel._truncate(ids, marker_tokens, self.max_len - 1 - len(prompt))
            offset = 1 + len(kept)
            return [self.start_id, *kept, *prompt], tuple(offset + e for e in names_end)
        kept, where = fewrel._truncate(ids, marker_tokens, self.max_len - 1)
        head, tail = (where[self._ends[s]] + 1 for s in self.slots)  # + 1: the start token
        return [self.start_id, *kept], (head, tail)

    def _prompt(self, sent: fewrel.Sentence) -> tuple[list[int], tuple[int, int]]:
        """:data:`PROMPT`'s ids for ``sent`` and the index in them of each name's last token."""
        words, (h0, h1), (t0, t1) = sent
        before, between, after = self.prompt_ids
        ids, ends = list(before), []
        for lo, hi, text in ((h0, h1, between), (t0, t1, after)):
            ids.extend(self.encode_ids(" " + " ".join(words[lo:hi]))[:NAME_TOKENS])
            ends.append(len(ids) - 1)
            ids.extend(text)
        return ids, (ends[0], ends[1])


def _pieces(sent: fewrel.Sentence) -> list[str | int]:
    """The sentence as runs of words (str) and markers (int, an index into MARKERS).

    Nested spans: the outer entity opens first and closes last (as
    :func:`metajax.tasks.fewrel.encode`).
    """
    tokens, (h0, h1), (t0, t1) = sent
    opens = sorted([(h0, h1, 0), (t0, t1, 2)], key=lambda s: -s[1])
    closes = sorted([(h0, h1, 1), (t0, t1, 3)], key=lambda s: -s[0])
    pieces: list[str | int] = []
    run: list[str] = []

    def flush():
        if run:
            pieces.append(" ".join(run))
            run.clear()

    for i, word in enumerate(tokens):
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


class FewRelTokens(TaskSource):
    """N-way K-shot tasks of one meta-split in a model's tokens.

    ``sample`` makes the draws of :meth:`metajax.tasks.fewrel.FewRel.sample` and encodes the
    drawn sentences with a :class:`MarkerEncoder` (each once, then cached). Returns
    ``Task(support=((tokens, positions), labels), query=...)``: tokens int32 ``(T, N*K,
    max_len)``, positions int32 ``(T, N*K, 2)``, labels int32 ``(T, N*K)``.

    Args:
      source: the checked split and task shape (its own tokenizer is not used).
      encoder: the encoding of a sentence.
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

    def first_sentences(self, count: int) -> tuple[np.ndarray, np.ndarray]:
        """``(tokens (m, max_len), positions (m, 2))`` of up to ``count`` sentences taken in
        turn from each relation (the first sentence of every relation, then the second...):
        the same sentences whatever the seed and the task shape."""
        order = [
            (r, i)
            for i in range(max(map(len, self._relations)))
            for r in range(len(self._relations))
            if i < len(self._relations[r])
        ][:count]
        tokens = np.full((len(order), self.encoder.max_len), self.encoder.start_id, np.int32)
        positions = np.empty((len(order), 2), np.int32)
        for row, (r, i) in enumerate(order):
            ids, positions[row] = self._encoded(r, i)
            tokens[row, : len(ids)] = ids
        return tokens, positions

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


# The prompt of a translation pair. Chosen on 486 pairs of the 81 Latin-script meta-training
# languages before any training (experiments/translate_format_probe.py): SmolLM2-135M gives
# their targets fewer bits per token after it than after "source =" and writes names, not
# numbers, after it.
PAIR_PROMPT = "English: {}\nTranslation:"


class PairEncoder:
    """(source, target) pairs <-> ``start prompt(source) " target" end`` token rows.

    Args:
      encode_ids: ``text -> ids``; decode_ids: ``ids -> text``.
      start_id, end_id: the first token and the end token (also the padding).
      max_len: tokens per sequence.
      prompt: what precedes the target, ``{}`` standing for the source.
    """

    def __init__(
        self,
        encode_ids,
        decode_ids,
        start_id: int,
        end_id: int,
        max_len: int,
        prompt: str = PAIR_PROMPT,
    ):
        if prompt.count("{}") != 1:
            raise ValueError(f"prompt={prompt!r} must hold one {{}} for the source.")
        self.decode_ids, self.start_id, self.end_id = decode_ids, start_id, end_id
        self.max_len, self.prompt = max_len, prompt
        self._ids = functools.lru_cache(maxsize=1 << 16)(lambda text: list(encode_ids(text)))

    def _parts(self, pair) -> tuple[list[int], list[int]]:
        if len(pair) != 2 or not all(isinstance(s, str) for s in pair):
            raise TypeError(f"a pair must be (source, target) strings, got {pair!r}.")
        return [self.start_id, *self._ids(self.prompt.format(pair[0]))], self._ids(" " + pair[1])

    def fits(self, pair) -> bool:
        prompt, target = self._parts(pair)
        return len(prompt) + len(target) + 1 <= self.max_len

    def pairs(self, pairs) -> tuple[np.ndarray, np.ndarray]:
        """``(tokens int32 (n, max_len), mask float32 (n, max_len))``; mask 1 on the target
        and the end token. Raises ValueError for a pair that does not fit."""
        pairs = list(pairs)
        tokens = np.full((len(pairs), self.max_len), self.end_id, np.int32)
        mask = np.zeros((len(pairs), self.max_len), np.float32)
        for i, pair in enumerate(pairs):
            prompt, target = self._parts(pair)
            row = [*prompt, *target, self.end_id]
            if len(row) > self.max_len:
                raise ValueError(f"pair {pair!r} needs {len(row)} > max_len={self.max_len}.")
            tokens[i, : len(row)] = row
            mask[i, len(prompt) : len(row)] = 1.0
        return tokens, mask

    def prompts(self, sources) -> tuple[np.ndarray, np.ndarray]:
        """Decoder prompts ``(tokens int32 (n, max_len), lengths int32 (n,))``."""
        sources = list(sources)
        tokens = np.full((len(sources), self.max_len), self.end_id, np.int32)
        lengths = np.empty((len(sources),), np.int32)
        for i, text in enumerate(sources):
            if not isinstance(text, str):
                raise TypeError(f"source {i} must be a string, got {text!r}.")
            prompt = self._parts((text, ""))[0]
            if len(prompt) + 2 > self.max_len:
                raise ValueError(f"source {text!r} needs {len(prompt) + 2} > max_len.")
            tokens[i, : len(prompt)], lengths[i] = prompt, len(prompt)
        return tokens, lengths

    def split(self, tokens, mask) -> tuple[np.ndarray, np.ndarray, list[str]]:
        """Encoded pairs back to ``(prompts, lengths, reference targets)``: the prompt ends
        where the mask starts."""
        tokens, mask = np.asarray(tokens), np.asarray(mask)
        lengths = np.argmax(mask > 0, axis=1).astype(np.int32)
        prompts = np.where(np.arange(tokens.shape[1])[None] < lengths[:, None], tokens, self.end_id)
        refs = self.strings([row[n:] for row, n in zip(tokens, lengths)])
        return prompts.astype(np.int32), lengths, refs

    def strings(self, generated) -> list[str]:
        """Token rows to text, up to the first end token, the leading space removed."""
        out = []
        for row in generated:
            row = [int(t) for t in row]
            row = row[: row.index(self.end_id)] if self.end_id in row else row
            text = self.decode_ids(row)
            out.append(text[1:] if text.startswith(" ") else text)
        return out


class TranslateTokens(TaskSource):
    """:class:`~metajax.tasks.translate.Translate` tasks in a model's tokens: the same
    languages per task, drawn the same way from each language's pairs that fit ``max_len``
    tokens. Returns ``Task(support=(tokens, mask), query=(tokens, mask))``, ``(T, K, L)`` and
    ``(T, Q, L)``."""

    def __init__(self, source: translate.Translate, encoder: PairEncoder):
        self.source, self.encoder = source, encoder
        self._pairs: dict[str, list[tuple[str, str]]] = {}
        self._tables: dict[str, tuple[np.ndarray, np.ndarray]] = {}

    def pairs(self, lang: str) -> list[tuple[str, str]]:
        """A language's pairs that fit ``max_len`` tokens, in :func:`load_pairs` order."""
        if lang not in self._pairs:
            pairs = translate.load_pairs(lang, tuple(self.source.kinds))
            self._pairs[lang] = [p for p in pairs if self.encoder.fits(p)]
        return self._pairs[lang]

    def table(self, lang: str) -> tuple[np.ndarray, np.ndarray]:
        if lang not in self._tables:
            self._tables[lang] = self.encoder.pairs(self.pairs(lang))
        return self._tables[lang]

    def _draw(self, step: int, task: int) -> tuple[str, np.ndarray]:
        """Task ``task`` of ``step``: its language and the indices of its K + Q pairs."""
        src = self.source
        langs = src.split_languages()
        rng = task_rng(src.seed, split_id(src.split), step, task)
        lang = langs[rng.integers(len(langs))]
        n, need = len(self.pairs(lang)), src.shots + src.queries
        if n < need:
            raise ValueError(f"language {lang!r} has {n} pairs that fit; need {need}.")
        return lang, rng.choice(n, need, replace=False)

    def sample(self, step: int, num_tasks: int, first_task: int = 0) -> Task:
        k, length = self.source.shots, self.encoder.max_len
        tokens = np.empty((num_tasks, k + self.source.queries, length), np.int32)
        mask = np.empty_like(tokens, np.float32)
        for t in range(num_tasks):
            lang, picks = self._draw(step, first_task + t)
            table_tokens, table_mask = self.table(lang)
            tokens[t], mask[t] = table_tokens[picks], table_mask[picks]
        return Task(support=(tokens[:, :k], mask[:, :k]), query=(tokens[:, k:], mask[:, k:]))

    def sample_pairs(self, step: int, num_tasks: int, first_task: int = 0) -> list[tuple]:
        """The tasks of :meth:`sample` as text: ``(language, support pairs, query pairs)``
        each, the pairs ``(English, target)`` strings."""
        out = []
        for t in range(num_tasks):
            lang, picks = self._draw(step, first_task + t)
            pairs = [self.pairs(lang)[i] for i in picks]
            out.append((lang, pairs[: self.source.shots], pairs[self.source.shots :]))
        return out

    def sample_languages(self, step: int, num_tasks: int, first_task: int = 0) -> list[str]:
        return self.source.sample_languages(step, num_tasks, first_task)
