"""The ``omniglot`` family: N-way K-shot Omniglot with the MAML paper's 4-block ConvNet.

Gradient-based algorithms adapt the whole :class:`~metajax.models.ConvNet`, N-way head
included; ProtoNets meta-learns the same network without its head (``Setup.embedding``).
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import jax
import jax.numpy as jnp

from metajax.models.convnet import ConvNet, ConvNetConfig
from metajax.models.losses import accuracy_metric, classification_loss
from metajax.run.config import Config, ConfigError, require_positive
from metajax.run.setup import Embedding, Evaluator, Family, Setup

ENV = "METAJAX_OMNIGLOT_DIR"


@dataclasses.dataclass(frozen=True)
class OmniglotTask:
    """Omniglot N-way K-shot classification (MAML paper, section 5.2).

    Attributes:
      ways: N classes per task.
      shots: K support drawings per class.
      queries: query drawings per class.
      train_shots: support drawings per class in meta-training tasks (0: shots); Reptile
        trains on more drawings than a test task has (Nichol et al., 2018).
      filters: channels of each conv block (64 in the paper).
      norm: ConvNet normalisation, batch (transductive, as in MAML), layer or none.
      source: zips (offline builder over the official zips) or tfds (stock TFDS omniglot,
        the full 30 + 20 alphabets where it can be downloaded).
      zip_dir: folder with the official zips (source zips); none: $METAJAX_OMNIGLOT_DIR.
      data_dir: TFDS data dir for the prepared dataset; none: $TFDS_DATA_DIR or
        ~/tensorflow_datasets.
      download: source tfds: let TFDS download and prepare (needs TensorFlow).
      eval_split: meta-split evaluated: test (alphabets never seen in meta-training) or
        validation.
    """

    ways: int = 5
    shots: int = 1
    queries: int = 15
    train_shots: int = 0
    filters: int = 64
    norm: str = "batch"
    source: str = "zips"
    zip_dir: str | None = None
    data_dir: str | None = None
    download: bool = False
    eval_split: str = "test"


def zip_dir(task: OmniglotTask) -> str:
    """Explicit ``task.zip_dir``, else ``$METAJAX_OMNIGLOT_DIR``.

    Raises:
      ConfigError: neither is set.
    """
    folder = task.zip_dir or os.environ.get(ENV)
    if not folder:
        raise ConfigError(
            f"no Omniglot data: set task.zip_dir or ${ENV} to the folder of the official zips "
            "(images_background.zip, images_evaluation.zip, ...)."
        )
    return folder


def build(config: Config) -> Setup:
    from metajax.tasks.omniglot import IMAGE_SIZE, Omniglot

    task: OmniglotTask = config.task
    _check(task)
    seed = config.train.seed
    net = ConvNetConfig(ways=task.ways, filters=task.filters, norm=task.norm)
    x0 = jnp.zeros((task.ways, 28, 28, 1), jnp.uint8)
    key = jax.random.key(seed)
    model = ConvNet(net)
    embed = ConvNet(dataclasses.replace(net, head=False))
    # uint8 images: a quarter of the host-to-device bytes; the ConvNet scales them by 1/255.
    common = dict(
        ways=task.ways,
        shots=task.shots,
        queries=task.queries,
        seed=seed,
        source=task.source,
        # The stock TFDS source reads no zips.
        zip_dir=zip_dir(task) if task.source == "zips" else task.zip_dir,
        data_dir=task.data_dir,
        download=task.download,
        dtype="uint8",
    )
    train = Omniglot(split="train", **{**common, "shots": task.train_shots or task.shots})
    test = Omniglot(split=task.eval_split, **common)
    # One compiled init: op by op, each initializer of each shape would compile on its own.
    return Setup(
        params=jax.jit(model.init)(key, x0),
        loss_fn=classification_loss(model.apply),
        metric_fn=accuracy_metric(model.apply),
        train_source=train,
        eval_source=test,
        # Known without sampling a task: prediction reads no data.
        evaluator=Evaluator(model.apply, input_shape=(IMAGE_SIZE, IMAGE_SIZE, 1)),
        embedding=Embedding(jax.jit(embed.init)(key, x0), embed.apply, task.ways),
        head="head",
    )


def _check(task: OmniglotTask) -> None:
    require_positive(task, "ways", "shots", "queries", "filters")
    if task.train_shots < 0:
        raise ConfigError(f"task.train_shots={task.train_shots} must be >= 0 (0: task.shots).")
    if task.source not in ("zips", "tfds"):
        raise ConfigError(f"task.source={task.source!r}: choose 'zips' or 'tfds'.")
    if task.source == "zips":
        from metajax.tasks.omniglot_builder import ZIP_SPLITS

        folder = Path(zip_dir(task))
        if not any((folder / f"{stem}.zip").is_file() for stem in ZIP_SPLITS):
            raise ConfigError(
                f"Omniglot folder {folder} holds none of the official zips "
                f"({', '.join(s + '.zip' for s in ZIP_SPLITS)}): set "
                f"task.zip_dir or ${ENV} to their folder."
            )


FAMILY = Family(
    OmniglotTask,
    build,
    # What is evaluated, not what was trained.
    eval_keys=("task.eval_split", "task.zip_dir", "task.data_dir", "task.source"),
    requires=("tensorflow_datasets", "array_record", "PIL"),
)
