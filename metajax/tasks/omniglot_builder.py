"""An offline TFDS builder for Omniglot that needs no TensorFlow and no network.

The stock TFDS ``omniglot`` builder needs TensorFlow to prepare (its extractor,
``tf.io.gfile`` and the PNG encoding of ``tfds.features.Image``). This builder
reads the official zip files of https://github.com/brendenlake/omniglot
(``python/images_*.zip``) with :mod:`zipfile` from a local folder, decodes the
PNGs with PIL and writes ArrayRecord files whose image is a plain
``tfds.features.Tensor(dtype=uint8)``. Reading it back is ``builder.as_data_source``:
numpy out, no TensorFlow either.

Feature names and meanings follow the stock dataset, so both paths feed the same
episode sampler: ``image`` (white background 255, black strokes 0),
``alphabet`` (ClassLabel over the sorted 50 alphabet names: the same ids as stock),
``alphabet_char_id`` (0-based character index within its alphabet) and ``label``
(global character id 0..1622, from the file name ``NNNN_DD.png``). One feature is
ours: ``drawer`` (0..19, the ``DD`` of the file name, one of 20 people).

Splits are the zips found in the folder: ``train`` (images_background.zip),
``test`` (images_evaluation.zip), ``small1``, ``small2`` (the two 5-alphabet
subsets of background; they share Greek and Latin, so readers deduplicate).
"""

from __future__ import annotations

import dataclasses
import io
import os
import re
import warnings
import zipfile

import numpy as np
import tensorflow_datasets as tfds

# Zip file stem -> TFDS split name (the stock builder's names).
ZIP_SPLITS = {
    "images_background": "train",
    "images_evaluation": "test",
    "images_background_small1": "small1",
    "images_background_small2": "small2",
}
BACKGROUND_ALPHABETS = (
    "Alphabet_of_the_Magi", "Anglo-Saxon_Futhorc", "Arcadian", "Armenian",
    "Asomtavruli_(Georgian)", "Balinese", "Bengali", "Blackfoot_(Canadian_Aboriginal_Syllabics)",
    "Braille", "Burmese_(Myanmar)", "Cyrillic", "Early_Aramaic", "Futurama", "Grantha", "Greek",
    "Gujarati", "Hebrew", "Inuktitut_(Canadian_Aboriginal_Syllabics)", "Japanese_(hiragana)",
    "Japanese_(katakana)", "Korean", "Latin", "Malay_(Jawi_-_Arabic)", "Mkhedruli_(Georgian)",
    "N_Ko", "Ojibwe_(Canadian_Aboriginal_Syllabics)", "Sanskrit", "Syriac_(Estrangelo)",
    "Tagalog", "Tifinagh",
)  # fmt: skip
EVALUATION_ALPHABETS = (
    "Angelic", "Atemayar_Qelisayer", "Atlantean", "Aurek-Besh", "Avesta", "Ge_ez", "Glagolitic",
    "Gurmukhi", "Kannada", "Keble", "Malayalam", "Manipuri", "Mongolian",
    "Old_Church_Slavonic_(Cyrillic)", "Oriya", "Sylheti", "Syriac_(Serto)", "Tengwar", "Tibetan",
    "ULOG",
)  # fmt: skip
# The stock builder sorts the union of the alphabets of its four zips: these 50.
ALPHABETS = tuple(sorted(BACKGROUND_ALPHABETS + EVALUATION_ALPHABETS))
NUM_LABELS = 1623
_PNG = re.compile(r"^[^/]+/([^/]+)/character(\d+)/(\d+)_(\d+)\.png$")
_EXPECTED = (
    "the official Omniglot zips from https://github.com/brendenlake/omniglot/tree/master/python: "
    "images_background.zip and/or images_evaluation.zip, or images_background_small1.zip and/or "
    "images_background_small2.zip (metajax never downloads them)"
)


def find_zips(zip_dir: str | os.PathLike) -> dict[str, str]:
    """The official Omniglot zips in ``zip_dir``, checked.

    Returns:
      ``{split name: zip path}`` for each official zip present.

    Raises:
      FileNotFoundError: the folder does not exist or holds none of the zips.
      ValueError: a zip is corrupt or truncated (names the file).
    """
    zip_dir = os.path.abspath(os.path.expanduser(os.fspath(zip_dir)))
    if not os.path.isdir(zip_dir):
        raise FileNotFoundError(
            f"Omniglot folder {zip_dir!r} does not exist; expected {_EXPECTED}."
        )
    found = {}
    for stem, split in ZIP_SPLITS.items():
        path = os.path.join(zip_dir, stem + ".zip")
        if os.path.exists(path):
            _check_zip(path)
            found[split] = path
    if not found:
        raise FileNotFoundError(
            f"Omniglot folder {zip_dir!r} holds none of the expected zip files "
            f"(it has: {sorted(os.listdir(zip_dir))[:10]}); expected {_EXPECTED}."
        )
    return found


def _check_zip(path: str) -> None:
    # testzip reads every member and checks its CRC: a truncated download fails here, before
    # a build, rather than as a confusing error half-way through writing records.
    try:
        with zipfile.ZipFile(path) as zf:
            bad = zf.testzip()
            pngs = [n for n in zf.namelist() if _PNG.match(n)]
    except (zipfile.BadZipFile, OSError, EOFError) as e:
        raise ValueError(f"{path!r} is not a readable zip file ({e}); expected {_EXPECTED}.") from e
    if bad is not None:
        raise ValueError(f"{path!r} is corrupt: member {bad!r} fails its CRC check.")
    if not pngs:
        raise ValueError(
            f"{path!r} holds no Omniglot images (<root>/<alphabet>/characterNN/NNNN_DD.png)."
        )


def iter_zip(path: str):
    """Yields ``(key, example)`` for every drawing in one official Omniglot zip.

    The example has the builder's features; ``image`` is uint8 (105, 105, 1).
    """
    from PIL import Image

    with zipfile.ZipFile(path) as zf:
        for name in sorted(zf.namelist()):
            m = _PNG.match(name)
            if m is None:
                continue
            alphabet, char, label, drawer = m.groups()
            try:
                with Image.open(io.BytesIO(zf.read(name))) as im:
                    image = np.asarray(im.convert("L"), dtype=np.uint8)
            except Exception as e:  # PIL raises several unrelated types for a bad PNG.
                raise ValueError(f"{path!r}: cannot decode {name!r} ({e}).") from e
            yield (
                name,
                {
                    "image": image[:, :, None],
                    "alphabet": alphabet,
                    "alphabet_char_id": int(char) - 1,
                    "label": int(label) - 1,
                    "drawer": int(drawer) - 1,
                },
            )


@dataclasses.dataclass
class OmniglotZipsConfig(tfds.core.BuilderConfig):
    """``image_size``: side of the stored images; 105 keeps the originals."""

    image_size: int = 105


class MetajaxOmniglot(tfds.core.GeneratorBasedBuilder):
    """Omniglot from the official zips in a local folder, as ArrayRecord, without TensorFlow.

    Configs: ``"105"`` stores the original 105x105 drawings, ``"28"`` stores them resized
    once with PIL's Lanczos filter to 28x28 (the MAML setting; 14x smaller and faster to
    read). Use :func:`prepare` rather than this class directly.
    """

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "Official zips read with zipfile; uint8 Tensor images."}
    BUILDER_CONFIGS = [
        OmniglotZipsConfig(name="105", image_size=105, description="Original 105x105."),
        OmniglotZipsConfig(name="28", image_size=28, description="Lanczos-resized to 28x28."),
    ]
    DEFAULT_CONFIG_NAME = "28"

    @tfds.core.utils.classproperty
    @classmethod
    def code_path(cls):
        # TFDS looks for a checksums file next to the builder's code, and its lookup imports
        # the optional `importlib_resources`; nothing is downloaded here, so there is none.
        return None

    def __init__(self, *, zip_dir: str | os.PathLike | None = None, **kwargs):
        self._zip_dir = zip_dir
        super().__init__(file_format="array_record", **kwargs)

    def _log_download_bytes(self) -> None:
        # TFDS would announce a download of "Unknown size"; nothing is downloaded here.
        print(
            f"Building the Omniglot dataset from the zips in {self._zip_dir} into "
            f"{self.data_dir} (once; later runs reuse it).",
            flush=True,
        )

    def _info(self) -> tfds.core.DatasetInfo:
        s = self.builder_config.image_size
        return self.dataset_info_from_configs(
            features=tfds.features.FeaturesDict(
                {
                    "image": tfds.features.Tensor(shape=(s, s, 1), dtype=np.uint8),
                    "alphabet": tfds.features.ClassLabel(names=ALPHABETS),
                    "alphabet_char_id": np.int64,
                    "label": tfds.features.ClassLabel(num_classes=NUM_LABELS),
                    "drawer": np.int64,
                }
            ),
            supervised_keys=("image", "label"),
            homepage="https://github.com/brendenlake/omniglot",
        )

    def _split_generators(self, dl_manager):
        del dl_manager  # Nothing is downloaded.
        if self._zip_dir is None:
            raise FileNotFoundError(f"MetajaxOmniglot needs zip_dir: a folder with {_EXPECTED}.")
        return {
            split: self._generate_examples(path) for split, path in find_zips(self._zip_dir).items()
        }

    def _generate_examples(self, path):
        size = self.builder_config.image_size
        for key, ex in iter_zip(path):
            if ex["alphabet"] not in ALPHABETS:
                raise ValueError(f"{path!r}: unknown alphabet {ex['alphabet']!r} in {key!r}.")
            if size != ex["image"].shape[0]:
                ex["image"] = resize(ex["image"][None, :, :, 0], size)[0, :, :, None]
            yield key, ex


def resize(images: np.ndarray, size: int) -> np.ndarray:
    """Lanczos resize, as in the MAML code (PIL ``Image.LANCZOS``).

    Args:
      images: uint8 (n, h, w).
      size: output side.

    Returns:
      uint8 (n, size, size).
    """
    from PIL import Image

    out = np.empty((len(images), size, size), np.uint8)
    for i, im in enumerate(images):
        out[i] = np.asarray(Image.fromarray(im).resize((size, size), Image.LANCZOS))
    return out


def default_data_dir() -> str:
    """Where prepared datasets go: ``$TFDS_DATA_DIR`` or ``~/tensorflow_datasets``."""
    return os.path.expanduser(os.environ.get("TFDS_DATA_DIR", "~/tensorflow_datasets"))


def prepare(
    zip_dir: str | os.PathLike | None,
    data_dir: str | os.PathLike | None = None,
    image_size: int = 28,
) -> MetajaxOmniglot:
    """Builds the dataset once into ``data_dir`` (reused after) and returns its builder.

    Args:
      zip_dir: folder with the official zips; only read when the dataset is not prepared yet.
      data_dir: TFDS data dir; default :func:`default_data_dir`.
      image_size: 28 or 105 (the builder config).

    Raises:
      FileNotFoundError, ValueError: from :func:`find_zips`, naming the path at fault.
    """
    data_dir = os.fspath(data_dir) if data_dir is not None else default_data_dir()
    builder = MetajaxOmniglot(zip_dir=zip_dir, data_dir=data_dir, config=str(image_size))
    if not builder.is_prepared():
        if zip_dir is None:
            raise FileNotFoundError(
                f"Omniglot is not prepared in {data_dir!r} and no zip folder was given; "
                f"set zip_dir (or METAJAX_OMNIGLOT_DIR) to a folder with {_EXPECTED}."
            )
        find_zips(zip_dir)  # Fails fast with a clear message before TFDS creates anything.
        builder.download_and_prepare(
            download_config=tfds.download.DownloadConfig(
                compute_stats=tfds.download.ComputeStatsMode.SKIP, try_download_gcs=False
            )
        )
    elif zip_dir is not None and os.path.isdir(zip_dir):
        # Prepared from fewer zips than the folder now holds (say the small ones, then the full
        # ones were added): say so rather than silently training on the old subset.
        present = {
            split
            for stem, split in ZIP_SPLITS.items()
            if os.path.exists(os.path.join(zip_dir, stem + ".zip"))
        }
        if extra := sorted(present - set(builder.info.splits.keys())):
            warnings.warn(
                f"Omniglot in {builder.data_dir!r} was prepared without splits {extra} now in "
                f"{zip_dir!r}; delete that folder to rebuild with them.",
                stacklevel=2,
            )
    return builder
