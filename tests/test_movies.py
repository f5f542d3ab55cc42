"""The movies family: the MovieTweetings-format loader, its tasks, nDCG, the runner, prediction."""

import json
import math
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import data_dir

from metajax.run import cli, predict
from metajax.run.config import ConfigError
from metajax.run.config_files import load_config
from metajax.tasks import movies

SHARED = data_dir("movietweetings")
GENRES = ("Drama", "Comedy", "Horror", "Sci-Fi")


def write_data(folder: Path, users: int = 40, per_user: int = 22, n_movies: int = 60, seed=0):
    """A small file pair of the format: ratings = user bias + movie quality + noise."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    quality = rng.normal(0, 1.5, n_movies)
    lines = []
    for m in range(n_movies):
        genres = "|".join(GENRES[j] for j in range(4) if (m >> j) & 1)
        lines.append(f"{m:07d}::Film number {m} ({1950 + m})::{genres}")
    (folder / "movies.dat").write_text("\n".join(lines) + "\n")
    rows = []
    for u in range(users):
        bias = rng.normal(0, 1.0)
        for k, m in enumerate(rng.choice(n_movies, per_user, replace=False)):
            r = int(np.clip(np.round(7 + bias + quality[m] + rng.normal(0, 0.5)), 0, 10))
            rows.append(f"{1000 + u}::{m:07d}::{r}::{1_400_000_000 + 1000 * u + k}")
    (folder / "ratings.dat").write_text("\n".join(rows) + "\n")
    return folder / "ratings.dat", folder / "movies.dat"


@pytest.fixture
def synthetic(tmp_path):
    return write_data(tmp_path / "data")


@pytest.fixture
def shared():
    if not (SHARED / "ratings.dat").is_file():
        pytest.skip(f"needs {SHARED} (MovieTweetings ratings.dat and movies.dat)")
    return SHARED


def source(paths, split="train", **kw):
    data = movies.load(*paths)
    tok = movies.HashedWords(256, 8)
    args = dict(shots=5, queries=10, seed=0, tokenizer=tok, **kw)
    return movies.MovieRatings(data, split=split, **args)


def test_ndcg_matches_a_hand_computation():
    pred, rating = jnp.array([3.0, 1.0, 2.0]), jnp.array([1.0, 3.0, 2.0])
    # Ranked by pred: items 0 (gain 1), 2 (gain 2); ideal: gains 3, 2.
    dcg, ideal = 1 + 2 / math.log2(3), 3 + 2 / math.log2(3)
    assert float(jax.jit(movies.ndcg_at_k, static_argnums=2)(pred, rating, 2)) == pytest.approx(
        dcg / ideal, rel=1e-6
    )
    assert float(movies.ndcg_at_k(rating, rating, 5)) == pytest.approx(1.0)
    # Ties keep the given order: a constant prediction ranks items as they come.
    tie = movies.ndcg_at_k(jnp.zeros(3), jnp.array([0.0, 0.0, 4.0]), 1)
    assert float(tie) == 0.0
    assert float(movies.ndcg_at_k(jnp.ones(3), jnp.zeros(3), 2)) == 1.0


def test_loader_joins_texts_and_splits_users(synthetic):
    data = movies.load(*synthetic)
    assert len(data.rating) == 40 * 22 and len(data.user_ids) == 40
    assert data.texts[3] == "Film number 3 (1953) | Drama, Comedy"
    assert data.texts[0] == "Film number 0 (1950) |"
    split = movies.split_users(data, 20, seed=0)
    sizes = {k: len(v) for k, v in split.items()}
    assert sizes == {"train": 28, "validation": 4, "test": 8}
    assert len(np.unique(np.concatenate(list(split.values())))) == 40
    again, other = movies.split_users(data, 20, seed=0), movies.split_users(data, 20, seed=1)
    assert all(np.array_equal(split[k], again[k]) for k in split)
    assert not np.array_equal(split["test"], other["test"])


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda r, m: r.write_text("1::0000001::7\n"), "line 1: expected user::movie"),
        (lambda r, m: r.write_text("1::9999999::7::5\n"), "movie 9999999 is not in"),
        (lambda r, m: r.write_text("1::0000001::11::5\n"), "rating 11 outside 0..10"),
        (lambda r, m: r.write_text("1::0000001::x::5\n"), "must be numbers"),
        (lambda r, m: m.write_text("0000001\n"), "expected movie::Title"),
        (lambda r, m: r.unlink(), "cannot read"),
    ],
)
def test_loader_names_what_is_wrong(synthetic, edit, message):
    edit(*synthetic)
    with pytest.raises(movies.MoviesError, match=message):
        movies.load(*synthetic)


def test_too_few_users_and_too_short_users(tmp_path):
    paths = write_data(tmp_path / "few", users=5)
    with pytest.raises(movies.MoviesError, match="5 users have >= 20 ratings: too few"):
        source(paths)
    with pytest.raises(movies.MoviesError, match="exceeds min_ratings"):
        source(write_data(tmp_path / "ok"), min_ratings=12)


def test_tasks_are_a_pure_function_of_step_and_index(synthetic):
    src = source(synthetic)
    a, b = src.sample(3, 4), src.sample(3, 2, first_task=2)
    chex_equal = jax.tree.map(lambda x, y: np.array_equal(x[2:], y), a, b)
    assert all(jax.tree.leaves(chex_equal))
    (tokens, feats), y = a.support
    assert tokens.shape == (4, 5, 8) and feats.shape == (4, 5, 4) and y.shape == (4, 5)
    assert a.query[1].shape == (4, 10)
    assert not np.array_equal(a.query[1], src.sample(4, 4).query[1])
    # Support and query are different ratings of one user: 15 distinct movies.
    ids = np.concatenate([a.support[0][0][0], a.query[0][0][0]])
    assert len({tuple(r) for r in ids}) == 15


def test_time_split_puts_the_support_first(synthetic):
    src = source(synthetic, time_split=True)
    for i in range(5):
        rng = movies.task_rng(0, 0, 0, i)
        s, q = src._task(rng)
        assert src.time[s].max() < src.time[q].min()


def test_features_leave_the_own_rating_out(synthetic):
    data = movies.load(*synthetic)
    train, test = source(synthetic), source(synthetic, split="test")
    users = movies.split_users(data, 20, 0)
    row = int(np.flatnonzero(np.isin(data.user, users["train"]))[0])
    m = data.movie[row]
    others = np.isin(data.user, users["train"]) & (data.movie == m)
    g = train.global_mean
    rest = data.rating[others & (np.arange(len(data.rating)) != row)]
    expected = rest.mean() - g if len(rest) else 0.0
    assert train.row_features[row, 0] == pytest.approx(expected, abs=1e-5)
    assert train.row_features[row, 3] == float(len(rest) > 0)
    # Test users' rows see every meta-training rating of the movie.
    assert test.movie_features[m, 0] == pytest.approx(data.rating[others].mean() - g, abs=1e-5)


def test_hashed_words_keep_genres_and_decade_first():
    tok = movies.HashedWords(512, 6)
    ids = tok.ids("The Long Title Of A Film (1999) | Drama, Sci-Fi")
    drama, scifi = 1 + movies.GENRES.index("drama"), 1 + movies.GENRES.index("sci-fi")
    assert ids[:3] == [drama, scifi, 1 + len(movies.GENRES) + 14]  # the 1990s
    assert len(ids) == 6 and all(tok.reserved <= i < 512 for i in ids[3:])
    assert tok.ids("the (1999) | Drama")[-1] == tok.ids("THE (1999) | Drama")[-1]
    assert tok.encode(["x"]).shape == (1, 6) and movies.Bytes(0, 4).encode(["ab"])[0, 0] == 98


def test_eval_keys_and_variants():
    c = load_config("movies:5s_anil")
    assert (c.task.shots, c.task.queries, c.algorithm.name) == (5, 10, "anil")
    assert c.eval.num_tasks == 600 and c.eval.inner_steps == 10
    assert load_config("movies:10s_pretrain").algorithm.inner_steps == 2
    assert load_config("movies:tiny").train.steps <= 20
    with pytest.raises(Exception, match="variant"):
        load_config("movies:7s_maml")


def train_args(workdir, paths, spec="movies:tiny", *sets):
    r, m = paths
    return [
        "train",
        spec,
        "--workdir",
        str(workdir),
        "--no-progress",
        "--set",
        f"task.ratings_file={r}",
        f"task.movies_file={m}",
        *sets,
    ]


def test_data_errors_exit_2_before_training(tmp_path, synthetic, monkeypatch, capsys):
    monkeypatch.delenv("METAJAX_MOVIETWEETINGS_DIR", raising=False)
    args = ["train", "movies:tiny", "--workdir", str(tmp_path / "w"), "--no-progress"]
    assert cli.main(args) == 2
    assert "METAJAX_MOVIETWEETINGS_DIR" in capsys.readouterr().err
    synthetic[0].write_text("1::0000001::12::5\n")
    assert cli.main(train_args(tmp_path / "w", synthetic)) == 2
    assert "rating 12 outside 0..10" in capsys.readouterr().err
    assert not (tmp_path / "w").exists()


def test_tiny_train_eval_on_another_file_and_predict(tmp_path, synthetic):
    workdir = tmp_path / "run"
    assert cli.main([*train_args(workdir, synthetic), "--no-eval"]) == 0
    # Any file of the format: other users, other movies, the same trained model.
    other = write_data(tmp_path / "other", users=30, seed=5)
    out = tmp_path / "other.json"
    sets = [f"task.ratings_file={other[0]}", f"task.movies_file={other[1]}"]
    args = ["eval", "movies:tiny", "--workdir", str(workdir), "--output", str(out), "--set"]
    assert cli.main(args + sets) == 0
    result = json.loads(out.read_text())
    assert result["config"]["task"]["ratings_file"] == str(other[0])
    assert set(result["metrics"]) == {"loss", "mae", "rmse", "ndcg5"}
    mae, ndcg = result["metrics"]["mae"]["mean"], result["metrics"]["ndcg5"]["mean"]
    assert len(mae) == 3 and all(0.0 < v < 6.0 for v in mae)
    assert all(0.0 < v <= 1.0 for v in ndcg)
    # RMSE per task is at least its MAE, and its square at most the mean loss (Jensen).
    rmse, loss = result["metrics"]["rmse"]["mean"], result["metrics"]["loss"]["mean"]
    assert all(a <= r <= math.sqrt(q) + 1e-6 for a, r, q in zip(mae, rmse, loss, strict=True))
    assert cli.main(args + ["task.width=16"]) == 2  # the model is fixed by training

    model = predict.load(workdir)
    data = movies.load(*synthetic)
    seen = [data.texts[i] for i in range(6)]
    candidates = [data.texts[10], "An Unseen Film (2031) | Horror"]
    high = model.adapt_and_predict(seen, [10] * 6, candidates, steps=5)
    low = model.adapt_and_predict(seen, [0] * 6, candidates, steps=5)
    assert high.shape == (2,) and np.all(np.isfinite(high))
    assert np.all(high > low + 0.5)  # a user who loved the support movies is predicted higher
    with pytest.raises(ValueError, match="one rating per movie"):
        model.adapt_and_predict(seen, [5] * 5, candidates)
    with pytest.raises(ValueError, match="ratings must lie in 0..10"):
        model.adapt_and_predict(seen, [11] * 6, candidates)


def test_baselines_on_the_shared_data(shared, monkeypatch):
    import importlib.util

    monkeypatch.setenv("METAJAX_MOVIETWEETINGS_DIR", str(shared))
    path = Path(__file__).resolve().parents[1] / "experiments" / "movies_baselines.py"
    spec = importlib.util.spec_from_file_location("movies_baselines", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    result = mod.baselines("movies:10s_maml", ["eval.num_tasks=100", "eval.chunk=50"])
    b = result["baselines"]
    assert result["num_tasks"] == 100 and set(b) == set(mod.BASELINES)
    # Ratings 0..10 with most between 6 and 9: a constant misses by 1 to 2 on average.
    assert 1.0 < b["global mean"]["mae"]["mean"] < 2.0
    assert b["movie mean + user offset"]["mae"]["mean"] < b["global mean"]["mae"]["mean"]
    # A constant ranks at random; movie means rank better.
    assert b["movie mean"]["ndcg5"]["mean"] > b["user mean"]["ndcg5"]["mean"]


def test_config_error_is_raised_by_the_family(synthetic):
    from metajax.run.families import movies as family

    config = load_config("movies:tiny", ["task.tokenizer=chars"])
    with pytest.raises(ConfigError, match="choose words or bytes"):
        family.build(config)
