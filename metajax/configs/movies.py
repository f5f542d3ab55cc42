"""Cold-start movie recommendation on MovieTweetings: each user is a task (MeLU / MAMO).

A task is one held-out user: the model adapts on K of their ratings (K = 5 or 10) and
predicts 10 others; users with 20 or more ratings are split 70/10/20 into meta-training,
validation and test users. Each movie is read as its text, ``Title (Year) | Genres``
(hashed words, genre and decade ids), by a 1-block width-32 Transformer, beside four
statistics of its meta-training ratings (mean, shrunk mean, log count, seen); a 2-layer
MLP head gives the rating. Loss: squared error on the 0..10 rating; metrics MAE, RMSE and
nDCG@5 of the query movies ranked by predicted rating.

Variants ``<K>s_<algo>``: K = 5 or 10; algo = ``maml`` (second order), ``fomaml``,
``reptile``, ``anil`` (the head alone adapts, as in MeLU), ``mamlpp`` (MAML++: per-layer
per-step rates, multi-step loss) or ``pretrain`` (the same model trained on every
meta-training rating pooled, then fine-tuned on the support set with the same SGD rule and
budget); ``""`` is ``10s_maml``; ``tiny`` / ``tiny_<algo>`` are seconds-long smoke tests.

Meta-training: 1000 meta-steps of 16 users, Adam 1e-3 clipped at norm 1; inner SGD at 0.03,
two steps (Reptile five, outer SGD 1.0 annealed to 0); a checkpoint every 250 steps, for
choosing on validation users. Evaluation: 600 test tasks, 0 to 10 steps at the training
rate (the pooled model's rate is chosen on validation users). Data: ``--set
task.data_dir=DIR`` or ``$METAJAX_MOVIETWEETINGS_DIR``. Command:
``metajax train movies:10s_maml --workdir /work/runs/movies_10s_maml``; baselines on the
same test tasks: ``experiments/movies_baselines.py``.
"""

import dataclasses

from metajax.run.config import (
    AlgorithmConfig,
    Config,
    EvalConfig,
    OptimizerConfig,
    TrainConfig,
)
from metajax.run.families.movies import MoviesTask

SHOTS = (5, 10)
ALGORITHMS = ("maml", "fomaml", "reptile", "anil", "mamlpp", "pretrain")
STEPS = 1000
# Chosen on validation users (400 meta-steps of 10-shot MAML): 0.1 diverges after 5 steps.
INNER_LR = 0.03
VARIANTS = (
    *(f"{k}s_{a}" for k in SHOTS for a in ALGORITHMS),
    "tiny",
    *(f"tiny_{a}" for a in ALGORITHMS[1:]),
)


def algorithm(algo: str, steps: int) -> tuple[AlgorithmConfig, OptimizerConfig]:
    """The algorithm and the outer optimizer for ``steps`` meta-steps."""
    adam = OptimizerConfig(name="adam", lr=1e-3, clip_norm=1.0)
    if algo in ("maml", "fomaml", "anil", "pretrain"):
        return AlgorithmConfig(name=algo, inner_steps=2, inner_lr=INNER_LR), adam
    if algo == "mamlpp":
        inner = AlgorithmConfig(
            name="mamlpp", inner_steps=2, inner_lr=INNER_LR, anneal_iters=max(1, steps // 3)
        )
        return inner, adam
    if algo == "reptile":
        # Reptile needs several inner steps to differ from joint training; outer SGD on the
        # pseudo-gradient, annealed (Nichol et al., 2018).
        return (
            AlgorithmConfig(name="reptile", inner_steps=5, inner_lr=INNER_LR),
            OptimizerConfig(name="sgd", lr=1.0, schedule="linear"),
        )
    raise ValueError(f"unknown algorithm {algo!r}; choose one of {ALGORITHMS}.")


def get_config(variant: str = "") -> Config:
    if variant == "tiny" or variant.startswith("tiny_"):
        algo = variant[5:] or "maml"
        algo_cfg, opt = algorithm(algo, 4)
        return Config(
            name=variant.replace("tiny", "movies_tiny"),
            family="movies",
            task=MoviesTask(
                shots=3, queries=5, vocab_size=256, max_len=8, width=8, heads=1, mlp_width=16
            ),
            algorithm=dataclasses.replace(algo_cfg, inner_steps=1),
            optimizer=opt,
            # meta_batch 8 divides the 8 fake devices of the tests.
            train=TrainConfig(steps=4, meta_batch=8, log_every=2, checkpoint_every=4),
            eval=EvalConfig(num_tasks=16, inner_steps=2, chunk=16, table_steps=(0, 1, 2)),
        )
    shots, _, algo = (variant or "10s_maml").partition("_")
    if shots not in (f"{k}s" for k in SHOTS) or algo not in ALGORITHMS:
        raise ValueError(
            f"movies variant {variant!r}: expected <{'|'.join(f'{k}s' for k in SHOTS)}>_"
            f"<{'|'.join(ALGORITHMS)}> or 'tiny'."
        )
    algo_cfg, opt = algorithm(algo, STEPS)
    return Config(
        name=f"movies_{shots}_{algo}",
        family="movies",
        task=MoviesTask(shots=int(shots[:-1]), queries=10),
        algorithm=algo_cfg,
        optimizer=opt,
        train=TrainConfig(
            steps=STEPS, meta_batch=16, log_every=50, checkpoint_every=250, keep_checkpoints=4
        ),
        eval=EvalConfig(num_tasks=600, inner_steps=10, chunk=100, table_steps=(0, 1, 2, 5, 10)),
    )
