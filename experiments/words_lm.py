"""Few-shot languages: a byte-level Transformer LM meta-trained on 28 languages.

A task is one language: adapt on K = 16 of its frequent words (support), score 16 other words
(query) in bits per byte. Meta-test languages come from families never seen in meta-training
(Uralic, Semitic, Dravidian, Baltic, Koreanic: :mod:`metajax.tasks.languages`). Evaluation
adapts 600 test tasks and reports the query bits per byte after 0, 1, 5 and 20 steps.

Variants: ``maml`` (default, second order), ``fomaml``, ``reptile``, ``pretrain`` (one LM
trained on all meta-train languages pooled, then fine-tuned with the same inner rule and
budget: the baseline a meta-learned initialisation has to beat); ``<algo>_gpu`` for the
labelled GPU-sized model; ``tiny`` / ``tiny_<algo>`` for smoke tests.

- CPU-sized (default): width 64, 2 blocks, 4 heads, words up to 22 bytes; meta-batch 8;
  1500 meta-steps; inner SGD at 0.1, 1 step in meta-training.
  Command: ``metajax train words_lm:maml --workdir runs/words_lm_maml``; results and run
  times: experiments/RESULTS.md.
- ``_gpu`` (GPU-sized): width 256, 4 blocks, meta-batch 32,
  20000 meta-steps, 5 inner steps.
"""

import dataclasses

from metajax.run.config import (
    AlgorithmConfig,
    Config,
    EvalConfig,
    OptimizerConfig,
    TrainConfig,
)
from metajax.run.families.words_lm import WordsTask

ALGORITHMS = ("maml", "fomaml", "reptile", "pretrain")
VARIANTS = (
    *ALGORITHMS,
    *(f"{a}_gpu" for a in ALGORITHMS),
    "tiny",
    *(f"tiny_{a}" for a in ALGORITHMS[1:]),
)


def algorithm(algo: str, inner_steps: int, inner_lr: float):
    """``(AlgorithmConfig, OptimizerConfig)`` of one algorithm with a shared inner rule."""
    adam = OptimizerConfig(name="adam", lr=1e-3, clip_norm=1.0)
    if algo == "reptile":
        # Reptile needs several inner steps to differ from joint training; outer SGD on the
        # pseudo-gradient (Nichol et al., 2018).
        return (
            AlgorithmConfig(name="reptile", inner_steps=max(inner_steps, 5), inner_lr=inner_lr),
            OptimizerConfig(name="sgd", lr=1.0),
        )
    if algo in ("maml", "fomaml", "pretrain"):
        return AlgorithmConfig(name=algo, inner_steps=inner_steps, inner_lr=inner_lr), adam
    raise ValueError(f"unknown algorithm {algo!r}; choose one of {ALGORITHMS}.")


def get_config(variant: str = "") -> Config:
    algo, _, size = (variant or "maml").partition("_")
    if algo == "tiny":
        algo, size = size or "maml", "tiny"
    if size not in ("", "gpu", "tiny"):
        raise ValueError(
            f"words_lm variant {variant!r}: expected <{'|'.join(ALGORITHMS)}>"
            "[_gpu], 'tiny' or 'tiny_<algorithm>'."
        )
    if size == "tiny":
        algo_cfg, opt = algorithm(algo, 1, 0.1)
        return Config(
            name=f"words_lm_tiny_{algo}",
            family="words_lm",
            task=WordsTask(
                shots=4,
                queries=4,
                max_len=16,
                num_words=200,
                width=16,
                depth=1,
                heads=2,
                mlp_width=32,
            ),
            algorithm=dataclasses.replace(algo_cfg, inner_steps=1),
            optimizer=opt,
            train=TrainConfig(steps=4, meta_batch=8, log_every=2, checkpoint_every=4),
            eval=EvalConfig(num_tasks=8, inner_steps=2, chunk=8, table_steps=(0, 1, 2)),
        )
    if size == "gpu":
        algo_cfg, opt = algorithm(algo, 5, 0.1)
        task = WordsTask(
            shots=16, queries=16, max_len=24, width=256, depth=4, heads=8, mlp_width=1024
        )
        train = TrainConfig(steps=20_000, meta_batch=32, log_every=100, checkpoint_every=2_000)
    else:
        algo_cfg, opt = algorithm(algo, 1, 0.1)
        task = WordsTask(shots=16, queries=16, max_len=24)
        train = TrainConfig(steps=1_500, meta_batch=8, log_every=50, checkpoint_every=500)
    return Config(
        name=f"words_lm_{algo}" + ("_gpu" if size else ""),
        family="words_lm",
        task=task,
        algorithm=algo_cfg,
        optimizer=opt,
        train=train,
        eval=EvalConfig(num_tasks=600, inner_steps=20, chunk=100, table_steps=(0, 1, 5, 20)),
    )
