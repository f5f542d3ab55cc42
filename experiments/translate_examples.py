"""Translated examples for each held-out language: what "a new language from K examples" gives.

For every test language: K support pairs drawn once (seeded) from its CLDR names, then the same
few English names translated greedily by each trained run after adapting on those pairs. A
Markdown table goes to stdout::

    .venv/bin/python experiments/translate_examples.py \\
        "MAML=runs/translate_8_maml" "baseline=runs/translate_8_pretrain@0.3"

Each argument is LABEL=WORKDIR, optionally @RATE to adapt at another inner rate than the
run's (the baseline's rate chosen on the validation languages).
"""

from __future__ import annotations

import argparse
import dataclasses

import numpy as np

from metajax.run import predict
from metajax.run.workdir import read_config
from metajax.tasks import translate

QUERIES = ("Germany", "Japan", "Spanish")


def load(spec: str):
    label, _, where = spec.partition("=")
    workdir, _, rate = where.partition("@")
    config = read_config(workdir)
    if rate:
        config = dataclasses.replace(
            config, algorithm=dataclasses.replace(config.algorithm, inner_lr=float(rate))
        )
    return label, predict.load(workdir, config), config


def support_and_queries(lang: str, shots: int, max_len: int, seed: int = 0):
    # Only pairs that fit the model's sequences (BOS, source, SEP, target, END).
    fits = lambda s, t: len(s.encode()) + len(t.encode()) + 3 <= max_len
    pairs = {s: t for s, t in translate.load_pairs(lang) if fits(s, t)}
    queries = [(s, pairs[s]) for s in QUERIES if s in pairs]
    rest = sorted(s for s in pairs if s not in QUERIES)
    picks = np.random.default_rng(seed).choice(len(rest), shots, replace=False)
    return [(rest[i], pairs[rest[i]]) for i in sorted(picks)], queries


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("runs", nargs="+", help="LABEL=WORKDIR[@RATE]")
    parser.add_argument("--steps", type=int, default=10, help="adaptation steps")
    args = parser.parse_args()
    models = [load(spec) for spec in args.runs]
    shots, max_len = models[0][2].task.shots, models[0][2].task.max_len
    labels = [label for label, _, _ in models]
    print(f"| language | English | CLDR name | {' | '.join(labels)} |")
    print("|---|---|---|" + "---|" * len(labels))
    for lang in translate.language_split()["test"]:
        support, queries = support_and_queries(lang, shots, max_len)
        outputs = [
            model.adapt_and_predict(support, None, [s for s, _ in queries], steps=args.steps)
            for _, model, _ in models
        ]
        for i, (source, target) in enumerate(queries):
            cells = " | ".join(repr(out[i]) for out in outputs)
            print(f"| {lang} | {source} | {target} | {cells} |")


if __name__ == "__main__":
    main()
