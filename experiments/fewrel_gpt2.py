"""FewRel few-shot relation classification with a pretrained GPT-2 as the sentence encoder.

The tasks are those of ``experiments/fewrel.py`` (cross-domain protocol: meta-train on 20
Wikipedia and SemEval relations, meta-test on the 25 New York Times relations), encoded with
GPT-2's BPE tokenizer and entity markers as text (``metajax.run.families.fewrel_gpt2``). A
sentence is the concatenation of GPT-2's final states at the head-start and tail-start
markers; GPT-2 is causal, so the tail state has read the head, the head state only the words
before it (``--set task.pool=end`` reads the closing markers instead).

Variants:

- ``5w1s_protonets``, ``5w5s_protonets``: Prototypical Networks on the pooled states; the
  outer loop meta-learns rank-8 LoRA factors of every block, the GPT-2 weights stay frozen.
  Evaluation has no inner steps.
- ``5w1s_maml``: second-order MAML; the inner loop adapts the LoRA factors and a 5-way
  linear head (zero at the start of every task), one step in meta-training, 5 at
  evaluation.
- ``tiny``, ``tiny_protonets``: seconds-long smoke tests on the committed random-weights
  fixture ``tests/fixtures/gpt2_tiny`` (2 blocks, width 32, a small BPE tokenizer).

metajax never downloads: get GPT-2 on a machine with internet, e.g. ``huggingface-cli
download gpt2 --local-dir models/gpt2`` (config.json, model.safetensors, tokenizer.json,
vocab.json, merges.txt), put the folder at ``models/gpt2`` under the directory the command
runs in (or ``--set task.checkpoint=PATH``), then::

    metajax train fewrel_gpt2:5w1s_protonets --workdir runs/fewrel_gpt2_5w1s_protonets

The rates are not tuned: the inner rate of MAML depends on the scale of GPT-2's final
states (a few of their dimensions are large), so choose it on the validation relations
(``--set task.eval_split=validation``) before reading the test numbers.

Cost: sentences are 96 GPT-2 tokens (the start token and the four markers, about 4 tokens
each, included; longer sentences are cut around the entities); a 5-way 1-shot task with 5
queries per relation is 30 sequences through the 124M model, a 5-shot one 50. That is hours
per thousand meta-steps on a 2-core CPU; a GPU (``--set task.dtype=bfloat16``) is the
intended machine.
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
from metajax.run.families.fewrel_gpt2 import FewRelGPT2Task

SETTINGS = {"5w1s": (5, 1), "5w5s": (5, 5)}
VARIANTS = ("5w1s_protonets", "5w1s_maml", "5w5s_protonets", "tiny", "tiny_protonets")
CHECKPOINT = "models/gpt2"
FIXTURE = Path(__file__).resolve().parents[1] / "tests" / "fixtures" / "gpt2_tiny"


def _algorithm(algo: str, inner_lr: float) -> tuple[AlgorithmConfig, OptimizerConfig, int]:
    """The algorithm, the outer optimizer and the number of evaluation steps."""
    adam = OptimizerConfig(name="adam", lr=1e-3, clip_norm=1.0)
    if algo == "maml":
        return AlgorithmConfig(name="maml", inner_steps=1, inner_lr=inner_lr), adam, 5
    if algo == "protonets":
        return AlgorithmConfig(name="protonets"), adam, 0
    raise ValueError(f"unknown algorithm {algo!r}; choose maml or protonets.")


def _tiny(algo: str) -> Config:
    # A few meta-steps of the 2-block fixture on 48-token sentences; reads the shared
    # FewRel files (a few seconds to load).
    algorithm, optimizer, eval_steps = _algorithm(algo, 0.1)
    return Config(
        name=f"fewrel_gpt2_tiny_{algo}",
        family="fewrel_gpt2",
        task=FewRelGPT2Task(
            ways=3,
            shots=1,
            queries=2,
            max_len=48,
            checkpoint=str(FIXTURE),
            size="tiny",
            lora_rank=2,
            lora_alpha=4.0,
        ),
        algorithm=algorithm,
        optimizer=dataclasses.replace(optimizer, lr=1e-2),
        # meta_batch 8 divides the 8 fake devices of the tests.
        train=TrainConfig(steps=3, meta_batch=8, log_every=1, checkpoint_every=3),
        eval=EvalConfig(
            num_tasks=4,
            inner_steps=min(eval_steps, 2),
            chunk=4,
            table_steps=(0, 1, 2) if eval_steps else (0,),
        ),
    )


def get_config(variant: str = "") -> Config:
    if variant in ("tiny", "tiny_protonets"):
        return _tiny("protonets" if variant == "tiny_protonets" else "maml")
    setting, _, algo = (variant or "5w1s_protonets").partition("_")
    if f"{setting}_{algo}" not in VARIANTS:
        raise ValueError(f"fewrel_gpt2 variant {variant!r}: expected one of {VARIANTS}.")
    ways, shots = SETTINGS[setting]
    algorithm, optimizer, eval_steps = _algorithm(algo, 0.01)
    return Config(
        name=f"fewrel_gpt2_{setting}_{algo}",
        family="fewrel_gpt2",
        task=FewRelGPT2Task(ways=ways, shots=shots, queries=5, checkpoint=CHECKPOINT),
        algorithm=algorithm,
        optimizer=optimizer,
        train=TrainConfig(steps=1000, meta_batch=4, log_every=25, checkpoint_every=250),
        eval=EvalConfig(
            num_tasks=600,
            inner_steps=eval_steps,
            chunk=20,
            table_steps=(0, 1, 5) if eval_steps else (0,),
        ),
    )
