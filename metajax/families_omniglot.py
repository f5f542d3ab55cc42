"""The ``omniglot`` task family: N-way K-shot Omniglot with the MAML paper's 4-block ConvNet.

Gradient-based algorithms (MAML, FOMAML, Reptile, ANIL, ...) adapt the whole
:class:`~metajax.models.ConvNet`, N-way head included. ProtoNets
(``algorithm.name="protonets"``) meta-learns the same conv trunk without the
head, as an embedding; its adapted "parameters" are :class:`Prototypes`, and
the family's loss, metric and predictions accept either kind.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from metajax.algorithms.protonets import Prototypes, protonet_logits
from metajax.experiment import Config, ConfigError, Setup, register_family
from metajax.models.convnet import ConvNet, ConvNetConfig, PureNorm

# The offline zips shipped beside the repository (8 background alphabets).
DEFAULT_ZIP_DIR = Path(__file__).resolve().parents[2] / "shared" / "data" / "omniglot"


@dataclasses.dataclass(frozen=True)
class OmniglotTask:
    """Omniglot N-way K-shot classification (MAML paper, section 5.2).

    Attributes:
      ways: N classes per task.
      shots: K support drawings per class.
      train_shots: support drawings per class in meta-training tasks (0: ``shots``); Reptile
        trains on more drawings than a test task has (Nichol et al., 2018).
      queries: query drawings per class.
      filters: channels of each conv block (64 in the paper).
      norm: ConvNet normalisation, "batch" (transductive, as in MAML), "layer" or "none".
      source: "zips" (offline builder over the official zips) or "tfds" (stock TFDS omniglot,
        the full 30 + 20 alphabets where it can be downloaded).
      zip_dir: folder with the zips; default ``$METAJAX_OMNIGLOT_DIR`` or
        ``<repo>/../shared/data/omniglot``.
      data_dir: TFDS data dir for the prepared dataset; default ``$TFDS_DATA_DIR`` or
        ``~/tensorflow_datasets``.
      download: source "tfds": let TFDS download and prepare (needs TensorFlow).
      eval_split: meta-split evaluated: "test" (alphabets never seen in meta-training).
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


class ConvEmbedding(nn.Module):
    """The ConvNet's trunk without the head: ``(n, 28, 28, 1) -> (n, filters)`` features.

    Same layers and parameter names as :class:`ConvNet` (``conv_i``, ``norm_i``), so the
    embedding ProtoNets learns is the network MAML adapts, minus the N-way head.
    """

    config: ConvNetConfig

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        cfg = self.config
        if jnp.issubdtype(x.dtype, jnp.integer):
            x = x.astype(cfg.dtype) / 255.0
        for i in range(cfg.blocks):
            x = nn.Conv(cfg.filters, (3, 3), padding="SAME", name=f"conv_{i}")(x)
            if cfg.norm != "none":
                x = PureNorm(cfg.norm, cfg.norm_eps, name=f"norm_{i}")(x)
            x = nn.max_pool(nn.relu(x), (2, 2), strides=(2, 2), padding="VALID")
        return x.reshape(x.shape[0], -1)


def zip_dir(task: OmniglotTask) -> str:
    """Explicit ``task.zip_dir``, else ``$METAJAX_OMNIGLOT_DIR``, else the shared zips."""
    return task.zip_dir or os.environ.get("METAJAX_OMNIGLOT_DIR") or str(DEFAULT_ZIP_DIR)


def classifier_fns(logits_fn):
    """``(loss_fn, metric_fn)``: softmax cross-entropy and accuracy of ``logits_fn(params, x)``."""

    def loss_fn(params, batch):
        x, labels = batch
        logits = logits_fn(params, x).astype(jnp.float32)
        return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits, labels))

    def metric_fn(params, batch):
        x, labels = batch
        correct = jnp.argmax(logits_fn(params, x), axis=-1) == labels
        return {"accuracy": jnp.mean(correct.astype(jnp.float32))}

    return loss_fn, metric_fn


@register_family("omniglot")
def omniglot(config: Config) -> Setup:
    from metajax.tasks.omniglot import Omniglot

    task: OmniglotTask = config.task
    seed = config.train.seed
    net = ConvNetConfig(ways=task.ways, filters=task.filters, norm=task.norm)
    x0 = jnp.zeros((task.ways, 28, 28, 1), jnp.uint8)
    key = jax.random.key(seed)
    embed, model = ConvEmbedding(net), ConvNet(net)
    params = (embed if config.algorithm.name == "protonets" else model).init(key, x0)

    def logits_fn(p, x):
        # ProtoNets adapts to Prototypes; every other algorithm to ConvNet parameters.
        if isinstance(p, Prototypes):
            return protonet_logits(embed.apply, p, x)
        return model.apply(p, x)

    loss_fn, metric_fn = classifier_fns(logits_fn)
    # uint8 images: a quarter of the host-to-device bytes; the ConvNet scales them by 1/255.
    common = dict(ways=task.ways, shots=task.shots, queries=task.queries, seed=seed,
                  source=task.source, zip_dir=zip_dir(task), data_dir=task.data_dir,
                  download=task.download, dtype="uint8")
    if task.train_shots < 0:
        raise ConfigError(f"task.train_shots={task.train_shots} must be >= 0 (0: task.shots).")
    train = Omniglot(split="train", **{**common, "shots": task.train_shots or task.shots})
    test = Omniglot(split=task.eval_split, **common)
    return Setup(params, loss_fn, metric_fn, train, test, None,
                 embed_fn=embed.apply, predict_fn=logits_fn)
