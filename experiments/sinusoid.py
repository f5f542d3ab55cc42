"""Sinusoid regression, the MAML paper's setup (Finn et al., 2017, section 5.1).

MLP 1-40-40-1 (ReLU), K=10 shots, one inner SGD step at lr 0.01, meta-batch
25, Adam 1e-3 outer. Variants (``metajax train sinusoid:VARIANT``):

- ``""`` (default): second-order MAML, sized to finish in a few minutes on a 2-core CPU;
- ``fomaml``, ``reptile``: the same task with the other built-in algorithms;
- ``tiny``: a few steps of a small MLP for smoke tests (seconds).

Any field can be changed with ``--set``, e.g. ``--set task.shots=5 train.steps=20000``.
"""

import dataclasses

from metajax.experiment import (
    AlgorithmConfig,
    Config,
    EvalConfig,
    OptimizerConfig,
    TrainConfig,
)
from metajax.families import SinusoidTask


def get_config(variant: str = "") -> Config:
    config = Config(
        name="sinusoid",
        family="sinusoid",
        task=SinusoidTask(shots=10, queries=10, hidden=(40, 40)),
        algorithm=AlgorithmConfig(name="maml", inner_steps=1, inner_lr=0.01),
        optimizer=OptimizerConfig(name="adam", lr=1e-3),
        train=TrainConfig(steps=30_000, meta_batch=25, log_every=100, checkpoint_every=5_000),
        eval=EvalConfig(num_tasks=600, inner_steps=10, chunk=200, table_steps=(0, 1, 10)),
    )
    if variant == "":
        return config
    if variant == "fomaml":
        return dataclasses.replace(
            config, name="sinusoid_fomaml",
            algorithm=AlgorithmConfig(name="fomaml", inner_steps=1, inner_lr=0.01))
    if variant == "reptile":
        # Reptile's pseudo-gradient with plain SGD at 1.0 is the paper's batched update.
        return dataclasses.replace(
            config, name="sinusoid_reptile",
            algorithm=AlgorithmConfig(name="reptile", inner_steps=5, inner_lr=0.01),
            optimizer=OptimizerConfig(name="sgd", lr=1.0))
    if variant == "tiny":
        return Config(
            name="sinusoid_tiny",
            family="sinusoid",
            task=SinusoidTask(shots=5, queries=5, hidden=(8,)),
            algorithm=AlgorithmConfig(name="maml", inner_steps=1, inner_lr=0.01),
            optimizer=OptimizerConfig(name="adam", lr=1e-2),
            # meta_batch 8 divides the 8 fake devices of the tests.
            train=TrainConfig(steps=20, meta_batch=8, log_every=5, checkpoint_every=10),
            eval=EvalConfig(num_tasks=16, inner_steps=2, chunk=16, table_steps=(0, 1, 2)),
        )
    raise ValueError(
        f"sinusoid has no variant {variant!r}; choose '', 'fomaml', 'reptile' or 'tiny'.")
