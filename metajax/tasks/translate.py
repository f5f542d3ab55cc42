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

Meta-splits are by language, holding out whole families (:func:`language_groups`): a
language's family comes from :data:`metajax.tasks.languages.FAMILIES` or, for languages that
table lacks, :data:`EXTRA_FAMILIES`; its scripts are those of at least 5 % of the letters of its
names (first word of each letter's Unicode name: LATIN, CYRILLIC, TAMIL, CJK, ...). Training
languages are those of every family not held out (:data:`HELDOUT_FAMILIES`). The held-out
families form three groups, each with its own script rule:

- ``new_script`` (test): languages none of whose scripts a training language writes;
- ``latin`` (test): languages written in Latin script alone, the script of most training
  languages, so a model meets a new language without a new alphabet, and copying the English
  name already scores (many names are shared or borrowed);
- ``validation``: as ``new_script``, for choosing checkpoints and rates.

A held-out-family language that breaks its group's rule, or has fewer than
:data:`MIN_HELDOUT_PAIRS` names over all four kinds (too few for tasks of one language to
vary), is unused: never trained on, never evaluated. Languages with fewer than
:data:`MIN_PAIRS` pairs over all four kinds, without a family entry, or whose names duplicate
an earlier locale's (``no`` = ``nb``) are not used at all. With babel 2.19 (CLDR 49):

- ``new_script`` (Dravidian, Koreanic, Kra-Dai): kn, ko, lo, ml, ta, te, th (7 languages,
  7 scripts);
- ``latin`` (Austroasiatic, Austronesian, Basque, Chadic, Cushitic, Niger-Congo, Turkic,
  Uralic): vi; bew, id, jv, mi, ms, to; eu; ha; om, so; ak, blo, ee, ig, ln, sw, wo, xh,
  yo, zu; az, tk, tr, uz; et, fi, hu, smn (29 languages);
- ``validation`` (Armenian, Hellenic, Iroquoian, Kartvelian): chr, el, hy, ka;
- train: the remaining 137 languages, 81 of them written in Latin script alone (those
  ``Translate(train_script="latin")`` meta-trains on). Unused (59): the held-out families'
  languages in another script than their group's rule allows (Cyrillic and Arabic Turkic,
  Khmer km, Ol Chiki sat, Ethiopic byn, Cyrillic myv, Myanmar shn, Arabic brh, Latin kxv and
  za), or with fewer names (39 smaller Niger-Congo locales, fil, mg, se, sms).

Sampling follows :mod:`metajax.tasks.words`: a task is one language of the split, its support K
pairs and its query Q other pairs, a pure function of ``(seed, split, step, task index)``.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import unicodedata

import numpy as np

from metajax.models.decoding import (
    IncrementalDecoder,
    bytes_to_strings,
    greedy_decode,
    greedy_decode_cached,
)
from metajax.tasks import languages as lang_lib
from metajax.tasks.base import TaskSource, split_id, task_rng
from metajax.tasks.words import BOS, PAD
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

# Held out by family, in three groups (see the module docstring for each group's script rule
# and the languages that remain). Afro-Asiatic and Indo-European count by branch, as in
# metajax.tasks.languages: Chadic and Cushitic are held out, Semitic and Berber train.
HELDOUT_FAMILIES = {
    "validation": ("Armenian", "Hellenic", "Iroquoian", "Kartvelian"),
    "new_script": ("Dravidian", "Koreanic", "Kra-Dai"),
    "latin": (
        "Austroasiatic", "Austronesian", "Basque", "Chadic", "Cushitic", "Niger-Congo",
        "Turkic", "Uralic",
    ),
}  # fmt: skip
TEST_GROUPS = ("new_script", "latin")
# Which training languages meta-training draws: all of them, or those written in Latin script
# alone (81 of 137 with babel 2.19), for a translator meant for the Latin-script test group.
TRAIN_SCRIPTS = ("any", "latin")
# Names (all four kinds) a held-out language needs: CLDR's smallest locales name mostly
# territories, often as a neighbour does; with K + Q = 48 pairs per task they would repeat.
MIN_HELDOUT_PAIRS = 400


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


def latin_alone(lang: str) -> bool:
    """Whether a language's names are written in Latin script alone (:func:`scripts`)."""
    return scripts(lang) == ("LATIN",)


def _follows_script_rule(group: str, lang: str, train_scripts: set[str]) -> bool:
    if group == "latin":
        return latin_alone(lang)
    return not set(scripts(lang)) & train_scripts


@functools.lru_cache(maxsize=1)
def language_groups() -> dict[str, tuple[str, ...]]:
    """``{"train", "validation", "new_script", "latin": language codes}``.

    Deterministic (no randomness, sorted codes); see the module docstring for the rules and
    the resulting languages.
    """
    heldout = {
        lang: group
        for group, fams in HELDOUT_FAMILIES.items()
        for lang in _usable_languages()
        if family(lang) in fams
    }
    train = tuple(lang for lang in _usable_languages() if lang not in heldout)
    train_scripts = {s for lang in train for s in scripts(lang)}
    out = {"train": list(train), **{group: [] for group in HELDOUT_FAMILIES}}
    for lang, group in heldout.items():
        names = len(load_pairs(lang, KINDS))
        if names >= MIN_HELDOUT_PAIRS and _follows_script_rule(group, lang, train_scripts):
            out[group].append(lang)
    return {k: tuple(sorted(v)) for k, v in out.items()}


def check_test_group(test_group: str) -> str:
    """``test_group`` itself, or ValueError naming the choices."""
    if test_group not in TEST_GROUPS:
        raise ValueError(f"test_group={test_group!r}: choose one of {', '.join(TEST_GROUPS)}.")
    return test_group


def language_split(test_group: str = "new_script") -> dict[str, tuple[str, ...]]:
    """``{"train", "validation", "test": language codes}``, test being one of
    :data:`TEST_GROUPS` (see :func:`language_groups`)."""
    groups = language_groups()
    return {
        "train": groups["train"],
        "validation": groups["validation"],
        "test": groups[check_test_group(test_group)],
    }


def check_train_script(train_script: str) -> str:
    """``train_script`` itself, or ValueError naming the choices."""
    if train_script not in TRAIN_SCRIPTS:
        raise ValueError(
            f"train_script={train_script!r}: choose one of {', '.join(TRAIN_SCRIPTS)}."
        )
    return train_script


def unused_heldout_languages() -> tuple[str, ...]:
    """Held-out-family languages in no group: another script than their group's rule
    allows, or fewer than :data:`MIN_HELDOUT_PAIRS` names."""
    groups = language_groups()
    kept = {x for group in HELDOUT_FAMILIES for x in groups[group]}
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
class Translate(TaskSource):
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
      test_group: which held-out group the test split draws from, one of
        :data:`TEST_GROUPS`: ``new_script`` or ``latin`` (:func:`language_groups`); ignored
        with explicit ``languages``. Task ``i`` of a step draws the same random numbers in
        either group, from another language list.
      train_script: which training languages the train split draws, one of
        :data:`TRAIN_SCRIPTS`: ``any`` or ``latin`` (:func:`latin_alone`); the other splits
        ignore it.
    """

    split: str = "train"
    shots: int = 8
    queries: int = 16
    seed: int = 0
    max_len: int = 64
    kinds: tuple[str, ...] = DEFAULT_KINDS
    languages: tuple[tuple[str, ...], tuple[str, ...], tuple[str, ...]] | None = None
    test_group: str = "new_script"
    train_script: str = "any"

    def __post_init__(self):
        split_id(self.split)
        check_test_group(self.test_group)
        check_train_script(self.train_script)
        _check_kinds(self.kinds)
        for name in ("shots", "queries"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)!r}: need an int >= 1.")
        if self.max_len < 5:
            raise ValueError(f"max_len={self.max_len}: need >= 5 (BOS, SEP, END, two bytes).")

    def language_split(self) -> dict[str, tuple[str, ...]]:
        """``{meta-split: language codes}`` in use."""
        if self.languages is None:
            names = language_split(self.test_group)
        else:
            names = dict(zip(("train", "validation", "test"), self.languages, strict=True))
            names = lang_lib.check_split(names, base_locales())
        if self.train_script == "latin":
            names = {**names, "train": tuple(filter(latin_alone, names["train"]))}
        return names

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
