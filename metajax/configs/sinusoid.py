"""Sinusoid regression, the MAML paper's setup (Finn et al., 2017, section 5.1).

MLP 1-40-40-1 (ReLU), one inner SGD step at lr 0.01 in meta-training, meta-batch 25, Adam
1e-3 outer, 30000 meta-steps; evaluation on 600 new tasks after 0..10 SGD steps at 0.01.
Variants (``metajax train sinusoid:VARIANT``): ``[k<K>_]<algorithm>`` with K the support
size (default 10) and algorithm

- ``maml`` (default, second order), ``fomaml``;
- ``reptile``: 5 inner steps, outer SGD at 1.0 on the pseudo-gradient (the batched update);
- ``pretrain``: the paper's baseline, one model fitted to all tasks pooled, then fine-tuned
  with the same SGD rule;

e.g. ``sinusoid:k5_maml``, ``sinusoid:k20_pretrain``; ``""``, ``fomaml``, ``reptile`` are K=10.
``tiny``: a few steps of a small MLP for smoke tests (seconds).

Command: ``metajax train sinusoid:k5_maml --workdir runs/sinusoid_k5_maml`` (all twelve:
``bash experiments/run_sinusoid.sh``); each takes minutes on a CPU. Results and run times:
experiments/RESULTS.md.

Any field can be changed with ``--set``, e.g. ``--set task.shots=5 train.steps=20000``.
"""

import dataclasses

from metajax.run.config import (
    AlgorithmConfig,
    Config,
    EvalConfig,
    OptimizerConfig,
    TrainConfig,
)
from metajax.run.families.sinusoid import SinusoidTask

VARIANTS = (
    *("maml", "fomaml", "reptile", "pretrain"),  # K = 10, e.g. sinusoid:fomaml
    *(f"k{k}_{a}" for k in (5, 10, 20) for a in ("maml", "fomaml", "reptile", "pretrain")),
    "tiny",
)


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
    name, _, algo = variant.partition("_") if variant.startswith("k") else ("", "", variant)
    if name:
        if not name[1:].isdigit():
            raise ValueError(f"sinusoid variant {variant!r}: expected k<shots>[_<algorithm>].")
        shots = int(name[1:])
        config = dataclasses.replace(
            config, name=f"sinusoid_{name}", task=dataclasses.replace(config.task, shots=shots)
        )
    if algo in ("", "maml"):
        return config
    if algo == "fomaml":
        return dataclasses.replace(
            config,
            name=f"{config.name}_fomaml",
            algorithm=AlgorithmConfig(name="fomaml", inner_steps=1, inner_lr=0.01),
        )
    if algo == "reptile":
        # Reptile's pseudo-gradient with plain SGD at 1.0 is the paper's batched update.
        return dataclasses.replace(
            config,
            name=f"{config.name}_reptile",
            algorithm=AlgorithmConfig(name="reptile", inner_steps=5, inner_lr=0.01),
            optimizer=OptimizerConfig(name="sgd", lr=1.0),
        )
    if algo == "pretrain":
        # One model fitted to all tasks pooled (Adam 1e-3, like MAML's outer loop), then
        # fine-tuned at test time with MAML's inner rule: SGD at 0.01.
        return dataclasses.replace(
            config,
            name=f"{config.name}_pretrain",
            algorithm=AlgorithmConfig(name="pretrain", inner_steps=1, inner_lr=0.01),
        )
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
        f"sinusoid has no variant {variant!r}; choose [k<shots>_]{{maml,fomaml,reptile,pretrain}}"
        " or 'tiny' (e.g. 'k5_reptile')."
    )
