"""Few-shot translation from English into a new language, from CLDR display names (``babel``).

Data: for every base-language CLDR locale babel ships (``babel.localedata.locale_identifiers()``
without region or script variants), the English display names of ``Locale("en")`` paired by
code with the locale's own: territories (``"DE"``: ``"Germany"`` -> Finnish ``"Saksa"``),
languages, scripts and currencies (which kinds: the ``kinds`` tuple, default
:data:`DEFAULT_KINDS`). A pair is dropped when the target name is missing or equals the English
one, and when its English source already occurred (earlier kind, or earlier code in sorted
order): every source then has one target. Order: kinds as given, codes sorted.

Tokens are UTF-8 bytes 0..255 plus ``PAD = 256``, ``BOS = 257``, ``END = 258`` (the ids of
:mod:`metajax.tasks.words`) and ``SEP = 259``; ``VOCAB_SIZE = 260``. A pair is the sequence
``BOS source SEP target END`` right-padded with PAD to ``max_len``; a pair longer than
``max_len`` is dropped, never truncated (a truncated target would teach a wrong ending). The
mask is 1 exactly on the target bytes and END, the tokens a translator must produce, so
:func:`metajax.models.next_token_loss` scores the target given the source.

Meta-splits are by language, holding out whole families and scripts (:func:`language_split`):
a language's family comes from :data:`metajax.tasks.languages.FAMILIES` or, for languages that
table lacks, :data:`EXTRA_FAMILIES`; its scripts are those of at least 5 % of the letters of its
names (first word of each letter's Unicode name: LATIN, CYRILLIC, TAMIL, CJK, ...). Training
languages are those of every family not held out; a held-out-family language is kept only if
none of its scripts is a training language's script, so meta-test and validation languages
come from families and scripts never seen in meta-training. Languages with fewer than
:data:`MIN_PAIRS` pairs over all four kinds, without a family entry, or whose names duplicate an
earlier locale's (``no`` = ``nb``) are not used. With babel 2.19 (CLDR 49):

- test (Dravidian, Koreanic, Kra-Dai): kn, ko, lo, ml, ta, te, th (7 languages, 7 scripts);
- validation (Armenian, Hellenic, Iroquoian, Kartvelian): chr, el, hy, ka (4 languages);
- train: the remaining 221 languages. Held-out-family languages written in a training script
  are unused: brh (Arabic), kxv, za (Latin), shn (Myanmar).

Sampling follows :mod:`metajax.tasks.words`: a task is one language of the split, its support K
pairs and its query Q other pairs, a pure function of ``(seed, split, step, task index)``.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import unicodedata

import jax
import numpy as np

from metajax.models.decoding import (
    IncrementalDecoder,
    bytes_to_strings,
    greedy_decode,
    greedy_decode_cached,
)
from metajax.tasks import languages as lang_lib
from metajax.tasks.base import split_id, task_rng
from metajax.tasks.words import BOS, PAD, bits_per_byte
from metajax.tasks.words import EOS as END
from metajax.types import Task

SEP = 259
VOCAB_SIZE = 260
KINDS = ("territories", "languages", "scripts", "currencies")
DEFAULT_KINDS = ("territories", "languages")
MIN_PAIRS = 100
SCRIPT_SHARE = 0.05

# Families of the CLDR languages that metajax.tasks.languages.FAMILIES lacks (Indo-European by
# branch, as there). Only languages with at least MIN_PAIRS pairs are listed.
_BY_FAMILY = {
    "Germanic": "af fo frr fy gsw ksh lb nds nn no wae yi",
    "Romance": "an ast co fur gl la lij lld oc rm sc scn vec",
    "Slavic": "be bs dsb hr hsb sr szl", "Baltic": "prg", "Celtic": "br cy ga gd",
    "Albanian": "sq", "Armenian": "hy",
    "Indo-Aryan": "as brx ccp gu kok ks mai mr ne or pa sd si trw xnr",
    "Iranian": "bgn bqi ckb ku lrc mzn os ps tg", "Uralic": "et myv se smn sms",
    "Turkic": "az ba cv kaa kk ky tk tt tyv ug uz", "Mongolic": "mn",
    "Semitic": "am gez mt syr ti tig", "Cushitic": "byn om so", "Omotic": "wal",
    "Berber": "kab rif shi tzm zgh", "Egyptian": "cop", "Chadic": "ha",
    "Niger-Congo": "agq ak asa bas bez blo cgg dav dyo ebu ee ewo ff gaa guz ig jmc kam kde ki "
    "ksb ksf lag lg ln lu luy mer mgh mua nd nmg nyn rn rof rw rwk sbp seh sg sn sw vun wo xh "
    "xog yav yo zu",
    "Mande": "bm nqo vai", "Songhay": "dje khq ses twq", "Nilo-Saharan": "kln luo mas saq teo",
    "Khoe": "naq", "Dravidian": "brh kn kxv ml te", "Kra-Dai": "lo shn th za",
    "Austroasiatic": "km sat", "Sino-Tibetan": "bo dz my yue",
    "Austronesian": "bew jv mg mi to", "Kartvelian": "ka", "Northwest Caucasian": "ab",
    "Northeast Caucasian": "ce", "Basque": "eu", "Eskimo-Aleut": "kl", "Iroquoian": "chr",
    "Siouan": "lkt", "Quechuan": "qu", "Tupian": "yrl", "Macro-Jê": "kgp",
    "Creole": "kea mfe pap pcm", "Constructed": "eo ia ie tok",
}  # fmt: skip
EXTRA_FAMILIES = {lang: fam for fam, langs in _BY_FAMILY.items() for lang in langs.split()}

# Held out by family; see the module docstring for the languages that remain after the
# script rule.
HELDOUT_FAMILIES = {
    "validation": ("Armenian", "Hellenic", "Iroquoian", "Kartvelian"),
    "test": ("Dravidian", "Koreanic", "Kra-Dai"),
}


def family(lang: str) -> str | None:
    """The family (Indo-European: branch) of a language code, or None if unknown."""
    return lang_lib.FAMILIES.get(lang) or EXTRA_FAMILIES.get(lang)


def _check_kinds(kinds) -> tuple[str, ...]:
    kinds = tuple(kinds)
    if not kinds or any(k not in KINDS for k in kinds) or len(set(kinds)) != len(kinds):
        raise ValueError(f"kinds={kinds!r}: need distinct names from {KINDS}.")
    return kinds


@functools.lru_cache(maxsize=1)
def base_locales() -> tuple[str, ...]:
    """CLDR base-language locales in babel (no region or script variant; English excluded)."""
    import babel.localedata

    return tuple(
        sorted(i for i in babel.localedata.locale_identifiers() if "_" not in i and i != "en")
    )


@functools.lru_cache(maxsize=1)
def _english() -> dict[str, dict[str, str]]:
    from babel import Locale

    en = Locale("en")
    return {kind: dict(getattr(en, kind)) for kind in KINDS}


@functools.lru_cache(maxsize=1024)
def load_pairs(lang: str, kinds: tuple[str, ...] = DEFAULT_KINDS) -> tuple[tuple[str, str], ...]:
    """The (English, target) name pairs of one language, in deterministic order.

    Args:
      lang: a CLDR locale code from :func:`base_locales` (e.g. ``"fi"``).
      kinds: which name dictionaries, in order, from :data:`KINDS`.

    Raises:
      ValueError: unknown ``lang`` or ``kinds``.
    """
    from babel import Locale

    kinds = _check_kinds(kinds)
    if lang not in base_locales():
        raise ValueError(f"lang={lang!r} is not a CLDR base locale in babel.")
    locale, english = Locale.parse(lang), _english()
    pairs, seen = [], set()
    for kind in kinds:
        names = getattr(locale, kind)
        for code in sorted(english[kind]):
            source, target = english[kind][code], names.get(code)
            if target and target != source and source not in seen:
                seen.add(source)
                pairs.append((source, target))
    return tuple(pairs)


def _script(char: str) -> str:
    return unicodedata.name(char, "?").split(" ")[0]


@functools.lru_cache(maxsize=1024)
def scripts(lang: str) -> tuple[str, ...]:
    """Scripts of at least :data:`SCRIPT_SHARE` of the letters of a language's target names
    (all four kinds), most frequent first."""
    counts = collections.Counter(
        _script(c)
        for _, t in load_pairs(lang, KINDS)
        for c in t
        if unicodedata.category(c)[0] == "L"
    )
    total = max(sum(counts.values()), 1)
    return tuple(s for s, n in counts.most_common() if n >= SCRIPT_SHARE * total)


@functools.lru_cache(maxsize=1)
def _usable_languages() -> tuple[str, ...]:
    """Languages with a family, at least MIN_PAIRS pairs and names of their own."""
    out, seen = [], set()
    for lang in base_locales():
        pairs = load_pairs(lang, KINDS)
        if family(lang) is None or len(pairs) < MIN_PAIRS or pairs in seen:
            continue
        seen.add(pairs)
        out.append(lang)
    return tuple(out)


@functools.lru_cache(maxsize=1)
def language_split() -> dict[str, tuple[str, ...]]:
    """``{"train", "validation", "test": language codes}``: held-out families and scripts.

    Deterministic (no randomness, sorted codes); see the module docstring for the rule and the
    resulting languages.
    """
    heldout = {
        lang: s
        for s, fams in HELDOUT_FAMILIES.items()
        for lang in _usable_languages()
        if family(lang) in fams
    }
    train = tuple(lang for lang in _usable_languages() if lang not in heldout)
    train_scripts = {s for lang in train for s in scripts(lang)}
    out = {"train": train, "validation": [], "test": []}
    for lang, split in heldout.items():
        if not set(scripts(lang)) & train_scripts:
            out[split].append(lang)
    return {k: tuple(sorted(v)) for k, v in out.items()}


def unused_heldout_languages() -> tuple[str, ...]:
    """Held-out-family languages dropped because they share a script with training."""
    split = language_split()
    kept = set(split["validation"]) | set(split["test"])
    fams = {f for fs in HELDOUT_FAMILIES.values() for f in fs}
    return tuple(x for x in _usable_languages() if family(x) in fams and x not in kept)


def fits(pair: tuple[str, str], max_len: int) -> bool:
    """Whether ``BOS source SEP target END`` fits ``max_len`` tokens."""
    return len(pair[0].encode()) + len(pair[1].encode()) + 3 <= max_len


def encode_pairs(pairs, max_len: int) -> tuple[np.ndarray, np.ndarray]:
    """``(tokens int32 (n, max_len), mask float32 (n, max_len))`` of (source, target) pairs.

    ``mask`` is 1 on the target bytes and END, 0 elsewhere (BOS, source, SEP, PAD).

    Raises:
      ValueError: a pair that does not fit ``max_len``, or one that is not two strings.
    """
    pairs = list(pairs)
    tokens = np.full((len(pairs), max_len), PAD, np.int32)
    mask = np.zeros((len(pairs), max_len), np.float32)
    for i, pair in enumerate(pairs):
        if len(pair) != 2 or not all(isinstance(s, str) for s in pair):
            raise TypeError(f"pair {i} must be (source, target) strings, got {pair!r}.")
        src, tgt = (s.encode("utf-8") for s in pair)
        if not fits(pair, max_len):
            raise ValueError(f"pair {pair!r} needs {len(src) + len(tgt) + 3} > max_len={max_len}.")
        s, t = len(src), len(tgt)
        tokens[i, 0], tokens[i, s + 1], tokens[i, s + t + 2] = BOS, SEP, END
        tokens[i, 1 : s + 1] = np.frombuffer(src, np.uint8)
        tokens[i, s + 2 : s + t + 2] = np.frombuffer(tgt, np.uint8)
        mask[i, s + 2 : s + t + 3] = 1.0
    return tokens, mask


def encode_prompts(sources, max_len: int) -> tuple[np.ndarray, np.ndarray]:
    """Decoder prompts ``BOS source SEP``: ``(tokens int32 (n, max_len), lengths int32 (n,))``.

    Raises:
      ValueError: a source that leaves no room for a target byte and END.
    """
    sources = list(sources)
    tokens = np.full((len(sources), max_len), PAD, np.int32)
    lengths = np.empty((len(sources),), np.int32)
    for i, text in enumerate(sources):
        if not isinstance(text, str):
            raise TypeError(f"source {i} must be a string, got {text!r}.")
        b = text.encode("utf-8")
        if len(b) + 4 > max_len:
            raise ValueError(f"source {text!r} needs {len(b) + 4} > max_len={max_len}.")
        tokens[i, 0], tokens[i, len(b) + 1], lengths[i] = BOS, SEP, len(b) + 2
        tokens[i, 1 : len(b) + 1] = np.frombuffer(b, np.uint8)
    return tokens, lengths


def split_sequences(tokens) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Encoded pairs back to ``(prompts, prompt_lengths, reference targets)`` (host side).

    Args:
      tokens: int ``(n, L)`` as :func:`encode_pairs` makes them.

    Returns:
      ``prompts`` int32 ``(n, L)`` (``BOS source SEP`` then PAD), ``prompt_lengths`` int32
      ``(n,)``, and the ``n`` target strings.
    """
    tokens = np.asarray(tokens)
    seps = np.argmax(tokens == SEP, axis=1)
    if not np.all(tokens[np.arange(len(tokens)), seps] == SEP):
        raise ValueError("every row must contain SEP: tokens are not encoded pairs.")
    lengths = (seps + 1).astype(np.int32)
    prompts = np.where(np.arange(tokens.shape[1])[None] < lengths[:, None], tokens, PAD)
    refs = []
    for row, sep in zip(tokens, seps, strict=True):
        tail = row[sep + 1 :]
        tail = tail[: np.argmax(tail == END)] if np.any(tail == END) else tail[tail < 256]
        refs.append(bytes(int(t) for t in tail).decode("utf-8", "replace"))
    return prompts.astype(np.int32), lengths, refs


@functools.lru_cache(maxsize=512)
def _encoded(lang: str, kinds: tuple[str, ...], max_len: int) -> tuple[np.ndarray, np.ndarray]:
    return encode_pairs([p for p in load_pairs(lang, kinds) if fits(p, max_len)], max_len)


@dataclasses.dataclass(frozen=True)
class Translate:
    """English-to-X few-shot translation, one target language per task.

    ``sample`` returns ``Task(support=(tokens, mask), query=(tokens, mask))``: tokens int32
    ``(T, K, L)`` and mask float32 ``(T, K, L)`` for the support, ``(T, Q, L)`` for the query;
    the K + Q pairs of a task are distinct (distinct English sources).

    Attributes:
      split: "train", "validation" or "test" (see :func:`language_split`).
      shots: K support pairs per task.
      queries: Q query pairs per task.
      seed: the task stream's seed.
      max_len: L, tokens per sequence (BOS, source, SEP, target, END); longer pairs are dropped.
      kinds: name kinds used, from :data:`KINDS`.
      languages: explicit ``(train, validation, test)`` language codes; default
        :func:`language_split`. Languages with fewer than K + Q pairs that fit are skipped.
    """

    split: str = "train"
    shots: int = 8
    queries: int = 16
    seed: int = 0
    max_len: int = 64
    kinds: tuple[str, ...] = DEFAULT_KINDS
    languages: tuple[tuple[str, ...], tuple[str, ...], tuple[str, ...]] | None = None

    def __post_init__(self):
        split_id(self.split)
        _check_kinds(self.kinds)
        for name in ("shots", "queries"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)!r}: need an int >= 1.")
        if self.max_len < 5:
            raise ValueError(f"max_len={self.max_len}: need >= 5 (BOS, SEP, END, two bytes).")

    def language_split(self) -> dict[str, tuple[str, ...]]:
        """``{meta-split: language codes}`` in use."""
        if self.languages is None:
            return language_split()
        names = dict(zip(("train", "validation", "test"), self.languages, strict=True))
        return lang_lib.check_split(names, base_locales())

    def split_languages(self) -> tuple[str, ...]:
        """This split's languages with at least K + Q pairs that fit ``max_len``."""
        need = self.shots + self.queries
        langs = tuple(x for x in self.language_split()[self.split] if len(self.table(x)[0]) >= need)
        if not langs:
            raise ValueError(f"split={self.split!r} has no language with {need} pairs that fit.")
        return langs

    def table(self, lang: str) -> tuple[np.ndarray, np.ndarray]:
        """All usable encoded pairs of one language: ``(tokens, mask)``, each ``(n, L)``."""
        return _encoded(lang, tuple(self.kinds), self.max_len)

    def sample(self, step: int, num_tasks: int, first_task: int = 0) -> Task:
        langs = self.split_languages()
        sid, k, q = split_id(self.split), self.shots, self.queries
        tokens = np.empty((num_tasks, k + q, self.max_len), np.int32)
        mask = np.empty((num_tasks, k + q, self.max_len), np.float32)
        for t in range(num_tasks):
            rng = task_rng(self.seed, sid, step, first_task + t)
            table_tokens, table_mask = self.table(langs[rng.integers(len(langs))])
            picks = rng.choice(len(table_tokens), k + q, replace=False)
            tokens[t], mask[t] = table_tokens[picks], table_mask[picks]
        return Task(support=(tokens[:, :k], mask[:, :k]), query=(tokens[:, k:], mask[:, k:]))

    def sample_languages(self, step: int, num_tasks: int, first_task: int = 0) -> list[str]:
        """The target language of each task ``sample`` returns (same draws)."""
        langs, sid = self.split_languages(), split_id(self.split)
        return [
            langs[task_rng(self.seed, sid, step, first_task + t).integers(len(langs))]
            for t in range(num_tasks)
        ]


def greedy_translate(model, params, prompts, prompt_lengths, steps: int):
    """Greedy decoding with this module's tokens: stops at END, never emits PAD, BOS or SEP.

    ``model`` is an :class:`~metajax.models.decoding.IncrementalDecoder` (key-value cache:
    :func:`~metajax.models.decoding.greedy_decode_cached`) or any ``apply_fn(params, tokens)
    -> logits`` (:func:`~metajax.models.decoding.greedy_decode`); the two give the same
    tokens. Jittable; returns int32 ``(n, steps)``."""
    special = dict(end_id=END, pad_id=PAD, banned_ids=(PAD, BOS, SEP))
    decode = greedy_decode_cached if isinstance(model, IncrementalDecoder) else greedy_decode
    return decode(model, params, prompts, prompt_lengths, steps=steps, **special)


def to_strings(generated) -> list[str]:
    """Generated tokens ``(n, steps)`` to strings (up to END; invalid UTF-8 replaced)."""
    return bytes_to_strings(generated, END)


def chrf(hypotheses: list[str], references: list[str]) -> float:
    """Corpus-level chrF (sacrebleu ``CHRF()`` defaults: character 6-grams, beta 2), 0..100.

    Corpus-level: n-gram statistics are pooled over all the pairs before the F-score, the
    standard form; averaging sentence-level scores instead would weigh a two-letter name as
    much as a long one and is noisier on names this short.
    """
    from sacrebleu.metrics import CHRF

    if len(hypotheses) != len(references):
        raise ValueError(f"{len(hypotheses)} hypotheses but {len(references)} references.")
    return float(CHRF().corpus_score(list(hypotheses), [list(references)]).score)


def translation_metrics(
    apply_fn,
    decode_steps: int,
    decoder: IncrementalDecoder | None = None,
    *,
    with_bits: bool = True,
):
    """``metrics(params, batch) -> {"chrf", "exact_match", "bits_per_byte"}`` (host side).

    For one task's query batch ``(tokens (n, L), mask (n, L))`` and (adapted) parameters:
    greedy translations of the query sources (jitted, ``decode_steps`` tokens at most) scored
    against the query targets by corpus-level :func:`chrf` and exact match (fraction of
    identical strings), and the query bits per target byte of
    :func:`metajax.tasks.words.bits_per_byte` (all target NLL, END included, over target
    bytes). Python floats.

    Args:
      apply_fn: ``apply_fn(params, tokens) -> logits`` of the decoder LM.
      decode_steps: generated tokens per query (END included).
      decoder: the same model's key-value-cached decoder, if it has one (faster, same
        translations).
      with_bits: also the bits per byte (one more forward pass); False leaves it out.
    """
    model = apply_fn if decoder is None else decoder
    translate = jax.jit(functools.partial(greedy_translate, model, steps=decode_steps))
    bits = jax.jit(lambda p, tokens, mask: bits_per_byte(apply_fn(p, tokens), tokens, mask))

    def metrics(params, batch) -> dict[str, float]:
        tokens, mask = batch
        prompts, lengths, refs = split_sequences(tokens)
        hyps = to_strings(translate(params, prompts, lengths))
        scores = {
            "chrf": chrf(hyps, refs),
            "exact_match": float(np.mean([h == r for h, r in zip(hyps, refs, strict=True)])),
        }
        if with_bits:
            scores["bits_per_byte"] = float(bits(params, tokens, mask))
        return scores

    return metrics
