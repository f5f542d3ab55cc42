"""Few-shot languages with a pretrained GPT-2: meta-learning LoRA factors over 28 languages.

A task is one language: adapt on K = 4 of its frequent words (support), score 4 other words
(query) in bits per GPT-2 token. Meta-test languages come from families never seen in
meta-training (as ``words_lm``). The inner loop adapts rank-8 LoRA factors of every block's
attention and MLP kernels; the outer loop meta-learns the factors' initialisation, the
pretrained weights stay frozen (``task.freeze_base``).

Variants: ``maml`` (default, second order through the factors), ``fomaml``, ``reptile``;
``tiny`` / ``tiny_fomaml`` / ``tiny_reptile`` on the committed random-weights fixture
``tests/fixtures/gpt2_tiny`` (2 blocks, width 32), which train in seconds.

metajax never downloads: get a checkpoint on a machine with internet, e.g.
``huggingface-cli download gpt2 --local-dir ~/models/gpt2`` (config.json, model.safetensors,
tokenizer.json, vocab.json, merges.txt), copy the folder over, then run::

    metajax train words_gpt2:maml --set task.checkpoint=$HOME/models/gpt2 \\
        --workdir runs/words_gpt2_maml

Without ``task.checkpoint`` the model is a random-weights GPT-2 of ``task.size`` over byte
tokens: it trains, but is not a pretrained model. Training logs the query loss before and
after the inner step: the first ``loss_before`` is the pretrained model's own query loss (the
factors start at B = 0). At the end the run adapts 100 held-out tasks for 0 to 5 steps and
prints their bits per token; the adapted rows should lie below step 0, and both below the
pretrained model's.

Cost: one second-order step through LoRA on the 124M model is about 0.4 TFLOP per task of
4 + 4 sequences of 32 tokens (XLA's count, benchmarks/README.md section ``gpt2``, with the
measured step times); this config's 16-token words are about half that, so a meta-step of 4
tasks is about 0.8 TFLOP and 500 meta-steps take hours on a 2-core CPU, not one. What a
user needs: a GPU (``--set task.dtype=bfloat16``), or ``fomaml`` (about half the FLOPs), or
fewer ``train.steps``. The meta-parameters hold the whole GPT-2 (the checkpoints and the
held-out adaptation need it), and each vmapped task merges its own copy of the weights, so
memory grows with every task of ``train.meta_batch`` and ``eval.chunk`` (benchmarks/README.md
has the temporary memory of one and two tasks).
"""

import dataclasses
from pathlib import Path

from metajax.run.config import (
    AlgorithmConfig,
    Config,
    EvalConfig,
    OptimizerConfig,
    TrainConfig,
)
from metajax.run.families.words_gpt2 import GPT2WordsTask

ALGORITHMS = ("maml", "fomaml", "reptile")
VARIANTS = (*ALGORITHMS, "tiny", *(f"tiny_{a}" for a in ALGORITHMS[1:]))
FIXTURE = Path(__file__).resolve().parents[1] / "tests" / "fixtures" / "gpt2_tiny"


def algorithm(algo: str, inner_steps: int, inner_lr: float):
    """``(AlgorithmConfig, OptimizerConfig)`` of one algorithm with a shared inner rule."""
    if algo == "reptile":
        # Reptile needs several inner steps to differ from joint training; outer SGD on the
        # pseudo-gradient (Nichol et al., 2018).
        return (
            AlgorithmConfig(name="reptile", inner_steps=max(inner_steps, 3), inner_lr=inner_lr),
            OptimizerConfig(name="sgd", lr=1.0),
        )
    if algo in ("maml", "fomaml"):
        return (
            AlgorithmConfig(name=algo, inner_steps=inner_steps, inner_lr=inner_lr),
            OptimizerConfig(name="adam", lr=1e-3, clip_norm=1.0),
        )
    raise ValueError(f"unknown algorithm {algo!r}; choose one of {ALGORITHMS}.")


def get_config(variant: str = "") -> Config:
    algo, _, size = (variant or "maml").partition("_")
    if algo == "tiny":
        algo, size = size or "maml", "tiny"
    if size not in ("", "tiny"):
        raise ValueError(f"words_gpt2 variant {variant!r}: expected one of {VARIANTS}.")
    if size == "tiny":
        algo_cfg, opt = algorithm(algo, 1, 0.5)
        return Config(
            name=f"words_gpt2_tiny_{algo}",
            family="words_gpt2",
            task=GPT2WordsTask(
                shots=2,
                queries=2,
                max_len=12,
                num_words=200,
                checkpoint=str(FIXTURE),
                size="tiny",
                lora_rank=2,
                lora_alpha=4.0,
            ),
            algorithm=dataclasses.replace(algo_cfg, inner_steps=min(algo_cfg.inner_steps, 2)),
            optimizer=dataclasses.replace(opt, lr=1e-2) if algo != "reptile" else opt,
            train=TrainConfig(steps=3, meta_batch=8, log_every=3, checkpoint_every=3),
            eval=EvalConfig(num_tasks=8, inner_steps=1, chunk=8, table_steps=(0, 1)),
        )
    algo_cfg, opt = algorithm(algo, 1, 0.1)
    return Config(
        name=f"words_gpt2_{algo}",
        family="words_gpt2",
        task=GPT2WordsTask(),
        algorithm=algo_cfg,
        optimizer=opt,
        train=TrainConfig(steps=500, meta_batch=4, log_every=10, checkpoint_every=100),
        eval=EvalConfig(num_tasks=100, inner_steps=5, chunk=4, table_steps=(0, 1, 5)),
    )
