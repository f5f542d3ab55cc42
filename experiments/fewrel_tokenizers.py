"""Which FewRel tokenization meta-learns better: UTF-8 bytes or a word vocabulary?

ProtoNets with the entity-pooled Transformer encoder (width 64, 2 blocks, 4 heads, MLP 128) on
the cross-domain protocol (meta-train on 20 Wikipedia + SemEval relations), 5-way 1-shot, 5
queries per relation; the same 200 meta-steps of 4 tasks and Adam rate for both tokenizations.
Each gets a ``max_len`` that holds about 95 % of the meta-training sentences with markers
(bytes 192, words 48; longer ones are truncated around the entities) and the word vocabulary
the 8000 commonest meta-training words. Reported: accuracy on 200 tasks of the 5 held-out
validation relations (mean and 95 % interval over tasks), plus 200 tasks of the 25 news
relations of the test file, and the seconds per meta-step.

Byte sequences are 4 times longer, so a byte meta-step costs several word meta-steps; the
second command gives words twice the steps, still less compute than the bytes' 200, to
compare at equal cost as well as at equal steps::

    .venv/bin/python experiments/fewrel_tokenizers.py
    .venv/bin/python experiments/fewrel_tokenizers.py --tokenizers word --steps 400
"""

from __future__ import annotations

import argparse
import functools
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from _shared_data import use_shared_data

import metajax as mj
from metajax.algorithms.protonets import protonet_logits
from metajax.models.transformer import TransformerConfig, TransformerEncoder
from metajax.tasks import fewrel
from metajax.train import make_train_step, train_state

MAX_LEN = fewrel.DEFAULT_MAX_LEN
WAYS, SHOTS, QUERIES = 5, 1, 5


def sources(tokenizer: str, seed: int, vocab_size: int):
    splits = fewrel.protocol_splits("cross_domain")
    make = functools.partial(
        fewrel.FewRel,
        splits,
        ways=WAYS,
        shots=SHOTS,
        queries=QUERIES,
        seed=seed,
        max_len=MAX_LEN[tokenizer],
        tokenizer=tokenizer,
        vocab_size=vocab_size,
    )
    return make(split="train"), make(split="validation"), make(split="test")


def accuracy(embed, params, source, num_tasks: int, chunk: int = 50) -> tuple[float, float]:
    """Mean query accuracy over ``num_tasks`` tasks of meta-batch 0 and its 95 % half-width."""
    algo = mj.protonets(embed, ways=WAYS)

    @jax.jit
    def per_task(params, tasks):
        def one(task):
            logits = protonet_logits(embed, algo.adapt(params, task.support), task.query[0])
            return jnp.mean(jnp.argmax(logits, -1) == task.query[1])

        return jax.vmap(one)(tasks)

    accs = np.concatenate(
        [
            np.asarray(per_task(params, source.sample(0, min(chunk, num_tasks - i), first_task=i)))
            for i in range(0, num_tasks, chunk)
        ]
    )
    return float(accs.mean()), float(1.96 * accs.std(ddof=1) / np.sqrt(len(accs)))


def run(
    tokenizer: str, steps: int, meta_batch: int, seed: int, vocab_size: int, eval_tasks: int
) -> dict:
    train, val, test = sources(tokenizer, seed, vocab_size)
    cfg = TransformerConfig(
        vocab_size=train.num_tokens,
        width=64,
        depth=2,
        heads=4,
        mlp_width=128,
        max_len=MAX_LEN[tokenizer],
    )
    model = TransformerEncoder(cfg, pad_id=train.pad_id, pool="entity")
    embed = lambda p, x: model.apply(p, *x)
    x0 = jax.tree.map(lambda a: a[0], train.sample(0, 1).support[0])
    params = model.init(jax.random.key(seed), *x0)
    algo = mj.protonets(embed, ways=WAYS)
    optimizer = optax.adam(1e-3)
    step_fn = make_train_step(algo, optimizer)
    state = train_state(algo, params, optimizer)
    state, _ = step_fn(state, train.sample(0, meta_batch))  # compile outside the timing
    start = time.perf_counter()
    losses = []
    for step in range(1, steps):
        state, metrics = step_fn(state, train.sample(step, meta_batch))
        losses.append(metrics["loss_after"])
    jax.block_until_ready(state)
    per_step = (time.perf_counter() - start) / max(steps - 1, 1)
    val_acc = accuracy(embed, state.meta_params, val, eval_tasks)
    test_acc = accuracy(embed, state.meta_params, test, eval_tasks)
    return {
        "tokenizer": tokenizer,
        "seed": seed,
        "val": val_acc,
        "test": test_acc,
        "s_per_step": per_step,
        "final_train_loss": float(np.mean(losses[-20:])),
    }


def main():
    use_shared_data()
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--meta-batch", type=int, default=4)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--vocab-size", type=int, default=8000)
    parser.add_argument("--eval-tasks", type=int, default=200)
    parser.add_argument("--tokenizers", nargs="+", default=["word", "byte"])
    args = parser.parse_args()
    for seed in args.seeds:
        for tok in args.tokenizers:
            r = run(tok, args.steps, args.meta_batch, seed, args.vocab_size, args.eval_tasks)
            print(
                f"{tok:5s} seed {seed}: validation {100 * r['val'][0]:.1f} ± "
                f"{100 * r['val'][1]:.1f} %, test (news) {100 * r['test'][0]:.1f} ± "
                f"{100 * r['test'][1]:.1f} %, train loss {r['final_train_loss']:.3f}, "
                f"{r['s_per_step']:.3f} s/step",
                flush=True,
            )


if __name__ == "__main__":
    main()
