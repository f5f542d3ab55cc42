"""Omniglot N-way K-shot with the 4-block ConvNet (Finn et al., 2017, section 5.2).

Meta-test alphabets are never seen in meta-training. Offline, the data are the 8 alphabets of
the two ``images_background_small`` zips in the folder ``$METAJAX_OMNIGLOT_DIR`` or
``--set task.zip_dir=DIR`` names (split 5 train / 1 validation / 2 test: Greek and Korean are
the test alphabets); with
``--set task.source=tfds`` the same configs read the full TFDS ``omniglot`` dataset.

Variants: ``<setting>_<algorithm>[_gpu]`` with setting ``5w1s``, ``5w5s`` or ``20w1s`` and
algorithm ``maml`` (second order), ``fomaml``, ``reptile``, ``anil`` or ``protonets``;
``""`` is ``5w1s_maml``; ``tiny`` (MAML) and ``tiny_<algorithm>`` are seconds-long smoke tests.

- CPU-sized (default): 32 filters, meta-batch 8 (Reptile: as in ``REPTILE``), 5 query
  drawings per class; 2000 meta-steps for the 5-way gradient-based methods, 1000 for 20-way
  and for ProtoNets. Tasks run one at a time in an unrolled loop and evaluation adapts one
  jitted task at a time (the fast forms for ConvNets on XLA:CPU; benchmarks/README.md).
  Command: ``metajax train omniglot:5w1s_maml --workdir runs/omniglot_5w1s_maml``.
  Results, run times and the commands that produced them: experiments/RESULTS.md.
- ``_gpu``: the paper's model and budget: 64 filters, meta-batch 32 (16 for 20-way), 15
  queries, 60000 meta-steps (Reptile: its published 100000, 200000 for 20-way, meta-batch as
  in ``REPTILE``), tasks vmapped. Targets on the 8-alphabet set: at least 95% (5w1s) and
  85% (20w1s) for second-order MAML; the paper reports 98.7 / 99.9 / 95.8 % for
  5w1s / 5w5s / 20w1s on the full background set.

Hyper-parameters follow the MAML paper: inner SGD at 0.4, one step for 5-way (5 steps at 0.1
for 20-way) in meta-training, 10 steps at evaluation; Adam 1e-3 outer. Reptile follows the
openai/supervised-reptile commands of Nichol et al. (2018) (``REPTILE`` below): inner Adam
with beta1 = 0 on mini-batches of more drawings than a test task has, meta-batch 3 to 10, outer
SGD on the pseudo-gradient annealed linearly to 0, 5 to 100 Adam steps at evaluation.
ProtoNets has no inner loop (evaluated after 0 steps). Evaluation: 600 test tasks, accuracy
with 95% intervals.
"""

import dataclasses

from metajax.run.config import (
    AlgorithmConfig,
    Config,
    EvalConfig,
    OptimizerConfig,
    TrainConfig,
)
from metajax.run.families.omniglot import OmniglotTask

SETTINGS = {"5w1s": (5, 1), "5w5s": (5, 5), "20w1s": (20, 1)}
ALGORITHMS = ("maml", "fomaml", "reptile", "anil", "protonets")


# One task at a time in an unrolled loop, and unrolled inner loops: on a CPU, per-task ConvNet
# weights under vmap make grouped convolutions and a lax.scan loses XLA's fast convolutions
# (jax-ml/jax#12868). On a GPU, vmap is the fast form (benchmarks/README.md has both).
CPU_TASK_LOOP = {"task_batch": 1, "unroll_tasks": True, "unroll": True}


# Reptile as in Nichol et al. (2018), the openai/supervised-reptile README commands: inner Adam
# (beta1 = 0) on mini-batches of more drawings per class than a test task has, the outer step
# annealed linearly to 0. 5w1s uses the transductive command (our evaluation is transductive:
# batch statistics over the query set, as in MAML). Per setting: train shots, inner batch,
# inner steps, Adam rate, outer step, meta-batch, evaluation steps.
REPTILE = {
    "5w1s": (15, 25, 3, 1e-3, 1.0, 10, 5),
    "5w5s": (10, 10, 5, 1.5e-3, 0.7, 5, 100),
    "20w1s": (9, 15, 12, 4.6e-4, 1.0, 3, 97),
}
# The same commands' outer-step budgets (--meta-iters), used by the ``_gpu`` variants.
REPTILE_META_ITERS = {"5w1s": 100_000, "5w5s": 100_000, "20w1s": 200_000}


def _reptile(setting: str, loop: dict) -> tuple[AlgorithmConfig, OptimizerConfig, int]:
    _, batch, steps, lr, outer, _, eval_steps = REPTILE[setting]
    algorithm = AlgorithmConfig(
        name="reptile",
        inner_steps=steps,
        inner_lr=lr,
        inner_optimizer="adam",
        inner_optimizer_args=(("b1", 0.0),),
        inner_batch=batch,
        **loop,
    )
    return algorithm, OptimizerConfig(name="sgd", lr=outer, schedule="linear"), eval_steps


def _algorithm(
    algo: str, setting: str, gpu: bool = False
) -> tuple[AlgorithmConfig, OptimizerConfig, int]:
    """The algorithm, the outer optimizer and the number of evaluation steps."""
    ways = SETTINGS[setting][0]
    steps, lr = (1, 0.4) if ways <= 5 else (5, 0.1)
    adam = OptimizerConfig(name="adam", lr=1e-3)
    loop = {} if gpu else CPU_TASK_LOOP
    if algo in ("maml", "fomaml", "anil"):
        return AlgorithmConfig(name=algo, inner_steps=steps, inner_lr=lr, **loop), adam, 10
    if algo == "reptile":
        return _reptile(setting, loop)
    if algo == "protonets":
        return AlgorithmConfig(name="protonets"), adam, 0
    raise ValueError(f"unknown algorithm {algo!r}; choose one of {ALGORITHMS}.")


def get_config(variant: str = "") -> Config:
    if variant == "tiny" or variant.startswith("tiny_"):
        # A few meta-steps of an 8-filter ConvNet; tiny_<algorithm> for the other algorithms.
        algo = variant[5:] or "maml"
        algorithm, optimizer, eval_steps = _algorithm(algo, "5w1s")
        if algo == "reptile":  # 2 x 2 drawings per class in batches of 5: 2 steps, 1 epoch
            algorithm = dataclasses.replace(algorithm, inner_steps=2, inner_batch=5)
        return Config(
            name=variant.replace("tiny", "omniglot_tiny"),
            family="omniglot",
            task=OmniglotTask(
                ways=5, shots=1, queries=2, filters=8, train_shots=2 if algo == "reptile" else 0
            ),
            algorithm=algorithm,
            optimizer=optimizer,
            train=TrainConfig(steps=4, meta_batch=8, log_every=2, checkpoint_every=4),
            eval=EvalConfig(
                num_tasks=8,
                inner_steps=min(eval_steps, 2),
                chunk=8,
                table_steps=tuple(range(min(eval_steps, 2) + 1)),
            ),
        )
    parts = (variant or "5w1s_maml").split("_")
    gpu = parts[-1] == "gpu"
    if gpu:
        parts = parts[:-1]
    if len(parts) != 2 or parts[0] not in SETTINGS:
        raise ValueError(
            f"omniglot variant {variant!r}: expected <{'|'.join(SETTINGS)}>_"
            f"<{'|'.join(ALGORITHMS)}>[_gpu] or 'tiny'."
        )
    setting, algo = parts
    ways, shots = SETTINGS[setting]
    algorithm, optimizer, eval_steps = _algorithm(algo, setting, gpu)
    train_shots, meta_batch = 0, None
    if algo == "reptile":
        train_shots, meta_batch = REPTILE[setting][0], REPTILE[setting][5]
    if gpu:
        task = OmniglotTask(ways=ways, shots=shots, queries=15, filters=64, train_shots=train_shots)
        steps = REPTILE_META_ITERS[setting] if algo == "reptile" else 60_000
        train = TrainConfig(
            steps=steps,
            meta_batch=meta_batch or (32 if ways <= 5 else 16),
            log_every=100,
            checkpoint_every=5_000,
        )
    else:
        task = OmniglotTask(ways=ways, shots=shots, queries=5, filters=32, train_shots=train_shots)
        # A 20-way second-order step costs about 4x a 5-way one: half the steps.
        steps = 1_000 if algo == "protonets" or ways > 5 else 2_000
        train = TrainConfig(
            steps=steps, meta_batch=meta_batch or 8, log_every=50, checkpoint_every=250
        )
    # The rows printed after training: none past the evaluated steps (a config error).
    table = tuple(sorted({s for s in (0, 1, 3, 10) if s <= eval_steps} | {eval_steps}))
    return Config(
        name=f"omniglot_{setting}_{algo}" + ("_gpu" if gpu else ""),
        family="omniglot",
        task=task,
        algorithm=algorithm,
        optimizer=optimizer,
        train=train,
        eval=EvalConfig(
            num_tasks=600,
            inner_steps=eval_steps,
            chunk=50 if ways <= 5 else 20,
            table_steps=table,
            vmap_tasks=gpu,
        ),
    )


_CPU = [f"{s}_{a}" for s in SETTINGS for a in ALGORITHMS]
VARIANTS = ("tiny", *(f"tiny_{a}" for a in ALGORITHMS[1:]), *_CPU, *(f"{v}_gpu" for v in _CPU))
