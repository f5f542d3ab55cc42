"""The ``movies`` family: cold-start rating prediction, each user a task (MovieTweetings format).

A Transformer encoder reads each movie's text (:mod:`metajax.tasks.movies`); its mean-pooled
features, beside the movie's four meta-training statistics (``task.item_stats``), go through
a small MLP, the rating head, to one rating per movie. Loss: mean squared error on the
rating; metrics: MAE, RMSE (per task) and nDCG@5 of the query movies ranked by predicted
rating. ANIL adapts the head alone, as MeLU adapts its decision layers.

A user's data for ``adapt_and_predict``: movie texts (``"Title (Year) | Genre, Genre"``, as
:func:`metajax.tasks.movies.item_text` writes them) and their ratings; the candidates are
texts too, and the result is one predicted rating per candidate.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from metajax.models.losses import mse_loss
from metajax.models.transformer import TransformerConfig, TransformerEncoder
from metajax.run.config import Config, ConfigError
from metajax.run.setup import Evaluator, Family, Setup
from metajax.tasks import movies

ENV = "METAJAX_MOVIETWEETINGS_DIR"


@dataclasses.dataclass(frozen=True)
class MoviesTask:
    """Users as tasks: predict a user's ratings of movies from a few of their ratings.

    Attributes:
      data_dir: folder of relative file names; none: $METAJAX_MOVIETWEETINGS_DIR.
      ratings_file: user::movie::rating::timestamp lines (absolute, or under data_dir).
      movies_file: movie::Title (Year)::Genre|Genre lines (absolute, or under data_dir).
      rating_min: the lowest rating allowed in the file.
      rating_max: the highest rating allowed in the file.
      min_ratings: users with fewer ratings are left out of every split.
      shots: support ratings per task (the user's known ratings).
      queries: query ratings per task (the ratings predicted).
      time_split: the support ratings precede the query ratings in time.
      item_stats: the head also reads each movie's meta-training statistics (mean, shrunk
        mean, log count, seen); false: the movie text alone.
      tokenizer: words (hashed lowercased words, genre and decade ids) or bytes.
      vocab_size: words: token ids in all (hash buckets plus genres and decades).
      max_len: tokens per movie text.
      width: Transformer width.
      depth: Transformer blocks.
      heads: attention heads.
      mlp_width: hidden width of each block's MLP.
      head_width: hidden width of the rating head.
      eval_split: users evaluated: test or validation.
    """

    data_dir: str | None = None
    ratings_file: str = "ratings.dat"
    movies_file: str = "movies.dat"
    rating_min: float = 0.0
    rating_max: float = 10.0
    min_ratings: int = 20
    shots: int = 10
    queries: int = 10
    time_split: bool = False
    item_stats: bool = True
    tokenizer: str = "words"
    vocab_size: int = 2048
    max_len: int = 16
    width: int = 32
    depth: int = 1
    heads: int = 2
    mlp_width: int = 64
    head_width: int = 32
    eval_split: str = "test"


class RatingModel(nn.Module):
    """Item text encoder plus rating head: ``(tokens (n, L), features (n, 4)) -> (n,)`` ratings.

    The encoder sees token ids only, so another tokenizer (a pretrained model's) can feed it
    by changing how texts become ids. Predictions are ``global_mean`` plus the head's output.
    """

    config: TransformerConfig
    pad_id: int
    head_width: int
    item_stats: bool
    global_mean: float

    @nn.compact
    def __call__(self, tokens: jax.Array, feats: jax.Array) -> jax.Array:
        h = TransformerEncoder(self.config, pad_id=self.pad_id, name="encoder")(tokens)
        if self.item_stats:
            h = jnp.concatenate([h, feats.astype(h.dtype)], axis=-1)
        return self.global_mean + RatingHead(self.head_width, name="head")(h)


class RatingHead(nn.Module):
    """The decision layers: Dense, ReLU, Dense to one rating offset per item."""

    width: int

    @nn.compact
    def __call__(self, h: jax.Array) -> jax.Array:
        h = nn.relu(nn.Dense(self.width)(h))
        return nn.Dense(1, kernel_init=nn.initializers.normal(0.01))(h)[:, 0]


def data_paths(task: MoviesTask) -> tuple[Path, Path]:
    """The ratings and movies files the config names, resolved."""
    folder = task.data_dir or os.environ.get(ENV)
    paths = []
    for name in (task.ratings_file, task.movies_file):
        path = Path(name).expanduser()
        if not path.is_absolute():
            if folder is None:
                raise ConfigError(
                    f"no MovieTweetings data: set task.data_dir or ${ENV} to the folder of "
                    f"{task.ratings_file} and {task.movies_file}, or give absolute paths."
                )
            path = Path(folder).expanduser() / path
        paths.append(path)
    return paths[0], paths[1]


def sources(task: MoviesTask, seed: int) -> tuple[movies.MovieRatings, movies.MovieRatings]:
    """The meta-training source and the ``eval_split`` source, checked before training."""
    _check(task)
    ratings, movies_file = data_paths(task)
    tokenizer = movies.TOKENIZERS[task.tokenizer](task.vocab_size, task.max_len)
    try:
        data = movies.load(ratings, movies_file, (task.rating_min, task.rating_max))
        common = dict(
            shots=task.shots,
            queries=task.queries,
            seed=seed,
            tokenizer=tokenizer,
            min_ratings=task.min_ratings,
            time_split=task.time_split,
        )
        train = movies.MovieRatings(data, split="train", **common)
        test = movies.MovieRatings(data, split=task.eval_split, **common)
    except movies.MoviesError as e:
        raise ConfigError(f"task: {e}") from None
    return train, test


def build(config: Config) -> Setup:
    task: MoviesTask = config.task
    train, test = sources(task, config.train.seed)
    tok = train.tokenizer
    net = TransformerConfig(
        vocab_size=tok.vocab_size,
        width=task.width,
        depth=task.depth,
        heads=task.heads,
        mlp_width=task.mlp_width,
        max_len=task.max_len,
    )
    model = RatingModel(net, tok.pad_id, task.head_width, task.item_stats, train.global_mean)
    apply = lambda params, x: model.apply(params, *x)
    x0 = (jnp.zeros((2, task.max_len), jnp.int32), jnp.zeros((2, len(movies.FEATURES))))
    # One compiled init: op by op, each initializer of each shape would compile on its own.
    params = jax.jit(model.init)(jax.random.key(config.train.seed), *x0)

    def batch_fn(texts, ratings):
        ratings = np.asarray(ratings, np.float32)
        if ratings.shape != (len(texts),):
            raise ValueError(f"give one rating per movie: {len(texts)} movies, {ratings.shape}.")
        if not np.all((ratings >= task.rating_min) & (ratings <= task.rating_max)):
            raise ValueError(f"ratings must lie in {task.rating_min:g}..{task.rating_max:g}.")
        return train.encode(texts), ratings

    return Setup(
        params=params,
        loss_fn=mse_loss(apply),
        metric_fn=rating_metrics(apply),
        train_source=train,
        eval_source=test,
        evaluator=Evaluator(apply, batch_fn=batch_fn, inputs_fn=train.encode),
        head="head",
    )


def rating_metrics(apply_fn):
    """``metric_fn(params, batch) -> {"mae", "rmse", "ndcg5"}`` of one task's query set."""

    def metric_fn(params, batch):
        x, y = batch
        pred = apply_fn(params, x)
        return {
            "mae": jnp.mean(jnp.abs(pred - y)),
            "rmse": jnp.sqrt(jnp.mean(jnp.square(pred - y))),
            "ndcg5": movies.ndcg_at_k(pred, y, 5),
        }

    return metric_fn


def _check(task: MoviesTask) -> None:
    for name in ("min_ratings", "shots", "queries", "width", "depth", "heads", "mlp_width"):
        if getattr(task, name) < 1:
            raise ConfigError(f"task.{name}={getattr(task, name)} must be >= 1.")
    if task.head_width < 1 or task.max_len < 4:
        raise ConfigError("task.head_width must be >= 1 and task.max_len >= 4.")
    if task.tokenizer not in movies.TOKENIZERS:
        raise ConfigError(f"task.tokenizer={task.tokenizer!r}: choose words or bytes.")
    if task.tokenizer == "words" and task.vocab_size < 64:
        raise ConfigError(f"task.vocab_size={task.vocab_size} must be >= 64 for words.")
    if task.eval_split not in ("validation", "test"):
        raise ConfigError(f"task.eval_split={task.eval_split!r}: choose test or validation.")
    if task.width % task.heads:
        raise ConfigError(f"task.width={task.width} is not divisible by task.heads={task.heads}.")
    if not task.rating_min < task.rating_max:
        raise ConfigError(f"task.rating_min={task.rating_min} must be < task.rating_max.")
    if task.shots + task.queries > task.min_ratings:
        raise ConfigError(
            f"task.shots + task.queries = {task.shots + task.queries} exceeds "
            f"task.min_ratings = {task.min_ratings}: some users could not fill a task."
        )


FAMILY = Family(
    MoviesTask,
    build,
    # A trained model may be pointed at other users: another file of the format (the hashed
    # tokens need no vocabulary) or the validation users.
    eval_keys=("task.eval_split", "task.data_dir", "task.ratings_file", "task.movies_file"),
)
