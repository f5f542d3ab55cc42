"""The languages of ``wordfreq`` 3.1, their families, and the default meta-split.

The default split holds out whole families, so meta-test measures transfer to language
families (and scripts) never seen in meta-training, not to close relatives of training
languages. Train: Germanic, Romance, Slavic, Indo-Aryan, Austroasiatic, Sino-Tibetan, Japonic
(28 languages). Validation: Turkic, Austronesian, Hellenic, Iranian (6). Test: Uralic, Semitic,
Dravidian, Baltic, Koreanic (8).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

# ISO 639 code -> family (branch for Indo-European, whose branches are distant enough).
FAMILIES = {
    # Indo-European: Germanic
    "en": "Germanic", "de": "Germanic", "nl": "Germanic", "da": "Germanic", "sv": "Germanic",
    "nb": "Germanic", "is": "Germanic",
    # Indo-European: Romance
    "es": "Romance", "fr": "Romance", "it": "Romance", "pt": "Romance", "ca": "Romance",
    "ro": "Romance",
    # Indo-European: Slavic (sh = Serbo-Croatian)
    "ru": "Slavic", "uk": "Slavic", "bg": "Slavic", "mk": "Slavic", "pl": "Slavic", "cs": "Slavic",
    "sk": "Slavic", "sl": "Slavic", "sh": "Slavic",
    # Indo-European: Baltic, Hellenic, Indo-Aryan, Iranian
    "lt": "Baltic", "lv": "Baltic",
    "el": "Hellenic",
    "hi": "Indo-Aryan", "ur": "Indo-Aryan", "bn": "Indo-Aryan",
    "fa": "Iranian",
    # Other families
    "ta": "Dravidian",
    "fi": "Uralic", "hu": "Uralic",
    "tr": "Turkic",
    "ar": "Semitic", "he": "Semitic",
    "id": "Austronesian", "ms": "Austronesian", "fil": "Austronesian",
    "vi": "Austroasiatic",
    "zh": "Sino-Tibetan",
    "ja": "Japonic",
    "ko": "Koreanic",
}  # fmt: skip

# Held-out families. Test: 8 languages of 5 families (3 new scripts: Hebrew/Arabic, Tamil,
# Hangul). Validation: 6 languages of 4 families. Train: the other 28 languages.
DEFAULT_SPLIT_FAMILIES = {
    "validation": ("Turkic", "Austronesian", "Hellenic", "Iranian"),
    "test": ("Uralic", "Semitic", "Dravidian", "Baltic", "Koreanic"),
}


def default_split(available: Iterable[str]) -> dict[str, tuple[str, ...]]:
    """``{meta-split: languages}`` by held-out family; languages of unknown family train.

    Args:
      available: language codes to split (e.g. ``wordfreq.available_languages()``).
    """
    out: dict[str, list[str]] = {"train": [], "validation": [], "test": []}
    for lang in sorted(available):
        family = FAMILIES.get(lang)
        split = next((s for s, fams in DEFAULT_SPLIT_FAMILIES.items() if family in fams), "train")
        out[split].append(lang)
    return {k: tuple(v) for k, v in out.items()}


def check_split(
    split: dict[str, Sequence[str]], available: Iterable[str]
) -> dict[str, tuple[str, ...]]:
    """Validates an explicit ``{meta-split: languages}``: disjoint and all available."""
    flat = [lang for langs in split.values() for lang in langs]
    if len(flat) != len(set(flat)):
        raise ValueError(f"a language is in more than one meta-split: {split}")
    if missing := sorted(set(flat) - set(available)):
        raise ValueError(f"languages {missing} are not available (have {sorted(available)}).")
    return {k: tuple(split.get(k, ())) for k in ("train", "validation", "test")}
