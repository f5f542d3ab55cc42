"""Omniglot: offline builder over the real zips, episodes, splits, rotations, errors, TFDS path."""

import os
import zipfile

import jax
import numpy as np
import pytest
from conftest import data_dir

tfds = pytest.importorskip("tensorflow_datasets")

from metajax.tasks import omniglot as om  # noqa: E402
from metajax.tasks import omniglot_builder as ob  # noqa: E402

ZIP_DIR = data_dir("omniglot")
SMALL = ("images_background_small1.zip", "images_background_small2.zip")
SMALL_ALPHABETS = {
    "Balinese",
    "Early_Aramaic",
    "Greek",
    "Korean",
    "Latin",
    "Japanese_(katakana)",
    "Sanskrit",
    "Tagalog",
}
needs_zips = pytest.mark.skipif(
    not all((ZIP_DIR / z).exists() for z in SMALL), reason=f"Omniglot small zips not in {ZIP_DIR}"
)


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory):
    """The real small zips, prepared once for the whole test run."""
    if not all((ZIP_DIR / z).exists() for z in SMALL):
        pytest.skip(f"Omniglot small zips not in {ZIP_DIR}")
    path = tmp_path_factory.mktemp("tfds")
    ob.prepare(ZIP_DIR, path)
    return str(path)


def source(data_dir, **kw):
    return om.Omniglot(zip_dir=str(ZIP_DIR), data_dir=data_dir, **kw)


def to_uint8(x):
    return (
        np.round(np.asarray(x) * 255).astype(np.uint8)[..., 0] if x.dtype != np.uint8 else x[..., 0]
    )


def locate(pool, images):
    """(class, drawing) of each uint8 (n, 28, 28) image in the pool, by exact content."""
    index = {
        pool.images[c, d].tobytes(): (c, d)
        for c in range(pool.images.shape[0])
        for d in range(pool.images.shape[1])
    }
    return np.array([index[im.tobytes()] for im in images])


@needs_zips
def test_build_reads_real_zips(data_dir):
    builder = ob.prepare(None, data_dir)  # reused: no zip folder needed any more
    assert {k: v.num_examples for k, v in builder.info.splits.items()} == {
        "small1": 2720,
        "small2": 3120,
    }
    every = om._load_all(*source(data_dir)._load_key())
    assert set(every.alphabet) == SMALL_ALPHABETS
    # 242 distinct characters after dropping Greek and Latin, which are in both zips.
    assert every.images.shape == (242, 20, 28, 28)
    assert len(set(every.label)) == 242
    # One stored record equals its PNG decoded and resized independently, with the right label.
    ex = builder.as_data_source("small2")[7]
    name = f"{ex['label'] + 1:04d}_{ex['drawer'] + 1:02d}.png"
    with zipfile.ZipFile(ZIP_DIR / SMALL[1]) as zf:
        member = next(n for n in zf.namelist() if n.endswith("/" + name))
    key, raw = next((k, e) for k, e in ob.iter_zip(str(ZIP_DIR / SMALL[1])) if k == member)
    assert ob.ALPHABETS[ex["alphabet"]] == raw["alphabet"] == member.split("/")[1]
    assert ex["alphabet_char_id"] == raw["alphabet_char_id"]
    np.testing.assert_array_equal(ex["image"][..., 0], ob.resize(raw["image"][None, ..., 0], 28)[0])
    assert raw["image"].shape == (105, 105, 1) and set(np.unique(raw["image"])) == {0, 255}


@needs_zips
def test_default_alphabet_split_is_5_1_2_and_disjoint(data_dir):
    splits = source(data_dir).alphabet_split()
    assert splits == {
        "train": ("Balinese", "Early_Aramaic", "Latin", "Sanskrit", "Tagalog"),
        "validation": ("Japanese_(katakana)",),
        "test": ("Greek", "Korean"),
    }
    labels = {s: set(source(data_dir, split=s).classes().label) for s in splits}
    assert not labels["train"] & labels["validation"]
    assert not labels["train"] & labels["test"]
    assert not labels["validation"] & labels["test"]
    explicit = (("Greek",), ("Latin",), ("Korean",))
    pool = source(data_dir, split="validation", alphabets=explicit).classes()
    assert set(pool.alphabet) == {"Latin"} and pool.images.shape[0] == 26 * 4
    with pytest.raises(ValueError, match="more than one"):
        om.split_alphabets(SMALL_ALPHABETS, (("Greek",), ("Greek",), ("Latin",)))


@needs_zips
@pytest.mark.parametrize(
    "ways,shots,queries,dtype", [(5, 1, 15, "float32"), (20, 1, 5, "float32"), (5, 5, 3, "uint8")]
)
def test_episode_shapes_labels_and_content(data_dir, ways, shots, queries, dtype):
    src = source(data_dir, ways=ways, shots=shots, queries=queries, dtype=dtype)
    task = src.sample(step=3, num_tasks=4)
    (xs, ys), (xq, yq) = task.support, task.query
    assert xs.shape == (4, ways * shots, 28, 28, 1) and xs.dtype == np.dtype(dtype)
    assert xq.shape == (4, ways * queries, 28, 28, 1) and xq.dtype == np.dtype(dtype)
    assert ys.shape == (4, ways * shots) and ys.dtype == np.int32
    if dtype == "float32":
        assert 0.0 <= xs.min() and xs.max() <= 1.0
    pool = src.classes()
    for t in range(4):
        s = locate(pool, to_uint8(xs[t]))
        q = locate(pool, to_uint8(xq[t]))
        # Each label is one class, the query's classes are the support's, drawings disjoint.
        s_class = {int(y): {c for c, _ in s[ys[t] == y]} for y in range(ways)}
        assert all(len(v) == 1 for v in s_class.values())
        assert len(set.union(*s_class.values())) == ways
        for y in range(ways):
            assert {c for c, _ in q[yq[t] == y]} == s_class[y]
        assert not {tuple(p) for p in s} & {tuple(p) for p in q}
        assert sorted(np.bincount(ys[t], minlength=ways)) == [shots] * ways


@needs_zips
def test_labels_are_a_fresh_permutation_per_task(data_dir):
    ys = source(data_dir).sample(0, 32).support[1]  # (32, 5), one shot: grouped by class
    assert all(sorted(row) == list(range(5)) for row in ys)
    assert len({tuple(row) for row in ys}) > 10  # 120 permutations; identical rows = no shuffle


@needs_zips
def test_rotations_are_new_classes(data_dir):
    pool = source(data_dir).classes()
    assert pool.images.shape[0] == 4 * 131  # 5 train alphabets, 131 characters
    for c in (0, 57, 130):
        base = pool.images[4 * c]
        for r in range(1, 4):
            np.testing.assert_array_equal(pool.images[4 * c + r], np.rot90(base, r, axes=(1, 2)))
            assert pool.label[4 * c + r] == pool.label[4 * c] and pool.rotation[4 * c + r] == r
        assert not np.array_equal(pool.images[4 * c + 1], base)
    plain = source(data_dir, rotations=False).classes()
    np.testing.assert_array_equal(plain.images, pool.images[::4])


@needs_zips
def test_seed_determinism_and_first_task_split(data_dir):
    a, b = source(data_dir).sample(5, 8), source(data_dir).sample(5, 8)
    np.testing.assert_array_equal(a.query[0], b.query[0])
    other = source(data_dir, seed=1).sample(5, 8)
    assert not np.array_equal(a.support[0], other.support[0])
    assert not np.array_equal(a.support[0], source(data_dir).sample(6, 8).support[0])
    lo, hi = source(data_dir).sample(5, 4, 0), source(data_dir).sample(5, 4, first_task=4)
    leaves = jax.tree.leaves
    for whole, x, y in zip(leaves(a), leaves(lo), leaves(hi), strict=True):
        np.testing.assert_array_equal(whole, np.concatenate([x, y]))


def test_missing_folder_error(tmp_path):
    missing = tmp_path / "nope"
    with pytest.raises(FileNotFoundError, match=f"{missing}.*does not exist.*images_background"):
        ob.prepare(missing, tmp_path / "tfds")
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "readme.txt").write_text("x")
    with pytest.raises(FileNotFoundError, match="holds none of the expected zip.*readme.txt"):
        ob.prepare(tmp_path / "empty", tmp_path / "tfds")
    with pytest.raises(FileNotFoundError, match="not prepared.*METAJAX_OMNIGLOT_DIR"):
        ob.prepare(None, tmp_path / "tfds")
    assert not (tmp_path / "tfds" / "metajax_omniglot").exists()  # failed before TFDS wrote


def test_corrupt_zip_error(tmp_path):
    bad = tmp_path / "images_background_small1.zip"
    bad.write_bytes(b"PK\x03\x04 this is not a zip")
    with pytest.raises(ValueError, match=f"{bad}.*not a readable zip"):
        ob.prepare(tmp_path, tmp_path / "tfds")
    # A zip whose member data is damaged: its CRC check fails, naming the member.
    with zipfile.ZipFile(bad, "w", compression=zipfile.ZIP_STORED) as zf:
        zf.writestr("images_background_small1/Greek/character01/0394_01.png", b"A" * 64)
    data = bad.read_bytes().replace(b"A" * 64, b"B" * 64)
    bad.write_bytes(data)
    with pytest.raises(ValueError, match="corrupt.*0394_01.png"):
        ob.find_zips(tmp_path)


# ---- the stock TFDS path, mocked with class-structured fake data ------------------------------

FAKE_SPLITS = {"train": ob.BACKGROUND_ALPHABETS[:5], "test": ob.EVALUATION_ALPHABETS[:2]}


def fake_examples(split):
    """Stock-format records: RGB (105, 105, 3) white background, a pattern per (label, drawer)."""
    out, label = [], 0 if split == "train" else 100
    for name in FAKE_SPLITS[split]:
        for char in range(3):
            for drawer in range(20):
                blocks = np.random.default_rng([label, drawer]).random((15, 15)) < 0.3
                gray = np.where(np.kron(blocks, np.ones((7, 7), bool)), 0, 255).astype(np.uint8)
                out.append(
                    {
                        "image": np.repeat(gray[:, :, None], 3, axis=2),
                        "alphabet": ob.ALPHABETS.index(name),
                        "alphabet_char_id": char,
                        "label": label,
                    }
                )
            label += 1
    return out


def fake_as_data_source(self, split, **kwargs):
    del self, kwargs
    return fake_examples(split)


def test_tfds_path_mocked_gives_same_episode_format(tmp_path):
    with tfds.testing.mock_data(as_data_source_fn=fake_as_data_source):
        src = om.Omniglot(
            source="tfds", data_dir=str(tmp_path), split="train", ways=5, shots=2, queries=3
        )
        splits = src.alphabet_split()
        # Evaluation alphabets present: they are the test split; background -> train/validation.
        assert splits["test"] == tuple(sorted(FAKE_SPLITS["test"]))
        assert len(splits["validation"]) == 1 and len(splits["train"]) == 4
        assert set(splits["train"] + splits["validation"]) == set(FAKE_SPLITS["train"])
        task = src.sample(0, 6)
        pool = src.classes()
    assert pool.images.shape == (4 * 3 * 4, 20, 28, 28)
    (xs, ys), (xq, yq) = task.support, task.query
    assert xs.shape == (6, 10, 28, 28, 1) and xq.shape == (6, 15, 28, 28, 1)
    assert xs.dtype == np.float32 and ys.dtype == yq.dtype == np.int32
    # Inverted: the fake's white background is 0, its black blocks are ink near 1.
    assert 0.2 < xs.mean() < 0.4 and xs.max() > 0.9  # 30% ink; not inverted would be ~0.7
    for t in range(6):
        s, q = locate(pool, to_uint8(xs[t])), locate(pool, to_uint8(xq[t]))
        for y in range(5):
            assert len({c for c, _ in s[ys[t] == y]} | {c for c, _ in q[yq[t] == y]}) == 1


@needs_zips
def test_full_zip_names_and_stale_build_warning(data_dir, tmp_path):
    # The full official zips map to the stock split names (contents stand in here).
    for full, small in [("images_background.zip", SMALL[0]), ("images_evaluation.zip", SMALL[1])]:
        (tmp_path / full).write_bytes((ZIP_DIR / small).read_bytes())
    found = ob.find_zips(tmp_path)
    assert {k: os.path.basename(v) for k, v in found.items()} == {
        "train": "images_background.zip",
        "test": "images_evaluation.zip",
    }
    # The shared fixture's build has small1/small2 only: pointing it at a folder with more warns.
    with pytest.warns(UserWarning, match=r"without splits \['test', 'train'\]"):
        ob.prepare(tmp_path, data_dir)
