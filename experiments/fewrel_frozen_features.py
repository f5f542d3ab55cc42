"""FewRel with a pretrained model and no meta-training: nearest prototypes of frozen features.

Each sentence is encoded as the meta-learners see it (SmolLM2-135M's tokenizer, entity
markers as text, 64 tokens; 80 with the prompt) and read out at one layer of the frozen
model: the hidden states at two tokens of a pooling, concatenated (``start``: the last
token of ``[E1]`` and ``[E2]``; ``end``: of ``[/E1]`` and ``[/E2]``, which in a causal model
have read their entity; ``prompt``: of the head's and the tail's names restated after the
sentence, ``... The relation between HEAD and TAIL is``, which have read all of it). A
query goes to the nearest class mean of the support features, either by Euclidean
distance on the raw states (``raw``) or by cosine similarity after subtracting the mean
support feature of the task (``centered``: a language model's states share a large common
direction and a few outlier dimensions, which dominate raw distances).

The layer and distance of each pooling, and the pooling, are chosen on the 600 validation
tasks of the cross-domain protocol (5 Wikipedia and SemEval relations held out of
meta-training); the test relations see only those choices: news (cross-domain, 5-way 1-shot
and 5-shot) and the 5 held-out Wikipedia relations (in-domain, 5-way 1-shot). The tasks are
the runner's evaluation tasks (the same seed, ``sample(0, 600)``), so the rows compare with
``metajax train`` rows task for task. Writes ``experiments/results/fewrel_frozen_features.json``
(``--pools`` recomputes some poolings and keeps the file's results of the others)::

    .venv/bin/python experiments/fewrel_frozen_features.py [--pools prompt]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from _shared_data import use_shared_data

from metajax.configs.fewrel import PROMPT_MAX_LEN
from metajax.models.pretrained import load_pretrained, load_tokenizer
from metajax.run import pretrained_choice
from metajax.run.families.fewrel import FewRelTask
from metajax.run.pretrained_choice import Pretrained
from metajax.tasks import fewrel
from metajax.tasks.text_encoding import FewRelTokens, MarkerEncoder

MODEL, NUM_TASKS, WAYS, QUERIES, BATCH = "smollm2-135m", 600, 5, 5, 32
# The meta-learners' configuration: the top 2 of 30 blocks train, the 28 below are frozen.
TRAINABLE_BLOCKS = 2
TRUNK_BLOCKS = 30 - TRAINABLE_BLOCKS
# Layer k: the states after block k (30: the final normed states the classifiers read).
LAYERS = (4, 8, 12, 16, 20, 24, 28, 30)
POOLS = ("start", "end", "prompt")
MAX_LEN = {"start": 64, "end": 64, "prompt": PROMPT_MAX_LEN}
DISTANCES = ("raw", "centered")
# (name, protocol, split evaluated, shots)
SETTINGS = (
    ("validation 5w1s", "cross_domain", "validation", 1),
    ("cross-domain 5w1s", "cross_domain", "test", 1),
    ("cross-domain 5w5s", "cross_domain", "test", 5),
    ("in-domain 5w1s", "in_domain", "test", 1),
)
OUT = Path(__file__).resolve().parent / "results" / "fewrel_frozen_features.json"


def layer_states(model, params, tokens: jax.Array) -> jax.Array:
    """``(len(LAYERS), n, seq, width)``: the states after each block of :data:`LAYERS`."""
    out, hidden, done = [], None, 0
    for layer in LAYERS:
        stop = min(layer, model.config.num_hidden_layers)
        if hidden is None:
            hidden = model.apply(params, tokens, blocks=stop, method="trunk")
        elif stop > done:
            # The blocks between the last layer read and this one, from its states.
            hidden = model.apply(params, None, hidden, None, done, stop, "hidden", method="_body")
        done = stop
        if layer == model.config.num_hidden_layers:
            out.append(model.apply(params, hidden, start=stop, features=True, method="top"))
        else:
            out.append(hidden)
    return jnp.stack(out)


class Features:
    """Pooled features of sentences at every layer of :data:`LAYERS`, each sentence run once.

    The 64-token states after block :data:`TRUNK_BLOCKS` are also written to the trunk cache
    of the meta-learners' configuration (the frozen trunk of ``task.trainable_blocks=2``), so
    their runs find these sentences computed.
    """

    def __init__(self, model, params, trunk):
        self.states = jax.jit(lambda p, t: layer_states(model, p, t))
        self.params, self.trunk = params, trunk
        self.memo: dict[tuple[str, bytes], np.ndarray] = {}  # (pool, row) -> (layers, 2, width)

    def compute(self, rows: np.ndarray, positions: dict) -> None:
        """Runs the rows not seen yet; ``positions[pool]`` are each row's two indices, for
        the pools that encode the sentences as ``rows``."""
        first = next(iter(positions))
        todo = [i for i, row in enumerate(rows) if (first, row.tobytes()) not in self.memo]
        todo = list({rows[i].tobytes(): i for i in todo}.values())
        started = time.time()
        for lo in range(0, len(todo), BATCH):
            idx = todo[lo : lo + BATCH]
            chunk = rows[idx]
            padded = np.concatenate([chunk, np.repeat(chunk[:1], BATCH - len(chunk), 0)])
            hidden = np.asarray(self.states(self.params, padded), np.float32)[:, : len(idx)]
            if rows.shape[1] == self.trunk_len:
                self.trunk.store(chunk, hidden[LAYERS.index(TRUNK_BLOCKS)])
            for j, i in enumerate(idx):
                for pool, where in positions.items():  # (layers, 2, w)
                    self.memo[pool, rows[i].tobytes()] = hidden[:, j, where[i]]
        print(f"  {len(todo)} new distinct sentences in {time.time() - started:.0f} s")

    def of(self, tokens: np.ndarray, pool: str) -> np.ndarray:
        """``(layers, T, n, 2 * width)`` features of token rows ``(T, n, seq)``."""
        rows = tokens.reshape(-1, tokens.shape[-1])
        feats = np.stack([self.memo[pool, row.tobytes()] for row in rows], axis=1)
        return feats.reshape(len(LAYERS), *tokens.shape[:2], -1)


def prototype_accuracy(support, support_labels, query, query_labels, distance: str):
    """Per-task accuracy ``(T,)`` of nearest class means; features ``(T, n, d)``."""
    if distance == "centered":
        center = support.mean(axis=1, keepdims=True)
        support, query = support - center, query - center
        support = support / np.linalg.norm(support, axis=-1, keepdims=True).clip(1e-12)
        query = query / np.linalg.norm(query, axis=-1, keepdims=True).clip(1e-12)
    onehot = np.eye(WAYS)[support_labels]  # (T, n, N)
    prototypes = np.einsum("tsn,tsd->tnd", onehot, support) / onehot.sum(1)[:, :, None]
    if distance == "centered":
        prototypes /= np.linalg.norm(prototypes, axis=-1, keepdims=True).clip(1e-12)
        scores = np.einsum("tqd,tnd->tqn", query, prototypes)
    else:
        scores = -((query[:, :, None] - prototypes[:, None]) ** 2).sum(-1)
    return (scores.argmax(-1) == query_labels).mean(-1)


def summary(per_task: np.ndarray) -> tuple[float, float]:
    return float(per_task.mean()), float(1.96 * per_task.std(ddof=1) / np.sqrt(len(per_task)))


def evaluate(features: Features, encode_ids, start_id, protocol, split, shots, pools) -> dict:
    """``{(layer, pool, distance): per-task accuracies}`` on the split's 600 tasks."""
    splits = fewrel.protocol_splits(protocol, num_val=5 if protocol == "cross_domain" else 0)
    source = fewrel.FewRel(
        splits, split=split, ways=WAYS, shots=shots, queries=QUERIES, tokenizer="byte"
    )
    tasks = {
        p: FewRelTokens(source, MarkerEncoder(encode_ids, start_id, MAX_LEN[p], p)).sample(
            0, NUM_TASKS
        )
        for p in pools
    }
    # Pools of one length encode the same tokens and differ in the positions read.
    for length in sorted({MAX_LEN[p] for p in pools}):
        same = [p for p in pools if MAX_LEN[p] == length]
        first = tasks[same[0]]
        rows = np.concatenate(
            [first.support[0][0].reshape(-1, length), first.query[0][0].reshape(-1, length)]
        )
        positions = {
            p: np.concatenate(
                [tasks[p].support[0][1].reshape(-1, 2), tasks[p].query[0][1].reshape(-1, 2)]
            )
            for p in same
        }
        features.compute(rows, positions)
    results = {}
    for pool in pools:
        task = tasks[pool]
        support, query = features.of(task.support[0][0], pool), features.of(task.query[0][0], pool)
        for i, layer in enumerate(LAYERS):
            for distance in DISTANCES:
                results[(layer, pool, distance)] = prototype_accuracy(
                    support[i], task.support[1], query[i], task.query[1], distance
                )
    return results


def key(layer, pool, distance) -> str:
    return f"layer {layer}, {pool}, {distance}"


def print_grid(grid: dict, pools) -> None:
    print("| layer | " + " | ".join(f"{p}, {d}" for p in pools for d in DISTANCES) + " |")
    print("|---" * (1 + len(pools) * len(DISTANCES)) + "|")
    for layer in LAYERS:
        cells = [grid[key(layer, p, d)] for p in pools for d in DISTANCES]
        print(f"| {layer} | " + " | ".join(f"{100 * m:.2f} %" for m, _ in cells) + " |")


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--pools", nargs="+", choices=POOLS, default=list(POOLS))
    pools = parser.parse_args().pools
    use_shared_data()
    # The results of the pools not recomputed, from the file.
    kept = json.loads(OUT.read_text()) if set(pools) != set(POOLS) and OUT.is_file() else {}
    kept_pools = {p: c for p, c in kept.get("pools", {}).items() if p not in pools}
    grid = {
        k: v for k, v in kept.get("validation_grid", {}).items() if k.split(", ")[1] not in pools
    }
    model, params = load_pretrained(MODEL)
    tokenizer = load_tokenizer(MODEL)
    length = MAX_LEN["end"]
    task = FewRelTask(model=MODEL, trainable_blocks=TRAINABLE_BLOCKS, max_len=length, pool="end")
    features = Features(model, params, Pretrained(task, 0, length, lm_head=False).trunk)
    features.trunk_len = length
    start_id = pretrained_choice._token_id(
        tokenizer, pretrained_choice._START_TOKENS, "start", MODEL
    )
    encode_ids = lambda text: list(tokenizer.encode(text))
    chosen = {}  # pool -> (layer, pool, distance) chosen on validation
    for name, protocol, split, shots in SETTINGS:
        print(f"{name}:")
        results = evaluate(features, encode_ids, start_id, protocol, split, shots, pools)
        if not chosen:  # the validation setting comes first and makes the choices
            grid |= {key(*k): summary(v) for k, v in results.items()}
            print_grid(grid, pools)
            for pool in pools:
                chosen[pool] = max(
                    (k for k in results if k[1] == pool), key=lambda k: grid[key(*k)][0]
                )
                kept_pools[pool] = {
                    "layer": chosen[pool][0],
                    "distance": chosen[pool][2],
                    "settings": {},
                }
                print(f"  {pool}: chosen on validation: layer {chosen[pool][0]}, {chosen[pool][2]}")
        for pool, k in chosen.items():
            mean, ci = summary(results[k])
            kept_pools[pool]["settings"][name] = {"accuracy": mean, "ci95": ci}
            print(f"  {name}, {pool}: {100 * mean:.2f} ± {100 * ci:.2f} % at the validation choice")
    best = max(kept_pools, key=lambda p: kept_pools[p]["settings"][SETTINGS[0][0]]["accuracy"])
    report = {
        "model": MODEL,
        "max_len": MAX_LEN,
        "tasks": NUM_TASKS,
        # The pooling with the best validation accuracy, and its numbers.
        "choice": {"pool": best, **{k: kept_pools[best][k] for k in ("layer", "distance")}},
        "settings": kept_pools[best]["settings"],
        "pools": kept_pools,
        "validation_grid": grid,
    }
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(json.dumps(report, indent=1) + "\n")
    print(f"wrote {OUT}")


if __name__ == "__main__":
    main()
