"""Omniglot N-way K-shot classification, as in the MAML paper (Finn et al., 2017, section 5.2).

Images are 28x28 (Lanczos-resized once, when the dataset is prepared or first loaded), inverted
so that ink is 1 and background 0, and every character seen under rotations of 0, 90, 180 and
270 degrees, each rotation a class of its own. A task draws N classes, K support and Q query
drawings per class (disjoint), and labels the classes by a random permutation of 0..N-1.

Meta-splits are by alphabet, so no character (nor any rotation of it) is shared between splits.

Two ways to the data, same episodes:

- ``source="zips"`` (default, offline, no TensorFlow): the official zips in a local folder
  (``zip_dir``, default ``$METAJAX_OMNIGLOT_DIR``) are prepared once by our TFDS builder
  (:mod:`metajax.tasks.omniglot_builder`) into ``data_dir`` and read back as ArrayRecord.
- ``source="tfds"``: the stock TFDS ``omniglot`` dataset via ``tfds.data_source``, for users who
  have it prepared in ``data_dir`` (preparing it needs TensorFlow; pass ``download=True`` to let
  TFDS download and prepare it).

Host-side sampling is numpy fancy indexing into one cached uint8 array; see
:func:`metajax.tasks.prefetch.prefetch` to overlap it with device work.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import os
import sys
from collections.abc import Sequence
from typing import NamedTuple

import numpy as np

from metajax.tasks import omniglot_builder as ob
from metajax.tasks.base import TaskSource, split_id, task_rng
from metajax.types import Task

IMAGE_SIZE = 28
SOURCES = ("zips", "tfds")


class ClassPool(NamedTuple):
    """The classes of one meta-split, cached in memory.

    Attributes:
      images: uint8 (num_classes, drawings, 28, 28); ink 255, background 0.
      alphabet: (num_classes,) alphabet name of each class.
      label: (num_classes,) global character id (0..1622) of each class.
      rotation: (num_classes,) quarter turns (0..3) applied to the character.
    """

    images: np.ndarray
    alphabet: np.ndarray
    label: np.ndarray
    rotation: np.ndarray


@dataclasses.dataclass(frozen=True)
class Omniglot(TaskSource):
    """Omniglot N-way K-shot tasks over one meta-split.

    ``sample`` returns ``Task(support=(x, y), query=(x, y))`` with a leading task axis T:
    support ``x`` float32 (T, N*K, 28, 28, 1) in [0, 1] (or uint8 in 0..255 with
    ``dtype="uint8"``; divide by 255 on device), ``y`` int32 (T, N*K) in 0..N-1; query
    likewise with N*Q examples. Examples are grouped by class in a random class order.

    Attributes:
      ways: N, classes per task.
      shots: K, support drawings per class.
      queries: Q, query drawings per class.
      split: "train", "validation" or "test".
      seed: the task stream's seed.
      source: "zips" (offline builder over the official zips) or "tfds" (stock TFDS omniglot).
      zip_dir: folder with the official zips (source "zips"); default ``$METAJAX_OMNIGLOT_DIR``.
        Only read when the dataset is not yet prepared in ``data_dir``.
      data_dir: TFDS data dir; default ``$TFDS_DATA_DIR`` or ``~/tensorflow_datasets``.
      tfds_splits: TFDS splits whose drawings are pooled; default: all prepared splits for
        "zips", ("train", "test") for "tfds". Duplicates (small1/small2 share two alphabets)
        are dropped.
      download: source "tfds" only: let TFDS download and prepare (needs TensorFlow).
      alphabets: explicit (train, validation, test) alphabet lists; overrides the defaults.
      split_fractions: (train, validation, test) shares of the alphabets when not explicit.
      split_seed: seed of the alphabet shuffle (independent of ``seed``: the split stays fixed
        when only the task stream changes).
      rotations: augment classes with 90/180/270-degree rotations.
      dtype: "float32" or "uint8" images.
    """

    ways: int = 5
    shots: int = 1
    queries: int = 15
    split: str = "train"
    seed: int = 0
    source: str = "zips"
    zip_dir: str | None = None
    data_dir: str | None = None
    tfds_splits: tuple[str, ...] | None = None
    download: bool = False
    alphabets: tuple[tuple[str, ...], tuple[str, ...], tuple[str, ...]] | None = None
    split_fractions: tuple[float, float, float] = (5 / 8, 1 / 8, 2 / 8)
    split_seed: int = 0
    rotations: bool = True
    dtype: str = "float32"

    def __post_init__(self):
        split_id(self.split)
        if min(self.ways, self.shots, self.queries) < 1:
            raise ValueError(
                f"ways, shots, queries must be >= 1: {self.ways, self.shots, self.queries}"
            )
        if self.source not in SOURCES:
            raise ValueError(f"unknown source {self.source!r}; expected one of {SOURCES}.")
        if self.dtype not in ("float32", "uint8"):
            raise ValueError(f"dtype must be 'float32' or 'uint8', got {self.dtype!r}.")

    def alphabet_split(self) -> dict[str, tuple[str, ...]]:
        """``{meta-split: alphabets}`` in use (loads the data if needed)."""
        available = [str(a) for a in np.unique(_load_all(*self._load_key()).alphabet)]
        return split_alphabets(available, self.alphabets, self.split_fractions, self.split_seed)

    def classes(self) -> ClassPool:
        """The cached classes of this meta-split (rotations included)."""
        return _split_pool(
            self._load_key(), tuple(self.alphabet_split()[self.split]), self.rotations
        )

    def check(self) -> None:
        """Raises ValueError unless this split can give every task: N classes and K + Q
        drawings of each (loads the data if needed)."""
        pool = self.classes()
        num_classes, drawings = pool.images.shape[:2]
        n, k, q = self.ways, self.shots, self.queries
        if n > num_classes:
            raise ValueError(
                f"{n}-way tasks need {n} classes; the {self.split} split has {num_classes} "
                f"({len(set(pool.alphabet))} alphabets"
                f"{', rotations included' if self.rotations else ''})."
            )
        if k + q > drawings:
            raise ValueError(
                f"{k}-shot {q}-query tasks need {k + q} drawings of a character; Omniglot "
                f"has {drawings} of each (shots + queries <= {drawings})."
            )

    def sample(self, step: int, num_tasks: int, first_task: int = 0) -> Task:
        self.check()
        pool = self.classes()
        num_classes, drawings = pool.images.shape[:2]
        n, k, q = self.ways, self.shots, self.queries
        sid = split_id(self.split)
        classes = np.empty((num_tasks, n), np.int64)
        picks = np.empty((num_tasks, n, k + q), np.int64)
        perm = np.empty((num_tasks, n), np.int32)
        for t in range(num_tasks):
            rng = task_rng(self.seed, sid, step, first_task + t)
            classes[t] = rng.choice(num_classes, n, replace=False)
            # A random permutation of the drawings of each class; its first K go to the support,
            # the next Q to the query, so they never overlap.
            picks[t] = np.argsort(rng.random((n, drawings)), axis=1)[:, : k + q]
            perm[t] = rng.permutation(n)
        s = IMAGE_SIZE

        def part(lo, hi):
            # Gathering each part on its own yields contiguous arrays: the reshapes are free and
            # the float conversion is one pass (this is most of the sampling time).
            m = n * (hi - lo)
            x = pool.images[classes[:, :, None], picks[:, :, lo:hi]].reshape(num_tasks, m, s, s, 1)
            if self.dtype == "float32":
                x = np.multiply(x, np.float32(1 / 255), dtype=np.float32)
            y = np.repeat(perm, hi - lo, axis=1)
            return x, y

        return Task(support=part(0, k), query=part(k, k + q))

    def _load_key(self):
        zip_dir = (
            self.zip_dir if self.zip_dir is not None else os.environ.get("METAJAX_OMNIGLOT_DIR")
        )
        data_dir = self.data_dir if self.data_dir is not None else ob.default_data_dir()
        return (self.source, zip_dir, os.path.expanduser(data_dir), self.tfds_splits, self.download)


def split_alphabets(
    available: Sequence[str],
    alphabets: tuple[Sequence[str], Sequence[str], Sequence[str]] | None = None,
    fractions: tuple[float, float, float] = (5 / 8, 1 / 8, 2 / 8),
    seed: int = 0,
) -> dict[str, tuple[str, ...]]:
    """Assigns alphabets to meta-splits; disjoint by construction.

    Explicit ``alphabets`` win. Otherwise, when the 20 evaluation alphabets are available, they
    are the test split (Lake et al.'s background/evaluation protocol) and the background ones
    are shuffled (``seed``) into train and validation by the ratio of ``fractions``. Otherwise
    all available alphabets are shuffled and cut by ``fractions`` (each split gets >= 1). With
    the 8 alphabets of the two small zips and the defaults this gives 5/1/2: test = Greek,
    Korean; validation = Japanese_(katakana); train = the other five.
    """
    available = sorted(set(available))
    if alphabets is not None:
        out = dict(zip(("train", "validation", "test"), map(tuple, alphabets), strict=True))
        flat = [a for v in out.values() for a in v]
        if len(flat) != len(set(flat)):
            raise ValueError(f"an alphabet is in more than one meta-split: {out}")
        if missing := sorted(set(flat) - set(available)):
            raise ValueError(f"alphabets {missing} are not in the data (available: {available}).")
        return out
    f_train, f_val, f_test = fractions
    order = np.random.default_rng(seed)
    evaluation = [a for a in available if a in ob.EVALUATION_ALPHABETS]
    if evaluation and len(evaluation) < len(available) - 1:
        rest = [
            available[i]
            for i in order.permutation(len(available))
            if available[i] not in evaluation
        ]
        n_val = max(1, round(len(rest) * f_val / (f_train + f_val)))
        test, val, train = evaluation, rest[:n_val], rest[n_val:]
    else:
        shuffled = [available[i] for i in order.permutation(len(available))]
        if len(shuffled) < 3:
            raise ValueError(f"need >= 3 alphabets for 3 meta-splits, have {shuffled}.")
        n_test = max(1, round(len(shuffled) * f_test))
        n_val = max(1, round(len(shuffled) * f_val))
        test, val = shuffled[:n_test], shuffled[n_test : n_test + n_val]
        train = shuffled[n_test + n_val :]
    return {
        "train": tuple(sorted(train)),
        "validation": tuple(sorted(val)),
        "test": tuple(sorted(test)),
    }


class _AllClasses(NamedTuple):
    images: np.ndarray  # uint8 (C, D, 28, 28), ink 255
    alphabet: np.ndarray  # (C,) str
    label: np.ndarray  # (C,) int


@functools.lru_cache(maxsize=4)
def _load_all(source, zip_dir, data_dir, tfds_splits, download) -> _AllClasses:
    """Reads every drawing once, deduplicates, groups by character; cached per process."""
    if source == "zips":
        if (
            zip_dir is not None
            and not ob.MetajaxOmniglot(
                zip_dir=zip_dir, data_dir=data_dir, config=str(IMAGE_SIZE)
            ).is_prepared()
        ):
            # The one-off build reads every drawing of the zips: a minute or more in which
            # nothing else would be printed.
            print(
                f"metajax: preparing Omniglot from {zip_dir} into {data_dir} (once; this "
                "takes a minute or two) ...",
                file=sys.stderr,
                flush=True,
            )
        builder = ob.prepare(zip_dir, data_dir, IMAGE_SIZE)
        splits = tfds_splits or tuple(builder.info.splits.keys())
        sources = [builder.as_data_source(s) for s in splits]
    else:
        import tensorflow_datasets as tfds

        splits = tfds_splits or ("train", "test")
        try:
            sources = [
                tfds.data_source("omniglot", split=s, data_dir=data_dir, download=download)
                for s in splits
            ]
        except Exception as e:  # TFDS raises assorted types for "not prepared".
            raise FileNotFoundError(
                f"stock TFDS 'omniglot' splits {splits} are not available in {data_dir!r} ({e}). "
                "Prepare them with TensorFlow installed (pip install metajax[tensorflow]; "
                "tfds.data_source('omniglot', data_dir=...) or download=True), or use "
                "source='zips' with the official zip files."
            ) from e
    groups: dict[int, dict] = {}
    alphabet_of: dict[int, str] = {}
    for src in sources:
        for i in range(len(src)):  # src[i], not __getitems__: the latter fails under mock_data.
            ex = src[i]
            image = np.asarray(ex["image"])[:, :, 0]  # stock images are RGB with equal channels
            label = int(ex["label"])
            # Drawer ids dedupe our splits; the stock data has none, so dedupe on content.
            key = int(ex["drawer"]) if "drawer" in ex else hashlib.sha1(image.tobytes()).digest()
            groups.setdefault(label, {}).setdefault(key, image)
            alphabet_of[label] = ob.ALPHABETS[int(ex["alphabet"])]
    labels = sorted(groups)
    counts = {len(groups[lab]) for lab in labels}
    if len(counts) != 1:
        raise ValueError(
            f"characters have unequal numbers of drawings {sorted(counts)} in {splits}."
        )
    raw = np.stack([np.stack([g[d] for d in sorted(g)]) for g in map(groups.get, labels)])
    c, d, h, w = raw.shape
    if h != IMAGE_SIZE:
        raw = ob.resize(raw.reshape(c * d, h, w), IMAGE_SIZE).reshape(c, d, IMAGE_SIZE, IMAGE_SIZE)
    # Invert: strokes become 1, as in the MAML code, so zero-padding and the mean are background.
    images = 255 - raw
    return _AllClasses(images, np.array([alphabet_of[lab] for lab in labels]), np.array(labels))


@functools.lru_cache(maxsize=8)
def _split_pool(load_key, alphabets: tuple[str, ...], rotations: bool) -> ClassPool:
    every = _load_all(*load_key)
    keep = np.isin(every.alphabet, alphabets)
    images = every.images[keep]
    turns = 4 if rotations else 1
    # Class c * turns + r is base class c turned r quarter turns (counter-clockwise).
    images = np.stack([np.rot90(images, r, axes=(2, 3)) for r in range(turns)], axis=1)
    c = images.shape[0]
    return ClassPool(
        images=np.ascontiguousarray(images.reshape(c * turns, *images.shape[2:])),
        alphabet=np.repeat(every.alphabet[keep], turns),
        label=np.repeat(every.label[keep], turns),
        rotation=np.tile(np.arange(turns), c),
    )
