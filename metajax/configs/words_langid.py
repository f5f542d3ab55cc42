"""Few-shot language identification with the Transformer encoder classifier.

N-way K-shot: a task draws N languages of the meta-split, K support words of each; the
classifier adapts on them and labels 5 query words per language. Meta-test languages (8, of
families never seen in meta-training) are disjoint from the 28 meta-train languages.
Evaluation: accuracy on 600 test tasks with 95% intervals after 0, 1, 5 and 10 steps.

Variants: ``<setting>_<algo>[_gpu]`` with setting ``5w1s`` or ``5w5s`` and algorithm ``maml``
(second order), ``fomaml`` or ``reptile``; ``""`` is ``5w1s_maml``; ``tiny`` /
``tiny_<algo>`` for smoke tests.

- CPU-sized (default): width 64, 2 blocks; meta-batch 8; 600 meta-steps; inner SGD at 0.4,
  one step in meta-training. Command:
  ``metajax train words_langid:5w1s_maml --workdir runs/words_langid_5w1s_maml``.
  Results and run times: experiments/RESULTS.md.
- ``_gpu`` (GPU-sized): width 256, 4 blocks, meta-batch 32,
  20000 meta-steps.
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

SETTINGS = {"5w1s": (5, 1), "5w5s": (5, 5)}
ALGORITHMS = ("maml", "fomaml", "reptile")
_CPU = [f"{s}_{a}" for s in SETTINGS for a in ALGORITHMS]
VARIANTS = (*_CPU, *(f"{v}_gpu" for v in _CPU), "tiny", "tiny_fomaml", "tiny_reptile")


def _algorithm(algo: str):
    if algo == "reptile":
        return (
            AlgorithmConfig(name="reptile", inner_steps=5, inner_lr=0.1),
            OptimizerConfig(name="sgd", lr=1.0),
        )
    if algo in ("maml", "fomaml"):
        return (
            AlgorithmConfig(name=algo, inner_steps=1, inner_lr=0.4),
            OptimizerConfig(name="adam", lr=1e-3, clip_norm=1.0),
        )
    raise ValueError(f"unknown algorithm {algo!r}; choose one of {ALGORITHMS}.")


def get_config(variant: str = "") -> Config:
    if variant == "tiny" or variant.startswith("tiny_"):
        algo_cfg, opt = _algorithm(variant[5:] or "maml")
        return Config(
            name=variant.replace("tiny", "words_langid_tiny"),
            family="words_langid",
            task=WordsTask(
                ways=3,
                shots=1,
                queries=2,
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
    parts = (variant or "5w1s_maml").split("_")
    gpu = parts[-1] == "gpu"
    parts = parts[:-1] if gpu else parts
    if len(parts) != 2 or parts[0] not in SETTINGS:
        raise ValueError(
            f"words_langid variant {variant!r}: expected <{'|'.join(SETTINGS)}>_"
            f"<{'|'.join(ALGORITHMS)}>[_gpu] or 'tiny'."
        )
    (ways, shots), (algo_cfg, opt) = SETTINGS[parts[0]], _algorithm(parts[1])
    if gpu:
        task = WordsTask(
            ways=ways, shots=shots, queries=5, width=256, depth=4, heads=8, mlp_width=1024
        )
        train = TrainConfig(steps=20_000, meta_batch=32, log_every=100, checkpoint_every=2_000)
    else:
        task = WordsTask(ways=ways, shots=shots, queries=5)
        train = TrainConfig(steps=600, meta_batch=8, log_every=25, checkpoint_every=200)
    return Config(
        name=f"words_langid_{parts[0]}_{parts[1]}" + ("_gpu" if gpu else ""),
        family="words_langid",
        task=task,
        algorithm=algo_cfg,
        optimizer=opt,
        train=train,
        eval=EvalConfig(num_tasks=600, inner_steps=10, chunk=100, table_steps=(0, 1, 5, 10)),
    )
