"""A reference point for FewRel without learning: nearest prototype of bag-of-words vectors.

Each sentence becomes the counts of its words in the word vocabulary the meta-learners use
(the 8000 commonest words of the meta-training files; markers, padding and unknown words
left out), scaled to unit length; a query goes to the relation whose mean support vector
has the largest dot product with it. Nothing is trained, so this measures how much plain
word overlap between support and query sentences tells the relations apart. Same task
sampler, protocols and 600 tasks as the runner's evaluation::

    .venv/bin/python experiments/fewrel_lexical.py
"""

from __future__ import annotations

import numpy as np
from _shared_data import use_shared_data

from metajax.tasks import fewrel

NUM_TASKS, WAYS, QUERIES = 600, 5, 5
SETTINGS = (
    ("cross_domain", 1, "validation"),
    ("cross_domain", 1, "test"),
    ("cross_domain", 5, "test"),
    ("in_domain", 1, "test"),
)


def bag_of_words(tokens: np.ndarray, num_tokens: int) -> np.ndarray:
    """Unit-length word counts ``(..., num_tokens)`` of token rows ``(..., L)``."""
    flat = tokens.reshape(-1, tokens.shape[-1])
    counts = np.zeros((flat.shape[0], num_tokens))
    rows = np.repeat(np.arange(flat.shape[0]), flat.shape[1])
    words = flat.ravel()
    keep = words >= fewrel.WORD_SPECIALS  # no padding, unknown words or markers
    np.add.at(counts, (rows[keep], words[keep]), 1.0)
    counts /= np.maximum(np.linalg.norm(counts, axis=-1, keepdims=True), 1e-12)
    return counts.reshape(*tokens.shape[:-1], num_tokens)


def accuracy(protocol: str, shots: int, split: str) -> tuple[float, float]:
    splits = fewrel.protocol_splits(protocol, num_val=5 if protocol == "cross_domain" else 0)
    source = fewrel.FewRel(splits, split=split, ways=WAYS, shots=shots, queries=QUERIES, max_len=48)
    task = source.sample(0, NUM_TASKS)
    (support, _), support_labels = task.support
    (query, _), query_labels = task.query
    s, q = bag_of_words(support, source.num_tokens), bag_of_words(query, source.num_tokens)
    onehot = np.eye(WAYS)[support_labels]  # (T, N*K, N)
    prototypes = np.einsum("tsn,tsv->tnv", onehot, s) / shots
    predicted = np.einsum("tqv,tnv->tqn", q, prototypes).argmax(-1)
    per_task = (predicted == query_labels).mean(-1)
    return float(per_task.mean()), float(1.96 * per_task.std(ddof=1) / np.sqrt(NUM_TASKS))


def main():
    use_shared_data()
    print("| protocol | setting | relations evaluated | accuracy |")
    print("|---|---|---|---|")
    for protocol, shots, split in SETTINGS:
        mean, ci = accuracy(protocol, shots, split)
        cell = f"{100 * mean:.2f} ± {100 * ci:.2f} %"
        print(f"| {protocol} | 5-way {shots}-shot | {split} | {cell} |")


if __name__ == "__main__":
    main()
