"""Built-in task families for the runner: each maps a Config to a Setup.

Here: ``sinusoid``. Also registered on import: ``omniglot``
(:mod:`metajax.families_omniglot`), ``words_lm`` and ``words_langid``
(:mod:`metajax.families_words`). A new family is a frozen dataclass for its
``Config.task`` and a builder decorated with ``@register_family(name)``;
import its module here (or from its config file) so that the registry sees it.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from metajax.experiment import Config, Setup, register_family
from metajax.models.losses import mse_loss
from metajax.models.mlp import MLP
from metajax.tasks.sinusoid import Sinusoid


@dataclasses.dataclass(frozen=True)
class SinusoidTask:
    """Sinusoid regression with an MLP (MAML paper, section 5.1).

    Attributes:
      shots: K, support points per task (train and eval).
      queries: query points per task.
      hidden: the MLP's hidden widths.
    """

    shots: int = 10
    queries: int = 10
    hidden: tuple[int, ...] = (40, 40)


@register_family("sinusoid")
def sinusoid(config: Config) -> Setup:
    task: SinusoidTask = config.task
    seed = config.train.seed
    model = MLP(hidden=tuple(task.hidden))
    params = model.init(jax.random.key(seed), jnp.zeros((1, 1), jnp.float32))
    loss_fn = mse_loss(model.apply)
    train = Sinusoid(shots=task.shots, queries=task.queries, split="train", seed=seed)
    test = Sinusoid(shots=task.shots, queries=task.queries, split="test", seed=seed)

    def plot_fn(algo, meta_params, plots_dir):
        from metajax.plots import sinusoid_fit

        return sinusoid_fit(algo, meta_params, model.apply, test, plots_dir,
                            steps=(1, config.eval.inner_steps))

    return Setup(params, loss_fn, None, train, test, plot_fn, predict_fn=model.apply)


# Registers the other built-in families (imported last: they import this module's registry).
import metajax.families_omniglot  # noqa: E402, F401
import metajax.families_words  # noqa: E402, F401
