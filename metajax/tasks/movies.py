"""Cold-start movie rating prediction: each user is a task (MeLU, KDD 2019; MAMO, KDD 2020).

Data in the MovieTweetings format: ``ratings.dat`` lines ``user::movie::rating::timestamp``
and ``movies.dat`` lines ``movie::Title (Year)::Genre|Genre``. Users with at least
``min_ratings`` ratings are split into meta-training, validation and test users (70/10/20,
a pure function of the seed). A task is one user: ``shots`` of their ratings are the
support set, ``queries`` others the query set.

A movie is read as its text, ``"Title (Year) | Genre, Genre"``, so a movie that no
meta-training user rated still has features; a tokenizer (:data:`TOKENIZERS`) turns texts
into token ids. Beside the tokens, each rated item carries four numbers computed from the
meta-training users' ratings only (:data:`FEATURES`): the movie's mean rating and a shrunk
mean, both centred on the global mean, its log count and whether any meta-training user
rated it. In meta-training tasks these leave the task's own user out (a leave-one-out
mean), so a movie the user alone rated looks unseen there, as a test movie would.

A batch is ``((tokens int32 (n, max_len), features float32 (n, 4)), ratings float32 (n,))``.
"""

from __future__ import annotations

import functools
import re
import zlib
from pathlib import Path
from typing import NamedTuple

import jax.numpy as jnp
import numpy as np

from metajax.tasks.base import TaskSource, split_id, task_rng
from metajax.types import Task

FEATURES = ("mean", "shrunk_mean", "log_count", "seen")
# Prior weight of the shrunk mean: a movie rated n times gets n / (n + SHRINK) of its own mean.
SHRINK = 5.0
SPLIT_FRACTIONS = (0.7, 0.1, 0.2)
GENRES = (
    "action adult adventure animation biography comedy crime documentary drama family fantasy "
    "film-noir game-show history horror music musical mystery news reality-tv romance sci-fi "
    "short sport talk-show thriller war western"
).split()


class MoviesError(ValueError):
    """A ratings or movies file, or a setting, that cannot give the tasks asked for."""


class Ratings(NamedTuple):
    """A ratings file joined with its movies file.

    Attributes:
      user: ``(r,)`` int user index into ``user_ids``.
      movie: ``(r,)`` int movie index into ``texts``.
      rating: ``(r,)`` float32 ratings.
      time: ``(r,)`` int64 unix timestamps.
      user_ids: the users' ids as written in the file.
      texts: each movie's text, ``"Title (Year) | Genre, Genre"``.
    """

    user: np.ndarray
    movie: np.ndarray
    rating: np.ndarray
    time: np.ndarray
    user_ids: list[str]
    texts: list[str]


def item_text(title: str, genres: list[str]) -> str:
    """The text a movie is read as: ``"Title (Year) | Genre, Genre"``."""
    return f"{title} | {', '.join(genres)}".rstrip()


def _lines(path: Path):
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise MoviesError(f"cannot read {path}: {e}") from None
    return [(i + 1, line) for i, line in enumerate(text.splitlines()) if line.strip()]


@functools.lru_cache(maxsize=8)
def _load(ratings_path: str, movies_path: str, low: float, high: float, stamp) -> Ratings:
    del stamp  # part of the cache key only: a rewritten file is read again
    index, texts = {}, []
    for n, line in _lines(Path(movies_path)):
        parts = line.split("::")
        if len(parts) < 3 or not parts[0].strip() or not parts[1].strip():
            raise MoviesError(f"{movies_path} line {n}: expected movie::Title (Year)::Genres.")
        genres = [g for g in "::".join(parts[2:]).split("|") if g.strip()]
        index[parts[0].strip()] = len(texts)
        texts.append(item_text(parts[1].strip(), genres))
    users, rows = {}, []
    for n, line in _lines(Path(ratings_path)):
        parts = line.split("::")
        where = f"{ratings_path} line {n}"
        if len(parts) != 4 or not parts[0].strip():
            raise MoviesError(f"{where}: expected user::movie::rating::timestamp, got {line!r}.")
        try:
            rating, stamp_ = float(parts[2]), int(parts[3])
        except ValueError:
            raise MoviesError(f"{where}: rating and timestamp must be numbers.") from None
        if parts[1].strip() not in index:
            raise MoviesError(f"{where}: movie {parts[1].strip()} is not in {movies_path}.")
        if not low <= rating <= high:
            raise MoviesError(f"{where}: rating {parts[2]} outside {low:g}..{high:g}.")
        user = users.setdefault(parts[0].strip(), len(users))
        rows.append((user, index[parts[1].strip()], rating, stamp_))
    if not rows:
        raise MoviesError(f"{ratings_path} holds no ratings.")
    user, movie, rating, time = (np.asarray(c) for c in zip(*rows, strict=True))
    return Ratings(
        user.astype(np.int64),
        movie.astype(np.int64),
        rating.astype(np.float32),
        time.astype(np.int64),
        list(users),
        texts,
    )


def load(ratings_path, movies_path, rating_range=(0.0, 10.0)) -> Ratings:
    """Reads and checks a ratings file and its movies file (cached while they are unchanged).

    Raises:
      MoviesError: a file that cannot be read, a malformed line, a movie id missing from
        the movies file or a rating outside ``rating_range``, named with its line.
    """
    paths = [Path(ratings_path).resolve(), Path(movies_path).resolve()]
    stamp = tuple((p.stat().st_mtime_ns, p.stat().st_size) if p.is_file() else 0 for p in paths)
    return _load(str(paths[0]), str(paths[1]), *map(float, rating_range), stamp)


def split_users(data: Ratings, min_ratings: int, seed: int) -> dict[str, np.ndarray]:
    """The users with ``>= min_ratings`` ratings, split 70/10/20 by a seeded permutation.

    Raises:
      MoviesError: too few such users for every split to hold one.
    """
    counts = np.bincount(data.user, minlength=len(data.user_ids))
    eligible = np.flatnonzero(counts >= min_ratings)
    n = len(eligible)
    n_val, n_test = round(n * SPLIT_FRACTIONS[1]), round(n * SPLIT_FRACTIONS[2])
    if min(n_val, n_test, n - n_val - n_test) < 1:
        raise MoviesError(
            f"{n} users have >= {min_ratings} ratings: too few to split 70/10/20 into "
            "meta-training, validation and test users (each needs one; 6 users suffice)."
        )
    order = eligible[np.random.default_rng([seed, 7]).permutation(n)]
    return {
        "train": np.sort(order[: n - n_val - n_test]),
        "validation": np.sort(order[n - n_val - n_test : n - n_test]),
        "test": np.sort(order[n - n_test :]),
    }


class ItemStats(NamedTuple):
    """Per-movie sums and counts of the meta-training users' ratings, and their mean."""

    total: np.ndarray
    count: np.ndarray
    global_mean: float


def item_stats(data: Ratings, train_users: np.ndarray) -> ItemStats:
    """Sums and counts of each movie's ratings by ``train_users``."""
    rows = np.isin(data.user, train_users)
    n = len(data.texts)
    total = np.bincount(data.movie[rows], weights=data.rating[rows], minlength=n)
    count = np.bincount(data.movie[rows], minlength=n).astype(np.float64)
    return ItemStats(total, count, float(data.rating[rows].mean()))


def features(stats: ItemStats, total: np.ndarray, count: np.ndarray) -> np.ndarray:
    """The :data:`FEATURES` of items with these meta-training sums and counts, ``(n, 4)``."""
    g = stats.global_mean
    seen = count > 0
    mean = np.where(seen, total / np.maximum(count, 1) - g, 0.0)
    shrunk = (total + SHRINK * g) / (count + SHRINK) - g
    return np.stack([mean, shrunk, np.log1p(count) / 4.0, seen], -1).astype(np.float32)


class HashedWords:
    """Lowercased words hashed into buckets; genres and decades get ids of their own.

    No vocabulary is stored: a text's ids depend on the text alone, so a trained model reads
    any file of the format. The year and the genres are put first, so truncation to
    ``max_len`` cuts the end of a long title, never them.
    """

    pad_id = 0

    def __init__(self, vocab_size: int, max_len: int):
        self.reserved = 1 + len(GENRES) + 20  # pad, genres, decades 1850s..2040s
        if vocab_size < self.reserved + 16:
            raise MoviesError(f"vocab_size={vocab_size}: the words tokenizer needs >= 64.")
        self.vocab_size, self.max_len = vocab_size, max_len

    def _hash(self, word: str) -> int:
        buckets = self.vocab_size - self.reserved
        return self.reserved + zlib.crc32(word.encode("utf-8")) % buckets

    def ids(self, text: str) -> list[int]:
        title, _, genres = text.rpartition(" | ") if " | " in text else (text, "", "")
        head = []
        for g in (g.strip().lower() for g in genres.split(",") if g.strip()):
            head.append(1 + GENRES.index(g) if g in GENRES else self._hash("genre:" + g))
        year = re.search(r"\((\d{4})\)\s*$", title)
        if year:
            decade = min(max((int(year.group(1)) - 1850) // 10, 0), 19)
            head += [1 + len(GENRES) + decade, self._hash("year:" + year.group(1))]
            title = title[: year.start()]
        words = [self._hash(w) for w in re.findall(r"\w+", title.lower())]
        return (head + words)[: self.max_len]

    def encode(self, texts) -> np.ndarray:
        """``(n, max_len)`` int32 ids of ``n`` texts, padded with ``pad_id``."""
        out = np.zeros((len(texts), self.max_len), np.int32)
        for i, text in enumerate(texts):
            ids = self.ids(text)
            out[i, : len(ids)] = ids
        return out


class Bytes:
    """UTF-8 bytes (ids 1..256), 0 the pad: the tokenizer that needs no word splitting."""

    pad_id, vocab_size = 0, 257

    def __init__(self, vocab_size: int, max_len: int):
        del vocab_size
        self.max_len = max_len

    def encode(self, texts) -> np.ndarray:
        out = np.zeros((len(texts), self.max_len), np.int32)
        for i, text in enumerate(texts):
            ids = np.frombuffer(text.encode("utf-8")[: self.max_len], np.uint8)
            out[i, : len(ids)] = ids.astype(np.int32) + 1
        return out


TOKENIZERS = {"words": HashedWords, "bytes": Bytes}


class MovieRatings(TaskSource):
    """The tasks of one user split: ``sample(step, num_tasks, first_task=0) -> Task``.

    Task ``i`` of meta-batch ``step`` draws a user of the split, then ``shots + queries`` of
    their ratings, as a pure function of ``(seed, split, step, i)``. With ``time_split`` the
    drawn ratings are ordered by time, so the support set precedes the query set.
    """

    def __init__(
        self,
        data: Ratings,
        *,
        split: str,
        shots: int,
        queries: int,
        seed: int,
        tokenizer,
        min_ratings: int = 20,
        time_split: bool = False,
    ):
        if shots < 1 or queries < 1:
            raise MoviesError(f"shots={shots} and queries={queries} must be >= 1.")
        if shots + queries > min_ratings:
            raise MoviesError(
                f"shots + queries = {shots + queries} exceeds min_ratings = {min_ratings}: "
                "some users could not fill a task."
            )
        self.split, self.shots, self.queries, self.seed = split, shots, queries, seed
        self.time_split, self.split_id = time_split, split_id(split)
        self.tokenizer = tokenizer
        users = split_users(data, min_ratings, seed)
        self.stats = item_stats(data, users["train"])
        self.global_mean = self.stats.global_mean
        self.tokens = tokenizer.encode(data.texts)
        self.movie_features = features(self.stats, self.stats.total, self.stats.count)
        self.index = {t: i for i, t in enumerate(data.texts)}
        order = np.argsort(data.user, kind="stable")
        bounds = np.searchsorted(data.user[order], users[split])
        ends = np.searchsorted(data.user[order], users[split], side="right")
        self.user_rows = [order[a:b] for a, b in zip(bounds, ends, strict=True)]
        self.users = users[split]
        self.movie, self.rating, self.time = data.movie, data.rating, data.time
        # A meta-training user's own rating is left out of its movie's statistics.
        own = np.isin(data.user, users["train"])
        m = data.movie
        self.row_features = features(
            self.stats, self.stats.total[m] - data.rating * own, self.stats.count[m] - own
        )

    @property
    def max_len(self) -> int:
        return self.tokenizer.max_len

    def encode(self, texts) -> tuple[np.ndarray, np.ndarray]:
        """Model inputs of movie texts: tokens and meta-training features (a text not in the
        movies file is an unseen movie)."""
        texts = list(texts)
        if not all(isinstance(t, str) for t in texts):
            raise ValueError("movies must be given as texts, 'Title (Year) | Genre, Genre'.")
        known = [self.index.get(t, -1) for t in texts]
        feats = (
            np.stack(
                [
                    self.movie_features[i] if i >= 0 else features(self.stats, 0.0, 0.0)
                    for i in known
                ]
            )
            if texts
            else np.zeros((0, len(FEATURES)), np.float32)
        )
        return self.tokenizer.encode(texts), feats.astype(np.float32)

    def _task(self, rng: np.random.Generator):
        rows = self.user_rows[rng.integers(len(self.user_rows))]
        pick = rows[rng.choice(len(rows), self.shots + self.queries, replace=False)]
        if self.time_split:
            pick = pick[np.argsort(self.time[pick], kind="stable")]
        return pick[: self.shots], pick[self.shots :]

    def _batch(self, rows: np.ndarray):
        x = (self.tokens[self.movie[rows]], self.row_features[rows])
        return x, self.rating[rows]

    def sample(self, step: int, num_tasks: int, first_task: int = 0) -> Task:
        """Tasks ``first_task .. first_task + num_tasks - 1`` of meta-batch ``step``."""
        picks = [
            self._task(task_rng(self.seed, self.split_id, step, first_task + i))
            for i in range(num_tasks)
        ]
        support = np.stack([s for s, _ in picks])
        query = np.stack([q for _, q in picks])
        return Task(self._batch(support), self._batch(query))


def ndcg_at_k(pred: jnp.ndarray, rating: jnp.ndarray, k: int = 5) -> jnp.ndarray:
    """nDCG@k of items ranked by ``pred``, with gain the true rating and discount
    ``1 / log2(rank + 1)`` (rank 1 first); jittable.

    Ties in ``pred`` keep the items' given order (a stable sort). A list whose ratings are all
    zero scores 1 (every order is ideal).

    Args:
      pred: ``(n,)`` predicted ratings.
      rating: ``(n,)`` true ratings (>= 0).
      k: the cut-off; ``min(k, n)`` items count.
    """
    k = min(k, pred.shape[0])
    discount = 1.0 / jnp.log2(jnp.arange(k) + 2.0)
    gains = rating.astype(jnp.float32)
    dcg = jnp.sum(gains[jnp.argsort(-pred, stable=True)[:k]] * discount)
    ideal = jnp.sum(jnp.sort(gains)[::-1][:k] * discount)
    return jnp.where(ideal > 0, dcg / jnp.where(ideal > 0, ideal, 1.0), 1.0)
