"""The MLP of the MAML sinusoid experiment: two hidden layers of 40 ReLU units."""

from __future__ import annotations

from collections.abc import Sequence

import flax.linen as nn
import jax


class MLP(nn.Module):
    """A plain ReLU MLP; ``MLP()`` is the paper's 1 -> 40 -> 40 -> 1 regressor.

    Stateless, so ``model.apply(params, x)`` is a pure function of ``params``.
    Input ``(batch, features)``, output ``(batch, out_features)``.
    """

    hidden: Sequence[int] = (40, 40)
    out_features: int = 1

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        for width in self.hidden:
            x = nn.relu(nn.Dense(width)(x))
        return nn.Dense(self.out_features)(x)
